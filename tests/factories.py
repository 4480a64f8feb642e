"""Test inputs with real key names and tiny shapes, generated at test time."""

from __future__ import annotations

import json
import math
import os

import torch

from lib_lorakit.formats.safetensors_io import TORCH_TO_CODE, save_file
from lib_lorakit.formats.sources import LayoutSource
from lib_lorakit.synth import make_lora, write_checkpoint

SHARED = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")


class ShapeSource(LayoutSource):
    """A layout-only source that fails the test if anything reads a value."""

    def read(self, key: str, out=None) -> torch.Tensor:  # pragma: no cover - never called by planning
        raise AssertionError(f"planning must not read values ({key})")


def reference(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    with open(os.path.join(REFERENCE, name)) as f:
        return {k: (tuple(v[0]), v[1]) for k, v in json.load(f).items()}


def tiny_checkpoint(
    tmp_path,
    arch: str = "sdxl",
    *,
    dtype=torch.float16,
    seed: int = 0,
    metadata: dict[str, str] | None = None,
    name: str | None = None,
    extra=None,
) -> str:
    path = os.path.join(str(tmp_path), name or f"{arch}-base.safetensors")
    write_checkpoint(path, arch, tiny=True, dtype=dtype, seed=seed, metadata=metadata, extra=extra)
    return path


def tiny_lora(
    tmp_path,
    arch: str = "sdxl",
    algo: str = "lora",
    *,
    name: str | None = None,
    seed: int = 1,
    metadata: dict[str, str] | None = None,
    dtype=torch.float16,
    **kw,
) -> str:
    path = os.path.join(str(tmp_path), name or f"{arch}-{algo}.safetensors")
    save_file(make_lora(arch, algo, seed=seed, dtype=dtype, **kw), path, metadata)
    return path


def write(tmp_path, name: str, tensors: dict[str, torch.Tensor], metadata=None) -> str:
    path = os.path.join(str(tmp_path), name)
    save_file(tensors, path, metadata)
    return path


def files_in(folder) -> list[str]:
    return sorted(os.listdir(str(folder)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def numel(shape) -> int:
    return math.prod(shape)


__all__ = [
    "REFERENCE",
    "SHARED",
    "TORCH_TO_CODE",
    "ShapeSource",
    "files_in",
    "reference",
    "rel_err",
    "tiny_checkpoint",
    "tiny_lora",
    "write",
]
