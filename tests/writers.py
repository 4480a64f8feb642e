"""LoRA files written by the real third-party writers, and their meaning computed by those writers.

Each case builds the writer's own model (a diffusers ``UNet2DConditionModel``, a transformers
``CLIPTextModel``/``CLIPTextModelWithProjection``) at the checkpoint's width, loads the checkpoint's
weights into it through diffusers' single-file converters (``convert_ldm_unet_checkpoint``,
``convert_open_clip_checkpoint``; text encoder 1 by stripping its prefix), attaches the writer's
adapter (PEFT ``add_adapter``/``inject_adapter_in_model``, LyCORIS ``create_lycoris``), gives every
adapter parameter random values (trainers start ``up``/``lora_B`` at zero) and saves the file with the
writer's own save path. The reference is what the writer's module itself applies: PEFT's
``get_delta_weight`` / ``merge`` and LyCORIS's ``merge_to``, run in float64, in the writer's module
names. The baked checkpoint is brought to the same names by the same diffusers converters, so
lorakit's own name mapping is never used to judge itself.

Used by tests/test_writers.py (tiny widths) and bench/writers_fullsize.py (full size).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_lorakit.formats.arch import ARCHS

TE_PREFIX = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
TE2_PREFIX = "conditioner.embedders.1.model."
ATTN = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _div(n: int, f: int) -> int:
    return n // f if f > 1 else n


def unet_model(arch: str, f: int) -> UNet2DConditionModel:
    """The diffusers UNet of ``arch`` with every width divided by ``f`` (1: full size)."""
    g = 32 if f == 1 else 5
    if arch == "sd15":
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=tuple(_div(c, f) for c in (320, 640, 1280, 1280)),
            layers_per_block=2,
            cross_attention_dim=_div(768, f),
            attention_head_dim=8 if f == 1 else 1,
            norm_num_groups=g,
        )
    return UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(_div(c, f) for c in (320, 640, 1280)),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=_div(2048, f),
        attention_head_dim=(5, 10, 20) if f == 1 else 1,
        norm_num_groups=g,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_div(256, f),
        projection_class_embeddings_input_dim=_div(2816, f),
    )


def te_config(which: str, f: int) -> CLIPTextConfig:
    if which == "te1":
        return CLIPTextConfig(
            hidden_size=_div(768, f),
            intermediate_size=_div(3072, f),
            num_attention_heads=12 if f == 1 else 1,
            num_hidden_layers=12,
            vocab_size=_div(49408, f),
            hidden_act="quick_gelu",
        )
    return CLIPTextConfig(
        hidden_size=_div(1280, f),
        intermediate_size=_div(5120, f),
        num_attention_heads=20 if f == 1 else 1,
        num_hidden_layers=32,
        vocab_size=_div(49408, f),
        projection_dim=_div(1280, f),
        hidden_act="gelu",
    )


def read_all(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def diffusers_view(ck: dict[str, torch.Tensor], arch: str, f: int, parts=("unet", "te1", "te2")) -> dict[str, dict]:
    """The checkpoint's UNet and text encoders under diffusers/transformers names (third-party converters)."""
    out = {}
    if "unet" in parts:
        out["unet"] = convert_ldm_unet_checkpoint(ck, unet_model_config(arch, f))
    if "te1" in parts:
        p = TE_PREFIX[arch]
        out["te1"] = {k[len(p) :]: v for k, v in ck.items() if k.startswith(p)}
    if arch == "sdxl" and "te2" in parts:
        with torch.device("meta"):
            shell = CLIPTextModelWithProjection(te_config("te2", f))
        out["te2"] = convert_open_clip_checkpoint(shell, ck, prefix=TE2_PREFIX)
    return out


_CONFIGS: dict = {}


def unet_model_config(arch: str, f: int):
    if (arch, f) not in _CONFIGS:
        with torch.device("meta"):
            _CONFIGS[arch, f] = unet_model(arch, f).config
    return _CONFIGS[arch, f]


def load_unet(arch: str, f: int, view: dict) -> UNet2DConditionModel:
    m = unet_model(arch, f)
    m.load_state_dict(view["unet"])
    return m


def load_te(which: str, f: int, view: dict, flat: bool = False) -> torch.nn.Module:
    """A text encoder; ``flat``: transformers 5's module tree (CLIPTextModel without the ``text_model`` level)."""
    cls = CLIPTextModelWithProjection if which == "te2" else CLIPTextModel
    m = cls(te_config(which, f))
    m.load_state_dict({k: v for k, v in view[which].items() if "position_ids" not in k}, strict=False)
    return m.text_model if flat else m


