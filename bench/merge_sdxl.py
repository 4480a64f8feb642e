"""Benchmark: a 0.7/0.2/0.1 weighted merge of three full-size SDXL checkpoints.

Builds (once, reused with --keep) three random fp16 SDXL checkpoints with the exact real
layout (6.94 GB each) and measures in the same run, each in its own process:

- io-floor: sequential read of the three inputs + an fsynced write of an equal-size
  output (and io-floor-direct: the same write with O_DIRECT, for reference);
- naive: load everything, merge, save (skipped when the inputs do not fit in memory,
  with the reason printed);
- lorakit: ``python -m lib_lorakit merge``.

Targets for lorakit: ratio to the io floor <= 1.25, peak RSS <= 1 GB.

    python bench/merge_sdxl.py [--dir bench/_work] [--keep] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bake_sdxl import (  # noqa: E402
    CHILD_PRELUDE,
    COLD,
    IO_FLOOR_DIRECT,
    add_lorakit_args,
    cold_line,
    compare,
    empty_cache,
    fp16_steps,
    lorakit_variants,
    print_in_process,
    print_profile,
    remove_on_exit,
    run_child,
    settle,
)

WEIGHTS = (0.7, 0.2, 0.1)

# sequential read of every input; an equal-size output written (buffered) and fsynced
IO_FLOOR = (
    CHILD_PRELUDE
    + r"""
import os
inputs, out = sys.argv[1:-1], sys.argv[-1]
buf = bytearray(16 << 20)
mv = memoryview(buf)
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with open(inputs[0], 'rb', buffering=0) as f:  # the output is as large as one input: write while reading it
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

