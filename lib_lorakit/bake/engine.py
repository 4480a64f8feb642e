"""The bake's streaming engine: read, add every update in float32, round once, write.

The engine reads the base checkpoint tensor by tensor, adds the sum of every
network's update in float32 (each computed against the original weight), rounds
once to the save dtype and streams the result into a temporary file that is renamed
into place at the end. Tensors no LoRA touches are copied byte for byte.

Reading, maths and writing overlap: prefetch threads stream the touched base tensors, two
maths threads (each with its share of the cores for torch) read their weight's LoRA tensors
and add the updates in row chunks of 1 MB per torch thread (or on the GPU, the whole weight
at once), writer threads write the results in file order, a hasher thread takes the base
file's SHA-256 for the recipe metadata unless the hash cache knows it, and a check thread
reads every used LoRA tensor for NaN/inf and hashes the LoRA files. Memory stays bounded:
buffers are reused and at most ``INFLIGHT_BYTES`` of tensors are being computed at once,
whatever the core count. The report's ``engine`` field gives the seconds per stage and thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import Cancelled, MatchError, RecipeError, ValueProblem
from ..formats.dtypes import FLOAT_CODES, FP16_MAX, HASH_PLACEHOLDER, out_code, save_code
from ..formats.safetensors_io import DTYPES, OutEntry, StreamingWriter, check_output_path
from ..formats.sources import TensorSource
from ..hashcache import HashCache, file_key
from ..hashcache import resolve as resolve_cache
from ..networks import ShapeProblem, compute_delta
from ..networks.base import Delta
from ..streaming import (
    CHUNK_ELEMS,
    MIN_CHUNK_ELEMS,
    Hasher,
    Pool,
    Profile,
    ReadAhead,
    ReadGate,
    WriterThread,
    drain,
    engine_threads,
    engine_workers,
    exact_float32,
    gc_frozen,
    max_rounding_error,
    read_ahead_early,
    reader_count,
    reserved_cores,
    resolve_device,
)
from .plan import Contribution, LoraSpec, Plan, Progress, check_lora_values, plan_bake
from .report import bake_metadata, bake_report

log = logging.getLogger("lorakit.bake")

ROUNDINGS = ("summed", "sequential")  # see bake(rounding=...)


# --- execution ---------------------------------------------------------------------------------


@dataclass
class _Stats:
    max_round: tuple[float, str] = (0.0, "")
    max_abs: tuple[float, str] = (0.0, "")
    modified: int = 0
    converted: int = 0
    copied: int = 0


@dataclass
class _Fetched:
    key: str
    weight: torch.Tensor  # the base tensor, as stored
    buffer: torch.Tensor  # pooled buffer behind ``weight``
    params: list[dict[str, torch.Tensor]]  # per contribution, float32
    biases: list[tuple[torch.Tensor, float]]  # per bias contribution: (values, scale)


class _Prefetcher:
    """Reads the next touched tensors (and their LoRA tensors) while the current ones are computed.

    ``readers`` threads take the keys in turn (key i goes to reader i mod n), each a few keys ahead, and
    :meth:`get` hands them out in key order: one reader leaves a fast disk idle between requests.
    """

    def __init__(self, baker: _Baker, keys: list[str], depth: int = 2, readers: int = 1, budget: int = 48 << 20):
        self.baker = baker
        self.keys = keys
        n = max(1, readers)
        self.qs: list[queue.Queue] = [queue.Queue(maxsize=max(2, depth)) for _ in range(n)]
        self.stop = threading.Event()
        self._next = 0
        # bytes read and not yet taken, over all readers: memory stays bounded whatever their number
        self.budget = budget
        self._ahead = 0
        self._cv = threading.Condition()
        self.threads = [
            threading.Thread(target=self._run, args=(i, n), name=f"lorakit-prefetch-{i}", daemon=True) for i in range(n)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, i: int, n: int) -> None:
        q = self.qs[i]
        for j, key in enumerate(self.keys[i::n]):
            if self.stop.is_set():
                return
            size = self.baker.plan.base.nbytes(key)
            with self._cv:  # wait while the others hold the budget, unless this key is the next one wanted
                while self._ahead and self._ahead + size > self.budget and self._next < j * n + i:
                    if self.stop.is_set():
                        return
                    self._cv.wait(0.1)
                self._ahead += size
            try:
                item = self.baker.fetch(key)
            except BaseException as e:  # handed to the main thread
                item = e
            while not self.stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self) -> _Fetched:
        item = self.qs[self._next % len(self.qs)].get()
        with self._cv:
            self._next += 1
            if not isinstance(item, BaseException):
                self._ahead -= self.baker.plan.base.nbytes(item.key)
            self._cv.notify_all()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the readers and wait for them (what they read and nobody took is dropped)."""
        self.stop.set()
        for q in self.qs:
            drain(q)
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=60)
        for q in self.qs:
            drain(q)


