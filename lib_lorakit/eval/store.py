"""lorakit's SQLite store (stdlib ``sqlite3``, WAL) for decisions that must never be lost.

One file, ``lorakit.db`` in lorakit's data folder. Each thread keeps one connection (safe from
any thread or process; a triage keypress or a vote costs one transaction on it); every write is
its own committed transaction, so a restart, a reload or a second browser tab loses nothing.
All of lorakit's SQL lives in this module: the triage and tournament code call its methods. Decisions are append-only
history: the current decision of an item is its latest row in the current pass.
A client may send the same decision twice (a replay after a dropped connection): the
(client, client_seq) pair makes the second one a no-op.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

DECISIONS = ("yes", "maybe", "no")
CLEAR = "clear"  # an undo back to undecided

SCHEMA = """
CREATE TABLE IF NOT EXISTS triage (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, name TEXT NOT NULL, params TEXT NOT NULL,
    run_dir TEXT, state TEXT NOT NULL, pass INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS triage_items (
    triage_id TEXT NOT NULL, idx INTEGER NOT NULL, lora TEXT NOT NULL, path TEXT NOT NULL, info TEXT NOT NULL,
    PRIMARY KEY (triage_id, idx));
CREATE TABLE IF NOT EXISTS triage_decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, triage_id TEXT NOT NULL, idx INTEGER NOT NULL, pass INTEGER NOT NULL,
    decision TEXT NOT NULL, client TEXT NOT NULL, client_seq INTEGER NOT NULL, at TEXT NOT NULL,
    UNIQUE (triage_id, client, client_seq));
CREATE INDEX IF NOT EXISTS triage_decisions_item ON triage_decisions (triage_id, pass, idx, seq);
CREATE TABLE IF NOT EXISTS tournaments (
    id TEXT PRIMARY KEY, created TEXT NOT NULL, name TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
    run_dir TEXT, revealed INTEGER NOT NULL DEFAULT 0, parent TEXT, round INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS tournament_shuffles (
    tournament TEXT NOT NULL, evaluator TEXT NOT NULL, prompt INTEGER NOT NULL, ord TEXT NOT NULL,
    PRIMARY KEY (tournament, evaluator, prompt));
CREATE TABLE IF NOT EXISTS tournament_votes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tournament TEXT NOT NULL, evaluator TEXT NOT NULL, prompt INTEGER NOT NULL,
    ranks TEXT NOT NULL, bombs TEXT NOT NULL, all_bad INTEGER NOT NULL, no_preference INTEGER NOT NULL,
    client TEXT NOT NULL, client_seq INTEGER NOT NULL, at TEXT NOT NULL,
    UNIQUE (tournament, evaluator, client, client_seq));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, progress REAL NOT NULL, message TEXT NOT NULL,
    params TEXT NOT NULL, result TEXT, error TEXT, created REAL NOT NULL, started REAL, finished REAL);
