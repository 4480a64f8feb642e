"""Agreement with independent implementations: LyCORIS and PEFT from PyPI.

Each compares lorakit's ΔW (float32) with the other library's, on layers with the
shapes of real SDXL/SD1.5 modules scaled down. Max relative error <= 1e-6.
"""

import pytest
import torch
import torch.nn as nn

from lib_lorakit.networks import compute_delta, identify

lycoris_modules = pytest.importorskip("lycoris.modules", reason="LyCORIS (lycoris-lora) is a test dependency")
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

TOL = 1e-6


def ours(p: dict, target, weight=None) -> torch.Tensor:
    alg, extra = identify(frozenset(p))
    assert not extra
    return compute_delta(alg, {k: v.float() for k, v in p.items()}, tuple(target), weight).to_dense(tuple(target))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in module.named_parameters():
            if "org_module" in name:
                continue
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.1 + (0.5 if "dora_scale" in name else 0.0))


def layers():
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(40, 24),  # attention projection (scaled down)
        "conv1x1": nn.Conv2d(20, 12, 1),  # SD1.5 proj_in
        "conv3x3": nn.Conv2d(16, 12, 3, padding=1),  # resnet conv (LoCon)
    }


@pytest.mark.parametrize(
    "layer,tucker", [("linear", False), ("conv1x1", False), ("conv3x3", False), ("conv3x3", True)]
)  # Tucker applies to kernels larger than 1x1
def test_lora_locon_vs_lycoris(layer, tucker):
    base = layers()[layer]
    m = LoConModule("lora_unet_test", base, 1.0, lora_dim=4, alpha=2.0, use_tucker=tucker)
    randomise(m, 1)
    ref = m.get_diff_weight(multiplier=1)[0]
    sd = {k: v for k, v in m.custom_state_dict().items()} if hasattr(m, "custom_state_dict") else m.state_dict()
    p = {k: v for k, v in sd.items() if k in ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha")}
    assert rel(ours(p, base.weight.shape), ref) <= TOL


@pytest.mark.parametrize("layer,tucker", [("linear", False), ("conv3x3", False), ("conv3x3", True)])
def test_loha_vs_lycoris(layer, tucker):
    base = layers()[layer]
    m = LohaModule("lora_unet_test", base, 1.0, lora_dim=4, alpha=2.0, use_tucker=tucker)
    randomise(m, 2)
    # get_weight is what the module's forward adds (alpha/rank applied once); this LyCORIS
    # release's get_diff_weight multiplies by the scale a second time for LoHa and LoKr
    ref = m.get_weight(m.shape)
    sd = m.custom_state_dict()
    p = {k: v for k, v in sd.items() if k.startswith("hada_") or k == "alpha"}
    assert rel(ours(p, base.weight.shape), ref) <= TOL


@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
@pytest.mark.parametrize(
    "variant", [dict(), dict(decompose_both=True), dict(use_tucker=True), dict(full_matrix=True), dict(factor=4)]
)
def test_lokr_vs_lycoris(layer, variant):
    base = layers()[layer]
    m = LokrModule("lora_unet_test", base, 1.0, lora_dim=2, alpha=3.0, **variant)
    randomise(m, 3)
    # LyCORIS applies its scale inside get_weight (what forward uses) ...
    ref = m.get_weight(m.shape)
    p = {k: v for k, v in m.custom_state_dict().items()}
    assert rel(ours(p, base.weight.shape), ref) <= TOL


@pytest.mark.parametrize("cls", [LokrModule, LohaModule, LoConModule])
def test_forward_agrees_with_baked_weight(cls):
    """The module's own forward (the runtime) equals a linear layer with W + ΔW (the baked model)."""
    base = nn.Linear(40, 24).double()  # float64, so y - y_base is not lost to cancellation
    m = cls("lora_unet_test", base, 1.0, lora_dim=2, alpha=3.0).double()
    randomise(m, 4)
    p = dict(m.custom_state_dict())
    w = base.weight.detach().clone()
    b = base.bias.detach().clone()
    m.apply_to()
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        y_runtime = base(x)
    y_base = nn.functional.linear(x, w, b)
    y_baked = nn.functional.linear(x, w + ours(p, w.shape).double(), b)
    assert rel(y_baked - y_base, y_runtime - y_base) <= TOL


@pytest.mark.parametrize("layer", ["linear", "conv3x3"])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_vs_lycoris(layer, wd_on_out):
    base = layers()[layer]
    m = LoConModule("lora_unet_test", base, 1.0, lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=wd_on_out)
    randomise(m, 6)
    w = base.weight.detach().clone()
    ref = m.get_merged_weight(multiplier=1)[0] - w
    sd = m.custom_state_dict()
    p = {k: v for k, v in sd.items() if k in ("lora_up.weight", "lora_down.weight", "alpha", "dora_scale")}
    assert "dora_scale" in p
    # LyCORIS adds float eps to the norm; the difference is far below the tolerance
    assert rel(ours(p, w.shape, w.float()), ref) <= TOL


peft = pytest.importorskip("peft", reason="PEFT is a test dependency")


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_vs_peft(use_dora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = nn.Linear(40, 24)

    net = Net()
    w = net.to_q.weight.detach().clone()
    model = get_peft_model(
        net, LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], use_dora=use_dora, init_lora_weights=False)
    )
    layer = model.base_model.model.to_q
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(4, 40, generator=g) * 0.1)
        layer.lora_B["default"].weight.copy_(torch.randn(24, 4, generator=g) * 0.1)
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    p = {
        "lora_down.weight": layer.lora_A["default"].weight.detach(),
        "lora_up.weight": layer.lora_B["default"].weight.detach(),
        "alpha": torch.tensor(8.0),
    }
    if use_dora:
        p["lora_magnitude_vector"] = layer.lora_magnitude_vector["default"].weight.detach()
    merged = model.merge_and_unload().to_q.weight.detach()
    assert rel(ours(p, w.shape, w.float()), merged - w) <= TOL
