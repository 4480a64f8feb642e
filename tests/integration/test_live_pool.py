"""A pool of two running WebUIs (LORAKIT_WEBUI_URL and LORAKIT_WEBUI_URL2, e.g. A1111 and Forge side
by side; skipped without both): a tournament and a triage generated over both with the command line,
batches against single requests on one WebUI, and the second WebUI stopped mid-run
(LORAKIT_WEBUI2_KILL: a shell command that stops it; that test is skipped without it and runs last).

Needs LORAKIT_WEBUI_LORA_DIR and LORAKIT_WEBUI2_LORA_DIR (the hosts' LoRA folders on this machine).
Figures go to stdout (pytest -s) and, when LORAKIT_LIVE_OUT names a folder, pool-live.json there."""

import json
import os
import shutil
import subprocess
import threading
import time
import uuid

import numpy as np
import pytest
from live import URL
from PIL import Image

URL2 = os.environ.get("LORAKIT_WEBUI_URL2", "").rstrip("/")
pytestmark = pytest.mark.skipif(not (URL and URL2), reason="LORAKIT_WEBUI_URL and LORAKIT_WEBUI_URL2 are not set")
SETTINGS = ["--width", "64", "--height", "64", "--steps", "3", "--sampler", "Euler", "--cfg-scale", "5"]
FIGURES: dict = {}
GROUPS: dict = {}


def _figure(key, value):
    FIGURES[key] = value
    print(f"\n[pool-live] {key}: {json.dumps(value)}")
    out = os.environ.get("LORAKIT_LIVE_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "pool-live.json"), "w") as f:
            json.dump(FIGURES, f, indent=1)


@pytest.fixture(scope="module")
def pool_loras():
    """Three small LoRAs in a subfolder of both hosts' LoRA folders (the same files)."""
    import torch

    from lib_lorakit.formats.safetensors_io import save_file
    from lib_lorakit.synth import make_lora

    d1, d2 = os.environ.get("LORAKIT_WEBUI_LORA_DIR"), os.environ.get("LORAKIT_WEBUI2_LORA_DIR")
    if not (d1 and d2):
        pytest.skip("set LORAKIT_WEBUI_LORA_DIR and LORAKIT_WEBUI2_LORA_DIR")
    sub = f"lorakit-it-pool-{uuid.uuid4().hex[:6]}"
    folders = [os.path.join(d1, sub), os.path.join(d2, sub)]
    for f in folders:
        os.makedirs(f)
    names = []
    arch = os.environ.get("LORAKIT_WEBUI_ARCH", "sd15")
    for i in range(3):
        name = f"{sub}-s{i}"
        sd = make_lora(arch, "lora", rank=4, alpha=4, tiny=False, conv=False, seed=i, dtype=torch.float16, std=0.01)
        save_file(sd, os.path.join(folders[0], name + ".safetensors"))
        shutil.copyfile(
            os.path.join(folders[0], name + ".safetensors"), os.path.join(folders[1], name + ".safetensors")
        )
        names.append(name)
    yield folders[0], names
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)


def _run_dir(out, kind):
    root = os.path.join(out, "lorakit", kind)
    (d,) = os.listdir(root)
    return os.path.join(root, d)


def _check_run(run_dir):
    """Every cell has its image; the PNG carries the manifest's infotext and its own cell; the infotext's
    seed and prompt are the cell's; returns the members' counts."""
    from lib_lorakit.gen.run import Run, infotext_seed

    run = Run(run_dir)
    assert run.missing() == []
    cells = {c.key: c for c in run.cells}
    made: dict[str, int] = {}
    for key, ev in run.results().items():
        c = cells[key]
        assert ev["status"] == "ok", ev
        assert infotext_seed(ev["infotext"]) == c.seed
        assert ev["infotext"].startswith(c.prompt)
        img = Image.open(run.image_path(ev))
        assert img.size == (64, 64)
        assert img.info["parameters"] == ev["infotext"]
        assert json.loads(img.info["lorakit"])["cell"] == key
        made[ev["member"]] = made.get(ev["member"], 0) + 1
        group = (c.seed, c.extra.get("prompt"))
        GROUPS.setdefault(run_dir, {}).setdefault(group, set()).add(ev["member"])
    # A1111 and Forge render one seed differently: the images compared with each other (one seed and prompt)
    # come from one WebUI here (one engine each)
    assert all(len(m) == 1 for m in GROUPS[run_dir].values()), GROUPS[run_dir]
    return made, json.load(open(os.path.join(run_dir, "run.json")))


