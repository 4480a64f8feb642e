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
  :func:`factor_batch` runs this on a stack of same-shape matrices at once (one matrix product,
  one QR call and one host round trip per step for the whole stack: on a GPU the per-layer
  launches and synchronisations, not the FLOPs, are the cost).

Every path ends with one power step and the Rayleigh–Ritz projection in float64
(:func:`_ritz64`): float32 iterations find the subspace, the float64 step makes the factors
exact to float64 rounding within it, so at rank ≥ rank(M) ``up @ down`` reproduces M to the
float32 rounding of the factors alone (on every device: no float32 QR/SVD error is left in it).
The small q×q eigenproblems run on the CPU in float64 (cheap, and exact where a GPU's batched
small eigensolvers are slow).

Dynamic ranks follow kohya-ss sd-scripts ``networks/resize_lora.py`` (``rank_resize``): ``sv_ratio``,
``sv_fro`` and ``sv_cumulative`` pick an index into the singular values, the new rank is that
index + 1, capped at the given maximum rank; a zero matrix gets rank 1.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import RecipeError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # resize_lora.py: a largest singular value at or below this is a zero matrix
OVERSAMPLE = 32
MAX_ITER = 6
MIN_STEPS = 3  # power steps before the convergence monitor starts (realistic spectra need 4-6)
RITZ_BYTES_CPU = 64 << 20  # float64 copy per Rayleigh-Ritz chunk on the CPU
CONVERGED = 2e-3
EXACT64 = 256  # exact SVDs of matrices this narrow run in float64 outright


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
    s = s.to("cpu", torch.float64)
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


def _orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (…, rows, q).

    CPU: Householder QR (LAPACK, stable when rank-deficient). CUDA: shifted CholeskyQR3 in
    float64 (Fukaya et al., SIAM J. Sci. Comput. 42(1), 2020): three batched Gram/Cholesky/triangular
    solves instead of one cuSOLVER QR call per matrix (which costs ~0.5 ms each, whatever the size);
    the shift makes the first Cholesky succeed on rank-deficient blocks, the two passes after it
    restore orthogonality to float64 rounding. Falls back to Householder QR if a Cholesky fails.
    """
    if y.device.type != "cuda":
        return torch.linalg.qr(y).Q
    q = _cholesky_qr3(y)
    return torch.linalg.qr(y).Q if q is None else q


def _cholesky_qr3(y: torch.Tensor) -> torch.Tensor | None:
    """Shifted CholeskyQR3 of (…, rows, q) in float64 (see :func:`_orth`); None if a Cholesky failed."""
    y64 = y.double()
    rows, cols = y64.shape[-2:]
    g = y64.mT @ y64
    eye = torch.eye(cols, dtype=torch.float64, device=y.device)
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    shift = (11 * (rows * cols + cols * (cols + 1)) * 2.0**-53) * tr + 1e-300
    q, fails = y64, None
    for step in range(3):
        if step:
            g = q.mT @ q
        else:
            g = g + shift[..., None, None] * eye
        r, info = torch.linalg.cholesky_ex(g, upper=True)
        fails = info if fails is None else fails + info
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    if bool((fails != 0).any()):
        return None
    return q.to(y.dtype)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
POOL_THREADS = 8


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _host_map(fn, g: torch.Tensor, spread: bool) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """``fn`` (an eigensolver) over a stack of small CPU matrices with one torch thread.

    LAPACK on a 96×96 matrix with torch's whole thread pool spins for milliseconds (38 ms per
    matrix on 2 busy cores against 0.9 ms single-threaded here; 5 ms with 15 threads on the
    16-core GPU machine). ``spread`` (the matrices came from a GPU, the CPU is otherwise idle)
    splits the stack over a few single-threaded workers.
    """
    global _POOL
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        parts = min(len(g), POOL_THREADS, max(1, (os.cpu_count() or 2) - 1)) if spread and g.dim() == 3 else 1
        if parts <= 1:
            return fn(g)
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(POOL_THREADS, "lorakit-eigh", initializer=_one_torch_thread)
        outs = list(_POOL.map(fn, torch.chunk(g, parts)))
    finally:
        if before != 1:
            torch.set_num_threads(before)
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return tuple(torch.cat(x) for x in zip(*outs))


def _eigvals_host(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric (…, q, q) matrices, float64 on the CPU, largest first, ≥ 0."""
    lam = _host_map(torch.linalg.eigvalsh, g.to("cpu", torch.float64), g.device.type != "cpu")
    return lam.flip(-1).clamp_min(0)