NAIVE = (
    CHILD_PRELUDE
    + r"""
# What a one-off script does: load every model (or, where they do not fit in memory, read them
# key by key through safe_open), build the whole merged state dict in memory, save it.
import os, torch, safetensors.torch as st
from safetensors import safe_open
mode, out, *args = sys.argv[1:]
pairs = [(a.rsplit(':', 1)[0], float(a.rsplit(':', 1)[1])) for a in args]
if mode == 'load':
    sds = [st.load_file(p) for p, _ in pairs]
    get = lambda i, k: sds[i][k]
    keys = list(sds[0])
else:
    fs = [safe_open(p, 'pt') for p, _ in pairs]
    get = lambda i, k: fs[i].get_tensor(k)
    keys = list(fs[0].keys())
res = {}
for k in keys:
    t0 = get(0, k)
    if not t0.is_floating_point() or k.startswith('first_stage_model.'):
        res[k] = t0
        continue
    acc = sum(get(i, k).float() * w for i, (_, w) in enumerate(pairs))
    res[k] = acc.to(t0.dtype)
st.save_file(res, out)
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""
)


def build(work: str, keep: bool) -> list[str]:
    import torch

    from lib_lorakit.synth import write_checkpoint

    os.makedirs(work, exist_ok=True)
    paths = [os.path.join(work, "sdxl-base-full.safetensors")] + [
        os.path.join(work, f"sdxl-ingredient-{i}.safetensors") for i in (1, 2)
    ]
    for i, p in enumerate(paths):
        if not (keep and os.path.exists(p)):
            write_checkpoint(p, "sdxl", tiny=False, dtype=torch.float16, seed=i, overwrite=True)
            print(f"built {p}", flush=True)
    return paths


def available_ram_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(HERE, "_work"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive merge (loads everything)")
    add_lorakit_args(ap)
    args = ap.parse_args()
    work = os.path.abspath(args.dir)
    py = sys.executable
    subprocess.run([py, __file__, "--dir", work, "--build"] + (["--keep"] if args.keep else []), check=True)
    inputs = build(work, keep=True)
    out = os.path.join(work, "merged.safetensors")
    remove_on_exit(out)

    def clean():
        for p in (out, out + ".json"):
            if os.path.exists(p):
                os.unlink(p)

    models = sum((["--model", f"{p}:{w}"] for p, w in zip(inputs, WEIGHTS)), [])
    lorakit = [
        py,
        "-c",
        CHILD_PRELUDE + "import runpy, sys; sys.argv[0]='lib_lorakit'; "
        "runpy.run_module('lib_lorakit', run_name='__main__')",
        "merge",
        *models,
        "-o",
        out,
        "-q",
        "--report",
        out + ".json",
    ]
    cache_dir = os.path.join(work, "hash-cache")
    variants = lorakit_variants(args, cache_dir)
    runs = [
        ("io-floor", [py, "-c", IO_FLOOR, *inputs, out], None),
        ("io-floor-direct", [py, "-c", IO_FLOOR_DIRECT, *inputs, out], None),
    ]
    runs += [(name, prefix + lorakit + extra, fresh) for name, prefix, extra, fresh in variants]
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in runs}
    reports: dict[str, dict] = {}
    clean()
    for i in range(args.repeat):
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
    results = {
        n: {
            "wall_s": statistics.median(sorted(w for w, _ in v)),
            "samples_s": sorted(w for w, _ in v),
            "peak_rss_mb": max(r for _, r in v),
        }
        for n, v in samples.items()
    }
    for name, r in reports.items():
        results[name]["engine"] = r.get("engine")
        results[name]["sha256_sources"] = [i.get("sha256_source") for i in r["inputs"]]
    if os.path.exists(out + ".lorakit-cuda"):
        steps, key = fp16_steps(out + ".lorakit", out + ".lorakit-cuda")
        results["lorakit-cuda"].update(max_fp16_steps_vs_cpu=steps, worst_key=key)
        os.unlink(out + ".lorakit-cuda")
    if not args.skip_naive:
        need = sum(os.path.getsize(p) for p in inputs) * 1.2 / 1e9
        have = available_ram_gb()
        mode = "load" if need < have else "lazy"
        settle()
        wall, rss, _ = run_child([py, "-c", NAIVE, mode, out, *[f"{p}:{w}" for p, w in zip(inputs, WEIGHTS)]])
        results["naive"] = {
            "wall_s": wall,
            "peak_rss_mb": rss,
            "max_abs_diff_vs_lorakit": compare(out, out + ".lorakit"),
            "mode": mode
            if mode == "load"
            else f"lazy reads (loading all needs ~{need:.0f} GB, {have:.0f} GB available); whole output in memory",
        }
        clean()
    os.unlink(out + ".lorakit")
    floor = results["io-floor-direct"]["wall_s"]
    size = sum(os.path.getsize(p) for p in inputs) / 1e9
    print(
        f"\n3 SDXL fp16 checkpoints, {size:.2f} GB in, 0.7/0.2/0.1 weighted sum; {os.cpu_count()} CPUs; "
        f"median of {args.repeat}; load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'run':<17}{'wall s':>9}{'peak RSS MB':>13}{'x floor':>9}   samples")
    for name in ["io-floor-direct", "io-floor", "naive"] + [v[0] for v in variants]:
        if name not in results:
            continue
        r = results[name]
        extra = " ".join(f"{x:.1f}" for x in r.get("samples_s", [])) or r.get("mode", "")
        print(f"{name:<17}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['wall_s'] / floor:>9.2f}   {extra}")
    print(f"floor = io-floor-direct = {floor:.1f} s")
    print(cold_line())
    for name, *_ in variants:
        lk = results[name]
        ok = lk["wall_s"] / floor <= 1.25 and lk["peak_rss_mb"] <= 1024
        print(
            f"{name}: ratio {lk['wall_s'] / floor:.2f} (target <= 1.25), peak RSS {lk['peak_rss_mb']:.0f} MB "
            f"(target <= 1024): {'PASS' if ok else 'FAIL'}; hashes: {lk.get('sha256_sources')}"
        )
        print_in_process(name, lk, reports.get(name), floor, what="merge")
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
    if "lorakit" in reports:
        rep = reports["lorakit"]
        print(f"lorakit report: {rep['tensors']['merged']} merged, copied {rep['tensors']['copied']}")
    if "max_abs_diff_vs_lorakit" in results.get("naive", {}):
        print(f"naive vs lorakit: max abs difference {results['naive']['max_abs_diff_vs_lorakit']:.3g}")
    for name, r in reports.items():
        print_profile(name, r)
    results["page_cache"] = dict(COLD)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    if "--build" in sys.argv:
        i = sys.argv.index("--dir")
        build(os.path.abspath(sys.argv[i + 1]), keep="--keep" in sys.argv)
    else:
        main()
