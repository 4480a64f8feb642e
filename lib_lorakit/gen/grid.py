"""The LoRA strength grid: plan, evaluate, draw, summarise.

Rows are LoRAs (or the epochs of one training run), columns strengths. Column 0 is always
the baseline: the same prompt without the LoRA, the same seed. The user's prompt is kept
exactly; only the tag of the LoRA under test is taken out and set per cell, so nothing
else in the prompt changes between columns.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..errors import RecipeError
from ..prompt import strip_tags, tag_names
from .image import compare
from .run import Cell, Run
from .verdict import judge

MAX_CELLS = 2000
DEFAULT_STEP = 0.25


def parse_strengths(text: str | Sequence[float] | None, max_safe: float | None = None) -> list[float]:
    """Strengths from ``"0, 0.25, 0.5"``, ``"0-1.5:0.25"`` (a range with a step; a mix is fine) or a list.

    Empty: 0 to ``max_safe`` (default 1.0) in steps of 0.25 (the last step lands on ``max_safe``).
    0 (the baseline) is always included, first; duplicates go; order is ascending.
    """
    vals: list[float] = []
    if text is None or (isinstance(text, str) and not text.strip()):
        top = float(max_safe) if max_safe else 1.0
        n = max(1, math.ceil(top / DEFAULT_STEP - 1e-9))
        vals = [round(top * i / n, 4) for i in range(n + 1)]
    elif isinstance(text, str):
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            m = re.fullmatch(r"(-?[\d.]+)\s*-\s*(-?[\d.]+)(?::([\d.]+))?", part)
            try:
                if m:
                    a, b = float(m.group(1)), float(m.group(2))
                    step = float(m.group(3)) if m.group(3) else DEFAULT_STEP
                    if step <= 0:
                        raise ValueError
                    n = int(math.floor((b - a) / step + 1e-9))
                    if n < 0 or n > 200:
                        raise ValueError
                    vals.extend(round(a + i * step, 4) for i in range(n + 1))
                else:
                    vals.append(float(part))
            except ValueError:
                raise RecipeError(
                    f"Strengths: {part!r} is not a number or a range.",
                    fix="Write a list like 0, 0.25, 0.5 or a range like 0-1.5:0.25.",
                ) from None
    else:
        vals = [float(v) for v in text]
    bad = [v for v in vals if not math.isfinite(v) or abs(v) > 10]
    if bad:
        raise RecipeError(f"Strength {bad[0]} is out of range.", fix="Use strengths between -10 and 10.")
    return sorted({0.0, *(round(v, 4) for v in vals)})


_EPOCH_NUM = re.compile(r"(\d+)(?!.*\d)")


def epoch_of(path: str, metadata: dict[str, str] | None = None) -> int | None:
    """A LoRA file's epoch: ``ss_epoch`` in its metadata, else the last number in its file name
    (``name-000004.safetensors`` → 4)."""
    if metadata:
        try:
            return int(str(metadata.get("ss_epoch", "")).strip())
        except ValueError:
            pass
    m = _EPOCH_NUM.search(os.path.splitext(os.path.basename(path))[0])
    return int(m.group(1)) if m else None


def order_epochs(
    paths: Sequence[str], read_metadata: Callable[[str], dict[str, str]] | None = None
) -> list[tuple[str, int | None]]:
    """Files of one training run in epoch order (metadata first, then the file-name number; a file with
    neither — usually the final save — goes last)."""
    out = []
    for p in paths:
        meta = None
        if read_metadata:
            try:
                meta = read_metadata(p)
            except Exception:  # an unreadable header shows up later, when it is used
                meta = None
        out.append((p, epoch_of(p, meta)))
    return sorted(out, key=lambda x: (x[1] is None, x[1] if x[1] is not None else 0, os.path.basename(x[0])))


strip_lora = strip_tags  # the grid's name for it


def with_lora(prompt: str, name: str, strength: float) -> str:
    """The cell's prompt: the stripped prompt plus the LoRA's tag (none at strength 0)."""
    if strength == 0:
        return prompt
    sep = ", " if prompt and not prompt.rstrip().endswith(",") else (" " if prompt else "")
    return f"{prompt}{sep}<lora:{name}:{strength:g}>"


@dataclass
class GridRow:
    label: str  # the LoRA's name, or "name @ epoch N"
    lora: str  # the name the WebUI's <lora:...> tag uses
    max_safe: float | None = None
    epoch: int | None = None


@dataclass
class GridSpec:
    rows: list[GridRow]
    prompt: str | list[str]  # one prompt, or several (each gets its own baselines)
    negative_prompt: str = ""
    strengths: str | list[float] | None = None  # None/"": 0 .. each row's max-safe strength
    seeds: list[int] = field(default_factory=lambda: [1])
    checkpoint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)  # the generation profile used (profiles.record_of)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def cells(self) -> list[Cell]:
        if not self.rows:
            raise RecipeError("The grid has no LoRA.", fix="Pick at least one LoRA (or put its tag in the prompt).")
        if not self.seeds:
            raise RecipeError("The grid has no seed.")
        if not self.prompts:
            raise RecipeError("The grid has no prompt.")
        out: list[Cell] = []
        tested = [r.lora for r in self.rows]
        baselines: set[tuple[int, int]] = set()
        many = len(self.prompts) > 1
        for r in self.rows:
            for s in parse_strengths(self.strengths, r.max_safe):
                for pi, prompt in enumerate(self.prompts):
                    base = strip_lora(prompt, tested)
                    extra = {"prompt": pi} if many else {}
                    for seed in self.seeds:
                        if s == 0:
                            if (pi, seed) in baselines:
                                continue  # one baseline per prompt and seed serves every row
                            baselines.add((pi, seed))
                            out.append(
                                Cell(
                                    row="baseline",
                                    col="0",
                                    prompt=base,
                                    negative_prompt=self.negative_prompt,
                                    seed=int(seed),
                                    checkpoint=self.checkpoint,
                                    lora=None,
                                    strength=0.0,
                                    settings=dict(self.settings),
                                    extra=dict(extra),
                                )
                            )
                            continue
                        ex = dict(extra)
                        if r.epoch is not None:
                            ex["epoch"] = r.epoch
                        out.append(
                            Cell(
                                row=r.label,
                                col=f"{s:g}",
                                prompt=with_lora(base, r.lora, s),
                                negative_prompt=self.negative_prompt,
                                seed=int(seed),
                                checkpoint=self.checkpoint,
                                lora=r.lora,
                                strength=s,
                                settings=dict(self.settings),
                                extra=ex,
                            )
                        )
        if len(out) > MAX_CELLS:
            raise RecipeError(
                f"The grid would make {len(out)} images (limit {MAX_CELLS}).",
                fix="Use fewer LoRAs, strengths, prompts or seeds.",
            )
        return out


def _sample(c: Cell) -> tuple[int, int]:
    """Which baseline a cell is compared with: (prompt index, seed)."""
    return (int(c.extra.get("prompt", 0)), c.seed)


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(run: Run) -> dict[str, Any]:
    """Compare every image with its seed's baseline and give each row its verdict (images are read
    only through the manifest)."""
    res = run.results()
    cells = run.cells
    base: dict[tuple[int, int], tuple[Cell, dict]] = {
        _sample(c): (c, res[c.key])
        for c in cells
        if c.row == "baseline" and c.key in res and res[c.key]["status"] == "ok"
    }
    base_img = {k: run.load_image(ev) for k, (_, ev) in base.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        if c.row == "baseline":
            continue
        ev = res.get(c.key)
        entry: dict[str, Any] = {"strength": c.strength, "seed": c.seed, "status": "missing"}
        if ev and ev["status"] == "ok":
            entry["status"] = ev["check"]["status"]
            if _sample(c) in base:
                entry["baseline_status"] = base[_sample(c)][1]["check"]["status"]
                entry["metrics"] = compare(run.load_image(ev), base_img[_sample(c)])
        elif ev:
            entry["status"] = "failed"
        rows.setdefault(c.row, []).append(entry)
    verdicts = {}
    for row, entries in rows.items():
        usable = [e for e in entries if "metrics" in e]
        v = judge(usable)
        gaps = [e for e in entries if "metrics" not in e]
        if gaps:
            v["text"] += f" ({len(gaps)} image(s) failed or missing; judged on the rest)"
            v["incomplete"] = len(gaps)
        verdicts[row] = v
    return {"verdicts": verdicts}


# --- drawing ------------------------------------------------------------------------------------

BADGE = {
    "black": (20, 20, 20),
    "blank": (90, 90, 160),
    "blown-out": (230, 120, 0),
    "failed": (200, 0, 0),
    "missing": (120, 120, 120),
}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(run: Run, verdicts: dict[str, Any] | None = None, max_cell: int = 256) -> Image.Image:
    """One labelled picture: a row per LoRA/epoch (and seed), a column per strength, the baseline
    at 0 in every row. Flagged, failed and missing cells carry a visible badge."""
    res = run.results()
    cells = run.cells
    cols = sorted({float(c.col) for c in cells})
    samples = sorted({_sample(c) for c in cells})
    rows = [r for r in dict.fromkeys(c.row for c in cells) if r != "baseline"]
    at: dict[tuple[str, float, tuple[int, int]], Cell] = {(c.row, float(c.col), _sample(c)): c for c in cells}
    sizes = [(c.settings.get("width") or 512, c.settings.get("height") or 512) for c in cells]
    w0, h0 = sizes[0]
    scale = min(1.0, max_cell / max(w0, h0))
    cw, ch = max(32, int(w0 * scale)), max(32, int(h0 * scale))
    font, small = _font(max(12, ch // 12)), _font(max(10, ch // 16))
    left, top, pad = max(140, cw), 36, 4
    vh = 0 if not verdicts else 22
    lines = [(r, sm) for r in rows for sm in samples]
    W = left + len(cols) * (cw + pad) + pad
    H = top + len(lines) * (ch + pad) + len(rows) * vh + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for j, s in enumerate(cols):
        d.text((left + j * (cw + pad) + 4, 8), "baseline (0)" if s == 0 else f"{s:g}", fill=(0, 0, 0), font=font)
    many_p = len({p for p, _ in samples}) > 1
    y = top - (ch + pad)
    for i, (r, sm) in enumerate(lines):
        y += ch + pad + (vh if i and sm == samples[0] else 0)
        label = r if len(samples) == 1 else f"{r}\n" + (f"prompt {sm[0] + 1}, " if many_p else "") + f"seed {sm[1]}"
        d.multiline_text((6, y + 4), _wrap(label, 18), fill=(0, 0, 0), font=small)
        for j, s in enumerate(cols):
            x = left + j * (cw + pad)
            c = at.get(("baseline", 0.0, sm)) if s == 0 else at.get((r, s, sm))
            ev = res.get(c.key) if c else None
            status = "missing" if c is None or ev is None else ("failed" if ev["status"] == "failed" else "ok")
            if status == "ok":
                im = run.load_image(ev).convert("RGB").resize((cw, ch))
                grid.paste(im, (x, y))
                status = ev["check"]["status"]
            else:
                d.rectangle([x, y, x + cw - 1, y + ch - 1], fill=(235, 235, 235))
            if status != "ok":
                d.rectangle([x, y, x + cw - 1, y + ch - 1], outline=BADGE[status], width=4)
                d.rectangle([x, y + ch - 22, x + cw - 1, y + ch - 1], fill=BADGE[status])
                d.text((x + 6, y + ch - 20), status.upper(), fill=(255, 255, 255), font=small)
        if verdicts and r in verdicts and sm == samples[-1]:
            text = verdicts[r]["text"].translate(_ASCII)
            d.text((left, y + ch + 3), text[: max(20, (W - left) // 6)], fill=(60, 60, 60), font=small)
    return grid


_ASCII = str.maketrans({"→": "->", "≥": ">=", "–": "-", "×": "x", "—": "-"})  # the bundled font's glyphs


def _wrap(text: str, width: int) -> str:
    out, line = [], ""
    for word in re.split(r"(\s+|(?<=[-_/]))", text):
        if len(line) + len(word) > width and line:
            out.append(line)
            line = word.lstrip()
        else:
            line += word
    out.append(line)
    return "\n".join(out[:4])


def summary_markdown(run: Run, verdicts: dict[str, Any], grid_file: str | None = None) -> str:
    rec = run.record()
    cells = run.cells
    settings = cells[0].settings if cells else {}
    lines = [f"# Strength grid {run.id}", ""]
    bases = [c for c in cells if c.row == "baseline"]
    for p in dict.fromkeys(c.prompt for c in bases):
        lines.append(f"- Prompt (baseline): `{p}`")
    if bases:
        lines.append(f"- Negative: `{bases[0].negative_prompt}`")
    lines += [
        f"- Seeds: {', '.join(str(s) for s in sorted({c.seed for c in cells}))}",
        f"- Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}",
    ]
    prof = run.plan.get("meta", {}).get("profile")
    if prof:
        lines.append(
            f"- Profile: {prof.get('label')} (`{prof.get('profile')}`): {prof.get('reason')}"
            + (f"; changed by you: {', '.join(prof['overridden'])}" if prof.get("overridden") else "")
        )
        lines += [f"- Note: {n}" for n in prof.get("notes") or []]
    if rec:
        lines.append(
            f"- Images: {rec.get('ok')} ok, {rec.get('failed')} failed, {rec.get('missing')} missing, "
            f"{rec.get('flagged')} flagged; {rec.get('model_switches')} model switch(es), "
            f"{rec.get('seconds_per_image')} s per image"
        )
        for w in rec.get("warnings") or []:
            lines.append(f"- Warning: {w}")
    if grid_file:
        lines += ["", f"![grid]({grid_file})"]
    lines += ["", "| LoRA | verdict |", "|---|---|"]
    for row, v in verdicts.items():
        lines.append(f"| {row} | **{v['case']}** — {v['text']} |")
    lines += ["", "Thresholds: see the README (Strength grid → verdicts)."]
    return "\n".join(lines) + "\n"


def finish(run: Run, max_cell: int = 256) -> dict[str, Any]:
    """Evaluate, draw ``grid.png`` and write ``summary.md`` and ``verdicts.json`` into the run folder."""
    import json

    from .run import _atomic_write

    ev = evaluate(run)
    grid = draw_grid(run, ev["verdicts"], max_cell=max_cell)
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    _atomic_write(os.path.join(run.dir, "grid.png"), buf.getvalue())
    _atomic_write(os.path.join(run.dir, "verdicts.json"), json.dumps(ev["verdicts"], indent=1).encode())
    md = summary_markdown(run, ev["verdicts"], "grid.png")
    _atomic_write(os.path.join(run.dir, "summary.md"), md.encode())
    return {
        "run_dir": run.dir,
        "grid": os.path.join(run.dir, "grid.png"),
        "summary": os.path.join(run.dir, "summary.md"),
        "verdicts": ev["verdicts"],
        "record": run.record(),
        "grid_image": grid,
    }


# --- from user input to a grid ----------------------------------------------------------------------

_RUN_KEY = re.compile(r"[-_. ]?(?:e|ep|epoch)?[-_]?\d+$", re.I)


def run_key(path: str) -> str:
    """A training run's name from one of its files: the file name without extension and without a
    trailing epoch number (``mychar-000004`` → ``mychar``)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return _RUN_KEY.sub("", stem) or stem


