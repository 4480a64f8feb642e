"""What a LoRA really is: family, algorithm, rank/alpha, training tags, the real trigger,
passive vs trigger-dependent, category and maximum safe strength.

    >>> from lib_lorakit.inspect import inspect_paths
    >>> reports = inspect_paths(["models/Lora"])          # headers only
    >>> reports[0]["trigger"], reports[0]["kind"], reports[0]["max_safe_strength"]
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import LorakitError, ValueProblem
from ..formats.arch import ARCHS, Family, detect_checkpoint
from ..formats.safetensors_io import read_header
from ..formats.sources import open_header, open_source
from ..hosts import LORA_EXTS
from .category import classify, cross_lineage_ceiling, max_safe
from .metadata import Training, read_training
from .review import review
from .structure import ALGORITHM_LABELS, Structure, read_structure
from .tokens import ClipBPE, clip_bpe
from .trigger import decide, find_triggers, rank_candidates

__all__ = ["inspect_file", "inspect_paths", "collect_files", "render", "checkpoint_family"]


@dataclass
class _Parsed:
    path: str
    training: Training
    structure: Structure
    size: int


def collect_files(paths: Iterable[str]) -> list[str]:
    """Files named, and LoRA files below folders named (recursive, sorted)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out.extend(
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if f.lower().endswith(LORA_EXTS) and not f.startswith(".")
                )
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise LorakitError(f"{p}: no such file or folder.", fix="Check the path.")
    return list(dict.fromkeys(out))


def checkpoint_family(path: str) -> Family:
    """The family (arch, lineage) of a checkpoint from its header alone."""
    if path.endswith(".safetensors"):
        tensors, meta = read_header(path)
        return detect_checkpoint({k: t.shape for k, t in tensors.items()}, meta, path)
    with open_source(path) as src:
        return detect_checkpoint(src.shapes(), src.metadata, path)


_CKPT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.", "first_stage_model.")
_ADAPTER_MARKS = (".lora_", "lora_up.", "lora_down.", ".lora_A.", ".lora_B.", ".hada_", ".lokr_", ".oft_")
_ADAPTER_ENDS = (".alpha", ".diff", ".diff_b", ".dora_scale")


def is_checkpoint(keys) -> bool:
    """True for a full model (ldm/sgm key prefixes, no adapter tensors), not a LoRA."""
    keys = list(keys)
    return any(k.startswith(_CKPT_PREFIXES) for k in keys) and not any(
        k.endswith(_ADAPTER_ENDS) or any(m in k for m in _ADAPTER_MARKS) for k in keys
    )