class _LoraCheck(threading.Thread):
    """:func:`check_lora_values` beside the stream: the LoRA files are read and hashed while the base
    streams, instead of before it (1-2 s of a bake). The output's header carries placeholder LoRA
    hashes until :meth:`result` (patched before the rename); a NaN/inf it finds stops the bake."""

    def __init__(self, plan: Plan, profile: Profile):
        super().__init__(name="lorakit-check", daemon=True)
        self.plan = plan
        self.profile = profile
        self.halt = threading.Event()  # set when the bake stops for another reason
        self.error: BaseException | None = None

    def run(self) -> None:
        t = time.perf_counter()
        try:
            check_lora_values(self.plan, cancel=self.halt)
        except BaseException as e:  # handed to the main thread
            self.error = e
        self.profile.add("check loras", time.perf_counter() - t)

    def failed(self) -> BaseException | None:
        """The check's error once it has finished with one (never blocks)."""
        return None if self.is_alive() else self.error

    def result(self, cancel: threading.Event | None, profile: Profile) -> None:
        """Wait for the check (the user may still cancel); raise what it found."""
        t = time.perf_counter()
        while self.is_alive():
            if cancel is not None and cancel.is_set():
                raise Cancelled("Bake cancelled; nothing was written.")
            self.join(0.05)
        profile.add("wait check", time.perf_counter() - t)
        if self.error is not None:
            raise self.error

    def stop(self, wait: float = 30.0) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(wait)

    def prefer(self, e: BaseException) -> BaseException:
        """The error to report when the stream failed with ``e``: the check's own, when it finds a
        broken LoRA (its message names the file and tensors; the stream's only the weight)."""
        if isinstance(e, Cancelled) or not isinstance(e, ValueProblem):
            return e
        self.join(30)
        return self.error if isinstance(self.error, ValueProblem) else e