def test_tournament_over_two_webuis(pool_loras, tmp_path, capsys):
    from lib_lorakit.cli import main
    from lib_lorakit.ops import LocalContext
    from lib_lorakit.ops import tournament as T

    folder, names = pool_loras
    from lib_lorakit.gen.backend import HttpBackend

    base = HttpBackend(URL).current_checkpoint()
    spec = {
        "name": "pool",
        "settings": {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5},
        "prompts": [{"prompt": p} for p in ("a cat", "a castle", "a portrait", "a street", "a forest")],
        "candidates": [
            {"id": "control", "checkpoint": base, "control": True},
            {"id": "recipe", "checkpoint": base, "loras": [{"name": names[0], "strength": 0.8}]},
        ],
    }
    data = str(tmp_path / "data")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["tournament", "create", str(tmp_path / "spec.json"), "--data-dir", data]) == 0
    tid = capsys.readouterr().out.strip().splitlines()[-1]
    t0 = time.perf_counter()
    code = main(
        ["tournament", "generate", tid, "--webui", URL, "--webui", URL2, "--data-dir", data, "--out", str(tmp_path)]
    )
    secs = time.perf_counter() - t0
    assert code == 0, capsys.readouterr()
    made, rec = _check_run(_run_dir(str(tmp_path), "tournament"))
    _figure(
        "tournament",
        {"images": sum(made.values()), "per_member": made, "seconds": round(secs, 1), "notes": rec["pool_notes"]},
    )
    assert set(made) == {URL, URL2} and sum(made.values()) == 10
    ctx = LocalContext(data)
    b = T.ballot(ctx, tid, "it")
    assert len(b["prompts"]) == 5 and all(len(p["entries"]) == 2 for p in b["prompts"])
    assert "candidate" not in str(b) and "recipe" not in str(b) and "control" not in str(b)
    for p, entry in enumerate(b["prompts"]):
        for e in entry["entries"]:
            assert T.image_png(ctx, tid, "it", p, e["letter"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_triage_over_two_webuis(pool_loras, tmp_path):
    from lib_lorakit.cli import main
    from lib_lorakit.ops import LocalContext
    from lib_lorakit.ops import triage as triage_op

    folder, names = pool_loras
    data = str(tmp_path / "data")
    t0 = time.perf_counter()
    code = main(
        [
            "triage",
            "create",
            "--folder",
            folder,  # the LoRA folder on this machine, as the first WebUI lists it
            "--webui",
            URL,
            "--webui",
            URL2,
            "--seeds",
            "1, 2",
            "--data-dir",
            data,
        ]
        + ["--out", str(tmp_path), *SETTINGS]
    )
    secs = time.perf_counter() - t0
    assert code == 0
    made, rec = _check_run(_run_dir(str(tmp_path), "triage"))
    _figure("triage", {"images": sum(made.values()), "per_member": made, "seconds": round(secs, 1)})
    assert set(made) == {URL, URL2}
    ctx = LocalContext(data)
    (t,) = triage_op.triages(ctx)
    items = triage_op.items(ctx, t["id"])
    assert len(items) == 3 and all(it["image"]["status"] in ("ok", "black", "blank", "blown-out") for it in items)


def _pixels(img):
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("which", ["1", "2"])
def test_batch_of_four_against_four_single_requests(which):
    from lib_lorakit.gen.backend import HttpBackend
    from lib_lorakit.gen.run import infotext_seed

    url = URL if which == "1" else URL2
    be = HttpBackend(url)
    req = {"prompt": "a lighthouse", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5}
    be.txt2img({**req, "seed": 1})  # warm: the model loaded, caches filled
    t0 = time.perf_counter()
    singles = [be.txt2img({**req, "seed": 500 + i}) for i in range(4)]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch = be.txt2img_batch([{**req, "seed": 500 + i} for i in range(4)])
    t_batch = time.perf_counter() - t0
    diffs = [int(np.abs(_pixels(a.image) - _pixels(b.image)).max()) for a, b in zip(singles, batch)]
    mean = [round(float(np.abs(_pixels(a.image) - _pixels(b.image)).mean()), 4) for a, b in zip(singles, batch)]
    engine = be.engine()
    _figure(
        f"batch-{engine}",
        {
            "url": url,
            "seconds_4_single": round(t_single, 2),
            "seconds_batch_of_4": round(t_batch, 2),
            "speedup": round(t_single / t_batch, 2),
            "max_abs_pixel_diff": diffs,
            "mean_abs_pixel_diff": mean,
        },
    )
    assert [b.seed for b in batch] == [500, 501, 502, 503]
    assert [infotext_seed(b.infotext) for b in batch] == [500, 501, 502, 503]
    # the same images: pixel-identical, or (float arithmetic of a batch of 4 against batches of 1 on the CPU)
    # off by a few levels in a few pixels, never another picture
    assert max(mean) < 1.0, mean


def test_second_webui_stopped_mid_run_completes_on_the_first(tmp_path):
    kill = os.environ.get("LORAKIT_WEBUI2_KILL")
    if not kill:
        pytest.skip("set LORAKIT_WEBUI2_KILL to a command that stops the second WebUI")
    from lib_lorakit.gen.backend import HttpBackend
    from lib_lorakit.gen.pool import Pool
    from lib_lorakit.gen.run import Cell, Run, execute

    s = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5}
    cells = [Cell("p", str(i), f"a house, view {i}", seed=10 + i, settings=s) for i in range(10)]
    run = Run.create(str(tmp_path), "grid", cells)
    pool = Pool([HttpBackend(URL), HttpBackend(URL2)], batch_size=1)
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("rec", execute(run, pool)), daemon=True)
    t0 = time.perf_counter()
    th.start()
    while th.is_alive():
        if any(ev.get("member") == URL2 and ev.get("status") == "ok" for ev in run.events()):
            break
        time.sleep(0.5)
    killed_at = sum(ev.get("status") == "ok" for ev in run.events())
    subprocess.run(kill, shell=True, check=True, timeout=120)
    th.join(1200)
    rec = out["rec"]
    made, _ = _check_run(run.dir)
    members = {m["name"]: m for m in rec["members"]}
    _figure(
        "kill",
        {
            "images_before_kill": killed_at,
            "per_member": made,
            "second_state": members[URL2]["state"],
            "requeued": members[URL2]["requeued"],
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    assert rec["ok"] == 10 and rec["failed"] == 0
    assert members[URL2]["state"] == "down" and made[URL] >= 10 - made.get(URL2, 0)
