"""Bake a LoRA recipe into a checkpoint: exact, streaming, loud on mismatch.

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

import json
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import __version__
from .blocks import format_weights, parse_block_weights
from .errors import ArchitectureError, Cancelled, FormatError, LorakitError, MatchError, RecipeError, ValueProblem
from .formats.arch import ARCHS, Arch, Family, detect_checkpoint, detect_lora
from .formats.safetensors_io import DTYPES, OutEntry, StreamingWriter, check_output_path
from .formats.sources import TensorSource, open_source, sha256_file
from .networks import ShapeProblem, algorithm_name, check_group, compute_delta, identify, needs_weight
from .networks.base import Algorithm, Delta
from .networks.resolve import ParsedKeys, Target, TargetIndex, explain_unknown, parse_keys
from .streaming import Hasher, Pool, ReadGate, WriterThread, drain, engine_threads, peak_rss_mb

SAVE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
FP16_MAX = 65504.0
DROP_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")
CHUNK_ELEMS = 1 << 20  # rows are processed in chunks of ~4 MB of float32, which stay in cache
_HASH_PLACEHOLDER = "0" * 64
_BIAS_PARAMS = {"full": "diff_b", "norm": "b_norm"}

Progress = Callable[[float, str], None]
log = logging.getLogger("lorakit.bake")


@dataclass
class LoraSpec:
    """One entry of a recipe: a LoRA file at a strength.

    Attributes:
        te_strength: strength for text-encoder modules; None means ``strength``.
        blocks: a LoRA Block Weight preset or vector (see :mod:`lib_lorakit.blocks`).
    """

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: str | None = None
    name: str | None = None
    source: TensorSource | None = field(default=None, repr=False, compare=False)  # pre-opened (tests, API)
    family: Family | None = field(default=None, repr=False, compare=False)  # already detected (inspector)

    @property
    def label(self) -> str:
        return self.name or os.path.splitext(os.path.basename(self.path))[0]


@dataclass
class Contribution:
    lora: int
    module: str
    alg: type[Algorithm]
    params: dict[str, str]  # internal parameter -> key in the LoRA file
    target: Target
    multiplier: float

    @property
    def needs_weight(self) -> bool:
        return needs_weight(self.alg, self.params)


@dataclass
class LoraState:
    spec: LoraSpec
    source: TensorSource
    family: Family
    parsed: ParsedKeys
    weights: dict[str, float]  # block -> weight
    sha256: str = ""
    algorithms: Counter = field(default_factory=Counter)
    matched: Counter = field(default_factory=Counter)  # component -> modules
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)
    ranks: list[int] = field(default_factory=list)
    block_change: dict[str, float] = field(default_factory=dict)
    zeroed_blocks: Counter = field(default_factory=Counter)


@dataclass
class Plan:
    base: TensorSource
    arch: Arch
    family: Family
    loras: list[LoraState]
    weights: dict[str, list[Contribution]]
    biases: dict[str, list[tuple[Contribution, str]]]
    warnings: list[str]


# --- recipe parsing (CLI and API share it) -----------------------------------------------------


def parse_lora_arg(text: str) -> LoraSpec:
    """Parse ``PATH[:STRENGTH[:TE_STRENGTH]]`` (the path itself may contain ':')."""
    parts = text.rsplit(":", 2)
    nums: list[float] = []
    while len(parts) > 1:
        try:
            nums.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise RecipeError(f"--lora {text!r} has no path.", fix="Write --lora PATH[:STRENGTH[:TE_STRENGTH]].")
    spec = LoraSpec(path=path)
    if nums:
        spec.strength = nums[0]
    if len(nums) > 1:
        spec.te_strength = nums[1]
    for v in (spec.strength, spec.te_strength):
        if v is not None and not math.isfinite(v):
            raise RecipeError(f"--lora {text!r}: strength {v} is not a finite number.")
    return spec


# --- planning ---------------------------------------------------------------------------------


def _open_lora(spec: LoraSpec, arch: Arch, base_path: str) -> tuple[TensorSource, Family, ParsedKeys]:
    src = spec.source if spec.source is not None else open_source(spec.path)
    try:
        shapes = src.shapes()
        fam = spec.family if spec.family is not None else detect_lora(shapes, src.metadata, spec.path)
        if fam.arch == "sd2":
            raise ArchitectureError(f"{spec.path} is a LoRA for SD2.x ({'; '.join(fam.evidence)}).",
                                    fix="lorakit bakes into SD1.5 and SDXL checkpoints only.")
        if fam.arch is not None and fam.arch != arch.id:
            la = ARCHS[fam.arch].label
            raise ArchitectureError(
                f"{spec.path} is a LoRA for {la} ({'; '.join(fam.evidence)}), but the checkpoint {base_path} is {arch.label}.",
                fix=f"Bake it into an {la} checkpoint, or pick a LoRA made for {arch.label}.")
        parsed = parse_keys(shapes)
        check_scalars(spec.path, shapes)
    except BaseException:
        src.close()
        raise
    return src, fam, parsed


def check_scalars(path: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse an ``alpha``/``scale`` that is not one number (a damaged or hand-edited file): only its first value
    would be used."""
    bad = [(k, list(v)) for k, v in shapes.items() if k.rsplit(".", 1)[-1] in ("alpha", "scale") and math.prod(v) != 1]
    if bad:
        k, shape = bad[0]
        raise FormatError(f"{path}: {k} has shape {shape}; an alpha or scale is one number"
                          + (f" ({len(bad)} such tensors)" if len(bad) > 1 else "") + ".",
                          fix="The file is damaged or was edited by hand: re-export the LoRA.")


