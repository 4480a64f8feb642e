"""The bake doctor's runs: the parity check, and the diagnosis that names the cause.

Both render through a generation backend into one run folder (``gen.run``: plan, manifest, images)
and write ``doctor.json`` (the report) and ``sheet-p<N>.png`` (contact sheets) beside them.
The diagnosis bakes each variant (:mod:`.variants`) with the bake engine into a scratch folder
(``tempfiles.scratch_dir``) inside a folder the WebUI scans, renders it, and removes it before the
next one; the scratch folder is removed at the end, after an error and after a cancel (unless kept).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import Cancelled, LorakitError
from ..fsutil import atomic_write
from ..gen.backend import Backend
from ..gen.run import Cell, Run, execute
from ..prompt import strip_tags
from . import parity as P
from .report import COLUMNS, contact_sheet, save_png
from .runtime import FP32, precision_warning, runtime_precision
from .variants import CFGS, Variant, plan_variants

REPORT = "doctor.json"
Progress = Callable[[float, str], None]


@dataclass
class Check:
    """A resolved doctor request: files, recipe, prompts, seeds and the settings from the checkpoint's profile."""

    base: str  # checkpoint path (the backend resolves paths through its list)
    baked: str
    recipe: list[P.RecipeLora]
    prompts: list[str]
    seeds: list[int]
    negative: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    save_dtype: str = "fp16"  # the variants' (the bake's) save dtype
    profile: dict[str, Any] = field(default_factory=dict)


def _cell(check: Check, i: int, seed: int, role: str, prompt: str, ckpt: str, settings=None) -> Cell:
    return Cell(
        row=f"p{i + 1}",
        col=role,
        prompt=prompt,
        negative_prompt=check.negative,
        seed=seed,
        checkpoint=ckpt,
        settings=dict(settings or check.settings),
        extra={"role": role, "prompt_index": i},
    )


def parity_cells(check: Check) -> list[Cell]:
    out = []
    for i, p in enumerate(check.prompts):
        ps = P.prompts_for(p, check.recipe)
        for s in check.seeds:
            out.append(_cell(check, i, s, "runtime", ps["runtime"], check.base))
            out.append(_cell(check, i, s, "baked", ps["baked"], check.baked))
            out.append(_cell(check, i, s, "base", ps["base"], check.base))
    return out


def scratch_file(scratch: str, v: Variant) -> str:
    return os.path.join(scratch, "lorakit-doctor-" + v.id.replace(":", "-").replace("/", "-") + ".safetensors")


def variant_cells(check: Check, variants: list[Variant], scratch: str) -> dict[str, list[Cell]]:
    """The cells each variant adds (runtime references first, where a variant has its own)."""
    out: dict[str, list[Cell]] = {}
    for v in variants:
        cells = []
        for i, p in enumerate(check.prompts):
            for s in check.seeds:
                if v.id == "cfg":
                    ps = P.prompts_for(p, check.recipe)
                    for c in CFGS:
                        st = {**check.settings, "cfg_scale": c}
                        cells.append(_cell(check, i, s, f"cfg{c:g}:runtime", ps["runtime"], check.base, st))
                        cells.append(_cell(check, i, s, f"cfg{c:g}:baked", ps["baked"], check.baked, st))
                    continue
                if v.id == "untagged":
                    plain = strip_tags(p, [r.name for r in check.recipe]).strip()
                    cells.append(_cell(check, i, s, "untagged", plain, check.baked))
                    continue
                if v.runtime is not None:
                    ps = P.prompts_for(p, check.recipe, tags=P.tags_of(v.runtime))
                    cells.append(_cell(check, i, s, f"{v.id}:runtime", ps["runtime"], check.base))
                plain = strip_tags(p, [r.name for r in check.recipe]).strip()
                cells.append(_cell(check, i, s, f"{v.id}:baked", plain, scratch_file(scratch, v)))
        out[v.id] = cells
    return out


# --- reading a run back -------------------------------------------------------------------------


