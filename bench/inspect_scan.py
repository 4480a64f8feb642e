"""Benchmark: `lib_lorakit inspect` over a folder of 500 LoRAs, cold and warm page cache.

Builds (once, reused with --keep) 500 LoRA files with the exact headers real trainers
write: full-size SD1.5 and SDXL module sets (kohya names; LoRA, LoCon, LoHa, LoKr; ranks
4-32; UNet-only or with text encoders), kohya metadata with tag frequencies of a few
hundred tags per file for most, LyCORIS network_args for some, no metadata for some.
The data areas are sparse (only the alpha scalars are written), so 500 files of real
size fit on a small disk; inspection reads headers, plus alphas where the metadata does
not state them.

Measured in the same run, each in its own process (interpreter start-up included):

- metadata-reader: what the WebUI and one-off scripts do — safetensors.safe_open, the
  metadata, ss_tag_frequency parsed and its top tags listed (no module matching);
- lorakit: ``python -m lib_lorakit inspect DIR --json`` (every module matched against the
  real layout, the trigger, the kind, the category), as the CLI runs by default (one process,
  reading threads, as inside the WebUI) and with ``--jobs 2`` (two worker processes).

The load average is printed at the start and the end: on a shared machine the figures move
with it.

"cold" drops the page cache first (root only; otherwise the run says so), "warm" repeats
with the files cached.

    python bench/inspect_scan.py [--dir bench/_work/loras500] [--keep] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bake_sdxl import CHILD_PRELUDE, run_child  # noqa: E402

N_FILES = 500
WORDS = (
    "hair eyes long short blue red green black white blonde brown smile open mouth looking viewer dress shirt "
    "skirt jacket standing sitting outdoors indoors sky cloud tree flower water city street night day light "
    "shadow portrait upper body full cowboy shot hat ribbon bow gloves boots thighhighs necklace earrings "
    "holding sword cup book phone chair bed window room building forest mountain beach ocean grass snow rain "
    "blush closed hand hands arms legs from above below side behind profile depth field blurry background"
).split()

METADATA_READER = (
    CHILD_PRELUDE
    + r"""
import json, os, sys
from safetensors import safe_open
root = sys.argv[1]
out = []
for dp, dn, fn in os.walk(root):
    dn.sort()
    for f in sorted(fn):
        if not f.endswith('.safetensors'):
            continue
        p = os.path.join(dp, f)
        with safe_open(p, 'np') as s:
            meta = s.metadata() or {}
            n = len(list(s.keys()))
        tags = {}
        try:
            for d in json.loads(meta.get('ss_tag_frequency', '{}')).values():
                for t, c in d.items():
                    tags[t] = tags.get(t, 0) + c
        except ValueError:
            pass
        out.append((f, n, sorted(tags, key=lambda t: -tags[t])[:10]))
