"""Auto-test of fresh LoRAs: a strength grid for each new LoRA (or epoch file) through a WebUI.

For each file: the WebUI's LoRA list is refreshed and the file looked up in it (by path,
so it must lie in the WebUI's LoRA folders); the inspector gives its trigger (added to
every prompt, baseline included, so a trigger-dependent LoRA is judged fairly) and its
max-safe strength (the default top strength); then a strength grid runs and its grid,
verdict and markdown summary land in the run folder. ``watch`` picks up files while a
trainer writes them — each only once it is complete (size stable across two looks and a
valid safetensors header and body) — and remembers what it has tested across restarts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import LorakitError, RecipeError
from ..hosts import LORA_EXTS
from .backend import Backend, ModelInfo, UnknownModel
from .grid import GridRow, GridSpec, epoch_files, inspect_for_grid, max_safe_for, max_safe_of, run_grid
from .profiles import prompt_set as _prompt_set
from .run import _atomic_write

DEFAULT_PROMPTS = _prompt_set()  # plain sentences; a checkpoint of a booru lineage gets booru tags
STATE = "autotest-state.json"


@dataclass
class AutotestOptions:
    prompts: list[str] | None = None  # None: the checkpoint profile's prompt set (booru or plain sentences)
    negative_prompt: str = ""  # "": the profile's negative prompt
    strengths: str | None = None  # None: 0 .. max-safe
    seeds: list[int] = field(default_factory=lambda: [1])
    checkpoint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # overrides of the checkpoint profile's settings
    profile: str | None = None  # a profile name instead of the detected one
    epochs: bool = False  # rows = every epoch of the file's run, instead of the file alone
    use_trigger: bool = True


def collect(paths: Sequence[str]) -> list[str]:
    """LoRA files named or found (recursively) in folders, sorted."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for d, dirs, files in os.walk(p):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                out += [
                    os.path.join(d, f) for f in sorted(files) if f.lower().endswith(LORA_EXTS) and not f.startswith(".")
                ]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise RecipeError(f"{p}: no such file or folder.")
    return sorted(dict.fromkeys(os.path.abspath(p) for p in out))


def complete(path: str) -> bool:
    """True when a safetensors file is whole: its header parses and the data ends where the header says."""
    if not path.lower().endswith(".safetensors"):
        return os.path.getsize(path) > 0
    from ..formats.safetensors_io import SafetensorsFile

    try:
        with SafetensorsFile(path):
            return True
    except (LorakitError, OSError):
        return False


def find_in_host(path: str, loras: list[ModelInfo]) -> ModelInfo:
    real = os.path.realpath(path)
    for e in loras:
        if e.path and os.path.realpath(e.path) == real:
            return e
    raise UnknownModel(
        f"{path}: the WebUI does not list this LoRA (after refreshing its list).",
        fix="Train into (or copy the file into) the WebUI's LoRA folder, which the WebUI and lorakit "
        "must both see at the same path.",
    )


