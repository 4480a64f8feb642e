"""A LoRA file's header as the inspector reads it: names, shapes, dtypes, metadata and the alpha
scalars, without torch, and each distinct tensor table parsed once.

Files from one trainer with one configuration have byte-identical tensor tables (names, dtypes,
shapes, offsets); only their metadata differs. Safetensors writers (the format's own library,
kohya, lorakit) put ``__metadata__`` first in the header, so the rest of the header is the table:
its digest and the size of the data area identify it. The first file with a table is read and
checked by :func:`~lib_lorakit.formats.safetensors_io.read_header` (every check of the format);
later files with the same bytes and the same data size share that table (and what the inspector
derives from the shapes alone, in ``Table.memo``), and only their metadata is parsed.

Alpha scalars are decoded from their bytes at the offsets the header gives (IEEE half, bfloat16,
single and double floats, integers), the same values torch's loader gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from collections import OrderedDict
from typing import Any

from ..errors import FormatError
from ..formats.safetensors_io import ITEMSIZE, MAX_HEADER, read_header
from ..formats.sources import TensorSource

__all__ = ["LoraHeader", "Table", "open_lora_header", "TABLE_STATS"]

_META_FIRST = re.compile(r'\A\s*\{\s*"__metadata__"\s*:\s*')
_AFTER_META = re.compile(r"\s*,")
_DECODER = json.JSONDecoder()
# safetensors dtype code -> struct format of one element (little-endian), for scalars read from bytes
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b"}
_SCALAR_FORMATS.update({"U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?"})

TABLE_STATS: dict[str, int] = {"parsed": 0, "shared": 0}  # for tests and benchmarks
_TABLES: OrderedDict[tuple, Table] = OrderedDict()
_TABLES_MAX = 64
_LOCK = threading.Lock()


class Table:
    """One distinct tensor table: shapes, dtypes and data offsets (relative to the data area)."""

    __slots__ = ("key", "entries", "shapes", "keys", "memo")

    def __init__(self, key: tuple, entries: dict[str, tuple[tuple[int, ...], str, int, int]]):
        self.key = key
        self.entries = entries
        self.shapes = {k: e[0] for k, e in entries.items()}  # shared by every file with this table: read only
        self.keys = list(entries)
        self.memo: dict[str, Any] = {}  # what is derived from the shapes alone, computed once per table


class LoraHeader(TensorSource):
    """A safetensors LoRA's header (see the module's description); values of small tensors on demand."""

    def __init__(self, path: str, metadata: dict[str, str], table: Table, data_start: int):
        self.path = path
        self.metadata = metadata
        self.table = table
        self._data_start = data_start

    def keys(self) -> list[str]:
        return list(self.table.keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.table.entries[key][0]

    def dtype(self, key: str) -> str:
        return self.table.entries[key][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.table.shapes

    def read(self, key: str, out=None):
        """A tensor's value through lorakit's reader (imports torch; the inspector reads scalars instead)."""
        from ..formats.safetensors_io import SafetensorsFile

        with SafetensorsFile(self.path) as f:
            t = f.read(key)
        if out is not None:
            out.copy_(t)
            return out
        return t

    def read_scalars(self, keys: list[str]) -> dict[str, float | None]:
        """The first element of each tensor as a float (None for an empty one), read from its bytes."""
        spans = []
        for k in keys:
            shape, dtype, a, b = self.table.entries[k]
            spans.append((self._data_start + a, b - a, k, dtype))
        spans.sort()
        out: dict[str, float | None] = {}
        torch_keys = []
        with open(self.path, "rb", buffering=0) as f:
            fd = f.fileno()
            advise = getattr(os, "posix_fadvise", None)
            if advise is not None and len(spans) > 1:
                try:  # the reads go to the disk together instead of one seek at a time on a cold cache
                    for start, n, _, _ in spans:
                        if n:
                            advise(fd, start, min(n, 8), os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass
            for start, n, k, dtype in spans:
                fmt = _SCALAR_FORMATS.get(dtype)
                if n == 0:
                    out[k] = None
                elif dtype == "BF16":
                    raw = os.pread(fd, 2, start)
                    out[k] = struct.unpack("<f", b"\0\0" + raw)[0] if len(raw) == 2 else _short(self.path, k)
                elif fmt is None:
                    torch_keys.append(k)  # float8 and the like: torch's own conversion
                else:
                    size = ITEMSIZE[dtype]
                    raw = os.pread(fd, size, start)
                    if len(raw) != size:
                        _short(self.path, k)
                    v = struct.unpack(fmt, raw)[0]
                    out[k] = float(v)
        for k in torch_keys:
            out[k] = float(self.read(k).reshape(-1)[0])
        return out

    def close(self) -> None:
        pass


def _short(path: str, key: str):
    raise FormatError(
        f"{path}: not a valid safetensors file: unexpected end of file while reading tensor {key!r}",
        fix="The file is damaged or incomplete. Download or export it again.",
    )


def _bad(path: str, problem: str) -> FormatError:
    return FormatError(
        f"{path}: not a valid safetensors file: {problem}",
        fix="The file is damaged or incomplete. Download or export it again.",
    )


def _reuse() -> bool:
    from .structure import ENV_NO_REUSE

    return os.environ.get(ENV_NO_REUSE) != "1"


def open_lora_header(path: str) -> LoraHeader:
    """Read a .safetensors file's header; the tensor table is shared with earlier files that have the same one."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw = f.read(n) if 0 < n <= MAX_HEADER and 8 + n <= size else None
    except OSError:
        raw = None
    if raw is None or len(raw) != n:
        return _parse_full(path, None)  # read_header names what is wrong (or the OS error)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_full(path, None)
    data_start = 8 + n
    meta: dict[str, str] = {}
    start = 0  # where the table starts in ``text``
    m = _META_FIRST.match(text)
    if m:
        try:
            meta, end = _DECODER.raw_decode(text, m.end())
        except ValueError:
            return _parse_full(path, None)
        after = _AFTER_META.match(text, end)
        if not isinstance(meta, dict) or after is None:
            return _parse_full(path, None)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _bad(path, "__metadata__ must map strings to strings")
        start = after.end()
    elif '"__metadata__"' in text or "{" not in text:  # metadata after some tensors: a table of its own
        return _parse_full(path, None)
    else:
        start = text.index("{") + 1
    # the table's bytes (without the padding to 8 bytes, which follows the metadata's length) and the data
    # area's size identify the table
    b0 = start if len(text) == len(raw) else len(text[:start].encode("utf-8"))
    b1 = len(raw)
    while b1 > b0 and raw[b1 - 1] in b" \t\r\n":
        b1 -= 1
    key = (hashlib.blake2b(memoryview(raw)[b0:b1], digest_size=20).digest(), size - data_start)
    reuse = _reuse()
    with _LOCK:
        table = _TABLES.get(key) if reuse else None
        if table is not None:
            _TABLES.move_to_end(key)
            TABLE_STATS["shared"] += 1
    if table is None:
        return _parse_full(path, key if reuse else None)
    return LoraHeader(path, meta, table, data_start)


def _parse_full(path: str, key: tuple | None) -> LoraHeader:
    """Read and check the whole header (formats.safetensors_io.read_header); remember its table under ``key``."""
    tensors, meta = read_header(path)
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    # names in sorted order, as safetensors' own reader lists them (evidence names the first match)
    entries = {
        name: (t.shape, t.dtype, t.start - data_start, t.end - data_start) for name, t in sorted(tensors.items())
    }
    table = Table(key or ("unshared", path), entries)
    with _LOCK:
        TABLE_STATS["parsed"] += 1
        if key is not None:
            _TABLES[key] = table
            while len(_TABLES) > _TABLES_MAX:
                _TABLES.popitem(last=False)
    return LoraHeader(path, dict(meta), table, data_start)
