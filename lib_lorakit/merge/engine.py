"""Merge N checkpoints: weighted, add-difference, TIES, DARE, slerp; per-block; VAE-safe; streaming.

The output is built key by key in the primary's order. Each key is either *merged*
(float32 maths, one rounding to the save dtype) or *copied* byte for byte from one
source, with the reason recorded:

- VAE: never averaged; copied from the chosen ingredient (default the primary) or a VAE file.
- text encoders: merged like the UNet, unless ``te_from`` names an ingredient to copy them from.
- keys only some inputs have (schedule buffers, v-pred flags, EMA, ...), keys outside the
  model's components, and integer tensors (``position_ids``): copied from the primary (or
  the first input that has them), listed in the report.

Different architectures are refused; different v-prediction settings or lineages warn.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import __version__
from ..blocks import format_weights, parse_block_weights
from ..errors import ArchitectureError, Cancelled, RecipeError, ValueProblem
from ..formats.arch import ARCHS, Arch, Family, block_of, component_of, detect_checkpoint
from ..formats.dtypes import DROP_METADATA, FLOAT_CODES, FP16_MAX, HASH_PLACEHOLDER, save_code
from ..formats.safetensors_io import DTYPES, OutEntry, StreamingWriter, check_output_path
from ..formats.sources import TensorSource, open_source
from ..hashcache import HashCache, file_key
from ..hashcache import resolve as resolve_cache
from ..streaming import (
    FedHasher,
    Pool,
    Profile,
    Token,
    WriterThread,
    drain,
    engine_threads,
    engine_workers,
    exact_float32,
    gc_frozen,
    max_rounding_error,
    peak_rss_mb,
    read_ahead_early,
    reader_count,
    reserved_cores,
    resolve_device,
)
from . import methods
from .diff import Diag, block_key, tabulate
from .registry import BASE_METHODS, METHODS, REGISTRY  # declared once, in registry.py

# The merge reads, merges and writes in chunks of this many float32 elements (4 MB). The bake's
# maths chunk (streaming.CHUNK_ELEMS, 1 MB) is smaller; here each chunk is also a read of every
# input, and smaller ones were not measured.
CHUNK_ELEMS = 1 << 20

VAE_PREFIX = "first_stage_model."

Progress = Callable[[float, str], None]


@dataclass
class ModelSpec:
    path: str
    weight: float = 1.0
    name: str | None = None
    source: TensorSource | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.name or os.path.splitext(os.path.basename(self.path))[0]


def parse_model_arg(text: str) -> ModelSpec:
    """``PATH[:WEIGHT]`` (the path may contain ':')."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            w = float(tail)
            if not math.isfinite(w):
                raise RecipeError(f"--model {text!r}: weight {tail} is not a finite number.")
            return ModelSpec(path=path, weight=w)
        except ValueError:
            pass
    return ModelSpec(path=text)


@dataclass
class Input:
    """One opened input file."""

    role: str  # "model 1".., "base", "vae"
    label: str
    path: str
    source: TensorSource
    family: Family | None = None
    sha256: str = ""


@dataclass
class Action:
    kind: str  # "merge" or "copy"
    src: int = 0  # index into MergePlan.inputs for copies
    reason: str = ""


@dataclass
class MergePlan:
    arch: Arch
    inputs: list[Input]
    models: list[int]  # input indices of the ingredients, in order (models[0] is the primary)
    base: int | None  # input index of C (add-difference, TIES, DARE)
    keys: list[str]
    actions: dict[str, Action]
    weights: list[float]  # effective weights (normalised for weighted merges)
    given_weights: list[float]
    block_weights: dict[str, float] | None
    vae_from: str
    te_from: int | None
    warnings: list[str]
    only_some: list[str]
    copied_other: list[str]


def _open(role: str, label: str, path: str, source: TensorSource | None) -> Input:
    src = source if source is not None else open_source(path)
    return Input(role=role, label=label, path=path, source=src)


