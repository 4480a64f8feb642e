"""Map LoRA module names, in every naming scheme users meet, onto checkpoint keys.

Schemes:

- kohya SD1: ``lora_unet_`` + diffusers UNet path, ``lora_te_`` + HF CLIP path.
- kohya SDXL: ``lora_unet_`` + ldm (sgm) UNet path, ``lora_te1_``/``lora_te2_`` + HF CLIP paths.
  SDXL files with diffusers-style UNet names resolve too.
- LyCORIS: the same prefixes, or ``lycoris_`` + a module path.
- diffusers/PEFT: ``unet.``/``text_encoder.``/``text_encoder_2.`` (optionally under
  ``base_model.model.``) with ``lora_A``/``lora_B``, ``.lora.up/down``, ``lora_linear_layer``
  or attention-processor keys (``attn1.processor.to_q_lora.down.weight``).
- generic: ``diffusion_model.*`` / ``model.diffusion_model.*`` (ldm names), full checkpoint
  paths, ComfyUI ``text_encoders.clip_l/clip_g.transformer.*``.

SDXL's second text encoder (CLIP-G) is stored in OpenCLIP layout: HF ``q_proj``/``k_proj``/
``v_proj`` land on the three 1280-row slices of the fused ``attn.in_proj_weight`` (and
``in_proj_bias``); ``out_proj``, ``mlp.fc1``/``fc2`` become ``attn.out_proj``, ``mlp.c_fc``/``c_proj``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..formats.arch import Arch, block_of, component_of

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """Where one LoRA module's update lands in the checkpoint."""

    weight_key: str
    shape: Shape  # shape of the target (after slicing / transposing)
    component: str  # unet / te1 / te2
    block: str | None
    bias_key: str | None = None
    rows: tuple[int, int] | None = None  # row slice of the stored weight (CLIP-G q/k/v)
    transpose: bool = False  # stored transposed (OpenCLIP text_projection vs HF Linear)

    @property
    def label(self) -> str:
        if self.rows is not None:
            return f"{self.weight_key}[{self.rows[0]}:{self.rows[1]}]"
        return self.weight_key


# --- UNet: ldm/sgm path <-> diffusers path ---------------------------------------------------

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_SIMPLE = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _resnet(sub: str) -> str | None:
    for a, b in _RES.items():
        if sub == a or sub.startswith(a + "."):
            return b + sub[len(a) :]
    return None


def unet_ldm_to_diffusers(path: str) -> str | None:
    """Translate a UNet module path (relative to ``model.diffusion_model.``) to diffusers naming.

    Valid for SD1.x and SDXL: input block n is down block (n-1)//3, layer (n-1)%3 (layer 2
    being the downsampler); output block n is up block n//3, layer n%3.
    """
    for a, b in _SIMPLE.items():
        if path == a or path.startswith(a + "."):
            return b + path[len(a) :]
    parts = path.split(".")
    if parts[0] == "input_blocks" and len(parts) >= 3:
        n, j, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        blk, layer = (n - 1) // 3, (n - 1) % 3
        if layer == 2:
            if j == "0" and rest.startswith("op"):
                return f"down_blocks.{blk}.downsamplers.0.conv" + rest[2:]
            return None
        if j == "0":
            r = _resnet(rest)
            return f"down_blocks.{blk}.resnets.{layer}.{r}" if r else None
        if j == "1":
            return f"down_blocks.{blk}.attentions.{layer}.{rest}" if rest else None
        return None
    if parts[0] == "middle_block" and len(parts) >= 3:
        j, rest = parts[1], ".".join(parts[2:])
        if j in ("0", "2"):
            r = _resnet(rest)
            return f"mid_block.resnets.{int(j) // 2}.{r}" if r else None
        return f"mid_block.attentions.0.{rest}"
    if parts[0] == "output_blocks" and len(parts) >= 3:
        n, j, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        blk, layer = n // 3, n % 3
        if j == "0":
            r = _resnet(rest)
            return f"up_blocks.{blk}.resnets.{layer}.{r}" if r else None
        if rest.startswith("conv") and not rest.startswith("conv_"):  # upsampler (j is 1 or 2)
            return f"up_blocks.{blk}.upsamplers.0.{rest}"
        if j == "1":
            return f"up_blocks.{blk}.attentions.{layer}.{rest}"
        return None
    return None


