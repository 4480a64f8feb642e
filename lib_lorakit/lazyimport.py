"""Import a heavy package on first use instead of at start-up.

The command line defers ``torch``: commands that only read safetensors headers (``inspect``)
never pay for it (about 1.2 s warm, 2 s with a cold page cache), and the others load it the
first time they touch a tensor. Every module keeps its plain ``import torch``: while the
package is deferred, ``sys.modules`` holds a stand-in that loads the real package on the first
attribute read (or on the first import of one of its submodules) and then forwards to it.

Only processes that call :func:`defer` see the stand-in (the CLI, before it imports the
library); inside a WebUI torch is already loaded and :func:`defer` does nothing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types

__all__ = ["defer", "is_deferred"]

_LOCK = threading.RLock()
_PENDING: dict[str, _Deferred] = {}
# dunder names the import system and tools probe; answered without loading (others load it)
_LOADING_DUNDERS = ("__path__", "__file__", "__version__", "__all__", "__dict__")


class _Deferred(types.ModuleType):
    """Stands in for a package until an attribute of it is read."""

    def __getattr__(self, attr: str):  # only called for attributes the stand-in lacks
        if attr.startswith("__") and attr not in _LOADING_DUNDERS:
            raise AttributeError(attr)
        real = self.__dict__.get("_lorakit_real")
        return getattr(real if real is not None else _load(self.__name__), attr)


class _Existing(importlib.abc.Loader):
    """A submodule the real package already imported while loading: hand that very module back."""

    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module) -> None:
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """Importing ``pkg.sub`` of a deferred ``pkg`` loads ``pkg`` first (as a plain import would)."""

    def find_spec(self, name, path=None, target=None):
        root = name.partition(".")[0]
        if root not in _PENDING:
            return None
        _load(root)
        if name in sys.modules:
            return importlib.machinery.ModuleSpec(name, _Existing())
        return None


_FINDER = _Finder()


def _load(name: str) -> types.ModuleType:
    with _LOCK:
        proxy = _PENDING.pop(name, None)
        if proxy is None:  # loaded meanwhile (by another thread, or this is the import below asking)
            return sys.modules[name]
        if sys.modules.get(name) is proxy:
            del sys.modules[name]
        try:
            real = importlib.import_module(name)
        except BaseException:
            _PENDING[name] = proxy  # still deferred: the next use tries again and raises the same
            sys.modules[name] = proxy
            raise
        proxy.__dict__["_lorakit_real"] = real
        if not _PENDING and _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        return real


def defer(name: str) -> bool:
    """Load ``name`` on first use; False when it is already loaded (or not installed: its import fails as usual)."""
    with _LOCK:
        if name in _PENDING:
            return True
        if name in sys.modules:
            return False
        spec = importlib.util.find_spec(name)
        if spec is None:
            return False
        proxy = _Deferred(name)
        proxy.__spec__ = spec
        proxy.__loader__ = spec.loader
        proxy.__package__ = name
        _PENDING[name] = proxy
        sys.modules[name] = proxy
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        return True


def is_deferred(name: str) -> bool:
    """True while ``name`` has not been loaded yet (for tests and benchmarks)."""
    return name in _PENDING