def _images(run: Run) -> dict[tuple[str, int, int], Any]:
    """(role, prompt index, seed) -> image, for every verified cell."""
    res = run.results()
    out = {}
    for c in run.cells:
        ev = res.get(c.key)
        if ev and ev["status"] == "ok":
            out[(c.col, c.extra["prompt_index"], c.seed)] = run.load_image(ev)
    return out


def _failed(run: Run) -> list[str]:
    res = run.results()
    return [
        f"{c.row} / {c.col} / seed {c.seed}: {res[c.key].get('error', 'failed')}"
        for c in run.cells
        if c.key in res and res[c.key]["status"] != "ok"
    ]


def _sets(imgs, check: Check, roles: tuple[str, ...], prompts: list[int] | None = None):
    idx = range(len(check.prompts)) if prompts is None else prompts
    sets = [[] for _ in roles]
    for i in idx:
        for s in check.seeds:
            row = [imgs.get((r, i, s)) for r in roles]
            if all(x is not None for x in row):
                for k, x in enumerate(row):
                    sets[k].append(x)
    return sets


def measure_parity(run: Run, check: Check) -> dict[str, Any]:
    from ..gen.backend import GenError

    imgs = _images(run)
    per = []
    for i in range(len(check.prompts)):
        b, r, base = _sets(imgs, check, ("baked", "runtime", "base"), [i])
        if not b:
            raise GenError(
                f"No complete runtime/baked/base set for prompt {i + 1}: {'; '.join(_failed(run)[:3]) or 'no images'}.",
                fix="See the run's manifest for the errors; run the check again to fill the gaps.",
            )
        per.append({"prompt": check.prompts[i], **P.compare_sets(b, r, base)})
    b, r, base = _sets(imgs, check, ("baked", "runtime", "base"))
    return {"overall": P.compare_sets(b, r, base), "prompts": per}


def write_sheets(run: Run, check: Check, imgs=None) -> list[str]:
    imgs = imgs if imgs is not None else _images(run)
    paths = []
    for i in range(len(check.prompts)):
        rows = []
        for s in check.seeds:
            row = [imgs.get((r, i, s)) for r in COLUMNS]
            if all(x is not None for x in row):
                rows.append(row)
        if rows:
            paths.append(save_png(contact_sheet(rows), os.path.join(run.dir, f"sheet-p{i + 1}.png")))
    return paths


def _write_report(run: Run, report: dict[str, Any]) -> dict[str, Any]:
    atomic_write(os.path.join(run.dir, REPORT), json.dumps(report, indent=1, default=str).encode())
    return report


def _base_report(run: Run, check: Check, kind: str) -> dict[str, Any]:
    warnings = P.double_application(check.prompts, check.recipe)
    findings = P.recipe_mismatches(check.recipe, P.baked_recipe(check.baked), check.base)
    return {
        "kind": kind,
        "id": run.id,
        "dir": run.dir,
        "base": check.base,
        "baked": check.baked,
        "recipe": [r.as_dict() for r in check.recipe],
        "prompts": check.prompts,
        "seeds": check.seeds,
        "settings": check.settings,
        "profile": check.profile,
        "thresholds": P.thresholds(),
        "warnings": warnings,
        "recipe_findings": findings,
    }


