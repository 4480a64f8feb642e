"""The WebUI host adapter against a fake `modules` package, for A1111 and Forge."""

import importlib.util
import os
import sys
import threading

import pytest
from factories import write
from fake_webui import install

from lib_lorakit import host as host_pkg
from lib_lorakit.synth import make_lora, write_checkpoint

FLAVOURS = ["a1111", "forge"]


@pytest.fixture(params=FLAVOURS)
def webui(request, tmp_path, monkeypatch):
    fake = install(monkeypatch, str(tmp_path), request.param)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **k):  # the fake Forge packages are only in sys.modules
        if name in ("backend", "modules_forge"):
            return object() if name in sys.modules else None
        return real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    host_pkg.reset()
    yield request.param, fake, tmp_path
    host_pkg.reset()


def test_flavour_is_detected_once(webui):
    flavour, _, _ = webui
    assert host_pkg.detect_flavour() == flavour
    assert host_pkg.get_host() is host_pkg.get_host() and host_pkg.get_host().flavour == flavour


def test_folders_and_fresh_lists(webui):
    flavour, fake, tmp = webui
    h = host_pkg.get_host()
    ckdir = os.path.join(tmp, "models", "Stable-diffusion")
    write_checkpoint(os.path.join(ckdir, "a.safetensors"), "sd15", tiny=True)
    fake.sd_models.list_models()
    os.makedirs(os.path.join(ckdir, "sub"))
    write_checkpoint(os.path.join(ckdir, "sub", "late.safetensors"), "sd15", tiny=True)  # added after start-up
    names = {e.name: e for e in h.list_checkpoints()}
    assert set(names) == {"a.safetensors", "sub/late.safetensors"}
    title = next(iter(fake.sd_models.checkpoints_list))
    assert title in names["a.safetensors"].aliases  # the host's own title resolves too
    assert h.checkpoint_dirs() == [ckdir] and h.lora_dirs()[0] == os.path.join(tmp, "models", "Lora")
    write(os.path.join(tmp, "models", "Lora"), "ink.safetensors", make_lora("sd15", conv=False))
    assert [e.name for e in h.list_loras()] == ["ink"]
    os.makedirs(os.path.join(tmp, "models", "LyCORIS"))
    assert h.lora_dirs()[-1].endswith("LyCORIS")
    assert h.data_dir() == os.path.join(str(tmp), "lorakit")
    h.refresh_checkpoints()
    assert any(ci.name == "sub/late.safetensors" for ci in fake.sd_models.checkpoints_list.values())
    h.refresh_loras()
    assert fake.ui_extra_networks.extra_pages[0].refreshed == 1


def test_job_state_progress_and_interrupt(webui):
    _, fake, _ = webui
    h = host_pkg.get_host()
    h.job_begin("lorakit: bake")
    h.job_progress(0.25, "baking x")
    st = fake.shared.state
    assert (
        st.job == "lorakit: bake"
        and st.sampling_step == 250
        and st.sampling_steps == 1000
        and st.textinfo == "baking x"
    )
    assert not h.interrupted()
    st.interrupt()  # the WebUI's Interrupt button / POST /sdapi/v1/interrupt
    assert h.interrupted()
    h.job_end()
    assert st.log[-1] == ("end", "lorakit: bake")


def test_settings_with_defaults(webui):
    _, fake, _ = webui
    h = host_pkg.get_host()
    assert h.setting("lorakit_save_dtype", "fp16") == "fp16"
    fake.shared.opts.lorakit_save_dtype = "bf16"
    assert h.setting("lorakit_save_dtype", "fp16") == "bf16"


def test_txt2img_uses_host_processing_under_the_queue_lock(webui):
    _, fake, tmp = webui
    ckdir = os.path.join(tmp, "models", "Stable-diffusion")
    write_checkpoint(os.path.join(ckdir, "m.safetensors"), "sd15", tiny=True)
    h = host_pkg.get_host()
    out = h.txt2img(
        {
            "prompt": "a cat",
            "negative_prompt": "dog",
            "seed": 7,
            "sampler_name": "Euler",
            "scheduler": "Karras",
            "steps": 3,
            "cfg_scale": 5,
            "width": 64,
            "height": 64,
            "checkpoint": "m.safetensors",
        }
    )
    p, locked = fake.processing.calls[-1]
    assert locked and p.closed
    assert p.override_settings["sd_model_checkpoint"].startswith("m.safetensors [")  # the host's title
    assert p.override_settings_restore_afterwards is True
    assert (p.prompt, p.negative_prompt, p.seed, p.steps, p.cfg_scale, p.width, p.scheduler) == (
        "a cat",
        "dog",
        7,
        3,
        5.0,
        64,
        "Karras",
    )
    assert out["images"][0].size == (64, 64) and "Seed: 7" in out["infotexts"][0]
    assert ("begin", "lorakit: txt2img") in fake.shared.state.log
    assert "CLIP_stop_at_last_layers" not in p.override_settings  # not asked for: the host's own setting
    h.txt2img({"prompt": "a cat", "seed": 7, "width": 64, "height": 64, "checkpoint": "m.safetensors", "clip_skip": 2})
    assert fake.processing.calls[-1][0].override_settings["CLIP_stop_at_last_layers"] == 2  # a profile's clip skip


