"""A deterministic generation backend for unit tests only.

Images depend on the seed and the LoRA tags in the prompt, so a test can tell from the
pixels which cell an image belongs to: the top-left 4x4 block encodes the seed, the next
the strength of the LoRA under test (×100). Each LoRA has a "profile" that says how it
changes the picture with strength: none, weak (only from 1.25), healthy (a smooth blend
to another pattern), overfit (saturates from 0.8).
"""

from __future__ import annotations

import os
import re

import numpy as np
from PIL import Image

from lib_lorakit.gen.backend import GenError, GenImage, ModelInfo

TAG = re.compile(r"<lora:([^:>]+):([-\d.]+)>")


def scene(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.25, 0.75, size=(size // 8, size // 8, 3))
    img = np.kron(base, np.ones((8, 8, 1)))  # blocky mid-tone picture
    return img + rng.normal(0, 0.02, size=img.shape)


def other(seed: int, size: int = 64) -> np.ndarray:
    return scene(seed + 7919, size)[::-1]


def apply(img: np.ndarray, profile: str, s: float, seed: int) -> np.ndarray:
    if profile == "none":
        return img
    if profile == "weak":
        k = max(0.0, s - 1.15) * 3
        return (1 - min(1, k)) * img + min(1, k) * other(seed, img.shape[0])
    if profile == "healthy":
        k = min(1.0, s / 1.5)
        return (1 - k) * img + k * other(seed, img.shape[0])
    if profile == "overfit":
        k = min(1.0, s / 1.5)
        out = (1 - k) * img + k * other(seed, img.shape[0])
        if s >= 0.8:
            grey = out.mean(axis=2, keepdims=True)
            out = grey + (out - grey) * 8 * s  # crushed, saturated colours
            out = out + np.random.default_rng(seed).normal(0, 0.25 * s, out.shape)  # crunchy noise
        return out
    raise ValueError(profile)


class FakeBackend:
    kind = "fake"

    def __init__(self, ckpt_dir: str, lora_dir: str, profiles: dict[str, str] | None = None, size: int = 64):
        self.ckpt_dir, self.lora_dir = ckpt_dir, lora_dir
        self.profiles = profiles or {}
        self.size = size
        self.fail_calls: set[int] = set()  # 1-based call numbers that raise
        self.hidden: set[str] = set()  # "missing file" mode: file names this WebUI does not have
        self.calls: list[dict] = []
        self.loaded: str | None = None
        self.switches = 0
        self._ckpts: list[ModelInfo] = []
        self._loras: list[ModelInfo] = []
        self.refresh()  # what a WebUI lists at start-up; later files need refresh()
        self.loaded = self._ckpts[0].name if self._ckpts else None

    def _scan(self, d: str) -> list[str]:
        hidden = getattr(self, "hidden", set())
        return sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f not in hidden)

    def refresh(self) -> None:
        self._ckpts = [
            ModelInfo(f"{f} [abc]", os.path.join(self.ckpt_dir, f), "h" + f[:4]) for f in self._scan(self.ckpt_dir)
        ]
        self._loras = [
            ModelInfo(f[:-12], os.path.join(self.lora_dir, f), "l" + f[:4]) for f in self._scan(self.lora_dir)
        ]

    def checkpoints(self):
        return list(self._ckpts)

    def loras(self):
        return list(self._loras)

    def current_checkpoint(self):
        return self.loaded

    def txt2img(self, req):
        self.calls.append(req)
        if len(self.calls) in self.fail_calls:
            raise GenError(f"fake failure on call {len(self.calls)}")
        if req["checkpoint"] not in [c.name for c in self._ckpts]:
            raise GenError(f"unknown checkpoint {req['checkpoint']}")
        if req["checkpoint"] != self.loaded:
            self.switches += 1
            self.loaded = req["checkpoint"]
        seed = int(req["seed"])
        img = scene(seed, self.size)
        applied, tested = [], 0.0
        for name, s in TAG.findall(req["prompt"]):
            if name not in [l.name for l in self._loras]:
                continue  # as the WebUI: an unknown LoRA is skipped with a warning
            applied.append(name)
            img = apply(img, self.profiles.get(name, "healthy"), float(s), seed)
            tested = float(s)
        img = np.clip(img, 0, 1)
        img[:4, :4] = (seed % 256) / 255.0
        img[:4, 4:8] = round(tested * 100) / 255.0
        pil = Image.fromarray((img * 255).round().astype(np.uint8))
        model = os.path.splitext(req["checkpoint"].split(" [")[0])[0]
        info = f"{req['prompt']}\nNegative prompt: {req.get('negative_prompt', '')}\nSteps: 4, Seed: {seed}, Model: {model}"
        if applied:
            info += ', Lora hashes: "' + ", ".join(f"{a}: 0123" for a in applied) + '"'
        return GenImage(pil, info, seed)


def decode(img: Image.Image) -> tuple[int, float]:
    a = np.asarray(img.convert("RGB"))
    return int(a[1, 1, 0]), a[1, 5, 0] / 100.0
