"""Threads, buffers and settings shared by the streaming engines (bake, merge).

- :class:`Pool`: byte buffers for a stream of tensors, from an arena mapped once.
- :class:`WriterThread`: drains a short queue of tensors/raw copies into a StreamingWriter.
- :class:`Hasher`: SHA-256 of an input file on a side thread, for recipe metadata.
- :class:`Profile`: seconds per stage and thread, for the report.
- :func:`worker_count`, :func:`resolve_device`: how many maths threads, and where the maths runs.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import math
import mmap
import os
import queue
import threading
import time

import torch

from .engineopts import DEVICES
from .errors import RecipeError
from .formats.safetensors_io import StreamingWriter, pread_into

QUEUE_ITEMS = 6
CHUNK_ELEMS = 1 << 18  # float32 elements per row chunk (1 MB): memory stays flat, each pass over it stays in L2
# (bench/README.md: on 16 cores the rounding pass took 3.3x as long with 4 MB chunks as with 1 MB)
MIN_CHUNK_ELEMS = 1 << 19  # a chunk's least size: one torch thread makes 1 MB operations too small for their cost


def max_rounding_error(amax: float, dtype: torch.dtype) -> float:
    """The largest error rounding to nearest in ``dtype`` can make on values with |x| <= ``amax``: half a
    step of the binade ``amax`` lies in (the steps below it are smaller; subnormals share the smallest).

    The engines measure the real rounding loss only where it could still beat the largest found so far,
    so the report's figure stays exact while most chunks skip that pass.
    """
    if dtype == torch.float32 or not amax > 0.0:
        return 0.0
    fi = torch.finfo(dtype)
    if not amax <= fi.max * 2:
        return float("inf")
    e = max(math.frexp(amax)[1] - 1, math.frexp(fi.smallest_normal)[1] - 1)
    return math.ldexp(fi.eps, e - 1)


ENV_RESERVE = "LORAKIT_RESERVE_CORES"  # cores left to the host (inside the WebUI lorakit leaves 1 anyway)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def reserved_cores(reserve: int | None = None) -> int:
    """``reserve``, or ``$LORAKIT_RESERVE_CORES`` when it is None (0 when unset or not a number)."""
    if reserve is not None:
        return reserve
    try:
        return max(0, int(os.environ.get(ENV_RESERVE, "0")))
    except ValueError:
        return 0


def worker_count(reserve: int | None = None) -> int:
    """Maths threads for an engine: every usable core but those reserved and one for the I/O threads.

    ``reserve`` (default ``$LORAKIT_RESERVE_CORES``, else 0) leaves cores to the host: inside the
    WebUI one stays free for its server. The read, write and hash threads mostly wait on the disk
    or run SHA-256/memcpy with the GIL released, so they share the one core kept for them.
    """
    reserve = reserved_cores(reserve)
    return max(1, usable_cores() - reserve - 1)


ENGINE_WORKERS_MAX = 2


def engine_workers(reserve: int | None = None, most: int = ENGINE_WORKERS_MAX) -> int:
    """Maths threads for the bake and merge engines: at most ``ENGINE_WORKERS_MAX``, each with its share
    of the cores for torch's own threads (:func:`engine_threads`). Many Python threads each running
    small tensor operations contend for the interpreter lock: on 16 cores a bake took 10.7 s in the
    engine with 15 workers, 9.7 s with 8, 8.5 s with 4 and 7.4 s with 2; on 2 cores, two workers of one
    torch thread each beat one worker of two (11.6 s against 16.0 s for the whole bake; bench/README.md).
    Unlike :func:`worker_count`, no core is set aside for the I/O threads: they mostly wait on the disk."""
    reserve = reserved_cores(reserve)
    return max(1, min(most, usable_cores() - reserve))


@contextlib.contextmanager
def engine_threads(workers: int = 1, hashers: int = 0, reserve: int = 0):
    """The usable cores shared out among the maths worker threads while an engine runs (restored
    afterwards): each worker's torch operations get ``(cores - reserve - hashers) // workers`` threads, at
    least one. ``reserve``: cores left to the host (inside the WebUI, one for its server).

    The engines parallelise over tensors and row chunks with their own threads; a torch intra-op
    pool of every core per worker would oversubscribe the cores and spin-wait between the many
    small chunk operations, starving the hashing and I/O threads. Each SHA-256 hasher (an input whose
    hash is not cached) keeps a core busy for the whole stream and decides when it ends, so it gets
    a core of its own: on 16 cores a merge that hashed its three inputs took 20.3-21.3 s with torch
    on every core and 14.4-15.8 s with three cores left to the hashers (bench/README.md).
    """
    before = torch.get_num_threads()
    env = os.environ.get("LORAKIT_TORCH_THREADS", "")  # a measuring knob: torch threads per maths thread
    each = (
        int(env)
        if env.isdigit() and int(env) > 0
        else (usable_cores() - max(0, reserve) - max(0, hashers)) // max(1, workers)
    )
    torch.set_num_threads(max(1, each))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def gc_frozen():
    """While an engine streams, the objects that existed before it are left out of the cyclic
    garbage collector's passes (``gc.freeze``), and given back to it afterwards.

    A stream makes thousands of short-lived tensors; the collections they trigger hold the
    interpreter lock for every thread, and a full one scans every object torch and lorakit have
    loaded (83-86 ms at the start of a bake's stream on two cores; the stream's collections take
    4 ms frozen). What the stream makes is still collected; an older object that becomes garbage
    meanwhile waits until the stream ends. Where objects are frozen already (the host's own use, or
    another stream), it changes nothing.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def resolve_device(device: str | None) -> torch.device:
    """``auto``: the GPU when torch sees one, else the CPU; ``cuda``: the GPU, or the user's error."""
    name = (device or "auto").strip().lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise RecipeError(f"Unknown device {device!r}.", fix=f"Use one of {', '.join(DEVICES)}.")
    if name == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda") if has_cuda else torch.device("cpu")
    if not has_cuda:
        raise RecipeError(
            f"Device {device!r} was asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA).",
            fix="Use the device auto or cpu, or install a CUDA build of torch.",
        )
    return torch.device(name)


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/inf. One min/max pass (NaN and inf carry through it): on the CPU 40x
    faster than ``isfinite(t).all()``, which builds two boolean tensors on the way."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(_checkable(t).reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/inf values ``t`` holds; :func:`all_finite`'s one pass when there are none."""
    if all_finite(t):
        return 0
    return int((~torch.isfinite(_checkable(t))).sum())