def test_extension_registers_tab_settings_routes_and_cleans_up(webui):
    pytest.importorskip("gradio")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.host import extension

    _, fake, tmp = webui
    extension._state.update(service=None, app=None)
    extension.register()
    reg = fake.script_callbacks.registered
    assert set(reg) == {"on_ui_tabs", "on_ui_settings", "on_app_started", "on_script_unloaded"}
    reg["on_ui_settings"][0]()
    assert {"lorakit_save_dtype", "lorakit_output_subdir"} <= set(fake.shared.opts.data_labels)
    assert fake.shared.opts.data_labels["lorakit_save_dtype"].section == ("lorakit", "lorakit")
    tabs = reg["on_ui_tabs"][0]()
    assert tabs[0][1:] == ("lorakit", "lorakit")
    app = FastAPI()
    reg["on_app_started"][0](None, app)
    reg["on_app_started"][0](None, app)  # a UI reload: no doubled routes
    routes = [(r.path, tuple(sorted(r.methods))) for r in app.router.routes if r.path.startswith("/lorakit/v1")]
    from lib_lorakit.api import build_router

    expected = {(r.path, tuple(sorted(r.methods))) for r in build_router(extension._state["service"]).routes}
    assert len(routes) == len(set(routes)) == len(expected) >= 12 and set(routes) == expected
    assert ("/lorakit/v1/bake", ("POST",)) in routes and ("/lorakit/v1/inspect", ("GET",)) in routes
    with TestClient(app) as c:
        assert c.get("/lorakit/v1/jobs").json() == []
    reg["on_script_unloaded"][0]()
    assert not [r for r in app.router.routes if r.path.startswith("/lorakit/v1")]


