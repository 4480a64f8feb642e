"""The workshop through the HTTP API (jobs into the host's folders, new files in its lists) and the tab's build."""

from __future__ import annotations

import pytest
from factories import write
from helpers import wait_job

from lib_lorakit.synth import make_lora, write_checkpoint

pytest.importorskip("fastapi")


@pytest.fixture
def client(model_dirs):
    from fastapi.testclient import TestClient

    from lib_lorakit.ops import LocalContext, bake
    from lib_lorakit.ui.standalone import create_app

    ck, lo = model_dirs
    write_checkpoint(str(ck / "base.safetensors"), "sdxl", tiny=True, seed=1)
    write(lo, "style.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    bake.bake(
        LocalContext(),
        {
            "base": str(ck / "base.safetensors"),
            "output": str(ck / "tuned.safetensors"),
            "loras": [{"name": str(lo / "style.safetensors")}],
            "save_dtype": "fp32",
        },
    )
    app, _ = create_app(str(ck), str(lo))
    with TestClient(app) as c:
        c.dirs = (ck, lo)
        yield c


def test_extract_resize_merge_clean_and_hash_through_the_api(client):
    ck, lo = client.dirs
    r = client.post(
        "/lorakit/v1/workshop/extract",
        json={
            "tuned": "tuned.safetensors",
            "base": "base.safetensors",
            "output": "extracted",
            "rank": 4,
            "device": "cpu",
        },
    )
    j = wait_job(client, r.json()["job_id"], timeout=300)
    assert j["state"] == "done", j
    assert j["result"]["lora"] == "extracted" and (lo / "extracted.safetensors").exists()
    assert "extracted" in [x["name"] for x in client.get("/lorakit/v1/loras").json()]
    r = client.post("/lorakit/v1/workshop/resize", json={"lora": "extracted", "output": "small", "rank": 2})
    assert wait_job(client, r.json()["job_id"], timeout=300)["state"] == "done"
    r = client.post(
        "/lorakit/v1/workshop/lora-merge",
        json={"loras": [{"name": "style", "weight": 0.5}, {"name": "small"}], "output": "both"},
    )
    assert wait_job(client, r.json()["job_id"], timeout=300)["state"] == "done" and (lo / "both.safetensors").exists()
    r = client.post(
        "/lorakit/v1/workshop/clean",
        json={"checkpoint": "tuned.safetensors", "output": "tuned-clean", "save": "fp16", "title": "Tuned"},
    )
    j = wait_job(client, r.json()["job_id"], timeout=300)
    assert j["state"] == "done" and j["result"]["checkpoint"] == "tuned-clean.safetensors"
    h = client.get("/lorakit/v1/workshop/hash", params={"checkpoint": "tuned-clean.safetensors"}).json()
    import hashlib

    assert h["sha256"] == hashlib.sha256((ck / "tuned-clean.safetensors").read_bytes()).hexdigest()
    assert h["shorthash"] == h["sha256"][:10]


def test_workshop_refuses_bad_requests_at_once(client):
    r = client.post("/lorakit/v1/workshop/extract", json={"tuned": "nope", "base": "base.safetensors", "output": "x"})
    assert r.status_code == 404 and "nope" in r.json()["message"]
    r = client.post("/lorakit/v1/workshop/resize", json={"lora": "style", "output": "x", "rank": 0})
    assert r.status_code == 400 and "rank" in r.json()["message"]
    r = client.post("/lorakit/v1/workshop/resize", json={"lora": "style", "output": "x", "dynamic": "sv_bogus:1"})
    assert r.status_code == 400 and "sv_bogus" in r.json()["message"]
    r = client.post("/lorakit/v1/workshop/lora-merge", json={"loras": [], "output": "x"})
    assert r.status_code == 400 and "loras" in r.json()["message"]


def test_the_workshop_tab_builds():
    gr = pytest.importorskip("gradio")
    import tempfile

    from lib_lorakit.hosts import LocalHost
    from lib_lorakit.ops import HostContext
    from lib_lorakit.ui.workshop_tab import build_workshop_tab

    d = tempfile.mkdtemp()
    with gr.Blocks():
        build_workshop_tab(HostContext(LocalHost(d, d)))
