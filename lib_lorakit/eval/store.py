"""lorakit's SQLite store (stdlib ``sqlite3``, WAL) for decisions that must never be lost.

One file, ``lorakit.db`` in lorakit's data folder. Each call opens its own connection
(safe from any thread or process); every write is its own committed transaction, so a
restart, a reload or a second browser tab loses nothing. Decisions are append-only
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

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def add_schema(self, sql: str) -> None:
        """More tables (created with the file, or now if it exists)."""
        self._schemas.append(sql)
        if self._ready:
            with self._db() as db:
                db.executescript(sql)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
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
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=FULL")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # --- triage sessions --------------------------------------------------------------------------
    def create_triage(self, tid: str, name: str, params: dict[str, Any], items: Sequence[dict[str, Any]]) -> None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO triage (id, created, name, params, run_dir, state) VALUES (?, ?, ?, ?, NULL, ?)",
                       (tid, _now(), name, json.dumps(params), "planned"))
            db.executemany("INSERT INTO triage_items (triage_id, idx, lora, path, info) VALUES (?, ?, ?, ?, ?)",
                           [(tid, i, it["lora"], it["path"], json.dumps(it)) for i, it in enumerate(items)])
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
            rows = db.execute("SELECT id, created, name, state, pass, run_dir FROM triage ORDER BY created DESC").fetchall()
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
                db.execute("ROLLBACK")
                raise KeyError(tid)
            n_items = db.execute("SELECT COUNT(*) FROM triage_items WHERE triage_id = ?", (tid,)).fetchone()[0]
            new = 0
            for d in decisions:
                if d["decision"] not in (*DECISIONS, CLEAR):
                    db.execute("ROLLBACK")
                    raise ValueError(f"decision {d['decision']!r} is not yes, maybe, no or clear")
                if not 0 <= int(d["idx"]) < n_items:
                    db.execute("ROLLBACK")
                    raise ValueError(f"item {d['idx']} does not exist (the triage has {n_items})")
                cur = db.execute(
                    "INSERT OR IGNORE INTO triage_decisions (triage_id, idx, pass, decision, client, client_seq, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tid, int(d["idx"]), row["pass"], d["decision"], str(d.get("client") or "server"),
                     int(d["seq"]) if d.get("seq") is not None else _server_seq(db, tid), _now()))
                new += cur.rowcount
            db.execute("COMMIT")
        return new

    def current(self, tid: str, pass_no: int | None = None) -> dict[int, str]:
        """idx -> the item's decision in the pass (latest row wins; "clear" means undecided)."""
        with self._db() as db:
            if pass_no is None:
                pass_no = db.execute("SELECT pass FROM triage WHERE id = ?", (tid,)).fetchone()["pass"]
            rows = db.execute("SELECT idx, decision FROM triage_decisions WHERE triage_id = ? AND pass = ? "
                              "ORDER BY seq", (tid, pass_no)).fetchall()
        out: dict[int, str] = {}
        for r in rows:
            if r["decision"] == CLEAR:
                out.pop(r["idx"], None)
            else:
                out[r["idx"]] = r["decision"]
        return out

    def history(self, tid: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT idx, pass, decision, client, client_seq, at FROM triage_decisions "
                              "WHERE triage_id = ? ORDER BY seq", (tid,)).fetchall()
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
    r = db.execute("SELECT COALESCE(MAX(client_seq), 0) + 1 FROM triage_decisions WHERE triage_id = ? AND "
                   "client = 'server'", (tid,)).fetchone()
    return int(r[0])
