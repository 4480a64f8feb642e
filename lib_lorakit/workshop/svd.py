"""Low-rank factorisation shared by extract, resize and lora-merge.

Three paths, all returning the Eckart–Young truncation ``up @ down`` of a matrix M (out, in):

- **factored** (resize, merge): M is given as ``a @ b`` with a small inner dimension r. QR of
  both factors reduces the SVD to an r×r problem: exact, O((out+in)·r²) instead of O(out·in·min).
- **exact**: ``torch.linalg.svd`` of M (float32, or float64 on request).
- **randomized** (extract of full-rank differences): subspace iteration with ``q = k + p``
  columns and QR re-orthonormalisation each step (Halko, Martinsson & Tropp 2011, alg. 4.4),
  then an exact SVD of the small projection ``Qᵀ M``. When M has rank ≤ q the range is caught
  exactly and the result equals the exact SVD up to rounding. Otherwise the projection residual
  is known exactly (``‖M‖² − ‖QᵀM‖²``); iteration goes on until one more power step adds less
  than 0.2 % of the remaining error² (the captured energy rises monotonically towards the
  Eckart–Young optimum), else the layer is redone with the exact SVD. Tests and the benchmark
  compare every layer with an exact float64 SVD (within 1 % of the optimal error).

Dynamic ranks follow kohya-ss sd-scripts ``networks/resize_lora.py`` (``rank_resize``): ``sv_ratio``,
``sv_fro`` and ``sv_cumulative`` pick an index into the singular values, the new rank is that
index + 1, capped at the given maximum rank; a zero matrix gets rank 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RecipeError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # resize_lora.py: a largest singular value at or below this is a zero matrix
OVERSAMPLE = 32
MAX_ITER = 6
CONVERGED = 2e-3


def parse_dynamic(text: str | None) -> tuple[str, float] | None:
    """Parse ``sv_fro:0.9`` / ``sv_ratio:8`` / ``sv_cumulative:0.9`` (None or "" → None).

    Raises:
        RecipeError: unknown method or a parameter out of range.
    """
    if not text:
        return None
    method, sep, value = str(text).partition(":")
    method = method.strip().lower()
    if method not in DYNAMIC_METHODS or not sep:
        raise RecipeError(
            f"Unknown dynamic rank rule {text!r}.",
            fix="Use sv_fro:F (0<F≤1), sv_cumulative:F (0<F≤1) or sv_ratio:N (N>1), e.g. sv_fro:0.9.",
        )
    try:
        v = float(value)
    except ValueError:
        raise RecipeError(
            f"Dynamic rank rule {text!r}: {value!r} is not a number.", fix="Write it like sv_fro:0.9 or sv_ratio:8."
        ) from None
    if method == "sv_ratio" and not v > 1:
        raise RecipeError(
            f"Dynamic rank rule {text!r}: sv_ratio needs a ratio above 1 (largest/smallest kept).",
            fix="Use for example sv_ratio:8.",
        )
    if method != "sv_ratio" and not 0 < v <= 1:
        raise RecipeError(
            f"Dynamic rank rule {text!r}: {method} needs a fraction in (0, 1].", fix=f"Use for example {method}:0.9."
        )
    return method, v


def choose_rank(
    s: torch.Tensor,
    rank: int,
    dynamic: tuple[str, float] | None,
    *,
    n_sv: int | None = None,
    fro_sq: float | None = None,
    nuclear: float | None = None,
) -> int:
    """Pick the rank as resize_lora.py's ``rank_resize`` does.

    Args:
        s: the largest singular values, descending (all of them, or at least ``rank + 1``).
        rank: the fixed rank, or the cap of a dynamic rule.
        n_sv: how many singular values the matrix has (min(out, in)); default ``len(s)``.
        fro_sq: ``Σσ²`` over all singular values when ``s`` is partial (``‖M‖_F²``).
        nuclear: ``Σσ`` over all singular values when ``s`` is partial (needed by sv_cumulative).
    """
    s = s.double()
    n = n_sv or len(s)
    if len(s) == 0 or float(s[0]) <= MIN_SV:
        return 1
    if dynamic is None:
        return max(1, min(rank, n))
    method, p = dynamic
    if method == "sv_ratio":
        index = int((s > s[0] / p).sum())
    elif method == "sv_cumulative":
        total = nuclear if nuclear is not None else float(s.sum())
        index = int(torch.searchsorted(torch.cumsum(s, 0) / total, torch.tensor(p, dtype=torch.float64))) + 1
    else:  # sv_fro
        total = fro_sq if fro_sq is not None else float((s * s).sum())
        index = int(torch.searchsorted(torch.cumsum(s * s, 0) / total, torch.tensor(p * p, dtype=torch.float64))) + 1
    index = max(1, min(index, n - 1))
    return max(1, min(index + 1, rank, n))


@dataclass
class Factors:
    """A truncated SVD: ΔW ≈ up @ down.

    Attributes:
        up: (out, k), the singular values folded in (as kohya does).
        down: (k, in).
        s: the largest singular values found (at least k of them), descending.
        norm: ‖M‖_F.
        rel_err: ‖M − up @ down‖_F / ‖M‖_F (0 for a zero matrix).
        method: "factored", "exact" or "randomized".
        iterations: power steps taken ("randomized").
    """

    up: torch.Tensor
    down: torch.Tensor
    s: torch.Tensor
    norm: float
    rel_err: float
    method: str
    iterations: int = 0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def kept(self) -> float:
        """Fraction of the Frobenius norm kept: ‖up @ down‖_F / ‖M‖_F (resize_lora.py's 'fro retained')."""
        if self.norm == 0:
            return 1.0
        return float(torch.linalg.vector_norm(self.s[: self.rank].double())) / self.norm


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, norm_sq: float, method: str, dtype: torch.dtype
) -> Factors:
    tail = max(norm_sq - float((s[:k].double() ** 2).sum()), 0.0)
    rel = math.sqrt(tail / norm_sq) if norm_sq > 0 else 0.0
    up = (u[:, :k] * s[:k]).to(dtype).contiguous()
    down = vh[:k].to(dtype).contiguous()
    return Factors(up, down, s.to("cpu", torch.float64), math.sqrt(norm_sq), rel, method)


