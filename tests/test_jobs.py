"""Jobs: bounded inputs refused before queuing, cancel in every phase within a second, a per-job time limit,
jobs kept in the SQLite store across a restart, and a launcher that stops promptly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from factories import write
from helpers import wait_job

from lib_lorakit.synth import make_lora, write_checkpoint

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lib_lorakit.ui.standalone import create_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def folders(tmp_path):
    ckpt, loras = tmp_path / "models" / "Stable-diffusion", tmp_path / "models" / "Lora"
    ckpt.mkdir(parents=True)
    loras.mkdir(parents=True)
    write_checkpoint(str(ckpt / "base.safetensors"), "sdxl", tiny=True, seed=1)
    write(loras, "ink.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    return tmp_path, ckpt, loras


@pytest.fixture
def stuck(monkeypatch):
    """The bake's input checking never ends and ignores cancel (the worst case); released at teardown."""
    import lib_lorakit.bake as engine

    gate = threading.Event()
    entered = threading.Event()
    real = engine.check_lora_values
    stuck_outputs = set()  # bakes writing these names get stuck; dry runs (no output) and others run for real

    def check(plan, *a, **k):
        if not any(name in stuck_outputs for name in [os.path.basename(plan_out) for plan_out in _outputs()]):
            return real(plan, *a, **k)
        entered.set()
        gate.wait(120)

    calls = []

    def _outputs():
        return calls[-1:] if calls else []

    real_bake = engine.bake

    def bake(base, specs, output, *a, **k):
        calls.append(output or "")
        return real_bake(base, specs, output, *a, **k)

    import lib_lorakit.bake.engine as bake_engine

    monkeypatch.setattr(bake_engine, "check_lora_values", check)  # where the engine looks it up
    monkeypatch.setattr(engine, "bake", bake)
    stuck_outputs.add("o.safetensors")
    yield entered
    gate.set()


def _client(folders, data="data"):
    tmp, ckpt, loras = folders
    app, ctx = create_app(str(ckpt), str(loras), data_dir=str(tmp / data))
    return TestClient(app), ctx


BAKE = {"base": "base.safetensors", "output": "o", "loras": [{"name": "ink"}]}


def test_huge_recipe_refused_at_once_with_the_limit(folders):
    c, _ = _client(folders)
    body = {**BAKE, "loras": [{"name": f"l{i}", "strength": 0.5} for i in range(20_000)]}
    t0 = time.perf_counter()
    r = c.post("/lorakit/v1/bake", json=body)
    took = time.perf_counter() - t0
    assert r.status_code == 400, r.text
    assert "20000" in r.json()["message"] and "64" in r.json()["message"]
    assert took < 1.0, took
    assert c.get("/lorakit/v1/jobs").json() == []  # never queued


