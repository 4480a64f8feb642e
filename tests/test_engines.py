"""The engines' shared machinery: remembered hashes, maths threads, the GPU path and the stage profile."""

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
from factories import files_in, tiny_checkpoint, write

from lib_lorakit.bake import LoraSpec, bake
from lib_lorakit.errors import RecipeError
from lib_lorakit.formats.sources import open_source
from lib_lorakit.hashcache import HashCache
from lib_lorakit.merge import ModelSpec, merge
from lib_lorakit.streaming import resolve_device, worker_count
from lib_lorakit.synth import make_lora

HAS_CUDA = torch.cuda.is_available()


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def recipe(tmp_path):
    """An SDXL base and four LoRAs of different algorithms (low rank, Kronecker, Hadamard, DoRA)."""
    base_p = tiny_checkpoint(tmp_path, "sdxl", seed=5)
    with open_source(base_p) as src:
        sds = {
            "lora": make_lora("sdxl", "lora", seed=6),
            "lokr": make_lora("sdxl", "lokr", seed=7, conv=False),
            "loha": make_lora("sdxl", "loha", seed=8, te=False),
            "dora": make_lora("sdxl", "dora", seed=9, conv=False, te=False, base=src),
        }
    paths = [write(tmp_path, f"{n}.safetensors", sd) for n, sd in sds.items()]
    return base_p, [LoraSpec(p, s) for p, s in zip(paths, (0.7, 0.6, 0.9, 0.5))]


def fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between two fp16 tensors, in fp16 steps (ulps) at their magnitude."""
    a32, b32 = a.float(), b.float()
    mag = torch.maximum(a32.abs(), b32.abs()).clamp_min(2.0**-14)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 10)
    return float(((a32 - b32).abs() / ulp).max()) if a.numel() else 0.0


# --- hash cache ---------------------------------------------------------------------------------


def test_second_bake_takes_the_base_hash_from_the_cache(tmp_path):
    base_p, specs = recipe(tmp_path)
    data = tmp_path / "data"
    r1 = bake(base_p, specs, str(tmp_path / "o1.safetensors"), hash_cache=str(data))
    assert r1["base"]["sha256"] == sha(base_p) and r1["base"]["sha256_source"] == "computed"
    assert all(lo["sha256_source"] == "computed" for lo in r1["loras"])
    stored = json.loads((data / "hashes.json").read_text())
    assert stored[os.path.realpath(base_p)]["sha256"] == sha(base_p)

    r2 = bake(base_p, specs, str(tmp_path / "o2.safetensors"), hash_cache=str(data))
    assert r2["base"]["sha256_source"] == "cache" and r2["base"]["sha256"] == sha(base_p)
    assert all(lo["sha256_source"] == "cache" and lo["sha256"] == sha(lo["path"]) for lo in r2["loras"])
    meta = safetensors.safe_open(str(tmp_path / "o2.safetensors"), "pt").metadata()
    assert json.loads(meta["lorakit.recipe"])["base"]["sha256"] == sha(base_p)
    assert safetensors.torch.load_file(str(tmp_path / "o1.safetensors"))["model.diffusion_model.out.2.weight"].equal(
        safetensors.torch.load_file(str(tmp_path / "o2.safetensors"))["model.diffusion_model.out.2.weight"]
    )


def test_changed_file_is_hashed_again(tmp_path):
    base_p, specs = recipe(tmp_path)
    cache = HashCache(str(tmp_path / "data"))
    bake(base_p, specs, str(tmp_path / "o1.safetensors"), hash_cache=cache)
    sd = safetensors.torch.load_file(base_p)
    first = next(k for k, v in sd.items() if v.is_floating_point())
    sd[first] = sd[first] + 1
    os.unlink(base_p)  # a new file (new inode, size or mtime may even match)
    safetensors.torch.save_file(sd, base_p)
    r = bake(base_p, specs, str(tmp_path / "o2.safetensors"), hash_cache=cache)
    assert r["base"]["sha256_source"] == "computed" and r["base"]["sha256"] == sha(base_p)
    st = os.stat(base_p)
    os.utime(base_p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, hashed again
    r = bake(base_p, specs, str(tmp_path / "o3.safetensors"), hash_cache=cache)
    assert r["base"]["sha256_source"] == "computed"


def test_host_hash_is_used_and_remembered(tmp_path):
    base_p, specs = recipe(tmp_path)
    asked = []

    def host_lookup(path):
        asked.append(path)
        return sha(base_p) if path == os.path.realpath(base_p) else None

    cache = HashCache(str(tmp_path / "data"), lookup=host_lookup)
    r = bake(base_p, specs, str(tmp_path / "o.safetensors"), hash_cache=cache)
    assert r["base"]["sha256_source"] == "host" and r["base"]["sha256"] == sha(base_p)
    r = bake(base_p, specs, str(tmp_path / "o2.safetensors"), hash_cache=HashCache(str(tmp_path / "data")))
    assert r["base"]["sha256_source"] == "cache"


def test_damaged_cache_file_is_ignored(tmp_path):
    base_p, specs = recipe(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "hashes.json").write_text("{not json")
    r = bake(base_p, specs, str(tmp_path / "o.safetensors"), hash_cache=str(tmp_path / "data"))
    assert r["base"]["sha256_source"] == "computed" and r["base"]["sha256"] == sha(base_p)


def test_merge_uses_the_hash_cache(tmp_path):
    paths = [tiny_checkpoint(tmp_path, "sd15", name=f"m{i}.safetensors", seed=i) for i in range(2)]
    data = str(tmp_path / "data")
    r1 = merge([ModelSpec(p, 1) for p in paths], str(tmp_path / "o1.safetensors"), hash_cache=data)
    assert [i["sha256_source"] for i in r1["inputs"]] == ["computed", "computed"]
    r2 = merge([ModelSpec(p, 1) for p in paths], str(tmp_path / "o2.safetensors"), hash_cache=data)
    assert [i["sha256_source"] for i in r2["inputs"]] == ["cache", "cache"]
    assert [i["sha256"] for i in r2["inputs"]] == [sha(p) for p in paths]
    assert sha(str(tmp_path / "o1.safetensors")) == sha(str(tmp_path / "o2.safetensors"))


# --- maths threads --------------------------------------------------------------------------------


def test_bake_output_does_not_depend_on_the_thread_count(tmp_path):
    base_p, specs = recipe(tmp_path)
    outs = []
    for n in (1, 3):
        out = str(tmp_path / f"o{n}.safetensors")
        r = bake(base_p, specs, out, device="cpu", workers=n)
        assert r["engine"]["workers"] == n
        outs.append((sha(out), r["rounding"], r["loras"][0]["max_rel_change_by_block"]))
    assert outs[0] == outs[1]
    prof = r["engine"]
    maths = [t for t in prof["threads"] if t.startswith("lorakit-maths")]
    assert len(maths) >= 2 and all(prof["threads"][t].get("add", 0) >= 0 for t in maths)
    assert {"read base", "add", "round", "write", "copy", "hash"} <= set(prof["stages"])


def test_readers_held_to_a_byte_budget_still_finish_in_order(tmp_path, monkeypatch):
    """Three readers sharing a budget smaller than any tensor: each may only read the key wanted next,
    and the bake still completes, identical to one reader's."""
    import lib_lorakit.bake.engine as eng

    base_p, specs = recipe(tmp_path)
    ref = str(tmp_path / "ref.safetensors")
    bake(base_p, specs, ref, device="cpu")
    real = eng._Prefetcher.__init__

    def tight(self, baker, keys, depth=2, readers=1, budget=0):
        real(self, baker, keys, depth=depth, readers=3, budget=1)

    monkeypatch.setattr(eng._Prefetcher, "__init__", tight)
    out = str(tmp_path / "tight.safetensors")
    bake(base_p, specs, out, device="cpu")
    assert sha(out) == sha(ref)


