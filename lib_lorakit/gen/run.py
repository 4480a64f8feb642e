"""Generation runs that cannot mislabel.

A run is a folder of its own — ``<outputs>/lorakit/<kind>/<YYYYmmdd-HHMMSS>-<id>/`` — with

- ``plan.json``: the cells (written once, atomically). A cell's ``key`` is a hash of everything
  that defines it (row, column, prompt, negative prompt, seed, checkpoint, LoRA, strength,
  settings), never its position;
- ``manifest.jsonl``: one line per event, appended and fsynced as each image lands: the
  pre-flight (names resolved to files and hashes), then for every cell ``ok`` (image file, its
  SHA-256, checkpoint name and hash, infotext, post-check) or ``failed`` (the error);
- ``images/<random id>.png``: opaque names; each PNG carries its infotext (``parameters``, as the
  WebUI writes it) and its cell (``lorakit``);
- ``run.json``: the record (counts, model switches, seconds per image), rewritten at the end.

A failed cell is recorded as failed and shifts nothing. Running a run again fills only the cells
without a verified image. Images are found only through the manifest — a file in the folder that
the manifest does not name (or whose hash does not match) is never read.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import Cancelled, LorakitError, RecipeError
from ..fsutil import atomic_write
from ..prompt import tag_names
from .backend import Backend, GenError, ModelInfo, resolve_name
from .emphasis import emphasis_warning
from .image import check_image

PLAN = "plan.json"
MANIFEST = "manifest.jsonl"
RECORD = "run.json"
IMAGES = "images"
SETTINGS_KEYS = ("steps", "cfg_scale", "width", "height", "sampler_name", "scheduler", "clip_skip", "cfg_rescale")


@dataclass
class Cell:
    """One image to make. ``row``/``col`` are display labels; the key is content-derived."""

    row: str
    col: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    checkpoint: str | None = None  # None: whatever the host has loaded when the run starts
    lora: str | None = None  # the LoRA under test, when there is one
    strength: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific (epoch, prompt index, hidden label)

    @property
    def key(self) -> str:
        d = asdict(self)
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        c = cls(**{k: v for k, v in d.items() if k != "key"})
        if d.get("key") and d["key"] != c.key:
            raise RecipeError(
                f"plan.json: cell {d['key']} does not match its contents (the plan was edited).",
                fix="Start a new run instead of editing a run's plan.",
            )
        return c


def _atomic_write(path: str, data: bytes) -> None:
    atomic_write(path, data)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """A run folder: its plan, its manifest, its images."""

    def __init__(self, path: str):
        self.dir = os.path.abspath(path)
        plan_path = os.path.join(self.dir, PLAN)
        try:
            with open(plan_path, encoding="utf-8") as f:
                self.plan = json.load(f)
        except FileNotFoundError:
            raise RecipeError(f"{self.dir} is not a lorakit run (no {PLAN}).") from None
        except ValueError as e:
            raise RecipeError(f"{plan_path}: not valid JSON ({e}).") from None
        self.cells = [Cell.from_dict(c) for c in self.plan["cells"]]
        self._lock = threading.Lock()

    # --- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, outputs_dir: str, kind: str, cells: Sequence[Cell], meta: dict[str, Any] | None = None) -> Run:
        """A new run folder under ``outputs_dir/lorakit/<kind>/`` (never an existing one)."""
        if not cells:
            raise RecipeError("Nothing to generate: the plan has no cells.")
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            dup = next(c for c in cells if keys.count(c.key) > 1)
            raise RecipeError(f"The plan has the same cell twice ({dup.row} / {dup.col}, seed {dup.seed}).")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", kind):
            raise RecipeError(f"Bad run kind {kind!r}.")
        root = os.path.join(outputs_dir, "lorakit", kind)
        os.makedirs(root, exist_ok=True)
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        path = os.path.join(root, run_id)
        os.makedirs(os.path.join(path, IMAGES))  # fails if it exists: never reuse a folder
        plan = {
            "format": "lorakit-run/1",
            "id": run_id,
            "kind": kind,
            "created": _now(),
            "meta": meta or {},
            "cells": [c.as_dict() for c in cells],
        }
        _atomic_write(os.path.join(path, PLAN), json.dumps(plan, indent=1).encode())
        open(os.path.join(path, MANIFEST), "ab").close()
        return cls(path)

    @property
    def id(self) -> str:
        return self.plan["id"]

    @property
    def kind(self) -> str:
        return self.plan["kind"]

    # --- the manifest ---------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        """Every manifest line that parses (a torn last line from a crash is ignored)."""
        out = []
        try:
            with open(os.path.join(self.dir, MANIFEST), encoding="utf-8") as f:
                for line in f:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue
        except FileNotFoundError:
            pass
        return out

    def append(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            fd = os.open(os.path.join(self.dir, MANIFEST), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def results(self, verify: bool = True) -> dict[str, dict[str, Any]]:
        """The latest outcome per cell key. An ``ok`` whose image is missing or altered (hash) is dropped
        (``verify``), so a re-run makes it again."""
        keys = {c.key for c in self.cells}
        latest: dict[str, dict[str, Any]] = {}
        for ev in self.events():
            if ev.get("event") == "cell" and ev.get("cell") in keys:
                if ev["status"] == "ok" or latest.get(ev["cell"], {}).get("status") != "ok":
                    latest[ev["cell"]] = ev
        if verify:
            for k, ev in list(latest.items()):
                if ev["status"] == "ok" and not self._verified(ev):
                    del latest[k]
        return latest

    def _verified(self, ev: dict[str, Any]) -> bool:
        path = self.image_path(ev)
        try:
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest() == ev.get("sha256")
        except OSError:
            return False

    def image_path(self, ev: dict[str, Any]) -> str:
        name = ev["image"]
        if os.path.basename(name) != name or not re.fullmatch(r"[0-9a-f]{32}\.png", name):
            raise RecipeError(f"{self.dir}/{MANIFEST}: image name {name!r} is not one lorakit writes.")
        return os.path.join(self.dir, IMAGES, name)

    def load_image(self, ev: dict[str, Any]) -> Image.Image:
        img = Image.open(self.image_path(ev))
        img.load()
        return img

    def missing(self) -> list[Cell]:
        done = {k for k, ev in self.results().items() if ev["status"] == "ok"}
        return [c for c in self.cells if c.key not in done]

    def record(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.dir, RECORD), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}


# --- pre-flight -------------------------------------------------------------------------------


@dataclass
class Preflight:
    checkpoints: dict[str, ModelInfo]  # requested name -> resolved (None key: the loaded one)
    loras: dict[str, ModelInfo]
    warnings: list[str]

    def as_event(self) -> dict[str, Any]:
        return {
            "event": "preflight",
            "time": _now(),
            "checkpoints": {str(k): asdict(v) for k, v in self.checkpoints.items()},
            "loras": {k: asdict(v) for k, v in self.loras.items()},
            "warnings": self.warnings,
        }


def preflight(cells: Iterable[Cell], backend: Backend) -> Preflight:
    """Refresh the host's lists, resolve every checkpoint and LoRA to a file and hash (unknown names
    are refused with the nearest matches), and warn about prompts with heavy emphasis."""
    cells = list(cells)
    backend.refresh()
    ckpts = backend.checkpoints()
    loras = backend.loras()
    res_c: dict[str, ModelInfo] = {}
    for name in sorted({c.checkpoint or "" for c in cells}):
        if not name:
            cur = backend.current_checkpoint()
            if not cur:
                raise GenError("The WebUI has no checkpoint loaded and the plan names none.", fix="Pick a checkpoint.")
            res_c[""] = resolve_name(cur, ckpts, "checkpoint")
        else:
            res_c[name] = resolve_name(name, ckpts, "checkpoint")
    res_l: dict[str, ModelInfo] = {}
    names = {c.lora for c in cells if c.lora}
    for c in cells:
        names.update(tag_names(c.prompt))
    files_named: dict[str, list[str]] = {}
    for e in loras:
        files_named.setdefault(e.name, []).append(e.path)
    warnings: list[str] = []
    for name in sorted(names):
        res_l[name] = info = resolve_name(name, loras, "LoRA")
        if len(files_named.get(info.name, [])) > 1:
            warnings.append(
                f"LoRA name {info.name!r} belongs to {len(files_named[info.name])} files "
                f"({', '.join(files_named[info.name])}); the WebUI picks one of them. Rename the others."
            )
    seen: set[str] = set()
    for c in cells:
        for text, where in ((c.prompt, "prompt"), (c.negative_prompt, "negative prompt")):
            if text in seen:
                continue
            seen.add(text)
            w = emphasis_warning(text, f"{where} {text[:40]!r}")
            if w:
                warnings.append(w)
    return Preflight(res_c, res_l, warnings)


# --- infotext checks ----------------------------------------------------------------------------


def _infotext_field(info: str, name: str) -> str | None:
    m = re.search(rf"(?:^|, ){re.escape(name)}: (\"(?:[^\"\\]|\\.)*\"|[^,\n]*)", info.splitlines()[-1] if info else "")
    if not m:
        return None
    v = m.group(1)
    return v[1:-1] if v.startswith('"') else v


def infotext_problem(info: str, checkpoint: ModelInfo, lora: ModelInfo | None) -> str | None:
    """Why an image's infotext says it was not made as asked (another model; a LoRA not applied)."""
    if not info:
        return None
    model = _infotext_field(info, "Model")
    if model is not None:
        ok = {os.path.splitext(n)[0].split(" [")[0].lower() for n in checkpoint.names() if n}
        if model.lower() not in ok and os.path.splitext(model)[0].lower() not in ok:
            return f"the WebUI generated with checkpoint {model!r}, not {checkpoint.name!r}"
    if lora is not None:
        hashes = _infotext_field(info, "Lora hashes")
        if hashes is not None:
            applied = {h.split(":")[0].strip().lower() for h in hashes.split(",")}
            if not applied & {n.lower() for n in lora.names()}:
                return f"the WebUI did not apply LoRA {lora.name!r} (its infotext lists {hashes!r})"
    return None