def factor_product(a: torch.Tensor, b: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None) -> Factors:
    """Exact truncated SVD of M = a @ b without forming M.

    Args:
        a: (out, r) float; b: (r, in) float.
    """
    dt = torch.float64
    a64, b64 = a.to(dt), b.to(dt)
    qa, ra = torch.linalg.qr(a64)  # (out, r), (r, r)
    qb, rb = torch.linalg.qr(b64.T)  # (in, r), (r, r)
    small = ra @ rb.T  # M = qa · small · qbᵀ
    us, s, vhs = torch.linalg.svd(small)
    norm_sq = float((s * s).sum())
    n_sv = min(a.shape[0], b.shape[1])
    k = choose_rank(s, rank, dynamic, n_sv=n_sv)
    k = min(k, len(s))
    u = qa @ us
    vh = vhs @ qb.T
    return _truncate(u, s, vh, k, norm_sq, "factored", torch.float32)


def factor_exact(
    m: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None, *, dtype: torch.dtype = torch.float32
) -> Factors:
    """Truncated SVD of M (out, in) with the full ``torch.linalg.svd``."""
    mm = m.to(dtype)
    u, s, vh = torch.linalg.svd(mm, full_matrices=False)
    norm_sq = float((s.double() ** 2).sum())
    k = choose_rank(s, rank, dynamic)
    return _truncate(u, s, vh, k, norm_sq, "exact", torch.float32)


def factor_randomized(
    m: torch.Tensor,
    rank: int,
    dynamic: tuple[str, float] | None = None,
    *,
    oversample: int = OVERSAMPLE,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> Factors:
    """Truncated SVD of M by randomized subspace iteration with a convergence monitor.

    M is taken in its wide orientation (rows = min(out, in)). Each step computes Bᵀ = MᵀQ,
    whose Gram matrix BBᵀ (q×q, float64) gives the singular values of the projection QQᵀM, and
    then Q ← orth(M Bᵀ) (one power step on MMᵀ). The captured energy Σ_{i≤k} s̃ᵢ² rises
    towards the optimum Σ_{i≤k} σᵢ²; iteration stops when one step adds less than
    ``CONVERGED`` × the remaining error², or when the range is caught exactly (rank ≤ q).
    A matrix that does not settle within ``max_iter`` steps, one where q would not be well
    below min(out, in), and ``sv_cumulative`` (it needs every singular value) go to the exact SVD.
    """
    out, inn = m.shape
    n = min(out, inn)
    q = rank + oversample
    if 2 * q >= n or (dynamic is not None and dynamic[0] == "sv_cumulative"):
        return factor_exact(m, rank, dynamic)
    gen = torch.Generator().manual_seed(seed)
    mm = m if m.dtype == torch.float32 else m.float()
    transpose = out > inn  # work on the wide orientation: Q has min(out, in) rows
    if transpose:
        mm = mm.T
    norm_sq = float(torch.linalg.vector_norm(mm).double() ** 2)
    if norm_sq == 0.0:
        return factor_exact(m, rank, dynamic)
    omega = torch.randn(mm.shape[1], q, generator=gen).to(mm.device)
    qm, _ = torch.linalg.qr(mm @ omega)
    prev = -1.0
    for it in range(max_iter + 1):
        bt = mm.T @ qm  # (cols, q) = (QᵀM)ᵀ
        g = bt.double().T @ bt.double()
        lam, w = torch.linalg.eigh(g)
        lam, w = lam.flip(0).clamp_min(0), w.flip(1)
        s = lam.sqrt()
        k = min(choose_rank(s, rank, dynamic, n_sv=n, fro_sq=norm_sq), q)
        captured = float(lam[:k].sum())
        tail = max(norm_sq - captured, 0.0)
        if tail <= 1e-10 * norm_sq or (it >= 1 and captured - prev <= CONVERGED * tail):
            break
        prev = captured
        if it == max_iter:
            return factor_exact(m, rank, dynamic)
        qm, _ = torch.linalg.qr(mm @ bt)
    wk = w[:, :k].to(mm.dtype)
    sk = s[:k].to(mm.device, mm.dtype)
    if transpose:  # M = (QB)ᵀ = Bᵀ W S⁻¹ · S Wᵀ... : up = Bᵀ W_k = V_k S_k, down = (Q W_k)ᵀ = U_kᵀ
        up, down = bt @ wk, (qm @ wk).T
    else:  # up = Q W_k S_k = U_k S_k, down = S_k⁻¹ W_kᵀ B = V_kᵀ
        inv = torch.where(sk > 0, 1.0 / sk.clamp_min(1e-30), torch.zeros_like(sk))
        up, down = (qm @ wk) * sk, (bt @ wk * inv).T
    rel = math.sqrt(tail / norm_sq)
    return Factors(
        up.float().contiguous(),
        down.float().contiguous(),
        s.cpu(),
        math.sqrt(norm_sq),
        rel,
        "randomized",
        iterations=it + 1,
    )


def factor(m: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None, *, method: str = "auto") -> Factors:
    """Truncated SVD of a dense M (out, in): ``auto`` (randomized where it settles) or ``exact``."""
    if method == "exact":
        return factor_exact(m, rank, dynamic)
    return factor_randomized(m, rank, dynamic)
