"""LoRA triage: one test image per LoRA at its max-safe strength beside a no-LoRA baseline,
a YES/MAYBE/NO decision each, a report, and a reversible archive of the NOs.

Planning reads every LoRA's header through the inspector (category, trigger, max-safe
strength, architecture). A LoRA of another architecture than the checkpoint, or one that
cannot be read, is listed as skipped with the reason. Prompts come per category
(editable); the trigger is added for trigger-dependent LoRAs. Baselines are shared: one
per distinct prompt and seed. Images go through the generation pipeline (a run folder with
a manifest), decisions into the SQLite store.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import LorakitError, RecipeError
from ..gen.profiles import category_prompt, category_prompts, compose
from ..gen.run import Cell, Run
from .store import DECISIONS, Store

DEFAULT_PROMPTS: dict[str, str] = category_prompts(style="natural")  # booru forms: gen/profiles.json
SIDECAR_SUFFIXES = (
    ".json",
    ".civitai.info",
    ".info",
    ".txt",
    ".yaml",
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".preview.png",
    ".preview.jpg",
    ".preview.jpeg",
    ".preview.webp",
    ".preview.gif",
)


def plan(
    reports: Sequence[dict[str, Any]],
    *,
    names: dict[str, str],
    checkpoint_arch: str | None,
    prompts: dict[str, str] | None = None,
    seeds: Sequence[int] = (1,),
    strength: float | None = None,
    negative_prompt: str = "",
    checkpoint: str | None = None,
    settings: dict[str, Any] | None = None,
    arch: str | None = None,
    category: str | None = None,
    name_filter: str | None = None,
    profile: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], list[Cell]]:
    """Items (one per LoRA, skipped ones included with the reason) and the cells to generate.

    ``reports``: inspector reports; ``names``: file -> the WebUI's tag name. Filters: ``arch``
    (sd15/sdxl), ``category``, ``name_filter`` (a substring or a regular expression).
    ``profile``: the checkpoint's generation profile (:func:`~lib_lorakit.gen.profiles.settings_for`):
    its prompt style, quality tags, trigger position and negative prompt. A prompt you give for a
    category is used as written (the trigger still goes where the lineage puts it).
    """
    table = {**(category_prompts(profile) if profile else DEFAULT_PROMPTS), **(prompts or {})}
    mine = set(prompts or {})
    if profile and not negative_prompt:
        negative_prompt = profile.get("negative", "")
    rx = re.compile(name_filter, re.I) if name_filter else None
    items: list[dict[str, Any]] = []
    cells: list[Cell] = []
    baselines: dict[tuple[str, int], Cell] = {}
    for rep in reports:
        path = rep["file"]
        name = names.get(path) or os.path.splitext(os.path.basename(path))[0]
        if rx and not (rx.search(name) or rx.search(path)):
            continue
        it: dict[str, Any] = {"lora": name, "path": path, "size": _size(path)}
        if "error" in rep:
            items.append({**it, "skipped": f"cannot be read: {rep['error'].splitlines()[0]}"})
            continue
        if rep.get("file_type") == "checkpoint":
            items.append({**it, "skipped": "a checkpoint, not a LoRA"})
            continue
        if arch and rep.get("architecture") != arch:
            continue
        if category and rep.get("category") != category:
            continue
        it.update(
            architecture=rep.get("architecture"),
            category=rep.get("category"),
            kind=rep.get("kind"),
            trigger=rep.get("trigger"),
            warnings=list(rep.get("warnings") or []),
            training_review=[f["text"] for f in rep.get("training_review") or []],
            strength=float(strength if strength is not None else rep.get("max_safe_strength") or 0.8),
            strength_reason="set by you" if strength is not None else rep.get("max_safe_reason", ""),
        )
        if checkpoint_arch and rep.get("architecture") != checkpoint_arch:
            items.append({**it, "skipped": f"a {rep.get('architecture')} LoRA; the checkpoint is {checkpoint_arch}"})
            continue
        cat = rep.get("category") or "unknown"
        cat = cat if cat in table else "unknown"
        trig = it["trigger"] if it["trigger"] and it["kind"] == "trigger-dependent" else None
        if profile is None:
            prompt = f"{trig}, {table[cat]}" if trig else table[cat]
        elif cat in mine:
            prompt = compose(table[cat], trigger=trig, trigger_position=profile.get("trigger_position", "first"))
        else:
            prompt = category_prompt(profile, cat, trig, body=table[cat])
        it["prompt"] = prompt
        it["cells"], it["baselines"] = [], []
        for seed in seeds:
            b = baselines.get((prompt, seed))
            if b is None:
                b = Cell(
                    row="baseline",
                    col=f"p{len(baselines)}",
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    seed=int(seed),
                    checkpoint=checkpoint,
                    strength=0.0,
                    settings=dict(settings or {}),
                )
                baselines[(prompt, seed)] = b
                cells.append(b)
            c = Cell(
                row=name,
                col=f"{it['strength']:g}",
                prompt=f"{prompt}, <lora:{name}:{it['strength']:g}>",
                negative_prompt=negative_prompt,
                seed=int(seed),
                checkpoint=checkpoint,
                lora=name,
                strength=it["strength"],
                settings=dict(settings or {}),
                extra={"path": path},
            )
            cells.append(c)
            it["cells"].append(c.key)
            it["baselines"].append(b.key)
        items.append(it)
    if not items:
        raise RecipeError("No LoRA to triage (the folder is empty, or the filters leave nothing).")
    return items, cells


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --- a triage session -------------------------------------------------------------------------------


class Triage:
    """A triage session: its items (in the store), its run folder, its decisions."""

    def __init__(self, store: Store, tid: str):
        self.store = store
        self.id = tid
        rec = store.triage(tid)
        if rec is None:
            raise TriageNotFound(f"No triage {tid!r}.", fix="List the triages to see their ids.")
        self.rec = rec
        self.items = store.items(tid)

    @classmethod
    def create(cls, store: Store, items: list[dict[str, Any]], params: dict[str, Any], name: str = "") -> Triage:
        tid = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        store.create_triage(tid, name or f"triage {tid}", params, items)
        return cls(store, tid)

    def run(self) -> Run | None:
        d = self.store.triage(self.id)["run_dir"]
        return Run(d) if d else None

    def state(self) -> dict[str, Any]:
        rec = self.store.triage(self.id)
        cur = self.store.current(self.id)
        active = [it for it in self.items if not it.get("skipped")]
        counts = {k: sum(1 for it in active if cur.get(it["idx"]) == k) for k in DECISIONS}
        return {
            "id": self.id,
            "name": rec["name"],
            "state": rec["state"],
            "pass": rec["pass"],
            "run_dir": rec["run_dir"],
            "items": len(active),
            "skipped": len(self.items) - len(active),
            "decided": sum(counts.values()),
            "counts": counts,
        }

    def views(self, filter: str = "all") -> list[dict[str, Any]]:
        """Items with their decision and image status, in order; ``filter``: all, undecided, yes, maybe, no."""
        cur = self.store.current(self.id)
        run = self.run()
        res = run.results() if run else {}
        out = []
        for it in self.items:
            if it.get("skipped"):
                continue
            d = cur.get(it["idx"])
            if filter == "undecided" and d is not None or filter in DECISIONS and d != filter:
                continue
            img = res.get(it["cells"][0]) if it.get("cells") else None
            base = res.get(it["baselines"][0]) if it.get("baselines") else None
            out.append(
                {
                    **{k: v for k, v in it.items() if k not in ("cells", "baselines")},
                    "decision": d,
                    "image": _img_state(img),
                    "baseline": _img_state(base),
                }
            )
        return out

    def image_path(self, idx: int, which: str) -> str:
        """The PNG of an item's LoRA image or baseline, found through the run's manifest."""
        it = self.items[idx] if 0 <= idx < len(self.items) else None
        if it is None or it.get("skipped"):
            raise TriageNotFound(f"Triage {self.id} has no item {idx} with images.")
        run = self.run()
        key = (it["cells"] if which == "lora" else it["baselines"])[0]
        ev = run.results().get(key) if run else None
        if not ev or ev["status"] != "ok":
            raise TriageNotFound(f"The {which} image of {it['lora']} is not made (yet).")
        return run.image_path(ev)


def _img_state(ev: dict[str, Any] | None) -> dict[str, Any]:
    if not ev:
        return {"status": "missing"}
    if ev["status"] != "ok":
        return {"status": "failed", "error": ev.get("error")}
    return {"status": ev["check"]["status"], "check": ev["check"]}


class TriageNotFound(RecipeError):
    http_status = 404


# --- report ----------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def report_rows(t: Triage) -> list[dict[str, Any]]:
    cur = t.store.current(t.id)
    run = t.run()
    res = run.results() if run else {}
    rows = []
    for it in t.items:
        img = res.get(it["cells"][0]) if it.get("cells") else None
        base = res.get(it["baselines"][0]) if it.get("baselines") else None
        rows.append(
            {
                "lora": it["lora"],
                "file": it["path"],
                "decision": cur.get(it["idx"]) or ("skipped" if it.get("skipped") else "undecided"),
                "category": it.get("category"),
                "strength": it.get("strength"),
                "trigger": it.get("trigger"),
                "size": it.get("size", 0),
                "image": run.image_path(img) if img and img["status"] == "ok" else "",
                "baseline": run.image_path(base) if base and base["status"] == "ok" else "",
                "flag": (img or {}).get("check", {}).get("status", "") if img else "",
                "skipped": it.get("skipped", ""),
            }
        )
    return rows


def report_markdown(t: Triage) -> str:
    rows = report_rows(t)
    st = t.state()
    lines = [
        f"# LoRA triage: {st['name']}",
        "",
        f"{st['items']} LoRAs reviewed in pass {st['pass']} ({st['decided']} decided), {st['skipped']} skipped.",
        "",
    ]
    groups = [("yes", "YES"), ("maybe", "MAYBE"), ("no", "NO"), ("undecided", "Undecided"), ("skipped", "Skipped")]
    lines += ["| group | LoRAs | disk space |", "|---|---:|---:|"]
    for key, title in groups:
        g = [r for r in rows if r["decision"] == key]
        lines.append(f"| {title} | {len(g)} | {_mb(sum(r['size'] for r in g))} |")
    for key, title in groups:
        g = [r for r in rows if r["decision"] == key]
        if not g:
            continue
        lines += ["", f"## {title} ({len(g)}, {_mb(sum(r['size'] for r in g))})", ""]
        if key == "skipped":
            lines += [f"- **{r['lora']}** (`{r['file']}`): {r['skipped']}" for r in g]
            continue
        lines += [
            "| LoRA | category | strength | trigger | size | image | baseline |",
            "|---|---|---:|---|---:|---|---|",
        ]
        for r in g:
            flag = f" ⚠ {r['flag']}" if r["flag"] not in ("", "ok") else ""
            lines.append(
                f"| {r['lora']}{flag} | {r['category']} | {r['strength']:g} | {r['trigger'] or '—'} | "
                f"{_mb(r['size'])} | `{r['image']}` | `{r['baseline']}` |"
            )
    lines += _pool_lines(t)
    return "\n".join(lines) + "\n"


def _pool_lines(t: Triage) -> list[str]:
    """Which WebUIs of a pool made the images, and what each lacked (nothing when one WebUI made them)."""
    run = t.run()
    rec = run.record() if run else {}
    members = rec.get("members") or []
    if len(members) < 2 and not rec.get("pool_notes"):
        return []
    out = ["", "## Generated on", "", "| WebUI | images | failed | state |", "|---|---:|---:|---|"]
    out += [f"| {m['name']} | {m['made']} | {m['failed']} | {m['state']} |" for m in members]
    return out + [""] + [f"- {n}" for n in rec.get("pool_notes") or []]


def report_csv(t: Triage) -> str:
    buf = io.StringIO()
    rows = report_rows(t)
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["lora"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# --- archive and restore -----------------------------------------------------------------------------


def sidecars(path: str) -> list[str]:
    """The files that belong to a LoRA: ``<stem>.json``, ``.civitai.info``, preview images, ..."""
    d, fn = os.path.split(path)
    stem = os.path.splitext(fn)[0]
    out = []
    for suf in SIDECAR_SUFFIXES:
        p = os.path.join(d, stem + suf)
        if os.path.isfile(p) and p != path:
            out.append(p)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move(src: str, dst: str, digest: str) -> None:
    """Move without ever overwriting: rename on one filesystem, else copy, fsync, verify, then remove."""
    if os.path.lexists(dst):
        raise FileExistsError(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)  # fails if dst exists: no race can overwrite
        os.remove(src)
        return
    except OSError:
        pass
    tmp = f"{dst}.tmp-{secrets.token_hex(4)}"
    try:
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if _sha256(tmp) != digest:
            raise OSError(f"copy of {src} does not match the original")
        if os.path.lexists(dst):
            raise FileExistsError(dst)
        os.rename(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    os.remove(src)


def _free_name(path: str, taken: set[str]) -> str:
    if not os.path.lexists(path) and path not in taken:
        return path
    d, fn = os.path.split(path)
    stem, ext = _split_ext(fn)
    i = 1
    while True:
        p = os.path.join(d, f"{stem}~{i}{ext}")
        if not os.path.lexists(p) and p not in taken:
            return p
        i += 1


def _split_ext(fn: str) -> tuple[str, str]:
    for suf in sorted(SIDECAR_SUFFIXES + (".safetensors", ".ckpt", ".pt", ".pth"), key=len, reverse=True):
        if fn.endswith(suf):
            return fn[: -len(suf)], suf
    return os.path.splitext(fn)


def archive(
    t: Triage,
    archive_dir: str,
    roots: Sequence[str],
    decision: str = "no",
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Move the LoRAs decided ``decision`` (and their sidecars) into a new batch folder under
    ``archive_dir``, keeping their paths relative to the LoRA folder they came from, with an
    ``archive.json`` manifest. Nothing is deleted; :func:`restore` undoes it."""
    cur = t.store.current(t.id)
    chosen = [it for it in t.items if cur.get(it["idx"]) == decision and not it.get("skipped")]
    if not chosen:
        raise RecipeError(f"No LoRA is decided {decision.upper()} in this triage; nothing to archive.")
    real_roots = [os.path.realpath(r) for r in roots]
    if any(
        os.path.realpath(archive_dir).startswith(r + os.sep) or os.path.realpath(archive_dir) == r for r in real_roots
    ):
        raise RecipeError(
            f"The archive folder {archive_dir} is inside a LoRA folder, where the WebUI would still "
            "list the archived files.",
            fix="Choose a folder outside the LoRA folders.",
        )
    batch = os.path.join(archive_dir, f"{time.strftime('%Y%m%d-%H%M%S')}-{t.id[-6:]}-{secrets.token_hex(2)}")
    os.makedirs(batch)
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    files = [(it, f) for it in chosen for f in [it["path"], *sidecars(it["path"])] if os.path.isfile(f)]
    for i, (it, f) in enumerate(files):
        real = os.path.realpath(f)
        root = next((r for r in real_roots if real.startswith(r + os.sep)), os.path.dirname(real))
        dst = _free_name(os.path.join(batch, os.path.relpath(real, root)), taken)
        taken.add(dst)
        digest = _sha256(f)
        entries.append(
            {
                "lora": it["lora"],
                "original": f,
                "archived": dst,
                "sha256": digest,
                "size": os.path.getsize(f),
                "sidecar": f != it["path"],
            }
        )
        _write_manifest(batch, t.id, entries, "archiving")
        _move(f, dst, digest)
        if progress:
            progress((i + 1) / len(files), f"archived {os.path.basename(f)}")
    _write_manifest(batch, t.id, entries, "archived")
    return {
        "batch": batch,
        "files": len(entries),
        "loras": len(chosen),
        "bytes": sum(e["size"] for e in entries),
        "entries": entries,
    }