def test_oversized_body_and_seed_counts_refused(folders):
    from lib_lorakit.errors import RecipeError
    from lib_lorakit.gen.grid import parse_seeds

    c, _ = _client(folders)
    r = c.post(
        "/lorakit/v1/bake", content=b"{" + b" " * (9 * 1024 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "at most" in r.json()["message"]
    with pytest.raises(RecipeError, match="at most 50"):
        parse_seeds("1000000000x")  # refused before a list of a billion seeds is built
    r = c.post(
        "/lorakit/v1/tournaments", json={"candidates": [{"checkpoint": "base.safetensors"}] * 30, "prompts": ["p"] * 5}
    )
    assert r.status_code == 400 and "at most 26" in r.json()["message"]


def test_cancel_while_checking_inputs_answers_within_a_second_and_frees_the_queue(folders, stuck):
    c, _ = _client(folders)
    jid = c.post("/lorakit/v1/bake", json=BAKE).json()["job_id"]
    assert stuck.wait(30)
    t0 = time.perf_counter()
    j = c.delete(f"/lorakit/v1/jobs/{jid}?wait=5").json()
    took = time.perf_counter() - t0
    assert j["state"] == "cancelled", j
    assert took < 1.0, took
    # The queue is free: the next job runs to the end.
    j2 = c.post("/lorakit/v1/bake", json={**BAKE, "dry_run": True, "output": ""}).json()["job_id"]
    assert wait_job(c, j2, timeout=60)["state"] == "done"


def test_cancel_a_queued_job_at_once(folders, stuck):
    c, _ = _client(folders)
    first = c.post("/lorakit/v1/bake", json=BAKE).json()["job_id"]
    assert stuck.wait(30)
    queued = c.post("/lorakit/v1/bake", json={**BAKE, "output": "p"}).json()["job_id"]
    assert c.get(f"/lorakit/v1/jobs/{queued}").json()["state"] == "queued"
    t0 = time.perf_counter()
    assert c.delete(f"/lorakit/v1/jobs/{queued}?wait=5").json()["state"] == "cancelled"
    assert time.perf_counter() - t0 < 1.0
    c.delete(f"/lorakit/v1/jobs/{first}?wait=5")


def test_a_stuck_job_times_out_and_the_next_one_runs(folders, stuck):
    c, ctx = _client(folders)
    ctx.jobs_timeout = 1.0
    jid = c.post("/lorakit/v1/bake", json=BAKE).json()["job_id"]
    nxt = c.post("/lorakit/v1/bake", json={**BAKE, "output": "p"}).json()["job_id"]
    j = wait_job(c, jid, timeout=30)
    assert j["state"] == "error" and "time limit" in j["error"] and "LORAKIT_JOB_TIMEOUT" in j["error"]
    assert c.get(f"/lorakit/v1/jobs/{nxt}").json()["state"] in ("running", "error", "done")  # not held queued


def test_restart_lists_finished_jobs_and_marks_unfinished_ones_interrupted(folders, stuck):
    tmp, _, _ = folders
    c, _ = _client(folders)
    done = c.post("/lorakit/v1/bake", json={**BAKE, "dry_run": True, "output": ""}).json()["job_id"]
    assert wait_job(c, done)["state"] == "done"
    running = c.post("/lorakit/v1/bake", json=BAKE).json()["job_id"]
    assert stuck.wait(30)
    queued = c.post("/lorakit/v1/bake", json={**BAKE, "output": "p"}).json()["job_id"]
    assert c.get(f"/lorakit/v1/jobs/{queued}").json()["state"] == "queued"
    # A new server on the same data folder (the old process is gone as far as the store knows).
    c2, _ = _client(folders)
    jobs = {j["id"]: j for j in c2.get("/lorakit/v1/jobs").json()}
    assert jobs[done]["state"] == "done" and jobs[done]["result"]["report"]["dry_run"] is True
    assert jobs[running]["state"] == "interrupted" and "server stopped" in jobs[running]["error"]
    assert jobs[queued]["state"] == "interrupted"
    assert c2.get(f"/lorakit/v1/jobs/{running}").json()["state"] == "interrupted"


def test_no_jobs_no_database(folders):
    tmp, _, _ = folders
    c, _ = _client(folders)
    assert c.get("/lorakit/v1/jobs").json() == []
    assert not (tmp / "data" / "lorakit.db").exists()  # opening lorakit leaves nothing behind


LAUNCH = """
import sys, threading
import lib_lorakit.bake as engine
engine.check_lora_values = lambda *a, **k: threading.Event().wait()  # a job that never ends, deaf to cancel
from lib_lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_launcher_exits_within_5_s_of_sigterm_with_a_stuck_job(folders):
    import socket

    tmp, ckpt, loras = folders
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "ui",
            "--models-dir",
            str(ckpt),
            "--loras-dir",
            str(loras),
            "--port",
            str(port),
            "--data-dir",
            str(tmp / "data"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "http://" in p.stdout.readline()
        url = f"http://127.0.0.1:{port}/lorakit/v1"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/jobs", timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        req = urllib.request.Request(
            url + "/bake", data=json.dumps(BAKE).encode(), headers={"content-type": "application/json"}
        )
        jid = json.load(urllib.request.urlopen(req, timeout=30))["job_id"]
        for _ in range(200):
            if json.load(urllib.request.urlopen(f"{url}/jobs/{jid}", timeout=5))["state"] == "running":
                break
            time.sleep(0.05)
        time.sleep(0.3)
        t0 = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        took = time.perf_counter() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert took < 5.0, took