def test_api_auth_follows_the_webui_option(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.host import extension

    _, fake, _ = webui
    fake.shared.cmd_opts.api_auth = "me:pw"
    extension._state.update(service=None, app=None)
    app = FastAPI()
    extension.on_app_started(None, app)
    with TestClient(app) as c:
        assert c.get("/lorakit/v1/jobs").status_code == 401
        assert c.get("/lorakit/v1/jobs", auth=("me", "pw")).status_code == 200


def test_bake_through_the_host_refreshes_its_list(webui):
    _, fake, tmp = webui
    from lib_lorakit.ops import HostContext, bake

    ckdir = os.path.join(tmp, "models", "Stable-diffusion")
    write_checkpoint(os.path.join(ckdir, "base.safetensors"), "sdxl", tiny=True)
    write(os.path.join(tmp, "models", "Lora"), "ink.safetensors", make_lora("sdxl", conv=False))
    fake.sd_models.list_models()
    svc = HostContext(host_pkg.get_host())
    before = fake.sd_models.list_calls
    job = bake.start(svc, {"base": "base.safetensors", "output": "baked", "loras": [{"name": "ink", "strength": 0.5}]})
    assert job.wait(60) and job.state == "done", job.error
    assert fake.sd_models.list_calls > before
    assert job.result["checkpoint"] == "baked.safetensors"
    assert any(ci.name == "baked.safetensors" for ci in fake.sd_models.checkpoints_list.values())
    st = fake.shared.state
    assert ("begin", "lorakit: bake") in st.log and st.log[-1] == ("end", "lorakit: bake")


def test_webui_interrupt_cancels_a_bake(webui):
    _, fake, tmp = webui
    from lib_lorakit.ops import HostContext, bake

    ckdir = os.path.join(tmp, "models", "Stable-diffusion")
    write_checkpoint(os.path.join(ckdir, "base.safetensors"), "sdxl", tiny=True)
    write(os.path.join(tmp, "models", "Lora"), "ink.safetensors", make_lora("sdxl"))
    svc = HostContext(host_pkg.get_host())
    real_progress = svc.host.job_progress

    def progress(frac, msg):
        real_progress(frac, msg)
        if "baking" in msg:
            fake.shared.state.interrupt()

    svc.host.job_progress = progress
    import lib_lorakit.bake.engine as bk

    ticks = iter(range(10**9))
    old = bk.time.perf_counter
    bk.time.perf_counter = lambda: next(ticks)
    try:
        job = bake.start(svc, {"base": "base.safetensors", "output": "never", "loras": [{"name": "ink"}]})
        assert job.wait(60)
    finally:
        bk.time.perf_counter = old
    assert job.state == "cancelled"
    assert sorted(os.listdir(ckdir)) == ["base.safetensors"]
    _ = threading


def test_txt2img_route_returns_pngs(webui):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lorakit.host import extension

    _, fake, tmp = webui
    write_checkpoint(os.path.join(tmp, "models", "Stable-diffusion", "m.safetensors"), "sd15", tiny=True)
    extension._state.update(service=None, app=None)
    app = FastAPI()
    extension.on_app_started(None, app)
    with TestClient(app) as c:
        r = c.post(
            "/lorakit/v1/txt2img", json={"prompt": "a cat", "seed": 5, "width": 64, "height": 32, "checkpoint": "m"}
        )
    assert r.status_code == 200, r.text
    import base64
    import io

    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (64, 32)
    assert r.json()["seed"] == 5


def test_current_checkpoint(webui):
    _, fake, tmp = webui
    write_checkpoint(os.path.join(tmp, "models", "Stable-diffusion", "m.safetensors"), "sd15", tiny=True)
    fake.sd_models.list_models()
    fake.shared.opts.sd_model_checkpoint = next(iter(fake.sd_models.checkpoints_list))  # a title "m.safetensors [..]"
    assert host_pkg.get_host().current_checkpoint() == "m.safetensors"


def test_settings_edit_the_generation_profiles(webui, caplog):
    """Settings → lorakit → Generation profiles: an applied change reaches every door's profile (the API's
    GET /profiles and the profile a checkpoint gets); a refused text is put back, named in one log line, and
    leaves what is in use unchanged; an API change shows in the field when the settings are built again."""
    pytest.importorskip("gradio")
    import json
    import logging

    from lib_lorakit.host import extension
    from lib_lorakit.ops import gen

    _, fake, _ = webui
    extension._state.update(service=None, app=None)
    extension.on_ui_settings()
    opts, key = fake.shared.opts, extension.PROFILES_OPTION
    info = opts.data_labels[key]
    assert info.section == ("lorakit", "lorakit") and opts.data[key] == ""
    assert not getattr(info, "comment_after", "") and not getattr(info, "comment_before", "")  # see extension.py
    # A1111 refreshes every setting on page load with gr.update(value=..., **component_args): each lorakit
    # option's arguments must be ones its component's update takes (gradio 3.41 checks them)
    import inspect

    for k, o in opts.data_labels.items():
        if o.component is not None and hasattr(o.component, "update"):
            taken = inspect.signature(o.component.update).parameters
            assert set(o.component_args or {}) - {"precision"} <= set(taken), (k, o.component_args)
    shipped = gen.profiles(extension.service())["profiles"]["sdxl"]["steps"]
    assert opts.set(key, json.dumps({"sdxl": {"steps": shipped + 7}}))
    assert gen.profiles(extension.service())["profiles"]["sdxl"]["steps"] == shipped + 7
    good = opts.data[key]
    for bad, said in (
        ('{"sdxl": {"steps": -3}}', "steps"),
        ('{"sdxl": ', "not JSON"),
        ('["sdxl"]', "must be an object"),
        ('{"sdxl": {"cfg_scale": "hot"}}', "cfg_scale"),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="lorakit"):
            opts.set(key, bad)
        assert json.loads(opts.data[key]) == json.loads(good) and not opts.errors, bad  # put back; nothing raised
        (rec,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert "were not changed" in rec.getMessage() and said in rec.getMessage() and rec.exc_info is None, (
            bad,
            rec.getMessage(),
        )
        assert gen.profiles(extension.service())["profiles"]["sdxl"]["steps"] == shipped + 7
    assert opts.set(key, "")  # empty: back to the shipped table
    assert gen.profiles(extension.service())["profiles"]["sdxl"]["steps"] == shipped
    assert gen.profile_changes(extension.service()) == {}
    gen.update_profiles(extension.service(), {"profiles": {"pony": {"cfg_scale": 6.5}}})  # through the API
    extension.on_ui_settings()
    assert json.loads(opts.data[key]) == {"pony": {"cfg_scale": 6.5}}


def test_engine_jobs_leave_a_core_to_the_webui(webui, monkeypatch):
    """Bake and merge jobs run inside the WebUI's process: they leave one core to its server, in the
    number of maths threads and in torch's threads (the engines subtract ``reserve_cores``)."""
    import lib_lorakit.streaming as s
    from lib_lorakit.engineopts import host_kwargs

    monkeypatch.setattr(s, "usable_cores", lambda: 16)
    kw = host_kwargs(host_pkg.get_host(), "cpu")
    assert kw["reserve_cores"] == 1 and kw["workers"] == s.engine_workers(1) and kw["device"] == "cpu"
    monkeypatch.setattr(s, "usable_cores", lambda: 2)
    assert host_kwargs(host_pkg.get_host(), "cpu")["workers"] == 1
