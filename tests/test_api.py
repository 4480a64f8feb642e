"""The /lorakit/v1 API on the standalone app: bake jobs, auth, path refusal, cancel, concurrency."""

import os
import time

import pytest
import torch
from factories import write
from helpers import wait_job

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lib_lorakit.synth import make_lora, write_checkpoint  # noqa: E402
from lib_lorakit.ui.standalone import create_app  # noqa: E402


@pytest.fixture
def folders(tmp_path):
    ckpt = tmp_path / "models" / "Stable-diffusion"
    loras = tmp_path / "models" / "Lora"
    ckpt.mkdir(parents=True)
    (loras / "styles").mkdir(parents=True)
    write_checkpoint(str(ckpt / "base-xl.safetensors"), "sdxl", tiny=True, seed=1)
    write(loras / "styles", "ink.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    write(loras, "detail.safetensors", make_lora("sdxl", "lokr", seed=3, conv=False))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write(outside, "secret.safetensors", make_lora("sdxl", "lora", seed=4, conv=False))
    return tmp_path, ckpt, loras, outside


@pytest.fixture
def client(folders):
    _, ckpt, loras, _ = folders
    app, service = create_app(str(ckpt), str(loras))
    with TestClient(app) as c:
        c.service = service
        yield c


def models_in(folder) -> list[str]:
    """The folder's files, lorakit's data folder aside (the jobs are kept in .lorakit/lorakit.db)."""
    return sorted(n for n in os.listdir(folder) if n != ".lorakit")


def wait(c, job_id, timeout=60, auth=None):
    return wait_job(c, job_id, timeout=timeout, auth=auth)


def test_bake_job_end_to_end(client, folders):
    _, ckpt, _, _ = folders
    r = client.post(
        "/lorakit/v1/bake",
        json={
            "base": "base-xl.safetensors",
            "output": "baked",
            "loras": [
                {"name": "ink", "strength": 0.8, "te_strength": 0.4},
                {"name": "detail", "strength": 0.5, "blocks": "INALL"},
            ],
        },
    )
    assert r.status_code == 200, r.text
    j = wait(client, r.json()["job_id"])
    assert j["state"] == "done", j
    assert j["progress"] == 1.0 and j["result"]["checkpoint"] == "baked.safetensors"
    rep = j["result"]["report"]
    assert [lo["name"] for lo in rep["loras"]] == ["ink", "detail"] and rep["loras"][1]["blocks"].startswith("1,")
    assert os.path.exists(ckpt / "baked.safetensors")
    names = [m["name"] for m in client.get("/lorakit/v1/checkpoints").json()]
    assert "baked.safetensors" in names  # the list is fresh
    assert client.get("/lorakit/v1/jobs").json()[0]["id"] == j["id"]


def test_prompt_tags_and_dry_run(client, folders):
    r = client.post(
        "/lorakit/v1/bake",
        json={"base": "base-xl", "prompt": "a cat <lora:ink:0.5:0.7> <lyco:detail:1>", "dry_run": True},
    )
    j = wait(client, r.json()["job_id"])
    assert j["state"] == "done" and j["result"]["output"] is None
    lo = j["result"]["report"]["loras"]
    assert (lo[0]["strength"], lo[0]["te_strength"]) == (0.7, 0.5)  # <lora:name:TE:UNET>, as the WebUI reads it


@pytest.mark.parametrize(
    "field,value,status,kind",
    [
        ("base", "/etc/passwd", 403, "PathRefused"),
        ("base", "../../../etc/passwd", 400, "BadPath"),
        ("lora", "OUTSIDE", 403, "PathRefused"),
        ("lora", "styles/../../elsewhere/secret", 400, "BadPath"),
        ("lora", "SYMLINK", 403, "PathRefused"),
        ("lora", "inky", 404, "NotFound"),
        ("output", "../escape", 400, "BadPath"),
        ("output", "/tmp/abs", 400, "BadPath"),
    ],
)
def test_paths_outside_the_model_folders_are_refused(client, folders, field, value, status, kind):
    tmp, ckpt, loras, outside = folders
    if value == "OUTSIDE":
        value = str(outside / "secret.safetensors")
    if value == "SYMLINK":
        os.symlink(outside / "secret.safetensors", loras / "sneaky.safetensors")
        value = "sneaky"
    body = {"base": "base-xl", "output": "out", "loras": [{"name": "ink"}]}
    if field == "lora":
        body["loras"] = [{"name": value}]
    else:
        body[field] = value
    r = client.post("/lorakit/v1/bake", json=body)
    assert r.status_code == status, r.text
    j = r.json()
    assert j["error"] == kind and j["message"] and "Traceback" not in r.text
    if kind == "NotFound":
        assert "Did you mean 'styles/ink'" in j["message"]
    assert models_in(ckpt) == ["base-xl.safetensors"]


def test_bad_recipe_is_a_400_json(client):
    r = client.post(
        "/lorakit/v1/bake", json={"base": "base-xl", "output": "o", "loras": [{"name": "ink", "blocks": "1,2"}]}
    )
    assert r.status_code == 200  # block weights are checked when the job plans
    j = wait(client, r.json()["job_id"])
    assert j["state"] == "error" and "takes 12 or 20" in j["error"]
    r = client.post("/lorakit/v1/bake", json={"base": "base-xl", "output": "o", "loras": []})
    assert r.status_code == 400 and r.json()["error"] == "RecipeError"
    r = client.post("/lorakit/v1/bake", json={"output": "o"})
    assert r.status_code == 400 and r.json()["error"] == "RequestInvalid"  # schema validation: the documented body
    assert "base: required" in r.json()["message"]
    assert client.get("/lorakit/v1/jobs/nope").status_code == 404


def test_cancel_leaves_no_debris(client, folders):
    _, ckpt, _, _ = folders
    svc = client.service
    with svc.host.queue_lock():  # hold the host queue so the job waits, then cancel it
        r = client.post("/lorakit/v1/bake", json={"base": "base-xl", "output": "c", "loras": [{"name": "ink"}]})
        jid = r.json()["job_id"]
        assert client.get(f"/lorakit/v1/jobs/{jid}").json()["state"] == "queued"
        j = client.delete(f"/lorakit/v1/jobs/{jid}", params={"wait": 0}).json()
        assert j["state"] == "cancelled"  # a queued job is cancelled at once, before the queue frees
    j = wait(client, jid)
    assert j["state"] == "cancelled"
    assert models_in(ckpt) == ["base-xl.safetensors"]


def test_cancel_while_running(client, folders, monkeypatch):
    _, ckpt, _, _ = folders
    import lib_lorakit.bake.engine as bk

    started = []
    real = bk.check_lora_values

    def slow_check(plan, progress=None, cancel=None):
        started.append(1)
        while not cancel.is_set():  # the job is running: hold it until cancelled
            time.sleep(0.01)
        return real(plan, cancel=cancel)

    monkeypatch.setattr(bk, "check_lora_values", slow_check)
    jid = client.post("/lorakit/v1/bake", json={"base": "base-xl", "output": "r", "loras": [{"name": "ink"}]}).json()[
        "job_id"
    ]
    t = time.time()
    while not started and time.time() - t < 20:
        time.sleep(0.01)
    assert client.get(f"/lorakit/v1/jobs/{jid}").json()["state"] == "running"
    j = client.delete(f"/lorakit/v1/jobs/{jid}").json()
    assert j["state"] == "cancelled" and "nothing was written" in j["error"]
    assert models_in(ckpt) == ["base-xl.safetensors"]


def test_concurrent_jobs_are_serialised_and_all_finish(client, folders):
    _, ckpt, _, _ = folders
    ids = [
        client.post(
            "/lorakit/v1/bake",
            json={"base": "base-xl", "output": f"c{i}", "loras": [{"name": "ink", "strength": 0.1 * (i + 1)}]},
        ).json()["job_id"]
        for i in range(3)
    ]
    jobs = [wait(client, i) for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 3
    spans = sorted((j["started"], j["finished"]) for j in jobs)
    assert all(a[1] <= b[0] + 1e-3 for a, b in zip(spans, spans[1:]))  # one at a time under the queue lock
    assert models_in(ckpt) == ["base-xl.safetensors", "c0.safetensors", "c1.safetensors", "c2.safetensors"]


def test_same_output_twice_second_is_refused(client, folders):
    body = {"base": "base-xl", "output": "twice", "loras": [{"name": "ink"}]}
    assert wait(client, client.post("/lorakit/v1/bake", json=body).json()["job_id"])["state"] == "done"
    r = client.post("/lorakit/v1/bake", json=body)
    assert r.status_code == 400 and "already exists" in r.json()["message"]


def test_auth_required_when_configured(folders):
    _, ckpt, loras, _ = folders
    app, _ = create_app(str(ckpt), str(loras), api_auth="alice:s3cret,bob:pw")
    with TestClient(app) as c:
        assert c.get("/lorakit/v1/jobs").status_code == 401
        assert c.get("/lorakit/v1/jobs", auth=("alice", "wrong")).status_code == 401
        assert c.get("/lorakit/v1/jobs", auth=("alice", "s3cret")).status_code == 200
        r = c.post(
            "/lorakit/v1/bake", auth=("bob", "pw"), json={"base": "base-xl", "output": "a", "loras": [{"name": "ink"}]}
        )
        assert r.status_code == 200
        assert wait(c, r.json()["job_id"], auth=("bob", "pw"))["state"] == "done"


def test_routes_are_documented(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/lorakit/v1/bake", "/lorakit/v1/jobs", "/lorakit/v1/jobs/{job_id}"} <= set(paths)
    assert "delete" in paths["/lorakit/v1/jobs/{job_id}"]
    schemas = spec["components"]["schemas"]
    assert "BakeRequest" in schemas and "strength" in schemas["LoraEntry"]["properties"]
    _ = torch


def test_txt2img_is_not_available_standalone(client):
    r = client.post("/lorakit/v1/txt2img", json={"prompt": "a cat", "steps": 2})
    assert r.status_code == 501 and r.json()["error"] == "NotSupported" and "WebUI" in r.json()["message"]
    r = client.post("/lorakit/v1/txt2img", json={"prompt": "a cat", "checkpoint": "/etc/passwd"})
    assert r.status_code == 403


def test_merge_and_diff_routes(client, folders):
    tmp, ckpt, loras, outside = folders
    write_checkpoint(str(ckpt / "other-xl.safetensors"), "sdxl", tiny=True, seed=9)
    vae_dir = tmp / "models" / "VAE"
    vae_dir.mkdir()
    import safetensors.torch

    sd = safetensors.torch.load_file(str(ckpt / "other-xl.safetensors"))
    write(
        vae_dir,
        "fix.vae.safetensors",
        {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")},
    )
    r = client.post(
        "/lorakit/v1/merge",
        json={
            "models": [{"name": "base-xl.safetensors", "weight": 0.7}, {"name": "other-xl", "weight": 0.3}],
            "output": "mixed",
            "vae_from": "fix.vae",
            "blocks": "IN04=0",
        },
    )
    assert r.status_code == 200, r.text
    j = wait(client, r.json()["job_id"])
    assert j["state"] == "done", j
    rep = j["result"]["report"]
    assert j["result"]["checkpoint"] == "mixed.safetensors" and rep["vae_from"] == "fix.vae (VAE file)"
    out = safetensors.torch.load_file(str(ckpt / "mixed.safetensors"))
    k = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(out[k], sd[k])
    r = client.post("/lorakit/v1/diff", json={"a": "base-xl.safetensors", "b": "mixed.safetensors"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["arch"] == "sdxl" and d["by_block"]["unet"]["IN04"]["rel_change"] == 0.0
    assert d["by_block"]["unet"]["IN05"]["rel_change"] > 0
    r = client.post(
        "/lorakit/v1/merge",
        json={"models": [{"name": "base-xl"}, {"name": str(outside / "secret.safetensors")}], "output": "x"},
    )
    assert r.status_code == 403
    r = client.post("/lorakit/v1/merge", json={"models": [{"name": "base-xl"}], "output": "x", "method": "magic"})
    assert r.status_code == 400 and "Unknown merge method" in r.json()["message"]
