"""The hashes people look models up by, computed exactly as the WebUI computes them.

- ``sha256``: SHA-256 of the whole file (A1111 ``modules/hashes.py`` ``calculate_sha256``).
- ``shorthash``: its first 10 hex digits, the checkpoint hash the WebUI shows and writes into
  infotexts (``sd_models.CheckpointInfo``: ``sha256[0:10]``).
- ``legacy``: the old "model hash", SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits
  (``sd_models.model_hash``).
- ``addnet``: for safetensors, SHA-256 of everything after the header (``hashes.addnet_hash_safetensors``,
  kohya's ``sshs_model_hash``); the WebUI's LoRA hash. ``addnet_short`` = its first 12 hex digits
  (``network.NetworkOnDisk.set_hash``), the form in infotexts' "Lora hashes".

One pass over the file gives all of them.
"""

from __future__ import annotations

import hashlib
import os
import struct

from ..errors import FormatError

CHUNK = 16 << 20


def file_hashes(path: str) -> dict[str, str]:
    """Return sha256, shorthash, legacy and (safetensors only) addnet / addnet_short of ``path``."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e.strerror}).", fix="Check the path and permissions.") from None
    full = hashlib.sha256()
    legacy = hashlib.sha256()
    addnet = None
    data_start = None
    with f:
        head = f.read(8)
        if path.lower().endswith(".safetensors") and len(head) == 8:
            n = struct.unpack("<Q", head)[0]
            if 8 + n <= size:
                data_start = 8 + n
                addnet = hashlib.sha256()
        f.seek(0)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        pos = 0
        while n := f.readinto(buf):
            chunk = view[:n]
            full.update(chunk)
            lo, hi = max(pos, 0x100000), min(pos + n, 0x110000)
            if lo < hi:
                legacy.update(chunk[lo - pos : hi - pos])
            if addnet is not None and pos + n > data_start:
                addnet.update(chunk[max(data_start - pos, 0) :])
            pos += n
    sha = full.hexdigest()
    out = {"sha256": sha, "shorthash": sha[:10], "legacy": legacy.hexdigest()[:8]}
    if addnet is not None:
        a = addnet.hexdigest()
        out["addnet"] = a
        out["addnet_short"] = a[:12]
    return out