def parity(
    check: Check,
    backend: Backend,
    outputs: str,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Render runtime / baked / base and compare. Returns the report (also ``doctor.json`` in the run folder)."""
    t0 = time.perf_counter()
    run = Run.create(outputs, "doctor-parity", parity_cells(check), meta={"doctor": "parity"})
    rec = execute(run, backend, progress=progress, cancel=cancel)
    report = _base_report(run, check, "parity")
    report["parity"] = measure_parity(run, check)
    w = P.small_effect_warning(report["parity"]["overall"])
    if w:
        report["warnings"].append(w)
    report["sheets"] = write_sheets(run, check)
    report["timing"] = {"seconds": round(time.perf_counter() - t0, 3), "seconds_rendering": rec["seconds_generating"]}
    report["record"] = rec
    return _write_report(run, report)


# --- diagnosis ----------------------------------------------------------------------------------


def diagnose(
    check: Check,
    backend: Backend,
    outputs: str,
    scratch_parent: str,
    *,
    variants: list[str] | None = None,
    keep_scratch: bool = False,
    engine: dict[str, Any] | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Parity, then every variant; name the cause(s). The scratch folder is gone when this returns or raises
    (``keep_scratch``: kept, and its path reported)."""
    from ..bake import LoraSpec
    from ..bake import bake as bake_engine
    from ..hashcache import HashCache
    from ..tempfiles import scratch_dir

    say = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    vs = plan_variants(check.recipe, check.save_dtype, variants)
    if not P.double_application(check.prompts, check.recipe):  # no baked LoRA's tag in a prompt: nothing to take out
        vs = [v for v in vs if v.id != "untagged"]
    scratch = scratch_dir(scratch_parent, "doctor")
    kept = False
    try:
        by_variant = variant_cells(check, vs, scratch)
        pcells = parity_cells(check)
        cells = pcells + [c for v in vs for c in by_variant[v.id]]
        run = Run.create(outputs, "doctor-diagnose", cells, meta={"doctor": "diagnose", "scratch": scratch})
        # everything on the base and the baked checkpoint first: each is loaded once
        first = [c.key for c in cells if c.checkpoint in (check.base, check.baked)]
        n_bakes = sum(v.bake for v in vs)
        steps = 1 + n_bakes
        sub = lambda k, name: lambda f, m: say((k + f) / steps, f"{name}: {m}")  # noqa: E731
        rec = execute(run, backend, progress=sub(0, "renders on base and baked"), cancel=cancel, only=first)
        render_s, bake_s, bakes = rec["seconds_generating"], 0.0, []
        eng = dict(engine or {})
        if not eng.get("hash_cache"):
            eng["hash_cache"] = HashCache(None)  # the base is hashed once for all variants
        k = 0
        for v in vs:
            if not v.bake:
                continue
            k += 1
            if cancel is not None and cancel.is_set():
                raise Cancelled("Diagnosis cancelled; the scratch bakes were removed.")
            out = scratch_file(scratch, v)
            specs = [
                LoraSpec(path=r.path, strength=r.strength, te_strength=r.te_strength, name=r.name) for r in v.recipe
            ]
            tb = time.perf_counter()
            rep = bake_engine(
                check.base,
                specs,
                out,
                save_dtype=v.save_dtype,
                rounding=v.rounding,
                progress=sub(k - 0.5, f"baking {v.label}"),
                cancel=cancel,
                **eng,
            )
            dt = time.perf_counter() - tb
            bake_s += dt
            bakes.append({"id": v.id, "seconds": round(dt, 3), "sha256_source": rep["base"].get("sha256_source")})
            r2 = execute(
                run,
                backend,
                progress=sub(k, f"rendering {v.label}"),
                cancel=cancel,
                only=[c.key for c in by_variant[v.id] if c.checkpoint == out],
            )
            render_s += r2["seconds_generating"]
            if not keep_scratch:
                os.unlink(out)
        report = _base_report(run, check, "diagnose")
        report["parity"] = measure_parity(run, check)
        w = P.small_effect_warning(report["parity"]["overall"])
        if w:
            report["warnings"].append(w)
        report["host_precision"] = _host_precision(backend)
        w = precision_warning(report["host_precision"], any(v.id == "fp32" for v in vs))
        if w:
            report["warnings"].append(w)
        imgs = _images(run)
        report["variants"] = [_measure_variant(v, imgs, check, bakes) for v in vs]
        report["causes"], report["no_cause"] = name_causes(report)
        report["sheets"] = write_sheets(run, check, imgs)
        total = time.perf_counter() - t0
        report["timing"] = {
            "seconds": round(total, 3),
            "seconds_rendering": round(render_s, 3),
            "seconds_baking": round(bake_s, 3),
            "overhead_ratio": round(total / max(1e-9, render_s + bake_s), 3),
            "bakes": bakes,
        }
        report["failed_cells"] = _failed(run)
        if keep_scratch:
            report["scratch"] = scratch
            kept = True
        say(1.0, "done")
        return _write_report(run, report)
    finally:
        if not kept:
            shutil.rmtree(scratch, ignore_errors=True)


def _host_precision(backend: Backend) -> dict[str, str] | None:
    """What the host applies LoRAs in at runtime (doctor/runtime.py); None for a backend that cannot say.
    For a pool of WebUIs: the first that keeps a part below fp32 (it decides the warning), else the first."""
    ready = getattr(backend, "ready", None)  # a pool: its members that answer
    if ready is not None:
        found = []
        for m in ready():
            p = _host_precision(m.backend)
            if p:
                found.append({**p, "webui": m.name})
        low = [p for p in found if p["text_encoder"] != FP32 or p["unet"] != FP32]
        return (low or found or [None])[0]
    flags = getattr(backend, "cmd_flags", None)
    engine = getattr(backend, "engine", None)
    if flags is None or engine is None:
        return None
    try:
        return runtime_precision(engine(), flags())
    except LorakitError:
        return None


def _measure_variant(v: Variant, imgs, check: Check, bakes: list[dict[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = v.as_dict()
    if v.id == "cfg":
        sweep = []
        for c in CFGS:
            b, r = _sets(imgs, check, (f"cfg{c:g}:baked", f"cfg{c:g}:runtime"))
            if b:
                sweep.append({"cfg": c, **P.compare_sets(b, r)})
        d["sweep"] = sweep
        lo, hi = (sweep[0]["mean_diff"], sweep[-1]["mean_diff"]) if sweep else (0.0, 0.0)
        d["amplification"] = round(hi / lo, 3) if lo > 0 else (float("inf") if hi > 0 else 1.0)
        return d
    ref = f"{v.id}:runtime" if v.runtime is not None else "runtime"
    mine = "untagged" if v.id == "untagged" else f"{v.id}:baked"
    a, r, base = _sets(imgs, check, (mine, ref, "base"))
    d["metrics"] = P.compare_sets(a, r, base) if a else None
    d["seconds_bake"] = next((b["seconds"] for b in bakes if b["id"] == v.id), None)
    return d


IMPROVES = 0.5  # a variant "restores" parity when it passes, or halves the baked-vs-runtime difference
AMPLIFIES = 2.0  # the difference at the top of the CFG sweep over the bottom: CFG amplification


def name_causes(report: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The cause(s), each with its evidence (which variant restores parity, by how much) and a fix in words."""
    par = report["parity"]["overall"]
    base_d = par["mean_diff"]
    ok = par["verdict"] in P.PASSING
    vmap = {v["id"]: v for v in report["variants"]}
    causes: list[dict[str, Any]] = []

    def good(vid: str) -> dict[str, Any] | None:
        m = (vmap.get(vid) or {}).get("metrics")
        return m if m and (m["verdict"] in P.PASSING or m["mean_diff"] <= IMPROVES * base_d) else None

    def ev(vid: str, m: dict[str, Any]) -> str:
        return (
            f"variant '{vmap[vid]['label']}': {m['verdict']}, mean diff {m['mean_diff']:.2f} levels "
            f"against the bake's {base_d:.2f} (effect ratio {m.get('effect_ratio')})"
        )

    if ok:
        return [], "Parity holds: the bake renders like its runtime recipe."
    if report["warnings"] and any("double application" in w for w in report["warnings"]):
        m = good("untagged")
        causes.append(
            {
                "cause": "double-application",
                "text": "Tags of LoRAs baked into the checkpoint are still in the prompt: they apply twice.",
                "evidence": ev("untagged", m) if m else "the prompt holds the tags (see the warnings)",
                "fix": "Take the baked LoRAs' tags out of the prompt when you use the baked checkpoint.",
            }
        )
    rebake = good("rebake")
    for f in report.get("recipe_findings") or []:
        causes.append(
            {
                **f,
                "evidence": "the recipe recorded in the baked checkpoint"
                + (f"; {ev('rebake', rebake)}" if rebake else ""),
            }
        )
    if rebake and not report.get("recipe_findings") and not causes:
        causes.append(
            {
                "cause": "not-this-recipe",
                "text": "The checkpoint is not this recipe baked: lorakit's re-bake of the same recipe renders like runtime.",
                "evidence": ev("rebake", rebake),
                "fix": "Use lorakit's bake of the recipe (check the strengths, the text-encoder strengths and the base of the old bake).",
            }
        )
    fp32 = good("fp32")
    rb = (vmap.get("rebake") or {}).get("metrics")
    if fp32 and (rb is None or rb["verdict"] not in P.PASSING):
        causes.append(
            {
                "cause": "precision",
                "text": "Saving in reduced precision loses or overflows the LoRAs' deltas; the fp32 variant restores parity.",
                "evidence": ev("fp32", fp32) + (f"; at the bake's dtype: {rb['mean_diff']:.2f}" if rb else ""),
                "fix": "Save the bake as fp32 (or bf16 where fp16 overflows), or lower the strengths of the LoRA with the largest deltas.",
            }
        )
    alone = {k: v for k, v in vmap.items() if k.startswith("alone:") and v.get("metrics")}
    bad_alone = [k for k, v in alone.items() if v["metrics"]["verdict"] not in P.PASSING]
    if alone and 0 < len(bad_alone) < len(alone):
        for k in bad_alone:
            m = alone[k]["metrics"]
            name = k.split(":", 1)[1]
            causes.append(
                {
                    "cause": "lora-bakes-differently",
                    "lora": name,
                    "text": f"LoRA {name} bakes unlike it runs (baked alone it is {m['verdict']}; the other LoRAs alone match).",
                    "evidence": ev(k, m),
                    "fix": f"Drop {name} from the bake and keep it at runtime as a tag; check its format (DoRA, alpha).",
                }
            )
    for part, other in (("te", "unet"), ("unet", "te")):
        mp, mo = (vmap.get(part) or {}).get("metrics"), (vmap.get(other) or {}).get("metrics")
        if mp and mo and mp["verdict"] not in P.PASSING and mo["verdict"] in P.PASSING and not causes:
            what = "text-encoder" if part == "te" else "UNet"
            causes.append(
                {
                    "cause": f"{part}-part",
                    "text": f"The difference sits in the {what} part: baked alone it is {mp['verdict']}, the other part matches.",
                    "evidence": ev(part, mp),
                    "fix": f"Check the {what} strengths of the recipe; bake the {what} part at the runtime strengths.",
                }
            )
    sc = good("scaled")
    if sc and par["verdict"] == "stronger":
        causes.append(
            {
                "cause": "stronger",
                "text": "The bake is stronger than the runtime recipe; strengths × 0.8 restore parity.",
                "evidence": ev("scaled", sc),
                "fix": "Bake at 0.8 × the strengths.",
            }
        )
    seq = (vmap.get("sequential") or {}).get("metrics")
    if seq and rb and seq["mean_diff"] > 1.5 * max(rb["mean_diff"], P.IDENTICAL_MEAN) and not ok:
        causes.append(
            {
                "cause": "layering",
                "text": "Rounding between LoRAs (baking them one after another) adds a difference of its own.",
                "evidence": f"sequential: mean diff {seq['mean_diff']:.2f}; summed: {rb['mean_diff']:.2f}",
                "fix": "Bake all LoRAs in one pass (lorakit sums them in fp32 and rounds once).",
            }
        )
    cfg = vmap.get("cfg")
    if cfg and cfg.get("sweep") and cfg["amplification"] >= AMPLIFIES:
        s = cfg["sweep"]
        causes.append(
            {
                "cause": "cfg",
                "text": "CFG amplifies the small weight difference between bake and runtime.",
                "evidence": f"mean diff {s[0]['mean_diff']:.2f} at CFG {s[0]['cfg']:g}, {s[-1]['mean_diff']:.2f} at CFG {s[-1]['cfg']:g} (×{cfg['amplification']:.2f})",
                "fix": f"Use a lower CFG with the baked checkpoint (it matches best at CFG {s[0]['cfg']:g}).",
            }
        )
    why = (
        ""
        if causes
        else "No variant restores parity: the recipe may not bake (its LoRAs interact); keep them at runtime."
    )
    return causes, why
