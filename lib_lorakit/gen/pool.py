"""A pool of generating WebUIs: several backends working through one run.

Users who outgrow one GPU run several WebUIs (GPUs of one box, a second PC, rented GPUs). A
:class:`Pool` holds them as *members* and is itself a backend (``kind = "pool"``), so every
generating feature takes it where it takes one WebUI; :func:`lib_lorakit.gen.run.execute` hands a
pool's run to :meth:`Pool.execute`, the scheduler:

- **checked first**: each member is refreshed and listed; a member that does not answer is left
  out, and a member that lacks a checkpoint or LoRA of the run (by name, and by hash where both
  sides know one) is given none of the cells that need that file. ``run.json`` (``members``,
  ``pool_notes``) says who was left out of what, and why;
- **batches**: cells equal in everything but the seed, with consecutive seeds, go as one
  ``batch_size`` request (the WebUI numbers a batch's images seed, seed+1, ...);
- **one engine per comparison**: in a pool mixing A1111 and Forge (which render one seed
  differently), the cells of one seed and prompt stay on one engine, so the images a run
  compares with each other come from the same engine;
- **checkpoint affinity**: a member keeps its loaded checkpoint while it has work; it switches
  only to a checkpoint no other member has loaded, or when the others would need longer than
  ``switch_cost`` images to finish that checkpoint's cells. Switches are counted per member;
- **retry**: when a member stops answering, its batch goes back to the queue for the others; a
  batch a live member fails goes back as single images, and an image a live member fails is
  tried once on each other member that can make it, then recorded as failed;
- **the manifest stays the truth**: an image is accepted only when its infotext's seed (and model,
  LoRA) is its own cell's, whichever member made it; a re-run fills only gaps;
- progress: the message names each member's count; cancel interrupts every member.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import Cancelled, LorakitError
from ..prompt import tag_names
from .backend import GenError, GenImage, ModelInfo, txt2img_batch

SWITCH_COST = 4.0  # a checkpoint switch costs about this many images' time (loading from disk)
MAX_BATCH = 16


def split_auth(url: str) -> tuple[str, str | None]:
    """``user:pass@http://host`` or ``http://user:pass@host`` -> (URL without credentials, "user:pass")."""
    u = (url or "").strip()
    if not u:
        raise GenError("An empty WebUI URL.", fix="Give URLs such as http://127.0.0.1:7860.")
    if "@" in u and "://" in u.split("@", 1)[1]:  # user:pass@http://host
        cred, rest = u.split("@", 1)
        return rest.rstrip("/"), cred
    parts = urllib.parse.urlsplit(u if "://" in u else "http://" + u)
    if not parts.hostname:
        raise GenError(f"WebUI URL {url!r} names no host.", fix="Give URLs such as http://127.0.0.1:7860.")
    cred = None
    netloc = parts.netloc
    if parts.username is not None:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        netloc = netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/"), cred


def parse_urls(text: str) -> list[str]:
    """WebUI URLs from a setting: separated by commas, spaces or new lines."""
    return [u for u in re.split(r"[\s,]+", text or "") if u]


def http_pool(urls: Sequence[str], auth: Sequence[str] | str | None = None, *, first: Any = None, **kw: Any) -> Pool:
    """A pool of WebUIs by URL; credentials per URL (in the URL, or ``auth`` in the same order, or
    one ``auth`` for all). ``first``: a backend that leads the pool (the WebUI lorakit runs in)."""
    from .backend import HttpBackend

    if isinstance(auth, str) or auth is None:
        auths: list[str | None] = [auth] * len(urls)
    else:
        auths = list(auth) + [None] * (len(urls) - len(auth))
        if len(auth) > len(urls):
            raise GenError(f"{len(auth)} credentials for {len(urls)} WebUI URL(s).", fix="Give one per URL.")
    backends, names = [], []
    for u, a in zip(urls, auths):
        url, cred = split_auth(u)
        if url in names:
            raise GenError(f"WebUI {url} is given twice.", fix="Give each WebUI once.")
        backends.append(HttpBackend(url, cred or a))
        names.append(url)
    if first is not None:
        backends.insert(0, first)
        names.insert(0, "this WebUI")
    return Pool(backends, names, **kw)