def _checkable(t: torch.Tensor) -> torch.Tensor:
    """float8 as float16 (no min/max or isfinite kernels for it; float16 holds its values exactly)."""
    return t.to(torch.float16) if t.dtype.itemsize == 1 else t


@contextlib.contextmanager
def exact_float32(device: torch.device):
    """Full float32 matrix products on the GPU (no TF32), so GPU and CPU results agree; memory freed after."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # give back what the engine took (the WebUI shares the GPU)


class Profile:
    """Seconds spent per thread and stage (read, hash, convert, delta, add, round, write ...)."""

    def __init__(self) -> None:
        self._t: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, thread: str | None = None) -> None:
        name = thread or threading.current_thread().name
        with self._lock:
            d = self._t.setdefault(name, {})
            d[stage] = d.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t)

    def as_dict(self) -> dict:
        """{"threads": {thread: {stage: s}}, "stages": {stage: s summed over threads}}."""
        with self._lock:
            threads = {k: {s: round(v, 3) for s, v in sorted(d.items())} for k, d in sorted(self._t.items())}
        stages: dict[str, float] = {}
        for d in threads.values():
            for s, v in d.items():
                stages[s] = round(stages.get(s, 0.0) + v, 3)
        return {"threads": threads, "stages": stages}


ARENA_BYTES = 192 << 20  # a Pool's large buffers, mapped once: about what a stream holds at its peak
ARENA_ALIGN = 64 << 10
WRITER_BYTES = 64 << 20  # tensors queued for the writer (with O_DIRECT, 64 MB is tens of ms of the disk)
HUGE_BYTES = 2 << 20  # mapped buffers this large ask for huge pages: one fault per 2 MB instead of per 4 KB
MAP_BYTES = 1 << 20  # buffers this large are mapped from the kernel and given back when dropped


def _new_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 buffer. Large ones are private anonymous mappings: malloc would keep a dropped buffer's
    memory in its arenas (one per thread that allocated), where the peak memory still counts it."""
    if nbytes >= MAP_BYTES and hasattr(mmap, "MAP_PRIVATE"):
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
        m = mmap.mmap(-1, nbytes, flags=flags)
        if nbytes >= HUGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # huge pages turned off: plain pages
                m.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(m, dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8)


