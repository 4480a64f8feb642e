"""DoRA (weight-decomposed LoRA) on top of LoRA, LoHa or LoKr.

ΔW_dora = m · (W + ΔW) / ||W + ΔW|| - W, the norm taken per input column
(``dora_scale`` shaped (1, in, ...): the WebUI's ``network.py`` and LyCORIS with
wd_on_out=False) or per output row (``dora_scale`` (out, 1, ...): LyCORIS's default
wd_on_out=True; PEFT's ``lora_magnitude_vector`` (out,)). The axis is read from the
shape. Strength then scales ΔW_dora linearly, as in the WebUI and Forge.
"""

from __future__ import annotations

import torch

from .base import Shape, ShapeProblem


def dora_axis(scale_shape: Shape, target: Shape, magnitude_vector: bool = False) -> str:
    """Return 'out' or 'in' from the shape of ``dora_scale``."""
    n = 1
    for s in scale_shape:
        n *= s
    out, inp = target[0], (target[1] if len(target) > 1 else 1)
    if magnitude_vector:
        if n == out:
            return "out"
        raise ShapeProblem(f"lora_magnitude_vector {list(scale_shape)} does not match {out} outputs")
    if len(scale_shape) >= 2 and scale_shape[0] == out and n == out:
        return "out"
    if len(scale_shape) >= 2 and scale_shape[1] == inp and n == inp:
        return "in"
    if len(scale_shape) == 1 and n == out:
        return "out"
    raise ShapeProblem(f"dora_scale {list(scale_shape)} fits neither {out} outputs nor {inp} inputs of {list(target)}")


def weight_norm(w: torch.Tensor, axis: str) -> torch.Tensor:
    """Norm per output row ('out', shape (out, 1, ...)) or per input column ('in', (1, in, ...))."""
    if axis == "out":
        return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
    t = w.transpose(0, 1)
    n = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)
    return n.reshape((1, -1) + (1,) * (w.dim() - 2))


def decompose(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, axis: str) -> torch.Tensor:
    """Return the DoRA update (m · V/||V|| - W with V = W + ΔW), float32, W's shape."""
    v = weight + delta
    norm = weight_norm(v, axis)
    m = scale.reshape(norm.shape).to(v.dtype)
    return v * (m / norm) - weight