def test_lora(
    backend: Backend,
    path: str,
    out_dir: str,
    opts: AutotestOptions,
    progress: Callable[[float, str], None] | None = None,
    inspector_settings: dict | None = None,
) -> dict[str, Any]:
    """One LoRA file: inspect, grid, verdict; returns the grid result (run folder, verdicts)."""
    backend.refresh()
    loras = backend.loras()
    info = find_in_host(path, loras)
    ckpt_path = None
    ck_name = opts.checkpoint or backend.current_checkpoint()
    if ck_name:
        from .backend import resolve_name

        ckpt_path = resolve_name(ck_name, backend.checkpoints(), "checkpoint").path
    from .profiles import prompt_set, record_of, settings_for

    notes: list[str] = []
    chosen = settings_for(ckpt_path, opts.settings, profile=opts.profile, settings=inspector_settings)
    notes.append(f"generation profile {chosen['label']} ({chosen['reason']})")
    rep, more = inspect_for_grid(path, ckpt_path, inspector_settings)
    notes += more
    trig = rep.get("trigger")
    use = trig if trig and opts.use_trigger else None
    if opts.prompts:
        prompts = [f"{use}, {p}" if use else p for p in opts.prompts]
    else:
        prompts = prompt_set(chosen, trigger=use)  # the trigger where this lineage expects it
    if use:
        notes.append(f"trigger {trig!r} ({rep.get('kind')}) added to every prompt, baseline included")
    elif rep:
        notes.append(f"no trigger ({rep.get('kind')}): prompts used as given")
    files = epoch_files(info, loras) if opts.epochs else [(info, None)]
    rows = []
    for f, ep in files:
        if opts.strengths:
            cap, why = None, ""
        elif rep and os.path.realpath(f.path) == os.path.realpath(path):  # inspected above: not read twice
            cap, why = max_safe_of(rep)
        else:
            cap, why = max_safe_for(f.path, ckpt_path, inspector_settings)
        if not opts.strengths:
            notes.append(
                f"{f.name}: strengths up to {cap if cap else 1.0:g} "
                f"({'max-safe for ' + why if cap else why or 'default'})"
            )
        rows.append(
            GridRow(
                label=f.name if ep is None or not opts.epochs else f"{f.name} (epoch {ep})",
                lora=f.name,
                max_safe=cap,
                epoch=ep,
            )
        )
    spec = GridSpec(
        rows=rows,
        prompt=prompts,
        negative_prompt=opts.negative_prompt or chosen["negative"],
        strengths=opts.strengths,
        seeds=list(opts.seeds),
        checkpoint=opts.checkpoint,
        settings=dict(chosen["settings"]),
        profile=record_of(chosen),
    )
    res = run_grid(backend, spec, out_dir, notes=notes, kind="autotest", progress=progress)
    res.pop("grid_image", None)
    # the summary gets the inspector's view on top
    md_path = res["summary"]
    with open(md_path, encoding="utf-8") as f:
        md = f.read()
    head = [f"- LoRA file: `{path}`"]
    if rep:
        head.append(
            f"- Inspector: {rep.get('architecture')}, {', '.join(rep.get('algorithms') or [])}, rank "
            f"{rep.get('rank')}, {rep.get('category')} (max-safe {rep.get('max_safe_strength')}), "
            f"{rep.get('kind')}, trigger {trig!r}"
        )
        head += [f"- Training: {f['text']}" for f in rep.get("training_review") or []]
    head += [f"- Note: {n}" for n in notes]
    md = md.replace("\n\n", "\n\n" + "\n".join(head) + "\n", 1)
    _atomic_write(md_path, md.encode())
    return res


class State:
    """What autotest has done (by path, size and mtime), kept in ``<out>/autotest-state.json``."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, STATE)
        try:
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)
        except (OSError, ValueError):
            self.data = {"done": {}}

    @staticmethod
    def ident(path: str) -> str:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"

    def done(self, path: str) -> bool:
        rec = self.data["done"].get(os.path.abspath(path))
        return bool(rec) and rec.get("ident") == self.ident(path)

    def mark(self, path: str, result: dict[str, Any]) -> None:
        self.data["done"][os.path.abspath(path)] = {"ident": self.ident(path), **result}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        _atomic_write(self.path, json.dumps(self.data, indent=1).encode())


def run_autotest(
    backend: Backend,
    paths: Sequence[str],
    out_dir: str,
    opts: AutotestOptions,
    *,
    watch: str | None = None,
    interval: float = 10.0,
    watch_for: float | None = None,
    log: Callable[[str], None] = print,
    inspector_settings: dict | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict[str, Any]]:
    """Test every LoRA in ``paths`` not tested before (same size and mtime), then, with ``watch``, keep
    looking for new complete files in that folder every ``interval`` seconds (for ``watch_for`` seconds,
    or until interrupted)."""
    state = State(out_dir)
    results: list[dict[str, Any]] = []

    def one(p: str) -> None:
        if state.done(p):
            log(f"{p}: already tested ({state.data['done'][os.path.abspath(p)].get('run_dir')})")
            return
        log(f"{p}: testing")
        try:
            res = test_lora(backend, p, out_dir, opts, inspector_settings=inspector_settings)
        except LorakitError as e:
            log(f"{p}: error: {str(e).splitlines()[0]}")
            results.append({"file": p, "error": str(e)})
            state.mark(p, {"error": str(e)})  # not retried until the file changes
            return
        verdicts = {k: v["case"] for k, v in res["verdicts"].items()}
        log(f"{p}: {', '.join(f'{k}: {v}' for k, v in verdicts.items())} -> {res['summary']}")
        state.mark(p, {"run_dir": res["run_dir"], "verdicts": verdicts})
        results.append({"file": p, "run_dir": res["run_dir"], "summary": res["summary"], "verdicts": res["verdicts"]})

    for p in collect(paths):
        one(p)
    if not watch:
        return results
    seen: dict[str, tuple[int, int]] = {}
    t0 = time.monotonic()
    log(f"watching {watch} every {interval:g} s")
    while watch_for is None or time.monotonic() - t0 < watch_for:
        for p in collect([watch]):
            try:
                st = os.stat(p)
            except OSError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if state.done(p):
                continue
            if seen.get(p) == sig and complete(p):  # unchanged since the last look, and whole
                one(p)
                seen.pop(p, None)
            else:
                seen[p] = sig
        sleep(interval)
    return results