def _likely_cause(unmatched: list[tuple[str, str]], total: int) -> str:
    reasons = Counter(r.split(":")[0] for _, r in unmatched)
    top = reasons.most_common(1)[0][0] if reasons else ""
    if top.startswith("unknown algorithm"):
        return "these layers use a network type lorakit does not know (see the key names)."
    if top.startswith("shape"):
        return "the layers exist but have other sizes: the LoRA was trained for another model variant."
    if top.startswith("unrecognised"):
        return "the key names follow a scheme lorakit does not recognise."
    if len(unmatched) == total:
        return "none of the LoRA's layer names exist in this checkpoint: it was made for another architecture or model."
    return "some layer names do not exist in this checkpoint (another model variant, or a damaged file)."


def plan_bake(base: str | TensorSource, specs: Sequence[LoraSpec], *, allow_unmatched: bool = False,
              index: TargetIndex | None = None, base_family: Family | None = None) -> Plan:
    """Open and validate everything, and decide where every LoRA module goes.

    Nothing is written and no tensor value is read: shapes come from the headers.
    Raises the error a user should see (exit code 2) on any problem.
    ``index`` and ``base_family`` reuse what an earlier call found for the same ``base`` (the
    inspector matches many LoRAs against one layout).
    """
    if not specs:
        raise RecipeError("The recipe has no LoRA.", fix="Add at least one LoRA to the recipe.")
    base = open_source(base) if isinstance(base, (str, os.PathLike)) else base
    base_path = base.path
    loras: list[LoraState] = []
    try:
        shapes = base.shapes()
        fam = base_family if base_family is not None else detect_checkpoint(shapes, base.metadata, base_path)
        arch = ARCHS[fam.arch]
        index = index if index is not None and index.arch is arch else TargetIndex(shapes, arch)
        weights: dict[str, list[Contribution]] = {}
        biases: dict[str, list[tuple[Contribution, str]]] = {}
        warnings: list[str] = []
        for li, spec in enumerate(specs):
            src, lfam, parsed = _open_lora(spec, arch, base_path)
            implicit: set[str] = set()
            bw = parse_block_weights(spec.blocks, arch.id, implicit) if spec.blocks else dict.fromkeys(arch.blocks, 1.0)
            st = LoraState(spec=spec, source=src, family=lfam, parsed=parsed, weights=bw)
            loras.append(st)
            lshapes = src.shapes()
            for key in parsed.unknown:
                st.unmatched.append((key, explain_unknown(key)))
            for module, params in parsed.modules.items():
                names = frozenset(params)
                alg, extra = identify(names)
                if alg is None:
                    st.unmatched.append((module, f"unknown algorithm: parameters {', '.join(sorted(names))}"))
                    continue
                if extra:
                    st.unmatched.append((module, f"unknown algorithm: {alg.id} does not use {', '.join(extra)}"))
                    continue
                target, problem = index.find(module)
                if target is None:
                    st.unmatched.append((module, problem))
                    continue
                pshapes = {p: tuple(lshapes[k]) for p, k in params.items()}
                try:
                    check_group(alg, pshapes, target.shape)
                except ShapeProblem as e:
                    st.unmatched.append((module, f"shape mismatch with {target.label} {list(target.shape)}: {e}"))
                    continue
                comp_strength = spec.strength if target.component == "unet" else (
                    spec.te_strength if spec.te_strength is not None else spec.strength)
                bweight = bw.get(target.block, 1.0) if target.block else 1.0
                c = Contribution(lora=li, module=module, alg=alg, params=dict(params), target=target,
                                 multiplier=comp_strength * bweight)
                st.matched[target.component] += 1
                st.algorithms[algorithm_name(alg, params)] += 1
                r = alg.rank(pshapes)
                if r:
                    st.ranks.append(r)
                if target.block in implicit:
                    st.zeroed_blocks[target.block] += 1
                if c.multiplier == 0.0:
                    continue
                weights.setdefault(target.weight_key, []).append(c)
                bp = _BIAS_PARAMS.get(alg.id)
                if bp and bp in params:
                    if target.bias_key is None:
                        st.unmatched.append((module, f"has {bp} but {target.label} has no bias"))
                        continue
                    biases.setdefault(target.bias_key, []).append((c, bp))
            total = len(parsed.modules) + len(parsed.unknown)
            if total == 0 and not parsed.embeddings:
                raise MatchError(f"{spec.path} contains no LoRA layers ({len(lshapes)} tensors, none recognised).",
                                 fix="Check that the file is a LoRA/LyCORIS file.")
            if st.unmatched and not allow_unmatched:
                shown = "\n".join(f"  {m}: {r}" for m, r in st.unmatched[:8])
                more = f"\n  ... and {len(st.unmatched) - 8} more" if len(st.unmatched) > 8 else ""
                raise MatchError(
                    f"{len(st.unmatched)} of {total} LoRA layers in {spec.path} match nothing in "
                    f"{base_path} ({arch.label}):\n{shown}{more}\n"
                    f"Likely cause: {_likely_cause(st.unmatched, total)}",
                    fix="Use a LoRA made for this checkpoint, or turn on the allow-unmatched option to bake the rest "
                        "and list these in the report.")
            if st.unmatched:
                warnings.append(f"{spec.label}: {len(st.unmatched)} layer(s) matched nothing and were left out "
                                f"(allow-unmatched); see the report.")
            if parsed.embeddings:
                warnings.append(f"{spec.label}: bundled embedding(s) {', '.join(sorted(parsed.embeddings))} cannot be "
                                f"baked into weights; keep using them as textual inversions at generation time.")
            if st.zeroed_blocks:
                blocks = ", ".join(f"{b} ({n})" for b, n in sorted(st.zeroed_blocks.items()))
                warnings.append(f"{spec.label}: the block weights {spec.blocks!r} do not list {blocks}; those "
                                f"layers get weight 0, as in LoRA Block Weight (give a full-length vector to keep them).")
            warnings.extend(_family_warnings(spec, lfam, fam))
        return Plan(base=base, arch=arch, family=fam, loras=loras, weights=weights, biases=biases, warnings=warnings)
    except BaseException:
        base.close()
        for st in loras:
            st.source.close()
        raise