# --- CLIP-G: OpenCLIP path -> HF path ----------------------------------------------------------

_G_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_G_TOP = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "positional_embedding": "text_model.embeddings.position_embedding",
    "ln_final": "text_model.final_layer_norm",
}


def _norm(path: str) -> str:
    return path.replace(".", "_")


class TargetIndex:
    """All addressable modules of one checkpoint, under every name a LoRA may use."""

    def __init__(self, shapes: Mapping[str, Shape], arch: Arch):
        self.arch = arch
        self.shapes = dict(shapes)
        self.ns: dict[str, dict[str, Target]] = {"unet": {}, "te1": {}, "te2": {}, "ckpt": {}}
        self._memo: dict[str, tuple[Target | None, str]] = {}
        for key, shape in shapes.items():
            self._add_key(key, tuple(shape))

    def _target(self, key: str, shape: Shape, **kw) -> Target:
        comp = component_of(key, self.arch)
        return Target(weight_key=key, shape=shape, component=comp, block=block_of(key, self.arch), **kw)

    def _reg(self, ns: str, name: str, t: Target) -> None:
        self.ns[ns].setdefault(_norm(name), t)

    def _add_key(self, key: str, shape: Shape) -> None:
        comp = component_of(key, self.arch)
        if comp not in ("unet", "te1", "te2"):
            return
        prefix = self.arch.prefixes[comp]
        if key.endswith(".weight"):
            module = key[: -len(".weight")]
            bias = module + ".bias"
            t = self._target(key, shape, bias_key=bias if bias in self.shapes else None)
        elif comp == "te2" and key.endswith("attn.in_proj_weight"):
            self._add_fused_qkv(key, shape)
            return
        elif comp == "te2" and key.endswith(("positional_embedding", "text_projection")):
            module = key
            t = self._target(key, shape)
        else:
            return
        rel = module[len(prefix) :]
        self._reg("ckpt", module, t)
        if comp == "unet":
            self._reg("unet", rel, t)
            d = unet_ldm_to_diffusers(rel)
            if d:
                self._reg("unet", d, t)
        elif comp == "te1":
            self._reg("te1", rel, t)
        else:  # te2: OpenCLIP names (also as "model.<path>") and HF CLIP names
            self._reg("te2", "model." + rel, t)
            hf = self._clip_g_hf(rel)
            if rel == "text_projection":  # OpenCLIP x @ P; the HF Linear's weight is P^T
                self._reg("te2", hf, self._target(key, (shape[1], shape[0]), transpose=True))
                return
            self._reg("te2", rel, t)
            if hf:
                self._reg("te2", hf, t)

    @staticmethod
    def _clip_g_hf(rel: str) -> str | None:
        if rel in _G_TOP:
            return _G_TOP[rel]
        if rel == "text_projection":
            return "text_projection"
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", rel)
        if m and m.group(2) in _G_LAYER:
            return f"text_model.encoder.layers.{m.group(1)}.{_G_LAYER[m.group(2)]}"
        return None

    def _add_fused_qkv(self, key: str, shape: Shape) -> None:
        m = re.search(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$", key)
        if not m or shape[0] % 3:
            return
        d = shape[0] // 3
        bias = key[: -len("in_proj_weight")] + "in_proj_bias"
        for i, q in enumerate("qkv"):
            t = self._target(
                key, (d,) + tuple(shape[1:]), bias_key=bias if bias in self.shapes else None, rows=(i * d, (i + 1) * d)
            )
            self._reg("te2", f"text_model.encoder.layers.{m.group(1)}.self_attn.{q}_proj", t)
        rel = key[len(self.arch.prefixes["te2"]) : -len("_weight")]
        whole = self._target(key, tuple(shape), bias_key=bias if bias in self.shapes else None)
        self._reg("te2", rel, whole)  # transformer.resblocks.N.attn.in_proj
        self._reg("ckpt", key[: -len("_weight")], whole)

    def find(self, module: str) -> tuple[Target | None, str]:
        """:meth:`lookup` of a LoRA module name, remembered (module names repeat across LoRA files)."""
        hits, problem, _ = self.find_all(module)
        if len(hits) == 1:
            return hits[0], ""
        if len(hits) > 1:
            return None, "ambiguous: it names " + " and ".join(h.label for h in hits)
        return None, problem

    def find_all(self, module: str) -> tuple[list[Target], str, str]:
        """Every target a LoRA module name may mean (the caller picks by shape).

        Returns (targets, problem when none, note when a non-standard naming was normalised).
        """
        hit = self._memo.get(module)
        if hit is None:
            hit = self._memo[module] = self.lookup_all(candidates(module, self.arch))
        return hit

    def lookup(self, candidates: Iterable[tuple[str, str]]) -> tuple[Target | None, str]:
        """Find the target for (namespace, path) candidates. Returns (target, problem)."""
        hits, problem, _ = self.lookup_all(candidates)
        if len(hits) == 1:
            return hits[0], ""
        if len(hits) > 1:
            return None, "ambiguous: it names " + " and ".join(h.label for h in hits)
        return None, problem

    def lookup_all(self, candidates: Iterable[tuple[str, str]]) -> tuple[list[Target], str, str]:
        """All distinct targets of (namespace, path) candidates, in candidate order, and the problem when none.

        Text-encoder paths in transformers 5's flat naming (``encoder.layers.N...``, no ``text_model.``)
        are also looked up under ``text_model.``.
        """
        hits: list[Target] = []
        tried = []
        note = ""
        for ns, path in candidates:
            if ns not in self.ns:
                continue
            tried.append(ns)
            paths = [path]
            if ns in ("te1", "te2") and is_flat_te(path):
                paths.append("text_model." + path)
            for p in paths:
                t = self.ns[ns].get(_norm(p))
                if t is not None and t not in hits:
                    hits.append(t)
                    if p is not path:
                        note = NOTE_FLAT_TE
        if hits:
            return hits, "", note
        if not tried:
            return [], "the checkpoint has no such component", ""
        return [], "no such module in the checkpoint", ""


# --- LoRA key parsing -----------------------------------------------------------------------

# Parameter names after the module name, longest first. Values: internal name.
_PARAMS: dict[str, str] = {
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    "lora_mid.weight": "lora_mid.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "dora_scale": "dora_scale",
    "alpha": "alpha",
    "scale": "scale",
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t1": "lokr_t1",
    "lokr_t2": "lokr_t2",
    "diff": "diff",
    "diff_b": "diff_b",
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "a1.weight": "a1.weight",
    "a2.weight": "a2.weight",
    "b1.weight": "b1.weight",
    "b2.weight": "b2.weight",
    "oft_blocks": "oft_blocks",
    "oft_diag": "oft_diag",
    "rescale": "rescale",
    "on_input": "on_input",
    "weight": "weight",
}
_PARAM_SUFFIXES = sorted(_PARAMS, key=len, reverse=True)
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")
_KOHYA = re.compile(r"^(lora_unet|lora_te[12]?|lycoris)_")


@dataclass
class ParsedKeys:
    """A LoRA file's keys grouped by module."""

    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module -> internal param -> file key
    embeddings: dict[str, list[str]] = field(default_factory=dict)  # bundled TI name -> keys
    unknown: list[str] = field(default_factory=list)  # keys with no recognisable parameter name
    notes: dict[str, set[str]] = field(default_factory=dict)  # non-standard naming normalised -> modules


# diffusers' kohya converter (``convert_state_dict_to_kohya``) fed a diffusers-format file keeps the
# ``.lora.down``/``.lora_linear_layer.down`` spelling and joins it with "_": ``..._to_k_lora.down.weight``.
_KOHYA_GLUED = re.compile(r"^(.+?)_(lora|lora_linear_layer)\.(down|up)\.weight$")
_FLAT_TE = re.compile(r"^(?:encoder[._]layers[._]|embeddings[._]|final_layer_norm(?:$|[._]))")
NOTE_GLUED = "kohya names with a '_lora.down/up' suffix (diffusers' kohya converter) read as lora_down/lora_up"
NOTE_FLAT_TE = "transformers-5 text-encoder names (no 'text_model.') read as text_model.*"


def is_flat_te(path: str) -> bool:
    """Whether a text-encoder path uses transformers 5's flat CLIP naming (``encoder.layers.N``)."""
    return bool(_FLAT_TE.match(path))


@functools.lru_cache(maxsize=1 << 16)  # the same key names recur in every LoRA of an architecture
def split_key(key: str) -> tuple[str, str] | None:
    """Split a LoRA key into (module name, internal parameter name); None if unrecognised."""
    sp = split_key_noted(key)
    return None if sp is None else sp[:2]


@functools.lru_cache(maxsize=1 << 16)
def split_key_noted(key: str) -> tuple[str, str, str] | None:
    """:func:`split_key` plus a note when a non-standard spelling was normalised ("" otherwise)."""
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return f"{m.group(1)}.{proj}", _PARAMS[f"lora.{m.group(3)}.weight"], ""
    if _KOHYA.match(key) and "." in key:
        module, _, param = key.partition(".")
        p = _PARAMS.get(param)
        if p:
            return module, p, ""
        m = _KOHYA_GLUED.match(key)
        if m and "." not in m.group(1):
            return m.group(1), f"lora_{m.group(3)}.weight", NOTE_GLUED
        return None
    for suf in _PARAM_SUFFIXES:
        if suf in ("weight", "on_input"):
            continue  # bare names only exist in kohya-style (dot-free) module names
        if key.endswith("." + suf):
            return key[: -len(suf) - 1], _PARAMS[suf], ""
    return None


def explain_unknown(key: str) -> str:
    """Why a key could not be split into module and parameter."""
    if _KOHYA.match(key) and "." in key:
        param = key.partition(".")[2]
        return f"unknown algorithm: parameter {param!r} belongs to no network type lorakit knows"
    return "unrecognised key name (no known LoRA/LyCORIS parameter suffix)"


def parse_keys(keys: Iterable[str]) -> ParsedKeys:
    out = ParsedKeys()
    for key in keys:
        if key.startswith("bundle_emb."):
            name = key.split(".")[1] if key.count(".") >= 1 else key
            out.embeddings.setdefault(name, []).append(key)
            continue
        sp = split_key_noted(key)
        if sp is None:
            out.unknown.append(key)
            continue
        module, param, note = sp
        if note:
            out.notes.setdefault(note, set()).add(module)
        group = out.modules.setdefault(module, {})
        if param in group:  # e.g. lora_A.weight and lora_A.default.weight together
            out.unknown.append(key)
            continue
        group[param] = key
    return out


_DOTTED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
    ("cond_stage_model.transformer.", "te1"),
    ("conditioner.embedders.0.transformer.", "te1"),
    ("conditioner.embedders.1.", "te2"),  # the rest is "model.<OpenCLIP path>"
    ("text_encoders.clip_l.transformer.", "te1"),
    ("text_encoders.clip_g.transformer.", "te2"),
    ("te1.", "te1"),
    ("te2.", "te2"),
    ("te.", "te1"),
)


def candidates(module: str, arch: Arch) -> list[tuple[str, str]]:
    """(namespace, path) pairs where a LoRA module name may point."""
    for prefix, ns in (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1")):
        if module.startswith(prefix):
            return [(ns, module[len(prefix) :])]
    if module.startswith("lycoris_"):
        rest = module[len("lycoris_") :]
        return [("unet", rest), ("te1", rest), ("te2", rest), ("ckpt", rest)]
    name = module
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    out = [("ckpt", name)]
    for prefix, ns in _DOTTED_PREFIXES:
        if name.startswith(prefix):
            return [(ns, name[len(prefix) :]), ("ckpt", name)]
    out.append(("unet", name))
    return out
