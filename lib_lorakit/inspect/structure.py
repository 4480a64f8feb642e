"""What a LoRA file contains: algorithms, ranks and alphas, trained components and blocks.

The file's modules are matched against the real key layout of the architecture it was
made for (the same matching the bake uses, against a layout instead of a checkpoint), so
the report knows each module's component and UNet block without any model on disk.
Only the header is read; alphas come from the trainer's metadata when it states them
and agrees with the file's shapes, otherwise from the tiny alpha tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..bake import LoraSpec, plan_bake
from ..errors import ArchitectureError, MatchError
from ..formats.arch import ARCHS, Family, detect_checkpoint, detect_lora, load_layout, lora_name_votes
from ..formats.safetensors_io import SafetensorsFile
from ..formats.sources import LayoutSource, TensorSource
from ..networks import ShapeProblem, algorithm_name, check_group
from ..networks.base import scalar
from ..networks.resolve import TargetIndex, parse_keys

ALGORITHM_LABELS = {
    "lora": "LoRA",
    "locon": "LoCon",
    "loha": "LoHa",
    "lokr": "LoKr",
    "dora": "DoRA",
    "doha": "DoRA (LoHa)",
    "dokr": "DoRA (LoKr)",
    "full": "full (diff)",
    "norm": "norm",
    "ia3": "(IA)³",
    "glora": "GLoRA",
    "oft": "OFT",
    "boft": "BOFT",
}


@dataclass
class Module:
    name: str
    algorithm: str
    component: str
    block: str | None
    conv: bool  # a 3x3 (or larger) convolution
    rank: int | None
    shape: tuple[int, ...]
    params: dict[str, str]
    alpha: float | None = None


@dataclass
class Structure:
    arch: str | None
    family: Family
    modules: list[Module] = field(default_factory=list)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    alpha_source: str = ""  # "metadata", "tensors", "none in file"
    matched_against: str = ""  # "the checkpoint <path>", "the SDXL layout", "the SDXL layout at 1/64 width"
    scale: dict[str, Any] | None = None  # where the bake takes each module's scale from (networks/scale.py)
    naming: dict[str, int] = field(default_factory=dict)  # non-standard naming normalised -> modules

    def _memo(self, name: str, compute):
        """``compute()``, kept with a shared module list (files with one table and one set of alphas)."""
        memo = getattr(self.modules, "memo", None)
        if memo is None:
            return compute()
        if name not in memo:
            memo[name] = compute()
        return memo[name]

    @property
    def algorithms(self) -> list[str]:
        return list(
            self._memo("algorithms", lambda: [a for a, _ in Counter(m.algorithm for m in self.modules).most_common()])
        )

    @property
    def components(self) -> list[str]:
        def compute():
            present = {m.component for m in self.modules}
            return [c for c in ("unet", "te1", "te2") if c in present]

        return list(self._memo("components", compute))

    def ranks(self) -> list[int]:
        return list(self._memo("ranks", lambda: [m.rank for m in self.modules if m.rank]))

    def main_rank(self) -> int | None:
        def compute():
            r = self.ranks()
            return Counter(r).most_common(1)[0][0] if r else None

        return self._memo("main_rank", compute)

    def main_alpha(self) -> float | None:
        def compute():
            main = self.main_rank()
            a = [m.alpha for m in self.modules if m.alpha is not None and m.rank == main]
            return Counter(a).most_common(1)[0][0] if a else None

        return self._memo("main_alpha", compute)

    def blocks(self) -> dict[str, int]:
        return dict(self._memo("blocks", lambda: dict(Counter(m.block for m in self.modules if m.block))))

    def _module_facts(self) -> dict[str, Any]:
        ranks = self.ranks()
        alphas = [m.alpha for m in self.modules if m.alpha is not None]
        arch = ARCHS.get(self.arch) if self.arch else None
        order = {b: i for i, b in enumerate(arch.blocks)} if arch else {}
        per_comp = Counter(m.component for m in self.modules)
        return {
            "modules": len(self.modules),
            "modules_per_component": dict(per_comp),
            "algorithms": self.algorithms,
            "algorithm_counts": dict(Counter(m.algorithm for m in self.modules)),
            "rank": self.main_rank(),
            "rank_spread": {"min": min(ranks), "max": max(ranks), "distinct": sorted(set(ranks))} if ranks else None,
            "alpha": self.main_alpha(),
            "alpha_spread": {"min": min(alphas), "max": max(alphas), "distinct": sorted(set(alphas))[:16]}
            if alphas
            else None,
            "alpha_source": None,  # per file (below)
            "conv_modules": sum(m.conv for m in self.modules),
            "conv_rank": Counter(m.rank for m in self.modules if m.conv and m.rank).most_common(1)[0][0]
            if any(m.conv and m.rank for m in self.modules)
            else None,
            "blocks": dict(sorted(self.blocks().items(), key=lambda kv: order.get(kv[0], 99))),
        }

    def as_dict(self) -> dict[str, Any]:
        out = _fresh(self._memo(f"facts:{self.arch}", self._module_facts))
        out["alpha_source"] = self.alpha_source
        out.update(
            {
                "unmatched": [{"module": m, "reason": r} for m, r in self.unmatched[:20]],
                "unmatched_count": len(self.unmatched),
                "embeddings": self.embeddings,
                "matched_against": self.matched_against,
                "scale": self.scale,
                "naming_normalised": self.naming,
            }
        )
        return out


class ModuleList(list):
    """Modules shared by the files with one tensor table and one set of alphas, with what is counted from them."""

    def __init__(self, items=()):
        super().__init__(items)
        self.memo: dict[str, Any] = {}


def _fresh(v):
    """A copy of nested dicts and lists (memoised facts go into reports that callers may change)."""
    if isinstance(v, dict):
        return {k: _fresh(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_fresh(x) for x in v]
    return v


@functools.cache
def _layout_index(arch: str, factor: int = 1) -> tuple[LayoutSource, TargetIndex, Family]:
    """The architecture's layout as a match target; ``factor`` > 1: every width divided as lorakit's
    synthetic models do (the demo's and the tests' tiny checkpoints)."""
    table = load_layout(ARCHS[arch].layout)
    if factor != 1:
        from ..synth import tiny_shape  # imports torch: only for lorakit's synthetic widths

        table = {k: (tiny_shape(s, factor), dt) for k, (s, dt) in table.items()}
    label = f"the {ARCHS[arch].label} layout" + (f" at 1/{factor} width" if factor != 1 else "")
    base = LayoutSource(table, path=f"<{label[4:]}>")
    shapes = base.shapes()
    return base, TargetIndex(shapes, ARCHS[arch]), detect_checkpoint(shapes, {}, base.path)


def checkpoint_context(path: str) -> tuple[str, tuple[LayoutSource, TargetIndex, Family]]:
    """A checkpoint's header as a match target (arch, (source, index, family)): the bake's own resolver
    against the same file, so the inspector and the bake agree on what matches."""
    from ..formats.sources import open_header

    with open_header(path) as src:
        table = {k: (src.shape(k), src.dtype(k)) for k in src.keys()}
        meta = dict(src.metadata)
    base = LayoutSource(table, path=path, metadata=meta)
    fam = detect_checkpoint(base.shapes(), meta, path)
    return fam.arch, (base, TargetIndex(base.shapes(), ARCHS[fam.arch]), fam)


@functools.lru_cache(maxsize=2)
def cached_checkpoint_context(path: str):
    """:func:`checkpoint_context`, kept for the worker processes of a folder scan."""
    return checkpoint_context(path)


def _plan(src: TensorSource, arch: str, family: Family | None = None, ctx=None):
    base, index, fam = ctx or _layout_index(arch)
    return plan_bake(
        base, [LoraSpec(path=src.path, source=src, family=family)], allow_unmatched=True, index=index, base_family=fam
    )


@dataclass
class _Match:
    """What matching one key set against a layout or checkpoint found (shapes checked per file)."""

    contribs: list  # bake.Contribution, in the plan's order
    unmatched: list[tuple[str, str]]
    embeddings: list[str]
    scale: dict | None
    naming: dict[str, int]


_MATCHES: OrderedDict[tuple, _Match] = OrderedDict()
_MATCHES_MAX = 256
_MATCHES_LOCK = threading.Lock()
ENV_NO_REUSE = "LORAKIT_INSPECT_NO_PLAN_REUSE"  # "1": plan every file afresh (benchmarks compare the findings)
PLAN_STATS = Counter()  # "planned" / "reused": how often the cache below was used (for tests and benches)


def _match(src: TensorSource, arch: str, family: Family | None, shapes, ctx=None, ctx_key: Any = 1) -> _Match:
    """Match a LoRA's modules as the bake would (:func:`_plan`), planned once per distinct key set.

    Files from one trainer share their key set: the module-to-layer matching is reused, and only
    the shape checks (which depend on each file's ranks) run again; a file whose shapes fail them
    is planned in full, so its findings are exactly those of a fresh plan. The key includes what
    else decides the plan: the target (a checkpoint or a layout width) and the PEFT adapter metadata
    that gives the scales.
    """
    from ..networks.scale import ADAPTER_METADATA_KEY

    key = (arch, ctx_key, frozenset(shapes), src.metadata.get(ADAPTER_METADATA_KEY))
    reuse = os.environ.get(ENV_NO_REUSE) != "1"
    with _MATCHES_LOCK:
        m = _MATCHES.get(key) if reuse else None
        if m is not None:
            _MATCHES.move_to_end(key)
    if m is not None:
        try:
            for c in m.contribs:
                check_group(c.alg, {p: tuple(shapes[k]) for p, k in c.params.items()}, c.target.shape)
            with _MATCHES_LOCK:
                PLAN_STATS["reused"] += 1
            return m
        except ShapeProblem:
            pass
    plan = _plan(src, arch, family, ctx)
    st = plan.loras[0]
    m = _Match(
        [c for cs in plan.weights.values() for c in cs],
        list(st.unmatched),
        sorted(st.parsed.embeddings),
        st.scales.report() if st.scales is not None else None,
        dict(st.naming),
    )
    with _MATCHES_LOCK:
        PLAN_STATS["planned"] += 1
        if reuse and not any(r.startswith("shape") for _, r in m.unmatched):  # shape findings are per file
            _MATCHES[key] = m
            while len(_MATCHES) > _MATCHES_MAX:
                _MATCHES.popitem(last=False)
    return m


def _declared_alpha(meta: dict[str, str], args: dict[str, Any], modules: list[Module]) -> dict[str, float] | None:
    """Alphas per module class from kohya's metadata, when present and consistent with the shapes.

    kohya (networks/lora.py) and LyCORIS give Linear and 1x1 convolutions ``network_dim`` /
    ``network_alpha``, larger kernels ``conv_dim`` / ``conv_alpha``. Block-wise dims or
    alphas, "Dynamic" values (resized LoRAs) or ranks that disagree send us to the tensors.
    """
    if any(k in args for k in ("block_alphas", "conv_block_alphas", "block_dims", "conv_block_dims")):
        return None
    try:
        dim = int(meta["ss_network_dim"])
        alpha = float(meta["ss_network_alpha"])
    except (KeyError, ValueError, TypeError):
        return None
    conv_dim = conv_alpha = None
    if "conv_dim" in args:
        try:
            conv_dim = int(args["conv_dim"])
            conv_alpha = float(args.get("conv_alpha", 1.0))
        except (TypeError, ValueError):
            return None
    for m in modules:
        if m.rank is None:
            continue
        expect = conv_dim if m.conv else dim
        if expect is None or m.rank != min(expect, *(m.shape[:2] if len(m.shape) >= 2 else (expect,))):
            return None
    out = {"linear": alpha}
    if conv_alpha is not None:
        out["conv"] = conv_alpha
    return out


@dataclass
class _Skeleton:
    """What one tensor table gives for one architecture and target: matched modules with the header's own
    scales (alphas of the files come on top), shared by the files with that table."""

    arch: str | None
    matched_against: str = ""
    modules: ModuleList = field(default_factory=ModuleList)
    unmatched: list[tuple[str, str]] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    scale: dict[str, Any] | None = None
    naming: dict[str, int] = field(default_factory=dict)
    with_alpha: list[int] = field(default_factory=list)  # indices of modules with an alpha tensor
    alpha_keys: list[str] = field(default_factory=list)  # their alpha tensors' names
    alpha_conv: list[bool] = field(default_factory=list)  # their kernels are larger than 1x1
    from_header: bool = False  # some module's scale comes from the header (PEFT adapter metadata)
    alpha_reps: list[Module] = field(default_factory=list)  # one module per (rank, conv, shape[:2])
    by_alphas: OrderedDict = field(default_factory=OrderedDict)  # alphas -> ModuleList

    def with_alphas(self, key: tuple, values) -> ModuleList:
        """The modules with the alphas ``values()`` gives (in ``with_alpha`` order), one list per ``key``."""
        with _MATCHES_LOCK:  # the reading threads share skeletons
            mods = self.by_alphas.get(key)
            if mods is None:
                mods = ModuleList(self.modules)
                for i, v in zip(self.with_alpha, values()):
                    mods[i] = dataclasses.replace(mods[i], alpha=v)
                self.by_alphas[key] = mods
                while len(self.by_alphas) > 16:
                    self.by_alphas.popitem(last=False)
            return mods


_SKELETONS: OrderedDict[tuple, _Skeleton] = OrderedDict()
_SKELETONS_MAX = 128


def _skeleton(src: TensorSource, shapes, fam: Family, base: tuple[str, Any] | None) -> _Skeleton:
    """Match the file's modules (:func:`_match`) and list them; once per tensor table for a :class:`LoraHeader`."""
    from ..networks.scale import ADAPTER_METADATA_KEY

    table = getattr(src, "table", None)
    key = None
    if table is not None and os.environ.get(ENV_NO_REUSE) != "1":
        key = (table.key, fam.arch, src.metadata.get(ADAPTER_METADATA_KEY), base[1][0].path if base else None)
        with _MATCHES_LOCK:
            sk = _SKELETONS.get(key)
            if sk is not None:
                _SKELETONS.move_to_end(key)
                PLAN_STATS["shared"] += 1
                return sk
    archs = [fam.arch] if fam.arch in ARCHS else ([] if fam.arch else list(ARCHS))
    best = None
    for a in archs:
        if base is not None and base[0] == a:
            targets = [(f"the checkpoint {base[1][0].path}", base[1])]
        else:
            targets = [(None, 1), (None, "shrink")]  # "shrink": lorakit's synthetic width (synth.SHRINK)
        for what, ctx in targets:
            ctx_key: Any = ("checkpoint", what)
            if what is None:
                if ctx != 1 and (best is None or best[2] != a or not best[0].unmatched):
                    continue  # the full-width layout fits: no other width to try
                if ctx == "shrink":
                    from ..synth import SHRINK  # imports torch: only for files the full-width layout does not fit

                    ctx = SHRINK
                ctx_key = ("layout", ctx)
                what, ctx = _layout_index(a, ctx)[0].path.strip("<>"), _layout_index(a, ctx)
                what = "the " + what
            try:
                match = _match(src, a, fam if fam.arch == a else None, shapes, ctx, ctx_key)
            except (MatchError, ArchitectureError):
                continue
            n = len(match.contribs)
            if best is None or n > best[1]:
                best = (match, n, a, what)
    if best is None:
        parsed = parse_keys(shapes)
        sk = _Skeleton(
            arch=None,
            embeddings=sorted(parsed.embeddings),
            unmatched=[(m, "no layout of a known architecture has it") for m in parsed.modules],
        )
    else:
        match, _, arch, what = best
        sk = _Skeleton(
            arch=arch,
            matched_against=what,
            embeddings=list(match.embeddings),
            unmatched=list(match.unmatched),
            scale=match.scale,
            naming=dict(match.naming),
        )
        mods = []
        for c in match.contribs:
            pshapes = {p: tuple(shapes[k]) for p, k in c.params.items()}
            alg = algorithm_name(c.alg, c.params)
            if alg == "lora" and len(c.target.shape) == 4 and c.target.shape[2:] != (1, 1):
                alg = "locon"
            rank = c.alg.rank(pshapes)
            mods.append(
                Module(
                    name=c.module,
                    algorithm=alg,
                    component=c.target.component,
                    block=c.target.block,
                    conv=len(c.target.shape) == 4 and tuple(c.target.shape[2:]) != (1, 1),
                    rank=rank,
                    shape=tuple(c.target.shape),
                    params=dict(c.params),
                    # the header's scale, as the bake applies it, as an alpha: scale * rank
                    alpha=c.scale * rank if c.scale is not None and rank else None,
                )
            )
        mods.sort(key=lambda m: m.name)
        sk.modules = ModuleList(mods)
        sk.with_alpha = [i for i, m in enumerate(mods) if "alpha" in m.params]
        sk.alpha_keys = [mods[i].params["alpha"] for i in sk.with_alpha]
        sk.alpha_conv = [mods[i].conv for i in sk.with_alpha]
        sk.from_header = any(m.alpha is not None for m in mods)
        reps: dict[tuple, Module] = {}
        for m in mods:
            reps.setdefault((m.rank, m.conv, m.shape[:2]), m)
        sk.alpha_reps = list(reps.values())
    if key is not None:
        with _MATCHES_LOCK:
            _SKELETONS[key] = sk
            while len(_SKELETONS) > _SKELETONS_MAX:
                _SKELETONS.popitem(last=False)
    return sk


def read_structure(
    src: TensorSource,
    args: dict[str, Any] | None = None,
    *,
    read_alphas: bool = False,
    base: tuple[str, Any] | None = None,
) -> Structure:
    """Match a LoRA's modules to its architecture's layout (header only, unless alphas must be read).

    Files that share a tensor table (:mod:`.header`) share the matching: only the family (metadata) and
    the alphas are read per file.

    Args:
        src: the open LoRA file.
        args: kohya ``ss_network_args`` (parsed), for conv alphas.
        read_alphas: always read the alpha tensors, even where the metadata states them.
        base: :func:`checkpoint_context` of the checkpoint it is meant for: matched against that file (as
            the bake does) when the architectures agree. Otherwise the layout, at full width or — when
            that leaves modules unmatched — at the width of lorakit's synthetic models, whichever fits.
    """
    shapes = src.shapes()
    table = getattr(src, "table", None)
    if table is not None:
        votes = table.memo.get("name_votes")
        if votes is None:
            votes = table.memo["name_votes"] = lora_name_votes(shapes)
        fam = detect_lora(shapes, src.metadata, src.path, name_votes=votes)
    else:
        fam = detect_lora(shapes, src.metadata, src.path)
    st = Structure(arch=fam.arch, family=fam)
    sk = _skeleton(src, shapes, fam, base)
    st.embeddings = list(sk.embeddings)
    st.unmatched = list(sk.unmatched)
    if sk.arch is None:
        return st
    st.arch, st.matched_against = sk.arch, sk.matched_against
    if fam.arch is None:
        fam.arch = sk.arch
        fam.evidence.append(f"module names and shapes match the {ARCHS[sk.arch].label} layout")
    st.scale = sk.scale
    st.naming = dict(sk.naming)
    st.modules = sk.modules
    from_header = sk.from_header
    if not sk.with_alpha:
        st.alpha_source = ("PEFT adapter metadata" if from_header else "none in file (scale 1)") if sk.modules else ""
        return st
    declared = None if read_alphas else _declared_alpha(src.metadata, args or {}, sk.alpha_reps)
    if declared is not None:
        lin = declared["linear"]
        conv = declared.get("conv", lin)
        st.modules = sk.with_alphas(("metadata", lin, conv), lambda: [conv if c else lin for c in sk.alpha_conv])
        st.alpha_source = "metadata"
    else:
        keys = sk.alpha_keys
        if hasattr(src, "read_scalars"):  # from the bytes at the header's offsets
            got = src.read_scalars(keys)
        elif src.path.lower().endswith(".safetensors"):
            with SafetensorsFile(src.path) as f:
                got = {k: scalar({"alpha": t}, "alpha") for k, t in f.read_many(keys).items()}
        else:
            got = {k: scalar({"alpha": src.read(k)}, "alpha") for k in keys}
        values = tuple(float(got[k]) if got[k] is not None else None for k in keys)
        st.modules = sk.with_alphas(("tensors", values), lambda: values)
        st.alpha_source = "tensors"
    if from_header:
        st.alpha_source += " + PEFT adapter metadata"
    return st


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
