"""Benchmark: bake three rank-32 LoRAs into a full-size SDXL checkpoint.

Builds (once, reused with --keep) a random fp16 SDXL checkpoint with the exact real
layout (2515 tensors, 6.94 GB) and three kohya-format LoRAs at rank 32 (LoRA, LoCon
with conv layers, LoKr), then measures in the same run, each in its own process:

- io-floor-direct: sequential read of the inputs + an equal-size output written with
  O_DIRECT and fsynced (the reference: the disk's limit, as lorakit's writer uses O_DIRECT);
- io-floor: the same copy written through the page cache, fsynced (what ``cp`` + ``sync`` costs);
- compute-floor: the ΔW FLOPs ÷ this machine's fp32 GEMM throughput, measured now;
- naive: load everything, add each ΔW, save (what one-off scripts do);
- lorakit: ``python -m lib_lorakit bake`` on the CPU, its hash cache emptied first (the base is
  hashed alongside); lorakit-cached: the same bake again, the hash from the cache;
  lorakit-cuda: ``--device cuda`` (with ``--devices cpu,cuda``); lorakit-2cores: pinned to two
  cores with taskset (with ``--two-cores``), to show how the bake scales.

The floors and lorakit runs repeat --repeat times, interleaved; the medians count. Prints wall
time, peak RSS, each time's ratio to max(io-floor-direct, compute-floor), lorakit's time per
stage and, for CUDA, the largest CPU/GPU difference in fp16 steps. Targets for lorakit: ratio
<= 1.25, peak RSS <= 1 GB.

    python bench/bake_sdxl.py [--dir bench/_work] [--keep] [--devices cpu,cuda] [--two-cores]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

LORAS = [("lora", "lora", False), ("locon", "lora", True), ("lokr", "lokr", True)]  # name, algo, conv
STRENGTHS = {"lora": 0.7, "locon": 0.5, "lokr": 0.4}


def build_inputs(work: str, keep: bool) -> tuple[str, list[str]]:
    import torch

    from lib_lorakit.synth import make_lora, write_checkpoint, write_lora

    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "sdxl-base-full.safetensors")
    if not (keep and os.path.exists(base)):
        t = time.perf_counter()
        write_checkpoint(base, "sdxl", tiny=False, dtype=torch.float16, seed=0, overwrite=True)
        print(f"built {base} ({os.path.getsize(base) / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    paths = []
    for i, (name, algo, conv) in enumerate(LORAS):
        p = os.path.join(work, f"{name}-r32.safetensors")
        paths.append(p)
        if not (keep and os.path.exists(p)):
            sd = make_lora("sdxl", algo, rank=32, alpha=16, tiny=False, conv=conv, te=True, seed=100 + i, std=0.01)
            write_lora(
                p,
                sd,
                {
                    "ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
                    "ss_network_dim": "32",
                    "ss_network_alpha": "16",
                },
                overwrite=True,
            )
            print(f"built {p} ({os.path.getsize(p) / 1e6:.0f} MB)", flush=True)
    return base, paths


def remove_on_exit(out: str) -> None:
    """Whatever way the bench ends (a child that failed, Ctrl+C), remove the copies of lorakit's output
    it keeps for the comparisons (a full-size checkpoint each) and the output itself."""
    import atexit

    def remove() -> None:
        for p in (out, out + ".json", out + ".lorakit", out + ".lorakit-cuda"):
            if os.path.exists(p):
                os.unlink(p)

    atexit.register(remove)


def run_child(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Run a child process; return (wall s, peak RSS MB, stdout)."""
    t = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(args)}\n{err[-3000:]}")
    rss = float("nan")
    for line in err.splitlines():
        if line.startswith("PEAK_RSS_MB="):
            rss = float(line.split("=")[1])
    return wall, rss, out


# Each measured process reports its own peak RSS (VmHWM: ru_maxrss would include the parent's
# memory, which Linux carries across fork+exec).
CHILD_PRELUDE = r"""
import atexit, resource, sys
def _peak():
    try:
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
atexit.register(lambda: print(f'PEAK_RSS_MB={_peak():.1f}', file=sys.stderr))
"""