def _family_warnings(spec: LoraSpec, lfam: Family, base: Family) -> list[str]:
    out = []
    ll = {n for n, _ in lfam.lineage}
    bl = {n for n, _ in base.lineage}
    if ll and bl and not (ll & bl):
        out.append(f"{spec.label}: trained on {'/'.join(sorted(ll))} ({lfam.lineage[0][1]}) but the checkpoint looks "
                   f"{'/'.join(sorted(bl))} ({base.lineage[0][1]}); cross-lineage LoRAs often need lower strength.")
    if lfam.vpred is not None and base.vpred is not None and lfam.vpred != base.vpred:
        out.append(f"{spec.label}: trained for {'v' if lfam.vpred else 'epsilon'}-prediction ({lfam.vpred_evidence}) "
                   f"but the checkpoint is {'v' if base.vpred else 'epsilon'}-prediction ({base.vpred_evidence}).")
    return out


def check_lora_values(plan: Plan, progress: Progress | None = None, cancel: threading.Event | None = None) -> None:
    """Read every used LoRA tensor once; refuse NaN/inf. Also hashes the LoRA files."""
    for st in plan.loras:
        used = {k for cs in plan.weights.values() for c in cs if plan.loras[c.lora] is st for k in c.params.values()}
        bad = []
        for key in sorted(used):
            if cancel is not None and cancel.is_set():
                raise Cancelled("Cancelled while checking the LoRA files; nothing was written.")
            t = st.source.read(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                bad.append(f"{key} ({n} of {t.numel()} values are NaN/inf)")
        if bad:
            raise ValueProblem(f"{st.spec.path} has NaN/inf weights in {len(bad)} tensor(s): " + "; ".join(bad[:5]),
                               fix="The LoRA is broken (training diverged or the file is damaged). Use another "
                                   "epoch or re-export it.")
        st.sha256 = sha256_file(st.spec.path)


# --- execution ---------------------------------------------------------------------------------


@dataclass
class _Stats:
    max_round: tuple[float, str] = (0.0, "")
    max_abs: tuple[float, str] = (0.0, "")
    modified: int = 0
    converted: int = 0
    copied: int = 0


def _out_code(src_code: str, save: str) -> str:
    return save if src_code in FLOAT_CODES else src_code


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
            out_code = _out_code(self.plan.base.dtype(key), self.save_code)
            shape = tuple(w.shape)
            rows = shape[0] if len(shape) else 1
            w2 = w.reshape(rows, -1)
            cols = w2.shape[1]
            lows, others, notes = self._deltas(f, w2)
            out_dt = DTYPES[out_code][0]
            out_buf = self.pool.get(max(1, math.prod(shape)) * DTYPES[out_code][1])
            out = out_buf[: math.prod(shape) * DTYPES[out_code][1]].view(out_dt).reshape(rows, cols)
            if out_code not in FLOAT_CODES:
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
                fix="Lower the strengths, or choose the save dtype bf16 or fp32.")
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


