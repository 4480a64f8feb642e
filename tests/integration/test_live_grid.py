"""Strength grid and autotest against a running WebUI (LORAKIT_WEBUI_URL; skipped without it).

The grid Script runs through the host's own /sdapi/v1/txt2img (script_name/script_args),
the /lorakit/v1/grid job through the host adapter, and `autotest`/`grid` from outside
through the HTTP backend. Needs LORAKIT_WEBUI_LORA_DIR (the host's LoRA folder here).
"""

import base64
import io
import json
import os
import uuid

import pytest
from live import URL, call, wait

pytestmark = pytest.mark.skipif(not URL, reason="LORAKIT_WEBUI_URL is not set")
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5}


def _lora_dir():
    d = os.environ.get("LORAKIT_WEBUI_LORA_DIR")
    if not d:
        pytest.skip("set LORAKIT_WEBUI_LORA_DIR")
    return d


def _cli_args():
    args = ["--webui", URL, "--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler", "--cfg-scale", "5"]
    if os.environ.get("LORAKIT_WEBUI_AUTH"):
        args += ["--api-auth", os.environ["LORAKIT_WEBUI_AUTH"]]
    return args


def test_grid_script_through_the_hosts_txt2img_api(lora):
    from PIL import Image

    body = {
        "prompt": f"a cat, <lora:{lora}:0.9>, garden",
        "negative_prompt": "",
        "seed": 11,
        **SMALL,
        "script_name": "lorakit: LoRA strength grid",
        "script_args": [[lora], "0, 0.5, 1", False, "11", True],
    }
    status, r = call("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, r
    info = json.loads(r["info"])
    head = info["infotexts"][0]
    assert head.startswith("lorakit strength grid, run folder ") and f"{lora}: " in head, head
    assert len(r["images"]) == 1 + 3  # the grid, the baseline, two strengths
    grid = Image.open(io.BytesIO(base64.b64decode(r["images"][0])))
    assert grid.size[0] > 3 * 64
    prompts = [t.splitlines()[0] for t in info["infotexts"][1:]]
    assert prompts[0] == "a cat, garden" and f"a cat, garden, <lora:{lora}:1>" in prompts
    assert all("Seed: 11" in t for t in info["infotexts"][1:])
    assert any("Lora hashes" in t and lora in t for t in info["infotexts"][1:])  # really applied
    run_dir = head.split("run folder ")[1].splitlines()[0]
    if os.path.isdir(run_dir):  # the host's outputs are on this machine
        from lib_lorakit.gen.run import Run

        run = Run(run_dir)
        assert run.missing() == [] and os.path.isfile(os.path.join(run_dir, "summary.md"))


def test_grid_job_through_the_host_adapter(lora, base):
    status, r = call(
        "POST",
        "/lorakit/v1/grid",
        {"loras": [lora], "prompt": "a castle", "strengths": "0, 1", "seeds": "3", "checkpoint": base, **SMALL},
    )
    assert status == 200, r
    job = wait(r["job_id"])
    assert job["state"] == "done", job
    res = job["result"]
    assert res["record"]["ok"] == 2 and res["record"]["failed"] == 0
    assert lora in res["verdicts"] and res["verdicts"][lora]["case"] in ("no-effect", "weak", "healthy", "overfit")


def test_autotest_and_epochs_from_outside(lora, base, tmp_path, capsys):
    from lib_lorakit.cli import main
    from lib_lorakit.gen.run import Run

    folder = _lora_dir()
    code = main(
        [
            "autotest",
            *_cli_args(),
            os.path.join(folder, lora + ".safetensors"),
            "--strengths",
            "0, 1",
            "--out",
            str(tmp_path),
            "--prompts",
            _prompts(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = [
        os.path.join(tmp_path, "lorakit", "autotest", d) for d in os.listdir(tmp_path / "lorakit" / "autotest")
    ]
    run = Run(run_dir)
    res = run.results()
    assert len(run.cells) == 2 * 2 and all(r["status"] == "ok" for r in res.values())  # 2 prompts x (0, 1)
    assert (
        os.path.isfile(os.path.join(run_dir, "grid.png")) and lora in open(os.path.join(run_dir, "summary.md")).read()
    )
    applied = [r for r in res.values() if "Lora hashes" in r["infotext"]]
    assert len(applied) == 2  # the two strength-1 cells, checked against the infotext

    # epochs: files of one training run, written now, found after the WebUI refreshes its list
    import torch

    from lib_lorakit.formats.safetensors_io import save_file
    from lib_lorakit.synth import make_lora

    run_name = f"lorakit-it-ep-{uuid.uuid4().hex[:6]}"
    for ep in (1, 2):
        sd = make_lora(
            os.environ.get("LORAKIT_WEBUI_ARCH", "sd15"),
            "lora",
            rank=4,
            alpha=4,
            tiny=False,
            conv=False,
            seed=ep,
            dtype=torch.float16,
            std=0.01,
        )
        save_file(sd, os.path.join(folder, f"{run_name}-{ep:06d}.safetensors"), metadata={"ss_epoch": str(ep)})
    code = main(
        [
            "grid",
            *_cli_args(),
            "--lora",
            f"{run_name}-000001",
            "--epochs",
            "--prompt",
            "a house",
            "--strengths",
            "0, 1",
            "--out",
            str(tmp_path / "g"),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{run_name}-000001 (epoch 1):" in out and f"{run_name}-000002 (epoch 2):" in out


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# two prompts\na cat in a garden\na red car\n")
    return str(p)
