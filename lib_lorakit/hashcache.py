"""SHA-256 of model files, remembered: a second bake or merge of the same base never re-hashes it.

Entries live in ``hashes.json`` in lorakit's data folder, keyed by the file's real path and
valid only while its size, modification time (ns) and inode are unchanged: a file replaced
or rewritten in place is hashed again. A host that already knows a file's hash (the
WebUI's ``cache.json``) can be asked too, through ``lookup``.

Every outcome names where the hash came from: ``"cache"`` (this file), ``"host"`` (the
host's own cache) or ``"computed"`` (read now).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable

from .fsutil import atomic_write

FILE = "hashes.json"
MAX_ENTRIES = 4096  # oldest entries go first; a few hundred KB at most
ENV_DATA_DIR = "LORAKIT_DATA_DIR"

log = logging.getLogger("lorakit.hashcache")

Lookup = Callable[[str], "str | None"]  # real path -> sha256 hex, or None


def file_key(path: str) -> tuple[str, tuple[int, int, int]] | None:
    """(real path, (size, mtime_ns, inode)) of ``path``, or None when it cannot be read."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return real, (st.st_size, st.st_mtime_ns, st.st_ino)


def default_data_dir() -> str:
    """lorakit's data folder outside a host: ``$LORAKIT_DATA_DIR`` or ``~/.cache/lorakit``."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return os.path.abspath(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lorakit")


class HashCache:
    """A small, thread-safe store of file hashes (see the module docstring).

    Args:
        data_dir: the folder holding ``hashes.json``; None keeps entries in memory only.
        lookup: the host's own hash for a real path, if it has one.
    """

    def __init__(self, data_dir: str | None, lookup: Lookup | None = None):
        self.path = os.path.join(data_dir, FILE) if data_dir else None
        self.lookup = lookup
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._entries is None:
            entries: dict[str, dict] = {}
            if self.path and os.path.exists(self.path):
                try:
                    with open(self.path, encoding="utf-8") as f:
                        raw = json.load(f)
                    if isinstance(raw, dict):
                        entries = {k: v for k, v in raw.items() if isinstance(v, dict) and "sha256" in v}
                except (OSError, ValueError) as e:  # a damaged cache is only a cache: start again
                    log.warning("ignoring the hash cache %s: %s", self.path, e)
            self._entries = entries
        return self._entries

    def get(self, path: str) -> tuple[str, str] | None:
        """(sha256, source) for ``path`` when known for its current size/mtime/inode, else None."""
        fk = file_key(path)
        if fk is None:
            return None
        real, stamp = fk
        with self._lock:
            e = self._load().get(real)
            if e is not None and (e.get("size"), e.get("mtime_ns"), e.get("ino")) == stamp:
                return str(e["sha256"]), "cache"
        if self.lookup is not None:
            try:
                sha = self.lookup(real)
            except Exception:  # a host's cache is optional: never fail a bake for it
                log.exception("the host's hash lookup failed for %s", real)
                sha = None
            if sha and len(sha) == 64:
                self.put(real, sha.lower(), stamp)
                return sha.lower(), "host"
        return None

    def put(self, path: str, sha256: str, stamp: tuple[int, int, int] | None) -> None:
        """Remember ``sha256`` for ``path`` if the file still has ``stamp`` (taken before hashing began)."""
        fk = file_key(path)
        if fk is None or stamp is None or fk[1] != tuple(stamp):
            return  # changed while it was hashed: the digest may describe neither version
        real = fk[0]
        size, mtime_ns, ino = stamp
        with self._lock:
            entries = self._load()
            entries.pop(real, None)
            entries[real] = {"size": size, "mtime_ns": mtime_ns, "ino": ino, "sha256": sha256}
            while len(entries) > MAX_ENTRIES:
                entries.pop(next(iter(entries)))
            if self.path:
                try:
                    os.makedirs(os.path.dirname(self.path), exist_ok=True)
                    atomic_write(self.path, json.dumps(entries, indent=0).encode("utf-8"))
                except OSError as e:  # read-only data folder: keep it in memory
                    log.warning("cannot save the hash cache %s: %s", self.path, e)


def resolve(cache: HashCache | str | None | bool) -> HashCache | None:
    """A HashCache from what callers pass: a cache, a data folder, True (the default folder) or None/False."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return HashCache(default_data_dir())
    if isinstance(cache, HashCache):
        return cache
    return HashCache(os.fspath(cache))
