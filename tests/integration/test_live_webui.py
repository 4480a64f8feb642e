"""Against a running WebUI (A1111 1.10 or Forge) with lorakit installed.

Set LORAKIT_WEBUI_URL (e.g. http://127.0.0.1:7860) to run; skipped otherwise. With
LORAKIT_WEBUI_LORA_DIR (the host's LoRA folder, on this machine) the test writes its own
SD1.5/SDXL LoRA there; otherwise set LORAKIT_WEBUI_LORA to a LoRA the host has.
LORAKIT_WEBUI_AUTH=user:password when the host runs with --api-auth.
"""

import base64
import io
import json
import time
import uuid

import pytest
from live import URL, call, wait

pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")


def test_bake_appears_in_the_host_and_generates(base, lora):
    out = f"lorakit-it-{uuid.uuid4().hex[:6]}-baked"
    status, r = call(
        "POST", "/lorakit/v1/bake", {"base": base, "output": out, "loras": [{"name": lora, "strength": 0.7}]}
    )
    assert status == 200, r
    job = wait(r["job_id"])
    assert job["state"] == "done", job
    assert job["result"]["checkpoint"] == out + ".safetensors"
    rep = job["result"]["report"]
    assert rep["loras"][0]["unmatched"] == [] and sum(rep["loras"][0]["matched"].values()) > 0
    status, models = call("GET", "/sdapi/v1/sd-models")
    titles = [m["title"] for m in models]
    mine = [t for t in titles if t.startswith(out + ".safetensors")]
    assert status == 200 and mine, titles  # in the host's list without a restart
    status, img = call(
        "POST",
        "/sdapi/v1/txt2img",
        {
            "prompt": "a cat",
            "steps": 2,
            "width": 64,
            "height": 64,
            "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": mine[0]},
            "override_settings_restore_afterwards": True,
        },
    )
    assert status == 200 and len(img["images"]) == 1
    info = json.loads(img["info"])
    assert out in json.dumps(info), info  # generated with the baked model


def test_in_process_txt2img_through_the_host_adapter(base):
    status, r = call(
        "POST",
        "/lorakit/v1/txt2img",
        {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "seed": 123,
            "sampler_name": "Euler",
            "steps": 2,
            "cfg_scale": 5,
            "width": 64,
            "height": 64,
            "checkpoint": base,
        },
    )
    assert status == 200, r
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
    assert im.size == (64, 64)
    assert "Seed: 123" in r["infotexts"][0] and "Steps: 2" in r["infotexts"][0]


def test_webui_interrupt_cancels_a_bake(base, lora):
    out = f"lorakit-it-{uuid.uuid4().hex[:6]}-interrupted"
    status, r = call(
        "POST", "/lorakit/v1/bake", {"base": base, "output": out, "save_dtype": "fp32", "loras": [{"name": lora}]}
    )
    assert status == 200, r
    t = time.time()
    while time.time() - t < 120:
        _, j = call("GET", f"/lorakit/v1/jobs/{r['job_id']}")
        if j["state"] == "running" and j["progress"] > 0.02:
            break
        time.sleep(0.05)
    _, prog = call("GET", "/sdapi/v1/progress?skip_current_image=true")
    assert prog["state"]["job"] == "lorakit: bake", prog  # the host's own job state shows the bake
    call("POST", "/sdapi/v1/interrupt")
    job = wait(r["job_id"])
    assert job["state"] == "cancelled", job
    _, ckpts = call("GET", "/lorakit/v1/checkpoints")
    assert not any(c["name"].startswith(out) for c in ckpts)


def test_paths_and_errors_on_the_host(base):
    status, r = call("POST", "/lorakit/v1/bake", {"base": "/etc/passwd", "output": "x", "loras": [{"name": "a"}]})
    assert status == 403 and r["error"] == "PathRefused"
    status, r = call("POST", "/lorakit/v1/bake", {"base": base, "output": "../x", "loras": [{"name": "a"}]})
    assert status in (400, 404) and "message" in r