def epoch_files(lora, loras) -> list:
    """The files of ``lora``'s training run among ``loras`` (same folder, same run name), in epoch order."""
    from ..formats.sources import open_header

    key, folder = run_key(lora.path), os.path.dirname(os.path.realpath(lora.path))
    sib = [e for e in loras if run_key(e.path) == key and os.path.dirname(os.path.realpath(e.path)) == folder]
    by_path = {e.path: e for e in sib}

    def meta(p: str) -> dict[str, str]:
        return open_header(p).metadata if p.lower().endswith(".safetensors") and os.path.isfile(p) else {}

    return [(by_path[p], ep) for p, ep in order_epochs(list(by_path), meta)]


def inspect_for_grid(
    path: str, checkpoint_path: str | None, settings: dict[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """The inspector's report for a LoRA, against the checkpoint when its header can be read (for the
    cross-lineage ceiling), else alone; ({}, notes) when the LoRA cannot be read from here."""
    from ..errors import LorakitError
    from ..inspect import inspect_file

    if not path or not os.path.isfile(path):
        return {}, [f"{path or 'the LoRA'}: not readable from here, so no inspector facts"]
    notes: list[str] = []
    if checkpoint_path and os.path.isfile(checkpoint_path):
        try:
            return inspect_file(path, checkpoint=checkpoint_path, settings=settings), notes
        except LorakitError as e:
            notes.append(f"checkpoint not used for lineage checks: {str(e).splitlines()[0]}")
    try:
        return inspect_file(path, settings=settings), notes
    except LorakitError as e:
        return {}, notes + [f"inspector: {str(e).splitlines()[0]}"]


def max_safe_for(path: str, checkpoint_path: str | None, settings: dict[str, Any] | None) -> tuple[float | None, str]:
    """The inspector's max-safe strength for a LoRA (with cross-lineage ceilings against the checkpoint),
    and why; (None, reason) when the file cannot be inspected here."""
    rep, notes = inspect_for_grid(path, checkpoint_path, settings)
    if not rep:
        return None, "; ".join(notes)
    return max_safe_of(rep)


def max_safe_of(rep: dict[str, Any]) -> tuple[float | None, str]:
    """The max-safe strength in an inspector report, and why."""
    return rep.get("max_safe_strength"), f"{rep.get('category')}: {rep.get('max_safe_reason', 'inspector')}"


def build_spec(
    loras_listed,
    *,
    loras: Sequence[str],
    prompt: str,
    negative_prompt: str = "",
    strengths: str | Sequence[float] | None = None,
    epochs: bool = False,
    seeds: Sequence[int] = (1,),
    checkpoint: str | None = None,
    checkpoint_path: str | None = None,
    settings: dict[str, Any] | None = None,
    inspector_settings: dict[str, Any] | None = None,
    profile: str | None = None,
) -> tuple[GridSpec, list[str]]:
    """A :class:`GridSpec` from what a user gives: LoRA names (or none: those tagged in the prompt),
    strengths (or none: up to each LoRA's max-safe strength), epochs mode, seeds. Returns the spec and
    notes for the report.

    The generation settings are the checkpoint's profile (:func:`~lib_lorakit.gen.profiles.settings_for`,
    or the named ``profile``) with ``settings`` on top; an empty negative prompt becomes the profile's."""
    from .backend import resolve_name
    from .profiles import record_of, settings_for

    names = [n for n in loras if n and n.strip()]
    notes: list[str] = []
    if not names:
        names = tag_names(prompt)
        if names:
            notes.append(f"LoRAs from the prompt's tags: {', '.join(names)}")
    if not names:
        raise RecipeError("No LoRA to test.", fix="Pick LoRAs, or put <lora:name:1> tags in the prompt.")
    rows: list[GridRow] = []
    for n in dict.fromkeys(names):
        info = resolve_name(n, list(loras_listed), "LoRA")
        files = epoch_files(info, loras_listed) if epochs else [(info, None)]
        if epochs and len(files) < 2:
            notes.append(f"{info.name}: no other epochs of its run ({run_key(info.path)}*) next to it")
        for f, ep in files:
            cap, why = (None, "") if strengths else max_safe_for(f.path, checkpoint_path, inspector_settings)
            if not strengths:
                notes.append(
                    f"{f.name}: strengths up to {cap if cap else 1.0:g} "
                    f"({'max-safe for ' + why if cap else why or 'default'})"
                )
            label = f.name if ep is None or not epochs else f"{f.name} (epoch {ep})"
            rows.append(GridRow(label=label, lora=f.name, max_safe=cap, epoch=ep))
    chosen = settings_for(checkpoint_path, settings, profile=profile, settings=inspector_settings)
    notes.append(f"generation profile {chosen['label']} ({chosen['reason']})")
    spec = GridSpec(
        rows=rows,
        prompt=prompt,
        negative_prompt=negative_prompt or chosen["negative"],
        strengths=strengths,
        seeds=[int(s) for s in seeds],
        checkpoint=checkpoint,
        settings=dict(chosen["settings"]),
        profile=record_of(chosen),
    )
    return spec, notes


MAX_SEEDS = 50


def parse_seeds(text: str | Sequence[int] | None, default: int = 1) -> list[int]:
    """Seeds from ``"1, 2, 3"`` or ``"3x"`` (three seeds from 1) or a list; never -1 (a grid must be
    reproducible)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return [default]
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*[x×]\s*", text)
        if m:
            if int(m.group(1)) > MAX_SEEDS:
                raise RecipeError(
                    f"Seeds: {text.strip()!r} asks for {int(m.group(1))} seeds; at most {MAX_SEEDS}.",
                    fix=f"Use at most {MAX_SEEDS}x: every seed multiplies the images to make.",
                )
            return [default + i for i in range(int(m.group(1)))]
        try:
            vals = [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
        except ValueError:
            raise RecipeError(f"Seeds: {text!r} is not a list of whole numbers.", fix="Write 1, 2, 3 or 3x.") from None
    else:
        vals = [int(v) for v in text]
    if len(vals) > MAX_SEEDS:
        raise RecipeError(
            f"Seeds: {len(vals)} given; at most {MAX_SEEDS}.",
            fix="Every seed multiplies the images to make: use fewer.",
        )
    if any(v < 0 for v in vals):
        raise RecipeError("Seeds must be fixed (0 or more), not -1: the baseline and every strength share a seed.")
    return list(dict.fromkeys(vals))


def profile_record(settings: dict[str, Any], profile: dict[str, Any] | None) -> dict[str, Any]:
    """The fields a run record (``run.json``) keeps about what it generated with."""
    out: dict[str, Any] = {"settings": dict(settings)}
    if profile:
        out["profile"] = profile.get("profile")
        out["profile_detail"] = dict(profile)
    return out


def run_grid(
    backend,
    spec: GridSpec,
    outputs_dir: str,
    *,
    notes: Sequence[str] = (),
    kind: str = "grid",
    progress=None,
    cancel=None,
    max_cell: int = 256,
) -> dict[str, Any]:
    """Plan, generate, judge and draw a strength grid in a new run folder."""
    import time

    from .run import execute, update_record

    t0 = time.perf_counter()
    meta = {"notes": list(notes), "backend": backend.kind}
    if spec.profile:
        meta["profile"] = spec.profile
    run = Run.create(outputs_dir, kind, spec.cells(), meta=meta)
    rec = execute(run, backend, progress=progress, cancel=cancel)
    t1 = time.perf_counter()
    out = finish(run, max_cell=max_cell)
    t2 = time.perf_counter()
    # the whole run's own cost: planning, pre-flight, checks, files, manifest, evaluation, grid
    out["record"] = update_record(
        run,
        seconds_finish=round(t2 - t1, 3),
        seconds_total=round(t2 - t0, 3),
        seconds_lorakit_total=round(t2 - t0 - rec["seconds_generating"], 3),
        **profile_record(spec.settings, spec.profile),
    )
    out["notes"] = list(notes)
    return out
