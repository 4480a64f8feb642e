"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import time

FINISHED = ("done", "error", "cancelled")


def wait_job(client, job_id: str, timeout: float = 60.0, auth=None) -> dict:
    """Poll ``/lorakit/v1/jobs/{job_id}`` until the job has finished; return its JSON."""
    t0 = time.time()
    j: dict = {}
    while time.time() - t0 < timeout:
        j = client.get(f"/lorakit/v1/jobs/{job_id}", auth=auth).json()
        if j.get("state") in FINISHED:
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout:g} s: {j}")


def worst_fp16_rounding(exact) -> tuple[float, str | None]:
    """The largest error rounding ``exact`` ({key: float64 tensor}) to float32 and then once to float16
    makes, and its key (the first in key order among ties): what a bake or merge report must state."""
    worst, worst_key = 0.0, None
    for k in sorted(exact):
        x32 = exact[k].float()
        e = float((x32.half().double() - x32.double()).abs().max())
        if e > worst:
            worst, worst_key = e, k
    return worst, worst_key
