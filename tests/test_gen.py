"""Generation pipeline and strength grid, with the deterministic fake backend."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from fake_gen import FakeBackend, decode
from PIL import Image

from lib_lorakit.errors import Cancelled, RecipeError
from lib_lorakit.gen import image as im
from lib_lorakit.gen.backend import ModelInfo, UnknownModel
from lib_lorakit.gen.emphasis import emphasis_warning, max_emphasis, parse_attention
from lib_lorakit.gen.grid import (
    GridRow,
    GridSpec,
    draw_grid,
    evaluate,
    finish,
    order_epochs,
    parse_strengths,
    strip_lora,
    with_lora,
)
from lib_lorakit.gen.run import Cell, Run, execute, infotext_problem
from lib_lorakit.gen.verdict import judge


@pytest.fixture
def host(tmp_path):
    ck, lo, out = tmp_path / "Stable-diffusion", tmp_path / "Lora", tmp_path / "outputs"
    for d in (ck, lo, out):
        d.mkdir()
    for f in ("base.safetensors", "other.safetensors"):
        (ck / f).write_bytes(b"x")
    for f in ("styleA.safetensors", "weakB.safetensors", "nothingC.safetensors", "burnD.safetensors"):
        (lo / f).write_bytes(b"x")
    be = FakeBackend(str(ck), str(lo), {"styleA": "healthy", "weakB": "weak", "nothingC": "none", "burnD": "overfit"})
    return be, str(out), tmp_path


def grid(rows=("styleA",), strengths="0, 0.5, 1", seeds=(1, 2), prompt="a castle, <lora:styleA:0.7>, night"):
    return GridSpec(
        rows=[GridRow(r, r) for r in rows],
        prompt=prompt,
        negative_prompt="blurry",
        strengths=strengths,
        seeds=list(seeds),
        settings={"steps": 4, "width": 64, "height": 64},
    )


def cell_images(run):
    """cell key -> (seed, strength) decoded from the pixels of the image the manifest names."""
    return {k: decode(run.load_image(ev)) for k, ev in run.results().items() if ev["status"] == "ok"}


# --- the pipeline cannot mislabel ------------------------------------------------------------------


def test_a_failure_in_the_middle_shifts_no_label(host):
    be, out, _ = host
    be.fail_calls = {3}
    run = Run.create(out, "grid", grid().cells())
    rec = execute(run, be)
    assert rec["ok"] == len(run.cells) - 1 and rec["failed"] == 1
    res = run.results()
    failed = [c for c in run.cells if res[c.key]["status"] == "failed"]
    assert len(failed) == 1 and "fake failure on call 3" in res[failed[0].key]["error"]
    # every image is the one made for its own cell: seed and strength read back from the pixels
    for c in run.cells:
        if c is failed[0]:
            continue
        seed, strength = decode(run.load_image(res[c.key]))
        assert (seed, strength) == (c.seed, c.strength or 0.0), c
        meta = json.loads(Image.open(run.image_path(res[c.key])).text["lorakit"])
        assert meta["cell"] == c.key and meta["col"] == c.col
        assert f"Seed: {c.seed}" in Image.open(run.image_path(res[c.key])).text["parameters"]


def test_a_rerun_fills_only_the_missing_cells(host):
    be, out, _ = host
    be.fail_calls = {2, 5}
    run = Run.create(out, "grid", grid().cells())
    execute(run, be)
    assert len(run.missing()) == 2
    before = {k: ev["image"] for k, ev in run.results().items() if ev["status"] == "ok"}
    n = len(be.calls)
    rec = execute(Run(run.dir), be)  # reopened from disk, as after a restart
    assert len(be.calls) - n == 2
    assert rec["ok"] == len(run.cells) and rec["failed"] == 0 and rec["missing"] == 0
    after = run.results()
    assert all(after[k]["image"] == v for k, v in before.items())  # nothing re-made
    assert all(decode(run.load_image(after[c.key]))[0] == c.seed for c in run.cells)


def test_a_stale_folder_is_never_read(host):
    be, out, _ = host
    old = Run.create(out, "grid", grid().cells())
    execute(old, be)
    new = Run.create(out, "grid", grid().cells())  # same plan, a new folder
    assert new.dir != old.dir and new.missing() == new.cells
    # yesterday's images copied into today's folder are not in its manifest: never read
    for f in os.listdir(os.path.join(old.dir, "images")):
        shutil.copy(os.path.join(old.dir, "images", f), os.path.join(new.dir, "images", f))
    assert new.results() == {} and len(new.missing()) == len(new.cells)
    n = len(be.calls)
    execute(new, be)
    assert len(be.calls) - n == len(new.cells)
    # an image altered after it was written no longer counts, and is made again
    ev = next(iter(new.results().values()))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(new.image_path(ev))
    assert ev["cell"] not in new.results() and len(new.missing()) == 1


def test_a_torn_manifest_line_and_foreign_names_are_ignored(host):
    be, out, _ = host
    run = Run.create(out, "grid", grid(seeds=[1]).cells())
    execute(run, be)
    with open(os.path.join(run.dir, "manifest.jsonl"), "a") as f:
        f.write('{"event": "cell", "cell": "')  # a crash mid-line
    assert len(run.results()) == len(run.cells)
    with pytest.raises(RecipeError, match="not one lorakit writes"):
        run.image_path({"image": "../../etc/passwd"})


def test_a_checkpoint_added_after_start_is_found(host):
    be, out, tmp = host
    (tmp / "Stable-diffusion" / "fresh-merge.safetensors").write_bytes(b"y")
    assert "fresh-merge" not in str(be.checkpoints())  # the host's cached list
    spec = grid(seeds=[1])
    spec.checkpoint = "fresh-merge"
    run = Run.create(out, "grid", spec.cells())
    rec = execute(run, be)
    assert rec["ok"] == len(run.cells)
    assert {c["checkpoint"] for c in be.calls} == {"fresh-merge.safetensors [abc]"}
    pre = next(e for e in run.events() if e["event"] == "preflight")
    assert pre["checkpoints"]["fresh-merge"]["path"].endswith("fresh-merge.safetensors")


def test_unknown_names_are_refused_with_the_nearest(host):
    be, out, _ = host
    spec = grid(rows=["stylA"], seeds=[1])
    run = Run.create(out, "grid", spec.cells())
    with pytest.raises(UnknownModel, match="stylA") as e:
        execute(run, be)
    assert "styleA" in str(e.value)
    assert be.calls == []


def test_checkpoints_load_once_and_switches_are_recorded(host):
    be, out, _ = host
    cells = []
    for ck in ("other", "base"):
        for seed in (1, 2, 3):
            cells.append(Cell(row=ck, col="x", prompt="p", seed=seed, checkpoint=ck))
    interleaved = [cells[i] for i in (0, 3, 1, 4, 2, 5)]
    run = Run.create(out, "tournament", interleaved)
    be.loaded = "base.safetensors [abc]"
    rec = execute(run, be)
    assert be.switches == 1 and rec["model_switches"] == 1  # base first (loaded), then other once
    assert [c["checkpoint"] for c in be.calls] == ["base.safetensors [abc]"] * 3 + ["other.safetensors [abc]"] * 3
    assert rec["seconds_per_image"] is not None


def test_an_image_made_with_another_model_is_failed_not_labelled():
    ck = ModelInfo("base.safetensors [abc]", "/m/base.safetensors")
    lora = ModelInfo("styleA", "/l/styleA.safetensors")
    good = 'p\nSteps: 4, Seed: 1, Model: base, Lora hashes: "styleA: 12"'
    assert infotext_problem(good, ck, lora) is None
    assert "not 'base" in infotext_problem("p\nSteps: 4, Model: other", ck, None)
    assert "did not apply LoRA" in infotext_problem('p\nSteps: 4, Model: base, Lora hashes: "x: 1"', ck, lora)


def test_cancel_leaves_a_resumable_run(host):
    import threading

    be, out, _ = host
    run = Run.create(out, "grid", grid().cells())
    stop = threading.Event()

    def progress(frac, msg):
        if frac >= 0.3:
            stop.set()

    with pytest.raises(Cancelled):
        execute(run, be, progress=progress, cancel=stop)
    done = len(run.cells) - len(run.missing())
    assert 0 < done < len(run.cells)
    assert not [f for f in os.listdir(os.path.join(run.dir, "images")) if ".tmp" in f]
    execute(run, be)
    assert run.missing() == []


def test_emphasis():
    assert max_emphasis("a (((castle))), b")[0] == pytest.approx(1.331)
    assert max_emphasis("(a:1.2) ((b:1.4))")[0] == pytest.approx(1.54)
    assert max_emphasis("[[dark]] plain")[0] == pytest.approx(1.0)
    assert dict(parse_attention("[[dark]]"))["dark"] == pytest.approx(1 / 1.21)
    assert max_emphasis(r"\(literal\) <lora:x:1.5>")[0] == 1.0
    assert emphasis_warning("((((((masterpiece))))))") and "1.77" in emphasis_warning("((((((masterpiece))))))")
    assert emphasis_warning("(masterpiece:1.4)") is None


# --- image checks --------------------------------------------------------------------------------


def _img(a):
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def test_image_checks_on_constructed_images():
    rng = np.random.default_rng(0)
    ok = _img(rng.uniform(0.2, 0.8, (64, 64, 3)))
    assert im.check_image(ok).status == "ok"
    black = _img(rng.uniform(0, 0.03, (64, 64, 3)))
    c = im.check_image(black)
    assert c.status == "black" and c.luminance < im.BLACK_MEAN
    dark_scene = _img(np.where(rng.uniform(size=(64, 64, 1)) < 0.05, 0.9, 0.02) * np.ones((1, 1, 3)))
    assert im.check_image(dark_scene).status != "black"  # a night scene with lights is not black
    flat = _img(np.full((64, 64, 3), [0.4, 0.5, 0.3]) + rng.normal(0, 0.003, (64, 64, 3)))
    c = im.check_image(flat)
    assert c.status == "blank" and c.spread < im.BLANK_SPREAD
    blown = _img(np.where(rng.uniform(size=(64, 64, 1)) < 0.6, 1.0, rng.uniform(0.3, 0.7, (64, 64, 3))))
    c = im.check_image(blown)
    assert c.status == "blown-out" and c.clipped > im.BLOWN_CLIPPED
    white = _img(rng.uniform(0.9, 0.985, (64, 64, 3)))
    assert im.check_image(white).status == "blown-out"


def test_ssim_and_mad_agree_with_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (48, 40, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ya, yb = im.luminance(a), im.luminance(b)
    ref = skm.structural_similarity(
        ya, yb, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=True
    )
    # scikit-image averages over the image with edges cropped by (win-1)/2, our mean is over valid positions
    assert im.ssim(a, b) == pytest.approx(ref, abs=2e-3)
    assert im.ssim(a, a) == pytest.approx(1.0)
    assert im.mean_abs_diff(a, b) == pytest.approx(float(np.abs(a - b).mean()))


# --- verdicts --------------------------------------------------------------------------------------


def series(kind, strengths=(0.25, 0.5, 0.75, 1.0, 1.25, 1.5), seeds=(1, 2, 3)):
    """Constructed image series against a baseline per seed, for each case."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        base = np.kron(rng.uniform(0.3, 0.7, (8, 8, 3)), np.ones((8, 8, 1)))
        target = np.kron(rng.uniform(0.3, 0.7, (8, 8, 3)), np.ones((8, 8, 1)))
        for s in strengths:
            if kind == "none":
                x = base + rng.normal(0, 0.003, base.shape)
            elif kind == "weak":
                k = 0 if s < 1.25 else (s - 1.0) * 2
                x = (1 - k) * base + k * target
            elif kind == "healthy":
                x = (1 - s / 2) * base + s / 2 * target
            elif kind == "overfit":
                x = (1 - s / 2) * base + s / 2 * target
                if s >= 1.0:
                    g = x.mean(axis=2, keepdims=True)
                    x = g + (x - g) * 6
            bimg, ximg = _img(base), _img(x)
            out.append(
                {
                    "strength": s,
                    "seed": seed,
                    "status": im.check_image(ximg).status,
                    "baseline_status": im.check_image(bimg).status,
                    "metrics": im.compare(ximg, bimg),
                }
            )
    return out