def plan_merge(
    models: Sequence[ModelSpec],
    *,
    method: str = "weighted",
    base: str | TensorSource | None = None,
    blocks: str | None = None,
    vae_from: str | int | None = None,
    te_from: int | None = None,
    normalize: bool = True,
) -> MergePlan:
    """Open, check and decide every key. Nothing is written; no tensor value is read."""
    if method not in METHODS:
        raise RecipeError(f"Unknown merge method {method!r}.", fix=f"Use one of {', '.join(METHODS)}.")
    lo, hi = REGISTRY[method].models
    if len(models) < lo or (hi and len(models) > hi):
        want = f"exactly {lo}" if hi == lo else f"at least {lo}"
        raise RecipeError(
            f"The {method} merge takes {want} models, got {len(models)}.",
            fix="For add-difference give A then B (with its weight) and a base C.",
        )
    if REGISTRY[method].needs_base and base is None:
        raise RecipeError(f"The {method} merge needs a base model (the model the differences are taken from).")
    if not REGISTRY[method].needs_base and base is not None:
        raise RecipeError(f"A base model is only used by {', '.join(BASE_METHODS)}, not by {method}.")
    inputs: list[Input] = []
    try:
        for i, m in enumerate(models):
            inputs.append(_open(f"model {i + 1}", m.label, m.path, m.source))
        base_idx = None
        if base is not None:
            bsrc = base if isinstance(base, TensorSource) else None
            bpath = base.path if isinstance(base, TensorSource) else os.fspath(base)
            inputs.append(_open("base", os.path.splitext(os.path.basename(bpath))[0], bpath, bsrc))
            base_idx = len(inputs) - 1
        for inp in inputs:
            inp.family = detect_checkpoint(inp.source.shapes(), inp.source.metadata, inp.path)
        arch_id = inputs[0].family.arch
        for inp in inputs[1:]:
            if inp.family.arch != arch_id:
                raise ArchitectureError(
                    f"Cannot merge {inputs[0].path} ({inputs[0].family.label}) with {inp.path} ({inp.family.label}): "
                    f"different architectures.",
                    fix="Merge checkpoints of one family only (all SD1.5 or all SDXL).",
                )
        arch = ARCHS[arch_id]
        warnings = _family_warnings(inputs)

        given = [float(m.weight) for m in models]
        weights = list(given)
        if method == "weighted" and normalize:
            total = sum(given)
            if total == 0:
                raise RecipeError(
                    "The weights sum to 0; they cannot be normalised.",
                    fix="Give positive weights, or turn normalisation off.",
                )
            weights = [w / total for w in given]
        block_weights = parse_block_weights(blocks, arch.id) if blocks else None

        vae_label, vae_idx = _vae_source(vae_from, models, inputs)
        if te_from is not None and not 1 <= te_from <= len(models):
            raise RecipeError(
                f"Text encoders from model {te_from}: there are {len(models)} models (1 to {len(models)})."
            )
        te_idx = None if te_from is None else te_from - 1

        merge_inputs = list(range(len(models))) + ([base_idx] if base_idx is not None else [])
        keys, actions, only_some, other = _decide(arch, inputs, merge_inputs, vae_idx, te_idx)
        return MergePlan(
            arch=arch,
            inputs=inputs,
            models=list(range(len(models))),
            base=base_idx,
            keys=keys,
            actions=actions,
            weights=weights,
            given_weights=given,
            block_weights=block_weights,
            vae_from=vae_label,
            te_from=te_from,
            warnings=warnings,
            only_some=only_some,
            copied_other=other,
        )
    except BaseException:
        for inp in inputs:
            inp.source.close()
        raise


def _family_warnings(inputs: list[Input]) -> list[str]:
    out = []
    # a file without any v-prediction marker is taken to be epsilon-prediction
    vp = {inp.label: bool(inp.family.vpred) for inp in inputs}
    if len(set(vp.values())) > 1:
        out.append(
            "v-prediction differs: "
            + ", ".join(f"{k} {'v-pred' if v else 'eps (no v-pred marker)'}" for k, v in vp.items())
            + "; the merge needs one prediction setting and fits neither input fully."
        )
    lineages = {inp.label: {n for n, _ in inp.family.lineage} for inp in inputs if inp.family.lineage}
    flat = {n for v in lineages.values() for n in v}
    if len(flat) > 1:
        out.append(
            "lineages differ: "
            + ", ".join(f"{k} {'/'.join(sorted(v))}" for k, v in lineages.items())
            + " (from metadata and names); prompts and LoRAs of one may not suit the other."
        )
    return out


def _vae_source(vae_from, models, inputs: list[Input]) -> tuple[str, int]:
    if vae_from is None or vae_from == "" or vae_from == 1 or vae_from == "1":
        return f"{inputs[0].label} (model 1)", 0
    if isinstance(vae_from, int) or (isinstance(vae_from, str) and vae_from.isdigit()):
        n = int(vae_from)
        if not 1 <= n <= len(models):
            raise RecipeError(f"VAE from model {n}: there are {len(models)} models (1 to {len(models)}).")
        return f"{inputs[n - 1].label} (model {n})", n - 1
    path = os.fspath(vae_from)
    src = open_source(path)
    keys = src.keys()
    prefixed = any(k.startswith(VAE_PREFIX) for k in keys)
    if not prefixed:  # a bare VAE file (encoder.*, decoder.*, quant_conv.*): read it under the prefix
        if not any(k.startswith(("encoder.", "decoder.")) for k in keys):
            src.close()
            raise RecipeError(f"{path} is not a VAE (no encoder./decoder. or first_stage_model. keys).")
        src = _PrefixedSource(src, VAE_PREFIX)
    inputs.append(Input(role="vae", label=os.path.splitext(os.path.basename(path))[0], path=path, source=src))
    return f"{inputs[-1].label} (VAE file)", len(inputs) - 1


class _PrefixedSource(TensorSource):
    """A VAE file's keys seen under ``first_stage_model.``."""

    def __init__(self, inner: TensorSource, prefix: str):
        self.inner, self.prefix = inner, prefix
        self.path, self.metadata = inner.path, inner.metadata

    def keys(self):
        return [self.prefix + k for k in self.inner.keys()]

    def _k(self, key: str) -> str:
        return key[len(self.prefix) :]

    def shape(self, key):
        return self.inner.shape(self._k(key))

    def dtype(self, key):
        return self.inner.dtype(self._k(key))

    def nbytes(self, key):
        return self.inner.nbytes(self._k(key))

    def read(self, key, out=None):
        return self.inner.read(self._k(key), out)

    def raw_span(self, key):
        return self.inner.raw_span(self._k(key))

    def close(self):
        self.inner.close()