def test_pool_lends_ranges_of_one_arena_and_joins_them_when_given_back():
    import lib_lorakit.streaming as s

    mb = s.MAP_BYTES
    pool = s.Pool(arena_bytes=8 * mb)
    a, b, c = pool.get(2 * mb), pool.get(3 * mb), pool.get(3 * mb - 5)  # the last rounded up
    base = a.data_ptr()
    assert [t.data_ptr() - base for t in (a, b, c)] == [0, 2 * mb, 5 * mb] and pool.held() == 8 * mb
    a[:] = 1
    b[:] = 2
    c[:] = 3  # disjoint: writing one leaves the others alone
    assert int(a.sum()) == 2 * mb and int(b.float().mean()) == 2
    d = pool.get(mb)  # the arena is full: a mapping of its own, not a wait
    assert pool.overflow == 1 and not base <= d.data_ptr() < base + 8 * mb
    pool.put(d)  # dropped, nothing else
    pool.put(b)
    assert pool.get(4 * mb).data_ptr() not in range(base, base + 8 * mb)  # 3 MB free: does not fit
    pool.put(a)  # joins b's range: 5 MB from the start
    e = pool.get(4 * mb)
    assert e.data_ptr() == base and pool.overflow == 2
    pool.put(c)
    pool.put(e)
    assert pool.held() == 0 and pool._free == [(0, 8 * mb)]  # all ranges joined again
    small = pool.get(4096)  # small buffers come from malloc
    assert not base <= small.data_ptr() < base + 8 * mb
    pool.put(small)
    assert pool._free == [(0, 8 * mb)]


def test_pool_takes_the_best_fitting_range_and_reuses_its_pages():
    """A stream's buffers are given back out of order (three readers, two maths threads): the best
    fitting free range keeps the large ones whole; the arena's pages are faulted in once."""
    import lib_lorakit.streaming as s

    mb = s.MAP_BYTES
    pool = s.Pool(arena_bytes=16 * mb)
    bufs = [pool.get(n * mb) for n in (1, 4, 2, 6, 3)]  # 16 MB: full
    pool.put(bufs[1])  # a 4 MB hole at 1 MB
    pool.put(bufs[3])  # a 6 MB hole at 7 MB
    got = pool.get(4 * mb)
    assert got.data_ptr() == bufs[1].data_ptr()  # the 4 MB hole, not the start of the 6 MB one
    assert pool.get(6 * mb).data_ptr() == bufs[3].data_ptr() and pool.overflow == 0
    if hasattr(s.mmap, "MAP_PRIVATE"):  # a mapping starts on a page: malloc's large blocks do not
        assert s._new_buffer(s.MAP_BYTES).data_ptr() % 4096 == 0


def test_gc_frozen_leaves_older_objects_out_and_gives_them_back():
    import gc
    import weakref

    import lib_lorakit.streaming as s

    class Node:
        pass

    def cycle():
        n = Node()
        n.me = n
        return n, weakref.ref(n)

    gc.unfreeze()
    old, old_ref = cycle()  # exists before the stream
    with s.gc_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        young, young_ref = cycle()  # made during the stream: in the collector's generations, not frozen
        assert any(o is young for g in (0, 1, 2) for o in gc.get_objects(generation=g))
        del old, young
        gc.collect()
        assert young_ref() is None  # the stream's own garbage is still collected
        assert old_ref() is not None  # the older object waits
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # and is collected once the stream ends
    with pytest.raises(RuntimeError), s.gc_frozen():
        raise RuntimeError("a failing stream")
    assert gc.get_freeze_count() == 0  # given back on the way out of an error too
    keep = [Node() for _ in range(3)]
    gc.freeze()  # the host froze its objects itself: left as they are
    try:
        with s.gc_frozen():
            pass
        assert gc.get_freeze_count() > 0  # still frozen: not given back on the host's behalf
    finally:
        gc.unfreeze()
    del keep


