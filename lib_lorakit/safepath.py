"""Resolve user-given model names and paths, never outside the host's model folders.

Used by the HTTP API and the UI: a name is looked up in the host's (refreshed) list;
a path must lie inside one of the model folders after resolving symlinks. Absolute
paths elsewhere, ``..`` and symlinks that escape are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .errors import LorakitError, RecipeError, nearest
from .hosts import ModelEntry


class PathRefused(LorakitError):
    """A path that points outside the model folders (HTTP 403)."""

    http_status = 403


class BadPath(LorakitError):
    """A malformed path or name (HTTP 400)."""

    http_status = 400


class NotFound(RecipeError):
    """A name that matches no model (HTTP 404)."""

    http_status = 404


def inside(path: str, roots: Iterable[str]) -> bool:
    """True when ``path`` (symlinks resolved) lies inside one of ``roots`` (resolved too)."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        try:
            if os.path.commonpath([real, r]) == r:
                return True
        except ValueError:  # different drives on Windows
            continue
    return False


def _check_text(value: str, what: str) -> str:
    v = (value or "").strip()
    if not v:
        raise BadPath(f"No {what} given.")
    if "\x00" in v:
        raise BadPath(f"The {what} {value!r} contains a NUL byte.")
    return v


def resolve_model(value: str, entries: list[ModelEntry], roots: list[str], what: str) -> str:
    """Turn a name from the host's list, or a path inside ``roots``, into a file path.

    Raises:
        NotFound: no model of that name (the message suggests the nearest names).
        PathRefused: the path lies outside the model folders (also via symlinks).
        BadPath: empty, or with ``..`` components.
    """
    v = _check_text(value, what)
    for e in entries:
        if v == e.name or v in e.aliases or v == e.path:
            if not inside(e.path, roots):
                raise PathRefused(
                    f"The {what} {v!r} resolves outside the model folders (symlink?).",
                    fix="Keep models inside the model folders.",
                )
            return e.path
    parts = v.replace("\\", "/").split("/")
    if ".." in parts:
        raise BadPath(
            f"The {what} {v!r} contains '..'.", fix="Give a name from the list or a path inside the model folders."
        )
    candidates = [v] if os.path.isabs(v) else [os.path.join(r, v) for r in roots]
    for c in candidates:
        if os.path.exists(c):
            if not inside(c, roots):
                raise PathRefused(
                    f"The {what} {v!r} is outside the model folders ({', '.join(roots)}).",
                    fix="Move or link the file into a model folder, or pick one from the list.",
                )
            if os.path.isfile(c):
                return os.path.abspath(c)
    if os.path.isabs(v) and not inside(v, roots):
        raise PathRefused(f"The {what} {v!r} is outside the model folders ({', '.join(roots)}).")
    by_label = {}
    for e in entries:
        for label in (e.name, *e.aliases):
            by_label.setdefault(label, e.name)
    close = list(dict.fromkeys(by_label[c] for c in nearest(v, by_label)))
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise NotFound(f"No {what} named {v!r}.{hint}", fix="Refresh the list, or check the name.")


def output_path(name: str, root: str, subdir: str = "") -> str:
    """Where an output named ``name`` goes: inside ``root`` (optionally ``subdir``), as .safetensors."""
    v = _check_text(name, "output name")
    if os.path.isabs(v) or ".." in v.replace("\\", "/").split("/"):
        raise BadPath(f"The output name {v!r} must be a file name (optionally in a sub-folder) without '..'.")
    if not v.lower().endswith(".safetensors"):
        v += ".safetensors"
    folder = os.path.join(root, subdir) if subdir else root
    path = os.path.abspath(os.path.join(folder, v))
    if not inside(os.path.dirname(path), [root]) and not inside(path, [root]):
        raise PathRefused(f"The output {v!r} would land outside the model folder {root}.")
    return path