def _decide(arch: Arch, inputs: list[Input], merge_inputs: list[int], vae_idx: int, te_idx: int | None):
    keysets = [set(inp.source.keys()) for inp in inputs]
    primary = inputs[0].source
    keys = primary.keys()
    seen = set(keys)
    for i in merge_inputs[1:]:
        for k in inputs[i].source.keys():
            if k not in seen and component_of(k, arch) != "vae":
                seen.add(k)
                keys.append(k)
    vae = inputs[vae_idx].source
    for k in (k for k in keys if component_of(k, arch) == "vae"):
        if k not in keysets[vae_idx]:
            raise RecipeError(
                f"The VAE source {inputs[vae_idx].path} lacks the VAE tensor {k}.",
                fix="Use a complete VAE for this architecture.",
            )
        if tuple(vae.shape(k)) != tuple(primary.shape(k)):
            raise RecipeError(
                f"The VAE source {inputs[vae_idx].path} has {k} {list(vae.shape(k))}, the model "
                f"{list(primary.shape(k))}.",
                fix="Use a VAE for this architecture.",
            )
    actions: dict[str, Action] = {}
    only_some: list[str] = []
    other: list[str] = []
    for k in keys:
        comp = component_of(k, arch)
        have = [i for i in merge_inputs if k in keysets[i]]
        first = have[0]
        if comp == "vae":
            actions[k] = Action("copy", vae_idx, "vae")
        elif comp in ("te1", "te2") and te_idx is not None:
            actions[k] = Action("copy", te_idx if k in keysets[te_idx] else first, "text encoder source")
        elif comp not in ("unet", "te1", "te2"):
            actions[k] = Action("copy", first, "outside the model's components")
            other.append(k)
        elif inputs[first].source.dtype(k) not in FLOAT_CODES:
            actions[k] = Action("copy", first, "integer tensor")
        elif len(have) != len(merge_inputs):
            actions[k] = Action("copy", first, "missing from some inputs")
            only_some.append(k)
        else:
            shapes = {tuple(inputs[i].source.shape(k)) for i in have}
            if len(shapes) > 1:
                desc = ", ".join(f"{inputs[i].label} {list(inputs[i].source.shape(k))}" for i in have)
                raise RecipeError(
                    f"{k} has different shapes in the inputs ({desc}).",
                    fix="These checkpoints differ in structure (e.g. an inpainting model); merge "
                    "models of the same variant.",
                )
            actions[k] = Action("merge")
    return keys, actions, only_some, other


# --- execution ------------------------------------------------------------------------------------


def _coefficients(plan: MergePlan, method: str, key: str, normalize: bool) -> tuple[list[float], float]:
    """Effective weights for ``key`` (block factor folded in) and the factor for difference methods."""
    b = 1.0
    if plan.block_weights is not None:
        b = plan.block_weights.get(block_of(key, plan.arch) or "", 1.0)
    w = list(plan.weights)
    if method == "weighted":
        w = [w[0]] + [x * b for x in w[1:]]
        if normalize:
            w[0] = 1.0 - sum(w[1:])
    return w, b


class _Scratch:
    """Reusable buffers for one chunk per input."""

    def __init__(self, n_inputs: int):
        self.raw = [torch.empty(CHUNK_ELEMS * 4, dtype=torch.uint8) for _ in range(n_inputs)]
        self.f32 = [torch.empty(CHUNK_ELEMS) for _ in range(n_inputs)]
        self.out = torch.empty(CHUNK_ELEMS)
        self.err = torch.empty(CHUNK_ELEMS)


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for i, r0 in enumerate(range(0, rows, step)):
        yield i, r0, min(rows, r0 + step)


class _Chunk:
    """Rows r0:r1 of one key from every input, as stored, with the tokens that free the buffers."""

    def __init__(self, key: str, r0: int, r1: int, raws: list[torch.Tensor], tokens: list[Token], feeds=()):
        self.key, self.r0, self.r1, self.raws, self.tokens = key, r0, r1, raws, tokens
        self.feeds = list(feeds)  # (input index, file offset, bytes, release) for the hashers, in file order

    def release(self) -> None:
        for t in self.tokens:
            t.release()
        self.tokens = []


def _release_later(item) -> None:
    """Free the buffers of a queued chunk (or a chunk still being read) nobody will use."""
    if isinstance(item, _Chunk):
        item.release()
    elif isinstance(item, concurrent.futures.Future):
        item.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or f.result().release())


# Maths threads by default: measured on 16 cores (bench/merge_sdxl.py --workers, hashes cached), 8.9 s in
# the engine with 4, 10.4 s with 2, 11.9 s with 15; a merge has more maths per byte read than a bake.
MERGE_WORKERS_MAX = 4