def test_verdicts_for_each_case():
    v = judge(series("none"))
    assert v["case"] == "no-effect" and "no visible effect up to 1.5" in v["text"]
    v = judge(series("weak"))
    assert v["case"] == "weak" and v["onset"] == 1.25 and "weak until ≥ 1.25" in v["text"]
    v = judge(series("healthy"))
    assert v["case"] == "healthy" and v["onset"] <= 0.5 and "between" in v["text"]
    v = judge(series("overfit"))
    assert v["case"] == "overfit" and v["overfit_from"] == 1.0 and "from 1" in v["text"]
    assert v["text"].count("saturation") >= 1


def test_verdict_with_a_broken_baseline():
    cells = series("healthy")
    cells[0]["baseline_status"] = "black"
    assert judge(cells)["case"] == "unjudged"


# --- the strength grid -----------------------------------------------------------------------------


def test_parse_strengths():
    assert parse_strengths("0, 0.25, 0.5") == [0.0, 0.25, 0.5]
    assert parse_strengths("0.5-1.5:0.5") == [0.0, 0.5, 1.0, 1.5]
    assert parse_strengths("1, 0.2-0.6:0.2") == [0.0, 0.2, 0.4, 0.6, 1.0]
    assert parse_strengths("", max_safe=1.5) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert parse_strengths(None, max_safe=0.6) == [0.0, 0.2, 0.4, 0.6]
    with pytest.raises(RecipeError, match="'x'"):
        parse_strengths("0.5, x")


