"""The txt2img Script "lorakit: LoRA strength grid" against a fake `modules` package (A1111 and Forge)."""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
from fake_gen import FakeBackend, decode
from fake_webui import install

from lib_lorakit import host as host_pkg
from lib_lorakit.gen.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["a1111", "forge"])
def webui(request, tmp_path, monkeypatch):
    fake = install(monkeypatch, str(tmp_path), request.param)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):
        if name in ("backend", "modules_forge"):
            return object() if name in sys.modules else None
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    models = os.path.join(str(tmp_path), "models")
    with open(os.path.join(models, "Stable-diffusion", "base.safetensors"), "wb") as f:
        f.write(b"x")
    for n in ("styleA", "burnD"):
        with open(os.path.join(models, "Lora", f"{n}.safetensors"), "wb") as f:
            f.write(b"x")
    fake.shared.opts.sd_model_checkpoint = "base.safetensors"
    gen = FakeBackend(
        os.path.join(models, "Stable-diffusion"),
        os.path.join(models, "Lora"),
        {"styleA": "healthy", "burnD": "overfit"},
    )
    gen.loaded = "base"

    def process_images(p):  # the host's processing, drawing with the deterministic fake
        fake.processing.calls.append((p, fake.call_queue.queue_lock.locked()))
        out = gen.txt2img({"prompt": p.prompt, "seed": p.seed, "checkpoint": gen.checkpoints()[0].name})
        return fake.processing.Processed(p, [out.image], p.seed, out.infotext, infotexts=[out.infotext])

    fake.processing.process_images = process_images
    host_pkg.reset()
    yield fake, tmp_path
    host_pkg.reset()


def load_script_class():
    """As the WebUI does: import scripts/lorakit_grid.py and take its Script subclasses."""
    spec = importlib.util.spec_from_file_location(
        "lorakit_grid_script", os.path.join(ROOT, "scripts", "lorakit_grid.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = sys.modules["modules.scripts"].Script
    found = [v for v in module.__dict__.values() if isinstance(v, type) and issubclass(v, base) and v is not base]
    assert len(found) == 1
    return found[0]


def processing_object(**kw):
    p = types.SimpleNamespace(
        prompt="a castle, <lora:styleA:0.8>, night",
        negative_prompt="blurry",
        seed=5,
        steps=4,
        cfg_scale=6.0,
        width=64,
        height=64,
        sampler_name="Euler",
        scheduler="Automatic",
        batch_size=1,
        n_iter=1,
        subseed_strength=0,
        outpath_grids="/tmp/grids",
        override_settings={},
        do_not_save_grid=False,
        do_not_save_samples=False,
    )
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_script_registers_and_builds_its_ui(webui):
    cls = load_script_class()
    s = cls()
    assert s.title() == "lorakit: LoRA strength grid"
    assert s.show(False) and not s.show(True)
    import gradio as gr

    with gr.Blocks():
        comps = s.ui(False)
    assert len(comps) == 6  # loras, strengths, epochs, seeds, return_images, use_profile
    assert sorted(comps[0].choices if isinstance(comps[0].choices[0], str) else [c[0] for c in comps[0].choices]) == [
        "burnD",
        "styleA",
    ]


def test_script_run_makes_the_grid_from_the_users_prompt(webui):
    fake, tmp = webui
    s = load_script_class()()
    p = processing_object()
    processed = s.run(p, ["styleA", "burnD"], "0-1.5:0.5", False, "5, 6", True)
    calls = [c for c, _ in fake.processing.calls]
    assert len(calls) == 2 + 2 * 3 * 2  # baselines per seed + rows x strengths x seeds
    assert not any(locked for _, locked in fake.processing.calls)  # the WebUI's txt2img already holds the queue
    prompts = {c.prompt for c in calls}
    assert "a castle, night" in prompts and "a castle, night, <lora:burnD:1.5>" in prompts
    assert all(c.negative_prompt == "blurry" and c.steps == 4 and c.width == 64 for c in calls)
    assert {c.seed for c in calls} == {5, 6} and p.prompt == "a castle, <lora:styleA:0.8>, night"  # p untouched
    grid, *images = processed.images
    assert len(images) == len(calls) and grid.size[0] > 4 * 64
    assert "styleA: healthy" in processed.infotexts[0] and "burnD: overfit" in processed.infotexts[0]
    run_dir = processed.infotexts[0].split("run folder ")[1].splitlines()[0]
    assert run_dir.startswith(os.path.join(str(tmp), "outputs", "lorakit", "grid"))
    run = Run(run_dir)
    res = run.results()
    for c in run.cells:
        assert decode(run.load_image(res[c.key])) == (c.seed, c.strength or 0.0)
    assert fake.images.saved and fake.images.saved[0][2] == "lorakit_grid"


def test_script_args_from_the_api_defaults(webui):
    """script_args may be short (older clients) or carry names as one string; empty LoRAs: the prompt's tags."""
    fake, _ = webui
    s = load_script_class()()
    processed = s.run(processing_object(seed=-1), "", "0, 1")
    rows = [ln.split(":")[0] for ln in processed.infotexts[0].splitlines()[1:] if not ln.startswith("note")]
    assert rows == ["styleA"]
    seeds = {c.seed for c, _ in fake.processing.calls}
    assert len(seeds) == 1 and -1 not in seeds  # a random seed, fixed for the whole grid


def test_grid_route_runs_a_job_through_the_host(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.api import build_router
    from lib_lorakit.ops import HostContext

    fake, tmp = webui
    app = FastAPI()
    app.include_router(build_router(HostContext(host_pkg.get_host())))
    with TestClient(app) as c:
        r = c.post("/lorakit/v1/grid", json={"loras": ["stylA"], "prompt": "a castle"})
        assert r.status_code == 404 and "styleA" in r.json()["message"]
        r = c.post(
            "/lorakit/v1/grid",
            json={
                "loras": ["styleA"],
                "prompt": "a castle",
                "strengths": "0, 0.75, 1.5",
                "seeds": "2x",
                "width": 64,
                "height": 64,
                "steps": 3,
            },
        )
        assert r.status_code == 200, r.text
        import time

        for _ in range(400):
            j = c.get(f"/lorakit/v1/jobs/{r.json()['job_id']}").json()
            if j["state"] in ("done", "error", "cancelled"):
                break
            time.sleep(0.05)
    assert j["state"] == "done", j
    res = j["result"]
    assert res["verdicts"]["styleA"]["case"] == "healthy" and os.path.isfile(res["grid"])
    assert res["record"]["ok"] == 2 + 2 * 2
    # each image went through the host's txt2img under its queue lock, one at a time
    assert all(locked for _, locked in fake.processing.calls)


def test_grid_route_on_the_standalone_launcher_says_why_not(tmp_path):
    from fastapi.testclient import TestClient

    from lib_lorakit.ui.standalone import create_app

    (tmp_path / "ck").mkdir()
    (tmp_path / "lo").mkdir()
    app, _ = create_app(str(tmp_path / "ck"), str(tmp_path / "lo"))
    with TestClient(app) as c:
        r = c.post("/lorakit/v1/grid", json={"loras": ["x"], "prompt": "a castle"})
    assert r.status_code == 501 and "autotest with a WebUI URL" in r.json()["message"]
