"""Writing files the safe way: a temporary file beside the target, fsynced, then renamed over it."""

from __future__ import annotations

import os


def atomic_write(path: str, data: bytes, *, keep_mode: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it.

    ``keep_mode``: the new file keeps the permission bits of the one it replaces. A failure removes the
    temporary file and leaves ``path`` as it was.
    """
    from .tempfiles import output_error, sweep, temp_path

    sweep(os.path.dirname(os.path.abspath(path)))
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    except OSError as e:
        raise output_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_mode and os.path.exists(path):
            try:
                os.chmod(tmp, os.stat(path).st_mode & 0o777)
            except OSError:
                pass
        else:
            os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise output_error(e, path) from None
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
