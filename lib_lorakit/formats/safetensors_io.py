"""Lazy, validated safetensors reading and a streaming, atomic writer.

Reading never maps the file: tensors are read with ``pread`` into buffers the
caller may reuse, so resident memory stays flat however large the file is.
The header is validated in full before any tensor is touched.

Writing computes the header first, streams tensors one by one into a temporary
file beside the target, fsyncs, and renames. On any error (or Ctrl-C) the
temporary file is removed and no output appears.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import FormatError, OutputError

# safetensors dtype code -> (torch dtype or None when torch lacks it, bytes per element). The torch dtypes
# are looked up on first use, so reading headers (names, shapes, dtypes, metadata) never imports torch.
_DTYPE_NAMES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
ITEMSIZE: dict[str, int] = {k: n for k, (_, n) in _DTYPE_NAMES.items()}


class _TorchTable(Mapping):
    """A read-only table built from torch's dtypes the first time a value is read."""

    def __init__(self, build):
        self._build, self._table = build, None

    def _get(self) -> dict:
        if self._table is None:
            self._table = self._build()
        return self._table

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key) -> bool:
        return key in self._get()


def _dtypes() -> dict[str, tuple[torch.dtype | None, int]]:
    return {k: (getattr(torch, name, None), n) for k, (name, n) in _DTYPE_NAMES.items()}


class _Codes(_TorchTable):
    def __iter__(self):  # the codes are known without torch
        return iter(_DTYPE_NAMES)

    def __len__(self) -> int:
        return len(_DTYPE_NAMES)

    def __contains__(self, key) -> bool:
        return key in _DTYPE_NAMES


DTYPES: Mapping[str, tuple[torch.dtype | None, int]] = _Codes(_dtypes)
TORCH_TO_CODE: Mapping[torch.dtype, str] = _TorchTable(lambda: {v[0]: k for k, v in DTYPES.items() if v[0] is not None})

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_READ_CHUNK = 64 * 1024 * 1024


class TensorInfo(NamedTuple):
    """Where one tensor lives in a safetensors file (a tuple: headers hold thousands of them)."""

    name: str
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = DTYPES[self.dtype][0]
        if dt is None:  # pragma: no cover - depends on the torch build
            raise FormatError(f"dtype {self.dtype} of tensor {self.name!r} is not supported by this torch build.")
        return dt


