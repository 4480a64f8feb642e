"""The triage routes on a WebUI host (fake `modules`), end to end."""

from __future__ import annotations

import hashlib
import os

import pytest
from helpers import wait_job
from test_grid_script import webui  # noqa: F401  (fixture: fake A1111/Forge with the fake generator)
from test_triage import make_loras

from lib_lorakit import host as host_pkg


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.fixture
def client(webui):  # noqa: F811
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.api import build_router
    from lib_lorakit.ops import HostContext

    fake, tmp = webui
    lora_dir = os.path.join(str(tmp), "models", "Lora")
    for f in os.listdir(lora_dir):
        os.remove(os.path.join(lora_dir, f))
    paths = make_loras(os.path.join(lora_dir, "batch1"), 5)
    app = FastAPI()
    app.include_router(build_router(HostContext(host_pkg.get_host())))
    with TestClient(app) as c:
        c.paths = paths
        c.lora_dir = lora_dir
        yield c


def wait(c, job_id, timeout=30, auth=None):
    return wait_job(c, job_id, timeout=timeout, auth=auth)


def test_triage_end_to_end(client):
    c = client
    assert c.post("/lorakit/v1/triage", json={"folder": "../../elsewhere"}).status_code == 403
    r = c.post("/lorakit/v1/triage", json={"folder": "batch1", "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 200, r.text
    tid = r.json()["triage_id"]
    j = wait(c, r.json()["job_id"])
    assert j["state"] == "done", j
    st = c.get(f"/lorakit/v1/triage/{tid}").json()
    assert st["items"] == 5 and st["decided"] == 0 and st["state"] == "ready"
    nxt = c.get(f"/lorakit/v1/triage/{tid}/next").json()
    first = nxt["item"]
    assert first["idx"] == 0 and nxt["next"]["idx"] == 1 and nxt["remaining"] == 5
    img = c.get(f"/lorakit/v1/triage/{tid}/image/0/lora")
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get(f"/lorakit/v1/triage/{tid}/image/0/baseline").status_code == 200
    assert c.get(f"/lorakit/v1/triage/{tid}/image/99/lora").status_code == 404
    decisions = [
        {"idx": i, "decision": d, "client": "tab", "seq": i} for i, d in enumerate(["yes", "no", "maybe", "no", "yes"])
    ]
    r = c.post(f"/lorakit/v1/triage/{tid}/decisions", json={"decisions": decisions})
    assert r.json()["recorded"] == 5 and r.json()["state"]["counts"] == {"yes": 2, "maybe": 1, "no": 2}
    assert c.post(f"/lorakit/v1/triage/{tid}/decisions", json={"decisions": decisions}).json()["recorded"] == 0
    assert (
        c.post(
            f"/lorakit/v1/triage/{tid}/decisions", json={"decisions": [{"idx": 0, "decision": "perhaps"}]}
        ).status_code
        == 400
    )
    assert c.get(f"/lorakit/v1/triage/{tid}/next").json()["item"] is None
    assert len(c.get(f"/lorakit/v1/triage/{tid}/history").json()) == 5
    md = c.get(f"/lorakit/v1/triage/{tid}/report").text
    assert "| NO | 2 |" in md
    assert c.get(f"/lorakit/v1/triage/{tid}/report?format=csv").text.startswith("lora,file,decision")
    before = {p: sha(p) for p in c.paths}
    items = c.get(f"/lorakit/v1/triage/{tid}/items?filter=no").json()
    no = [it["path"] for it in items]
    assert len(no) == 2 and {it["decision"] for it in items} == {"no"}
    res = c.post(f"/lorakit/v1/triage/{tid}/archive", json={}).json()
    assert res["loras"] == 2 and not any(os.path.exists(p) for p in no)
    assert os.path.dirname(res["batch"]) == os.path.join(os.path.dirname(c.lora_dir), "Lora-archive")
    names = [m["name"] for m in c.get("/lorakit/v1/loras").json()]
    assert not any(os.path.basename(p)[:-12] in n for p in no for n in names)
    assert c.post(f"/lorakit/v1/triage/{tid}/restore", json={"batch": "/etc"}).status_code == 403
    back = c.post(f"/lorakit/v1/triage/{tid}/restore", json={"batch": os.path.basename(res["batch"])}).json()
    assert back["state"] == "restored"
    assert {p: sha(p) for p in c.paths} == before
    r = c.post(f"/lorakit/v1/triage/{tid}/pass").json()
    assert r["pass"] == 2 and r["state"]["decided"] == 0  # a second pass; the first stays in the history
    assert {h["pass"] for h in c.get(f"/lorakit/v1/triage/{tid}/history").json()} == {1}