print(len(out))
"""
)


CONFIGS = [
    (algo, rank, te, conv)
    for algo, rank, te, conv in (
        ("lora", 16, True, False),
        ("lora", 32, False, False),
        ("lora", 8, True, False),
        ("lora", 16, False, True),
        ("loha", 8, False, True),
        ("lokr", 8, True, False),
        ("lora", 4, False, False),
    )
]


def _params(algo: str, shape: tuple[int, ...], rank: int) -> list[str]:
    """The tensor names one module of ``algo`` has (as synth.module_tensors writes them)."""
    from lib_lorakit.synth import _factor

    if algo in ("lora", "locon"):
        return ["alpha", "lora_down.weight", "lora_up.weight"]
    if algo == "loha":
        return ["alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    o, i, k = shape[0], shape[1] if len(shape) > 1 else 1, tuple(shape[2:])
    o2, i2 = _factor(o)[1], _factor(i)[1]
    r2 = max(1, min(rank, o2, i2 * math.prod(k)))
    return ["alpha", "lokr_w1"] + (["lokr_w2_a", "lokr_w2_b"] if r2 < max(o2, i2) / 2 else ["lokr_w2"])


def _shape(algo: str, param: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    from lib_lorakit.synth import _factor

    o, i = shape[0], shape[1] if len(shape) > 1 else 1
    k = tuple(shape[2:])
    r = max(1, min(rank, o, i))
    if param == "alpha":
        return ()
    if algo in ("lora", "locon"):
        if param == "lora_down.weight":
            return (r, i, *k) if k else (r, i)
        return (o, r, 1, 1) if k else (o, r)
    if algo == "loha":
        flat = i * math.prod(k)
        return {"hada_w1_a": (o, r), "hada_w1_b": (r, flat), "hada_w2_a": (o, r), "hada_w2_b": (r, flat)}[param]
    if algo == "lokr":
        o1, o2 = _factor(o)
        i1, i2 = _factor(i)
        r2 = max(1, min(r, o2, i2 * math.prod(k)))
        return {
            "lokr_w1": (o1, i1),
            "lokr_w2": (o2, i2, *k),
            "lokr_w2_a": (o2, r2),
            "lokr_w2_b": (r2, i2, *k) if k else (r2, i2),
        }[param]
    raise ValueError(param)


def _tag_freq(rng: random.Random, kind: str, trigger: str, images: int) -> dict[str, int]:
    tags: dict[str, int] = {}
    if kind == "character":
        tags[trigger] = images
    tags["1girl" if rng.random() < 0.7 else "1boy"] = int(images * rng.uniform(0.6, 1.0))
    tags["solo"] = int(images * rng.uniform(0.5, 1.0))
    for _ in range(rng.randint(150, 450)):
        t = " ".join(rng.sample(WORDS, rng.choice((1, 2, 2, 3))))
        tags[t] = max(1, int(images * rng.random() ** 3))
    return tags


def build(work: str, keep: bool) -> list[str]:
    from lib_lorakit.formats.safetensors_io import OutEntry, build_header
    from lib_lorakit.synth import kohya_metadata, kohya_modules

    os.makedirs(work, exist_ok=True)
    files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(work) for f in fs if f.endswith(".safetensors"))
    if keep and len(files) == N_FILES:
        return files
    for f in files:
        os.remove(f)
    rng = random.Random(1234)
    modules = {
        (arch, te, conv): kohya_modules(arch, conv=conv, te=te, tiny=False)
        for arch in ("sd15", "sdxl")
        for te in (True, False)
        for conv in (True, False)
    }
    out = []
    for n in range(N_FILES):
        arch = "sdxl" if rng.random() < 0.6 else "sd15"
        algo, rank, te, conv = rng.choice(CONFIGS)
        kind = rng.choice(("character", "character", "style", "concept"))
        trig = "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3)) + str(n)
        name = f"{kind}_{trig}"
        images = rng.randint(15, 120)
        style = rng.random()
        meta = None
        alpha = float(rng.choice((1, rank // 2 or 1, rank)))
        if style < 0.8:
            module = {"lora": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}[algo]
            args = {"conv_dim": rank, "conv_alpha": alpha} if conv else {}
            if algo != "lora":
                args["algo"] = algo
            meta = kohya_metadata(
                arch,
                output_name=name,
                dim=rank,
                alpha=alpha,
                network_module=module,
                network_args=args or None,
                keep_tokens=1 if kind == "character" else 0,
                folders={
                    f"{rng.randint(2, 20)}_{trig if kind == 'character' else kind}": (
                        images,
                        list(_tag_freq(rng, kind, trig, images).items()),
                    )
                },
            )
            meta["ss_bucket_info"] = json.dumps(
                {
                    "buckets": {
                        str(i): {"resolution": [832 + 64 * i, 1216 - 64 * i], "count": rng.randint(1, 90)}
                        for i in range(12)
                    },
                    "mean_img_ar_error": 0.02,
                }
            )
        elif style < 0.9:
            meta = {
                "ss_network_module": "lycoris.kohya",
                "ss_network_dim": str(rank),
                "ss_network_alpha": "Dynamic",
                "ss_output_name": name,
            }
        entries, alphas = [], []
        for module, shape, _, _ in modules[(arch, te, conv)]:
            a = "locon" if algo == "lora" and len(shape) == 4 else algo
            for param in _params(a, shape, rank):
                full = f"{module}.{param}"
                entries.append(OutEntry(full, "F16", _shape(a, param, shape, rank)))
                if param == "alpha":
                    alphas.append((full, alpha))
        entries.sort(key=lambda e: e.name)
        hdr = build_header(entries, meta)
        offsets, off = {}, 0
        for e in entries:
            offsets[e.name] = off
            off += e.nbytes
        sub = os.path.join(work, f"{n // 100:02d}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{name}.safetensors")
        import numpy as np

        with open(path, "wb") as f:
            f.write(hdr)
            f.truncate(len(hdr) + off)
            for full, a in alphas:
                os.pwrite(f.fileno(), np.float16(a).tobytes(), len(hdr) + offsets[full])
        out.append(path)
    return sorted(out)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(HERE, "_work", "loras500"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = os.path.abspath(args.dir)
    t = time.perf_counter()
    files = build(work, args.keep)
    size = sum(os.path.getsize(f) for f in files)
    used = sum(os.stat(f).st_blocks * 512 for f in files)
    print(
        f"inputs: {len(files)} LoRA files, {size / 2**30:.1f} GB apparent ({used / 2**20:.0f} MB on disk), "
        f"built/checked in {time.perf_counter() - t:.1f} s"
    )
    py = sys.executable
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    single = [
        py,
        "-c",
        CHILD_PRELUDE + "import sys; from lib_lorakit.cli import main; "
        "sys.exit(main(['inspect', sys.argv[1], '--json', '-q']))",
        work,
    ]
    procs = [
        py,
        "-c",
        CHILD_PRELUDE + "import sys; from lib_lorakit.cli import main; "
        "sys.exit(main(['inspect', sys.argv[1], '--json', '-q', '--jobs', '2']))",
        work,
    ]
    reader = [py, "-c", METADATA_READER, work]
    results: dict[str, list[float]] = {}
    rss: dict[str, float] = {}
    check = check1 = None
    for cache in ("cold", "warm"):
        for _ in range(args.repeat):
            for name, cmd in (("metadata-reader", reader), ("lorakit", single), ("lorakit --jobs 2", procs)):
                if cache == "cold" and not drop_caches():
                    print("cannot drop the page cache (needs root): 'cold' runs are warm")
                wall, peak, out = run_child(cmd)
                results.setdefault(f"{name} {cache}", []).append(wall)
                rss[f"{name} {cache}"] = max(rss.get(f"{name} {cache}", 0), peak)
                if name == "lorakit":
                    check1 = out
                elif name == "lorakit --jobs 2":
                    check = out
    assert check == check1, "worker processes and a single process disagree"
    # the same findings when every file is planned afresh (no match reused across files with one key set)
    _, _, fresh = run_child(single, env={**os.environ, "LORAKIT_INSPECT_NO_PLAN_REUSE": "1"})
    same = fresh == check1
    print(f"findings with plans reused == findings with every file planned afresh: {same}")
    assert same, "reusing plans changed the findings"
    reps = [json.loads(line) for line in check.splitlines()]
    assert len(reps) == len(files), (len(reps), len(files))
    bad = [r for r in reps if "error" in r or r["structure"]["unmatched_count"]]
    assert not bad, bad[:2]
    startup = statistics.median(
        run_child([py, "-c", CHILD_PRELUDE + "import lib_lorakit.cli, lib_lorakit.inspect"])[0] for _ in range(3)
    )
    print(f"\n{'run':<24}{'median s':>9}{'per file ms':>12}{'peak RSS MB':>12}   samples")
    for k, v in results.items():
        m = statistics.median(v)
        print(f"{k:<24}{m:>9.2f}{1000 * m / len(files):>12.1f}{rss[k]:>12.0f}   {' '.join(f'{x:.2f}' for x in v)}")
    print(f"{'(lorakit import only)':<24}{startup:>9.2f}")
    for cache in ("cold", "warm"):
        r = statistics.median(results[f"lorakit {cache}"]) / statistics.median(results[f"metadata-reader {cache}"])
        print(
            f"lorakit {cache} / metadata-reader {cache}: {r:.2f} (target <= 1.5 cold): "
            + ("PASS" if r <= 1.5 else "FAIL")
            if cache == "cold"
            else f"lorakit warm / metadata-reader warm: {r:.2f}"
        )
    kinds = {k: sum(r["kind"] == k for r in reps) for k in ("passive", "trigger-dependent")}
    trig = sum(r["trigger"] is not None for r in reps)
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(
        f"\nlorakit found: {kinds['passive']} passive, {kinds['trigger-dependent']} trigger-dependent, "
        f"{trig} with a trigger; alpha from metadata in "
        f"{sum(r['structure']['alpha_source'] == 'metadata' for r in reps)} files, from tensors in "
        f"{sum(r['structure']['alpha_source'] == 'tensors' for r in reps)}"
    )


if __name__ == "__main__":
    main()
