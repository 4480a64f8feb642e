"""A tiny deterministic "renderer" whose images depend on the checkpoint's weights (tests only).

It stands in for a WebUI for the bake doctor: it reads the checkpoint file, applies the prompt's
``<lora:name:w>`` / ``<lora:name:te:unet>`` tags *at runtime* in float32 with the trainers'
closed forms (LoRA/LoCon up@down·alpha/rank, LoHa (w1a@w1b)*(w2a@w2b)·alpha/rank, LoKr
kron(w1, w2) scaled as A1111 does) — a path independent of lorakit's bake engine — and renders a
small image from a few text-encoder and UNet weights:

- the prompt (tags taken out) becomes a vector; a two-layer "text encoder" made of the checkpoint's
  CLIP layer 0/1 q/v/out/fc weights turns it into an embedding, with a LayerNorm before each
  matrix (so a constant added to a whole row changes nothing in exact arithmetic, but costs
  precision when saved in fp16);
- a "UNet" of cross-attention to_k/to_v/to_out weights of a few blocks maps the embedding (and the
  negative prompt's) to features; CFG mixes them (uncond + cfg·(cond − uncond)), so CFG amplifies
  weight differences as it does in a diffusion model;
- conv weights add a seed-dependent, prompt-independent term; the seed adds noise.

So parity, weaker/stronger bakes, fp16 loss and double application are real, measurable effects.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from lib_lorakit.gen.backend import GenError, GenImage, ModelInfo

TAG = re.compile(r"<lora:([^:>]+)((?::[-\d.eE+]+){0,2})>")
TE = "cond_stage_model.transformer.text_model.encoder.layers.{}."
TE_KEYS = [
    TE.format(i) + p
    for i in (0, 1)
    for p in ("self_attn.v_proj.weight", "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
]
U = "model.diffusion_model."
UNET_BLOCKS = ("input_blocks.1.1", "input_blocks.4.1", "middle_block.1", "output_blocks.3.1", "output_blocks.9.1")
UNET_KEYS = [
    U + b + ".transformer_blocks.0.attn2." + p
    for b in UNET_BLOCKS
    for p in ("to_k.weight", "to_v.weight", "to_out.0.weight")
]
CONV_KEYS = [U + "input_blocks.1.0.in_layers.2.weight", U + "output_blocks.3.0.out_layers.3.weight"]
KEYS = TE_KEYS + UNET_KEYS + CONV_KEYS
SIZE = 32


def _rng(*parts) -> np.random.Generator:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _ln(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return x / (x.std() + 1e-6)


def lora_delta(sd: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """ΔW of kohya module ``name`` (before the multiplier), float64, closed forms."""

    def g(k: str) -> torch.Tensor | None:
        for full in (f"{name}.{k}", f"{name}.{k}.weight"):
            if full in sd:
                return sd[full].double()
        return None

    alpha = g("alpha")
    if g("lora_A") is not None:  # diffusers/PEFT names: the WebUI reads no adapter metadata, scale 1
        return (g("lora_B").flatten(1) @ g("lora_A").flatten(1)).reshape(shape)
    if g("lora_up") is not None:
        up, down = g("lora_up"), g("lora_down")
        r = down.shape[0]
        d = up.flatten(1) @ down.flatten(1)
        return d.reshape(shape) * (float(alpha) / r if alpha is not None else 1.0)
    if g("hada_w1_a") is not None:
        r = g("hada_w1_b").shape[0]
        d = (g("hada_w1_a") @ g("hada_w1_b")) * (g("hada_w2_a") @ g("hada_w2_b"))
        return d.reshape(shape) * (float(alpha) / r if alpha is not None else 1.0)
    if g("lokr_w1") is not None or g("lokr_w1_a") is not None:
        w1 = g("lokr_w1") if g("lokr_w1") is not None else g("lokr_w1_a") @ g("lokr_w1_b")
        dim = g("lokr_w1_b").shape[0] if g("lokr_w1_b") is not None else None
        if g("lokr_w2") is not None:
            w2 = g("lokr_w2")
        else:
            w2 = (g("lokr_w2_a") @ g("lokr_w2_b").flatten(1)).reshape(
                g("lokr_w2_a").shape[0], *g("lokr_w2_b").shape[1:]
            )
            dim = g("lokr_w2_b").shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
        scale = float(alpha) / dim if (dim is not None and alpha is not None) else 1.0
        return d.reshape(shape) * scale
    return None


class WeightRenderer:
    """The generation backend surface (refresh, lists, txt2img) over folders, rendering from weights."""

    kind = "fake"

    def __init__(self, ckpt_dir: str, lora_dir: str, names: dict[str, str] | None = None):
        from lib_lorakit.synth import kohya_modules

        self.ckpt_dir, self.lora_dir = ckpt_dir, lora_dir
        from lib_lorakit.networks.resolve import unet_ldm_to_diffusers

        self.kohya = {key: name for name, _shape, key, _rows in kohya_modules("sd15", tiny=True)}
        self.peft = {k: "unet." + unet_ldm_to_diffusers(k[len(U) : -len(".weight")]) for k in UNET_KEYS}
        self.calls: list[dict] = []
        self.loaded: str | None = None
        self.loads = 0
        self._ckpts: list[ModelInfo] = []
        self._loras: list[ModelInfo] = []
        self._cache: dict = {}
        self.on_call = None  # a hook (tests: cancel after N calls)
        self.refresh()
        self.loaded = self._ckpts[0].name if self._ckpts else None

    def refresh(self) -> None:
        ck = []
        for root, _dirs, files in os.walk(self.ckpt_dir):
            for f in sorted(files):
                if f.endswith(".safetensors"):
                    rel = os.path.relpath(os.path.join(root, f), self.ckpt_dir)
                    ck.append(ModelInfo(f"{rel} [abc]", os.path.join(root, f), "h" + f[:6]))
        self._ckpts = sorted(ck, key=lambda m: m.name)
        self._loras = [
            ModelInfo(f[: -len(".safetensors")], os.path.join(self.lora_dir, f), "l" + f[:4])
            for f in sorted(os.listdir(self.lora_dir))
            if f.endswith(".safetensors")
        ]

    def checkpoints(self):
        return list(self._ckpts)

    def loras(self):
        return list(self._loras)

    def current_checkpoint(self):
        return self.loaded

    def _weights(self, path: str) -> dict[str, torch.Tensor]:
        st = os.stat(path)
        key = ("ckpt", path, st.st_mtime_ns, st.st_size)
        if key not in self._cache:
            sd = load_file(path)
            self._cache[key] = {k: sd[k].double() for k in KEYS}
            self.loads += 1
        return self._cache[key]

    def _applied(self, weights, prompt: str) -> tuple[dict[str, np.ndarray], list[str]]:
        w = {k: v.clone() for k, v in weights.items()}
        applied = []
        for name, args in TAG.findall(prompt):
            info = next((x for x in self._loras if x.name == name), None)
            if info is None:
                continue  # the WebUI skips an unknown LoRA with a warning
            nums = [float(a) for a in args.split(":")[1:]] or [1.0]
            te, unet = nums[0], nums[1] if len(nums) > 1 else nums[0]
            for k, d in self._deltas(info.path).items():
                w[k] += (te if k.startswith("cond_stage_model") else unet) * d
            applied.append(name)
        return {k: v.float().double().numpy() for k, v in w.items()}, applied

    def _deltas(self, path: str) -> dict[str, torch.Tensor]:
        """The LoRA's ΔW for the renderer's keys (cached per file version)."""
        st = os.stat(path)
        key = ("lora", path, st.st_mtime_ns, st.st_size)
        if key not in self._cache:
            sd = load_file(path)
            shapes = {k: tuple(v.shape) for k, v in self._any_weights().items()}
            out = {}
            for k in KEYS:
                d = lora_delta(sd, self.kohya.get(k, "?"), shapes[k])
                if d is None and k in self.peft:
                    d = lora_delta(sd, self.peft[k], shapes[k])
                if d is not None:
                    out[k] = d
            self._cache[key] = out
        return self._cache[key]

    def _any_weights(self) -> dict[str, torch.Tensor]:
        return next(v for k, v in self._cache.items() if k[0] == "ckpt")

    def _embed(self, w, text: str) -> np.ndarray:
        x = _rng("prompt", text.strip()).normal(size=w[TE_KEYS[0]].shape[1])
        for i in (0, 1):
            p = TE.format(i)
            h = _ln(x)
            x = x + w[p + "self_attn.out_proj.weight"] @ np.tanh(w[p + "self_attn.v_proj.weight"] @ h)
            h = _ln(x)
            x = x + w[p + "mlp.fc2.weight"] @ np.tanh(w[p + "mlp.fc1.weight"] @ h)
        return _ln(x)

    def _features(self, w, e: np.ndarray) -> np.ndarray:
        out = []
        for b in UNET_BLOCKS:
            p = U + b + ".transformer_blocks.0.attn2."
            v = w[p + "to_v.weight"] @ e
            k = w[p + "to_k.weight"] @ e
            out.append(w[p + "to_out.0.weight"] @ (v * (1 / (1 + np.exp(-k)))))
        return np.concatenate(out)

    def txt2img(self, req):
        self.calls.append(req)
        if self.on_call is not None:
            self.on_call(len(self.calls))
        info = next((c for c in self._ckpts if c.name == req["checkpoint"]), None)
        if info is None:
            raise GenError(f"unknown checkpoint {req['checkpoint']}")
        if req["checkpoint"] != self.loaded:
            self.loaded = req["checkpoint"]
        seed = int(req["seed"])
        cfg = float(req.get("cfg_scale") or 7.0)
        w, applied = self._applied(self._weights(info.path), req["prompt"])
        text = TAG.sub("", req["prompt"])
        cond = self._features(w, self._embed(w, text))
        unc = self._features(w, self._embed(w, req.get("negative_prompt") or ""))
        eps = unc + cfg * (cond - unc)
        r = _rng("seed", seed)
        for k in CONV_KEYS:
            m = w[k].reshape(w[k].shape[0], -1)
            eps = eps + 0.5 * np.resize(m @ r.normal(size=m.shape[1]), eps.shape)
        if ("basis", eps.shape[0]) not in self._cache:
            self._cache[("basis", eps.shape[0])] = _rng("basis").normal(size=(SIZE * SIZE * 3, eps.shape[0])) / np.sqrt(
                eps.shape[0]
            )
        basis = self._cache[("basis", eps.shape[0])]
        z = basis @ eps * 0.15 + r.normal(size=SIZE * SIZE * 3) * 0.3
        img = 1 / (1 + np.exp(-z))
        pil = Image.fromarray((img.reshape(SIZE, SIZE, 3) * 255).round().astype(np.uint8))
        model = os.path.splitext(os.path.basename(info.path))[0]
        infotext = (
            f"{req['prompt']}\nNegative prompt: {req.get('negative_prompt', '')}\n"
            f"Steps: {req.get('steps', 3)}, Seed: {seed}, CFG scale: {cfg:g}, Model: {model}"
        )
        if applied:
            infotext += ', Lora hashes: "' + ", ".join(f"{a}: 0123" for a in applied) + '"'
        return GenImage(pil, infotext, seed)
