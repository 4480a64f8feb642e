"""Tournament routes on a WebUI host (fake `modules`): create, generate (a merge candidate built, a checkpoint
copied in after start found), blind ballot, votes, scores, reveal, report, next round."""

from __future__ import annotations

import os

import pytest
from fake_gen import FakeBackend
from helpers import wait_job
from test_grid_script import webui  # noqa: F401

from lib_lorakit import host as host_pkg
from lib_lorakit.synth import write_checkpoint

PROMPTS = [{"prompt": p} for p in ("a portrait", "a castle", "a cat", "a street", "a forest")]


@pytest.fixture
def client(webui):  # noqa: F811
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.api import build_router
    from lib_lorakit.ops import HostContext

    fake, tmp = webui
    ckdir = os.path.join(str(tmp), "models", "Stable-diffusion")
    os.remove(os.path.join(ckdir, "base.safetensors"))
    write_checkpoint(os.path.join(ckdir, "base.safetensors"), "sd15", tiny=True, seed=1)
    gen = FakeBackend(ckdir, os.path.join(str(tmp), "models", "Lora"))

    def process_images(p):  # honours the checkpoint override, as the WebUI does
        fake.processing.calls.append((p, True))
        title = (p.override_settings or {}).get("sd_model_checkpoint", "")
        gen.refresh()
        name = next(c.name for c in gen.checkpoints() if title.startswith(c.name.split(" [")[0]))
        out = gen.txt2img({"prompt": p.prompt, "seed": p.seed, "checkpoint": name})
        return fake.processing.Processed(p, [out.image], p.seed, out.infotext, infotexts=[out.infotext])

    fake.processing.process_images = process_images
    app = FastAPI()
    app.include_router(build_router(HostContext(host_pkg.get_host())))
    with TestClient(app) as c:
        c.ckdir = ckdir
        yield c


def wait(c, job_id, timeout=60, auth=None):
    return wait_job(c, job_id, timeout=timeout, auth=auth)