class _Baker:
    """Computes output tensors; ``tensor`` may run on several threads at once (one tensor each)."""

    def __init__(
        self,
        plan: Plan,
        save_code: str,
        pool: Pool,
        stats: _Stats,
        profile: Profile | None = None,
        device: torch.device | None = None,
        rounding: str = "summed",
    ):
        self.plan = plan
        self.sequential = rounding == "sequential"
        self.save_code = save_code
        self.pool = pool
        self.stats = stats
        self.profile = profile or Profile()
        self.device = device or torch.device("cpu")
        # CPU maths per tensor in one go instead of 1 MB row chunks: fewer, larger torch operations for the
        # intra-op threads; an experiment for many-core machines (bench/README.md), off by default.
        self.whole = os.environ.get("LORAKIT_MATHS", "chunks") == "whole"
        # A chunk holds 1 MB per torch thread of this maths thread: each operation shares out into pieces
        # that stay in a core's L2, and the Python work per byte (under the interpreter lock, which many
        # maths threads would contend for) shrinks with the core count (bench/README.md). With one torch
        # thread the chunk is 2 MB all the same: there the per-operation work of ~8 torch calls per chunk
        # costs more than the L2 misses (a cold 2-core SDXL bake, hash cached: 13.6-14.6 s -> 12.3-12.9 s).
        self.chunk = max(CHUNK_ELEMS * max(1, torch.get_num_threads()), MIN_CHUNK_ELEMS)
        self._local = threading.local()
        self._lock = threading.Lock()  # stats and per-block changes

    @property
    def _w(self) -> torch.Tensor:
        return self._scratch()[0]

    @property
    def _r(self) -> torch.Tensor:
        return self._scratch()[1]

    def _scratch(self) -> tuple[torch.Tensor, torch.Tensor]:
        sc = getattr(self._local, "scratch", None)
        if sc is None:
            sc = self._local.scratch = (
                torch.empty(self.chunk, dtype=torch.float32),
                torch.empty(self.chunk, dtype=torch.float32),
            )
        return sc

    def _stream(self):
        """This thread's CUDA stream (threads on the default stream would serialise)."""
        st = getattr(self._local, "stream", None)
        if st is None:
            st = self._local.stream = torch.cuda.Stream(self.device)
        return st

    def _read_params(self, c: Contribution) -> dict[str, torch.Tensor]:
        src = self.plan.loras[c.lora].source
        p = {p: src.read(k).float() for p, k in c.params.items()}
        if c.scale is not None:  # the writer's scale from the header (the group has no alpha tensor)
            p["scale"] = torch.tensor([c.scale], dtype=torch.float64)
        return p

    def fetch(self, key: str) -> _Fetched:
        """Read the base tensor (runs on the prefetch thread: one sequential pass over the base file)."""
        base = self.plan.base
        t = time.perf_counter()
        raw_buf = self.pool.get(base.nbytes(key))
        w = base.read(key, out=raw_buf if base.raw_span(key) else None)
        self.profile.add("read base", time.perf_counter() - t)
        return _Fetched(key, w, raw_buf, [], [])

    def _read_loras(self, f: _Fetched) -> None:
        """Read the LoRA tensors one weight needs (on the maths thread: many small reads, in parallel)."""
        t = time.perf_counter()
        f.params = [self._read_params(c) for c in self.plan.weights.get(f.key, [])]
        f.biases = []
        for c, bp in self.plan.biases.get(f.key, []):
            src = self.plan.loras[c.lora].source
            scale = float(src.read(c.params["scale"]).reshape(-1)[0]) if "scale" in c.params else 1.0
            f.biases.append((src.read(c.params[bp]).float().reshape(-1), scale))
        self.profile.add("read loras", time.perf_counter() - t)

    def tensor(self, f: _Fetched) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute one output tensor. Returns (tensor in the output dtype, its pooled buffer)."""
        key, w = f.key, f.weight
        try:
            self._read_loras(f)
            code = out_code(self.plan.base.dtype(key), self.save_code)
            shape = tuple(w.shape)
            rows = shape[0] if len(shape) else 1
            w2 = w.reshape(rows, -1)
            cols = w2.shape[1]
            t = time.perf_counter()
            lows, others, notes = self._deltas(f, w2)
            self.profile.add("delta", time.perf_counter() - t)
            out_dt = DTYPES[code][0]
            out_buf = self.pool.get(max(1, math.prod(shape)) * DTYPES[code][1])
            out = out_buf[: math.prod(shape) * DTYPES[code][1]].view(out_dt).reshape(rows, cols)
            if code not in FLOAT_CODES:
                out.copy_(w2)
            elif self.device.type == "cuda":
                with torch.cuda.stream(self._stream()):
                    wnorm, wdev = self._combine_device(key, w2, out, lows, others)
                    self._note_changes(notes, wdev, wnorm)
            elif self.whole:
                wnorm, _ = self._combine_device(key, w2, out, lows, others)
                self._note_changes(notes, w2, wnorm)
            else:
                wnorm = self._combine(key, w2, out, lows, others)
                self._note_changes(notes, w2, wnorm)
            return out.reshape(shape), out_buf
        finally:
            self.pool.put(f.buffer)

    def _deltas(self, f: _Fetched, w2: torch.Tensor):
        """Per-target updates, each computed against the original weight.

        Returns (low-rank groups, other updates, notes): low-rank updates on the same rows
        are concatenated into one (up, down) pair with the multipliers folded into ``up``;
        the others stay factored where their algorithm allows (kron, Hadamard).
        """
        key = f.key
        contribs = self.plan.weights.get(key, [])
        bias_contribs = self.plan.biases.get(key, [])
        lows: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        others: list[tuple[int, int, Delta, float, int]] = []  # (rows, update, multiplier, LoRA: sequential only)
        notes: list[tuple[Contribution, float, int, int]] = []
        w32 = w2.float() if any(c.needs_weight for c in contribs) else None
        for c, p in zip(contribs, f.params):
            t = c.target
            r0, r1 = t.rows if t.rows else (0, w2.shape[0])
            weight = None
            if c.needs_weight:
                sl = w32[r0:r1]
                weight = (sl.reshape(t.shape[::-1]).T if t.transpose else sl).reshape(t.shape)
            try:
                d = compute_delta(c.alg, p, t.shape, weight)
            except (ShapeProblem, RuntimeError, ValueError) as e:
                raise MatchError(
                    f"{self.plan.loras[c.lora].spec.path}: layer {c.module} cannot be applied to {t.label}: {e}"
                ) from None
            m = c.multiplier
            notes.append((c, abs(m) * d.norm(), r0, r1))
            if t.transpose:  # stored transposed (OpenCLIP text_projection)
                d = Delta(dense=d.to_dense(t.shape).T.contiguous())
            phase = c.lora if self.sequential else -1
            if d.lowrank is not None:
                up, down = d.lowrank
                lows.setdefault((r0, r1, phase), []).append((up * m, down))
            elif d.kron is not None or d.hada is not None or d.dense is not None:
                others.append((r0, r1, d, m, phase))
        for (c, bp), (b, scale) in zip(bias_contribs, f.biases):
            t = c.target
            r0, r1 = t.rows if t.rows else (0, w2.shape[0])
            if b.numel() != r1 - r0:
                raise MatchError(
                    f"{self.plan.loras[c.lora].spec.path}: {c.params[bp]} has {b.numel()} values, "
                    f"the bias {key} takes {r1 - r0}."
                )
            phase = c.lora if self.sequential else -1
            others.append((r0, r1, Delta(dense=b.reshape(-1, 1)), scale * c.multiplier, phase))
        merged = []
        for (r0, r1, phase), parts in lows.items():
            merged.append(
                (
                    r0,
                    r1,
                    torch.cat([u for u, _ in parts], dim=1).contiguous(),
                    torch.cat([d for _, d in parts], dim=0).contiguous(),
                    phase,
                )
            )
        return merged, others, notes

    def _steps(self, wc: torch.Tensor, lows, others, dtype: torch.dtype):
        """The order updates are added in: one step (-1) when summed; with sequential rounding, the LoRAs
        in recipe order, the weight rounded to the save dtype before each (as a chain of bakes leaves it)."""
        for phase in sorted({e[-1] for e in lows} | {e[-1] for e in others}):
            self._round_step(wc, dtype)
            yield phase

    def _round_step(self, wc: torch.Tensor, dtype: torch.dtype) -> None:
        """Sequential rounding only: round ``wc`` (float32) to the save dtype in place."""
        if self.sequential and dtype != torch.float32:
            wc.copy_(wc.to(dtype))

    def _note_changes(self, notes, w2: torch.Tensor, wnorm: float) -> None:
        """Per LoRA and block: the largest |m·ΔW| / |W| (W the target, a row slice for CLIP-G q/k/v).

        |ΔW| comes from the factored update (Gram matrices for low rank, |w1|·|w2| for kron),
        so the statistic costs no pass over the weight.
        """
        for c, dnorm, r0, r1 in notes:
            wn = (
                wnorm
                if (r0, r1) == (0, w2.shape[0])
                else float(torch.linalg.vector_norm(w2[r0:r1], dtype=torch.float32))
            )
            rel = dnorm / wn if wn > 0 else (math.inf if dnorm > 0 else 0.0)
            st = self.plan.loras[c.lora]
            block = c.target.block or c.target.component
            with self._lock:
                if rel > st.block_change.get(block, -1.0):
                    st.block_change[block] = rel

    def _combine(self, key: str, w2: torch.Tensor, out: torch.Tensor, lows, others) -> float:
        """Add the updates chunk by chunk in float32, round once, and check the result. Returns |W|."""
        rows, cols = w2.shape
        step = max(1, self.chunk // max(cols, 1))
        blocks = [d.kron[1].shape[0] for _, _, d, _, _ in others if d.kron is not None]
        if blocks and blocks[0] <= step:  # whole kron blocks per chunk: one broadcast each, no per-row edges
            step -= step % blocks[0]
        big = cols > self.chunk
        amax = wn2 = 0.0
        max_round = 0.0
        has_delta = bool(lows or others)
        rounding = out.dtype != torch.float32
        scratch_w, scratch_r = self._scratch()
        t_conv = t_add = t_round = t_norm = t_other = 0.0
        clock = time.perf_counter
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * cols
            if n == 0:
                continue
            t0 = clock()
            wc = (torch.empty(n) if big else scratch_w[:n]).view(r1 - r0, cols)
            wc.copy_(w2[r0:r1])
            t1 = clock()
            if has_delta:
                flat = wc.view(-1)
                wn2 += float(torch.dot(flat, flat))
            tn = clock()
            for phase in self._steps(wc, lows, others, out.dtype):
                for s0, s1, up, down, st in lows:
                    a, b = max(r0, s0), min(r1, s1)
                    if a < b and st == phase:
                        wc[a - r0 : b - r0].addmm_(up[a - s0 : b - s0], down)
                tl = clock()
                for s0, s1, d, m, st in others:
                    a, b = max(r0, s0), min(r1, s1)
                    if a < b and st == phase:
                        d.add_rows(wc[a - r0 : b - r0], a - s0, b - s0, m)
                t_other += clock() - tl
            self._round_step(wc, out.dtype)
            t2 = clock()
            t_norm += tn - t1
            lo, hi = torch.aminmax(wc)
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                self._nonfinite(key, w2[r0:r1], has_delta)
            amax = max(amax, -lo, hi)
            oc = out[r0:r1]
            oc.copy_(wc)
            if rounding and max_rounding_error(max(-lo, hi), out.dtype) >= max(max_round, self.stats.max_round[0]):
                rc = (torch.empty(n) if big else scratch_r[:n]).view(r1 - r0, cols)
                torch.sub(oc, wc, out=rc)  # the rounding error, in one pass
                lo, hi = torch.aminmax(rc)
                max_round = max(max_round, -float(lo), float(hi))
            t3 = clock()
            t_conv += t1 - t0
            t_add += t2 - t1
            t_round += t3 - t2
        self.profile.add("convert", t_conv)
        self.profile.add("norm", t_norm)
        self.profile.add("add", t_add - t_norm - t_other)
        if others:
            self.profile.add(f"add {'+'.join(sorted({_kind(d) for _, _, d, _, _ in others}))}", t_other)
        self.profile.add("round", t_round)
        self._finish(key, amax, max_round, has_delta, out.dtype)
        return math.sqrt(wn2)

    def _combine_device(self, key: str, w2: torch.Tensor, out: torch.Tensor, lows, others):
        """``_combine`` on the GPU: the whole tensor at once, same float32 maths, one rounding.

        Returns (|W|, the weight on the device as stored, for the per-block statistics).
        """
        dev = self.device
        clock = time.perf_counter
        t0 = clock()
        wd = w2.to(dev, non_blocking=False)
        wc = wd.float()
        t1 = clock()
        has_delta = bool(lows or others)
        wn2 = float(torch.dot(wc.view(-1), wc.view(-1))) if has_delta else 0.0
        for phase in self._steps(wc, lows, others, out.dtype):
            for s0, s1, up, down, st in lows:
                if st == phase:
                    wc[s0:s1].addmm_(up.to(dev), down.to(dev))
            for s0, s1, d, m, st in others:
                if st == phase:
                    _delta_to(d, dev).add_rows(wc[s0:s1], 0, s1 - s0, m)
        self._round_step(wc, out.dtype)
        t2 = clock()
        lo, hi = torch.aminmax(wc)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._nonfinite(key, w2, has_delta)
        amax = max(-lo, hi, 0.0)
        max_round = 0.0
        check = out.dtype != torch.float32 and max_rounding_error(amax, out.dtype) >= self.stats.max_round[0]
        # on the CPU (LORAKIT_MATHS=whole) round straight into out; on the GPU there, then copy to the host
        od = out.copy_(wc) if dev.type == "cpu" else wc.to(out.dtype)
        if check:
            elo, ehi = torch.aminmax(od.float().sub_(wc))
            max_round = max(-float(elo), float(ehi), 0.0)
        if od is not out:
            out.copy_(od)  # device -> host, synchronous
        t3 = clock()
        self.profile.add("convert", t1 - t0)
        self.profile.add("add", t2 - t1)
        self.profile.add("round", t3 - t2)
        self._finish(key, amax, max_round, has_delta, out.dtype)
        return math.sqrt(wn2), wd

    def _finish(self, key: str, amax: float, max_round: float, has_delta: bool, dtype: torch.dtype) -> None:
        if dtype == torch.float16 and amax > FP16_MAX:
            raise ValueProblem(
                f"{key}: a baked weight reaches {amax:.6g}, beyond the float16 range (65504); saving would turn it into inf.",
                fix="Lower the strengths, or choose the save dtype bf16 or fp32.",
            )
        st = self.stats
        with self._lock:
            if max_round > st.max_round[0] or (max_round == st.max_round[0] and max_round and key < st.max_round[1]):
                st.max_round = (max_round, key)
            if amax > st.max_abs[0] or (amax == st.max_abs[0] and amax and key < st.max_abs[1]):
                st.max_abs = (amax, key)
            if has_delta:
                st.modified += 1
            else:
                st.converted += 1

    def _nonfinite(self, key: str, w_rows: torch.Tensor, has_delta: bool) -> None:
        if not bool(torch.isfinite(w_rows.float()).all()):
            raise ValueProblem(
                f"{self.plan.base.path}: the checkpoint itself has NaN/inf values in {key}.",
                fix="The base checkpoint is damaged; use another copy.",
            )
        names = sorted({self.plan.loras[c.lora].spec.label for c in self.plan.weights.get(key, [])})
        raise ValueProblem(
            f"{key}: baking {' + '.join(names) or 'the recipe'} gives NaN/inf values.",
            fix="Lower the strengths; if it persists the LoRA is broken for this checkpoint.",
        )


def _kind(d: Delta) -> str:
    """The profile's name for an update that is not a plain low-rank pair."""
    return "kron" if d.kron is not None else "hadamard" if d.hada is not None else "dense"


