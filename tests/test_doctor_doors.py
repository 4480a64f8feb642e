"""The bake doctor through its doors: the command line over a WebUI's HTTP API (a loopback server
rendering from the weights), and the /lorakit/v1/doctor routes as jobs (cancel included)."""

from __future__ import annotations

import json
import os
import threading

import pytest
from factories import tiny_checkpoint, tiny_lora
from fake_render import WeightRenderer
from fake_sdapi import FakeWebUI
from helpers import wait_job

from lib_lorakit.cli import main
from lib_lorakit.errors import LorakitError
from lib_lorakit.ops import LocalContext
from lib_lorakit.ops import bake as bake_op
from lib_lorakit.ops import doctor as doctor_op
from lib_lorakit.ops.model import RequestInvalid
from lib_lorakit.tempfiles import SCRATCH


@pytest.fixture
def webui(tmp_path):
    ck, lo = tmp_path / "Stable-diffusion", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    base = tiny_checkpoint(ck, "sd15", name="base.safetensors")
    a = tiny_lora(lo, "sd15", "lora", name="styleA.safetensors", seed=1, std=0.2)
    b = tiny_lora(lo, "sd15", "lokr", name="styleB.safetensors", seed=3, std=0.2)
    # baked by lorakit's own bake operation: its recipe (and base) are recorded in the file
    ctx = LocalContext(str(tmp_path / "data"))
    bake_op.bake(
        ctx,
        {
            "base": base,
            "output": str(ck / "baked.safetensors"),
            "loras": [{"name": a, "strength": 0.6}, {"name": b, "strength": 0.5, "te_strength": 0.2}],
        },
    )
    fake = WeightRenderer(str(ck), str(lo))
    srv = FakeWebUI(fake)
    yield srv, fake, tmp_path, str(ck), str(lo)
    srv.close()


SMALL = "--prompt,a cat,--prompt,a lake,--seeds,1 2,--steps,3,--width,64,--height,64".split(",")


def test_cli_parity_reads_the_recipe_from_the_bake(webui, capsys):
    srv, fake, tmp, ck, lo = webui
    out = str(tmp / "runs")
    code = main(["doctor", "parity", os.path.join(ck, "baked.safetensors"), "--webui", srv.url, "--out", out, *SMALL])
    cap = capsys.readouterr()
    text = cap.out
    assert code == 0, cap.err
    assert "Verdict: IDENTICAL" in text or "Verdict: EQUIVALENT" in text
    # what the WebUI was asked: the recipe's tags at runtime (TE strength first), none on the baked model
    prompts = [c["prompt"] for c in fake.calls]
    assert "a cat <lora:styleA:0.6> <lora:styleB:0.2:0.5>" in prompts
    baked_calls = [c for c in fake.calls if "baked" in c["checkpoint"]]
    assert baked_calls and all("<lora:" not in c["prompt"] for c in baked_calls)
    assert {c["steps"] for c in fake.calls} == {3} and {c["width"] for c in fake.calls} == {64}
    run_dir = text.split("Run folder: ")[1].splitlines()[0]
    with open(os.path.join(run_dir, "doctor.json")) as f:
        rep = json.load(f)
    assert rep["profile"]["profile"] == "sd15" and rep["settings"]["steps"] == 3
    assert sorted(os.listdir(run_dir)) == [
        "doctor.json",
        "images",
        "manifest.jsonl",
        "plan.json",
        "run.json",
        "sheet-p1.png",
        "sheet-p2.png",
    ]


def test_cli_parity_exits_4_on_a_failing_verdict_and_diagnose_names_the_cause(webui, capsys):
    srv, fake, tmp, ck, lo = webui
    out = str(tmp / "runs")
    baked = os.path.join(ck, "baked.safetensors")
    # the runtime recipe the user actually runs: styleB's text encoder at 0.5, not the 0.2 baked
    recipe = [
        "--lora",
        os.path.join(lo, "styleA.safetensors") + ":0.6",
        "--lora",
        os.path.join(lo, "styleB.safetensors") + ":0.5",
    ]
    code = main(["doctor", "parity", baked, "--webui", srv.url, "--out", out, *recipe, *SMALL, "--cfg-scale", "12"])
    text = capsys.readouterr().out
    assert code == 4, text
    assert "styleB: text-encoder strength 0.2 in the bake, 0.5 at runtime" in text
    code = main(
        [
            "doctor",
            "diagnose",
            baked,
            "--webui",
            srv.url,
            "--out",
            out,
            *recipe,
            *SMALL,
            "--cfg-scale",
            "12",
            "--variants",
            "rebake",
        ]
    )
    text = capsys.readouterr().out
    assert code == 4, text
    assert "Cause(s):" in text and "Bake again with styleB's text-encoder strength at 0.5" in text
    assert not [n for n in os.listdir(ck) if n.startswith(SCRATCH)]


