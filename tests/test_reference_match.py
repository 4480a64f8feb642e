"""Real kohya LoRA key sets match 100% against real checkpoint layouts (../shared/reference)."""

import pytest
import torch
from factories import ShapeSource, reference

from lib_lorakit.bake import LoraSpec, plan_bake
from lib_lorakit.synth import kohya_modules

CASES = [
    ("sd15", "sd15_ldm.json", "lora_kohya_sd15.json", {"unet": 278, "te1": 72}),
    ("sdxl", "sdxl_sgm.json", "lora_kohya_sdxl.json", {"unet": 788, "te1": 72, "te2": 192}),
]


@pytest.mark.parametrize("arch,ckpt,lora,expected", CASES)
def test_every_kohya_module_matches(shared_reference, arch, ckpt, lora, expected):
    base = ShapeSource(reference(ckpt), path=ckpt)
    lsrc = ShapeSource(reference(lora), path=lora)
    plan = plan_bake(base, [LoraSpec(path=lora, source=lsrc)])
    st = plan.loras[0]
    total = len(st.parsed.modules)
    assert st.unmatched == []
    assert dict(st.matched) == expected and sum(expected.values()) == total  # 100% of modules matched
    assert st.family.arch == arch
    # every matched module lands on a distinct target (te2 q/k/v on distinct row slices)
    targets = [(c.target.weight_key, c.target.rows) for cs in plan.weights.values() for c in cs]
    assert len(targets) == len(set(targets)) == total


@pytest.mark.parametrize("arch,ckpt,lora,expected", CASES)
def test_synthetic_kohya_module_set_is_kohyas(shared_reference, arch, ckpt, lora, expected):
    """The demo/bench LoRAs carry exactly the module names and shapes kohya produces."""
    ref = reference(lora)
    names = {k.split(".")[0] for k in ref}
    mine = kohya_modules(arch, conv=True, te=True, tiny=False)
    assert {n for n, *_ in mine} == names
    for name, shape, _, _ in mine:
        up, down = ref[name + ".lora_up.weight"][0], ref[name + ".lora_down.weight"][0]
        assert (up[0],) + tuple(down[1:]) == tuple(shape) or (up[0], down[1]) == tuple(shape)[:2], name


def test_wrong_architecture_reference_lora_is_refused(shared_reference):
    from lib_lorakit.errors import ArchitectureError

    base = ShapeSource(reference("sdxl_sgm.json"), path="sdxl.safetensors")
    lsrc = ShapeSource(reference("lora_kohya_sd15.json"), path="sd15-lora.safetensors")
    with pytest.raises(ArchitectureError, match=r"LoRA for SD1\.5 .* but the checkpoint sdxl\.safetensors is SDXL"):
        plan_bake(base, [LoraSpec(path="sd15-lora.safetensors", source=lsrc)])
    _ = torch
