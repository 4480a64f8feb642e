"""The bake's streaming engine: read, add every update in float32, round once, write.

The engine reads the base checkpoint tensor by tensor, adds the sum of every
network's update in float32 (each computed against the original weight), rounds
once to the save dtype and streams the result into a temporary file that is renamed
into place at the end. Tensors no LoRA touches are copied byte for byte.

Reading, maths and writing overlap: a prefetch thread reads the next tensors and their
LoRA tensors, the main thread adds the updates in cache-sized row chunks, a writer
thread drains a short queue, and a hasher thread takes the base file's SHA-256 for the
recipe metadata. Memory stays flat: buffers are reused and no tensor larger than the
largest touched weight is held.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import Cancelled, MatchError, RecipeError, ValueProblem
from ..formats.dtypes import FLOAT_CODES, FP16_MAX, HASH_PLACEHOLDER, out_code, save_code
from ..formats.safetensors_io import DTYPES, OutEntry, StreamingWriter, check_output_path
from ..formats.sources import TensorSource
from ..networks import ShapeProblem, compute_delta
from ..networks.base import Delta
from ..streaming import CHUNK_ELEMS, Hasher, Pool, ReadGate, WriterThread, drain, engine_threads
from .plan import Contribution, LoraSpec, Plan, Progress, check_lora_values, plan_bake
from .report import bake_metadata, bake_report

log = logging.getLogger("lorakit.bake")


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


class _Prefetcher(threading.Thread):
    """Reads the next touched tensors (and their LoRA tensors) while the current one is computed."""

    def __init__(self, baker: _Baker, keys: list[str]):
        super().__init__(name="lorakit-prefetch", daemon=True)
        self.baker = baker
        self.keys = keys
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()

    def run(self) -> None:
        for key in self.keys:
            if self.stop.is_set():
                return
            try:
                item = self.baker.fetch(key)
            except BaseException as e:  # handed to the main thread
                item = e
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self) -> _Fetched:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item


class _Baker:
    def __init__(self, plan: Plan, save_code: str, pool: Pool, stats: _Stats):
        self.plan = plan
        self.save_code = save_code
        self.pool = pool
        self.stats = stats
        self._w = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
        self._r = torch.empty(CHUNK_ELEMS, dtype=torch.float32)

    def _read_params(self, c: Contribution) -> dict[str, torch.Tensor]:
        src = self.plan.loras[c.lora].source
        return {p: src.read(k).float() for p, k in c.params.items()}

    def fetch(self, key: str) -> _Fetched:
        """Read what one touched tensor needs (runs on the prefetch thread)."""
        base = self.plan.base
        raw_buf = self.pool.get(base.nbytes(key))
        w = base.read(key, out=raw_buf if base.raw_span(key) else None)
        params = [self._read_params(c) for c in self.plan.weights.get(key, [])]
        biases = []
        for c, bp in self.plan.biases.get(key, []):
            src = self.plan.loras[c.lora].source
            scale = float(src.read(c.params["scale"]).reshape(-1)[0]) if "scale" in c.params else 1.0
            biases.append((src.read(c.params[bp]).float().reshape(-1), scale))
        return _Fetched(key, w, raw_buf, params, biases)

    def tensor(self, f: _Fetched) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute one output tensor. Returns (tensor in the output dtype, its pooled buffer)."""
        key, w = f.key, f.weight
        try:
            code = out_code(self.plan.base.dtype(key), self.save_code)
            shape = tuple(w.shape)
            rows = shape[0] if len(shape) else 1
            w2 = w.reshape(rows, -1)
            cols = w2.shape[1]
            lows, others, notes = self._deltas(f, w2)
            out_dt = DTYPES[code][0]
            out_buf = self.pool.get(max(1, math.prod(shape)) * DTYPES[code][1])
            out = out_buf[: math.prod(shape) * DTYPES[code][1]].view(out_dt).reshape(rows, cols)
            if code not in FLOAT_CODES:
                out.copy_(w2)
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
        lows: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        others: list[tuple[int, int, Delta, float]] = []
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
                raise MatchError(f"{self.plan.loras[c.lora].spec.path}: layer {c.module} cannot be applied to "
                                 f"{t.label}: {e}") from None
            m = c.multiplier
            notes.append((c, abs(m) * d.norm(), r0, r1))
            if t.transpose:  # stored transposed (OpenCLIP text_projection)
                d = Delta(dense=d.to_dense(t.shape).T.contiguous())
            if d.lowrank is not None:
                up, down = d.lowrank
                lows.setdefault((r0, r1), []).append((up * m, down))
            elif d.kron is not None or d.hada is not None or d.dense is not None:
                others.append((r0, r1, d, m))
        for (c, bp), (b, scale) in zip(bias_contribs, f.biases):
            t = c.target
            r0, r1 = t.rows if t.rows else (0, w2.shape[0])
            if b.numel() != r1 - r0:
                raise MatchError(f"{self.plan.loras[c.lora].spec.path}: {c.params[bp]} has {b.numel()} values, "
                                 f"the bias {key} takes {r1 - r0}.")
            others.append((r0, r1, Delta(dense=b.reshape(-1, 1)), scale * c.multiplier))
        merged = []
        for (r0, r1), parts in lows.items():
            merged.append((r0, r1, torch.cat([u for u, _ in parts], dim=1).contiguous(),
                           torch.cat([d for _, d in parts], dim=0).contiguous()))
        return merged, others, notes

    def _note_changes(self, notes, w2: torch.Tensor, wnorm: float) -> None:
        """Per LoRA and block: the largest |m·ΔW| / |W| (W the target, a row slice for CLIP-G q/k/v).

        |ΔW| comes from the factored update (Gram matrices for low rank, |w1|·|w2| for kron),
        so the statistic costs no pass over the weight.
        """
        for c, dnorm, r0, r1 in notes:
            wn = wnorm if (r0, r1) == (0, w2.shape[0]) else float(
                torch.linalg.vector_norm(w2[r0:r1], dtype=torch.float32))
            rel = dnorm / wn if wn > 0 else (math.inf if dnorm > 0 else 0.0)
            st = self.plan.loras[c.lora]
            block = c.target.block or c.target.component
            if rel > st.block_change.get(block, -1.0):
                st.block_change[block] = rel

    def _combine(self, key: str, w2: torch.Tensor, out: torch.Tensor, lows, others) -> float:
        """Add the updates chunk by chunk in float32, round once, and check the result. Returns |W|."""
        rows, cols = w2.shape
        step = max(1, CHUNK_ELEMS // max(cols, 1))
        big = cols > CHUNK_ELEMS
        amax = wn2 = 0.0
        max_round = 0.0
        has_delta = bool(lows or others)
        rounding = out.dtype != torch.float32
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * cols
            if n == 0:
                continue
            wc = (torch.empty(n) if big else self._w[:n]).view(r1 - r0, cols)
            wc.copy_(w2[r0:r1])
            if has_delta:
                flat = wc.view(-1)
                wn2 += float(torch.dot(flat, flat))
            for s0, s1, up, down in lows:
                a, b = max(r0, s0), min(r1, s1)
                if a < b:
                    wc[a - r0:b - r0].addmm_(up[a - s0:b - s0], down)
            for s0, s1, d, m in others:
                a, b = max(r0, s0), min(r1, s1)
                if a < b:
                    d.add_rows(wc[a - r0:b - r0], a - s0, b - s0, m)
            lo, hi = torch.aminmax(wc)
            lo, hi = float(lo), float(hi)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                self._nonfinite(key, w2[r0:r1], has_delta)
            amax = max(amax, -lo, hi)
            oc = out[r0:r1]
            oc.copy_(wc)
            if rounding:
                rc = (torch.empty(n) if big else self._r[:n]).view(r1 - r0, cols)
                torch.sub(oc, wc, out=rc)  # the rounding error, in one pass
                lo, hi = torch.aminmax(rc)
                max_round = max(max_round, -float(lo), float(hi))
        if out.dtype == torch.float16 and amax > FP16_MAX:
            raise ValueProblem(
                f"{key}: a baked weight reaches {amax:.6g}, beyond the float16 range (65504); saving would turn it into inf.",
                fix="Lower the strengths, or save with --save-dtype bf16 or fp32.")
        st = self.stats
        if max_round > st.max_round[0]:
            st.max_round = (max_round, key)
        if amax > st.max_abs[0]:
            st.max_abs = (amax, key)
        if has_delta:
            st.modified += 1
        else:
            st.converted += 1
        return math.sqrt(wn2)

    def _nonfinite(self, key: str, w_rows: torch.Tensor, has_delta: bool) -> None:
        if not bool(torch.isfinite(w_rows.float()).all()):
            raise ValueProblem(f"{self.plan.base.path}: the checkpoint itself has NaN/inf values in {key}.",
                               fix="The base checkpoint is damaged; use another copy.")
        names = sorted({self.plan.loras[c.lora].spec.label for c in self.plan.weights.get(key, [])})
        raise ValueProblem(f"{key}: baking {' + '.join(names) or 'the recipe'} gives NaN/inf values.",
                           fix="Lower the strengths; if it persists the LoRA is broken for this checkpoint.")



def bake(base_path: str | TensorSource, specs: Sequence[LoraSpec], output: str | None, *, save_dtype: str = "fp16",
         overwrite: bool = False, allow_unmatched: bool = False, dry_run: bool = False,
         progress: Progress | None = None, cancel: threading.Event | None = None) -> dict:
    """Bake ``specs`` into ``base_path`` and write ``output`` (safetensors).

    Returns:
        The report (a JSON-serialisable dict): per LoRA the modules matched per
        component, unmatched keys, per-block largest relative change, rounding and
        overflow, wall time and peak memory.

    Raises:
        LorakitError: bad input of any kind (the CLI exits with 2); no output is left.
        Cancelled: when ``cancel`` was set; no output is left.
    """
    t0 = time.perf_counter()
    code = save_code(save_dtype)
    if not dry_run:
        if not output:
            raise RecipeError("No output file given.", fix="Pass -o OUT.safetensors.")
        if not str(output).lower().endswith(".safetensors"):
            raise RecipeError(f"The output {output} must end in .safetensors (lorakit always writes safetensors).")
        base_file = base_path.path if isinstance(base_path, TensorSource) else base_path
        check_output_path(output, overwrite=overwrite, inputs=[base_file] + [s.path for s in specs])
    say = progress or (lambda f, m: None)
    say(0.0, "checking inputs")
    hasher: Hasher | None = None
    if not dry_run:  # the base file's SHA-256 (for the recipe) is taken on a side thread from the start
        hasher = Hasher(base_path.path if isinstance(base_path, TensorSource) else os.fspath(base_path), ReadGate())
        hasher.start()
    try:
        plan = plan_bake(base_path, specs, allow_unmatched=allow_unmatched)
        stats = _Stats()
        try:
            check_lora_values(plan, cancel=cancel)
            base_sha = ""
            if not dry_run:
                with engine_threads():
                    base_sha = _execute(plan, output, code, save_dtype, overwrite, stats, say,
                                        cancel, hasher)
            report = bake_report(plan, stats, output, save_dtype, base_sha, dry_run, time.perf_counter() - t0)
            say(1.0, "done")
            return report
        finally:
            plan.base.close()
            for st in plan.loras:
                st.source.close()
    finally:
        if hasher is not None:  # no thread may outlive the call (the interpreter could be exiting)
            hasher.stop.set()
            hasher.join(timeout=30)


def _execute(plan: Plan, output: str, save_code: str, save_dtype: str, overwrite: bool, stats: _Stats,
             say: Progress, cancel: threading.Event | None, hasher: Hasher) -> str:
    """Stream the output. Every thread started here is stopped and joined before returning."""
    base = plan.base
    keys = base.keys()
    entries = [OutEntry(k, out_code(base.dtype(k), save_code), base.shape(k)) for k in keys]
    t_start = time.perf_counter()
    busy = {"reads": 0.0, "compute": 0.0, "writer": 0.0}
    pool = Pool()
    total = sum(base.nbytes(k) for k in keys) or 1
    done = 0
    last = 0.0
    baker = _Baker(plan, save_code, pool, stats)
    touched = {k for k, e in zip(keys, entries) if k in plan.weights or k in plan.biases or e.dtype != base.dtype(k)}
    pre = _Prefetcher(baker, [k for k in keys if k in touched])
    wt: WriterThread | None = None
    try:
        pre.start()
        with StreamingWriter(output, entries, bake_metadata(plan, save_dtype, HASH_PLACEHOLDER),
                             overwrite=overwrite) as w:
            wt = WriterThread(w, pool)
            wt.start()
            for key in keys:
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Bake cancelled; nothing was written.")
                t_a = time.perf_counter()
                if key not in touched:
                    span = base.raw_span(key)
                    wt.put(("copy", key, span, None) if span is not None else ("data", key, base.read(key), None))
                    stats.copied += 1
                    busy["writer"] += time.perf_counter() - t_a
                else:
                    fetched = pre.get()
                    t_b = time.perf_counter()
                    if fetched.key != key:  # pragma: no cover - an ordering bug would corrupt the output
                        raise RuntimeError(f"prefetch order broken at {key}")
                    t, buf = baker.tensor(fetched)
                    t_c = time.perf_counter()
                    wt.put(("data", key, t, buf))
                    busy["reads"] += t_b - t_a
                    busy["compute"] += t_c - t_b
                    busy["writer"] += time.perf_counter() - t_c
                done += base.nbytes(key)
                span = base.raw_span(key)
                if span is not None and hasher.gate is not None:  # keep the hasher just ahead (read-ahead)
                    hasher.gate.advance(span[1] + span[2])
                now = time.perf_counter()
                if now - last > 0.25:
                    say(0.02 + 0.93 * done / total, f"baking {key}")
                    last = now
            t_loop = time.perf_counter()
            if hasher.gate is not None:
                hasher.gate.release()
            wt.finish()
            log.debug("bake: main loop %.2fs (waited %.2fs for reads, computed %.2fs, waited %.2fs for the writer), "
                      "writer drained %.2fs later", t_loop - t_start, busy["reads"], busy["compute"], busy["writer"],
                      time.perf_counter() - t_loop)
            say(0.96, "hashing the base checkpoint")
            hasher.join()
            if hasher.error is not None:
                raise hasher.error
            w.patch_metadata(bake_metadata(plan, save_dtype, hasher.digest))
            say(0.98, "syncing to disk")
            w.commit()
            log.debug("bake: done %.2fs after start; direct I/O: %s", time.perf_counter() - t_start, w.direct_io)
        return hasher.digest
    finally:
        hasher.stop.set()
        if hasher.gate is not None:
            hasher.gate.release()
        pre.stop.set()
        drain(pre.q)
        if pre.is_alive():
            pre.join(timeout=60)
        if wt is not None and wt.is_alive():
            wt.stop.set()
            drain(wt.q)
            wt.q.put(None)
            wt.join(timeout=60)