IO_FLOOR_DIRECT = (
    CHILD_PRELUDE
    + r"""
# The same copy written with O_DIRECT from an aligned buffer (what lorakit's writer does on Linux).
import mmap, os
inputs, out = sys.argv[1:-1], sys.argv[-1]
B = 16 << 20
buf = mmap.mmap(-1, B)
mv = memoryview(buf)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
with open(inputs[0], 'rb', buffering=0) as f:
    while True:
        n = f.readinto(mv)
        if n < B:
            break
        os.write(fd, mv)
os.close(fd)
fd = os.open(out, os.O_WRONLY)
os.lseek(fd, 0, os.SEEK_END)
os.write(fd, mv[:n])
for p in inputs[1:]:
    with open(p, 'rb', buffering=0) as f:
        while f.readinto(mv):
            pass
os.fsync(fd)
os.close(fd)
"""
)

IO_FLOOR = (
    CHILD_PRELUDE
    + r"""
import os
inputs, out = sys.argv[1:-1], sys.argv[-1]
buf = bytearray(16 << 20)
mv = memoryview(buf)
size = os.path.getsize(inputs[0])
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with open(inputs[0], 'rb', buffering=0) as f:  # copy the checkpoint: read and write an equal size
    while n := f.readinto(buf):
        os.write(fd, mv[:n])
for p in inputs[1:]:
    with open(p, 'rb', buffering=0) as f:
        while f.readinto(buf):
            pass
os.fsync(fd)
os.close(fd)
"""
)

GEMM = (
    CHILD_PRELUDE
    + r"""
import time, torch
best = 0.0
for n in (2048, 4096):
    a = torch.randn(n, n); b = torch.randn(n, n); c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    reps = 4 if n == 4096 else 16
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
print(best)
"""
)