class Pool:
    """Byte buffers for a stream of tensors, carved from one arena mapped once.

    Large buffers are ranges of an arena of ``arena_bytes`` (best fit; a range given back joins its
    free neighbours), so its pages are faulted in once: fresh mappings for every tensor (what a free
    list of mixed sizes comes to) zeroed 4-8 GB of new pages in a 7 GB bake. When the arena has no
    room (a tensor larger than it, or more held at once than it holds) the buffer is a mapping of its
    own, given back when dropped; small ones come from malloc. The peak memory is the arena plus
    those: the callers' byte budgets bound what is held at once.
    """

    def __init__(self, arena_bytes: int = ARENA_BYTES) -> None:
        self._lock = threading.Lock()
        self._size = max(0, arena_bytes) // ARENA_ALIGN * ARENA_ALIGN
        self._arena: torch.Tensor | None = None  # mapped at the first large request
        self._base = 0  # its address
        self._free = [(0, self._size)] if self._size else []  # (offset, size), by offset
        self._held: dict[int, int] = {}  # offset -> size
        self.overflow = 0  # large buffers that did not fit (a measure for tests and benches)

    def get(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` (its contents are undefined)."""
        want = max(nbytes, 1 << 16)
        if want < MAP_BYTES:
            return _new_buffer(want)
        n = -(-want // ARENA_ALIGN) * ARENA_ALIGN
        with self._lock:
            best = None
            for i, (_, size) in enumerate(self._free):
                if size >= n and (best is None or size < self._free[best][1]):
                    best = i
            if best is not None:
                at, size = self._free[best]
                if size == n:
                    del self._free[best]
                else:
                    self._free[best] = (at + n, size - n)
                self._held[at] = n
                if self._arena is None:
                    self._arena = _new_buffer(self._size)
                    self._base = self._arena.data_ptr()
                return self._arena[at : at + n]
            self.overflow += 1
        return _new_buffer(want)

    def put(self, buf: torch.Tensor) -> None:
        """Give a buffer back: the caller and its views are done with it."""
        if self._arena is None or buf.numel() == 0:
            return
        at = buf.data_ptr() - self._base
        if not 0 <= at < self._size:
            return  # a buffer of its own: freed when dropped
        with self._lock:
            n = self._held.pop(at, None)
            if n is None:  # pragma: no cover - an engine bug
                raise RuntimeError("a pooled buffer was given back twice")
            i = bisect.bisect_left(self._free, (at, 0))
            if i < len(self._free) and at + n == self._free[i][0]:  # joins the range after it
                n += self._free.pop(i)[1]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == at:  # and the one before
                at, n = self._free[i - 1][0], self._free[i - 1][1] + n
                i -= 1
                del self._free[i]
            self._free.insert(i, (at, n))

    def held(self) -> int:
        """Bytes of the arena lent out and not yet given back."""
        with self._lock:
            return sum(self._held.values())


class WriterThread(threading.Thread):
    """Writes queued tensors in order. At most ``QUEUE_ITEMS`` items and ``budget`` bytes wait."""

    def __init__(self, writer: StreamingWriter, pool: Pool, budget: int = WRITER_BYTES, profile: Profile | None = None):
        super().__init__(name="lorakit-writer", daemon=True)
        self.profile = profile
        self.w = writer
        self.pool = pool
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set on failure: drop what is queued, write nothing more
        self.budget = budget
        self._queued = 0
        self._cv = threading.Condition()

    @staticmethod
    def _size(item) -> int:
        if item is None or item[0] != "data":
            return 0
        t = item[2]
        return t.numel() * t.element_size()

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            kind, name, payload, buf = item
            try:
                if self.error is None and not self.stop.is_set():
                    t = time.perf_counter()
                    if kind == "copy":
                        self.w.copy_range(name, *payload)
                    else:
                        self.w.write(name, payload)
                    if self.profile is not None:
                        self.profile.add("copy" if kind == "copy" else "write", time.perf_counter() - t)
            except BaseException as e:  # reported to the main thread
                self.error = e
            finally:
                if buf is not None:
                    self.pool.put(buf)
                with self._cv:
                    self._queued -= self._size(item)
                    self._cv.notify_all()

    def put(self, item) -> None:
        size = self._size(item)
        with self._cv:  # bounded memory: wait while queued tensors exceed the budget
            while self._queued > 0 and self._queued + size > self.budget and self.error is None:
                self._cv.wait(timeout=0.5)
            self._queued += size
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


class ReadGate:
    """Keeps a hasher just ahead of the engine's reads of the same file.

    The hasher then works as read-ahead: the engine finds the bytes in the page cache
    instead of the disk reading each file twice when inputs exceed memory.
    """

    def __init__(self, lead: int = 512 << 20):
        self.lead = lead
        self._pos = 0
        self._open = False
        self._cv = threading.Condition()

    def advance(self, offset: int) -> None:
        with self._cv:
            if offset > self._pos:
                self._pos = offset
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def wait_for(self, offset: int, stop: threading.Event) -> None:
        with self._cv:
            while not self._open and not stop.is_set() and offset > self._pos + self.lead:
                self._cv.wait(timeout=0.5)


SYS_DEV_BLOCK = "/sys/dev/block"


def kernel_window(fd: int) -> int:
    """The most one WILLNEED request makes Linux read of this file: ``max(read_ahead_kb, max_sectors_kb)``
    of its disk, where ``force_page_cache_ra`` caps each request (a 64 MB request read 8 MB on a disk with
    ``read_ahead_kb`` 8192, Linux 6.18: steps of 64 MB left 7/8 of every stretch unread). 128 KB, the
    kernel's default read-ahead, where the disk is unknown (an overlay, a network file system); at least
    128 KB, at most 64 MB."""
    lo, hi = 128 << 10, 64 << 20
    try:
        dev = os.fstat(fd).st_dev
        base = f"{SYS_DEV_BLOCK}/{os.major(dev)}:{os.minor(dev)}"
    except (OSError, AttributeError):
        return lo
    for qdir in (base + "/queue", base + "/../queue"):  # a partition's queue is its disk's
        try:
            with open(qdir + "/read_ahead_kb") as f:
                ra = int(f.read())
            with open(qdir + "/max_sectors_kb") as f:
                io = int(f.read())
        except (OSError, ValueError):
            continue
        return max(lo, min(hi, max(ra, io) << 10))
    return lo


class ReadAhead:
    """Asks the kernel to read a file ahead of the engine (``posix_fadvise`` WILLNEED), for runs where no
    hasher reads it ahead (the hash came from the cache).

    The engine reads tensor by tensor on several threads, and raw copies of untouched tensors come
    later from the writer: the kernel's own read-ahead sees no sequential stream. Cold, on the 16-core
    machine, the readers then spent 13.0 s reading the base against 2.4 s when the hasher ran ahead
    (bench/README.md). The requests go in steps of the kernel's window (:func:`kernel_window`): a larger
    request is read only up to it. Costs no thread; a no-op where the platform has no fadvise.
    """

    STEP = 64 << 20  # at most this much per request

    def __init__(self, fd: int | None, lead: int = 512 << 20):
        self.fd = fd if hasattr(os, "posix_fadvise") else None
        self.lead = lead
        self.pos = 0
        self.size = os.fstat(fd).st_size if self.fd is not None else 0
        self.window = kernel_window(fd) if self.fd is not None else 0

    @classmethod
    def whole(cls, fd: int | None) -> None:
        """Ask for a whole (small) file, window by window: the LoRAs, read piece by piece by the maths threads."""
        if fd is not None and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                cls(fd, lead=1 << 62).advance(0)

    def advance(self, offset: int) -> None:
        """The engine has reached ``offset``: keep the kernel reading up to ``lead`` bytes past it."""
        target = min(self.size, offset + self.lead)
        step = max(1, min(self.STEP, self.window))
        while self.fd is not None and self.pos < target:
            n = min(step, self.size - self.pos)
            try:
                os.posix_fadvise(self.fd, self.pos, n, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.fd = None
                return
            self.pos += n


def read_ahead_early(spans: list[tuple[str, int]]) -> None:
    """Ask the kernel for the first bytes of each input (``(path, bytes)``, 0 for a whole file) from a
    side thread, before anything else happens: a cold command line spends its first seconds importing
    torch (2 s on the 2-core VM, about 4 s with a CUDA build on the 16-core machine), and the disk can
    read the base's first stretch and the LoRA files meanwhile. Never fails; a no-op without fadvise.
    """
    if not hasattr(os, "posix_fadvise") or not spans:
        return

    def run() -> None:
        for path, nbytes in spans:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:  # in ReadAhead's steps: the first arrive while later ones queue
                ReadAhead(fd, lead=nbytes if nbytes > 0 else 1 << 62).advance(0)
            except OSError:
                pass
            finally:
                os.close(fd)

    threading.Thread(target=run, name="lorakit-readahead", daemon=True).start()


class Hasher(threading.Thread):
    def __init__(self, path: str, gate: ReadGate | None = None, profile: Profile | None = None):
        super().__init__(name="lorakit-hash", daemon=True)
        self.path = path
        self.gate = gate
        self.profile = profile
        self.digest = ""
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            with open(self.path, "rb", buffering=0) as f:
                buf = bytearray(8 << 20)
                view = memoryview(buf)
                pos = 0
                while not self.stop.is_set():
                    if self.gate is not None:
                        self.gate.wait_for(pos + len(buf), self.stop)
                    t0 = time.perf_counter()
                    n = f.readinto(buf)
                    if not n:
                        break
                    t1 = time.perf_counter()
                    h.update(view[:n])
                    if self.profile is not None:
                        self.profile.add("read", t1 - t0)
                        self.profile.add("hash", time.perf_counter() - t1)
                    pos += n
            if not self.stop.is_set():
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


def reader_count(cores: int | None = None) -> int:
    """Threads reading inputs ahead: one on small machines (a second only competes with the maths for a
    core), up to three where a fast SSD answers several requests at once. ``$LORAKIT_READERS`` overrides
    (for measuring: a cold, high-latency disk may want more requests in flight)."""
    env = os.environ.get("LORAKIT_READERS", "")
    if env.isdigit() and int(env) > 0:
        return min(8, int(env))
    n = cores or os.cpu_count() or 1
    return 1 if n < 4 else 2 if n < 8 else 3


class Token:
    """Releases a pooled buffer once every user is done with it."""

    def __init__(self, users: int, on_free):
        self._n = users
        self._lock = threading.Lock()
        self._on_free = on_free

    def release(self) -> None:
        with self._lock:
            self._n -= 1
            free = self._n == 0
        if free:
            self._on_free()


class FedHasher(threading.Thread):
    """SHA-256 of a file from the byte ranges an engine has already read.

    Ranges must arrive in file order; the bytes between them (and after the last) are read
    here. A range out of order switches to hashing the whole file at the end. Each input
    is thus read from disk once, not once for the merge and once more for its hash.
    """

    def __init__(self, path: str, max_items: int = 16, profile: Profile | None = None):
        super().__init__(name=f"lorakit-hash-{os.path.basename(path)[:24]}", daemon=True)
        self.path = path
        self.profile = profile
        self.q: queue.Queue = queue.Queue(maxsize=max_items)
        self.pos = 0
        self.fallback = False
        self.digest = ""
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def feed(self, offset: int, data, release) -> None:
        while True:
            if self.stop.is_set():
                release()
                return
            try:
                self.q.put((offset, data, release), timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.q.put(None)

    def _hash_range(self, fd: int, h, start: int, end: int) -> None:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while start < end and not self.stop.is_set():
            n = pread_into(fd, view[: min(len(buf), end - start)], start)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file while hashing")
            h.update(view[:n])
            start += n

    def run(self) -> None:
        h = hashlib.sha256()
        fd = None
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            while True:
                item = self.q.get()
                if item is None:
                    break
                offset, data, release = item
                try:
                    if self.fallback or self.stop.is_set() or self.error is not None:
                        continue
                    if offset < self.pos:
                        self.fallback = True
                        continue
                    if offset > self.pos:
                        self._hash_range(fd, h, self.pos, offset)
                    t = time.perf_counter()
                    h.update(data)
                    if self.profile is not None:
                        self.profile.add("hash", time.perf_counter() - t)
                    self.pos = offset + len(data)
                finally:
                    release()
            if self.stop.is_set():
                return
            if self.fallback:
                h, self.pos = hashlib.sha256(), 0
            self._hash_range(fd, h, self.pos, os.fstat(fd).st_size)
            if not self.stop.is_set():
                self.digest = h.hexdigest()
        except BaseException as e:  # reported to the engine
            self.error = e
            while True:  # keep releasing what is still queued
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[2]()
        finally:
            if fd is not None:
                os.close(fd)
