"""Temporary output files: owner-tagged names, the sweep of our own orphans, and OS errors in words.

A temp file is named ``.<target>.<pid>-<start>.<random>.lorakit-tmp``: the process id and that process's
start time (clock ticks since boot on Linux, 0 where unknown). A later lorakit run that writes into the same
folder removes the temp files whose owner is no longer running (the pid is gone, or now belongs to a
process started at another time) — files a ``kill -9`` or a power cut left behind. Files of a running
lorakit process, files without this tag and anybody else's files are never touched.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets

from .errors import OutputError

log = logging.getLogger("lorakit")

SUFFIX = ".lorakit-tmp"
_TAGGED = re.compile(r"^\..*\.(\d+)-(\d+)\.[0-9a-f]{8}" + re.escape(SUFFIX) + "$")


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), 0 where the platform does not say, None
    when no such process runs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc: whether the pid exists is all we can tell
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return 0


_OWN_TAG: str | None = None


def owner_tag() -> str:
    """``<pid>-<start time>`` of this process (computed again after a fork)."""
    global _OWN_TAG
    pid = os.getpid()
    if _OWN_TAG is None or not _OWN_TAG.startswith(f"{pid}-"):
        _OWN_TAG = f"{pid}-{start_time(pid) or 0}"
    return _OWN_TAG


def temp_path(target: str) -> str:
    """A fresh temp file name beside ``target``, tagged with this process."""
    d, base = os.path.split(os.path.abspath(target))
    return os.path.join(d, f".{base}.{owner_tag()}.{secrets.token_hex(4)}{SUFFIX}")


def _orphaned(name: str) -> bool:
    m = _TAGGED.match(name)
    if not m:
        return False
    pid, started = int(m.group(1)), int(m.group(2))
    if pid == os.getpid():
        return False  # ours and maybe still being written (another thread)
    now = start_time(pid)
    if now is None:
        return True  # the owner is gone
    return started != 0 and now != 0 and now != started  # the pid was reused by a later process


def sweep(folder: str) -> list[str]:
    """Remove lorakit's orphaned temp files in ``folder`` (owner process dead) and say so in the log.

    Returns the removed paths. Never raises: a folder that cannot be listed or a file that cannot be
    removed is left as it is (the write that follows reports its own problem).
    """
    removed = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    for name in names:
        if not name.endswith(SUFFIX) or not _orphaned(name):
            continue
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
        m = _TAGGED.match(name)
        log.warning(
            "removed %s (%.1f MB), a temporary file left by an interrupted lorakit run (process %s, no longer running)",
            path,
            size / 1e6,
            m.group(1),
        )
    return removed


_FIXES = {
    errno.ENOSPC: ("the disk is full", "Free some space on that disk, or write the output to another folder."),
    errno.EROFS: ("the folder is on a read-only file system", "Write the output to another folder."),
    errno.EACCES: ("permission denied", "Write the output to a folder you may write to, or change its permissions."),
    errno.EPERM: (
        "the operation is not permitted",
        "Write the output to a folder you may write to, or change its permissions.",
    ),
    errno.ENOENT: ("the folder does not exist", "Create the folder first, or write the output to another one."),
    errno.ENOTDIR: ("a part of the path is not a folder", "Check the output path."),
    errno.EISDIR: ("the output is a folder", "Give a file name for the output."),
    errno.ENAMETOOLONG: ("the file name is too long", "Choose a shorter output name."),
}
if hasattr(errno, "EDQUOT"):
    _FIXES[errno.EDQUOT] = ("the disk quota is exceeded", "Free some space, or write the output to another folder.")
if hasattr(errno, "EFBIG"):
    _FIXES[errno.EFBIG] = ("the file is too large for this file system", "Write the output to another disk.")


def output_error(e: OSError, path: str) -> OutputError | OSError:
    """An OS error met while writing ``path`` as the user's error (what, where, the fix); other errors as they
    are (they are lorakit's to report)."""
    what = _FIXES.get(e.errno)
    if what is None:
        return e
    reason, fix = what
    return OutputError(f"Cannot write {path}: {reason} ({e.strerror or e}); it was not written.", fix=fix)


def check_writable(path: str | None) -> None:
    """Refuse, before any work, an output file whose folder cannot take a file (read-only, permission,
    missing): a report or chart asked for beside a long bake fails at once, not after it."""
    if not path:
        return
    tmp = temp_path(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(tmp)
    except OSError as e:
        raise output_error(e, path) from None


SCRATCH = "lorakit-scratch-"
_SCRATCH = re.compile("^" + re.escape(SCRATCH) + r"[a-z0-9]+-(\d+)-(\d+)-[0-9a-f]{8}$")


def scratch_dir(parent: str, what: str) -> str:
    """A new scratch folder in ``parent`` for ``what`` (e.g. the bake doctor's variant bakes), tagged with this
    process: ``lorakit-scratch-<what>-<pid>-<start>-<random>``. It is not hidden, so a WebUI that scans
    ``parent`` lists the models in it. Folders of dead owners are swept first (:func:`sweep_scratch`)."""
    sweep_scratch(parent)
    path = os.path.join(parent, f"{SCRATCH}{what}-{owner_tag()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(path)
    except OSError as e:
        raise output_error(e, path) from None
    return path


def sweep_scratch(parent: str) -> list[str]:
    """Remove the scratch folders in ``parent`` whose owner process is gone (never raises)."""
    import shutil

    removed = []
    try:
        names = os.listdir(parent or ".")
    except OSError:
        return removed
    for name in names:
        m = _SCRATCH.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        now = start_time(int(m.group(1)))
        if now is None or (int(m.group(2)) != 0 and now != 0 and now != int(m.group(2))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
            log.warning("removed %s, a scratch folder left by an interrupted lorakit run", removed[-1])
    return removed


__all__ = [
    "SCRATCH",
    "scratch_dir",
    "sweep_scratch",
    "SUFFIX",
    "check_writable",
    "output_error",
    "owner_tag",
    "start_time",
    "sweep",
    "temp_path",
]