def test_large_mapped_buffers_ask_for_huge_pages(monkeypatch):
    """One fault per 2 MB instead of per 4 KB: with 4 KB pages the VM's bake spent 1.2 M page faults
    zeroing the pool's fresh output buffers."""
    import lib_lorakit.streaming as s

    if not hasattr(s.mmap, "MADV_HUGEPAGE"):
        pytest.skip("no huge pages on this platform")
    advised = []

    class Recorded(s.mmap.mmap):
        def madvise(self, option, *a):
            advised.append((len(self), option))
            return super().madvise(option, *a)

    monkeypatch.setattr(s.mmap, "mmap", Recorded)
    big = s._new_buffer(s.HUGE_BYTES * 2)
    s._new_buffer(s.MAP_BYTES)  # mapped, too small for a huge page
    assert advised == [(s.HUGE_BYTES * 2, s.mmap.MADV_HUGEPAGE)]
    big[:] = 3
    assert int(big[-1]) == 3


def test_all_finite_finds_every_nan_and_inf():
    from lib_lorakit.streaming import all_finite, nonfinite_count

    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (1, 31, 4099):
            assert all_finite(torch.randn(n).to(dt))
            for pos in (0, n // 2, n - 1):
                for bad in (float("nan"), float("inf"), float("-inf")):
                    t = torch.randn(n).to(dt)
                    t[pos] = bad
                    assert not all_finite(t.reshape(1, -1)), (dt, n, pos, bad)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    f8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2)  # no min/max kernel: the slow path
    assert not all_finite(f8) and all_finite(torch.ones(3).to(torch.float8_e4m3fn))
    t = torch.tensor([1.0, float("nan"), float("inf"), 2.0, float("-inf")])
    assert nonfinite_count(t) == 3 and nonfinite_count(t.half()) == 3 and nonfinite_count(f8) == 1
    assert nonfinite_count(torch.ones(4)) == 0


def test_kernel_window_reads_the_disks_queue(tmp_path, monkeypatch):
    """One WILLNEED request makes Linux read at most max(read_ahead_kb, max_sectors_kb); a partition's
    queue is its disk's; an unknown device gets the kernel's default 128 KB."""
    import lib_lorakit.streaming as s

    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * 10)
    dev = os.stat(f).st_dev
    node = tmp_path / "sys" / f"{os.major(dev)}:{os.minor(dev)}"
    node.mkdir(parents=True)
    monkeypatch.setattr(s, "SYS_DEV_BLOCK", str(tmp_path / "sys"))
    fd = os.open(f, os.O_RDONLY)
    try:
        assert s.kernel_window(fd) == 128 << 10  # no queue anywhere
        (tmp_path / "sys" / "queue").mkdir()  # the disk above a partition
        (tmp_path / "sys" / "queue" / "read_ahead_kb").write_text("8192\n")
        (tmp_path / "sys" / "queue" / "max_sectors_kb").write_text("1280\n")
        assert s.kernel_window(fd) == 8 << 20
        (node / "queue").mkdir()  # the device's own queue comes first
        (node / "queue" / "read_ahead_kb").write_text("128\n")
        (node / "queue" / "max_sectors_kb").write_text("512\n")
        assert s.kernel_window(fd) == 512 << 10
        (node / "queue" / "max_sectors_kb").write_text("1048576\n")
        assert s.kernel_window(fd) == 64 << 20  # capped
    finally:
        os.close(fd)