@dataclass
class Member:
    name: str
    backend: Any
    state: str = "new"  # ready, down (did not answer), idle (nothing it can make)
    note: str = ""
    loaded: str | None = None  # the plan's checkpoint key it has loaded (or switches to)
    checkpoints: list[ModelInfo] = field(default_factory=list)
    loras: list[ModelInfo] = field(default_factory=list)
    current: str | None = None
    engine: str = ""
    has_ck: dict[str, ModelInfo] = field(default_factory=dict)  # plan key -> its own entry
    has_lora: dict[str, ModelInfo] = field(default_factory=dict)
    samplers: set[str] | None = None  # what its txt2img offers (None: unknown, not checked)
    lacks: list[str] = field(default_factory=list)
    made: int = 0
    failed: int = 0
    batches: int = 0
    switches: int = 0
    requeued: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "state": self.state,
            "note": self.note,
            "made": self.made,
            "failed": self.failed,
            "batches": self.batches,
            "model_switches": self.switches,
            "requeued": self.requeued,
            "seconds_generating": round(self.seconds, 3),
            "lacks": list(self.lacks),
        }


@dataclass
class Unit:
    """Cells sent together: one checkpoint, one request but for the seed, consecutive seeds."""

    ck: str
    cells: list[Any]
    loras: tuple[str, ...]
    sampler: str = ""
    tried: set[str] = field(default_factory=set)


def _find(info: ModelInfo, listed: list[ModelInfo], kind: str) -> ModelInfo | None:
    """A member's own entry for a file of the run: by path, request name, file name."""
    import os

    from .backend import resolve_name

    base = os.path.basename(info.path) if info.path else ""
    for v in (info.path, info.name, base, os.path.splitext(base)[0]):
        if v:
            try:
                return resolve_name(v, listed, kind)
            except LorakitError:
                continue
    return None


def _other_file(a: ModelInfo, b: ModelInfo) -> str:
    """Why ``b`` is another file than ``a`` ("" when the same, or when nothing tells them apart): both
    read here (same machine or shared storage) by content; else the hashes the WebUIs report, when
    of one kind (same length)."""
    from .backend import quick_hash

    qa, qb = quick_hash(a.path) if a.path else "", quick_hash(b.path) if b.path else ""
    if qa and qb:
        return "" if qa == qb else f"content hash {qb}, the run's {qa}"
    if a.hash and b.hash and len(a.hash) == len(b.hash) and a.hash != b.hash:
        return f"hash {b.hash}, the run's {a.hash}"
    return ""


def _bare(name: str) -> str:
    """A checkpoint name without its " [hash]" and extension, lower case."""
    import os

    return os.path.splitext(os.path.basename(name.split(" [")[0]))[0].lower()


def _same_name(current: str | None, entry: ModelInfo) -> bool:
    """Whether the WebUI's loaded-checkpoint setting names ``entry`` (titles carry a hash only once known)."""
    return bool(current) and _bare(current) in {_bare(n) for n in entry.names() if n}


def _reachable(backend: Any) -> bool:
    try:
        ping = getattr(backend, "ping", None)
        ping() if ping else backend.current_checkpoint()
        return True
    except (LorakitError, OSError, ValueError):
        return False


