"""Architectures: key layouts, components, UNet block ids and family detection.

Two architectures are supported, named after their checkpoint layouts:

- ``sd15`` (layout ``sd15-ldm``): SD1.x in the original ldm layout.
- ``sdxl`` (layout ``sdxl-sgm``): SDXL base and its descendants (Pony, Illustrious,
  NoobAI, ...), in the sgm layout.

Block ids follow the convention of LoRA Block Weight and SuperMerger:
``BASE`` (text encoders), ``IN00``..``IN11``, ``M00``, ``OUT00``..``OUT11`` for SD1.5
and ``IN00``..``IN08``, ``M00``, ``OUT00``..``OUT08`` for SDXL. UNet keys outside the
numbered blocks go to the nearest one: ``time_embed``/``label_emb`` to ``IN00`` (they
feed the first block), ``out.*`` to the last output block.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import ArchitectureError

LAYOUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "layouts")

COMPONENTS = ("unet", "te1", "te2", "vae")


@dataclass(frozen=True)
class Arch:
    id: str
    label: str
    layout: str
    prefixes: Mapping[str, str]  # component -> key prefix
    n_in: int  # number of input blocks
    context_dim: int

    @property
    def blocks(self) -> tuple[str, ...]:
        """All block ids in order: BASE, IN.., M00, OUT.."""
        return (
            ("BASE",)
            + tuple(f"IN{i:02d}" for i in range(self.n_in))
            + ("M00",)
            + tuple(f"OUT{i:02d}" for i in range(self.n_in))
        )


SD15 = Arch(
    id="sd15",
    label="SD1.5",
    layout="sd15-ldm",
    prefixes={"unet": "model.diffusion_model.", "te1": "cond_stage_model.transformer.", "vae": "first_stage_model."},
    n_in=12,
    context_dim=768,
)
SDXL = Arch(
    id="sdxl",
    label="SDXL",
    layout="sdxl-sgm",
    prefixes={
        "unet": "model.diffusion_model.",
        "te1": "conditioner.embedders.0.transformer.",
        "te2": "conditioner.embedders.1.model.",
        "vae": "first_stage_model.",
    },
    n_in=9,
    context_dim=2048,
)
ARCHS: dict[str, Arch] = {a.id: a for a in (SD15, SDXL)}


@functools.cache
def load_layout(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return a layout's tensors: key -> (shape, dtype name as released)."""
    with open(os.path.join(LAYOUT_DIR, name + ".json")) as f:
        data = json.load(f)
    return {k: (tuple(v[0]), v[1]) for k, v in data["tensors"].items()}