def randomise(module: torch.nn.Module, seed: int, names: Callable[[str], bool]) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in module.named_parameters():
            if names(name):
                fan = prm.shape[-1] if prm.dim() > 1 else 1
                v = torch.randn(prm.shape, generator=g) / max(fan, 1) ** 0.5
                if "dora_scale" in name or "magnitude" in name:
                    v = 1.0 + 0.2 * v
                prm.copy_(v)


def peft_reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's own merge of every adapter layer, in float64, under the base model's parameter names.

    Merges in place (the model is turned to float64): take the adapter's state dict first.
    """
    m = model.double()
    for mod in m.modules():
        if isinstance(mod, BaseTunerLayer):
            mod.merge(safe_merge=False)
    out = {}
    for k, v in m.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def lycoris_reference(model: torch.nn.Module, net) -> dict[str, torch.Tensor]:
    """LyCORIS's own update of every module, applied to a float64 copy of the model.

    LoRA/LoCon and DoRA: the module's ``merge_to``. LoHa and LoKr: ``org weight + get_weight() * scalar
    * multiplier``, the weight their forward builds (``forward``: ``diff_weight = self.get_weight(...) *
    self.scalar``); their ``get_diff_weight``/``merge_to`` in LyCORIS 4.1.3 multiply by ``scale`` a second
    time (``get_weight`` already applies it, as ``gamma`` / inside ``kron_weight``), which neither their
    own forward nor the WebUI does.
    """
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    m, n = model, net  # merged in place: save the file first
    m.double()
    n.double()
    with torch.no_grad():
        for lora in n.loras:
            if isinstance(lora, (LohaModule, LokrModule)) and not lora.wd:
                org = lora.org_module[0]
                org.weight.copy_(org.weight + lora.get_weight(org.weight.shape) * lora.scalar * lora.multiplier)
            else:
                lora.merge_to(1.0)
    return {k: v for k, v in m.state_dict().items()}


def diffusers_metadata_saver(configs: dict[str, LoraConfig]):
    """The safetensors writer of diffusers >= 0.34 (``loaders/lora_base.py`` ``write_lora_layers``).

    diffusers 0.32.2, the newest release that installs beside transformers 4.46 / huggingface_hub 0.25,
    has no ``*_lora_adapter_metadata`` arguments yet; its ``save_lora_weights`` takes a ``save_function``,
    and this one writes the header exactly as the newer release does: each component's
    ``LoraConfig.to_dict()`` with keys prefixed by the component (``_pack_dict_with_prefix``), sets as
    lists, ``json.dumps(..., indent=2, sort_keys=True)`` under ``lora_adapter_metadata``, beside
    ``format: pt``.
    """
    packed = {}
    for prefix, cfg in configs.items():
        for k, v in cfg.to_dict().items():
            packed[f"{prefix}.{k}"] = sorted(v) if isinstance(v, set) else v

    def save(weights, filename):
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}
        save_file(weights, filename, metadata=meta)

    return save


@dataclass
class Written:
    """A LoRA file and what its writer means by it."""

    path: str
    reference: dict[str, dict[str, torch.Tensor]]  # component -> name -> merged weight (float64)
    modules: dict[str, int]  # component -> adapter modules the writer attached
    algorithm: str
    writer: str
    extra: dict = field(default_factory=dict)


def _count_peft(model) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def write_diffusers(
    tmp: str,
    arch: str,
    f: int,
    view: dict,
    *,
    metadata: bool,
    rank_pattern=None,
    alpha_pattern=None,
    rslora: bool = False,
    r: int = 4,
    alpha: float = 8.0,
    flat_te: bool = False,
    te_only: bool = False,
    name: str = "diffusers.safetensors",
    unet_targets: list[str] | None = None,
    dora: bool = False,
) -> Written:
    """diffusers' training-script path: PEFT adapters, ``convert_state_dict_to_diffusers``, ``save_lora_weights``."""

    def cfg(targets):
        return LoraConfig(
            r=r,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=targets,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern=dict(alpha_pattern or {}),
            use_rslora=rslora,
            use_dora=dora,
        )

    torch.manual_seed(3)
    layers, configs, refs, counts = {}, {}, {}, {}
    comps = (
        (["te1"] + (["te2"] if arch == "sdxl" else []))
        if te_only
        else (["unet", "te1"] + (["te2"] if arch == "sdxl" else []))
    )
    for comp in comps:
        if comp == "unet":
            model = load_unet(arch, f, view)
            c = cfg(unet_targets or ATTN)
            model.add_adapter(c)
        else:
            model = load_te(comp, f, view, flat=flat_te)
            c = cfg(TE_TARGETS)
            if flat_te:
                model = inject_adapter_in_model(c, model)  # transformers-5 tree: PEFT's own injection
            else:
                model.add_adapter(c)
        randomise(model, 7 + len(layers), lambda n: "lora_" in n and "magnitude" not in n)
        if dora:  # magnitudes away from PEFT's initial ||W|| (which would make DoRA a plain LoRA)
            randomise(model, 8, lambda n: "magnitude" in n)
        sd = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        counts[comp] = _count_peft(model)
        refs[comp] = peft_reference(model)
        if flat_te and comp != "unet":  # transformers 5 dropped the "text_model." level the checkpoint view keeps
            refs[comp] = {
                ("text_model." + k if not k.startswith("text_projection") else k): v for k, v in refs[comp].items()
            }
        prefix = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}[comp]
        layers[prefix] = convert_state_dict_to_diffusers(sd) if comp == "unet" else sd
        configs[prefix] = c
    loader = StableDiffusionXLLoraLoaderMixin if arch == "sdxl" else StableDiffusionLoraLoaderMixin
    kw = {"unet_lora_layers": layers.get("unet"), "text_encoder_lora_layers": layers.get("text_encoder")}
    if arch == "sdxl":
        kw["text_encoder_2_lora_layers"] = layers.get("text_encoder_2")
    loader.save_lora_weights(
        tmp,
        weight_name=name,
        safe_serialization=True,
        save_function=diffusers_metadata_saver(configs) if metadata else None,
        **kw,
    )
    return Written(os.path.join(tmp, name), refs, counts, "lora", "diffusers save_lora_weights")