def test_read_ahead_asks_for_every_window_of_the_file(tmp_path, monkeypatch):
    """A request larger than the kernel's window is read only up to it: whole files and the lead are
    asked for window by window, so every byte is read ahead."""
    import lib_lorakit.streaming as s

    calls = []
    monkeypatch.setattr(s.os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n)), raising=False)
    monkeypatch.setattr(s.os, "POSIX_FADV_WILLNEED", 3, raising=False)
    monkeypatch.setattr(s, "kernel_window", lambda fd: 300)
    p = tmp_path / "f.bin"
    p.write_bytes(b"\0" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        s.ReadAhead.whole(fd)
        assert calls == [(0, 300), (300, 300), (600, 300), (900, 100)]
        calls.clear()
        s.ReadAhead(fd, lead=500).advance(0)
        assert calls == [(0, 300), (300, 300)]
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("weighted", {}),
        ("add-difference", {}),
        ("ties", {"density": 0.5}),
        ("dare", {"drop": 0.3, "seed": 4}),
        ("slerp", {}),
    ],
)
def test_merge_output_does_not_depend_on_the_thread_count(tmp_path, monkeypatch, method, extra):
    import lib_lorakit.merge.engine as eng

    monkeypatch.setattr(eng, "CHUNK_ELEMS", 64)  # many chunks per tensor, spread over the threads
    paths = [tiny_checkpoint(tmp_path, "sd15", name=f"m{i}.safetensors", seed=i) for i in range(3)]
    models = [ModelSpec(paths[0], 0.6), ModelSpec(paths[1], 0.4)]
    base = paths[2] if method in ("add-difference", "ties", "dare") else None
    digests = []
    for n in (1, 7):  # 7 maths threads, and chunks read by 3 threads (what 8+ cores get)
        monkeypatch.setattr(eng, "reader_count", lambda n=n: 1 if n == 1 else 3)
        out = str(tmp_path / f"{method}{n}.safetensors")
        r = merge(models, out, method=method, base=base, device="cpu", workers=n, **extra)
        digests.append(sha(out))
    assert digests[0] == digests[1]
    assert r["engine"]["workers"] == 7
    assert sum(t.startswith("lorakit-read") for t in r["engine"]["threads"]) >= 2


def test_worker_count_leaves_cores(monkeypatch):
    import lib_lorakit.streaming as s

    monkeypatch.setattr(s, "usable_cores", lambda: 16)
    assert worker_count(0) == 15 and worker_count(1) == 14
    monkeypatch.setenv(s.ENV_RESERVE, "1")
    assert worker_count() == 14
    monkeypatch.setattr(s, "usable_cores", lambda: 1)
    assert worker_count() == 1