def _metadata(plan: Plan, save_dtype: str, base_sha: str) -> dict[str, str]:
    meta = {k: v for k, v in plan.base.metadata.items() if k not in DROP_METADATA}
    recipe = {
        "operation": "bake",
        "base": {"file": os.path.basename(plan.base.path), "sha256": base_sha, "arch": plan.arch.id},
        "loras": [
            {"name": st.spec.label, "file": os.path.basename(st.spec.path), "sha256": st.sha256,
             "strength": st.spec.strength,
             "te_strength": st.spec.te_strength if st.spec.te_strength is not None else st.spec.strength,
             "blocks": format_weights(st.weights, plan.arch.id) if st.spec.blocks else None}
            for st in plan.loras
        ],
        "save_dtype": save_dtype,
    }
    meta["lorakit.version"] = __version__
    meta["lorakit.recipe"] = json.dumps(recipe, separators=(",", ":"))
    return meta


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
    if save_dtype not in SAVE_DTYPES:
        raise RecipeError(f"Unknown save dtype {save_dtype!r}.", fix=f"Use one of {', '.join(SAVE_DTYPES)}.")
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
                    base_sha = _execute(plan, output, SAVE_DTYPES[save_dtype], save_dtype, overwrite, stats, say,
                                        cancel, hasher)
            report = _report(plan, stats, output, save_dtype, base_sha, dry_run, time.perf_counter() - t0)
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
    entries = [OutEntry(k, _out_code(base.dtype(k), save_code), base.shape(k)) for k in keys]
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
        with StreamingWriter(output, entries, _metadata(plan, save_dtype, _HASH_PLACEHOLDER),
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
            w.patch_metadata(_metadata(plan, save_dtype, hasher.digest))
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


def _report(plan: Plan, stats: _Stats, output: str | None, save_dtype: str, base_sha: str, dry_run: bool,
            wall: float) -> dict:
    arch = plan.arch
    loras = []
    for st in plan.loras:
        total = len(st.parsed.modules) + len(st.parsed.unknown)
        loras.append({
            "name": st.spec.label,
            "path": st.spec.path,
            "sha256": st.sha256,
            "strength": st.spec.strength,
            "te_strength": st.spec.te_strength if st.spec.te_strength is not None else st.spec.strength,
            "blocks": format_weights(st.weights, arch.id) if st.spec.blocks else None,
            "family": st.family.as_dict(),
            "algorithms": dict(st.algorithms),
            "layers": total,
            "matched": {c: st.matched.get(c, 0) for c in ("unet", "te1", "te2") if c in arch.prefixes},
            "unmatched": [{"layer": m, "reason": r} for m, r in st.unmatched],
            "embeddings_not_baked": sorted(st.parsed.embeddings),
            "rank": {"min": min(st.ranks), "max": max(st.ranks)} if st.ranks else None,
            "max_rel_change_by_block": {b: _r(v) for b, v in sorted(st.block_change.items(), key=_block_sort(arch))},
        })
    return {
        "lorakit_version": __version__,
        "operation": "bake",
        "dry_run": dry_run,
        "base": {"path": plan.base.path, "sha256": base_sha or None, "family": plan.family.as_dict()},
        "output": None if dry_run else {"path": os.path.abspath(output), "save_dtype": save_dtype},
        "loras": loras,
        "tensors": {"modified": stats.modified, "converted": stats.converted, "copied": stats.copied,
                    "planned": len(plan.weights) + len(plan.biases)},
        "rounding": {"save_dtype": save_dtype, "max_abs_rounding_loss": stats.max_round[0],
                     "key": stats.max_round[1] or None, "max_abs_weight": stats.max_abs[0]},
        "warnings": plan.warnings,
        "wall_s": round(wall, 3),
        "peak_rss_mb": None if (rss := peak_rss_mb()) is None else round(rss, 1),
    }


def _r(v: float) -> float:
    return float(f"{v:.6g}") if math.isfinite(v) else v


def _block_sort(arch: Arch):
    order = {b: i for i, b in enumerate(arch.blocks)}
    return lambda kv: (order.get(kv[0], len(order)), kv[0])


def summary(report: dict) -> str:
    """A short human-readable account of a bake report."""
    lines = []
    fam = report["base"]["family"]
    head = "Dry run (nothing written)" if report["dry_run"] else f"Baked {report['output']['path']}"
    lines.append(f"{head} — base {os.path.basename(report['base']['path'])} ({fam['arch_label']}"
                 + (", v-pred" if fam.get("vpred") else "") + ")")
    for lo in report["loras"]:
        m = lo["matched"]
        algos = ", ".join(f"{k} {v}" for k, v in sorted(lo["algorithms"].items()))
        te = f" te {lo['te_strength']:g}" if lo["te_strength"] != lo["strength"] else ""
        lines.append(f"  {lo['name']} @ {lo['strength']:g}{te}: "
                     + ", ".join(f"{c} {n}" for c, n in m.items())
                     + f" of {lo['layers']} layers matched ({algos})"
                     + (f"; {len(lo['unmatched'])} UNMATCHED" if lo["unmatched"] else ""))
    t = report["tensors"]
    if report["dry_run"]:  # nothing is computed: say what the bake would change, not "0 changed"
        lines.append(f"  tensors: {t.get('planned', '?')} would change (a dry run plans only; the changes are "
                     "measured when baking)")
        return _summary_tail(report, lines)
    lines.append(f"  tensors: {t['modified']} changed, {t['converted']} converted, {t['copied']} copied as is")
    lines.append("  largest relative change |strength·dW|/|W| by block:")
    for lo in report["loras"]:
        top = sorted(lo["max_rel_change_by_block"].items(), key=lambda kv: -kv[1])[:4]
        lines.append(f"    {lo['name']}: " + (", ".join(f"{b} {v:.3g}" for b, v in top) or "no change"))
    r = report["rounding"]
    lines.append(f"  saved as {r['save_dtype']}: max rounding loss {r['max_abs_rounding_loss']:.3g}, "
                 f"max |w| {r['max_abs_weight']:.4g}")
    return _summary_tail(report, lines)


def _summary_tail(report: dict, lines: list[str]) -> str:
    for w in report["warnings"]:
        lines.append(f"  warning: {w}")
    mem = f", peak memory {report['peak_rss_mb']:.0f} MB" if report.get("peak_rss_mb") else ""
    lines.append(f"  {report['wall_s']:.2f} s{mem}")
    return "\n".join(lines)


__all__ = ["LoraSpec", "bake", "plan_bake", "parse_lora_arg", "summary", "SAVE_DTYPES", "LorakitError"]