def write_kohya_converted(
    tmp: str,
    arch: str,
    f: int,
    view: dict,
    name: str = "kohya-converted.safetensors",
    unet_targets: list[str] | None = None,
    dora: bool = False,
) -> Written:
    """diffusers' kohya converter applied to what ``save_lora_weights`` writes (lora_alpha = r: the
    converter writes alpha = rank where it writes alpha at all, so that is the scale it keeps)."""
    w = write_diffusers(
        tmp, arch, f, view, metadata=False, r=4, alpha=4.0, name="for-kohya.safetensors", unet_targets=unet_targets
    )
    sd = read_all(w.path)
    kohya = convert_state_dict_to_kohya(sd)
    path = os.path.join(tmp, name)
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    os.remove(w.path)
    return Written(path, w.reference, w.modules, "lora", "diffusers convert_state_dict_to_kohya")


LYCORIS_ALGOS = {
    "lora": {"algo": "lora"},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": 4},
    "dora": {"algo": "lora", "dora_wd": True},
}


def write_lycoris(tmp: str, arch: str, f: int, view: dict, comp: str, algo: str, name: str | None = None) -> Written:
    """LyCORIS ``create_lycoris`` (preset 'full') on one model, saved with ``save_weights``."""
    from lycoris import create_lycoris

    model = load_unet(arch, f, view) if comp == "unet" else load_te(comp, f, view)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2.0, preset="full", **LYCORIS_ALGOS[algo])
    net.apply_to()
    randomise(net, 11, lambda n: "org_module" not in n and not n.endswith("alpha"))
    path = os.path.join(tmp, name or f"lycoris-{arch}-{comp}-{algo}.safetensors")
    net.save_weights(path, torch.float32, None)
    n = len(net.loras)
    return Written(path, {comp: lycoris_reference(model, net)}, {comp: n}, algo, "LyCORIS create_lycoris")


def compare(written: Written, baked: dict[str, dict], base: dict[str, dict]) -> tuple[float, dict[str, int]]:
    """Max relative error of every weight the writer changed; the others must be untouched.

    Returns:
        (max relative error, changed weights per component). Relative error of one weight:
        max |baked - reference| / max |reference|, the reference in float64.
    """
    worst = 0.0
    changed: dict[str, int] = {}
    for comp, ref in written.reference.items():
        for k, r in ref.items():
            if k not in baked[comp] or not r.is_floating_point():
                continue
            b0 = base[comp][k].double()
            got = baked[comp][k].double()
            if torch.equal(r, b0):
                assert torch.equal(got, b0), f"{comp} {k}: changed by the bake, not by the writer"
                continue
            changed[comp] = changed.get(comp, 0) + 1
            err = float((got - r).abs().max() / r.abs().max())
            worst = max(worst, err)
    return worst, changed


__all__ = [
    "ARCHS",
    "Written",
    "compare",
    "diffusers_view",
    "load_te",
    "load_unet",
    "read_all",
    "write_diffusers",
    "write_kohya_converted",
    "write_lycoris",
]