def test_prompt_keeps_everything_but_the_tested_tag():
    p = "masterpiece, (castle:1.2), <lora:styleA:0.7>, night, <lora:detail:0.3>"
    s = strip_lora(p, ["styleA"])
    assert s == "masterpiece, (castle:1.2), night, <lora:detail:0.3>"
    assert with_lora(s, "styleA", 0.5) == s + ", <lora:styleA:0.5>"
    assert with_lora(s, "styleA", 0) == s
    assert strip_lora("<lora:styleA:1> a cat", ["styleA"]) == "a cat"


def test_order_epochs(tmp_path):
    names = ["run-000010.safetensors", "run-000002.safetensors", "run.safetensors", "run-000006.safetensors"]
    paths = [str(tmp_path / n) for n in names]
    got = order_epochs(paths, read_metadata=lambda p: {"ss_epoch": "12"} if p.endswith("run.safetensors") else {})
    assert [os.path.basename(p) for p, _ in got] == [
        "run-000002.safetensors",
        "run-000006.safetensors",
        "run-000010.safetensors",
        "run.safetensors",
    ]
    assert [e for _, e in got] == [2, 6, 10, 12]


def test_grid_end_to_end_with_verdicts(host):
    be, out, _ = host
    spec = grid(rows=["styleA", "weakB", "nothingC", "burnD"], strengths="0-1.5:0.25", seeds=[1, 2])
    cells = spec.cells()
    assert sum(c.row == "baseline" for c in cells) == 2  # one baseline per seed, shared by the rows
    assert all("<lora:styleA" not in c.prompt for c in cells if c.row != "styleA")
    assert all(c.prompt.startswith("a castle, night") for c in cells)
    run = Run.create(out, "grid", cells)
    execute(run, be)
    res = finish(run)
    v = res["verdicts"]
    assert v["styleA"]["case"] == "healthy"
    assert v["weakB"]["case"] == "weak" and v["weakB"]["onset"] >= 1.0
    assert v["nothingC"]["case"] == "no-effect"
    assert v["burnD"]["case"] == "overfit" and v["burnD"]["overfit_from"] == 1.0, v["burnD"]
    g = Image.open(res["grid"])
    assert g.size[0] > 7 * 64 and g.size[1] > 8 * 64
    md = open(res["summary"]).read()
    assert "| weakB | **weak**" in md and "grid.png" in md


def test_grid_marks_failed_and_flagged_cells(host):
    be, out, _ = host
    be.fail_calls = {2}
    run = Run.create(out, "grid", grid(seeds=[1]).cells())
    execute(run, be)
    ev = evaluate(run)
    assert "failed or missing" in ev["verdicts"]["styleA"]["text"]
    g = np.asarray(draw_grid(run, ev["verdicts"]))
    red = (g[..., 0] > 180) & (g[..., 1] < 30) & (g[..., 2] < 30)
    assert red.sum() > 100  # the FAILED badge is drawn