def test_cli_bad_input_is_a_clear_error(webui, capsys):
    srv, fake, tmp, ck, lo = webui
    base = os.path.join(ck, "base.safetensors")
    assert main(["doctor", "parity", base, "--webui", srv.url]) == 2
    err = capsys.readouterr().err
    assert "does not record the base" in err and "Name the base checkpoint" in err
    assert main(["doctor", "parity", base, "--base", base, "--webui", srv.url]) == 2
    assert "same file" in capsys.readouterr().err
    code = main(["doctor", "diagnose", os.path.join(ck, "baked.safetensors"), "--webui", srv.url, "--variants", "fp64"])
    assert code == 2 and "Unknown variant 'fp64'" in capsys.readouterr().err


def test_request_bounds():
    with pytest.raises(RequestInvalid):
        doctor_op.ParityRequest.parse({"baked": "x", "steps": 0})
    with pytest.raises(RequestInvalid):
        doctor_op.DiagnoseRequest.parse({"baked": "x", "surprise": 1})
    with pytest.raises(RequestInvalid, match="prompts"):
        doctor_op.ParityRequest.parse({"baked": "x", "prompts": ["p"] * 21})


# --- the API (standalone app, generation through the weight renderer) ---------------------------


@pytest.fixture
def api(webui):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lib_lorakit.ui.standalone import create_app

    srv, fake, tmp, ck, lo = webui
    app, service = create_app(ck, lo, data_dir=str(tmp / "data"))
    service.backend = lambda what, fix="": fake  # a host that renders
    with TestClient(app) as c:
        yield c, fake, ck


def test_api_parity_and_diagnose_jobs(api):
    c, fake, ck = api
    body = {"baked": "baked.safetensors", "prompts": ["a cat"], "seeds": [1, 2], "width": 64, "height": 64, "steps": 3}
    r = c.post("/lorakit/v1/doctor/parity", json=body)
    assert r.status_code == 200, r.text
    j = wait_job(c, r.json()["job_id"])
    assert j["state"] == "done", j
    assert j["result"]["parity"]["overall"]["verdict"] in ("identical", "equivalent")
    assert os.path.exists(j["result"]["sheets"][0]) and "Verdict:" in j["result"]["summary"]
    r = c.post("/lorakit/v1/doctor/diagnose", json={**body, "variants": ["fp32", "cfg"]})
    j = wait_job(c, r.json()["job_id"])
    assert j["state"] == "done", j
    assert [v["id"] for v in j["result"]["variants"]] == ["fp32", "cfg"]
    assert not [n for n in os.listdir(ck) if n.startswith(SCRATCH)]
    bad = c.post("/lorakit/v1/doctor/parity", json={"baked": "nope.safetensors"})
    assert bad.status_code == 404 and "nope" in bad.json()["message"]
    assert (
        c.post("/lorakit/v1/doctor/diagnose", json={"baked": "baked.safetensors", "scratch_dir": "/tmp"}).status_code
        == 400
    )


def test_api_cancel_removes_the_scratch_bakes(api):
    c, fake, ck = api
    gate, seen = threading.Event(), []

    def hook(n):  # hold the job while a variant bake is on disk, until the test has cancelled it
        scratch = [x for x in os.listdir(ck) if x.startswith(SCRATCH)]
        if scratch and os.listdir(os.path.join(ck, scratch[0])) and not seen:
            seen.append(scratch[0])
            gate.wait(20)

    fake.on_call = hook
    body = {"baked": "baked.safetensors", "prompts": ["a cat"], "seeds": [1], "width": 64, "height": 64}
    jid = c.post("/lorakit/v1/doctor/diagnose", json={**body, "variants": ["rebake", "fp32"]}).json()["job_id"]
    for _ in range(400):
        if seen:
            break
        threading.Event().wait(0.05)
    assert seen, "the variant bake never reached the renderer"
    r = c.delete(f"/lorakit/v1/jobs/{jid}", params={"wait": 0})
    gate.set()
    j = wait_job(c, jid)
    assert r.status_code == 200 and j["state"] == "cancelled", j
    for _ in range(100):  # the job's thread removes the folder as it unwinds
        if not [n for n in os.listdir(ck) if n.startswith(SCRATCH)]:
            break
        threading.Event().wait(0.05)
    assert not [n for n in os.listdir(ck) if n.startswith(SCRATCH)]


def test_doctor_errors_are_lorakit_errors(webui):
    srv, fake, tmp, ck, lo = webui
    ctx = LocalContext(str(tmp / "data"), webui=srv.url)
    with pytest.raises(LorakitError, match="block weights"):
        doctor_op.parity(
            ctx,
            {
                "baked": os.path.join(ck, "baked.safetensors"),
                "loras": [{"name": os.path.join(lo, "styleA.safetensors"), "blocks": "INALL"}],
            },
        )