class Pool:
    """Several backends as one; see the module's docs."""

    kind = "pool"

    def __init__(
        self,
        backends: Sequence[Any],
        names: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        switch_cost: float = SWITCH_COST,
    ):
        if not backends:
            raise GenError("A pool needs at least one WebUI.")
        names = list(names or [getattr(b, "url", None) or f"{b.kind}-{i + 1}" for i, b in enumerate(backends)])
        self.members = [Member(n, b) for n, b in zip(names, backends)]
        self.batch_size = batch_size or 1
        self.user_batch = batch_size  # None: the run's generation profile says (its batch_size)
        self.switch_cost = switch_cost
        self.notes: list[str] = []
        self._refreshed = False

    # --- the Backend interface -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch

    @batch_size.setter
    def batch_size(self, n: int) -> None:
        n = int(n or 1)
        if not 1 <= n <= MAX_BATCH:
            raise GenError(f"Batch size {n}: must be 1 to {MAX_BATCH}.", fix="Pick a smaller batch size.")
        self._batch = n

    def ready(self) -> list[Member]:
        return [m for m in self.members if m.state != "down"]

    def refresh(self) -> None:
        """Refresh and list every member; one that does not answer is marked down (not an error unless
        every member is down)."""

        def one(m: Member) -> None:
            try:
                m.backend.refresh()
                m.checkpoints = m.backend.checkpoints()
                m.loras = m.backend.loras()
                m.current = m.backend.current_checkpoint()
                m.engine = m.backend.engine() if hasattr(m.backend, "engine") else ""
                m.samplers = None
                if hasattr(m.backend, "samplers"):
                    try:
                        m.samplers = set(m.backend.samplers()) or None
                    except (LorakitError, OSError, ValueError, TypeError, AttributeError):
                        pass  # an API without the list: samplers are not checked on it
                m.state, m.note = "ready", ""
            except (LorakitError, OSError, ValueError) as e:
                m.state, m.note = "down", str(e).splitlines()[0][:300]

        threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._refreshed = True
        if not self.ready():
            raise GenError(
                "No WebUI of the pool answers: " + "; ".join(f"{m.name}: {m.note}" for m in self.members),
                fix="Start the WebUIs with --api and check their URLs and credentials.",
            )

    def _union(self, what: str) -> list[ModelInfo]:
        if not self._refreshed:
            self.refresh()
        out: dict[str, ModelInfo] = {}
        for m in self.ready():
            for e in getattr(m, what):
                out.setdefault(e.name, e)
        return list(out.values())

    def checkpoints(self) -> list[ModelInfo]:
        """Every checkpoint some member lists (the first member's entry for a name)."""
        return self._union("checkpoints")

    def loras(self) -> list[ModelInfo]:
        return self._union("loras")

    def current_checkpoint(self) -> str | None:
        if not self._refreshed:
            self.refresh()
        return next((m.current for m in self.ready() if m.current), None)

    def _pick(self, request: dict[str, Any]) -> list[Member]:
        """Members for a single request: those listing its checkpoint, the ones with it loaded first."""
        from .backend import resolve_name

        if not self._refreshed:
            self.refresh()
        ck = request.get("checkpoint")
        fits = []
        for m in self.ready():
            if ck:
                try:
                    resolve_name(ck, m.checkpoints, "checkpoint")
                except LorakitError:
                    continue
            fits.append(m)
        return sorted(fits, key=lambda m: (m.lock.locked(), m.current != ck))

    def txt2img(self, request: dict[str, Any]) -> GenImage:
        return self.txt2img_batch([request])[0]

    def txt2img_batch(self, requests: list[dict[str, Any]]) -> list[GenImage]:
        """Requests made on one member (affinity: the one with the checkpoint loaded and free), moved to
        the next when a member stops answering."""
        from .backend import resolve_name

        errors = []
        for m in self._pick(requests[0]):
            reqs = requests
            if requests[0].get("checkpoint"):
                own = resolve_name(requests[0]["checkpoint"], m.checkpoints, "checkpoint").name
                reqs = [{**r, "checkpoint": own} for r in requests]
            with m.lock:
                try:
                    out = txt2img_batch(m.backend, reqs)
                    m.current = reqs[0].get("checkpoint") or m.current
                    return out
                except (LorakitError, OSError) as e:
                    if _reachable(m.backend):
                        raise
                    m.state, m.note = "down", str(e).splitlines()[0][:300]
                    errors.append(f"{m.name}: {m.note}")
        raise GenError(
            "No WebUI of the pool could make the image" + (": " + "; ".join(errors) if errors else "."),
            fix="Check that the WebUIs run and list the checkpoint.",
        )

    def interrupt(self) -> None:
        for m in self.members:
            stop = getattr(m.backend, "interrupt", None)
            if stop and m.state != "down":
                try:
                    stop()
                except (LorakitError, OSError):
                    pass

    def status(self) -> list[dict[str, Any]]:
        return [m.summary() for m in self.members]

    # --- capabilities ----------------------------------------------------------------------------
    def check(self, pf: Any, samplers: Sequence[str] = ()) -> None:
        """Which member has which of the run's files (by name, and by hash where both sides know it)."""

        self.notes = []
        for m in self.members:
            m.has_ck, m.has_lora, m.lacks = {}, {}, []
            if m.state == "down":
                self.notes.append(f"{m.name} left out: {m.note}")
                continue
            for kind, wanted, listed, has in (
                ("checkpoint", pf.checkpoints, m.checkpoints, m.has_ck),
                ("LoRA", pf.loras, m.loras, m.has_lora),
            ):
                for key, info in wanted.items():
                    own = _find(info, listed, kind)
                    if own is None:
                        m.lacks.append(f"{kind} {info.name}: not listed")
                        continue
                    if kind == "LoRA" and own.name != info.name:
                        m.lacks.append(f"LoRA {info.name}: listed as {own.name!r}, the prompt's tag would miss it")
                        continue
                    why = _other_file(info, own)
                    if why:
                        m.lacks.append(f"{kind} {info.name}: another file ({why})")
                        continue
                    has[key] = own
            for name in sorted(set(samplers)):
                if m.samplers is not None and name not in m.samplers:
                    m.lacks.append(f"sampler {name}: not offered")
            if m.lacks:
                self.notes.append(f"{m.name} gets no cells needing: " + "; ".join(m.lacks))
        engines = sorted({m.engine for m in self.ready() if m.engine})
        if len(engines) > 1:
            self.notes.append(
                f"The pool mixes engines ({', '.join(engines)}): one seed gives different images on each, so "
                "the images compared with each other (one seed and prompt) are kept on one engine; images of "
                "different seeds may come from different engines (the manifest's member field says which)."
            )

    def _eligible(self, m: Member, u: Unit) -> bool:
        return (
            m.state == "ready"
            and u.ck in m.has_ck
            and all(n in m.has_lora for n in u.loras)
            and (not u.sampler or m.samplers is None or u.sampler in m.samplers)
        )

    # --- the scheduler ---------------------------------------------------------------------------
    def units(self, cells: Sequence[Any], pf: Any) -> list[Unit]:
        """Cells grouped into batches: same checkpoint and request but the seed, consecutive seeds."""
        from .run import SETTINGS_KEYS

        groups: dict[str, list[Any]] = {}
        for c in cells:
            key = repr(
                (
                    c.checkpoint or "",
                    c.prompt,
                    c.negative_prompt,
                    sorted((k, str(v)) for k, v in c.settings.items() if k in SETTINGS_KEYS),
                )
            )
            groups.setdefault(key, []).append(c)
        out = []
        for group in groups.values():
            group = sorted(group, key=lambda c: c.seed)
            run: list[Any] = []
            for c in group:
                if run and (len(run) >= self.batch_size or c.seed != run[-1].seed + 1):
                    out.append(run)
                    run = []
                run.append(c)
            out.append(run)
        units = []
        for cs in out:
            names = {n for c in cs for n in tag_names(c.prompt)} | {c.lora for c in cs if c.lora}
            loras = tuple(sorted(n for n in names if n in pf.loras))
            units.append(Unit(cs[0].checkpoint or "", cs, loras, str(cs[0].settings.get("sampler_name") or "")))
        first = {c.key: i for i, c in enumerate(cells)}
        return sorted(units, key=lambda u: first[u.cells[0].key])

    def execute(
        self,
        run: Any,
        *,
        progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None,
        check_infotext: bool = True,
        only: Any = None,
    ) -> dict[str, Any]:
        """``run.execute`` over the pool (``only``: the keys of the cells to make now, as there)."""
        from .run import (
            SETTINGS_KEYS,
            _now,
            _write_record,
            infotext_problem,
            infotext_seed,
            preflight,
            store_image,
            work_of,
        )

        cancel = cancel or threading.Event()
        if not self.user_batch:
            prof = (run.plan.get("meta") or {}).get("profile") or {}
            self.batch_size = min(MAX_BATCH, int(prof.get("batch_size") or 1)) if isinstance(prof, dict) else 1
        todo, scope = work_of(run, only)
        self._refreshed = False
        pf = preflight(scope, self)
        self.check(pf, [str(c.settings["sampler_name"]) for c in todo if c.settings.get("sampler_name")])
        pf.warnings.extend(self.notes)
        run.append({**pf.as_event(), "members": self.status()})
        for m in self.ready():
            m.loaded = next((k for k, v in m.has_ck.items() if _same_name(m.current, v)), None)
            m.made = m.failed = m.batches = m.switches = m.requeued = 0
            m.seconds = 0.0
        queue: deque[Unit] = deque(self.units(todo, pf))
        total = sum(len(u.cells) for u in queue)
        cond = threading.Condition()
        inflight: dict[str, Unit] = {}
        counts = {"made": 0, "failed": 0}
        times: list[float] = []
        t_start = time.perf_counter()
        plock = threading.Lock()

        def report(msg: str) -> None:
            if progress:
                done = counts["made"] + counts["failed"]
                per = ", ".join(
                    f"{m.name.split('//')[-1]}: {m.made}" + ("" if m.state == "ready" else f" ({m.state})")
                    for m in self.members
                )
                with plock:
                    progress(done / max(1, total), f"{done}/{total} images ({per}) {msg}".strip())

        def fail(u: Unit, m: Member | None, error: str) -> None:
            for c in u.cells:
                run.append(
                    {
                        "event": "cell",
                        "cell": c.key,
                        "row": c.row,
                        "col": c.col,
                        "member": m.name if m else None,
                        "status": "failed",
                        "error": error[:500],
                        "time": _now(),
                    }
                )
            with cond:
                counts["failed"] += len(u.cells)
                if m:
                    m.failed += len(u.cells)

        # cells no member can make: recorded failed at once, with who lacks what
        for u in list(queue):
            if not any(self._eligible(m, u) for m in self.members):
                queue.remove(u)
                need = ", ".join([u.ck or "the loaded checkpoint", *u.loras, *([u.sampler] if u.sampler else [])])
                fail(u, None, f"no WebUI of the pool has every file this cell needs ({need}); see pool_notes")

        # A pool mixing engines renders one seed differently on each: the images a run compares (one
        # seed, one prompt: a grid's strengths and baseline, a triage pair, a tournament's ballot entries)
        # are kept on one engine: groups are laid out in blocks per engine; an engine out of work takes over
        # groups nobody has started; a group pinned to an engine with no live member is free again.
        mixed = len({m.engine for m in self.ready()}) > 1
        pins: dict[tuple[int, Any], str] = {}
        started: set[tuple[int, Any]] = set()

        def groups_of(u: Unit) -> set[tuple[int, Any]]:
            return {(c.seed, c.extra.get("prompt") if isinstance(c.extra, dict) else None) for c in u.cells}

        def pin_ok(me: Member, u: Unit) -> bool:
            if not mixed:
                return True
            live = {m.engine for m in self.members if m.state == "ready"}
            return all(pins.get(g, me.engine) in (me.engine,) or pins[g] not in live for g in groups_of(u))

        def split_conflicts() -> None:  # a batch whose seeds are pinned to different engines goes image by image
            for u in list(queue):
                if len(u.cells) > 1 and len({pins[g] for g in groups_of(u) if g in pins}) > 1:
                    i = queue.index(u)
                    queue.remove(u)
                    for j, c in enumerate(u.cells):
                        queue.insert(i + j, Unit(u.ck, [c], u.loras, u.sampler, set(u.tried)))

        if mixed:  # groups in plan order, in contiguous blocks per engine by its number of members
            seen_g: dict[tuple[int, Any], None] = {}
            for u in queue:
                seen_g.update(dict.fromkeys(sorted(groups_of(u), key=repr)))
            order = list(seen_g)
            engines: dict[str, int] = {}
            for m in self.ready():
                engines[m.engine] = engines.get(m.engine, 0) + 1
            total_m, at = sum(engines.values()), 0
            for i, (eng, k) in enumerate(sorted(engines.items())):
                end = len(order) if i == len(engines) - 1 else at + round(len(order) * k / total_m)
                for g in order[at:end]:
                    pins[g] = eng
                at = end
            split_conflicts()

        def others_loaded(me: Member, ck: str) -> int:
            return sum(1 for o in self.members if o is not me and o.state == "ready" and o.loaded == ck)

        def take(me: Member) -> Unit | None:
            with cond:
                while True:
                    if cancel.is_set() or me.state != "ready":
                        return None
                    if mixed:
                        split_conflicts()
                    mine = [u for u in queue if self._eligible(me, u) and me.name not in u.tried and pin_ok(me, u)]
                    if not mine and mixed:  # its engine's groups are done: take over a group nobody started
                        free = [
                            u
                            for u in queue
                            if self._eligible(me, u) and me.name not in u.tried and not (groups_of(u) & started)
                        ]
                        if free:
                            for g in groups_of(free[-1]):
                                pins[g] = me.engine
                            continue
                    if not mine:
                        waiting = [u for u in queue if self._eligible(me, u) and me.name not in u.tried]
                        if not waiting and not any(self._eligible(me, u) for u in inflight.values()):
                            return None  # nothing left it could make, now or after a retry
                        cond.wait(0.2)
                        continue
                    by_ck: dict[str, int] = {}
                    for u in mine:
                        by_ck[u.ck] = by_ck.get(u.ck, 0) + len(u.cells)
                    target = None
                    orphans = [ck for ck in by_ck if ck != me.loaded and others_loaded(me, ck) == 0]
                    if orphans and (me.loaded not in by_ck or others_loaded(me, me.loaded) > 0):
                        target = max(orphans, key=lambda ck: by_ck[ck])  # a checkpoint nobody else has loaded
                    elif me.loaded in by_ck:
                        target = me.loaded
                    else:  # help with another checkpoint only when that ends it sooner than waiting:
                        # k members with it loaded finish r images in r/k; with this one too, after a switch,
                        # in (r + switch)/(k + 1); sooner when r > k * switch
                        best = max(by_ck, key=lambda ck: by_ck[ck] / max(1, others_loaded(me, ck)))
                        if by_ck[best] > max(1, others_loaded(me, best)) * self.switch_cost:
                            target = best
                    if target is None:
                        cond.wait(0.2)
                        continue
                    u = next(u for u in mine if u.ck == target)
                    queue.remove(u)
                    for g in groups_of(u):
                        pins.setdefault(g, me.engine)
                    started.update(groups_of(u))
                    if target != me.loaded:
                        if me.loaded is not None or me.current is not None:
                            me.switches += 1
                        me.loaded = target
                    inflight[me.name] = u
                    return u

        def work(me: Member) -> None:
            while True:
                u = take(me)
                if u is None:
                    return
                ck = me.has_ck[u.ck]
                reqs = [
                    {
                        "prompt": c.prompt,
                        "negative_prompt": c.negative_prompt,
                        "seed": c.seed,
                        "checkpoint": ck.name,
                        **{k: v for k, v in c.settings.items() if k in SETTINGS_KEYS},
                    }
                    for c in u.cells
                ]
                t0 = time.perf_counter()
                try:
                    outs = txt2img_batch(me.backend, reqs)
                    if len(outs) != len(reqs):
                        raise GenError(f"{me.name} returned {len(outs)} image(s) for {len(reqs)}.")
                except (LorakitError, OSError, ValueError, RuntimeError) as e:
                    me.seconds += time.perf_counter() - t0
                    err = str(e).splitlines()[0][:300]
                    if cancel.is_set():  # its cells stay missing; a re-run makes them
                        with cond:
                            inflight.pop(me.name, None)
                        return
                    alive = _reachable(me.backend)
                    if alive and len(u.cells) > 1:  # a failed batch: its cells again one by one
                        with cond:
                            inflight.pop(me.name, None)
                            queue.extendleft(Unit(u.ck, [c], u.loras, u.sampler) for c in reversed(u.cells))
                            cond.notify_all()
                        continue
                    with cond:
                        inflight.pop(me.name, None)
                        u.tried.add(me.name)
                        retry = not alive or any(self._eligible(o, u) and o.name not in u.tried for o in self.members)
                        if not alive:
                            me.state, me.note = "down", f"stopped answering mid-run: {err}"
                        if retry:
                            me.requeued += len(u.cells)
                            queue.appendleft(u)  # another member makes it
                        cond.notify_all()
                    if not alive:
                        report(f"{me.name} is down; its cells go to the others")
                        return
                    if not retry:
                        fail(u, me, f"{me.name}: {err}")
                        report("")
                        with cond:
                            cond.notify_all()
                    continue
                me.seconds += time.perf_counter() - t0
                me.batches += 1
                lora_of = {c.key: pf.loras.get(c.lora) if c.lora else None for c in u.cells}
                for c, out in zip(u.cells, outs):
                    base = {
                        "event": "cell",
                        "cell": c.key,
                        "row": c.row,
                        "col": c.col,
                        "member": me.name,
                        "checkpoint": ck.name,
                        "checkpoint_hash": pf.checkpoints[u.ck].hash,
                        "lora_file": lora_of[c.key].path if lora_of[c.key] else None,
                        "lora_hash": lora_of[c.key].hash if lora_of[c.key] else None,
                        "batch": len(u.cells),
                    }
                    seed = infotext_seed(out.infotext) if out.infotext else out.seed
                    problem = None
                    if seed != c.seed:
                        problem = f"{me.name} returned the image of seed {seed} for seed {c.seed}"
                    elif check_infotext:
                        lora = lora_of[c.key] if (c.strength or 0) != 0 else None
                        problem = infotext_problem(out.infotext, ck, lora)
                    if problem:
                        run.append({**base, "status": "failed", "error": problem[:500], "time": _now()})
                        with cond:
                            counts["failed"] += 1
                            me.failed += 1
                        continue
                    dt = store_image(run, c, out, base, t0)
                    with cond:
                        times.append(dt / len(u.cells))
                        counts["made"] += 1
                        me.made += 1
                with cond:
                    inflight.pop(me.name, None)
                    cond.notify_all()
                report("")

        threads = [threading.Thread(target=work, args=(m,), daemon=True, name=f"pool-{m.name}") for m in self.ready()]
        report("starting")
        for t in threads:
            t.start()
        interrupted = False
        for t in threads:
            while t.is_alive():
                t.join(0.1)
                if cancel.is_set() and not interrupted:
                    interrupted = True
                    self.interrupt()  # cancel stops every member, not only the queue
                    with cond:
                        cond.notify_all()
        # whatever is still queued (every member that could make it went down) is recorded failed
        for u in list(queue):
            if not cancel.is_set():
                fail(u, None, "every WebUI of the pool that could make this cell stopped answering")
        for m in self.members:
            if m.state == "ready" and not m.made and not m.failed:
                m.state = "idle"
        in_backend = sum(m.seconds for m in self.members)
        extra = {
            "members": self.status(),
            "pool_notes": list(self.notes),
            "batch_size": self.batch_size,
            "backend": "pool",
        }
        switches = sum(m.switches for m in self.members)
        rec = _write_record(
            run,
            pf,
            switches,
            counts["made"],
            counts["failed"],
            times,
            t_start,
            in_backend,
            cancelled=cancel.is_set(),
            extra=extra,
        )
        if cancel.is_set():
            raise Cancelled(f"Run {run.id} cancelled after {counts['made']} image(s); run it again to continue.")
        if progress:
            report("done")
        return rec