def _bad(path: str, problem: str, fix: str | None = None) -> FormatError:
    return FormatError(
        f"{path}: not a valid safetensors file: {problem}",
        fix=fix or "The file is damaged or incomplete. Download or export it again.",
    )


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and fully validate a safetensors header without touching tensor data.

    Checks: the 8-byte length is sane and within the file, the JSON parses, every
    dtype is known, shape x dtype size equals the byte span, spans lie inside the
    data area, and no two spans overlap.

    Returns:
        (tensors by name, metadata)
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(
                    path, f"the file is only {size} bytes; a safetensors file starts with an 8-byte header length"
                )
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER:
                raise _bad(
                    path,
                    f"header length {n} is not sane (expected 2..{MAX_HEADER} bytes)",
                    fix="This is probably not a safetensors file (or it is damaged).",
                )
            if 8 + n > size:
                raise _bad(
                    path, f"header length {n} runs past the end of the file ({size} bytes); the file is truncated"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found.", fix="Check the path.") from None
    except IsADirectoryError:
        raise FormatError(
            f"{path}: is a folder, not a model file.",
            fix="Give the .safetensors file itself (diffusers folders are not supported).",
        ) from None
    except PermissionError:
        raise FormatError(f"{path}: permission denied.", fix="Make the file readable for this user.") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")

    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    sizes = ITEMSIZE
    for name, entry in header.items():
        try:  # the common case in one go; anything odd falls through to the checks that name the problem
            dtype, shape, (o0, o1) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape_t = tuple(shape)
            n = math.prod(shape_t)  # an int only if every dimension is one (floats and strings fall out)
            ok = (
                type(shape) is list
                and type(o0) is int
                and type(o1) is int
                and 0 <= o0 <= o1 <= data_size
                and type(n) is int
                and (not shape_t or min(shape_t) >= 0)
                and True not in map(bool.__instancecheck__, shape_t)
                and o1 - o0 == n * sizes[dtype]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            _explain(path, name, entry, data_size)
        tensors[name] = TensorInfo(name, dtype, shape_t, data_start + o0, data_start + o1)

    spans = sorted((t for t in tensors.values() if t.nbytes), key=lambda t: t.start)
    for a, b in zip(spans, spans[1:]):
        if b.start < a.end:
            raise _bad(path, f"tensors {a.name!r} and {b.name!r} overlap in the file")
    return tensors, metadata


def _explain(path: str, name: str, entry: object, data_size: int) -> None:
    """Raise the error that names what is wrong with one header entry."""
    if not isinstance(entry, dict):
        raise _bad(path, f"entry for tensor {name!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offs = entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int for o in offs)
        or offs[0] < 0
        or offs[1] < offs[0]
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offs!r}")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offs[1] - offs[0] != expected:
        raise _bad(
            path,
            f"tensor {name!r}: shape {shape} x {dtype} needs {expected} bytes but its span holds {offs[1] - offs[0]}",
        )
    if offs[1] > data_size:
        raise _bad(
            path,
            f"tensor {name!r} ends at byte {offs[1]} of the data area, but the file holds only "
            f"{data_size} data bytes; the file is truncated",
            fix="The download or copy was interrupted. Download the file again.",
        )
    raise _bad(path, f"tensor {name!r} has an invalid entry {entry!r}")  # pragma: no cover - all cases above


_SEEK_LOCK = threading.Lock()  # Windows has no pread: seek + read must not interleave between threads


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``fd`` at ``offset`` without moving a shared file position.

    Returns the number of bytes read (0 at end of file). Thread-safe on every platform.
    """
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    with _SEEK_LOCK:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
        view[: len(data)] = data
        return len(data)


def _pread_into(fd: int, view: memoryview, offset: int, path: str, name: str) -> None:
    done = 0
    total = len(view)
    while done < total:
        got = pread_into(fd, view[done : done + _READ_CHUNK], offset + done)
        if got <= 0:
            raise _bad(path, f"unexpected end of file while reading tensor {name!r} (file changed while reading?)")
        done += got


class SafetensorsFile:
    """A validated, lazily read safetensors file. Use as a context manager."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.tensors, self.metadata = read_header(self.path)
        self._keys: list[str] | None = None
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    # --- context management -------------------------------------------------------
    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net
        try:
            self.close()
        except Exception:
            pass

    # --- access -------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        if self._keys is None:
            self._keys = [t.name for t in sorted(self.tensors.values(), key=lambda t: (t.start, t.name))]
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (a copy owned by the caller).

        Args:
            out: optional uint8 buffer with at least ``nbytes`` elements to read into;
                the result is then a view of it.
        """
        info = self.tensors[name]
        if out is None:
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
        else:
            buf = out[: info.nbytes]
        if info.nbytes:
            _pread_into(self.fd, memoryview(buf.numpy()).cast("B"), info.start, self.path, name)
        return buf.view(info.torch_dtype).reshape(info.shape)

    def read_many(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read many small tensors scattered through the file (alphas, scales).

        On Linux the kernel is first told about every span (``posix_fadvise(WILLNEED)``), so
        the reads go to the disk together instead of one seek at a time on a cold cache.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is not None:
            for n in names:
                t = self.tensors[n]
                if t.nbytes:
                    try:
                        advise(self.fd, t.start, t.nbytes, os.POSIX_FADV_WILLNEED)
                    except OSError:
                        break
        return {n: self.read(n) for n in names}

    def read_rows(self, name: str, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read rows ``r0:r1`` of a tensor (its first dimension) as a (r1 - r0, cols) tensor.

        Only those bytes are read, so large tensors can be processed in bounded memory.
        """
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 1
        cols = info.numel // rows if rows else 0
        item = ITEMSIZE[info.dtype]
        n = (r1 - r0) * cols * item
        buf = torch.empty(n, dtype=torch.uint8) if out is None else out[:n]
        if n:
            _pread_into(self.fd, memoryview(buf.numpy()).cast("B"), info.start + r0 * cols * item, self.path, name)
        return buf.view(info.torch_dtype).reshape(r1 - r0, cols)


# --- writing --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def build_header(entries: Sequence[OutEntry], metadata: Mapping[str, str] | None) -> bytes:
    """Return the header bytes (length prefix + JSON padded to 8 bytes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def check_output_path(path: str, *, overwrite: bool, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that is one of the inputs."""
    path = os.fspath(path)
    for src in inputs:
        if os.path.exists(path) and os.path.exists(src) and os.path.samefile(path, src):
            raise OutputError(
                f"The output {path} is one of the inputs.",
                fix="Choose a new output file name; lorakit never writes its input files.",
            )
    if os.path.isdir(path):
        raise OutputError(f"The output {path} is a folder.", fix="Give a file name ending in .safetensors.")
    if os.path.exists(path) and not overwrite:
        raise OutputError(
            f"The output {path} already exists.",
            fix="Choose another name, or turn on the overwrite option to replace it.",
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"The output folder {parent} does not exist.", fix="Create it first, or pick another folder.")


_ALIGN = 4096
_STAGE = 8 * 1024 * 1024
_DEPTH = 3  # stages being written while the next one fills

# Temporary files being written. A signal can land between creating a writer and entering its
# ``with`` block; the CLI (and atexit) remove whatever is still listed here.
_LIVE_TEMPS: set[str] = set()


def cleanup_temps() -> list[str]:
    """Delete every temporary output still being written (interrupt handlers). Returns them."""
    removed = []
    for path in list(_LIVE_TEMPS):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # gone already, or a folder that refused it from the start
            pass
        _LIVE_TEMPS.discard(path)
    return removed


atexit.register(cleanup_temps)


class _Sink:
    """Sequential byte sink for the temporary file.

    On Linux the bytes go through page-aligned staging buffers and are written with
    O_DIRECT: the page-cache copy of buffered writes costs a whole CPU core at disk
    speed on small machines, and a 7 GB output would also fill the cache with dirty
    pages. A full stage goes to a small pool of writer threads (``os.pwrite`` at its
    offset) while the caller fills the next one, so filling a stage overlaps the disk
    and a fast SSD gets several writes in flight instead of one at a time. Where
    O_DIRECT is unavailable or refused (Windows, macOS, tmpfs, some network
    filesystems) it falls back to ordinary buffered writes.
    """

    def __init__(self, path: str, direct: bool = True, depth: int = _DEPTH):
        import mmap

        self.path = path
        self.pos = 0  # bytes accepted
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError:
                pass
        if not self.direct:
            self.fd = os.open(path, flags, 0o644)
        self._fallback_fd: int | None = None  # a buffered fd, once O_DIRECT was refused at write time
        self._fill = 0
        self._stages: list = []
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        if self.direct:
            import queue

            self._stages = [mmap.mmap(-1, _STAGE) for _ in range(depth + 1)]
            self._views = [memoryview(m) for m in self._stages]
            self._free: queue.Queue = queue.Queue()
            self._todo: queue.Queue = queue.Queue()
            for i in range(1, depth + 1):
                self._free.put(i)
            self._cur = 0
            self._mv = self._views[0]
            self._stage_off = 0  # file offset of the stage being filled
            self._lock = threading.Lock()
            self._threads = [
                threading.Thread(target=self._flusher, name=f"lorakit-write-{i}", daemon=True) for i in range(depth)
            ]
            for t in self._threads:
                t.start()

    def _flusher(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            i, off, n = item
            try:
                if self._error is None:
                    self._pwrite(self._views[i][:n], off)
            except BaseException as e:  # raised to the caller at its next stage or at finish
                self._error = e
            finally:
                self._free.put(i)

    def _pwrite(self, mv: memoryview, off: int) -> None:
        import errno

        done = 0
        while done < len(mv):
            fd = self._fallback_fd if self._fallback_fd is not None else self.fd
            try:
                done += os.pwrite(fd, mv[done:], off + done)
            except OSError as e:
                if e.errno != errno.EINVAL or fd == self._fallback_fd:
                    raise
                with self._lock:  # O_DIRECT refused at write time: go on buffered, same offsets
                    if self._fallback_fd is None:
                        self._fallback_fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _submit(self, final: bool = False) -> None:
        """Hand the stage being filled to the writer threads and take a free one."""
        n = self._fill
        if n:
            if final and n % _ALIGN:
                pad = _ALIGN - n % _ALIGN
                self._mv[n : n + pad] = bytes(pad)
                n += pad
            self._todo.put((self._cur, self._stage_off, n))
            self._stage_off += self._fill
            self._fill = 0
            if not final:
                self._cur = self._free.get()  # waits while every stage is being written
                self._mv = self._views[self._cur]
        self._raise_pending()

    def _drain(self) -> None:
        """Let the writer threads finish what they were given, and stop them."""
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def _write_all(self, data) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += os.write(self.fd, mv[done:])

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.pos += len(mv)
        if not self.direct:
            self._write_all(mv)
            return
        i = 0
        while i < len(mv):
            n = min(len(mv) - i, _STAGE - self._fill)
            self._mv[self._fill : self._fill + n] = mv[i : i + n]
            self._fill += n
            i += n
            if self._fill == _STAGE:
                self._submit()

    def copy_from(self, src_fd: int, offset: int, nbytes: int) -> None:
        """Append ``nbytes`` read from ``src_fd`` at ``offset``."""
        if not self.direct:
            done = 0
            while done < nbytes:
                try:
                    n = os.copy_file_range(src_fd, self.fd, nbytes - done, offset + done)
                except (OSError, AttributeError):
                    n = 0
                if n <= 0:
                    chunk = bytearray(min(_READ_CHUNK, nbytes - done))
                    n = pread_into(src_fd, memoryview(chunk), offset + done)
                    if n <= 0:
                        raise OSError("unexpected end of source file")
                    self._write_all(memoryview(chunk)[:n])
                done += n
            self.pos += nbytes
            return
        done = 0
        while done < nbytes:
            n = min(nbytes - done, _STAGE - self._fill)
            got = pread_into(src_fd, self._mv[self._fill : self._fill + n], offset + done)
            if got <= 0:
                raise OSError("unexpected end of source file")
            self._fill += got
            done += got
            self.pos += got
            if self._fill == _STAGE:
                self._submit()

    def finish(self, header_patch: bytes | None) -> None:
        """Write out what is staged, trim padding, apply the header patch, fsync, close."""
        if self.direct:
            self._submit(final=True)
            self._drain()
            self._raise_pending()
            for fd in (self.fd, self._fallback_fd):
                if fd is not None:
                    os.close(fd)
            self._fallback_fd = None
            self.fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        os.ftruncate(self.fd, self.pos)
        if header_patch is not None:
            os.pwrite(self.fd, header_patch, 0)
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        if self._threads:
            if self._error is None:
                self._error = OSError("the output was closed")  # the writers skip what is still queued
            self._drain()
        for name in ("fd", "_fallback_fd"):
            fd = getattr(self, name)
            if fd is not None:
                try:
                    os.close(fd)
                finally:
                    setattr(self, name, None)
        if self._stages:
            for v in self._views:
                v.release()
            for m in self._stages:
                m.close()
            self._stages = []


class StreamingWriter:
    """Write a safetensors file tensor by tensor, atomically.

    The header is written first; tensors must then arrive in exactly the order of
    ``entries``. :meth:`commit` fsyncs and renames the temporary file into place;
    leaving the ``with`` block with an exception removes it.
    """

    def __init__(
        self,
        path: str,
        entries: Sequence[OutEntry],
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
        direct: bool = True,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.entries = list(entries)
        self.overwrite = overwrite
        check_output_path(self.path, overwrite=overwrite)
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in output entries")
        self.header = build_header(self.entries, metadata)
        self._patched: bytes | None = None
        from ..tempfiles import sweep, temp_path

        sweep(os.path.dirname(self.path))  # our own orphans (a killed run) go first, with a line in the log
        self.tmp_path = temp_path(self.path)
        self._next = 0
        self.bytes_written = 0
        self.total_bytes = len(self.header) + sum(e.nbytes for e in self.entries)
        self._committed = False
        self._sink: _Sink | None = None
        _LIVE_TEMPS.add(self.tmp_path)  # listed before it exists, so no window leaves it behind
        try:
            self._sink = _Sink(self.tmp_path, direct=direct)
            self._sink.write(self.header)
            self.bytes_written = len(self.header)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                from ..tempfiles import output_error

                raise output_error(e, self.path) from e
            raise

    @property
    def direct_io(self) -> bool:
        return self._sink.direct

    # The metadata may hold values only known at the end (e.g. a hash computed while
    # streaming); they can be patched in place as long as the header length is unchanged.
    def patch_metadata(self, metadata: Mapping[str, str]) -> None:
        new = build_header(self.entries, metadata)
        if len(new) != len(self.header):
            raise ValueError("patched metadata must keep the header length")
        self._patched = new

    def _begin(self, name: str, nbytes: int) -> OutEntry:
        if self._next >= len(self.entries):
            raise ValueError(f"unexpected tensor {name!r}: all entries already written")
        e = self.entries[self._next]
        if e.name != name:
            raise ValueError(f"tensor order broken: expected {e.name!r}, got {name!r}")
        if nbytes != e.nbytes:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes given, header says {e.nbytes}")
        return e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (contiguous, dtype as declared)."""
        e = self._begin(name, tensor.numel() * tensor.element_size())
        if TORCH_TO_CODE.get(tensor.dtype) != e.dtype:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} but header says {e.dtype}")
        t = tensor.contiguous()
        if e.nbytes:
            self._sink.write(t.reshape(-1).view(torch.uint8).numpy())
        self._next += 1
        self.bytes_written += e.nbytes

    def copy_range(self, name: str, src_fd: int, offset: int, nbytes: int) -> None:
        """Write the next tensor by copying raw bytes from another file (no decode)."""
        self._begin(name, nbytes)
        if nbytes:
            self._sink.copy_from(src_fd, offset, nbytes)
        self._next += 1
        self.bytes_written += nbytes

    def commit(self) -> str:
        """Fsync and rename into place. Returns the final path."""
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            raise ValueError(f"commit before all tensors were written (next: {missing!r})")
        self._sink.finish(self._patched)
        if os.path.exists(self.path) and not self.overwrite:
            self.abort()
            raise OutputError(
                f"The output {self.path} appeared while lorakit was writing it.",
                fix="Choose another name, or turn on the overwrite option to replace it.",
            )
        os.replace(self.tmp_path, self.path)
        self._committed = True
        _LIVE_TEMPS.discard(self.tmp_path)
        try:
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse directory fsync
            pass
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self._committed:
            return
        try:
            if self._sink is not None:
                self._sink.close()
        except Exception:
            pass
        try:
            os.unlink(self.tmp_path)
        except OSError:  # never created (a read-only folder), or gone already
            pass
        _LIVE_TEMPS.discard(self.tmp_path)

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            self.abort()
        if isinstance(exc, OSError):  # disk full, read-only, permission: the user's error, in words
            from ..tempfiles import output_error

            err = output_error(exc, self.path)
            if err is not exc:
                raise err from exc


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Write a whole dict of tensors atomically (small files: LoRAs, test inputs)."""
    entries = [OutEntry(k, TORCH_TO_CODE[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path, entries, metadata, overwrite=overwrite) as w:
        for k, v in tensors.items():
            w.write(k, v.detach().cpu())
        return w.commit()