"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """The database file is created on first use, not before: opening lorakit (the standalone launcher
    points its data folder into the checkpoint folder) leaves no trace until something is stored."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, "lorakit.db")
        self._ready = False
        self._schemas: list[str] = [SCHEMA]
        self._local = threading.local()
        self._init_lock = threading.Lock()

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def add_schema(self, sql: str) -> None:
        """More tables (created with the file, or now if it exists)."""
        self._schemas.append(sql)
        if self._ready:
            with self._db() as db:
                db.executescript(sql)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=FULL")
        db.row_factory = sqlite3.Row
        return db

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (opened on first use; the file and its tables are created then)."""
        with self._init_lock:
            if not self._ready:
                os.makedirs(self.data_dir, exist_ok=True)
                first = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                try:
                    first.execute("PRAGMA busy_timeout=30000")
                    first.execute("PRAGMA journal_mode=WAL")
                    for sql in self._schemas:
                        first.executescript(sql)
                finally:
                    first.close()
                self._ready = True
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- jobs -------------------------------------------------------------------------------------
    JOB_FIELDS = (
        "id",
        "kind",
        "state",
        "progress",
        "message",
        "params",
        "result",
        "error",
        "created",
        "started",
        "finished",
    )

    def save_job(self, job: dict[str, Any]) -> None:
        """Insert or update a job's row (its state changes: queued, running, finished)."""
        row = {k: job.get(k) for k in self.JOB_FIELDS}
        row["params"] = json.dumps(row["params"] or {}, default=str)
        row["result"] = None if row["result"] is None else json.dumps(row["result"], default=str)
        with self._db() as db:
            db.execute(
                f"INSERT OR REPLACE INTO jobs ({', '.join(self.JOB_FIELDS)}) VALUES "
                f"({', '.join('?' * len(self.JOB_FIELDS))})",
                tuple(row[k] for k in self.JOB_FIELDS),
            )

    def jobs(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs (none, without creating the database, when it does not exist)."""
        if not self.exists:
            return []
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["params"] = json.loads(d["params"] or "{}")
            d["result"] = None if d["result"] is None else json.loads(d["result"])
            out.append(d)
        return out

    def interrupt_jobs(self, message: str) -> int:
        """Mark the jobs left queued or running by a previous process as interrupted; returns how many."""
        if not self.exists:
            return 0
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            n = db.execute(
                "UPDATE jobs SET state = 'interrupted', message = 'interrupted', error = ?, finished = "
                "COALESCE(finished, ?) WHERE state IN ('queued', 'running')",
                (message, _dt.datetime.now().timestamp()),
            ).rowcount
            db.execute("COMMIT")
        return n

    def trim_jobs(self, keep: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM jobs WHERE id NOT IN (SELECT id FROM jobs ORDER BY created DESC LIMIT ?)", (keep,))

    # --- triage sessions --------------------------------------------------------------------------
    def create_triage(self, tid: str, name: str, params: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO triage (id, created, name, params, run_dir, state) VALUES (?, ?, ?, ?, NULL, ?)",
                (tid, _now(), name, json.dumps(params), "planned"),
            )
            db.executemany(
                "INSERT INTO triage_items (triage_id, idx, lora, path, info) VALUES (?, ?, ?, ?, ?)",
                [(tid, i, it["lora"], it["path"], json.dumps(it)) for i, it in enumerate(items)],
            )
            db.execute("COMMIT")

    def set_triage(self, tid: str, **fields: Any) -> None:
        allowed = {"run_dir", "state", "name"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot set {bad}")
        with self._db() as db:
            for k, v in fields.items():
                db.execute(f"UPDATE triage SET {k} = ? WHERE id = ?", (v, tid))

    def triage(self, tid: str) -> dict[str, Any] | None:
        if not self.exists:  # a look-up does not create the database
            return None
        with self._db() as db:
            r = db.execute("SELECT * FROM triage WHERE id = ?", (tid,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["params"] = json.loads(d["params"])
        return d

    def triages(self) -> list[dict[str, Any]]:
        if not self.exists:
            return []
        with self._db() as db:
            rows = db.execute(
                "SELECT id, created, name, state, pass, run_dir FROM triage ORDER BY created DESC"
            ).fetchall()
        return [dict(r) for r in rows]

    def items(self, tid: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT idx, info FROM triage_items WHERE triage_id = ? ORDER BY idx", (tid,)).fetchall()
        return [{**json.loads(r["info"]), "idx": r["idx"]} for r in rows]

    # --- decisions --------------------------------------------------------------------------------
    def decide(self, tid: str, decisions: Sequence[dict[str, Any]]) -> int:
        """Record decisions ``{idx, decision, client, seq}`` (decision yes/maybe/no/clear) in the current
        pass; returns how many were new (replays are ignored)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT pass FROM triage WHERE id = ?", (tid,)).fetchone()
            if row is None:
                raise KeyError(tid)
            n_items = db.execute("SELECT COUNT(*) FROM triage_items WHERE triage_id = ?", (tid,)).fetchone()[0]
            new = 0
            for d in decisions:
                if d["decision"] not in (*DECISIONS, CLEAR):
                    raise ValueError(f"decision {d['decision']!r} is not yes, maybe, no or clear")
                if not 0 <= int(d["idx"]) < n_items:
                    raise ValueError(f"item {d['idx']} does not exist (the triage has {n_items})")
                cur = db.execute(
                    "INSERT OR IGNORE INTO triage_decisions (triage_id, idx, pass, decision, client, client_seq, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        tid,
                        int(d["idx"]),
                        row["pass"],
                        d["decision"],
                        str(d.get("client") or "server"),
                        int(d["seq"]) if d.get("seq") is not None else _server_seq(db, tid),
                        _now(),
                    ),
                )
                new += cur.rowcount
            db.execute("COMMIT")
        return new

    def current(self, tid: str, pass_no: int | None = None) -> dict[int, str]:
        """idx -> the item's decision in the pass (latest row wins; "clear" means undecided)."""
        with self._db() as db:
            if pass_no is None:
                pass_no = db.execute("SELECT pass FROM triage WHERE id = ?", (tid,)).fetchone()["pass"]
            rows = db.execute(
                "SELECT idx, decision FROM triage_decisions WHERE triage_id = ? AND pass = ? ORDER BY seq",
                (tid, pass_no),
            ).fetchall()
        out: dict[int, str] = {}
        for r in rows:
            if r["decision"] == CLEAR:
                out.pop(r["idx"], None)
            else:
                out[r["idx"]] = r["decision"]
        return out

    def history(self, tid: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT idx, pass, decision, client, client_seq, at FROM triage_decisions "
                "WHERE triage_id = ? ORDER BY seq",
                (tid,),
            ).fetchall()
        return [dict(r) for r in rows]

    def new_pass(self, tid: str) -> int:
        """Start another pass (earlier passes stay in the history); returns its number."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE triage SET pass = pass + 1 WHERE id = ?", (tid,))
            n = db.execute("SELECT pass FROM triage WHERE id = ?", (tid,)).fetchone()["pass"]
            db.execute("COMMIT")
        return n


def _server_seq(db: sqlite3.Connection, tid: str) -> int:
    r = db.execute(
        "SELECT COALESCE(MAX(client_seq), 0) + 1 FROM triage_decisions WHERE triage_id = ? AND client = 'server'",
        (tid,),
    ).fetchone()
    return int(r[0])


# --- tournaments ----------------------------------------------------------------------------------------


class TournamentRows:
    """The tournament tables of a :class:`Store` (records, per-evaluator shuffles, votes)."""

    TOURNAMENT_FIELDS = ("state", "run_dir", "revealed", "spec")

    def __init__(self, store: Store):
        self.store = store

    def create(self, tid: str, name: str, spec: dict[str, Any], parent: str | None, round_no: int) -> None:
        with self.store._db() as db:
            db.execute(
                "INSERT INTO tournaments (id, created, name, spec, state, parent, round) VALUES (?,?,?,?,?,?,?)",
                (tid, _now(), name, json.dumps(spec), "created", parent, round_no),
            )

    def get(self, tid: str) -> dict[str, Any] | None:
        if not self.store.exists:  # a look-up does not create the database
            return None
        with self.store._db() as db:
            r = db.execute("SELECT * FROM tournaments WHERE id = ?", (tid,)).fetchone()
        if r is None:
            return None
        d = dict(r)
        d["spec"] = json.loads(d["spec"])
        return d

    def list(self) -> list[dict[str, Any]]:
        if not self.store.exists:
            return []
        with self.store._db() as db:
            rows = db.execute(
                "SELECT id, created, name, state, revealed, parent, round, run_dir FROM tournaments "
                "ORDER BY created DESC"
            ).fetchall()
        return [dict(r) for r in rows]

    def update(self, tid: str, **fields: Any) -> None:
        if set(fields) - set(self.TOURNAMENT_FIELDS):
            raise ValueError(f"cannot set {set(fields) - set(self.TOURNAMENT_FIELDS)}")
        with self.store._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for k, v in fields.items():
                db.execute(f"UPDATE tournaments SET {k} = ? WHERE id = ?", (json.dumps(v) if k == "spec" else v, tid))
            db.execute("COMMIT")

    def order(self, tid: str, evaluator: str, prompt: int, make: Any) -> list[str]:
        """The stored order for (evaluator, prompt); ``make()`` gives one the first time (kept if two race)."""
        q = "SELECT ord FROM tournament_shuffles WHERE tournament = ? AND evaluator = ? AND prompt = ?"
        with self.store._db() as db:
            r = db.execute(q, (tid, evaluator, prompt)).fetchone()
            if r:
                return json.loads(r["ord"])
            db.execute(
                "INSERT OR IGNORE INTO tournament_shuffles (tournament, evaluator, prompt, ord) VALUES (?,?,?,?)",
                (tid, evaluator, prompt, json.dumps(make())),
            )
            return json.loads(db.execute(q, (tid, evaluator, prompt)).fetchone()["ord"])

    def add_votes(self, rows: Sequence[tuple]) -> int:
        """Insert vote rows in one transaction; a replayed (evaluator, client, seq) is ignored. Returns how many were new."""
        new = 0
        with self.store._db() as db:
            db.execute("BEGIN IMMEDIATE")
            for row in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO tournament_votes (tournament, evaluator, prompt, ranks, bombs, "
                    "all_bad, no_preference, client, client_seq, at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                new += cur.rowcount
            db.execute("COMMIT")
        return new

    def votes(self, tid: str) -> list[dict[str, Any]]:
        with self.store._db() as db:
            rows = db.execute("SELECT * FROM tournament_votes WHERE tournament = ? ORDER BY seq", (tid,)).fetchall()
        return [dict(r) for r in rows]
