"""The inspector plans once per distinct key set and still finds what a fresh plan finds."""

import pytest
import torch
from factories import write

from lib_lorakit.inspect import inspect_paths
from lib_lorakit.inspect import structure as S
from lib_lorakit.synth import make_lora


def scan(paths):
    return {r["file"]: r for r in inspect_paths(paths, workers=1)}


@pytest.fixture
def loras(tmp_path):
    """Files sharing one key set (ranks 1, 2, 3), one of another set, and one with a module of another size.

    Real sizes (the inspector matches against the real SDXL layout), UNet only and tiny ranks: ~1-3 MB each.
    """
    real = {"tiny": False, "te": False, "conv": False}
    paths = [write(tmp_path, f"r{r}.safetensors", make_lora("sdxl", "lora", rank=r, seed=r, **real)) for r in (1, 2, 3)]
    paths.append(write(tmp_path, "lokr.safetensors", make_lora("sdxl", "lokr", seed=3, **real)))
    bad = make_lora("sdxl", "lora", rank=2, seed=9, **real)
    k = next(k for k in bad if k.endswith("lora_up.weight") and k.startswith("lora_unet"))
    bad[k] = torch.zeros(bad[k].shape[0] + 3, bad[k].shape[1], dtype=bad[k].dtype)  # one module of another size
    paths.append(write(tmp_path, "bad.safetensors", bad))
    return paths


def test_one_plan_per_key_set_same_findings(loras):
    S._MATCHES.clear()
    S.PLAN_STATS.clear()
    cached = scan(loras)
    # r1 planned; r2 and r3 reuse it (their shapes pass the checks again); lokr planned; bad fails the
    # shape check of the reused match and is planned in full — and, having an unmatched module at full
    # width, once more against the layout at the synthetic models' width (the inspector tries both)
    assert (S.PLAN_STATS["reused"], S.PLAN_STATS["planned"]) == (2, 4), (S.PLAN_STATS, len(S._MATCHES))
    fresh = {}
    for p in loras:  # each file planned on its own, nothing reused
        S._MATCHES.clear()
        fresh.update(scan([p]))
    for p in loras:
        a, b = cached[p], fresh[p]
        for field in ("structure", "arch", "family", "kind", "warnings"):
            if field in a:
                assert a[field] == b[field], (p, field)
    assert [cached[p]["structure"]["rank"] for p in loras[:3]] == [1, 2, 3]
    assert cached[loras[4]]["structure"]["unmatched_count"] == 1
    assert "shape mismatch" in cached[loras[4]]["structure"]["unmatched"][0]["reason"]