def checkpoint_report(path: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``inspect`` says about a checkpoint: that it is one, its family and its generation profile."""
    from ..gen.profiles import settings_for

    fam = checkpoint_family(path)
    with open_header(path) as src:
        n = len(src.keys())
    chosen = settings_for(path, settings=settings)
    lin = ", ".join(f"{x} ({e})" for x, e in fam.lineage)
    return {
        "file": path,
        "name": os.path.splitext(os.path.basename(path))[0],
        "file_type": "checkpoint",
        "size_bytes": os.path.getsize(path),
        "tensors": n,
        "architecture": fam.arch,
        "architecture_label": fam.label,
        "family": fam.as_dict(),
        "variant": fam.variant,
        "profile": chosen["profile"],
        "profile_label": chosen["label"],
        "profile_reason": chosen["reason"],
        "generation_settings": chosen["settings"],
        "summary": f"an {fam.label} checkpoint"
        + (f" ({lin})" if lin else "")
        + (f", {'v' if fam.vpred else 'epsilon'}-prediction" if fam.vpred is not None else "")
        + ", not a LoRA: bake LoRAs into it or pick it as the base.",
        # the fields a LoRA listing shows, so mixed folders list it as what it is
        "trigger": None,
        "kind": "checkpoint",
        "category": "checkpoint",
        "algorithms": [],
        "rank": None,
        "max_safe_strength": 0.0,
        "warnings": [],
    }


def _open(path: str):
    """The header of a LoRA file: :mod:`.header` for safetensors (no torch, tables shared), else the generic reader."""
    if path.lower().endswith(".safetensors") and os.path.isfile(path):
        from .header import open_lora_header

        return open_lora_header(path)
    return open_header(path)


def _is_checkpoint(src) -> bool:
    table = getattr(src, "table", None)
    if table is None:
        return is_checkpoint(src.keys())
    if "is_checkpoint" not in table.memo:
        table.memo["is_checkpoint"] = is_checkpoint(table.keys)
    return table.memo["is_checkpoint"]


def _parse(path: str, read_alphas: bool, base=None) -> _Parsed | dict:
    src = _open(path)
    try:
        if _is_checkpoint(src):
            ckpt = True
        else:
            ckpt = False
            tr = read_training(src.metadata, path)
            st = read_structure(src, tr.network_args, read_alphas=read_alphas, base=base)
    finally:
        src.close()
    if ckpt:
        return checkpoint_report(path)
    return _Parsed(path=path, training=tr, structure=st, size=os.path.getsize(path))


def _names(p: _Parsed) -> list[str]:
    stem = os.path.splitext(os.path.basename(p.path))[0]
    out = [stem]
    for k in ("ss_output_name",):
        v = p.training.value(k)
        if isinstance(v, str) and v:
            out.append(v)
    if p.training.modelspec.get("title"):
        out.append(p.training.modelspec["title"])
    return list(dict.fromkeys(out))


def _top_tags(tr: Training, n: int = 12) -> list[str]:
    merged: Counter = Counter()
    for f in tr.folders:
        if not f.is_reg:
            merged.update(f.tags)
    return [t for t, _ in merged.most_common(n)]


def _report(
    p: _Parsed,
    bpe: ClipBPE | None,
    ckpt: Family | None,
    settings: dict[str, Any] | None,
    collection: Counter | None,
    size: int,
) -> dict[str, Any]:
    tr, st = p.training, p.structure
    warnings = list(tr.warnings)
    fam = st.family
    names = _names(p)
    cands = rank_candidates(tr, names, bpe, collection, size)
    verdict = decide(tr, cands, st.components)
    triggers = find_triggers(tr, names, bpe, collection, size)
    if triggers:
        # several concepts, each with its own word: the largest is the trigger, the others are listed
        if verdict.trigger not in {t["tag"] for t in triggers}:
            first = triggers[0]["tag"]
            verdict = decide(_with_trigger(tr, first), cands, st.components)
            verdict.trigger = first
            verdict.kind = "trigger-dependent"
            verdict.kind_evidence.insert(0, f"+ {len(triggers)} concepts, each with its own trigger")
        verdict.reason = (
            f"{len(triggers)} concepts: "
            + "; ".join(f"{tr.written(t['tag'])!r} in {t['share']:.0%} of the images" for t in triggers)
            + f". {verdict.reason}"
        )
    has_captions = any(f.tags for f in tr.folders)
    cat = classify(tr, names, verdict.trigger, st.components, has_captions)
    table = (settings or {}).get("max_safe_strength")
    strength = max_safe(cat.name, table)
    strength_reason = f"{cat.name} ceiling {strength:g}"

    # lineage: tags like score_9 mark Pony training even without a name hint
    lineage = [n for n, _ in fam.lineage]
    if "Pony" not in lineage and any(t.startswith(("score_", "score ")) for t in _top_tags(tr, 40)):
        fam.lineage.append(("Pony", "training captions carry score_* tags"))
        lineage.append("Pony")
    if ckpt is not None:
        if ckpt.arch != st.arch and st.arch is not None:
            warnings.append(
                f"made for {ARCHS[st.arch].label if st.arch in ARCHS else st.arch}, the checkpoint is "
                f"{ckpt.label}: it cannot be used there."
            )
            strength = 0.0
            strength_reason = "wrong architecture for the checkpoint"
        else:
            ceil = cross_lineage_ceiling(lineage, [n for n, _ in ckpt.lineage], (settings or {}).get("cross_lineage"))
            if ceil is not None and ceil[0] < strength:
                strength = ceil[0]
                strength_reason = f"{ceil[1]}: cross-lineage ceiling {ceil[0]:g}"
                warnings.append(
                    f"{ceil[1]} ({'; '.join(e for _, e in fam.lineage)} vs "
                    f"{'; '.join(e for _, e in ckpt.lineage)}): keep it at or below {ceil[0]:g}."
                )
            if fam.vpred is not None and ckpt.vpred is not None and fam.vpred != ckpt.vpred:
                warnings.append(
                    f"trained for {'v' if fam.vpred else 'epsilon'}-prediction, the checkpoint is "
                    f"{'v' if ckpt.vpred else 'epsilon'}-prediction."
                )
    if st.arch is None:
        warnings.append("the architecture could not be determined from the keys or the metadata.")
    if st.unmatched:
        warnings.append(
            f"{len(st.unmatched)} module(s) match no layer of the {ARCHS[st.arch].label if st.arch in ARCHS else ''} "
            f"layout (first: {st.unmatched[0][0]}: {st.unmatched[0][1]}); baking it would fail."
        )
    if st.embeddings:
        warnings.append(f"bundled embedding(s) {', '.join(st.embeddings)}: they only work at generation time.")
    if not tr.folders and tr.trainer == "unknown" and not tr.modelspec:
        warnings.append("no training metadata in the file: trigger and category rest on the name alone.")
    if tr.folders and not has_captions:
        warnings.append("training folders are listed but carry no tag statistics (captions were not recorded).")
    top_raw = _top_tags(tr, 5)
    if top_raw and verdict.trigger not in top_raw[:1]:
        shown = ", ".join(top_raw)
        if verdict.trigger:
            note = f"the most frequent tags ({shown}) are what the images share, not the trigger ({verdict.trigger!r})"
        else:
            note = f"the most frequent tags ({shown}) are what the images share; none of them is a trigger"
        warnings.append(note)

    rank, alpha = st.main_rank(), st.main_alpha()
    findings = review(tr, st, verdict.trigger)
    return {
        "file": p.path,
        "name": os.path.splitext(os.path.basename(p.path))[0],
        "size_bytes": p.size,
        "architecture": st.arch,
        "architecture_label": ARCHS[st.arch].label if st.arch in ARCHS else "unknown",
        "family": fam.as_dict(),
        "algorithms": [ALGORITHM_LABELS.get(a, a) for a in st.algorithms],
        "rank": rank,
        "alpha": alpha,
        "scale": (alpha / rank) if (alpha is not None and rank) else None,
        "components": st.components,
        "structure": st.as_dict(),
        "training": tr.as_dict(),
        "trigger": tr.written(verdict.trigger),  # as the captions wrote it: what a prompt must repeat
        "trigger_normalised": verdict.trigger,
        "triggers": [{**t, "tag": tr.written(t["tag"]), "normalised": t["tag"]} for t in triggers],
        "trigger_reason": verdict.reason,
        "trigger_candidates": [c.as_dict() for c in verdict.candidates[:8]],
        "most_frequent_tags": top_raw,
        "kind": verdict.kind,
        "kind_evidence": verdict.kind_evidence,
        "baking": verdict.baking,
        "category": cat.name,
        "category_detail": cat.as_dict(),
        "max_safe_strength": round(strength, 3),
        "max_safe_reason": strength_reason,
        "clip_vocabulary": bpe.source if bpe else None,
        "training_review": findings,
        "warnings": warnings,
    }


def _with_trigger(tr: Training, tag: str) -> Training:
    """``tr`` with ``tag`` declared, so :func:`decide` weighs the LoRA's kind around it."""
    import dataclasses

    return dataclasses.replace(tr, declared_triggers=[(tag, "its own training folder")])


def _parse_safe(args: tuple[str, bool, str | None]) -> _Parsed | dict:
    """One file in a worker process; the checkpoint's match context is built once per worker."""
    path, deep, checkpoint = args
    try:
        base = None
        if checkpoint:
            from .structure import cached_checkpoint_context

            base = cached_checkpoint_context(checkpoint)
        return _parse(path, deep, base)
    except LorakitError as e:
        return {"file": args[0], "error": str(e)}


def inspect_paths(
    paths: Iterable[str],
    *,
    checkpoint: str | None = None,
    weights: bool = False,
    settings: dict[str, Any] | None = None,
    workers: int = 4,
    processes: int = 0,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Inspect every LoRA in ``paths`` (folders recursively). Headers only unless ``weights``.

    ``checkpoint`` (read from its header) adds the family checks and cross-lineage ceilings, and
    with ``weights`` makes the per-block statistics relative to its weights.

    A file that cannot be read yields ``{"file", "error"}`` instead of stopping the scan.
    With several files, tags that are top tags of many LoRAs count against being a trigger.

    Args:
        workers: threads reading headers (overlaps disk reads).
        processes: worker processes (spawned) for large scans, which are CPU-bound; 0 uses threads
            only. The CLI uses processes; inside the WebUI only threads are used.
    """
    files = collect_files(paths)
    ckpt = checkpoint_family(checkpoint) if checkpoint else None
    base = None
    if checkpoint and ckpt is not None and ckpt.arch:
        from .structure import checkpoint_context

        base = checkpoint_context(checkpoint)  # match as the bake does, against this very file
    bpe = clip_bpe()
    deep = weights
    parsed: dict[str, _Parsed | dict] = {}
    done = 0
    lock = threading.Lock()

    def one(path: str):
        nonlocal done
        if cancel is not None and cancel.is_set():
            return
        try:
            parsed[path] = _parse(path, deep, base)
        except LorakitError as e:
            parsed[path] = {"file": path, "error": str(e)}
        with lock:
            done += 1
            if progress:
                progress(
                    0.5 * done / max(1, len(files)) if deep else done / max(1, len(files)), f"read {done}/{len(files)}"
                )

    if processes > 1 and len(files) >= 64:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..lazyimport import defer

        with ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=defer,  # each worker reads headers without importing torch
            initargs=("torch",),
        ) as ex:
            for path, res in zip(
                files, ex.map(_parse_safe, [(f, deep, checkpoint if base else None) for f in files], chunksize=16)
            ):
                parsed[path] = res
                done += 1
                if progress:
                    progress(0.5 * done / len(files) if deep else done / len(files), f"read {done}/{len(files)}")
                if cancel is not None and cancel.is_set():
                    ex.shutdown(wait=False, cancel_futures=True)
                    break
    elif len(files) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(one, files))
    else:
        for f in files:
            one(f)
    collection: Counter = Counter()
    ok = [p for p in parsed.values() if isinstance(p, _Parsed)]
    for p in ok:
        collection.update(set(_top_tags(p.training)))
    out: list[dict[str, Any]] = []
    for i, path in enumerate(files):
        if cancel is not None and cancel.is_set():
            break
        p = parsed.get(path)
        if p is None:
            continue
        if isinstance(p, dict):
            out.append(p)
            continue
        rep = _report(p, bpe, ckpt, settings, collection, len(ok))
        if deep and p.structure.arch in ARCHS:
            from .weights import weight_stats

            try:
                ws = weight_stats(
                    path, p.structure.arch, checkpoint if ckpt and ckpt.arch == p.structure.arch else None, cancel
                )
                rep["weight_stats"] = ws.as_dict()
                rep["warnings"].extend(ws.hints)
            except LorakitError as e:
                rep["warnings"].append(f"weight statistics unavailable: {e}")
                if isinstance(e, ValueProblem):  # NaN/inf weights: the file is broken, say so in the outcome too
                    rep["broken"] = str(e)
            if progress:
                progress(0.5 + 0.5 * (i + 1) / len(files), f"weights {i + 1}/{len(files)}")
        out.append(rep)
    return out


def inspect_file(path: str, **kw) -> dict[str, Any]:
    """Inspect one LoRA file (see :func:`inspect_paths`); raises on an unreadable file."""
    rep = inspect_paths([path], **kw)[0]
    if "error" in rep:
        raise LorakitError(rep["error"])
    return rep


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render(rep: dict[str, Any], *, tags: int = 12) -> str:
    """A readable report (what the CLI prints and the tab shows)."""
    if "error" in rep:
        return f"{rep['file']}\n  ERROR: {rep['error']}\n"
    if rep.get("file_type") == "checkpoint":
        fam = rep["family"]
        L = [
            rep["file"],
            f"  checkpoint {rep['summary']}",
            f"  evidence   {'; '.join(fam['evidence'])}"
            + (f"; {fam['vpred_evidence']}" if fam["vpred_evidence"] else ""),
            f"  tensors    {rep['tensors']}" + (f" · variant {rep['variant']}" if rep["variant"] else ""),
            f"  profile    {rep['profile_label']} ({rep['profile_reason']}): "
            + ", ".join(f"{k}={v}" for k, v in rep["generation_settings"].items()),
        ]
        return "\n".join(L) + "\n"
    st = rep["structure"]
    tr = rep["training"]
    L = [f"{rep['file']}"]
    fam = rep["family"]
    lin = ", ".join(f"{x['lineage']} ({x['evidence']})" for x in fam["lineage"])
    L.append(
        f"  model      {rep['architecture_label']}"
        + (f"  · lineage {lin}" if lin else "")
        + (f"  · {'v' if fam['vpred'] else 'epsilon'}-prediction" if fam["vpred"] is not None else "")
    )
    rs = st["rank_spread"]
    spread = f" (ranks {rs['min']}–{rs['max']})" if rs and rs["min"] != rs["max"] else ""
    al = st["alpha_spread"]
    aspread = f" (alphas {al['min']:g}–{al['max']:g})" if al and al["min"] != al["max"] else ""
    L.append(
        f"  network    {', '.join(rep['algorithms']) or 'none recognised'} · rank {rep['rank']}{spread} · "
        f"alpha {_fmt(rep['alpha'])}{aspread} [{st['alpha_source']}] · {st['modules']} modules "
        f"({', '.join(f'{c} {n}' for c, n in st['modules_per_component'].items())})"
        + (f" · {st['conv_modules']} conv (rank {st['conv_rank']})" if st["conv_modules"] else "")
    )
    if st.get("matched_against"):
        L.append(f"  matched    against {st['matched_against']}")
    from ..bake import scale_lines  # the bake's own wording: one resolver, one account

    L.extend(scale_lines(st.get("scale"), st.get("naming_normalised"), indent="             "))
    if st["blocks"]:
        L.append("  blocks     " + " ".join(f"{b}:{n}" for b, n in st["blocks"].items()))
    L.append(f"  trainer    {tr['trainer']}")
    for f, v in tr["fields"].items():
        if f in (
            "ss_output_name",
            "ss_sd_model_name",
            "ss_base_model_version",
            "ss_num_epochs",
            "ss_epoch",
            "ss_steps",
            "ss_learning_rate",
            "ss_unet_lr",
            "ss_text_encoder_lr",
            "ss_resolution",
            "ss_keep_tokens",
            "ss_caption_dropout_rate",
            "ss_optimizer",
            "ss_network_module",
        ):
            L.append(f"    {f[3:]:<22} {_fmt(v)}")
    if tr["network_args"]:
        L.append(f"    {'network_args':<22} " + ", ".join(f"{k}={v}" for k, v in tr["network_args"].items()))
    for k, v in tr["modelspec"].items():
        if k in ("title", "author", "description", "trigger_phrase", "usage_hint", "tags", "merged_from"):
            L.append(f"    {k:<22} {' '.join(str(v).split())[:100]}")
    for f in tr["folders"]:
        head = f"  folder     {f['name']}: {f['images'] if f['images'] is not None else '?'} images"
        head += f" × {f['repeats']} repeats" if f["repeats"] else ""
        head += " (regularisation)" if f["is_reg"] else ""
        L.append(head)
        if f["tags"]:
            L.append(
                "             "
                + ", ".join(
                    f"{t['tag']} {t['share']:.0%}" if t["share"] is not None else f"{t['tag']} ×{t['count']}"
                    for t in f["tags"][:tags]
                )
                + (f", … ({f['distinct_tags']} tags)" if f["distinct_tags"] > tags else "")
            )
    L.append(f"  trigger    {rep['trigger']!r}" if rep["trigger"] else "  trigger    none")
    L.append(f"             {rep['trigger_reason']}")
    for c in rep["trigger_candidates"][:3]:
        L.append(f"             · {c['tag']!r} score {c['score']:.1f}: {'; '.join(c['evidence'])}")
    for t in rep.get("triggers") or []:
        L.append(f"  concept    {t['tag']!r}: {t['share']:.0%} of the images ({'; '.join(t['evidence'])})")
    L.append(f"  kind       {rep['kind']}: " + "; ".join(rep["kind_evidence"]))
    L.append(f"             {rep['baking']}")
    cd = rep["category_detail"]
    L.append(
        f"  category   {rep['category']} ({cd['confidence_label']} confidence)"
        + (f": {'; '.join(cd['evidence'])}" if cd["evidence"] else "")
    )
    L.append(f"  max safe   {rep['max_safe_strength']:g} ({rep['max_safe_reason']})")
    ws = rep.get("weight_stats")
    if ws:
        what = "‖ΔW‖/‖W‖ at strength 1" if ws["relative"] else "‖ΔW‖ at strength 1 (no checkpoint given)"
        L.append(f"  weights    {what}:")
        vals = [(b["block"], b["relative"] if ws["relative"] else b["delta_norm"]) for b in ws["blocks"]]
        top = max((v for _, v in vals if v is not None), default=0) or 1
        for b, v in vals:
            if v is None:
                continue
            bar = "█" * max(1, round(24 * v / top))
            L.append(f"             {b:<6} {(f'{v:.2%}' if ws['relative'] else f'{v:.4g}'):>9} {bar}")
        if ws["skipped_count"]:
            L.append(f"             ({ws['skipped_count']} module(s) skipped: {ws['skipped'][0]})")
    for f in rep.get("training_review") or []:
        L.append(f"  training   {f['text']}")
    for w in rep["warnings"]:
        L.append(f"  warning    {w}")
    return "\n".join(L) + "\n"
