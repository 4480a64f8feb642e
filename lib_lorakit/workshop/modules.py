"""The modules kohya-ss sd-scripts' LoRA covers, named as its files name them, found in a checkpoint.

Matches ``networks/lora.py`` ``create_network`` as ``extract_lora_from_models.py`` uses it:
UNet transformer blocks (attention, feed-forward, proj_in/out) always; with a conv rank, the
ResNet blocks' convolutions, their time-embedding Linear and 1x1 skip, and the down/up-sampler
convs (not ``input_blocks.0``); text encoders' ``self_attn.{q,k,v,out}_proj`` and ``mlp.fc1/fc2``.
SD1.x UNet names are diffusers paths, SDXL ones ldm paths; text encoders are ``lora_te_`` (SD1)
or ``lora_te1_``/``lora_te2_`` (SDXL). SDXL's CLIP-G stores q/k/v fused in ``attn.in_proj_weight``:
each 1/3 row slice is its own module ``lora_te2_text_model_encoder_layers_N_self_attn_{q,k,v}_proj``,
as :mod:`lib_lorakit.networks.resolve` maps those names back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..formats.arch import Arch, block_of, component_of
from ..networks.resolve import unet_ldm_to_diffusers

_ATTN = re.compile(r"\.(attn[12]\.to_(?:q|k|v|out\.0)|ff\.net\.(?:0\.proj|2)|proj_in|proj_out)\.weight$")
_CONV = re.compile(r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|conv)\.weight$")
_TE = re.compile(r"\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$")
_G_LAYER = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}
_G_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj|attn\.in_proj)[._]weight$")


@dataclass(frozen=True)
class Module:
    """One LoRA module of an extraction.

    Attributes:
        name: kohya module name (``lora_unet_…``).
        key: the checkpoint weight it updates.
        shape: the target's shape (a row slice for CLIP-G q/k/v).
        rows: row slice of ``key`` or None.
        kind: "linear", "conv1x1" or "conv" (kernel larger than 1x1).
    """

    name: str
    key: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None
    component: str
    block: str | None

    @property
    def kind(self) -> str:
        if len(self.shape) == 4:
            return "conv1x1" if self.shape[2:] == (1, 1) else "conv"
        return "linear"


def kohya_modules(shapes: Mapping[str, tuple[int, ...]], arch: Arch, *, conv: bool = True) -> list[Module]:
    """The kohya LoRA modules of a checkpoint with these key shapes, in checkpoint key order."""
    out: list[Module] = []
    up = arch.prefixes["unet"]

    def add(name: str, key: str, shape: tuple[int, ...], rows=None) -> None:
        out.append(Module(name, key, tuple(shape), rows, component_of(key, arch), block_of(key, arch)))

    for key, shape in shapes.items():
        comp = component_of(key, arch)
        if comp == "unet" and key.endswith(".weight"):
            is_attn = bool(_ATTN.search(key))
            is_conv = (
                bool(_CONV.search(key))
                and key.startswith((up + "input_blocks.", up + "middle_block.", up + "output_blocks."))
                and not key.startswith(up + "input_blocks.0.")
            )
            if not (is_attn or (conv and is_conv)) or len(shape) < 2:
                continue
            rel = key[len(up) : -len(".weight")]
            name = unet_ldm_to_diffusers(rel) if arch.id == "sd15" else rel
            if name is None:
                continue
            add("lora_unet_" + name.replace(".", "_"), key, shape)
        elif comp == "te1" and _TE.search(key):
            rel = key[len(arch.prefixes["te1"]) : -len(".weight")]
            add(("lora_te_" if arch.id == "sd15" else "lora_te1_") + rel.replace(".", "_"), key, shape)
        elif comp == "te2":
            m = _G_KEY.search(key)
            if not m:
                continue
            i, what = m.group(1), m.group(2)
            p = f"lora_te2_text_model_encoder_layers_{i}_"
            if what == "attn.in_proj":
                if shape[0] % 3:
                    continue
                d = shape[0] // 3
                for j, q in enumerate("qkv"):
                    add(f"{p}self_attn_{q}_proj", key, (d,) + tuple(shape[1:]), (j * d, (j + 1) * d))
            else:
                add(p + _G_LAYER[what], key, shape)
    return out
