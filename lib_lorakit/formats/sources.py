"""Open model files as lazy tensor sources: safetensors, or pickles loaded weights-only.

``.ckpt``/``.pt``/``.pth``/``.bin`` files are read only with
``torch.load(weights_only=True)``, which refuses any Python object beyond tensors and
plain containers; anything else is refused with a message saying how to convert.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping

import torch

from ..errors import FormatError
from .safetensors_io import ITEMSIZE, TORCH_TO_CODE, SafetensorsFile

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


class TensorSource:
    """A read-only collection of named tensors with metadata."""

    path: str
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        raise NotImplementedError  # pragma: no cover

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError  # pragma: no cover

    def dtype(self, key: str) -> str:
        """safetensors dtype code of a tensor."""
        raise NotImplementedError  # pragma: no cover

    def nbytes(self, key: str) -> int:
        n = ITEMSIZE[self.dtype(key)]
        for s in self.shape(key):
            n *= s
        return n

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def raw_span(self, key: str) -> tuple[int, int, int] | None:
        """(fd, offset, nbytes) of the tensor's bytes in a file, when they can be copied raw."""
        return None

    def read_rows(self, key: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of a tensor as (r1 - r0, cols), in its stored dtype."""
        t = self.read(key)
        rows = t.shape[0] if t.dim() else 1
        return t.reshape(rows, -1)[r0:r1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    def __init__(self, path: str):
        self.path = path
        self.file = SafetensorsFile(path)
        self.metadata = dict(self.file.metadata)

    def keys(self) -> list[str]:
        return self.file.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.tensors[key].shape

    def dtype(self, key: str) -> str:
        return self.file.tensors[key].dtype

    def nbytes(self, key: str) -> int:
        return self.file.tensors[key].nbytes

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.file.read(key, out)

    def raw_span(self, key: str) -> tuple[int, int, int]:
        t = self.file.tensors[key]
        return self.file.fd, t.start, t.nbytes

    def read_rows(self, key: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.file.read_rows(key, r0, r1, out)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.file.tensors.items()}

    def close(self) -> None:
        self.file.close()


class DictSource(TensorSource):
    """Tensors already in memory (pickle checkpoints, tests)."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], path: str = "<memory>", metadata: Mapping[str, str] | None = None
    ):
        self.path = path
        self.tensors = dict(tensors)
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> str:
        dt = self.tensors[key].dtype
        if dt not in TORCH_TO_CODE:
            raise FormatError(f"{self.path}: tensor {key!r} has dtype {dt}, which safetensors cannot store.")
        return TORCH_TO_CODE[dt]

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensors[key].detach().contiguous()


_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


class LayoutSource(TensorSource):
    """Names, shapes and dtypes only (a key layout): for planning and matching, never for values.

    ``table`` maps key -> (shape, dtype) where dtype is a safetensors code ("F16") or a
    torch-style name ("float16") as the layout files store it.
    """

    def __init__(
        self,
        table: Mapping[str, tuple[tuple[int, ...], str]],
        path: str = "<layout>",
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = path
        self.table = dict(table)
        self.metadata = dict(metadata or {})

    def keys(self) -> list[str]:
        return list(self.table)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.table[key][0])

    def dtype(self, key: str) -> str:
        d = self.table[key][1]
        return _DTYPE_NAMES.get(d, d)

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        raise FormatError(f"{self.path} holds only the key layout; tensor {key!r} has no values.")


def _load_pickle(path: str) -> dict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError) as e:
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        what = str(e).split("\n")[0][:300]
        raise FormatError(
            f"{path}: this pickle file holds Python objects besides tensors, which lorakit will not load "
            f"(loading them could run code). The loader said: {what}",
            fix="Convert it to .safetensors in an environment you trust (for example, load it in the WebUI and "
            "save it with the Checkpoint Merger, 'No interpolation', 'safetensors'), or use a .safetensors "
            "release of the model.",
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise FormatError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}).",
            fix="The file is damaged or incomplete. Download it again.",
        ) from None
    return obj


def _flatten_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors.")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def open_source(path: str) -> TensorSource:
    """Open a model file for reading.

    Raises:
        FormatError: missing, malformed, truncated, unsafe or unknown files.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: file not found.", fix="Check the path and the file name.")
    if os.path.isdir(path):
        raise FormatError(
            f"{path}: is a folder, not a model file.",
            fix="Give the .safetensors file itself (diffusers folders are not supported).",
        )
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_EXTS:
        sd = _flatten_state_dict(_load_pickle(path), path)
        return DictSource(sd, path=path)
    if ext != ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise FormatError(
                f"{path}: looks like a PyTorch pickle but has the extension {ext!r}.",
                fix="Rename it to .ckpt or .pt so lorakit reads it (weights only).",
            )
    return SafetensorsSource(path)


class HeaderSource(TensorSource):
    """Names, shapes, dtypes and metadata through safetensors' own (Rust) header parser; values on demand.

    About five times faster than :class:`SafetensorsSource` on headers of thousands of tensors,
    which matters when scanning hundreds of LoRAs. The Rust parser validates the header as
    strictly (known dtypes, spans inside the file, no gaps or overlaps); when it refuses a
    file, lorakit's own reader explains what is wrong.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            self._f = safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError and OSError variants
            SafetensorsFile(path).close()  # raises the message that names the problem
            raise FormatError(
                f"{path}: not a valid safetensors file: {e}",
                fix="The file is damaged or incomplete. Download or export it again.",
            ) from None
        self.metadata = dict(self._f.metadata() or {})
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        for k in self._f.keys():
            sl = self._f.get_slice(k)
            self._info[k] = (tuple(sl.get_shape()), sl.get_dtype())

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> str:
        return self._info[key][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[0] for k, v in self._info.items()}

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = self._f.get_tensor(key)
        if out is not None:
            out.copy_(t)
            return out
        return t

    def read_small(self, keys) -> dict[str, torch.Tensor]:
        """Read a few small tensors (alphas) through the already open file, without validating the header again."""
        return {k: self._f.get_tensor(k) for k in keys}

    def close(self) -> None:
        f, self._f = getattr(self, "_f", None), None
        if f is not None:
            f.__exit__(None, None, None)


def open_header(path: str) -> TensorSource:
    """Open a model file to look at its header (and read a few small tensors); fast for safetensors."""
    if os.fspath(path).lower().endswith(".safetensors") and os.path.isfile(path):
        return HeaderSource(os.fspath(path))
    return open_source(path)


def sha256_file(path: str, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
