"""Bake planning: parse a recipe, open and check every input, decide where each LoRA module goes.

Nothing here reads a weight's values except :func:`check_lora_values`, which reads the used
LoRA tensors once to refuse NaN/inf.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..blocks import parse_block_weights
from ..errors import ArchitectureError, Cancelled, FormatError, MatchError, RecipeError, ValueProblem
from ..formats.arch import ARCHS, Arch, Family, detect_checkpoint, detect_lora
from ..formats.sources import TensorSource, open_source, sha256_file
from ..hashcache import HashCache, file_key
from ..networks import ShapeProblem, algorithm_name, check_group, identify, needs_weight
from ..networks.base import Algorithm
from ..networks.resolve import ParsedKeys, Target, TargetIndex, explain_unknown, parse_keys
from ..networks.scale import SCALE_SOURCES, ScaleResolver, crosscheck_network_alpha

_BIAS_PARAMS = {"full": "diff_b", "norm": "b_norm"}

Progress = Callable[[float, str], None]


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
    scale: float | None = None  # the writer's scale when the group's own tensors do not give it (PEFT metadata)

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
    sha256_source: str | None = None  # "computed", "cache" or "host"
    algorithms: Counter = field(default_factory=Counter)
    matched: Counter = field(default_factory=Counter)  # component -> modules
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # (module, reason)
    ranks: list[int] = field(default_factory=list)
    block_change: dict[str, float] = field(default_factory=dict)
    zeroed_blocks: Counter = field(default_factory=Counter)
    scales: ScaleResolver | None = None
    naming: Counter = field(default_factory=Counter)  # non-standard naming normalised -> modules


@dataclass
class Plan:
    base: TensorSource
    arch: Arch
    family: Family
    loras: list[LoraState]
    weights: dict[str, list[Contribution]]
    biases: dict[str, list[tuple[Contribution, str]]]
    warnings: list[str]
    hash_cache: HashCache | None = field(default=None, repr=False)  # remembered file hashes (set by bake)


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
            raise ArchitectureError(
                f"{spec.path} is a LoRA for SD2.x ({'; '.join(fam.evidence)}).",
                fix="lorakit bakes into SD1.5 and SDXL checkpoints only.",
            )
        if fam.arch is not None and fam.arch != arch.id:
            la = ARCHS[fam.arch].label
            raise ArchitectureError(
                f"{spec.path} is a LoRA for {la} ({'; '.join(fam.evidence)}), but the checkpoint {base_path} is {arch.label}.",
                fix=f"Bake it into an {la} checkpoint, or pick a LoRA made for {arch.label}.",
            )
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
        raise FormatError(
            f"{path}: {k} has shape {shape}; an alpha or scale is one number"
            + (f" ({len(bad)} such tensors)" if len(bad) > 1 else "")
            + ".",
            fix="The file is damaged or was edited by hand: re-export the LoRA.",
        )


def _likely_cause(unmatched: list[tuple[str, str]], total: int) -> str:
    reasons = Counter(r.split(":")[0] for _, r in unmatched)
    top = reasons.most_common(1)[0][0] if reasons else ""
    if top.startswith("unknown algorithm"):
        return "these layers use a network type lorakit does not know (see the key names)."
    if top.startswith("shape"):
        return "the layers exist but have other sizes: the LoRA was trained for another model variant."
    if top.startswith("unrecognised"):
        return "the key names follow a scheme lorakit does not recognise."
    if top.startswith("ambiguous"):
        return "these names fit several layers of the same shape, so which one was meant cannot be told."
    if not top.startswith(("no such module", "the checkpoint has no such component")):
        return "see the reason given for each layer."
    if len(unmatched) == total:
        return "none of the LoRA's layer names exist in this checkpoint: it was made for another architecture or model."
    return "some layer names do not exist in this checkpoint (another model variant, or a damaged file)."


def _pick_target(
    targets: list[Target], alg: type[Algorithm], pshapes: dict[str, tuple[int, ...]], problem: str
) -> tuple[Target | None, str]:
    """Choose among the layers a name may mean by the group's shapes. Returns (target, reason when none)."""
    if not targets:
        return None, problem
    fits, misfits = [], []
    for t in targets:
        try:
            check_group(alg, pshapes, t.shape)
            fits.append(t)
        except ShapeProblem as e:
            misfits.append((t, e))
    if len(fits) == 1:
        return fits[0], ""
    if len(fits) > 1:
        return None, (
            "ambiguous: it names "
            + " and ".join(f"{t.label} {list(t.shape)}" for t in fits)
            + ", and the LoRA's shapes fit each"
        )
    if len(misfits) == 1:
        t, e = misfits[0]
        return None, f"shape mismatch with {t.label} {list(t.shape)}: {e}"
    return None, (
        "shape mismatch: the name fits "
        + "; ".join(f"{t.label} {list(t.shape)} ({e})" for t, e in misfits)
        + " — the LoRA's shapes fit none of them"
    )