def test_tournament_end_to_end(client):
    c = client
    r = c.post(
        "/lorakit/v1/tournaments",
        json={
            "candidates": [{"id": "v1", "checkpoint": "base", "control": True}, {"id": "v2", "checkpoint": "base"}],
            "prompts": PROMPTS[:4],
        },
    )
    assert r.status_code == 400 and "at least 5 prompts" in r.json()["message"]
    # a checkpoint copied in after the WebUI started
    write_checkpoint(os.path.join(c.ckdir, "late.safetensors"), "sd15", tiny=True, seed=2)
    body = {
        "name": "v3 pick",
        "settings": {"width": 64, "height": 64, "steps": 2},
        "prompts": PROMPTS,
        "candidates": [
            {"id": "v1", "checkpoint": "base", "control": True},
            {"id": "late", "checkpoint": "late"},
            {"id": "mix", "merge": {"models": [{"name": "base", "weight": 0.7}, {"name": "late", "weight": 0.3}]}},
        ],
    }
    tid = c.post("/lorakit/v1/tournaments", json=body).json()["id"]
    j = wait(c, c.post(f"/lorakit/v1/tournaments/{tid}/generate").json()["job_id"])
    assert j["state"] == "done", j
    assert j["result"]["record"]["ok"] == 15 and j["result"]["record"]["failed"] == 0
    assert any(n.startswith("lorakit-t") for n in os.listdir(c.ckdir))  # the merge was built
    info = c.get(f"/lorakit/v1/tournaments/{tid}").json()
    assert info["state"] == "ready" and "spec" not in info  # recipes hidden before Reveal
    b = c.get(f"/lorakit/v1/tournaments/{tid}/ballot", params={"evaluator": "ann"}).json()
    assert len(b["prompts"]) == 5 and all(len(p["entries"]) == 3 for p in b["prompts"])
    assert "candidate" not in str(b["prompts"][0]["entries"])
    png = c.get(f"/lorakit/v1/tournaments/{tid}/image/ann/0/B")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    # Blind: the served PNG has no text chunks (the file on disk keeps its infotext, naming the checkpoint), and
    # the job anyone can list shows counts, not candidates.
    import io
    import json as _json

    from PIL import Image

    served = Image.open(io.BytesIO(png.content))
    assert not getattr(served, "text", {}) and "parameters" not in served.info
    from lib_lorakit.gen.run import Run

    run = Run(c.get(f"/lorakit/v1/tournaments/{tid}").json()["run_dir"])
    pixels = list(served.convert("RGB").getdata())
    same = [Image.open(run.image_path(ev)) for ev in run.results().values() if ev["status"] == "ok"]
    same = [im for im in same if list(im.convert("RGB").getdata()) == pixels]
    assert same and "parameters" in same[0].info  # the same pixels; the stripping is what hid the infotext
    jobs_text = _json.dumps(c.get("/lorakit/v1/jobs").json())
    assert '"late"' not in jobs_text and '"mix"' not in jobs_text and "late.safetensors" not in jobs_text
    # zed has no preference anywhere (so the outcome below is decided by ann alone)
    votes = [{"prompt": i, "no_preference": True, "client": "t", "seq": i} for i in range(5)]
    assert (
        c.post(f"/lorakit/v1/tournaments/{tid}/votes", json={"evaluator": "zed", "votes": votes}).json()["recorded"]
        == 5
    )
    assert (
        c.post(
            f"/lorakit/v1/tournaments/{tid}/votes", json={"evaluator": "zed", "votes": [{"prompt": 0, "ranks": ["Q"]}]}
        ).status_code
        == 400
    )
    sc = c.get(f"/lorakit/v1/tournaments/{tid}/scores", params={"resamples": 200}).json()
    assert set(sc["schemes"]["standard 3/2/1"]) == {"candidate 1", "candidate 2", "candidate 3"}
    assert c.get(f"/lorakit/v1/tournaments/{tid}/report").status_code == 400  # not before Reveal
    assert c.get(f"/lorakit/v1/tournaments/{tid}/chart").content[:4] == b"\x89PNG"
    c.post(f"/lorakit/v1/tournaments/{tid}/reveal")
    # ann ranks the merge first everywhere (letters read from her revealed ballot)
    b = c.get(f"/lorakit/v1/tournaments/{tid}/ballot", params={"evaluator": "ann"}).json()
    votes = []
    for p in b["prompts"]:
        letter = {e["candidate"]: e["letter"] for e in p["entries"]}
        votes.append({"prompt": p["index"], "ranks": [letter["mix"], letter["v1"], letter["late"]]})
    c.post(f"/lorakit/v1/tournaments/{tid}/votes", json={"evaluator": "ann", "votes": votes})
    md = c.get(f"/lorakit/v1/tournaments/{tid}/report").text
    assert "Control (the previous version): **v1**" in md and "merge(weighted: base×0.7, late×0.3)" in md
    sheet = c.get(f"/lorakit/v1/tournaments/{tid}/contact/0")
    assert sheet.status_code == 200 and sheet.content[:4] == b"\x89PNG"
    win = c.get(f"/lorakit/v1/tournaments/{tid}/winner").json()
    assert win["candidate"] == "mix" and win["merge"]["models"] == [
        {"name": "base", "weight": 0.7},
        {"name": "late", "weight": 0.3},
    ]
    r = c.post(
        "/lorakit/v1/merge",
        json={**{k: v for k, v in win["merge"].items() if v is not None}, "output": "winner-rebuilt"},
    )
    assert r.status_code == 200, r.text  # the exported recipe is a valid merge request
    done = wait(c, r.json()["job_id"])  # and it merges (finished before the fake WebUI goes away)
    assert done["state"] == "done", done
    nxt = c.post(f"/lorakit/v1/tournaments/{tid}/next-round", json={"mode": "dial-in", "create": True}).json()
    assert nxt["winner"] == "mix" and nxt["round"] == 2 and nxt["id"]
    assert [x["id"] for x in nxt["candidates"]][:2] == ["v1", "mix"]
    info2 = c.get(f"/lorakit/v1/tournaments/{nxt['id']}").json()
    assert info2["parent"] == tid and info2["round"] == 2