def test_engines_default_to_two_maths_threads_sharing_the_cores(monkeypatch):
    """Few Python threads, each with its share of the cores for torch (measured faster than one thread a
    core, and on 2 cores than one thread with both: bench/README.md)."""
    import torch

    import lib_lorakit.streaming as s

    before = torch.get_num_threads()
    monkeypatch.setattr(s, "usable_cores", lambda: 16)
    assert s.engine_workers(0) == 2 and s.engine_workers(1) == 2
    with s.engine_threads(2):
        assert torch.get_num_threads() == 8
    monkeypatch.setattr(s, "usable_cores", lambda: 2)
    assert s.engine_workers(0) == 2 and s.engine_workers(1) == 1  # inside the WebUI one core is its server's
    with s.engine_threads(2):
        assert torch.get_num_threads() == 1
    with s.engine_threads(1):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_engine_threads_leave_cores_to_the_hashers_and_the_host(monkeypatch):
    """An input being hashed keeps a core busy for the whole stream, and inside the WebUI one core is its
    server's: torch gets what is left, at least one thread per maths thread."""
    import torch

    import lib_lorakit.streaming as s

    before = torch.get_num_threads()
    monkeypatch.delenv("LORAKIT_TORCH_THREADS", raising=False)
    monkeypatch.setattr(s, "usable_cores", lambda: 16)
    for workers, hashers, reserve, each in [
        (4, 3, 0, 3),  # a merge of three unhashed checkpoints
        (2, 1, 0, 7),  # a bake of an unhashed base
        (2, 0, 0, 8),
        (2, 1, 1, 7),  # the same inside the WebUI
        (2, 0, 1, 7),
    ]:
        with s.engine_threads(workers, hashers=hashers, reserve=reserve):
            assert torch.get_num_threads() == each, (workers, hashers, reserve)
    monkeypatch.setattr(s, "usable_cores", lambda: 2)
    with s.engine_threads(2, hashers=1):
        assert torch.get_num_threads() == 1
    with s.engine_threads(1, hashers=1, reserve=1):  # never fewer than one
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("engine", ["bake", "merge"])
def test_engines_hand_their_reserve_and_hashers_to_the_thread_split(tmp_path, monkeypatch, engine):
    """Inside the WebUI the jobs leave a core to its server (``reserve_cores``), and each input being
    hashed gets a core: the engines pass both on, and torch runs on what is left."""
    import contextlib

    import torch

    import lib_lorakit.bake.engine as beng
    import lib_lorakit.merge.engine as meng
    import lib_lorakit.streaming as s

    monkeypatch.delenv("LORAKIT_TORCH_THREADS", raising=False)
    monkeypatch.setattr(s, "usable_cores", lambda: 8)
    seen = []
    real = s.engine_threads

    @contextlib.contextmanager
    def spy(workers=1, hashers=0, reserve=0):
        with real(workers, hashers=hashers, reserve=reserve):
            seen.append((workers, hashers, reserve, torch.get_num_threads()))
            yield

    mod = beng if engine == "bake" else meng
    monkeypatch.setattr(mod, "engine_threads", spy)
    base_p, specs = recipe(tmp_path)
    if engine == "bake":
        bake(base_p, specs, str(tmp_path / "o.safetensors"), device="cpu", reserve_cores=1, hash_cache=None)
        assert seen == [(2, 1, 1, 3)]  # 8 cores - 1 for the host - 1 for the base's hasher, over 2 threads
    else:
        other = tiny_checkpoint(tmp_path, "sdxl", seed=6, name="other.safetensors")
        models = [ModelSpec(base_p, 0.5), ModelSpec(other, 0.5)]
        merge(models, str(tmp_path / "m.safetensors"), device="cpu", reserve_cores=1, hash_cache=None)
        workers = seen[0][0]
        assert seen == [(workers, 2, 1, max(1, (8 - 1 - 2) // workers))]


def test_bake_chunk_holds_one_mb_per_torch_thread_and_at_least_two(monkeypatch):
    """On many cores each maths thread's chunk grows with its torch threads (fewer, larger operations
    shared out over them); with one torch thread it is 2 MB (fewer calls for the same work)."""
    import lib_lorakit.bake.engine as eng
    import lib_lorakit.streaming as s

    monkeypatch.setattr(s, "usable_cores", lambda: 16)
    with s.engine_threads(2):
        assert eng._Baker(None, "F16", s.Pool(), eng._Stats()).chunk == 8 * s.CHUNK_ELEMS
    monkeypatch.setattr(s, "usable_cores", lambda: 4)
    with s.engine_threads(2):
        assert eng._Baker(None, "F16", s.Pool(), eng._Stats()).chunk == 2 * s.CHUNK_ELEMS == s.MIN_CHUNK_ELEMS
    monkeypatch.setattr(s, "usable_cores", lambda: 2)
    with s.engine_threads(2):
        assert eng._Baker(None, "F16", s.Pool(), eng._Stats()).chunk == s.MIN_CHUNK_ELEMS


def test_early_read_ahead_skips_missing_files_and_closes_what_it_opens(tmp_path):
    import threading

    import lib_lorakit.streaming as s

    real = tmp_path / "a.bin"
    real.write_bytes(b"x" * 100_000)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    s.read_ahead_early([(str(tmp_path / "missing.safetensors"), 0), (str(real), 4096), (str(real), 0)])
    for t in threading.enumerate():
        if t.name == "lorakit-readahead":
            t.join(10)
    assert not any(t.name == "lorakit-readahead" for t in threading.enumerate())
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_cancel_with_many_threads_leaves_no_file(tmp_path):
    import threading

    from lib_lorakit.errors import Cancelled

    base_p, specs = recipe(tmp_path)
    ev = threading.Event()

    def progress(frac, msg):
        if "baking" in msg:
            ev.set()

    import lib_lorakit.bake.engine as bk

    ticks = iter(range(10**9))
    old = bk.time.perf_counter
    bk.time.perf_counter = lambda: next(ticks)  # every tensor reports progress
    try:
        with pytest.raises(Cancelled):
            bake(base_p, specs, str(tmp_path / "o.safetensors"), workers=4, progress=progress, cancel=ev)
    finally:
        bk.time.perf_counter = old
    assert files_in(tmp_path) == sorted(["sdxl-base.safetensors"] + [os.path.basename(s.path) for s in specs])


# --- devices --------------------------------------------------------------------------------------


def test_unknown_device_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    base_p, specs = recipe(tmp_path)
    with pytest.raises(RecipeError, match="sees no CUDA GPU"):
        bake(base_p, specs, str(tmp_path / "o.safetensors"), device="cuda")
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_bake_agrees_with_cpu_within_one_fp16_step(tmp_path):
    base_p, specs = recipe(tmp_path)
    cpu = bake(base_p, specs, str(tmp_path / "cpu.safetensors"), device="cpu")
    gpu = bake(base_p, specs, str(tmp_path / "gpu.safetensors"), device="cuda")
    assert gpu["engine"]["device"].startswith("cuda") and cpu["engine"]["device"] == "cpu"
    a = safetensors.torch.load_file(str(tmp_path / "cpu.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "gpu.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        if a[k].dtype == torch.float16:
            assert fp16_ulps(a[k], b[k]) <= 1.0, k
        else:
            assert torch.equal(a[k], b[k]), k
    assert gpu["tensors"] == cpu["tensors"]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "method,extra",
    [("weighted", {}), ("add-difference", {}), ("ties", {"density": 0.5}), ("dare", {"drop": 0.3}), ("slerp", {})],
)
def test_cuda_merge_agrees_with_cpu_within_one_fp16_step(tmp_path, method, extra):
    paths = [tiny_checkpoint(tmp_path, "sdxl", name=f"m{i}.safetensors", seed=i) for i in range(3)]
    models = [ModelSpec(paths[0], 0.6), ModelSpec(paths[1], 0.4)]
    base = paths[2] if method in ("add-difference", "ties", "dare") else None
    for dev in ("cpu", "cuda"):
        merge(models, str(tmp_path / f"{dev}.safetensors"), method=method, base=base, device=dev, **extra)
    a = safetensors.torch.load_file(str(tmp_path / "cpu.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "cuda.safetensors"))
    for k in a:
        if a[k].dtype == torch.float16:
            assert fp16_ulps(a[k], b[k]) <= 1.0, k
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_merge_reports_the_exact_rounding_loss(tmp_path):
    """The GPU path measures the rounding loss only where it could be the largest, like the CPU paths."""
    from helpers import worst_fp16_rounding

    paths = [tiny_checkpoint(tmp_path, "sdxl", name=f"m{i}.safetensors", seed=i) for i in range(2)]
    rep = merge(
        [ModelSpec(paths[0], 0.3), ModelSpec(paths[1], 0.9)],
        str(tmp_path / "o.safetensors"),
        normalize=False,
        device="cuda",
    )
    s = [safetensors.torch.load_file(p) for p in paths]
    exact = {
        k: 0.3 * s[0][k].double() + 0.9 * s[1][k].double()
        for k in s[0]
        if s[0][k].is_floating_point() and not k.startswith("first_stage_model.")
    }
    worst, worst_key = worst_fp16_rounding(exact)
    assert rep["rounding"]["max_abs_rounding_loss"] == pytest.approx(worst, rel=1e-3), worst_key
    assert rep["rounding"]["key"] == worst_key


def test_cli_engine_flags_and_cached_hash(tmp_path, capsys):
    from lib_lorakit.cli import main

    base_p = tiny_checkpoint(tmp_path, "sd15")
    lora = write(tmp_path, "a.safetensors", make_lora("sd15", "lora", conv=False))
    reports = []
    for i in range(2):
        args = [
            "bake",
            base_p,
            "--lora",
            f"{lora}:0.5",
            "-o",
            str(tmp_path / f"o{i}.safetensors"),
            "-q",
            "--json",
            "--device",
            "cpu",
            "--workers",
            "2",
            "--hash-cache",
            str(tmp_path / "data"),
        ]
        assert main(args) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert [r["base"]["sha256_source"] for r in reports] == ["computed", "cache"]
    assert reports[1]["engine"]["workers"] == 2 and reports[1]["engine"]["device"] == "cpu"
    with pytest.raises(SystemExit) as e:
        main(["bake", base_p, "--lora", lora, "-o", str(tmp_path / "x.safetensors"), "--device", "tpu"])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_max_rounding_error_bounds_every_rounding_and_is_reached(dtype):
    """The bound the engines prune with: never below a real rounding error, and reached (within a factor
    of 2) by values spread over the top binade; subnormals share the smallest step."""
    from lib_lorakit.streaming import max_rounding_error

    g = torch.Generator().manual_seed(0)
    for amax in (3e-8, 1e-5, 0.01, 0.3, 1.0, 1.999, 7.0, 300.0, 60000.0):
        x = ((torch.rand(200_000, generator=g, dtype=torch.float64) * 2 - 1) * amax).float()
        x[0] = amax
        worst = float((x.to(dtype).double() - x.double()).abs().max())
        bound = max_rounding_error(float(x.abs().max()), dtype)
        assert worst <= bound, (amax, worst, bound)
        assert worst >= bound / 2 or amax == 1.0, (amax, worst, bound)  # 1.0 opens its binade: nothing above it
    assert max_rounding_error(1.0, torch.float32) == 0.0 and max_rounding_error(0.0, torch.float16) == 0.0
    assert max_rounding_error(float("nan"), torch.float16) == 0.0


def test_read_ahead_keeps_the_kernel_reading_just_ahead_of_the_engine(tmp_path, monkeypatch):
    """ReadAhead asks for the file in order, never more than ``lead`` past the engine, all of it by the end;
    a platform that refuses fadvise turns it off instead of failing the bake."""
    import lib_lorakit.streaming as S

    calls = []
    monkeypatch.setattr(S.os, "posix_fadvise", lambda fd, off, n, adv: calls.append((off, n, adv)), raising=False)
    monkeypatch.setattr(S.os, "POSIX_FADV_WILLNEED", 3, raising=False)
    p = tmp_path / "f.bin"
    p.write_bytes(b"\0" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        ra = S.ReadAhead(fd, lead=300)
        ra.STEP = 128
        ra.advance(0)
        assert calls[0] == (0, 128, 3) and sum(n for _, n, _ in calls) <= 300 + 128
        ra.advance(500)
        assert max(o + n for o, n, _ in calls) <= 800 + 128
        ra.advance(990)
        assert [o for o, _, _ in calls] == list(range(0, 1000, 128)) and max(o + n for o, n, _ in calls) == 1000

        def refuse(*a):
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(S.os, "posix_fadvise", refuse)
        ra2 = S.ReadAhead(fd)
        ra2.advance(0)
        assert ra2.fd is None
        S.ReadAhead.whole(fd)  # swallows the refusal too
    finally:
        os.close(fd)