def plan_bake(
    base: str | TensorSource,
    specs: Sequence[LoraSpec],
    *,
    allow_unmatched: bool = False,
    index: TargetIndex | None = None,
    base_family: Family | None = None,
    scale_source: str = "writer",
) -> Plan:
    """Open and validate everything, and decide where every LoRA module goes.

    Nothing is written and no tensor value is read: shapes come from the headers.
    Raises the error a user should see (exit code 2) on any problem.
    ``index`` and ``base_family`` reuse what an earlier call found for the same ``base`` (the
    inspector matches many LoRAs against one layout). ``scale_source`` is "writer" (the scale the
    LoRA's writer meant, PEFT adapter metadata included) or "runtime" (per-module alpha tensors
    only, as A1111 1.10 and Forge read them); see :mod:`lib_lorakit.networks.scale`.
    """
    if scale_source not in SCALE_SOURCES:
        raise RecipeError(f"Unknown scale source {scale_source!r}.", fix=f"Use one of {', '.join(SCALE_SOURCES)}.")
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
            st = LoraState(
                spec=spec,
                source=src,
                family=lfam,
                parsed=parsed,
                weights=bw,
                scales=ScaleResolver(src.metadata, scale_source),
            )
            loras.append(st)
            lshapes = src.shapes()
            for key in parsed.unknown:
                st.unmatched.append((key, explain_unknown(key)))
            for note, mods in parsed.notes.items():
                st.naming[note] += len(mods)
            for module, params in parsed.modules.items():
                names = frozenset(params)
                alg, extra = identify(names)
                if alg is None:
                    st.unmatched.append((module, f"unknown algorithm: parameters {', '.join(sorted(names))}"))
                    continue
                if extra:
                    st.unmatched.append((module, f"unknown algorithm: {alg.id} does not use {', '.join(extra)}"))
                    continue
                targets, problem, note = index.find_all(module)
                pshapes = {p: tuple(lshapes[k]) for p, k in params.items()}
                target, problem = _pick_target(targets, alg, pshapes, problem)
                if target is None:
                    st.unmatched.append((module, problem))
                    continue
                if note:
                    st.naming[note] += 1
                r = alg.rank(pshapes)
                wscale = st.scales.resolve(module, target.component, alg.id == "lora", params, r)
                comp_strength = (
                    spec.strength
                    if target.component == "unet"
                    else (spec.te_strength if spec.te_strength is not None else spec.strength)
                )
                bweight = bw.get(target.block, 1.0) if target.block else 1.0
                c = Contribution(
                    lora=li,
                    module=module,
                    alg=alg,
                    params=dict(params),
                    target=target,
                    multiplier=comp_strength * bweight,
                    scale=wscale,
                )
                st.matched[target.component] += 1
                st.algorithms[algorithm_name(alg, params)] += 1
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
                raise MatchError(
                    f"{spec.path} contains no LoRA layers ({len(lshapes)} tensors, none recognised).",
                    fix="Check that the file is a LoRA/LyCORIS file.",
                )
            if st.unmatched and not allow_unmatched:
                shown = "\n".join(f"  {m}: {r}" for m, r in st.unmatched[:8])
                more = f"\n  ... and {len(st.unmatched) - 8} more" if len(st.unmatched) > 8 else ""
                raise MatchError(
                    f"{len(st.unmatched)} of {total} LoRA layers in {spec.path} match nothing in "
                    f"{base_path} ({arch.label}):\n{shown}{more}\n"
                    f"Likely cause: {_likely_cause(st.unmatched, total)}",
                    fix="Use a LoRA made for this checkpoint, or turn on the allow-unmatched option to bake the rest "
                    "and list these in the report.",
                )
            if st.unmatched:
                warnings.append(
                    f"{spec.label}: {len(st.unmatched)} layer(s) matched nothing and were left out "
                    f"(allow-unmatched); see the report."
                )
            if parsed.embeddings:
                warnings.append(
                    f"{spec.label}: bundled embedding(s) {', '.join(sorted(parsed.embeddings))} cannot be "
                    f"baked into weights; keep using them as textual inversions at generation time."
                )
            if st.zeroed_blocks:
                blocks = ", ".join(f"{b} ({n})" for b, n in sorted(st.zeroed_blocks.items()))
                warnings.append(
                    f"{spec.label}: the block weights {spec.blocks!r} do not list {blocks}; those "
                    f"layers get weight 0, as in LoRA Block Weight (give a full-length vector to keep them)."
                )
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
        out.append(
            f"{spec.label}: trained on {'/'.join(sorted(ll))} ({lfam.lineage[0][1]}) but the checkpoint looks "
            f"{'/'.join(sorted(bl))} ({base.lineage[0][1]}); cross-lineage LoRAs often need lower strength."
        )
    if lfam.vpred is not None and base.vpred is not None and lfam.vpred != base.vpred:
        out.append(
            f"{spec.label}: trained for {'v' if lfam.vpred else 'epsilon'}-prediction ({lfam.vpred_evidence}) "
            f"but the checkpoint is {'v' if base.vpred else 'epsilon'}-prediction ({base.vpred_evidence})."
        )
    return out


