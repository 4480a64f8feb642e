"""Merge methods, one tensor at a time, in float32.

Every function takes float32 tensors of one key and returns the merged float32 tensor;
block weights arrive already folded into the coefficients.

- weighted: Σ w_i·θ_i.
- add-difference: A + w·(B − C).
- TIES (Yadav et al. 2023): task vectors τ_i = θ_i − θ_C, each trimmed to its top
  ``density`` fraction by magnitude, a sign elected from Σ w_i·τ̂_i, the agreeing
  entries averaged (weighted), then θ_C + λ·τ_m.
- DARE (Yu et al. 2023): each τ_i keeps a random (1 − p) of its entries, rescaled by
  1/(1 − p); θ_C + λ·Σ w_i·τ̃_i. The mask is seeded per (seed, key, model), so a merge
  is reproducible whatever the order keys are processed in.
- slerp: spherical interpolation of the two flattened tensors, the norm interpolated
  linearly (as sd-mecha's slerp); nearly parallel tensors fall back to a linear blend.
"""

from __future__ import annotations

import hashlib
import math

import torch


def weighted(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    out = b - c
    out.mul_(w).add_(a)
    return out


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (ties kept)."""
    if density >= 1.0 or tau.numel() == 0:
        return tau
    k = max(1, int(round(density * tau.numel())))
    mag = tau.abs().reshape(-1)
    threshold = torch.kthvalue(mag, mag.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float,
         scale: float) -> torch.Tensor:
    taus = [trim(m - base, density) for m in models]
    total = torch.zeros_like(base)
    for t, w in zip(taus, weights):
        total.add_(t, alpha=w)
    sign = torch.sign(total)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for t, w in zip(taus, weights):
        agree = (torch.sign(t) == sign) & (t != 0)
        num.add_(torch.where(agree, t * w, torch.zeros_like(t)))
        den.add_(agree.to(base.dtype) * w)
    nz = den != 0
    merged = torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))
    return base + scale * merged


def dare_generator(seed: int, key: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def dare(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], drop: float, scale: float, *,
         seed: int, key: str) -> torch.Tensor:
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"DARE drop rate must be in [0, 1), got {drop}")
    out = base.clone()
    for i, (m, w) in enumerate(zip(models, weights)):
        tau = m - base
        if drop > 0:
            keep = torch.rand(tau.shape, generator=dare_generator(seed, key, i)) >= drop
            tau = torch.where(keep, tau / (1.0 - drop), torch.zeros_like(tau))
        out.add_(tau, alpha=w * scale)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    if float(na) == 0.0 or float(nb) == 0.0:
        return torch.lerp(a, b, t)
    ua, ub = a / na, b / nb
    dot = float((ua * ub).sum().clamp(-1.0, 1.0))
    if abs(dot) > 0.9995:
        return torch.lerp(a, b, t)
    omega = math.acos(dot)
    so = math.sin(omega)
    out = ua * (math.sin((1 - t) * omega) / so) + ub * (math.sin(t * omega) / so)
    return out * float(torch.lerp(na, nb, t))
