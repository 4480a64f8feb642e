"""What lorakit needs from its host, and the standalone host (plain folders, no WebUI).

The WebUI implementation lives in :mod:`lib_lorakit.host` (the only code that imports
the WebUI). Everything else receives a :class:`Host` and never asks where it runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth")
LORA_EXTS = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelEntry:
    """A model file as the host lists it."""

    name: str  # what users type: "sub/name" without extension (LoRAs) or the checkpoint title
    path: str
    aliases: tuple[str, ...] = ()  # other names that refer to it (file name, title with hash, alias)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "file": os.path.basename(self.path)}


class NotSupported(Exception):
    """The host cannot do this (e.g. image generation in the standalone launcher)."""


class Host(Protocol):
    flavour: str  # "a1111", "forge" or "standalone"

    def checkpoint_dirs(self) -> list[str]: ...
    def lora_dirs(self) -> list[str]: ...
    def vae_dirs(self) -> list[str]: ...
    def list_checkpoints(self) -> list[ModelEntry]: ...  # refreshed on every call
    def list_loras(self) -> list[ModelEntry]: ...  # refreshed on every call
    def outputs_dir(self) -> str: ...
    def data_dir(self) -> str: ...
    def queue_lock(self) -> contextlib.AbstractContextManager: ...
    def job_begin(self, title: str) -> None: ...
    def job_progress(self, fraction: float, message: str) -> None: ...
    def job_end(self) -> None: ...
    def interrupted(self) -> bool: ...
    def current_checkpoint(self) -> str | None: ...  # the host's loaded checkpoint, as a list name
    def refresh_checkpoints(self) -> None: ...
    def refresh_loras(self) -> None: ...
    def setting(self, name: str, default: Any) -> Any: ...
    def txt2img(self, request: dict[str, Any]) -> dict[str, Any]: ...


def scan_models(dirs: list[str], exts: tuple[str, ...]) -> list[ModelEntry]:
    """Every model file below ``dirs`` (recursive), named by its path relative to its folder."""
    seen: set[str] = set()
    out: list[ModelEntry] = []
    for root in dirs:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith(".") or not fn.lower().endswith(exts):
                    continue
                path = os.path.join(dirpath, fn)
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                name = os.path.splitext(rel)[0]
                out.append(
                    ModelEntry(name=name, path=os.path.abspath(path), aliases=(rel, fn, os.path.splitext(fn)[0]))
                )
    return out


def scan_checkpoints(dirs: list[str], titles: dict[str, str] | None = None) -> list[ModelEntry]:
    """Checkpoints named as the WebUI names them: the relative path with extension.

    ``titles`` (real path -> the host's title, e.g. "name.safetensors [hash]") adds aliases.
    """
    titles = titles or {}
    out = []
    for e in scan_models(dirs, CHECKPOINT_EXTS):
        rel = e.aliases[0]
        title = titles.get(os.path.realpath(e.path))
        aliases = tuple(a for a in (e.name, title, *e.aliases) if a and a != rel)
        out.append(ModelEntry(name=rel, path=e.path, aliases=aliases))
    return out


class LocalHost:
    """The standalone host: model folders on disk, a local lock, no image generation."""

    flavour = "standalone"

    def __init__(
        self,
        models_dir: str,
        loras_dir: str,
        data_dir: str | None = None,
        outputs_dir: str | None = None,
        current: str | None = None,
    ):
        self._ckpt = os.path.abspath(models_dir)
        self._lora = os.path.abspath(loras_dir)
        self._data = os.path.abspath(data_dir or os.path.join(self._ckpt, ".lorakit"))
        self._outputs = os.path.abspath(outputs_dir or os.path.join(self._data, "outputs"))
        self._lock = threading.Lock()
        self.settings: dict[str, Any] = {}
        self.progress: tuple[float, str] = (0.0, "")
        self._current = current  # the "loaded" checkpoint, as a WebUI would have one

    def checkpoint_dirs(self) -> list[str]:
        return [self._ckpt]

    def lora_dirs(self) -> list[str]:
        return [self._lora]

    def vae_dirs(self) -> list[str]:
        sibling = os.path.join(os.path.dirname(self._ckpt), "VAE")
        return [sibling] if os.path.isdir(sibling) else []

    def list_checkpoints(self) -> list[ModelEntry]:
        return scan_checkpoints(self.checkpoint_dirs())

    def list_loras(self) -> list[ModelEntry]:
        return scan_models(self.lora_dirs(), LORA_EXTS)

    def outputs_dir(self) -> str:
        return self._outputs

    def data_dir(self) -> str:
        return self._data

    @contextlib.contextmanager
    def queue_lock(self) -> Iterator[None]:
        with self._lock:
            yield

    def job_begin(self, title: str) -> None:
        self.progress = (0.0, title)

    def job_progress(self, fraction: float, message: str) -> None:
        self.progress = (fraction, message)

    def job_end(self) -> None:
        self.progress = (1.0, "")

    def interrupted(self) -> bool:
        return False

    def current_checkpoint(self) -> str | None:
        if not self._current:
            return None
        return next((e.name for e in self.list_checkpoints() if self._current in (e.name, *e.aliases)), None)

    def refresh_checkpoints(self) -> None:  # the lists are scanned on every call
        pass

    def refresh_loras(self) -> None:
        pass

    def setting(self, name: str, default: Any) -> Any:
        return self.settings.get(name, default)

    def txt2img(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotSupported(
            "The standalone launcher does not generate images; run lorakit inside the WebUI, or give a WebUI URL."
        )
