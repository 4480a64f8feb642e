"""A 3-candidate x 5-prompt blind tournament through the API of a running WebUI (LORAKIT_WEBUI_URL;
skipped without it), one candidate a checkpoint copied into the models folder after the WebUI
started. Needs LORAKIT_WEBUI_CKPT_DIR (the host's Stable-diffusion folder on this machine)."""

import os
import shutil
import uuid

import pytest
from live import URL, call, wait

pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")


def test_three_candidates_five_prompts(base, lora):
    ckdir = os.environ.get("LORAKIT_WEBUI_CKPT_DIR")
    if not ckdir:
        pytest.skip("set LORAKIT_WEBUI_CKPT_DIR")
    status, ckpts = call("GET", "/lorakit/v1/checkpoints")
    src = os.path.join(ckdir, base)
    late = f"lorakit-it-late-{uuid.uuid4().hex[:6]}.safetensors"
    shutil.copyfile(src, os.path.join(ckdir, late))  # after start-up: the WebUI's cached list lacks it
    try:
        body = {
            "name": "it",
            "settings": {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5},
            "prompts": [{"prompt": p} for p in ("a cat", "a castle", "a portrait", "a street", "a forest")],
            "candidates": [
                {"id": "control", "checkpoint": base, "control": True},
                {"id": "late", "checkpoint": late},
                {"id": "recipe", "checkpoint": base, "loras": [{"name": lora, "strength": 0.8}]},
            ],
        }
        status, r = call("POST", "/lorakit/v1/tournaments", {**body, "prompts": body["prompts"][:4]})
        assert status == 400 and "at least 5 prompts" in r["message"]
        status, r = call("POST", "/lorakit/v1/tournaments", body)
        assert status == 200, r
        tid = r["id"]
        status, r = call("POST", f"/lorakit/v1/tournaments/{tid}/generate")
        assert status == 200, r
        job = wait(r["job_id"])
        assert job["state"] == "done", job
        rec = job["result"]["record"]
        assert rec["ok"] == 15 and rec["failed"] == 0 and rec["model_switches"] <= 2, rec
        status, b = call("GET", f"/lorakit/v1/tournaments/{tid}/ballot?evaluator=it")
        assert len(b["prompts"]) == 5 and all(len(p["entries"]) == 3 for p in b["prompts"])
        assert "candidate" not in str(b)
        votes = [{"prompt": i, "ranks": ["A", "B", "C"], "client": "it", "seq": i} for i in range(5)]
        status, r = call("POST", f"/lorakit/v1/tournaments/{tid}/votes", {"evaluator": "it", "votes": votes})
        assert status == 200 and r["recorded"] == 5
        status, sc = call("GET", f"/lorakit/v1/tournaments/{tid}/scores?resamples=200")
        assert status == 200 and sum(sc["schemes"]["standard 3/2/1"].values()) == 5 * 6
        call("POST", f"/lorakit/v1/tournaments/{tid}/reveal")
        import urllib.request

        md = urllib.request.urlopen(f"{URL}/lorakit/v1/tournaments/{tid}/report").read().decode()
        assert "Control (the previous version): **control**" in md and late.split(".")[0] in md
    finally:
        os.remove(os.path.join(ckdir, late))
        call("POST", "/sdapi/v1/refresh-checkpoints", {})
