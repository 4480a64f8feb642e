"""Files the doors write beside the models: reports, charts, contact sheets (atomically, never over an input)."""

from __future__ import annotations


def write_file(path: str, data: str | bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename; refuse an existing file unless ``overwrite``."""
    from ..formats.safetensors_io import check_output_path
    from ..fsutil import atomic_write

    check_output_path(path, overwrite=overwrite)
    atomic_write(path, data.encode() if isinstance(data, str) else data)


def remove_partial_outputs() -> None:
    """After an interrupt: remove the temp files of outputs this process was writing."""
    from ..formats.safetensors_io import cleanup_temps

    cleanup_temps()


def check_writable(*paths: str | None) -> None:
    """Refuse at once an output (a report, a chart) whose folder cannot take it, before a long run."""
    from ..tempfiles import check_writable as check

    for p in paths:
        check(p)


def sweep_orphans(*folders: str) -> list[str]:
    """Remove lorakit's own temp files left by killed runs (owner process gone) in ``folders``; logged."""
    from ..tempfiles import sweep

    return [p for d in folders for p in sweep(d)]