def _write_manifest(batch: str, tid: str, entries: list[dict[str, Any]], state: str) -> None:
    from ..gen.run import _atomic_write

    _atomic_write(
        os.path.join(batch, "archive.json"),
        json.dumps({"triage": tid, "state": state, "entries": entries}, indent=1).encode(),
    )


def restore(batch: str) -> dict[str, Any]:
    """Put every file of an archive batch back at its original path, byte for byte. A file whose original
    path is taken again is left in the archive and reported (never overwritten)."""
    man_path = os.path.join(batch, "archive.json")
    try:
        with open(man_path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{batch}: not a lorakit archive ({e}).") from None
    restored, conflicts, missing = [], [], []
    for e in man["entries"]:
        if not os.path.isfile(e["archived"]):
            if os.path.isfile(e["original"]) and _sha256(e["original"]) == e["sha256"]:
                restored.append(e["original"])  # already back (an earlier, interrupted restore)
            else:
                missing.append(e["archived"])
            continue
        if os.path.lexists(e["original"]):
            conflicts.append(e["original"])
            continue
        if _sha256(e["archived"]) != e["sha256"]:
            conflicts.append(f"{e['archived']} (changed since it was archived)")
            continue
        _move(e["archived"], e["original"], e["sha256"])
        restored.append(e["original"])
    state = "restored" if not conflicts and not missing else "partly restored"
    _write_manifest(batch, man.get("triage", ""), man["entries"], state)
    for d, dirs, files in os.walk(batch, topdown=False):  # tidy empty sub-folders, keep the manifest
        if d != batch and not os.listdir(d):
            os.rmdir(d)
    return {"batch": batch, "restored": restored, "conflicts": conflicts, "missing": missing, "state": state}


class TriageError(LorakitError):
    pass


# --- create and generate (shared by the WebUI service and the CLI) -----------------------------------


def create_triage(
    store: Store,
    backend,
    *,
    folder: str | None = None,
    roots: Sequence[str] = (),
    checkpoint: str | None = None,
    prompts: dict[str, str] | None = None,
    seeds: Sequence[int] = (1,),
    strength: float | None = None,
    negative_prompt: str = "",
    settings: dict[str, Any] | None = None,
    arch: str | None = None,
    category: str | None = None,
    name_filter: str | None = None,
    inspector_settings: dict[str, Any] | None = None,
    name: str = "",
    profile: str | None = None,
) -> Triage:
    """Plan a triage over the backend's (refreshed) LoRA list — those under ``folder`` when given — and
    store it. The checkpoint's architecture decides what is skipped."""
    from ..gen.backend import resolve_name
    from ..gen.profiles import record_of, settings_for
    from ..inspect import checkpoint_family, inspect_paths

    backend.refresh()
    loras = backend.loras()
    if folder:
        base = os.path.realpath(folder if os.path.isabs(folder) or not roots else os.path.join(roots[0], folder))
        loras = [e for e in loras if os.path.realpath(e.path).startswith(base + os.sep)]
        if not loras:
            raise RecipeError(
                f"The WebUI lists no LoRA under {folder}.",
                fix="Pick a folder inside the WebUI's LoRA folder (or leave it empty for all).",
            )
    ck_name = checkpoint or backend.current_checkpoint()
    if not ck_name:
        raise RecipeError("No checkpoint given and none loaded.", fix="Pick a checkpoint.")
    ck = resolve_name(ck_name, backend.checkpoints(), "checkpoint")
    ck_arch = None
    try:
        ck_arch = checkpoint_family(ck.path).arch if os.path.isfile(ck.path) else None
    except LorakitError:
        ck_arch = None
    paths = [e.path for e in loras]
    reports = inspect_paths(paths, settings=inspector_settings)
    chosen = settings_for(
        ck.path if os.path.isfile(ck.path or "") else None, settings, profile=profile, settings=inspector_settings
    )
    items, cells = plan(
        reports,
        names={e.path: e.name for e in loras},
        checkpoint_arch=ck_arch,
        prompts=prompts,
        seeds=seeds,
        strength=strength,
        negative_prompt=negative_prompt,
        checkpoint=ck.name,
        settings=chosen["settings"],
        arch=arch,
        category=category,
        name_filter=name_filter,
        profile=chosen,
    )
    params = {
        "folder": folder,
        "checkpoint": ck.name,
        "checkpoint_arch": ck_arch,
        "seeds": list(seeds),
        "strength": strength,
        "prompts": prompts or {},
        "settings": chosen["settings"],
        "user_settings": settings or {},
        "profile": record_of(chosen),
        "arch": arch,
        "category": category,
        "name_filter": name_filter,
        "cells": [c.as_dict() for c in cells],
    }
    return Triage.create(store, items, params, name=name)


def generate(
    t: Triage, backend, outputs_dir: str, *, progress: Callable[[float, str], None] | None = None, cancel=None
) -> dict[str, Any]:
    """Make the triage's images (a run folder of kind "triage"); a second call fills only what is missing."""
    from ..gen.run import execute

    cells = [Cell.from_dict(c) for c in t.rec["params"].get("cells", [])]
    if not cells:
        t.store.set_triage(t.id, state="ready")
        return {"cells": 0}
    run = t.run()
    if run is None:
        meta = {"triage": t.id}
        if t.rec["params"].get("profile"):
            meta["profile"] = t.rec["params"]["profile"]
        run = Run.create(outputs_dir, "triage", cells, meta=meta)
        t.store.set_triage(t.id, run_dir=run.dir)
    t.store.set_triage(t.id, state="generating")
    try:
        rec = execute(run, backend, progress=progress, cancel=cancel)
    except BaseException:
        t.store.set_triage(t.id, state="incomplete")
        raise
    t.store.set_triage(t.id, state="ready" if rec["missing"] == 0 and rec["failed"] == 0 else "incomplete")
    from ..gen.grid import profile_record
    from ..gen.run import update_record

    return update_record(run, **profile_record(t.rec["params"].get("settings") or {}, t.rec["params"].get("profile")))
