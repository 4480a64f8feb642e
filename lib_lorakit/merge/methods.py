"""Merge methods in float32, applied to row chunks of one key's tensors.

Element-wise methods work on any chunk. The two that need the whole tensor get what
they need from a first pass: TIES its per-model magnitude thresholds, slerp the norms
and the dot product. Block weights arrive folded into the coefficients.

- weighted: Σ w_i·θ_i.
- add-difference: A + w·(B − C).
- TIES (Yadav et al. 2023): task vectors τ_i = θ_i − θ_C, each trimmed to its top
  ``density`` fraction by magnitude, a sign elected from Σ w_i·τ̂_i, the agreeing
  entries averaged (weighted), then θ_C + λ·τ_m.
- DARE (Yu et al. 2023): each τ_i keeps a random (1 − p) of its entries, rescaled by
  1/(1 − p); θ_C + λ·Σ w_i·τ̃_i. Masks are seeded per (seed, key, model, chunk), so a
  merge is reproducible.
- slerp: spherical interpolation of the two flattened tensors with the norm
  interpolated linearly (as sd-mecha's slerp); nearly parallel tensors blend linearly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch


def weighted(xs: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> torch.Tensor:
    torch.mul(xs[0], weights[0], out=out)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def add_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, w: float, out: torch.Tensor) -> torch.Tensor:
    torch.sub(b, c, out=out)
    return out.mul_(w).add_(a)


def ties_threshold(abs_tau: np.ndarray, density: float) -> float:
    """The magnitude at and above which the top ``density`` fraction lies (partitions in place)."""
    n = abs_tau.size
    if density >= 1.0 or n == 0:
        return 0.0
    k = max(1, int(round(density * n)))
    abs_tau.partition(n - k)
    return float(abs_tau[n - k])


def ties(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    thresholds: list[float],
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    taus = []
    for x, thr in zip(xs, thresholds):
        t = x - base
        if thr > 0:
            t = torch.where(t.abs() >= thr, t, torch.zeros_like(t))
        taus.append(t)
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
    torch.add(base, merged, alpha=scale, out=out)
    return out


def dare_generator(seed: int, key: str, index: int, chunk: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}:{index}:{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def dare(
    base: torch.Tensor,
    xs: list[torch.Tensor],
    weights: list[float],
    drop: float,
    scale: float,
    *,
    seed: int,
    key: str,
    chunk: int,
    out: torch.Tensor,
) -> torch.Tensor:
    out.copy_(base)
    for i, (x, w) in enumerate(zip(xs, weights)):
        tau = x - base
        if drop > 0:
            # the mask is drawn on the CPU whatever the device, so a GPU merge keeps the same entries
            keep = (torch.rand(tau.shape, generator=dare_generator(seed, key, i, chunk)) >= drop).to(tau.device)
            tau = torch.where(keep, tau / (1.0 - drop), torch.zeros_like(tau))
        out.add_(tau, alpha=w * scale)
    return out


@dataclass
class SlerpStats:
    """Sums over the whole tensor, from a first pass: |a|^2, |b|^2, a·b."""

    a2: float = 0.0
    b2: float = 0.0
    ab: float = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        fa, fb = a.reshape(-1), b.reshape(-1)
        self.a2 += float(torch.dot(fa, fa))
        self.b2 += float(torch.dot(fb, fb))
        self.ab += float(torch.dot(fa, fb))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, st: SlerpStats, out: torch.Tensor) -> torch.Tensor:
    na, nb = math.sqrt(st.a2), math.sqrt(st.b2)
    if na == 0.0 or nb == 0.0:
        return torch.lerp(a, b, t, out=out)
    dot = max(-1.0, min(1.0, st.ab / (na * nb)))
    if abs(dot) > 0.9995:
        return torch.lerp(a, b, t, out=out)
    omega = math.acos(dot)
    so = math.sin(omega)
    norm = (1 - t) * na + t * nb
    torch.mul(a, math.sin((1 - t) * omega) / so / na * norm, out=out)
    return out.add_(b, alpha=math.sin(t * omega) / so / nb * norm)