@functools.cache
def load_optional(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Keys some files of the layout carry and others do not (schedule buffers, v-pred flags)."""
    with open(os.path.join(LAYOUT_DIR, name + ".json")) as f:
        data = json.load(f)
    return {k: (tuple(v[0]), v[1]) for k, v in data["optional"].items()}


def component_of(key: str, arch: Arch) -> str:
    """Return 'unet', 'te1', 'te2', 'vae' or 'other' for a checkpoint key."""
    for comp, prefix in arch.prefixes.items():
        if key.startswith(prefix):
            return comp
    return "other"


_RE_IN = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_RE_OUT = re.compile(r"^model\.diffusion_model\.output_blocks\.(\d+)\.")


def block_of(key: str, arch: Arch) -> str | None:
    """Return the block id of a checkpoint key, or None for VAE and other keys."""
    comp = component_of(key, arch)
    if comp in ("te1", "te2"):
        return "BASE"
    if comp != "unet":
        return None
    if m := _RE_IN.match(key):
        return f"IN{int(m.group(1)):02d}"
    if m := _RE_OUT.match(key):
        return f"OUT{int(m.group(1)):02d}"
    rest = key[len("model.diffusion_model.") :]
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{arch.n_in - 1:02d}"
    return None


# --- family detection ------------------------------------------------------------------

LINEAGE_WORDS = {
    "Pony": re.compile(r"pony|pdxl|score_9", re.I),
    "Illustrious": re.compile(r"illustrious|illust(?:rious)?xl|\bilxl\b|\bill?_?xl\b", re.I),
    "NoobAI": re.compile(r"noob", re.I),
}
_LINEAGE_FIELDS = (
    "modelspec.title",
    "modelspec.description",
    "modelspec.architecture",
    "modelspec.tags",
    "ss_sd_model_name",
    "ss_base_model_version",
    "ss_output_name",
    "ss_training_comment",
    "name",
    "description",
    "base_model",
)


@dataclass
class Family:
    """What a file says about the model family it belongs to."""

    arch: str | None  # "sd15", "sdxl" or None when undecided
    evidence: list[str] = field(default_factory=list)
    vpred: bool | None = None  # True/False when known, None when unknown
    vpred_evidence: str = ""
    lineage: list[tuple[str, str]] = field(default_factory=list)  # (lineage, evidence)
    variant: str = ""  # e.g. "inpaint"

    @property
    def label(self) -> str:
        return ARCHS[self.arch].label if self.arch in ARCHS else "unknown"

    def as_dict(self) -> dict:
        return {
            "arch": self.arch,
            "arch_label": self.label,
            "evidence": self.evidence,
            "vpred": self.vpred,
            "vpred_evidence": self.vpred_evidence,
            "lineage": [{"lineage": n, "evidence": e} for n, e in self.lineage],
            "variant": self.variant,
        }


def lineage_hints(metadata: Mapping[str, str], filename: str = "") -> list[tuple[str, str]]:
    """Find Pony/Illustrious/NoobAI hints in metadata fields and the file name."""
    found: dict[str, str] = {}
    fields = [(k, metadata.get(k, "")) for k in _LINEAGE_FIELDS] + [("file name", os.path.basename(filename))]
    for name, rx in LINEAGE_WORDS.items():
        for k, v in fields:
            if isinstance(v, str) and v and (m := rx.search(v)):
                found.setdefault(name, f"{k} contains {m.group(0)!r}")
    return list(found.items())


def _vpred_from(metadata: Mapping[str, str], keys: Iterable[str]) -> tuple[bool | None, str]:
    keys = set(keys)
    if "v_pred" in keys:
        return True, "the checkpoint has a 'v_pred' key"
    if "edm_vpred.sigma_max" in keys:
        return True, "the checkpoint has 'edm_vpred.*' keys"
    pt = metadata.get("modelspec.prediction_type", "").lower()
    if pt:
        return pt.startswith("v"), f"modelspec.prediction_type = {pt!r}"
    vp = metadata.get("ss_v_parameterization")
    if vp is not None:
        return vp.lower() == "true", f"ss_v_parameterization = {vp!r}"
    return None, ""


def detect_checkpoint(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str], path: str = "") -> Family:
    """Detect the architecture of a full checkpoint from its keys and shapes.

    Raises:
        ArchitectureError: for families lorakit does not handle (SD2, SDXL refiner,
            SD3/Flux, diffusers folders), with the reason.
    """
    name = path or "the checkpoint"
    vpred, vpred_ev = _vpred_from(metadata, shapes)
    fam = Family(arch=None, vpred=vpred, vpred_evidence=vpred_ev, lineage=lineage_hints(metadata, path))
    u = "model.diffusion_model."
    if any(k.startswith(u + ("joint_blocks", "double_blocks")[i]) for k in shapes for i in (0, 1)):
        raise ArchitectureError(
            f"{name} is an SD3/Flux-style (transformer) checkpoint.",
            fix="lorakit handles SD1.5 and SDXL checkpoints only.",
        )
    if any(k.startswith("cond_stage_model.model.transformer.") for k in shapes):
        raise ArchitectureError(
            f"{name} is an SD2.x checkpoint (OpenCLIP text encoder under cond_stage_model.model).",
            fix="lorakit handles SD1.5 and SDXL checkpoints only.",
        )
    label = shapes.get(u + "label_emb.0.0.weight")
    te_l = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    te_g = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    if label is not None:
        if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            raise ArchitectureError(
                f"{name} is an SDXL refiner (OpenCLIP-G as its only text encoder).",
                fix="lorakit bakes into SDXL base-family checkpoints (SDXL, Pony, Illustrious, NoobAI).",
            )
        has_te = te_l in shapes and te_g in shapes
        deep = u + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in shapes
        if not (has_te or deep):
            raise ArchitectureError(
                f"{name} has SDXL-style class embeddings but not SDXL's structure "
                f"(label_emb input {label[-1]}, no CLIP-L + CLIP-G, no 2-layer transformer blocks).",
                fix="lorakit bakes into SDXL base-family checkpoints (SDXL, Pony, Illustrious, NoobAI).",
            )
        fam.arch = "sdxl"
        fam.evidence.append(f"{u}label_emb and " + ("CLIP-L + CLIP-G text encoders" if has_te else "SDXL UNet blocks"))
    elif "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in shapes:
        fam.arch = "sd15"
        fam.evidence.append("CLIP-L text encoder under cond_stage_model.transformer.text_model")
    elif any(k.startswith("cond_stage_model.transformer.encoder.") for k in shapes):
        raise ArchitectureError(
            f"{name} uses the old SD1 text-encoder key names (no 'text_model').",
            fix="Load and save it once in the WebUI (Checkpoint Merger, 'No interpolation') to modernise the keys.",
        )
    elif any(k.startswith(u) for k in shapes):
        k2 = u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if k2 in shapes and shapes[k2][-1] == 768:
            fam.arch = "sd15"
            fam.evidence.append("UNet cross-attention context 768 (no text encoder in the file)")
        elif (
            u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in shapes
            and shapes[u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"][-1] == 2048
        ):
            fam.arch = "sdxl"
            fam.evidence.append("UNet cross-attention context 2048 (no text encoders in the file)")
    if fam.arch is None:
        if any(k.startswith(("lora_", "lycoris_")) or ".lora_" in k or ".hada_" in k or ".lokr_" in k for k in shapes):
            raise ArchitectureError(
                f"{name} is a LoRA/LyCORIS file, not a checkpoint.",
                fix="Give the base checkpoint first and the LoRA with --lora.",
            )
        raise ArchitectureError(
            f"{name} is not an SD1.5 or SDXL checkpoint in the ldm/sgm layout "
            f"(no model.diffusion_model / text-encoder keys found among {len(shapes)} tensors).",
            fix="Diffusers folders and other layouts are not supported; use a single-file checkpoint.",
        )
    conv_in = shapes.get(u + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        fam.variant = {9: "inpaint", 8: "instruct-pix2pix"}.get(conv_in[1], f"{conv_in[1]}-channel input")
    return fam


# Only names of the second text encoder say SDXL: "lora_te1_" alone is also written for SD1.x text
# encoders (diffusers' kohya converter names every "text_encoder." module that way).
_LORA_SDXL_NAME = re.compile(r"(?:^|[._])(?:lora_te2_|text_encoder_2[._]|te2[._])", re.M)
_LORA_CTX = re.compile(r"attn2_to_[kv]_(?:lora_down|lora_A|down)_weight$")
# SD1.5 has one transformer layer per attention block; SDXL has 2 or 10.
_LORA_XL_BLOCK = re.compile(r"transformer_blocks[._][1-9]")
# Attention at the first level and the 10th-12th blocks exist only in SD1.x.
_LORA_SD1_BLOCK = re.compile(
    r"(?:input_blocks[._][12][._]1[._]|input_blocks[._]1[01][._]|output_blocks[._](?:9|10|11)[._]"
    r"|down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions)"
)


def lora_name_votes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """The architecture votes a LoRA's tensor names and shapes give (metadata aside): see :func:`detect_lora`."""
    votes: dict[str, list[str]] = {}
    for k, shape in shapes.items():
        if "attn2" not in k:
            continue
        kn = k.replace(".", "_")
        if _LORA_CTX.search(kn) or kn.endswith("attn2_processor_to_k_lora_down_weight"):
            ctx = shape[1] if len(shape) >= 2 else None
            arch = {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(ctx)
            if arch:
                votes.setdefault(arch, []).append(f"{k} has input width {ctx}")
                break
    blob = "\n".join(shapes)  # one regex pass over all names instead of one per key
    if any(m in blob for m in ("lora_te2_", "text_encoder_2", "te2")) and _LORA_SDXL_NAME.search(blob):
        votes.setdefault("sdxl", []).append("text encoder 2 (CLIP-G) modules present")
    if _LORA_XL_BLOCK.search(blob):
        votes.setdefault("sdxl", []).append("UNet blocks with two or more transformer layers")
    if _LORA_SD1_BLOCK.search("\n".join(k[:64] for k in shapes)):  # the block part is at the start of a name
        votes.setdefault("sd15", []).append("UNet blocks that only SD1.x has")
    return votes


def detect_lora(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str],
    path: str = "",
    name_votes: Mapping[str, list[str]] | None = None,
) -> Family:
    """Detect which architecture a LoRA was trained for.

    Evidence, strongest first: the cross-attention context width of attn2 to_k/to_v
    (768 SD1.5, 1024 SD2, 2048 SDXL), text-encoder naming (te1/te2 only exist for SDXL),
    block structure, then the trainer's metadata. ``name_votes``: :func:`lora_name_votes` of
    ``shapes`` when already known (files that share a tensor table).
    """
    fam = Family(arch=None, lineage=lineage_hints(metadata, path))
    vpred, ev = _vpred_from(metadata, ())
    fam.vpred, fam.vpred_evidence = vpred, ev
    names = name_votes if name_votes is not None else lora_name_votes(shapes)
    votes: dict[str, list[str]] = {a: list(e) for a, e in names.items()}
    bmv = metadata.get("ss_base_model_version", "")
    ms = metadata.get("modelspec.architecture", "")
    if bmv.startswith("sdxl") or ms.startswith("stable-diffusion-xl"):
        votes.setdefault("sdxl", []).append(f"metadata says {bmv or ms!r}")
    elif bmv.startswith("sd_v1") or ms.startswith("stable-diffusion-v1"):
        votes.setdefault("sd15", []).append(f"metadata says {bmv or ms!r}")
    elif bmv.startswith("sd_v2") or ms.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        votes.setdefault("sd2", []).append(f"metadata says {bmv or ms or 'ss_v2=True'!r}")

    if votes:
        # structural evidence outranks metadata: take the arch with the first (strongest) vote
        order = sorted(votes, key=lambda a: (-sum(not e.startswith("metadata") for e in votes[a]), -len(votes[a])))
        fam.arch = order[0]
        fam.evidence = votes[fam.arch]
        for other in order[1:]:
            fam.evidence.append(f"(conflicting: {other}: {'; '.join(votes[other])})")
    return fam