def _eigh_host(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of symmetric (…, q, q) float64 matrices on the CPU, largest first."""
    lam, w = _host_map(torch.linalg.eigh, g.to("cpu", torch.float64), g.device.type != "cpu")
    return lam.flip(-1).clamp_min(0), w.flip(-1)


def _ritz64(a: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One float64 power step from ``basis`` and the Rayleigh–Ritz SVD within it.

    Args:
        a: (…, n, N) float32 (the wide orientation, n ≤ N).
        basis: (…, N, q) spanning the right subspace found so far.

    Returns:
        (qf, c, lam, w): ``qf`` (…, n, q) orthonormal, ``c = qfᵀ a`` (…, q, N), and the
        eigen-decomposition of ``c cᵀ`` (λ = σ², largest first) on the CPU.
    """
    if a.dim() == 3 and a.device.type == "cpu" and len(a) > 1:
        per = max(1, RITZ_BYTES_CPU // max(1, a[0].numel() * 8))
        if per < len(a):
            parts = [_ritz64(x, y) for x, y in zip(torch.split(a, per), torch.split(basis, per))]
            return tuple(torch.cat(z) for z in zip(*parts))
    a64 = a.double()
    qf = _orth(a64 @ basis.double())
    c = qf.mT @ a64
    del a64
    lam, w = _eigh_host(c @ c.mT)
    return qf, c, lam, w


def _from_ritz(
    qf: torch.Tensor, c: torch.Tensor, lam: torch.Tensor, w: torch.Tensor, k: int, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (up, down) of the rank-k Ritz approximation, float32 (see :func:`_ritz64`).

    For the wide A = qf·c ≈ U S Vᵀ with U = qf·W_k, S = √λ_k, Vᵀ = S⁻¹ W_kᵀ c; M = A or Aᵀ.
    """
    wk = w[:, :k].to(qf.device)
    sk = lam[:k].sqrt().to(qf.device)
    u = qf @ wk  # (n, k)
    if transpose:  # M = Aᵀ = V S Uᵀ: up = V S = cᵀ W_k, down = Uᵀ
        up, down = c.mT @ wk, u.mT
    else:  # M = A: up = U S, down = S⁻¹ W_kᵀ c
        inv = torch.where(sk > 0, 1.0 / sk.clamp_min(1e-300), torch.zeros_like(sk))
        up, down = u * sk, (c.mT @ wk * inv).mT
    return up.float().contiguous(), down.float().contiguous()


def factor_exact(
    m: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None, *, dtype: torch.dtype | None = None
) -> Factors:
    """Truncated SVD of M (out, in) with the full ``torch.linalg.svd``.

    Small matrices (min(out, in) ≤ ``EXACT64``) are factored in float64 outright; larger ones in
    float32 (``dtype`` forces one), the leading ``k + OVERSAMPLE`` right vectors then refined by
    :func:`_ritz64`, so the factors carry no float32 SVD error (GPU SVDs are Jacobi-based and
    less orthogonal than LAPACK's).
    """
    n = min(m.shape)
    if dtype is None:
        dtype = torch.float64 if n <= EXACT64 else torch.float32
    u, s, vh = torch.linalg.svd(m.to(dtype), full_matrices=False)
    norm_sq = float(torch.linalg.vector_norm(m, dtype=torch.float64) ** 2)
    k = choose_rank(s, rank, dynamic, fro_sq=norm_sq)
    if dtype == torch.float64 or norm_sq == 0.0:
        return _truncate(u, s, vh, k, norm_sq, "exact", torch.float32)
    transpose = m.shape[0] > m.shape[1]
    a = m.mT if transpose else m
    basis = (u if transpose else vh.mT)[:, : min(n, k + OVERSAMPLE)]
    qf, c, lam, w = _ritz64(a.float(), basis)
    up, down = _from_ritz(qf, c, lam, w, k, transpose)
    tail = max(norm_sq - float(lam[:k].sum()), 0.0)
    return Factors(up, down, s.to("cpu", torch.float64), math.sqrt(norm_sq), math.sqrt(tail / norm_sq), "exact")


def factor_randomized(
    m: torch.Tensor,
    rank: int,
    dynamic: tuple[str, float] | None = None,
    *,
    oversample: int = OVERSAMPLE,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> Factors:
    """Truncated SVD of one M (out, in) by randomized subspace iteration: :func:`factor_batch` of one."""
    return factor_batch(m.unsqueeze(0), rank, dynamic, oversample=oversample, max_iter=max_iter, seed=seed)[0]


def _omega(cols: int, q: int, seed: int, device: torch.device) -> torch.Tensor:
    """The random start (cols, q): drawn on the CPU, so every device and batch gets the same one."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(cols, q, generator=gen).to(device)


def factor_batch(
    m: torch.Tensor,
    rank: int,
    dynamic: tuple[str, float] | None = None,
    *,
    method: str = "auto",
    oversample: int = OVERSAMPLE,
    max_iter: int = MAX_ITER,
    seed: int = 0,
) -> list[Factors]:
    """Truncated SVDs of a stack of same-shape matrices (B, out, in), each as :func:`factor` would.

    Randomized subspace iteration (see the module's notes) on the whole stack: each step is one
    batched product ``Mᵀ Q``, the q×q Gram matrices of every layer in one host round trip
    (their eigenvalues are the captured energies), then one batched ``orth(M Bᵀ)``. The stack
    iterates until every layer has settled (one more step adds less than ``CONVERGED`` × its
    remaining error², or its range is caught exactly); a layer that has not settled after
    ``max_iter`` steps is redone with the exact SVD. Layers that settled early take the extra
    steps too, which only brings them closer to the optimum. The result of each layer does
    not depend on the others (same random start per shape).
    """
    bsz, out, inn = m.shape
    n = min(out, inn)
    q = rank + oversample
    if method == "exact" or 2 * q >= n or (dynamic is not None and dynamic[0] == "sv_cumulative"):
        return [factor_exact(x, rank, dynamic) for x in m]
    mm = m if m.dtype == torch.float32 else m.float()
    norms = (torch.linalg.vector_norm(mm.reshape(bsz, -1), dim=1, dtype=torch.float64) ** 2).tolist()
    live = [i for i in range(bsz) if norms[i] > 0.0]
    results: list[Factors | None] = [None] * bsz
    for i in range(bsz):
        if norms[i] == 0.0:
            results[i] = factor_exact(m[i], rank, dynamic)
    if not live:
        return results  # type: ignore[return-value]
    if len(live) < bsz:
        mm = mm[live]
        norms = [norms[i] for i in live]
    transpose = out > inn  # work on the wide orientation: Q has min(out, in) rows
    a = mm.mT if transpose else mm  # (L, n, N)
    nl = len(live)
    qm = _orth(a @ _omega(a.shape[-1], q, seed, a.device))
    prev = [-1.0] * nl
    settled = [False] * nl
    steps = [0] * nl
    for it in range(max_iter + 1):
        bt = a.mT @ qm  # (L, N, q) = (QᵀM)ᵀ
        frob = torch.linalg.vector_norm(bt.reshape(nl, -1), dim=1, dtype=torch.float64) ** 2
        monitor = it >= MIN_STEPS - 1
        if monitor:
            lam = _eigvals_host(bt.mT.double() @ bt.double())
        frob = frob.tolist()
        for i in range(nl):
            if settled[i]:
                continue
            if frob[i] >= norms[i] * (1 - 1e-6):  # the range is caught (rank(M) ≤ q), to float32 rounding
                settled[i], steps[i] = True, it + 1
                continue
            if not monitor:
                continue
            s = lam[i].sqrt()
            k = min(choose_rank(s, rank, dynamic, n_sv=n, fro_sq=norms[i]), q)
            captured = float(lam[i, :k].sum())
            tail = max(norms[i] - captured, 0.0)
            if tail <= 1e-10 * norms[i] or (prev[i] >= 0 and captured - prev[i] <= CONVERGED * tail):
                settled[i], steps[i] = True, it + 1
            prev[i] = captured
        if all(settled) or it == max_iter:
            break
        qm = _orth(a @ bt)
    del qm
    qf, c, lam, w = _ritz64(a, bt)
    del bt
    for j, i in enumerate(live):
        if not settled[j]:
            results[i] = factor_exact(m[i], rank, dynamic)
            continue
        s = lam[j].sqrt()
        k = min(choose_rank(s, rank, dynamic, n_sv=n, fro_sq=norms[j]), q)
        up, down = _from_ritz(qf[j], c[j], lam[j], w[j], k, transpose)
        tail = max(norms[j] - float(lam[j, :k].sum()), 0.0)
        results[i] = Factors(
            up, down, s, math.sqrt(norms[j]), math.sqrt(tail / norms[j]), "randomized", iterations=steps[j]
        )
    return results  # type: ignore[return-value]


def factor(m: torch.Tensor, rank: int, dynamic: tuple[str, float] | None = None, *, method: str = "auto") -> Factors:
    """Truncated SVD of a dense M (out, in): ``auto`` (randomized where it settles) or ``exact``."""
    if method == "exact":
        return factor_exact(m, rank, dynamic)
    return factor_randomized(m, rank, dynamic)