class _Reader(threading.Thread):
    """Reads every merged key, chunk by chunk, ahead of the main thread, and hands each chunk's
    bytes to that file's hasher too, so no input is read twice.

    With ``threads`` > 1 the chunks are read by a small pool, several at once (one thread cannot
    copy from the page cache or a fast disk at the disk's rate); they are handed out, and fed to
    the hashers, in file order all the same.
    """

    def __init__(
        self,
        plan: MergePlan,
        keys: list[str],
        order: list[int],
        feeders: list[FedHasher | None],
        profile: Profile | None = None,
        depth: int = 4,
        threads: int = 1,
    ):
        super().__init__(name="lorakit-read", daemon=True)
        self.plan, self.keys, self.order, self.feeders = plan, keys, order, feeders
        self.profile = profile or Profile()
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.threads = threads
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _buffer(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        if nbytes > CHUNK_ELEMS * 4:
            return torch.empty(nbytes, dtype=torch.uint8), False
        with self._lock:
            if self._free:
                return self._free.pop(), True
        return torch.empty(CHUNK_ELEMS * 4, dtype=torch.uint8), True

    def _give_back(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def _read_chunk(self, key: str, r0: int, r1: int, cols: int) -> _Chunk:
        raws, tokens, feeds = [], [], []
        for i in self.order:
            src = self.plan.inputs[i].source
            item = DTYPES[src.dtype(key)][1]
            nbytes = (r1 - r0) * cols * item
            buf, pooled = self._buffer(nbytes)
            t = time.perf_counter()
            raws.append(src.read_rows(key, r0, r1, buf))
            self.profile.add("read", time.perf_counter() - t)
            span = src.raw_span(key)
            feed = span is not None and nbytes > 0 and self.feeders[i] is not None
            tok = Token(2 if feed else 1, (lambda b=buf: self._give_back(b)) if pooled else (lambda: None))
            if feed:
                feeds.append((i, span[1] + r0 * cols * item, buf.numpy()[:nbytes].data, tok.release))
            tokens.append(tok)
        return _Chunk(key, r0, r1, raws, tokens, feeds)

    def run(self) -> None:
        pool = (
            concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="lorakit-read")
            if self.threads > 1
            else None
        )
        try:
            primary = self.plan.inputs[0].source
            for key in self.keys:
                shape = tuple(primary.shape(key))
                rows = shape[0] if shape else 1
                cols = max(1, math.prod(shape) // max(rows, 1)) if math.prod(shape) else 0
                for ci, r0, r1 in _chunks(rows, cols):
                    item = (
                        pool.submit(self._read_chunk, key, r0, r1, cols)
                        if pool is not None
                        else self._read_chunk(key, r0, r1, cols)
                    )
                    while not self.stop.is_set():
                        try:
                            self.q.put(item, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if self.stop.is_set():
                        _release_later(item)
                        return
        except BaseException as e:  # handed to the main thread
            self.q.put(e)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def get(self, key: str, r0: int) -> _Chunk:
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, concurrent.futures.Future):
            item = item.result()
        if item.key != key or item.r0 != r0:  # pragma: no cover - would be an ordering bug
            raise RuntimeError(f"merge read order broken at {key} rows {r0}")
        for i, offset, data, release in item.feeds:  # in file order, whichever thread read them
            self.feeders[i].feed(offset, data, release)
        item.feeds = []
        return item


class _Merger:
    """Merges keys chunk by chunk; the chunks' maths runs on ``workers`` threads (inline for one)."""

    def __init__(
        self,
        plan: MergePlan,
        method: str,
        params: dict,
        stats: _Stats,
        reader: _Reader,
        workers: int = 1,
        device: torch.device | None = None,
        profile: Profile | None = None,
    ):
        self.plan, self.method, self.params, self.stats, self.reader = plan, method, params, stats, reader
        self.order = plan.models + ([plan.base] if plan.base is not None else [])
        self.device = device or torch.device("cpu")
        self.profile = profile or Profile()
        self.workers = workers
        self.pool = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lorakit-maths") if workers > 1 else None
        )
        self.outstanding: collections.deque = collections.deque()
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def scratch(self) -> _Scratch:
        sc = getattr(self._local, "scratch", None)
        if sc is None:
            sc = self._local.scratch = _Scratch(len(self.order))
        return sc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _read_raw(self, key: str, r0: int, r1: int) -> list[torch.Tensor]:
        """Rows r0:r1 of every input as stored, read now (first passes of TIES and slerp)."""
        big = (r1 - r0) * self.cols > CHUNK_ELEMS
        return [
            self.plan.inputs[i].source.read_rows(key, r0, r1, None if big else self.scratch.raw[j])
            for j, i in enumerate(self.order)
        ]

    def _f32(self, raws: list[torch.Tensor], shape) -> list[torch.Tensor]:
        n = math.prod(shape)
        return [
            (torch.empty(n) if n > CHUNK_ELEMS else self.scratch.f32[j][:n]).view(shape).copy_(raw)
            for j, raw in enumerate(raws)
        ]

    def _read(self, key: str, r0: int, r1: int, cols: int) -> list[torch.Tensor]:
        """Rows r0:r1 of every input, as float32 views of scratch buffers."""
        return self._f32(self._read_raw(key, r0, r1), (r1 - r0, cols))

    def _weighted(self, raws: list[torch.Tensor], w: list[float], res: torch.Tensor, where) -> None:
        """Σ w_i·x_i as a·Σw + Σ_{i>0} w_i·(x_i − a): the differences feed the diagnostics too.

        Inputs are used as stored and each is touched once (x_i − a promotes to float32).
        """
        n = res.numel()
        if res.device.type != "cpu":
            a = raws[0].float()
            d = torch.empty_like(a)
        else:
            sc = self.scratch
            a = (torch.empty(n) if n > CHUNK_ELEMS else sc.f32[0][:n]).view(res.shape).copy_(raws[0])
            d = (torch.empty(n) if n > CHUNK_ELEMS else sc.err[:n]).view(res.shape)
        fa = a.reshape(-1)
        a2 = float(torch.dot(fa, fa))
        torch.mul(a, sum(w), out=res)
        for k in range(1, len(raws)):
            torch.sub(raws[k], a, out=d)
            fd = d.reshape(-1)
            sums = (a2, float(torch.dot(fd, fd)), float(torch.dot(fa, fd)))
            with self._lock:
                self.stats.diag.setdefault(k, {}).setdefault(where, Diag()).add_sums(*sums)
            res.add_(d, alpha=w[k])

    def tensor(self, key: str, shape: tuple[int, ...], out: torch.Tensor):
        """Start merging ``key`` into ``out`` (save dtype, shape (rows, cols)), chunk by chunk.

        Returns a callable that waits for the key's chunks and checks the result; ``out`` is
        complete once it returns.
        """
        plan, p, m = self.plan, self.params, self.method
        self.rows = shape[0] if shape else 1
        cols = self.cols = out.shape[1]
        w, b = _coefficients(plan, m, key, p["normalize"])
        extra = None
        spec = REGISTRY[m]
        if spec.prepass == "ties":
            extra = self._ties_thresholds(key, cols, p["density"])
        elif spec.prepass == "slerp":
            extra = methods.SlerpStats()
            for _, r0, r1 in _chunks(self.rows, cols):
                a, bb = self._read(key, r0, r1, cols)[:2]
                extra.add(a, bb)
        where = block_key(key, plan.arch)
        futs = []
        for ci, r0, r1 in _chunks(self.rows, cols):
            t = time.perf_counter()
            chunk = self.reader.get(key, r0)
            self.profile.add("wait read", time.perf_counter() - t)
            args = (key, ci, r0, r1, cols, chunk, w, b, extra, where, out)
            if self.pool is None:
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_result(self._chunk(*args))
            else:
                fut = self.pool.submit(self._chunk, *args)
                self.outstanding.append(fut)
                while self.outstanding and (self.outstanding[0].done() or len(self.outstanding) > self.workers + 2):
                    t = time.perf_counter()
                    self.outstanding.popleft().result()  # bounded memory; raises a chunk's error early
                    self.profile.add("wait maths", time.perf_counter() - t)
            futs.append(fut)

        def finish() -> None:
            amax = max((f.result() for f in futs), default=0.0)
            if out.dtype == torch.float16 and amax > FP16_MAX:
                raise ValueProblem(
                    f"{key}: a merged weight reaches {amax:.6g}, beyond the float16 range (65504).",
                    fix="Choose the save dtype bf16 or fp32.",
                )
            with self._lock:
                if amax > self.stats.max_abs[0]:
                    self.stats.max_abs = (amax, key)

        finish.futures = futs
        return finish

    def _chunk(
        self, key: str, ci: int, r0: int, r1: int, cols: int, chunk: _Chunk, w, b, extra, where, out: torch.Tensor
    ) -> float:
        """Merge rows r0:r1 of ``key`` into ``out`` (runs on a maths thread). Returns max |result|."""
        plan, p, m = self.plan, self.params, self.method
        n_models = len(plan.models)
        n = (r1 - r0) * cols
        dev = self.device
        clock = time.perf_counter
        t0 = clock()
        try:
            if dev.type != "cpu":
                raws = [r.to(dev) for r in chunk.raws]
                res = torch.empty((r1 - r0, cols), device=dev)
            else:
                raws = chunk.raws
                res = (torch.empty(n) if n > CHUNK_ELEMS else self.scratch.out[:n]).view(r1 - r0, cols)
            spec = REGISTRY[m]
            if spec.apply is None:  # the weighted sum, with its diagnostics fused in
                t1 = clock()
                self._weighted(raws, w, res, where)
                t2 = clock()
                amax = self._round(key, res, out[r0:r1])
                self.profile.add("convert", t1 - t0)
                self.profile.add("add", t2 - t1)
                self.profile.add("round", clock() - t2)
                return amax
            xs = [r.float() for r in raws] if dev.type != "cpu" else self._f32(raws, (r1 - r0, cols))
        finally:
            chunk.release()
        t1 = clock()
        ing, base = xs[:n_models], (xs[n_models] if plan.base is not None else None)
        spec.apply(ing, base, w, b, p, extra, key, ci, res)
        if n_models > 1:
            flat = ing[0].reshape(-1)
            a2 = float(torch.dot(flat, flat))
            for k in range(1, n_models):
                scratch = self.scratch.err if (n <= CHUNK_ELEMS and dev.type == "cpu") else None
                part = Diag()
                part.add(ing[0], ing[k], a2, scratch)
                with self._lock:
                    self.stats.diag.setdefault(k, {}).setdefault(where, Diag()).merge(part)
        t2 = clock()
        amax = self._round(key, res, out[r0:r1])
        self.profile.add("convert", t1 - t0)
        self.profile.add("add", t2 - t1)
        self.profile.add("round", clock() - t2)
        return amax

    def _ties_thresholds(self, key: str, cols: int, density: float) -> list[float]:
        """Per model, the magnitude of its top ``density`` fraction of |θ_i − θ_C| over the whole tensor."""
        if density >= 1.0:
            return [0.0] * len(self.plan.models)
        numel = self.rows * cols
        buf = np.empty(numel, dtype=np.float32)
        out = []
        n_models = len(self.plan.models)
        for i in range(n_models):
            pos = 0
            for _, r0, r1 in _chunks(self.rows, cols):
                xs = self._read(key, r0, r1, cols)
                d = (xs[i] - xs[n_models]).abs_().reshape(-1)
                buf[pos : pos + d.numel()] = d.numpy()
                pos += d.numel()
            out.append(methods.ties_threshold(buf, density))
        return out

    def _round(self, key: str, res: torch.Tensor, out: torch.Tensor) -> float:
        """Round ``res`` (float32, any device) once into ``out`` (host, save dtype). Returns max |res|."""
        if res.numel() == 0:
            return 0.0
        lo, hi = torch.aminmax(res)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueProblem(
                f"{key}: the merge gives NaN/inf values (an input may hold NaN/inf there).",
                fix="Check the inputs; a damaged checkpoint cannot be merged.",
            )
        r = 0.0
        # the rounding loss is measured only where it could beat the largest found so far (the report stays exact)
        could = out.dtype != torch.float32 and max_rounding_error(max(-lo, hi), out.dtype) >= self.stats.max_round[0]
        if res.device.type != "cpu":
            od = res.to(out.dtype)
            if could:
                elo, ehi = torch.aminmax(od.float().sub_(res))
                r = max(-float(elo), float(ehi))
            out.copy_(od)
        else:
            out.copy_(res)
            if could:
                sc = self.scratch
                err = sc.err[: res.numel()].view(res.shape) if res.numel() <= CHUNK_ELEMS else torch.empty_like(res)
                torch.sub(out, res, out=err)
                elo, ehi = torch.aminmax(err)
                r = max(-float(elo), float(ehi))
        if r:
            with self._lock:
                if r > self.stats.max_round[0] or (r == self.stats.max_round[0] and key < self.stats.max_round[1]):
                    self.stats.max_round = (r, key)
        return max(-lo, hi)


def _metadata(plan: MergePlan, method: str, params: dict, save_dtype: str, hashes: list[str]) -> dict[str, str]:
    meta = {k: v for k, v in plan.inputs[0].source.metadata.items() if k not in DROP_METADATA}
    recipe = {
        "operation": "merge",
        "method": method,
        "models": [
            {
                "name": plan.inputs[i].label,
                "file": os.path.basename(plan.inputs[i].path),
                "sha256": hashes[i],
                "weight": plan.given_weights[n],
            }
            for n, i in enumerate(plan.models)
        ],
        "effective_weights": plan.weights,
        "base": None
        if plan.base is None
        else {
            "name": plan.inputs[plan.base].label,
            "file": os.path.basename(plan.inputs[plan.base].path),
            "sha256": hashes[plan.base],
        },
        "blocks": format_weights(plan.block_weights, plan.arch.id) if plan.block_weights else None,
        "vae_from": plan.vae_from,
        "te_from": plan.te_from,
        "params": params,
        "save_dtype": save_dtype,
    }
    vae = [inp for inp in plan.inputs if inp.role == "vae"]
    if vae:
        recipe["vae_file"] = {"file": os.path.basename(vae[0].path), "sha256": hashes[plan.inputs.index(vae[0])]}
    meta["lorakit.version"] = __version__
    meta["lorakit.recipe"] = json.dumps(recipe, separators=(",", ":"))
    return meta


def merge(
    models: Sequence[ModelSpec],
    output: str,
    *,
    method: str = "weighted",
    base: str | TensorSource | None = None,
    blocks: str | None = None,
    vae_from: str | int | None = None,
    te_from: int | None = None,
    normalize: bool = True,
    density: float = 0.2,
    drop: float = 0.5,
    seed: int = 0,
    scale: float = 1.0,
    save_dtype: str = "fp16",
    overwrite: bool = False,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    device: str | None = "auto",
    workers: int | None = None,
    reserve_cores: int | None = None,
    hash_cache: HashCache | str | bool | None = None,
) -> dict:
    """Merge ``models`` into ``output`` (safetensors) and return the report.

    ``device``, ``workers``, ``reserve_cores`` and ``hash_cache`` work as in :func:`lib_lorakit.bake.bake`.

    Raises:
        LorakitError: bad input (exit code 2); no output is left behind.
    """
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    early = [m.path for m in models] + ([base] if isinstance(base, str) else [])
    read_ahead_early([(p, 256 << 20) for p in early])  # while torch loads
    code = save_code(save_dtype)
    dev = resolve_device(device)
    t_prepared = time.perf_counter()  # torch is loaded lazily, here on a cold command line
    reserve = reserved_cores(reserve_cores)
    n_workers = max(1, int(workers)) if workers else engine_workers(reserve, most=MERGE_WORKERS_MAX)
    if dev.type == "cuda":
        n_workers = min(n_workers, 4)
    if not str(output).lower().endswith(".safetensors"):
        raise RecipeError(f"The output {output} must end in .safetensors.")
    if not 0.0 < density <= 1.0:
        raise RecipeError(f"--density {density} must be in (0, 1].")
    if not 0.0 <= drop < 1.0:
        raise RecipeError(f"--drop {drop} must be in [0, 1).")
    paths = [m.path for m in models] + ([base.path if isinstance(base, TensorSource) else base] if base else [])
    check_output_path(output, overwrite=overwrite, inputs=[p for p in paths if p])
    say(0.0, "checking inputs")
    plan = plan_merge(
        models, method=method, base=base, blocks=blocks, vae_from=vae_from, te_from=te_from, normalize=normalize
    )
    params = {"density": density, "drop": drop, "seed": seed, "scale": scale, "normalize": normalize}
    # --- pre-flight (lib_lorakit/preflight.py): broken CLIP position_ids are written as the integer arange ---
    from ..preflight import position_ids_repairs, repair_message

    for k, why in position_ids_repairs([(i.label, i.source) for i in plan.inputs], plan.keys).items():
        plan.actions[k] = Action("repair", 0, "position_ids repaired")
        plan.warnings.append(repair_message(k, why))
    cache = resolve_cache(hash_cache)
    profile = Profile()
    profile.add("prepare", t_prepared - t0)
    known = [cache.get(inp.path) if cache is not None else None for inp in plan.inputs]
    stamps = [None if k is not None else file_key(inp.path) for k, inp in zip(known, plan.inputs)]
    hashers: list[FedHasher | None] = [
        None if k is not None else FedHasher(inp.path, profile=profile) for k, inp in zip(known, plan.inputs)
    ]
    for h in hashers:
        if h is not None:
            h.start()
    try:
        threads = engine_threads(n_workers, hashers=sum(h is not None for h in hashers), reserve=reserve)
        with threads, exact_float32(dev), gc_frozen():
            stats = _execute(
                plan,
                output,
                method,
                params,
                code,
                save_dtype,
                overwrite,
                hashers,
                say,
                cancel,
                [k[0] if k else "" for k in known],
                dev,
                n_workers,
                profile,
            )
        sources = []
        for inp, h, k, stamp in zip(plan.inputs, hashers, known, stamps):
            if h is None:
                inp.sha256 = k[0]
                sources.append(k[1])
            else:
                inp.sha256 = h.digest
                sources.append("computed")
                if cache is not None and stamp is not None:
                    cache.put(inp.path, h.digest, stamp[1])
        report = _report(plan, method, params, stats, output, save_dtype, time.perf_counter() - t0)
        for entry, src in zip(report["inputs"], sources):
            entry["sha256_source"] = src
        report["engine"] = {"device": str(dev), "workers": n_workers, **profile.as_dict()}
        say(1.0, "done")
        return report
    finally:
        for h in hashers:
            if h is not None:
                h.stop.set()
                h.join(timeout=30)
        for inp in plan.inputs:
            inp.source.close()


@dataclass
class _Stats:
    merged: int = 0
    copied: dict[str, int] = field(default_factory=dict)
    max_round: tuple[float, str] = (0.0, "")
    max_abs: tuple[float, str] = (0.0, "")
    diag: dict[int, dict[tuple[str, str], Diag]] = field(default_factory=dict)


def _execute(
    plan: MergePlan,
    output: str,
    method: str,
    params: dict,
    save_code: str,
    save_dtype: str,
    overwrite: bool,
    hashers: list[FedHasher | None],
    say: Progress,
    cancel: threading.Event | None,
    known: list[str],
    device: torch.device,
    n_workers: int,
    profile: Profile,
) -> _Stats:
    """Stream the output; merged keys' chunks are computed on ``n_workers`` threads, written in file order."""
    stats = _Stats()
    entries = []
    for k in plan.keys:
        a = plan.actions[k]
        src = plan.inputs[a.src if a.kind == "copy" else 0].source
        code = src.dtype(k)
        entries.append(
            OutEntry(k, save_code if a.kind == "merge" else "I64" if a.kind == "repair" else code, tuple(src.shape(k)))
        )
    total = sum(e.nbytes for e in entries) or 1
    done = 0
    last = 0.0
    pool = Pool()
    order = plan.models + ([plan.base] if plan.base is not None else [])
    reader = _Reader(
        plan,
        [k for k in plan.keys if plan.actions[k].kind == "merge"],
        order,
        hashers,
        profile,
        depth=min(4 + 2 * reader_count(), 8),
        threads=reader_count(),
    )
    merger = _Merger(plan, method, params, stats, reader, n_workers, device, profile)
    wt: WriterThread | None = None
    pending: collections.deque = collections.deque()  # ("item", writer item) | ("key", name, finish, out, buf)
    clock = time.perf_counter

    def to_writer(block: bool) -> None:
        while pending:
            head = pending[0]
            if head[0] == "key":
                if not (block or len(pending) > 4 * n_workers or all(f.done() for f in head[2].futures)):
                    return
                t = clock()
                head[2]()
                profile.add("wait maths", clock() - t)
                item = ("data", head[1], head[3], head[4])
            else:
                item = head[1]
            t = clock()
            wt.put(item)
            profile.add("wait writer", clock() - t)
            pending.popleft()

    try:
        reader.start()
        with StreamingWriter(
            output,
            entries,
            _metadata(plan, method, params, save_dtype, [HASH_PLACEHOLDER] * len(plan.inputs)),
            overwrite=overwrite,
        ) as w:
            wt = WriterThread(w, pool, profile=profile)
            wt.start()
            for k, e in zip(plan.keys, entries):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("Merge cancelled; nothing was written.")
                a = plan.actions[k]
                if a.kind == "repair":  # pre-flight: the integer arange, not the inputs' broken copy
                    from ..formats.position_ids import repaired_position_ids

                    # queued behind the tensors still being merged: the writer takes them in file order
                    pending.append(("item", ("data", k, repaired_position_ids(torch.empty(e.shape)), None)))
                    stats.copied[a.reason] = stats.copied.get(a.reason, 0) + 1
                elif a.kind == "copy":
                    src = plan.inputs[a.src].source
                    span = src.raw_span(k)
                    pending.append(
                        ("item", ("copy", k, span, None) if span is not None else ("data", k, src.read(k), None))
                    )
                    stats.copied[a.reason] = stats.copied.get(a.reason, 0) + 1
                else:
                    buf = pool.get(e.nbytes)
                    rows = e.shape[0] if e.shape else 1
                    out = buf[: e.nbytes].view(DTYPES[save_code][0]).reshape(rows, -1)
                    finish = merger.tensor(k, e.shape, out)
                    pending.append(("key", k, finish, out.reshape(e.shape), buf))
                    stats.merged += 1
                to_writer(False)
                done += e.nbytes
                now = clock()
                if now - last > 0.25:
                    say(0.02 + 0.93 * done / total, f"merging {k}")
                    last = now
            to_writer(True)
            t = clock()
            wt.finish()
            profile.add("wait writer", clock() - t)
            say(0.96, "hashing the inputs")
            t = clock()
            for h in hashers:
                if h is not None:
                    h.finish()
            for h in hashers:
                if h is not None:
                    h.join()
                    if h.error is not None:
                        raise h.error
            profile.add("wait hash", clock() - t)
            w.patch_metadata(
                _metadata(
                    plan,
                    method,
                    params,
                    save_dtype,
                    [h.digest if h is not None else sha for h, sha in zip(hashers, known)],
                )
            )
            say(0.98, "syncing to disk")
            t = clock()
            w.commit()
            profile.add("sync", clock() - t)
        return stats
    finally:
        reader.stop.set()
        merger.close()
        while reader.is_alive():  # unblock and stop the reader, releasing what it queued
            try:
                _release_later(reader.q.get(timeout=0.1))
            except queue.Empty:
                pass
        drain(reader.q)
        for h in hashers:
            if h is None:
                continue
            h.stop.set()
            if h.is_alive():
                try:
                    h.q.put_nowait(None)
                except queue.Full:
                    pass
        if wt is not None and wt.is_alive():
            wt.stop.set()
            drain(wt.q)
            wt.q.put(None)
            wt.join(timeout=60)


def _report(
    plan: MergePlan, method: str, params: dict, stats: _Stats, output: str, save_dtype: str, wall: float
) -> dict:
    arch = plan.arch
    diagnostics = [
        {
            "ingredient": plan.inputs[plan.models[n]].label,
            "against": plan.inputs[0].label,
            **tabulate(stats.diag.get(n, {}), arch),
        }
        for n in range(1, len(plan.models))
    ]
    return {
        "lorakit_version": __version__,
        "operation": "merge",
        "method": method,
        "params": params,
        "arch": arch.id,
        "inputs": [
            {
                "role": inp.role,
                "name": inp.label,
                "path": inp.path,
                "sha256": inp.sha256,
                "family": inp.family.as_dict() if inp.family else None,
            }
            for inp in plan.inputs
        ],
        "weights": {
            "given": plan.given_weights,
            "effective": plan.weights,
            "normalised": method == "weighted" and params["normalize"],
        },
        "blocks": format_weights(plan.block_weights, arch.id) if plan.block_weights else None,
        "vae_from": plan.vae_from,
        "te_from": plan.te_from,
        "output": {"path": os.path.abspath(output), "save_dtype": save_dtype},
        "tensors": {"merged": stats.merged, "copied": stats.copied},
        "only_in_some_inputs": plan.only_some,
        "copied_outside_components": plan.copied_other,
        "diagnostics": diagnostics,
        "rounding": {
            "save_dtype": save_dtype,
            "max_abs_rounding_loss": stats.max_round[0],
            "key": stats.max_round[1] or None,
            "max_abs_weight": stats.max_abs[0],
        },
        "warnings": plan.warnings,
        "wall_s": round(wall, 3),
        "peak_rss_mb": None if (rss := peak_rss_mb()) is None else round(rss, 1),
    }


def summary(report: dict) -> str:
    lines = [f"Merged {report['output']['path']} — {report['method']}, {ARCHS[report['arch']].label}"]
    w = report["weights"]
    for inp, eff in zip([i for i in report["inputs"] if i["role"].startswith("model")], w["effective"]):
        lines.append(f"  {inp['role']}: {inp['name']} weight {eff:.4g}")
    for inp in report["inputs"]:
        if inp["role"] in ("base", "vae"):
            lines.append(f"  {inp['role']}: {inp['name']}")
    lines.append(
        f"  VAE copied from {report['vae_from']}"
        + (f"; text encoders from model {report['te_from']}" if report["te_from"] else "")
    )
    t = report["tensors"]
    copied = ", ".join(f"{n} {r}" for r, n in t["copied"].items())
    lines.append(f"  tensors: {t['merged']} merged; copied: {copied or 'none'}")
    for d in report["diagnostics"]:
        top = sorted(
            ((c, b, v["rel_change"]) for c, bs in d["by_block"].items() for b, v in bs.items() if c == "unet"),
            key=lambda x: -x[2],
        )[:4]
        lines.append(
            f"  {d['ingredient']} vs {d['against']}: "
            + ", ".join(f"{c} {v['rel_change']:.3g}" for c, v in d["by_component"].items())
            + ("; most different blocks " + ", ".join(f"{b} {v:.3g}" for _, b, v in top) if top else "")
        )
    r = report["rounding"]
    lines.append(f"  saved as {r['save_dtype']}: max rounding loss {r['max_abs_rounding_loss']:.3g}")
    for wmsg in report["warnings"]:
        lines.append(f"  warning: {wmsg}")
    mem = f", peak memory {report['peak_rss_mb']:.0f} MB" if report.get("peak_rss_mb") else ""
    lines.append(f"  {report['wall_s']:.2f} s{mem}")
    return "\n".join(lines)