def check_lora_values(plan: Plan, progress: Progress | None = None, cancel: threading.Event | None = None) -> None:
    """Read every used LoRA tensor once; refuse NaN/inf. Also hashes the LoRA files.

    The LoRAs are checked side by side, one thread each, their tensors read in file order after
    asking the kernel for each whole file (cold, key-name order made these reads random). The bake
    runs this beside its stream (``_LoraCheck``). Errors are raised in recipe order.
    """
    from ..streaming import ReadAhead

    for st in plan.loras:
        ks = st.source.keys()
        span = st.source.raw_span(ks[0]) if ks else None
        ReadAhead.whole(span[0] if span else None)
    if len(plan.loras) <= 1:
        for st in plan.loras:
            _check_one_lora(plan, st, cancel)
        return
    with concurrent.futures.ThreadPoolExecutor(min(4, len(plan.loras)), thread_name_prefix="lorakit-check") as ex:
        futs = [ex.submit(_check_one_lora, plan, st, cancel) for st in plan.loras]
        for f in futs:
            f.result()


def _check_one_lora(plan: Plan, st: LoraState, cancel: threading.Event | None) -> None:
    from ..streaming import nonfinite_count

    mine = [c for cs in plan.weights.values() for c in cs if plan.loras[c.lora] is st]
    used = {k for c in mine for k in c.params.values()}
    alpha_keys = {c.params["alpha"]: c for c in mine if c.alg.id == "lora" and "alpha" in c.params}
    alphas = []
    bad = []
    spans = {k: st.source.raw_span(k) for k in used}
    for key in sorted(used, key=lambda k: (spans[k][1] if spans[k] else 0, k)):
        if cancel is not None and cancel.is_set():
            raise Cancelled("Cancelled while checking the LoRA files; nothing was written.")
        t = st.source.read(key)
        n = nonfinite_count(t)
        if n:
            bad.append(f"{key} ({n} of {t.numel()} values are NaN/inf)")
        elif key in alpha_keys and t.numel():
            c = alpha_keys[key]
            shp = c.target.shape
            alphas.append(
                (
                    st.source.shape(c.params["lora_down.weight"])[0],
                    float(t.reshape(-1)[0]),
                    len(shp) == 4 and tuple(shp[2:]) != (1, 1),
                )
            )
    note = crosscheck_network_alpha(st.source.metadata, alphas)
    if note and st.scales is not None and note not in st.scales.notes:
        st.scales.notes.append(note)
    if bad:
        raise ValueProblem(
            f"{st.spec.path} has NaN/inf weights in {len(bad)} tensor(s): " + "; ".join(bad[:5]),
            fix="The LoRA is broken (training diverged or the file is damaged). Use another epoch or re-export it.",
        )
    known = plan.hash_cache.get(st.spec.path) if plan.hash_cache is not None else None
    if known is not None:
        st.sha256, st.sha256_source = known
    else:
        stamp = file_key(st.spec.path)
        st.sha256, st.sha256_source = sha256_file(st.spec.path), "computed"
        if plan.hash_cache is not None and stamp is not None:
            plan.hash_cache.put(st.spec.path, st.sha256, stamp[1])
