"""Benchmark: extract a LoRA from a full-size SDXL fp16 tuned/base pair, and resize a big SDXL LoRA.

    python bench/extract_sdxl.py make DIR           # write DIR/base.safetensors, DIR/tuned.safetensors (~14 GB)
    python bench/extract_sdxl.py extract DIR [--rank 64 --conv-rank 64 --device cpu] [--check N]
    python bench/extract_sdxl.py make-lora DIR      # DIR/r128.safetensors: kohya SDXL LoRA, rank 128, conv too
    python bench/extract_sdxl.py resize DIR [--rank 32]

The tuned model is the base plus, on every layer kohya's LoRA covers, an update shaped like a
fine-tune's: a rank-192 part with singular values falling as i^-0.8 plus a flat noise floor
(15 % of the update's energy), 2 % of the weight's norm. Each command runs the operation in a child
process and prints its wall time and the child's peak RSS (``ru_maxrss``). ``--check N`` compares N
layers (spread over the model, every shape class) with an exact float64 SVD: the ratio of the
achieved error to the Eckart–Young optimum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib_lorakit.formats.arch import ARCHS  # noqa: E402
from lib_lorakit.formats.safetensors_io import TORCH_TO_CODE, OutEntry, SafetensorsFile, StreamingWriter, save_file  # noqa: E402
from lib_lorakit.synth import checkpoint_entries, iter_checkpoint, make_lora  # noqa: E402
from lib_lorakit.workshop.modules import kohya_modules  # noqa: E402


def _update(shape: tuple[int, ...], w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = shape[0]
    inn = math.prod(shape[1:])
    r = min(192, out, inn)
    u = torch.randn(out, r, generator=g)
    v = torch.randn(r, inn, generator=g)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.8
    low = (u * s) @ v
    low *= math.sqrt(0.85) / float(torch.linalg.vector_norm(low))
    noise = torch.randn(out, inn, generator=g)
    noise *= math.sqrt(0.15) / float(torch.linalg.vector_norm(noise))
    d = (low + noise) * (0.02 * float(torch.linalg.vector_norm(w.float())))
    return d.reshape(shape)


def make(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    entries = [OutEntry(k, TORCH_TO_CODE[dt], s) for k, s, dt in checkpoint_entries("sdxl", tiny=False)]
    shapes = {e.name: e.shape for e in entries}
    targets: dict[str, list] = {}
    for m in kohya_modules(shapes, ARCHS["sdxl"], conv=True):
        targets.setdefault(m.key, []).append(m)
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    base_w = StreamingWriter(os.path.join(folder, "base.safetensors"), entries, {"bench": "base"})
    tuned_w = StreamingWriter(os.path.join(folder, "tuned.safetensors"), entries, {"bench": "tuned"})
    with base_w, tuned_w:
        for key, t in iter_checkpoint("sdxl", tiny=False):
            base_w.write(key, t)
            if key in targets:
                w = t.float()
                for m in targets[key]:
                    rows = slice(*m.rows) if m.rows else slice(None)
                    w[rows] += _update(m.shape, w[rows], g)
                t = w.to(t.dtype)
            tuned_w.write(key, t)
        base_w.commit()
        tuned_w.commit()
    print(f"wrote {folder}/base.safetensors and tuned.safetensors in {time.time() - t0:.0f} s")


def _child(code: str) -> tuple[dict, float, float]:
    """Run ``code`` (prints a JSON report last) in a child; return (report, wall s, child peak RSS MB)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    if p.returncode:
        sys.exit(p.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return json.loads(p.stdout.strip().splitlines()[-1]), wall, rss


def extract_cmd(folder: str, rank: int, conv_rank: int, device: str, check: int, method: str) -> None:
    out = os.path.join(folder, f"extract-r{rank}-{device}-{method}.safetensors")
    code = (
        f"import json; from lib_lorakit.workshop import extract; r = extract({folder + '/tuned.safetensors'!r}, "
        f"{folder + '/base.safetensors'!r}, {out!r}, rank={rank}, conv_rank={conv_rank}, device={device!r}, "
        f"method={method!r}, hash_inputs=False, overwrite=True); print(json.dumps(r))"
    )
    rep, wall, rss = _child(code)
    errs = [v["rel_err"] for v in rep["layers"].values()]
    print(
        f"lorakit extract rank {rank}/conv {conv_rank} on {device} ({method}): {len(errs)} modules, "
        f"{wall:.1f} s wall, peak RSS {rss:.0f} MB, methods {rep['methods']}, "
        f"rel err mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}"
    )
    prof = ", ".join(f"{k} {v:.1f}" for k, v in sorted(rep.get("profile", {}).items(), key=lambda x: -x[1]))
    print(f"  in the engine {rep['seconds']:.1f} s; seconds per stage (all threads): {prof}")
    json.dump(rep, open(out + ".report.json", "w"))
    if check:
        _check(folder, rep, out, check)


def _check(folder: str, rep: dict, out: str, n: int) -> None:
    """Exact float64 optimum on N layers, every shape class represented."""
    names = list(rep["layers"])
    by_shape: dict[tuple, list[str]] = {}
    with (
        SafetensorsFile(os.path.join(folder, "tuned.safetensors")) as t,
        SafetensorsFile(os.path.join(folder, "base.safetensors")) as b,
        SafetensorsFile(out) as lo,
    ):
        for name in names:
            lay = rep["layers"][name]
            shp = tuple(t.tensors[lay["key"]].shape)
            by_shape.setdefault(shp + (bool(lay["rows"]),), []).append(name)
        picked: list[str] = []
        while len(picked) < n and any(by_shape.values()):
            for v in by_shape.values():
                if v and len(picked) < n:
                    picked.append(v.pop(len(v) // 2))
        worst = 0.0
        for name in picked:
            lay = rep["layers"][name]
            d = t.read(lay["key"]).double() - b.read(lay["key"]).double()
            if lay["rows"]:
                d = d[lay["rows"][0] : lay["rows"][1]]
            m = d.reshape(d.shape[0], -1)
            s = torch.linalg.svdvals(m)
            k = lay["rank"]
            opt = float((s[k:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
            up = lo.read(name + ".lora_up.weight").double().reshape(m.shape[0], -1)
            down = lo.read(name + ".lora_down.weight").double().reshape(up.shape[1], -1)
            real = float(torch.linalg.norm(m - up @ down) / torch.linalg.norm(m))
            worst = max(worst, real / opt)
            print(f"  {name:70s} {list(m.shape)} rank {k}: error {real:.5f}, optimum {opt:.5f}, ratio {real / opt:.5f}")
        print(f"checked {len(picked)} layers against float64 SVD: worst error / optimum = {worst:.5f}")


def make_lora_cmd(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    sd = make_lora("sdxl", rank=128, alpha=64, tiny=False, conv=True, dtype=torch.float16, std=0.01)
    path = os.path.join(folder, "r128.safetensors")
    save_file(sd, path, {"ss_network_dim": "128", "ss_network_alpha": "64"}, overwrite=True)
    print(f"wrote {path}: {len({k.split('.')[0] for k in sd})} modules, {os.path.getsize(path) / 1e9:.2f} GB")


def resize_cmd(folder: str, rank: int) -> None:
    out = os.path.join(folder, f"r{rank}.safetensors")
    code = (
        f"import json; from lib_lorakit.workshop import resize; r = resize({folder + '/r128.safetensors'!r}, {out!r}, "
        f"rank={rank}, overwrite=True); print(json.dumps(r))"
    )
    rep, wall, rss = _child(code)
    print(
        f"lorakit resize rank 128 -> {rank}: {rep['modules']} modules, {wall:.1f} s wall, peak RSS {rss:.0f} MB, "
        f"max rel err {rep['max_rel_err']:.4f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("make", "extract", "make-lora", "resize"))
    p.add_argument("dir")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--conv-rank", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", default="auto", choices=("auto", "exact"))
    p.add_argument("--check", type=int, default=0)
    a = p.parse_args()
    if a.what == "make":
        make(a.dir)
    elif a.what == "extract":
        extract_cmd(a.dir, a.rank or 64, a.conv_rank, a.device, a.check, a.method)
    elif a.what == "make-lora":
        make_lora_cmd(a.dir)
    else:
        resize_cmd(a.dir, a.rank or 32)


if __name__ == "__main__":
    main()