def _delta_to(d: Delta, dev: torch.device) -> Delta:
    """``d`` with its tensors on ``dev``."""
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return Delta(
        lowrank=None if d.lowrank is None else tuple(mv(t) for t in d.lowrank),
        dense=mv(d.dense),
        kron=None if d.kron is None else tuple(mv(t) for t in d.kron),
        hada=None if d.hada is None else tuple(mv(t) for t in d.hada),
        bias=mv(d.bias),
    )


def bake(
    base_path: str | TensorSource,
    specs: Sequence[LoraSpec],
    output: str | None,
    *,
    save_dtype: str = "fp16",
    overwrite: bool = False,
    allow_unmatched: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    device: str | None = "auto",
    workers: int | None = None,
    reserve_cores: int | None = None,
    hash_cache: HashCache | str | bool | None = None,
    scale_source: str = "writer",
    preflight_settings: Mapping[str, Any] | None = None,
    rounding: str = "summed",
) -> dict:
    """Bake ``specs`` into ``base_path`` and write ``output`` (safetensors).

    Args:
        device: where the float32 maths runs: ``auto`` (the GPU when torch sees one), ``cpu`` or ``cuda``.
            Either way each weight is rounded once; GPU and CPU outputs agree within one step of the save dtype.
        workers: maths threads (default: :func:`engine_workers`, at most 2).
        reserve_cores: cores left to the host: fewer torch threads (default ``$LORAKIT_RESERVE_CORES``, else 0;
            the WebUI's jobs leave 1 for its server).
        hash_cache: remembered file hashes (a :class:`HashCache`, a data folder, True for the default
            folder); None hashes every input.
        preflight_settings: the user's settings (max-safe and cross-lineage tables) the pre-flight warnings
            use; None: the shipped tables.
        rounding: ``summed`` (default): every LoRA's update is added in float32 and the sum rounded once;
            ``sequential``: the weight is rounded to the save dtype before and after each LoRA, as baking
            the LoRAs one after another would leave it (the bake doctor's variant; never better).

    Returns:
        The report (a JSON-serialisable dict): per LoRA the modules matched per
        component, unmatched keys, per-block largest relative change, rounding and
        overflow, wall time, peak memory, where each hash came from and the time per stage.

    Raises:
        LorakitError: bad input of any kind (the CLI exits with 2); no output is left.
        Cancelled: when ``cancel`` was set; no output is left.
    """
    t0 = time.perf_counter()
    if rounding not in ROUNDINGS:
        raise RecipeError(f"Unknown rounding {rounding!r}.", fix=f"Use one of {', '.join(ROUNDINGS)}.")
    if not dry_run and not isinstance(base_path, TensorSource):  # while torch loads (a cold command line)
        read_ahead_early([(os.fspath(base_path), 512 << 20)] + [(s.path, 0) for s in specs])
    code = save_code(save_dtype)
    dev = resolve_device(device)
    reserve = reserved_cores(reserve_cores)
    n_workers = max(1, int(workers)) if workers else engine_workers(reserve)
    if dev.type == "cuda":
        n_workers = min(n_workers, 4)  # a few streams keep the GPU busy; more threads only hold buffers
    base_file = base_path.path if isinstance(base_path, TensorSource) else os.fspath(base_path)
    if not dry_run:
        if not output:
            raise RecipeError("No output file given.", fix="Pass -o OUT.safetensors.")
        if not str(output).lower().endswith(".safetensors"):
            raise RecipeError(f"The output {output} must end in .safetensors (lorakit always writes safetensors).")
        check_output_path(output, overwrite=overwrite, inputs=[base_file] + [s.path for s in specs])
    say = progress or (lambda f, m: None)
    say(0.0, "checking inputs")
    cache = resolve_cache(hash_cache)
    profile = Profile()
    hasher: Hasher | None = None
    base_hash: tuple[str, str] | None = None  # (sha256, source)
    stamp = None
    if not dry_run:
        base_hash = cache.get(base_file) if cache is not None else None
        if base_hash is None:  # the base file's SHA-256 (for the recipe) is taken on a side thread from the start
            stamp = file_key(base_file)
            hasher = Hasher(base_file, ReadGate(), profile=profile)
            hasher.start()
    profile.add("prepare", time.perf_counter() - t0)
    try:
        t_plan = time.perf_counter()
        plan = plan_bake(base_path, specs, allow_unmatched=allow_unmatched, scale_source=scale_source)
        # --- pre-flight (lib_lorakit/preflight.py): strength above max-safe, stacked styles, other lineage ---
        from ..preflight import bake_preflight

        plan.warnings.extend(bake_preflight(base_path, specs, preflight_settings))
        plan.hash_cache = cache
        stats = _Stats()
        profile.add("plan", time.perf_counter() - t_plan)
        check: _LoraCheck | None = None
        try:
            if dry_run:
                t_check = time.perf_counter()
                check_lora_values(plan, cancel=cancel)
                profile.add("check loras", time.perf_counter() - t_check)
            else:
                check = _LoraCheck(plan, profile)
                check.start()
                t_stream = time.perf_counter()
                try:
                    threads = engine_threads(n_workers, hashers=int(hasher is not None), reserve=reserve)
                    with threads, exact_float32(dev), gc_frozen():
                        sha = _execute(
                            plan,
                            output,
                            code,
                            save_dtype,
                            overwrite,
                            stats,
                            say,
                            cancel,
                            hasher,
                            base_hash[0] if base_hash else None,
                            dev,
                            n_workers,
                            profile,
                            rounding,
                            check,
                        )
                except BaseException as e:
                    better = check.prefer(e)
                    if better is not e:
                        raise better from None
                    raise
                profile.add("stream (all)", time.perf_counter() - t_stream)
                if base_hash is None:
                    base_hash = (sha, "computed")
                    if cache is not None and stamp is not None:
                        cache.put(base_file, sha, stamp[1])
            report = bake_report(
                plan, stats, output, save_dtype, base_hash[0] if base_hash else "", dry_run, time.perf_counter() - t0
            )
            report["base"]["sha256_source"] = base_hash[1] if base_hash else None
            report["engine"] = {"device": str(dev), "workers": n_workers, **profile.as_dict()}
            say(1.0, "done")
            return report
        finally:
            if check is not None:  # stopped before the files it reads are closed
                check.stop()
            plan.base.close()
            for st in plan.loras:
                st.source.close()
    finally:
        if hasher is not None:  # no thread may outlive the call (the interpreter could be exiting)
            hasher.stop.set()
            hasher.join(timeout=30)