NAIVE = (
    CHILD_PRELUDE
    + r"""
# What a one-off script does: load everything, compute each dW, add, save.
import os, torch, safetensors.torch as st
sys.path.insert(0, os.getcwd())
from lib_lorakit.formats.arch import SDXL
from lib_lorakit.networks import compute_delta, identify
from lib_lorakit.networks.resolve import TargetIndex, candidates, parse_keys
base, out = sys.argv[1], sys.argv[2]
loras = [(p, float(s)) for p, s in (a.rsplit(':', 1) for a in sys.argv[3:])]
sd = st.load_file(base)
index = TargetIndex({k: tuple(v.shape) for k, v in sd.items()}, SDXL)
for path, strength in loras:
    lsd = st.load_file(path)
    parsed = parse_keys(lsd)
    for module, params in parsed.modules.items():
        alg, _ = identify(frozenset(params))
        t, _ = index.lookup(candidates(module, SDXL))
        p = {k: lsd[v].float() for k, v in params.items()}
        w = sd[t.weight_key]
        r0, r1 = t.rows or (0, w.shape[0])
        d = compute_delta(alg, p, t.shape, None).to_dense(t.shape) * strength
        w32 = w.float()
        w32[r0:r1] += d
        sd[t.weight_key] = w32.to(w.dtype)
st.save_file(sd, out)
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
)


def delta_flops(paths: list[str]) -> float:
    from lib_lorakit.formats.safetensors_io import read_header

    total = 0.0
    for p in paths:
        tensors, _ = read_header(p)
        for k, info in tensors.items():
            if k.endswith("lora_down.weight"):
                up = tensors[k.replace("lora_down", "lora_up")]
                r = info.shape[0]
                total += 2.0 * up.shape[0] * math.prod(info.shape[1:]) * r
            elif k.endswith(".lokr_w1"):
                m = k[: -len(".lokr_w1")]
                w1 = info.shape
                if m + ".lokr_w2" in tensors:
                    w2 = tensors[m + ".lokr_w2"].shape
                    total += math.prod(w1) * math.prod(w2)  # kron: one multiply per output value
                else:
                    a, b = tensors[m + ".lokr_w2_a"].shape, tensors[m + ".lokr_w2_b"].shape
                    w2n = a[0] * math.prod(b[1:])
                    total += 2.0 * w2n * a[1] + math.prod(w1) * w2n
    return total


def lorakit_variants(args, cache_dir: str) -> list[tuple[str, list[str], list[str], bool]]:
    """(name, command prefix, extra lorakit args, empty the hash cache first) per lorakit run."""
    cache = ["--hash-cache", cache_dir]
    out = [
        ("lorakit", [], ["--device", "cpu", *cache], True),
        ("lorakit-cached", [], ["--device", "cpu", *cache], False),
    ]
    if args.two_cores:
        out.append(("lorakit-2cores", ["taskset", "-c", "0,1"], ["--device", "cpu", *cache], True))
        out.append(("lorakit-2cores-cached", ["taskset", "-c", "0,1"], ["--device", "cpu", *cache], False))
    for w in (args.workers or "").split(","):  # "8" or "8x1": 8 maths threads (of 1 torch thread each)
        if w.strip():
            n, _, each = w.strip().partition("x")
            env = ["env", f"LORAKIT_TORCH_THREADS={int(each)}"] if each else []
            out.append((f"lorakit-w{w.strip()}", env, ["--device", "cpu", *cache, "--workers", str(int(n))], False))
    for r in (args.readers or "").split(","):  # LORAKIT_READERS: prefetch threads (default 3 on 8+ cores)
        if r.strip():
            env = ["env", f"LORAKIT_READERS={int(r)}"]
            out.append((f"lorakit-r{int(r)}", env, ["--device", "cpu", *cache], False))
    for dev in args.devices.split(","):
        if dev.strip() and dev.strip() != "cpu":
            out.append((f"lorakit-{dev.strip()}", [], ["--device", dev.strip(), *cache], True))
    return out


def add_lorakit_args(ap) -> None:
    ap.add_argument("--devices", default="cpu", help="comma-separated lorakit devices to run: cpu,cuda")
    ap.add_argument("--two-cores", action="store_true", help="also run lorakit pinned to two cores (taskset)")
    ap.add_argument("--readers", help="also run lorakit (hash cached) with these reader-thread counts, e.g. 1,2")
    ap.add_argument(
        "--workers",
        help="also run lorakit (hash cached) with these maths-thread counts, e.g. 2,4,8 or 8x1 (1 torch thread each)",
    )


def empty_cache(cache_dir: str) -> None:
    p = os.path.join(cache_dir, "hashes.json")
    if os.path.exists(p):
        os.unlink(p)


def fp16_steps(a: str, b: str) -> tuple[float, str]:
    """The largest difference between two checkpoints in fp16 steps at the values' magnitude, and its key."""
    import torch

    from lib_lorakit.formats.safetensors_io import SafetensorsFile

    worst, where = 0.0, ""
    with SafetensorsFile(a) as fa, SafetensorsFile(b) as fb:
        for k in fa.keys():
            x, y = fa.read(k), fb.read(k)
            if x.dtype == torch.float16 and x.numel():
                x32, y32 = x.float(), y.float()
                mag = torch.maximum(x32.abs(), y32.abs()).clamp_min(2.0**-14)
                d = float(((x32 - y32).abs() / torch.exp2(torch.floor(torch.log2(mag)) - 10)).max())
            else:
                d = 0.0 if torch.equal(x, y) else math.inf
            if d > worst:
                worst, where = d, k
    return worst, where


def print_profile(name: str, rep: dict) -> None:
    """Seconds per stage (summed over threads) and the busiest threads, from a lorakit report."""
    eng = rep.get("engine") or {}
    if not eng:
        return
    st = eng.get("stages", {})
    print(
        f"{name}: device {eng.get('device')}, {eng.get('workers')} maths threads, wall {rep['wall_s']:.1f} s; "
        "seconds per stage (all threads): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))
    )
    for t, d in sorted(eng.get("threads", {}).items()):
        if not t.startswith("lorakit-maths") or t.endswith("_0"):
            print(f"    {t}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])))


def print_in_process(name: str, lk: dict, rep: dict | None, floor: float, what: str = "bake") -> None:
    """The part of a command-line run a WebUI user does not wait for: the interpreter, the (cold) torch
    import and the exit. Inside the WebUI torch is loaded already; the rest is the engine's own time."""
    if not rep or "engine" not in rep:
        return
    torch_import = (rep["engine"].get("stages") or {}).get("prepare", 0.0)  # bake() loads torch lazily first
    inside = rep["wall_s"] - torch_import
    lk["in_process_s"] = inside
    print(
        f"    of the {lk['wall_s']:.1f} s: start-up and exit {lk['wall_s'] - inside:.1f} s (torch import "
        f"{torch_import:.1f} s, cold); the {what} with torch loaded (as in the WebUI) {inside:.1f} s = "
        f"{inside / floor:.2f} x floor"
    )


COLD = {"dropped": 0, "warm": 0}  # runs that started with the page cache dropped / not (not root)


def settle() -> None:
    """Let writeback (and discard of deleted outputs) finish, then drop the page cache (root only), so
    every measurement reads its inputs from the disk: a warm cache hides the reads and flatters ratios."""
    os.sync()
    time.sleep(3)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        COLD["dropped"] += 1
    except OSError:
        COLD["warm"] += 1
    time.sleep(2)


def cold_line() -> str:
    if COLD["warm"]:
        return f"page cache: NOT dropped before {COLD['warm']} run(s) (needs root): those runs read a warm cache"
    return f"page cache: dropped before every run ({COLD['dropped']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(HERE, "_work"))
    ap.add_argument("--keep", action="store_true", help="reuse inputs built by an earlier run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of io-floor and lorakit; the median counts")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive baseline (needs ~15 GB RAM)")
    ap.add_argument("--json", help="write the results here")
    add_lorakit_args(ap)
    args = ap.parse_args()
    work = os.path.abspath(args.dir)
    py = sys.executable
    if not (args.keep and os.path.exists(os.path.join(work, "sdxl-base-full.safetensors"))):
        # built in a child so this process stays small
        subprocess.run([py, __file__, "--dir", work, "--build-only"], check=True)
    base, loras = build_inputs(work, keep=True)
    results: dict[str, dict] = {}
    out = os.path.join(work, "out.safetensors")
    remove_on_exit(out)

    def clean() -> None:
        for p in (out, out + ".json"):
            if os.path.exists(p):
                os.unlink(p)

    recipe = [f"{p}:{STRENGTHS[n]}" for p, (n, _, _) in zip(loras, LORAS)]
    bake_cmd = [
        py,
        "-c",
        CHILD_PRELUDE + "import runpy, sys; sys.argv[0]='lib_lorakit'; "
        "runpy.run_module('lib_lorakit', run_name='__main__')",
        "bake",
        base,
        *sum((["--lora", r] for r in recipe), []),
        "-o",
        out,
        "-q",
        "--report",
        out + ".json",
    ]
    cache_dir = os.path.join(work, "hash-cache")
    variants = lorakit_variants(args, cache_dir)
    runs = [
        ("io-floor", [py, "-c", IO_FLOOR, base, *loras, out], None),
        ("io-floor-direct", [py, "-c", IO_FLOOR_DIRECT, base, *loras, out], None),
    ]
    runs += [(name, prefix + bake_cmd + extra, fresh) for name, prefix, extra, fresh in variants]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
    reports: dict[str, dict] = {}
    clean()
    for i in range(args.repeat):  # interleaved, so a slow spell of the disk hits all of them
        for name, cmd, fresh in runs:
            if fresh:
                empty_cache(cache_dir)
            settle()
            wall, rss, _ = run_child(cmd)
            samples[name].append((wall, rss))
            print(f"  {name} run {i + 1}: {wall:.1f} s, peak RSS {rss:.0f} MB", flush=True)
            if name.startswith("lorakit") and i == args.repeat - 1:
                with open(out + ".json") as f:
                    reports[name] = json.load(f)
                if name in ("lorakit", "lorakit-cuda"):
                    os.replace(out, out + "." + name)
            clean()
    for name, vals in samples.items():
        walls = sorted(w for w, _ in vals)
        results[name] = {"wall_s": statistics.median(walls), "samples_s": walls, "peak_rss_mb": max(r for _, r in vals)}
    rep = reports["lorakit"]
    results["lorakit"].update(modified=rep["tensors"]["modified"], matched=[lo["matched"] for lo in rep["loras"]])
    for name, r in reports.items():
        results[name]["engine"] = r.get("engine")
        results[name]["base_sha256_source"] = r["base"].get("sha256_source")
    if os.path.exists(out + ".lorakit-cuda"):
        steps, key = fp16_steps(out + ".lorakit", out + ".lorakit-cuda")
        results["lorakit-cuda"]["max_fp16_steps_vs_cpu"] = steps
        results["lorakit-cuda"]["worst_key"] = key
        os.unlink(out + ".lorakit-cuda")

    flops = delta_flops(loras)
    _, _, gemm_out = run_child([py, "-c", GEMM])
    gemm = float(gemm_out.strip().splitlines()[-1])
    results["compute-floor"] = {"wall_s": flops / gemm, "flops": flops, "gemm_flops_per_s": gemm}

    lorakit_out = out + ".lorakit"
    if not args.skip_naive:
        settle()
        wall, rss, _ = run_child([py, "-c", NAIVE, base, out, *recipe])
        results["naive"] = {"wall_s": wall, "peak_rss_mb": rss}
        results["naive"]["max_abs_diff_vs_lorakit"] = compare(out, lorakit_out)
        clean()
    os.unlink(lorakit_out)

    floor = max(results["io-floor-direct"]["wall_s"], results["compute-floor"]["wall_s"])
    size = os.path.getsize(base) / 1e9
    print(
        f"\nSDXL fp16 checkpoint {size:.2f} GB + 3 LoRAs rank 32 "
        f"({sum(os.path.getsize(p) for p in loras) / 1e6:.0f} MB); {os.cpu_count()} CPUs; median of {args.repeat}; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"compute floor: {flops / 1e9:.0f} GFLOP at {gemm / 1e9:.0f} GFLOP/s measured")
    print(f"{'run':<17}{'wall s':>9}{'peak RSS MB':>13}{'x floor':>9}   samples")
    names = ["io-floor-direct", "io-floor", "compute-floor", "naive"] + [v[0] for v in variants]
    for name in names:
        if name in results:
            r = results[name]
            rss = r.get("peak_rss_mb", float("nan"))
            extra = " ".join(f"{x:.1f}" for x in r.get("samples_s", []))
            print(f"{name:<17}{r['wall_s']:>9.1f}{rss:>13.0f}{r['wall_s'] / floor:>9.2f}   {extra}")
    print(f"floor = max(io-floor-direct, compute-floor) = {floor:.1f} s")
    print(cold_line())
    for name, *_ in variants:
        lk = results[name]
        ok = lk["wall_s"] / floor <= 1.25 and lk["peak_rss_mb"] <= 1024
        print(
            f"{name}: ratio {lk['wall_s'] / floor:.2f} (target <= 1.25), peak RSS {lk['peak_rss_mb']:.0f} MB "
            f"(target <= 1024): {'PASS' if ok else 'FAIL'}; base hash: {lk.get('base_sha256_source')}"
        )
        print_in_process(name, lk, reports.get(name), floor)
    if "lorakit-2cores" in results:
        print(
            f"scaling: 2 cores {results['lorakit-2cores']['wall_s']:.1f} s -> {os.cpu_count()} cores "
            f"{results['lorakit']['wall_s']:.1f} s: {results['lorakit-2cores']['wall_s'] / results['lorakit']['wall_s']:.2f}x"
        )
    if "max_fp16_steps_vs_cpu" in results.get("lorakit-cuda", {}):
        print(
            f"cuda vs cpu output: at most {results['lorakit-cuda']['max_fp16_steps_vs_cpu']:.3g} fp16 steps "
            f"apart (worst {results['lorakit-cuda']['worst_key']})"
        )
    for name, r in reports.items():
        print_profile(name, r)
    if "naive" in results:
        print(
            f"naive vs lorakit output: max abs difference {results['naive']['max_abs_diff_vs_lorakit']:.3g} "
            f"(the naive bake rounds to fp16 after each LoRA)"
        )
    results["page_cache"] = dict(COLD)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def compare(a: str, b: str) -> float:
    """Max abs difference between two checkpoints, read tensor by tensor."""
    import torch

    from lib_lorakit.formats.safetensors_io import SafetensorsFile

    worst = 0.0
    with SafetensorsFile(a) as fa, SafetensorsFile(b) as fb:
        for k in fa.keys():
            x, y = fa.read(k), fb.read(k)
            if x.is_floating_point():
                worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
            elif not torch.equal(x, y):
                worst = math.inf
    return worst


if __name__ == "__main__":
    if "--build-only" in sys.argv:
        i = sys.argv.index("--dir")
        build_inputs(os.path.abspath(sys.argv[i + 1]), keep=False)
    else:
        main()
