"""The HTTP backend, the grid and autotest commands, against a loopback server with the WebUI's API."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from factories import write
from fake_gen import FakeBackend, decode
from fake_sdapi import FakeWebUI

from lib_lorakit.cli import main
from lib_lorakit.gen.autotest import AutotestOptions, run_autotest
from lib_lorakit.gen.backend import GenError, HttpBackend
from lib_lorakit.gen.run import Run
from lib_lorakit.synth import kohya_metadata, make_lora


def character_lora(folder, name):
    meta = kohya_metadata(
        "sd15",
        output_name=name,
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        folders={"10_zkwgirl woman": (25, [("zkwgirl", 25), ("1girl", 25), ("solo", 24), ("long hair", 22)])},
    )
    return write(folder, f"{name}.safetensors", make_lora("sd15", "lora", rank=2, alpha=1.0, te=True, seed=3), meta)


@pytest.fixture
def webui(tmp_path):
    ck, lo = tmp_path / "Stable-diffusion", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    for f in ("base.safetensors", "other.safetensors"):
        (ck / f).write_bytes(b"x")
    (lo / "styleA.safetensors").write_bytes(b"x")
    fake = FakeBackend(str(ck), str(lo), {"styleA": "healthy"})
    srv = FakeWebUI(fake)
    yield srv, tmp_path
    srv.close()


def test_http_backend_lists_refreshes_and_generates(webui):
    srv, tmp = webui
    be = HttpBackend(srv.url)
    (tmp / "Lora" / "late.safetensors").write_bytes(b"x")
    assert "late" not in [l.name for l in be.loras()]  # the WebUI's cached list
    be.refresh()
    assert "late" in [l.name for l in be.loras()]
    assert [c.name for c in be.checkpoints()] == ["base.safetensors [abc]", "other.safetensors [abc]"]
    out = be.txt2img(
        {"prompt": "x <lora:styleA:0.5>", "seed": 7, "checkpoint": "other.safetensors [abc]", "width": 64, "height": 64}
    )
    assert decode(out.image) == (7, 0.5) and "Model: other" in out.infotext and out.seed == 7
    body = srv.requests[-1][2]
    assert body["override_settings"] == {"sd_model_checkpoint": "other.safetensors [abc]"}
    assert body["override_settings_restore_afterwards"] is True and body["save_images"] is False


def test_http_backend_credentials(tmp_path):
    ck, lo = tmp_path / "c", tmp_path / "l"
    ck.mkdir()
    lo.mkdir()
    (ck / "base.safetensors").write_bytes(b"x")
    srv = FakeWebUI(FakeBackend(str(ck), str(lo)), auth="me:secret")
    try:
        with pytest.raises(GenError, match="401"):
            HttpBackend(srv.url).checkpoints()
        assert HttpBackend(srv.url, "me:secret").checkpoints()[0].name == "base.safetensors [abc]"
    finally:
        srv.close()
    with pytest.raises(GenError, match="Cannot reach"):
        HttpBackend(srv.url, timeout=2).checkpoints()


def test_grid_command_end_to_end(webui, capsys):
    srv, tmp = webui
    out = tmp / "runs"
    code = main(
        [
            "grid",
            "--webui",
            srv.url,
            "--lora",
            "styleA",
            "--prompt",
            "a castle, ((night))",
            "--strengths",
            "0-1.5:0.5",
            "--seeds",
            "1, 2",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--out",
            str(out),
            "-q",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "styleA: healthy" in text
    (run_dir,) = [os.path.join(out, "lorakit", "grid", d) for d in os.listdir(out / "lorakit" / "grid")]
    run = Run(run_dir)
    assert len(run.cells) == 2 + 3 * 2 and run.missing() == []
    assert (
        os.path.isfile(os.path.join(run_dir, "grid.png"))
        and "healthy" in open(os.path.join(run_dir, "summary.md")).read()
    )
    posted = [b for m, p, b in srv.requests if p == "/sdapi/v1/txt2img"]
    assert {b["prompt"] for b in posted} == {"a castle, ((night))"} | {
        f"a castle, ((night)), <lora:styleA:{s}>" for s in ("0.5", "1", "1.5")
    }
    assert {b["width"] for b in posted} == {64} and {b["steps"] for b in posted} == {4}


def test_a_silent_checkpoint_fallback_is_caught(webui, capsys):
    """The WebUI generates with the loaded model when an override is not applied; lorakit fails the cell."""
    srv, tmp = webui
    srv.fake.loaded = "base.safetensors [abc]"
    real = srv.fake.txt2img
    srv.fake.txt2img = lambda req: real({**req, "checkpoint": "base.safetensors [abc]"})  # ignores the override
    code = main(
        [
            "grid",
            "--webui",
            srv.url,
            "--lora",
            "styleA",
            "--prompt",
            "a castle",
            "--strengths",
            "0, 1",
            "--checkpoint",
            "other",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            str(tmp / "runs"),
            "-q",
        ]
    )
    assert code == 3
    run_dir = os.path.join(tmp, "runs", "lorakit", "grid", os.listdir(tmp / "runs" / "lorakit" / "grid")[0])
    res = Run(run_dir).results()
    assert res and all(r["status"] == "failed" and "not 'other" in r["error"] for r in res.values())


def test_autotest_uses_the_trigger_and_skips_tested_files(webui, capsys):
    srv, tmp = webui
    p = character_lora(tmp / "Lora", "zkw_char")
    be = HttpBackend(srv.url)
    opts = AutotestOptions(prompts=["a park", "a room"], strengths="0, 0.5, 1", settings={"width": 64, "height": 64})
    out = str(tmp / "runs")
    res = run_autotest(be, [p], out, opts, log=lambda m: None)
    assert len(res) == 1 and "error" not in res[0], res
    run = Run(res[0]["run_dir"])
    assert {c.prompt.split(",")[0] for c in run.cells} == {"zkwgirl"}  # baseline included
    assert sum(c.row == "baseline" for c in run.cells) == 2  # one per prompt
    md = open(res[0]["summary"]).read()
    assert "trigger 'zkwgirl'" in md and "trigger-dependent" in md and "| zkw_char |" in md
    n = len(srv.requests)
    again = run_autotest(be, [p], out, opts, log=lambda m: None)
    assert again == [] and not [r for r in srv.requests[n:] if r[1] == "/sdapi/v1/txt2img"]


def test_autotest_cli_refuses_a_file_the_webui_does_not_list(webui, capsys):
    srv, tmp = webui
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    p = character_lora(elsewhere, "outside")
    code = main(["autotest", "--webui", srv.url, str(p), "--out", str(tmp / "runs"), "--width", "64", "--height", "64"])
    out = capsys.readouterr().out
    assert code == 2 and "does not list this LoRA" in out


def test_watch_tests_a_file_only_once_it_is_complete(webui):
    srv, tmp = webui
    src = character_lora(tmp, "epoch-000002")
    data = open(src, "rb").read()
    os.remove(src)
    target = tmp / "Lora" / "epoch-000002.safetensors"
    tested_sizes: list[int] = []

    def writer():
        with open(target, "wb") as f:  # a trainer writing slowly
            f.write(data[: len(data) // 3])
            f.flush()
            time.sleep(1.0)
            f.write(data[len(data) // 3 :])

    t = threading.Thread(target=writer)
    t.start()
    opts = AutotestOptions(prompts=["a park"], strengths="0, 1", settings={"width": 64, "height": 64})

    def log(m):
        if m.endswith("testing"):
            tested_sizes.append(os.path.getsize(target))

    res = run_autotest(
        HttpBackend(srv.url), [], str(tmp / "runs"), opts, watch=str(tmp / "Lora"), interval=0.3, watch_for=3.0, log=log
    )
    t.join()
    mine = [r for r in res if r["file"].endswith("epoch-000002.safetensors")]
    assert len(mine) == 1 and "error" not in mine[0], res
    assert tested_sizes == [len(data)]
    state = json.load(open(tmp / "runs" / "autotest-state.json"))
    assert str(target) in state["done"]


def test_grid_resume_fills_only_the_gaps(webui, capsys):
    srv, tmp = webui
    srv.fake.fail_calls = {2}
    args = [
        "grid",
        "--webui",
        srv.url,
        "--lora",
        "styleA",
        "--prompt",
        "a castle",
        "--strengths",
        "0, 1",
        "--seeds",
        "1, 2",
        "--width",
        "64",
        "--height",
        "64",
        "-q",
        "--batch-size",
        "1",  # the fake fails its 2nd call: one image per request
    ]
    assert main(args + ["--out", str(tmp / "runs")]) == 3
    out = capsys.readouterr().out
    assert "1 failed" in out and "--resume" in out
    run_dir = out.split("--resume ")[1].split()[0]
    before = len(srv.fake.calls)
    assert main(["grid", "--webui", srv.url, "--resume", run_dir, "-q"]) == 0
    assert len(srv.fake.calls) - before == 1
    assert "styleA: healthy" in capsys.readouterr().out and Run(run_dir).missing() == []


@pytest.mark.parametrize("engine", ["a1111", "forge"])
def test_http_backend_reads_the_command_line_flags(tmp_path, engine):
    """A1111 answers /sdapi/v1/cmd-flags plainly; Forge inside a validation error (HTTP 500, the flags in
    ``body``); a WebUI without the route gives {}. The doctor reads the runtime precision from them."""
    fake = FakeBackend(str(tmp_path), str(tmp_path), {})
    srv = FakeWebUI(fake, engine=engine, cmd_flags={"no_half": True, "clip_in_fp32": False})
    bare = FakeWebUI(fake, engine=engine)
    try:
        assert HttpBackend(srv.url).cmd_flags() == {"no_half": True, "clip_in_fp32": False}
        assert HttpBackend(bare.url).cmd_flags() == {}
    finally:
        srv.close()
        bare.close()