INFLIGHT_BYTES = 96 << 20  # tensors being computed at once (inputs and outputs), whatever the core count


def _execute(
    plan: Plan,
    output: str,
    save_code: str,
    save_dtype: str,
    overwrite: bool,
    stats: _Stats,
    say: Progress,
    cancel: threading.Event | None,
    hasher: Hasher | None,
    known_sha: str | None,
    device: torch.device,
    n_workers: int,
    profile: Profile,
    rounding: str = "summed",
    check: _LoraCheck | None = None,
) -> str:
    """Stream the output. Every thread started here is stopped and joined before returning.

    The main thread walks the keys in file order: untouched tensors go to the writer as raw byte
    copies, touched ones (read ahead by the prefetch thread) to ``n_workers`` maths threads. Results
    reach the writer in file order; at most ``INFLIGHT_BYTES`` of tensors are being computed at once.
    """
    base = plan.base
    keys = base.keys()
    entries = [OutEntry(k, out_code(base.dtype(k), save_code), base.shape(k)) for k in keys]
    pool = Pool()
    total = sum(base.nbytes(k) for k in keys) or 1
    done = 0
    last = 0.0
    baker = _Baker(plan, save_code, pool, stats, profile, device, rounding)
    touched = {k for k, e in zip(keys, entries) if k in plan.weights or k in plan.biases or e.dtype != base.dtype(k)}
    pre = _Prefetcher(baker, [k for k in keys if k in touched], depth=3, readers=reader_count())
    wt: WriterThread | None = None
    ex = concurrent.futures.ThreadPoolExecutor(n_workers, thread_name_prefix="lorakit-maths")
    pending: collections.deque = collections.deque()  # ("item", writer item) | ("fut", key, future, bytes)
    inflight = [0, 0]  # futures, bytes
    clock = time.perf_counter

    def to_writer(block: bool) -> None:
        """Hand finished results to the writer in order; ``block``: wait for all."""
        while pending:
            head = pending[0]
            if head[0] == "fut":
                busy = inflight[0] > n_workers + 2 or inflight[1] > INFLIGHT_BYTES
                if not (block or busy or head[2].done()):
                    return
                t = clock()
                out, buf = head[2].result()
                profile.add("wait maths", clock() - t)
                inflight[0] -= 1
                inflight[1] -= head[3]
                pending.popleft()
                item = ("data", head[1], out, buf)
            else:
                pending.popleft()
                item = head[1]
            t = clock()
            wt.put(item)
            profile.add("wait writer", clock() - t)

    first = base.raw_span(keys[0]) if keys else None
    ahead = ReadAhead(first[0] if first and hasher is None else None)
    try:
        ahead.advance(0)
        pre.start()
        t_open = clock()
        with StreamingWriter(
            output, entries, bake_metadata(plan, save_dtype, HASH_PLACEHOLDER), overwrite=overwrite
        ) as w:
            profile.add("open output", clock() - t_open)
            wt = WriterThread(w, pool, profile=profile)
            wt.start()
            for key in keys:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Bake cancelled; nothing was written.")
                failed = check.failed() if check is not None else None
                if failed is not None:
                    raise failed
                if key not in touched:
                    span = base.raw_span(key)
                    pending.append(
                        ("item", ("copy", key, span, None) if span is not None else ("data", key, base.read(key), None))
                    )
                    stats.copied += 1
                else:
                    t = clock()
                    fetched = pre.get()
                    profile.add("wait read", clock() - t)
                    if fetched.key != key:  # pragma: no cover - an ordering bug would corrupt the output
                        raise RuntimeError(f"prefetch order broken at {key}")
                    nbytes = 2 * base.nbytes(key)
                    pending.append(("fut", key, ex.submit(baker.tensor, fetched), nbytes))
                    inflight[0] += 1
                    inflight[1] += nbytes
                to_writer(False)
                done += base.nbytes(key)
                span = base.raw_span(key)
                if span is not None and hasher is not None and hasher.gate is not None:  # keep the hasher just ahead
                    hasher.gate.advance(span[1] + span[2])
                elif span is not None:
                    ahead.advance(span[1] + span[2])
                now = clock()
                if now - last > 0.25:
                    say(0.02 + 0.93 * done / total, f"baking {key}")
                    last = now
            to_writer(True)
            if hasher is not None and hasher.gate is not None:
                hasher.gate.release()
            t = clock()
            wt.finish()
            profile.add("wait writer", clock() - t)
            digest = known_sha
            if hasher is not None:
                say(0.96, "hashing the base checkpoint")
                t = clock()
                hasher.join()
                profile.add("wait hash", clock() - t)
                if hasher.error is not None:
                    raise hasher.error
                digest = hasher.digest
            if check is not None:  # the LoRA hashes, and no NaN/inf in the LoRAs
                say(0.97, "checking the LoRA files")
                check.result(cancel, profile)
            w.patch_metadata(bake_metadata(plan, save_dtype, digest))
            say(0.98, "syncing to disk")
            t = clock()
            w.commit()
            profile.add("sync", clock() - t)
            log.debug("bake: direct I/O: %s; profile %s", w.direct_io, profile.as_dict()["stages"])
        return digest
    finally:
        t_end = clock()
        if hasher is not None:
            hasher.stop.set()
            if hasher.gate is not None:
                hasher.gate.release()
        pre.stop.set()
        ex.shutdown(wait=True, cancel_futures=True)
        for entry in pending:  # results nobody will write: give their buffers back
            if entry[0] == "fut" and entry[2].done() and not entry[2].cancelled() and entry[2].exception() is None:
                pool.put(entry[2].result()[1])
        pre.close()
        if wt is not None and wt.is_alive():
            wt.stop.set()
            drain(wt.q)
            wt.q.put(None)
            wt.join(timeout=60)
        profile.add("shut down", clock() - t_end)