# --- execution ----------------------------------------------------------------------------------


def _png_bytes(img: Image.Image, infotext: str, cell: Cell, run_id: str) -> bytes:
    info = PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    info.add_text("lorakit", json.dumps({"run": run_id, "cell": cell.key, "row": cell.row, "col": cell.col}))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def order_cells(cells: Sequence[Cell], current: str | None) -> list[Cell]:
    """Cells grouped so each checkpoint is loaded once, the one already loaded first; plan order within."""
    first: dict[str, int] = {}
    for i, c in enumerate(cells):
        first.setdefault(c.checkpoint or "", i)

    def rank(c: Cell) -> tuple[int, int]:
        ck = c.checkpoint or ""
        return (0 if (not ck or ck == current) else 1, first[ck])

    return sorted(cells, key=rank)


def work_of(run: Run, only: Iterable[str] | None = None) -> tuple[list[Cell], list[Cell]]:
    """The cells to make now (missing ones, of ``only``'s keys when given) and the cells whose files the
    pre-flight checks (all of the run's, or ``only``'s)."""
    todo, scope = run.missing(), run.cells
    if only is not None:
        keys = set(only)
        todo = [c for c in todo if c.key in keys]
        scope = [c for c in scope if c.key in keys]
    return todo, scope


def execute(
    run: Run,
    backend: Backend,
    *,
    progress: Callable[[float, str], None] | None = None,
    cancel: threading.Event | None = None,
    check_infotext: bool = True,
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Make every missing image of ``run`` (``only``: of the cells with these keys, e.g. those whose
    checkpoint exists now); returns the run record (also written to ``run.json``).

    Raises :class:`~lib_lorakit.errors.Cancelled` when ``cancel`` is set (the manifest stays
    consistent: a re-run continues where it stopped).
    """
    if getattr(backend, "kind", "") == "pool":  # several WebUIs (or batches): the pool's scheduler
        return backend.execute(run, progress=progress, cancel=cancel, check_infotext=check_infotext, only=only)
    todo, scope = work_of(run, only)
    pf = preflight(scope, backend)
    run.append(pf.as_event())
    current = backend.current_checkpoint()
    cur_name = next((k for k, v in pf.checkpoints.items() if v.name == current), None)
    todo = order_cells(todo, cur_name)
    t_start = time.perf_counter()
    switches, made, failed, times = 0, 0, 0, []
    in_backend = [0.0]
    loaded = current
    for i, cell in enumerate(todo):
        if cancel is not None and cancel.is_set():
            _write_record(run, pf, switches, made, failed, times, t_start, in_backend[0], cancelled=True)
            raise Cancelled(f"Run {run.id} cancelled after {made} image(s); run it again to continue.")
        ck = pf.checkpoints[cell.checkpoint or ""]
        lora = pf.loras.get(cell.lora) if cell.lora else None
        if progress:
            progress(i / max(1, len(todo)), f"image {i + 1}/{len(todo)}: {cell.row} / {cell.col}")
        if ck.name != loaded:
            switches += 1
            loaded = ck.name
        req = {
            "prompt": cell.prompt,
            "negative_prompt": cell.negative_prompt,
            "seed": cell.seed,
            "checkpoint": ck.name,
            **{k: v for k, v in cell.settings.items() if k in SETTINGS_KEYS},
        }
        t0 = time.perf_counter()
        base = {
            "event": "cell",
            "cell": cell.key,
            "row": cell.row,
            "col": cell.col,
            "checkpoint": ck.name,
            "checkpoint_hash": ck.hash,
            "lora_file": lora.path if lora else None,
            "lora_hash": lora.hash if lora else None,
        }
        try:
            try:
                out = backend.txt2img(req)
            finally:
                in_backend[0] += time.perf_counter() - t0
            problem = (
                infotext_problem(out.infotext, ck, lora if (cell.strength or 0) != 0 else None)
                if check_infotext
                else None
            )
            if problem:
                raise GenError(problem)
        except (LorakitError, OSError, ValueError, RuntimeError) as e:
            failed += 1
            run.append(
                {
                    **base,
                    "status": "failed",
                    "error": str(e).splitlines()[0][:500],
                    "time": _now(),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            continue
        times.append(store_image(run, cell, out, base, t0))
        made += 1
    if progress:
        progress(1.0, f"{made} image(s) made, {failed} failed")
    return _write_record(run, pf, switches, made, failed, times, t_start, in_backend[0])


def store_image(run: Run, cell: Cell, out: Any, base: dict[str, Any], t0: float) -> float:
    """Write a cell's image (atomically, an opaque name) and its ``ok`` line; the seconds since ``t0``."""
    chk = check_image(out.image)
    data = _png_bytes(out.image, out.infotext, cell, run.id)
    name = secrets.token_hex(16) + ".png"
    _atomic_write(os.path.join(run.dir, IMAGES, name), data)
    dt = time.perf_counter() - t0
    run.append(
        {
            **base,
            "status": "ok",
            "image": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "seed": out.seed,
            "infotext": out.infotext,
            "check": chk.as_dict(),
            "time": _now(),
            "seconds": round(dt, 3),
        }
    )
    return dt


def infotext_seed(info: str) -> int | None:
    """The seed an image's infotext reports (None when it names none)."""
    v = _infotext_field(info, "Seed")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def update_record(run: Run, **fields: Any) -> dict[str, Any]:
    """Add fields to ``run.json`` (atomically)."""
    rec = {**run.record(), **fields}
    _atomic_write(os.path.join(run.dir, RECORD), json.dumps(rec, indent=1).encode())
    return rec


def _write_record(
    run: Run,
    pf: Preflight,
    switches: int,
    made: int,
    failed: int,
    times: list[float],
    t_start: float,
    in_backend: float,
    cancelled: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    res = run.results()
    rec = {
        "id": run.id,
        "kind": run.kind,
        "dir": run.dir,
        "cells": len(run.cells),
        "ok": sum(r["status"] == "ok" for r in res.values()),
        "failed": sum(r["status"] == "failed" for r in res.values()),
        "missing": len(run.cells) - len(res),
        "made_now": made,
        "failed_now": failed,
        "model_switches": switches,
        "seconds": round(time.perf_counter() - t_start, 3),
        "seconds_generating": round(in_backend, 3),  # inside the WebUI's txt2img
        "seconds_lorakit": round(time.perf_counter() - t_start - in_backend, 3),  # checks, files, manifest
        "seconds_per_image": round(sum(times) / len(times), 3) if times else None,
        "flagged": sum(r["status"] == "ok" and r["check"]["status"] != "ok" for r in res.values()),
        "warnings": pf.warnings,
        "cancelled": cancelled,
        "updated": _now(),
        **(extra or {}),
    }
    _atomic_write(os.path.join(run.dir, RECORD), json.dumps(rec, indent=1).encode())
    return rec
