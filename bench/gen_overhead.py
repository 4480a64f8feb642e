"""Benchmark: lorakit's per-image overhead over plain txt2img calls, against a live WebUI.

The same cells (a baseline and LoRA strengths, fixed seeds, the same checkpoint override)
are made three ways, interleaved, ``--repeat`` times each, in the same run:

- **plain**: what a one-off script does — POST /sdapi/v1/txt2img per image, decode the
  PNG, write it to a folder;
- **lorakit-http**: ``lib_lorakit.gen`` through the HTTP backend (what ``autotest`` and
  ``grid --webui`` do): pre-flight (refresh and resolve lists), the infotext check, the
  post-check, PNG with metadata written atomically, the fsynced manifest, and at the end
  the evaluation, the verdicts, grid.png and summary.md — all counted;
- **lorakit-script**: one POST /sdapi/v1/txt2img carrying the grid Script
  (``script_name``/``script_args``), which runs the same pipeline inside the WebUI.

Per-image overhead = (median lorakit time − median plain time) / median plain time.
Target ≤ 3 %. Generation time on a CPU host varies by several per cent between runs, so
the http path also measures lorakit's own work directly inside the same runs: its wall
time minus the time spent waiting on the WebUI's txt2img calls (pre-flight, checks,
manifest, PNG writes, evaluation, grid), as a share of a plain image. Peak RSS of this
(client) process is reported.

    python bench/gen_overhead.py --webui http://127.0.0.1:7860 --lora NAME [--repeat 3]
        [--strengths "0, 0.5, 1"] [--seeds "1, 2"] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_lorakit.gen.backend import HttpBackend  # noqa: E402
from lib_lorakit.gen.grid import GridRow, GridSpec, parse_seeds, parse_strengths, run_grid  # noqa: E402


def post(url: str, route: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + route, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--webui", required=True)
    ap.add_argument("--lora", required=True, help="a LoRA name from the WebUI's list")
    ap.add_argument("--checkpoint", help="default: the loaded one")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--strengths", default="0, 0.5, 1")
    ap.add_argument("--seeds", default="1, 2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--prompt", default="a cat in a garden")
    args = ap.parse_args()

    be = HttpBackend(args.webui)
    be.refresh()
    ck = args.checkpoint or be.current_checkpoint()
    settings = {"steps": args.steps, "width": args.size, "height": args.size, "sampler_name": "Euler", "cfg_scale": 5.0}
    spec = GridSpec(
        rows=[GridRow(args.lora, args.lora)],
        prompt=args.prompt,
        strengths=args.strengths,
        seeds=parse_seeds(args.seeds),
        checkpoint=ck,
        settings=settings,
    )
    cells = spec.cells()
    n = len(cells)
    print(
        f"{n} images per run ({len(parse_strengths(args.strengths))} strengths x {len(spec.seeds)} seeds), "
        f"{args.size}x{args.size}, {args.steps} steps, checkpoint {ck}"
    )
    work = tempfile.mkdtemp(prefix="lorakit-bench-")

    def plain() -> float:
        out = os.path.join(work, "plain")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        t = time.perf_counter()
        for i, c in enumerate(cells):
            body = {
                "prompt": c.prompt,
                "negative_prompt": c.negative_prompt,
                "seed": c.seed,
                **settings,
                "override_settings": {"sd_model_checkpoint": ck},
                "override_settings_restore_afterwards": True,
                "batch_size": 1,
                "n_iter": 1,
                "save_images": False,
                "send_images": True,
            }
            r = post(args.webui, "/sdapi/v1/txt2img", body)
            with open(os.path.join(out, f"{i:05d}.png"), "wb") as f:
                f.write(base64.b64decode(r["images"][0]))
        return time.perf_counter() - t

    own_script: list[float] = []  # the same, from the run record the Script writes inside the WebUI
    own: list[float] = []  # lorakit's own seconds per run: wall time minus time inside the WebUI's txt2img

    def lorakit_http() -> float:
        out = os.path.join(work, "lorakit")
        hb = HttpBackend(args.webui)
        inner = hb.txt2img
        spent = [0.0]

        def timed(req):
            t0 = time.perf_counter()
            try:
                return inner(req)
            finally:
                spent[0] += time.perf_counter() - t0

        hb.txt2img = timed
        t = time.perf_counter()
        res = run_grid(hb, spec, out)
        dt = time.perf_counter() - t
        assert res["record"]["ok"] == n, res["record"]
        own.append(dt - spent[0])
        return dt

    def lorakit_script() -> float:
        body = {
            "prompt": f"{args.prompt}, <lora:{args.lora}:1>",
            "negative_prompt": "",
            "seed": spec.seeds[0],
            **settings,
            "script_name": "lorakit: LoRA strength grid",
            "script_args": [[args.lora], args.strengths, False, args.seeds, False],
        }
        t = time.perf_counter()
        r = post(args.webui, "/sdapi/v1/txt2img", body)
        dt = time.perf_counter() - t
        head = json.loads(r["info"])["infotexts"][0]
        assert head.startswith("lorakit strength grid"), r["info"][:300]
        run_dir = head.split("run folder ")[1].splitlines()[0]
        rec_path = os.path.join(run_dir, "run.json")
        if os.path.isfile(rec_path):  # the WebUI's outputs are on this machine
            with open(rec_path) as f:
                own_script.append(json.load(f)["seconds_lorakit_script"])
        return dt

    plain()  # warm-up: the model is loaded and caches are hot before anything is timed
    runs = {"plain": [], "lorakit-http": [], "lorakit-script": []}
    for i in range(args.repeat):
        for name, fn in (("plain", plain), ("lorakit-http", lorakit_http), ("lorakit-script", lorakit_script)):
            dt = fn()
            runs[name].append(dt)
            print(f"  round {i + 1}: {name:<15} {dt:8.2f} s  ({dt / n:.3f} s/image)", flush=True)
    base = statistics.median(runs["plain"])
    print(f"\n{'run':<16}{'median s':>10}{'s/image':>10}{'overhead':>10}   samples")
    for name, v in runs.items():
        m = statistics.median(v)
        over = (m - base) / base
        print(f"{name:<16}{m:>10.2f}{m / n:>10.3f}{over:>+10.2%}   {' '.join(f'{x:.2f}' for x in v)}")
    per_image_plain = base / n
    own_m = statistics.median(own)
    print(
        f"lorakit's own work (http path, measured inside the same runs: wall time minus the WebUI's txt2img "
        f"calls): {own_m:.3f} s per run = {1000 * own_m / n:.1f} ms per image = {own_m / n / per_image_plain:.2%} "
        f"of a plain image ({' '.join(f'{x:.3f}' for x in own)})"
    )
    if own_script:
        m = statistics.median(own_script)
        print(
            f"lorakit's own work (script path, from its run.json: the Script's whole run minus time in process_images): {m:.3f} s "
            f"per run = {1000 * m / n:.1f} ms per image = {m / n / per_image_plain:.2%} of a plain image "
            f"({' '.join(f'{x:.3f}' for x in own_script)})"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"client peak RSS {peak:.0f} MB")
    worst = max((statistics.median(runs[k]) - base) / base for k in ("lorakit-http", "lorakit-script"))
    print(f"per-image overhead: worst {worst:+.2%} (target <= 3%): {'PASS' if worst <= 0.03 else 'FAIL'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
