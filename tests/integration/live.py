"""Helpers and fixtures for tests against a live WebUI (LORAKIT_WEBUI_URL)."""

import base64
import json
import os
import time
import urllib.error
import urllib.request
import uuid

import pytest

URL = os.environ.get("LORAKIT_WEBUI_URL", "").rstrip("/")


def call(method, path, body=None, timeout=600):
    req = urllib.request.Request(
        URL + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    auth = os.environ.get("LORAKIT_WEBUI_AUTH")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait(job_id, timeout=900):
    t = time.time()
    while time.time() - t < timeout:
        status, j = call("GET", f"/lorakit/v1/jobs/{job_id}")
        assert status == 200, j
        if j["state"] in ("done", "error", "cancelled"):
            return j
        time.sleep(0.5)
    raise AssertionError("job did not finish")


@pytest.fixture(scope="module")
def base():
    status, ckpts = call("GET", "/lorakit/v1/checkpoints")
    assert status == 200 and ckpts, ckpts
    return os.environ.get("LORAKIT_WEBUI_BASE") or ckpts[0]["name"]


@pytest.fixture(scope="module")
def lora(base):
    name = os.environ.get("LORAKIT_WEBUI_LORA")
    if name:
        return name
    folder = os.environ.get("LORAKIT_WEBUI_LORA_DIR")
    if not folder:
        pytest.skip("set LORAKIT_WEBUI_LORA_DIR or LORAKIT_WEBUI_LORA")
    import torch

    from lib_lorakit.formats.safetensors_io import save_file
    from lib_lorakit.synth import make_lora

    arch = os.environ.get("LORAKIT_WEBUI_ARCH", "sd15")  # the family of the host's base checkpoint
    name = f"lorakit-it-{uuid.uuid4().hex[:6]}"
    sd = make_lora(arch, "lora", rank=4, alpha=4, tiny=False, conv=False, seed=5, dtype=torch.float16, std=0.01)
    save_file(sd, os.path.join(folder, name + ".safetensors"))
    return name
