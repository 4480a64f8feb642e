"""Benchmark: generation throughput against the number of WebUIs in a pool and the batch size.

Loopback fake WebUIs (tests/fake_sdapi.py: the /sdapi/v1 surface, one request generating at a
time as in the WebUI's queue) with a fixed latency: ``--request-latency`` seconds per request
(what a real WebUI spends per call whatever the batch: text encoding set-up, VAE and PNG
encoding, HTTP) plus ``--latency`` seconds per image. The same plan (``--cells`` cells: one
prompt and checkpoint, consecutive seeds, so batches can form) runs through
``lib_lorakit.gen.run.execute`` on a :class:`~lib_lorakit.gen.pool.Pool` of 1..``--members``
WebUIs at each batch size; every image's seed is read back from its pixels (a mislabelled
image fails the run). Reported: wall seconds (first request to last image written), images per
second, the speed-up over one WebUI at batch 1, and the share of the ideal
(members x batch / (request latency + batch x latency)).

    python bench/gen_pool.py [--members 3] [--batches "1, 2, 4"] [--cells 48]
        [--latency 0.05] [--request-latency 0.1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from fake_gen import FakeBackend, decode  # noqa: E402
from fake_sdapi import FakeWebUI  # noqa: E402

from lib_lorakit.gen.backend import HttpBackend  # noqa: E402
from lib_lorakit.gen.pool import Pool  # noqa: E402
from lib_lorakit.gen.run import Cell, Run, execute  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--batches", default="1, 2, 4")
    ap.add_argument("--cells", type=int, default=48)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per image")
    ap.add_argument("--request-latency", type=float, default=0.1, help="seconds per request")
    ap.add_argument("--json", help="write the rows here too")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.replace(",", " ").split()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ck, lo = os.path.join(tmp, "ckpt"), os.path.join(tmp, "lora")
        os.makedirs(ck)
        os.makedirs(lo)
        with open(os.path.join(ck, "base.safetensors"), "wb") as f:
            f.write(b"checkpoint")
        servers = [
            FakeWebUI(FakeBackend(ck, lo), latency=a.latency, request_latency=a.request_latency)
            for _ in range(a.members)
        ]
        try:
            cells = [Cell("r", str(s), "a castle", seed=s) for s in range(1, a.cells + 1)]
            base = None
            for m in range(1, a.members + 1):
                for b in batches:
                    run = Run.create(os.path.join(tmp, f"m{m}b{b}"), "grid", cells)
                    rec = execute(run, Pool([HttpBackend(s.url) for s in servers[:m]], batch_size=b))
                    for key, ev in run.results().items():
                        c = next(c for c in run.cells if c.key == key)
                        assert ev["status"] == "ok" and decode(run.load_image(ev))[0] == c.seed % 256, ev
                    rate = a.cells / rec["seconds"]
                    base = base or rate
                    ideal = m * b / (a.request_latency + b * a.latency)
                    rows.append(
                        {
                            "members": m,
                            "batch": b,
                            "seconds": rec["seconds"],
                            "images_per_s": round(rate, 2),
                            "speedup": round(rate / base, 2),
                            "of_ideal": round(rate / ideal, 3),
                            "per_member": [x["made"] for x in rec["members"]],
                        }
                    )
                    r = rows[-1]
                    print(
                        f"members {m}  batch {b}  {r['seconds']:7.2f} s  {r['images_per_s']:6.2f} img/s  "
                        f"x{r['speedup']:<5}  {100 * r['of_ideal']:5.1f}% of ideal  per member {r['per_member']}",
                        flush=True,
                    )
        finally:
            for s in servers:
                s.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
