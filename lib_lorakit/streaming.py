"""Threads and buffers shared by the streaming engines (bake, merge).

- :class:`Pool`: reusable byte buffers (fresh large allocations cost page faults each time).
- :class:`WriterThread`: drains a short queue of tensors/raw copies into a StreamingWriter.
- :class:`Hasher`: SHA-256 of an input file on a side thread, for recipe metadata.
"""

from __future__ import annotations

import hashlib
import queue
import threading

import torch

from .formats.safetensors_io import StreamingWriter

QUEUE_ITEMS = 6


class Pool:
    """Reusable uint8 buffers: fresh large allocations cost page faults on every use."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for i, b in enumerate(self._free):
                if b.numel() >= nbytes and (best is None or b.numel() < self._free[best].numel()):
                    best = i
            if best is not None:
                return self._free.pop(best)
        return torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            if len(self._free) > QUEUE_ITEMS + 4:
                self._free.sort(key=lambda b: b.numel())
                self._free.pop(0)


class WriterThread(threading.Thread):
    def __init__(self, writer: StreamingWriter, pool: Pool):
        super().__init__(name="lorakit-writer", daemon=True)
        self.w = writer
        self.pool = pool
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set on failure: drop what is queued, write nothing more

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, name, payload, buf = item
            try:
                if self.error is None and not self.stop.is_set():
                    if kind == "copy":
                        self.w.copy_range(name, *payload)
                    else:
                        self.w.write(name, payload)
            except BaseException as e:  # reported to the main thread
                self.error = e
            finally:
                if buf is not None:
                    self.pool.put(buf)

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error


class Hasher(threading.Thread):
    def __init__(self, path: str):
        super().__init__(name="lorakit-hash", daemon=True)
        self.path = path
        self.digest = ""
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as f:
                buf = bytearray(8 << 20)
                view = memoryview(buf)
                while not self.stop.is_set() and (n := f.readinto(buf)):
                    h.update(view[:n])
            self.digest = h.hexdigest()
        except BaseException as e:  # pragma: no cover - I/O failure
            self.error = e


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (None where the platform cannot tell)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 1e6
        except Exception:
            return None


def drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
