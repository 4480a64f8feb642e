"""The bake doctor against a renderer whose images depend on the weights (tests/fake_render.py).

The renderer applies LoRA tags at runtime with the trainers' closed forms, independently of the
bake engine, so a correct bake is "identical" only if the engine is right, and each planted cause
changes the pixels for real.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from factories import tiny_checkpoint, tiny_lora
from fake_render import UNET_KEYS, U, WeightRenderer

from lib_lorakit.bake import LoraSpec, bake
from lib_lorakit.doctor import Check, RecipeLora, compare_sets, diagnose, parity, summary
from lib_lorakit.doctor.parity import PASSING, prompts_for
from lib_lorakit.errors import Cancelled
from lib_lorakit.formats.safetensors_io import save_file
from lib_lorakit.networks.resolve import unet_ldm_to_diffusers
from lib_lorakit.tempfiles import SCRATCH

PROMPTS = ["a cat on a sofa", "a mountain lake", "a red car"]
SEEDS = [1, 2]
SETTINGS = {"cfg_scale": 7.0, "steps": 3, "width": 32, "height": 32}


@pytest.fixture
def models(tmp_path):
    ck, lo = tmp_path / "Stable-diffusion", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    base = tiny_checkpoint(ck, "sd15", name="base.safetensors")
    # the 3-LoRA recipe: kohya LoRA with conv layers, LoHa, LoKr; every one trains the text encoder
    a = tiny_lora(lo, "sd15", "lora", name="styleA.safetensors", seed=1, std=0.2, conv=True, te=True)
    b = tiny_lora(lo, "sd15", "loha", name="styleB.safetensors", seed=2, std=0.2, te=True)
    c = tiny_lora(lo, "sd15", "lokr", name="styleC.safetensors", seed=3, std=0.2, te=True)
    recipe = [RecipeLora("styleA", a, 0.6, 0.6), RecipeLora("styleB", b, 0.3, 0.3), RecipeLora("styleC", c, 0.5, 0.5)]
    return str(ck), str(lo), base, recipe, tmp_path


def baked(ck, base, recipe, name="baked.safetensors", save_dtype="fp16", **over) -> str:
    out = os.path.join(ck, name)
    """Bake ``recipe``; ``over``: name -> (strength, te_strength) to plant another strength, or None to leave it out."""
    specs = []
    for r in recipe:
        s, te = over.get(r.name, (r.strength, r.te_strength)) or (None, None)
        if s is not None:
            specs.append(LoraSpec(r.path, s, te))
    bake(base, specs, out, save_dtype=save_dtype)
    return out


def check(base, bk, recipe, prompts=PROMPTS, seeds=SEEDS) -> Check:
    return Check(base, bk, recipe, list(prompts), list(seeds), settings=dict(SETTINGS))


def no_scratch(ck) -> bool:
    return not [n for n in os.listdir(ck) if n.startswith(SCRATCH)]


def test_measures_agree_with_a_direct_computation():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(2)]
    run = [np.clip(b.astype(int) + 20, 0, 255).astype(np.uint8) for b in base]
    half = [np.clip(b.astype(int) + 10, 0, 255).astype(np.uint8) for b in base]
    m = compare_sets(half, run, base)
    want = np.mean([np.abs(h.astype(float) - r).mean() for h, r in zip(half, run)])
    assert m["mean_diff"] == pytest.approx(want, abs=1e-3)
    assert m["max_diff"] == max(float(np.abs(h.astype(float) - r).max()) for h, r in zip(half, run))
    e = np.concatenate([(r.astype(float) - b).ravel() for r, b in zip(run, base)])
    v = np.concatenate([(h.astype(float) - b).ravel() for h, b in zip(half, base)])
    assert m["effect_ratio"] == pytest.approx(float(v @ e / (e @ e)), abs=1e-3)
    assert m["verdict"] == "weaker"  # half the effect, along it
    assert compare_sets(run, run, base)["verdict"] == "identical"
    double = [np.clip(b.astype(int) + 40, 0, 255).astype(np.uint8) for b in base]
    assert compare_sets(double, run, base)["verdict"] == "stronger"
    noise = [rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(2)]
    assert compare_sets(noise, run, base)["verdict"] == "diverged"


def test_prompts_keep_other_tags_and_show_double_application():
    r = [RecipeLora("a", "/x/a.safetensors", 0.6, 0.3)]
    ps = prompts_for("cat <lora:a:0.6>, <lora:other:1>", r)
    assert ps["runtime"] == "cat, <lora:other:1> <lora:a:0.3:0.6>"
    assert ps["baked"] == "cat <lora:a:0.6>, <lora:other:1>"  # as the user has it: a applies twice
    assert ps["base"] == "cat, <lora:other:1>"


def test_correct_three_lora_bake_passes_parity(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)
    rep = parity(check(base, bk, recipe), WeightRenderer(ck, lo), str(tmp / "out"))
    o = rep["parity"]["overall"]
    assert o["verdict"] in PASSING, summary(rep)
    assert o["effect"] > 5 and 0.9 < o["effect_ratio"] < 1.1  # the recipe moves the renders; the bake carries it
    assert len(rep["parity"]["prompts"]) == 3 and not rep["warnings"] and not rep["recipe_findings"]
    assert [os.path.basename(s) for s in rep["sheets"]] == ["sheet-p1.png", "sheet-p2.png", "sheet-p3.png"]
    with open(os.path.join(rep["dir"], "doctor.json")) as f:
        assert json.load(f)["parity"]["overall"]["verdict"] == o["verdict"]
    events = [json.loads(x) for x in open(os.path.join(rep["dir"], "manifest.jsonl"))]
    assert sum(e.get("status") == "ok" for e in events) == 3 * 3 * 2


def test_base_alone_is_not_a_bake(models):
    ck, lo, base, recipe, tmp = models
    rep = parity(check(base, base, recipe), WeightRenderer(ck, lo), str(tmp / "out"))
    assert rep["parity"]["overall"]["verdict"] == "weaker"
    assert rep["parity"]["overall"]["effect_ratio"] == pytest.approx(0.0, abs=1e-6)


def _causes(rep):
    return {c["cause"] for c in rep["causes"]}


def test_text_encoder_at_the_wrong_strength_is_named(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe, styleA=(0.6, 2.0))  # TE of styleA at 2.0 instead of 0.6
    rep = diagnose(
        check(base, bk, recipe, seeds=[1]),
        WeightRenderer(ck, lo),
        str(tmp / "out"),
        ck,
        variants=["rebake", "unet", "te"],
    )
    assert rep["parity"]["overall"]["verdict"] not in PASSING, summary(rep)
    te = [c for c in rep["causes"] if c["cause"] == "te-strength"]
    assert te and te[0]["lora"] == "styleA" and "0.6" in te[0]["fix"], summary(rep)
    assert {v["id"]: v["metrics"]["verdict"] for v in rep["variants"]}["rebake"] in PASSING  # the evidence
    assert no_scratch(ck)


def test_a_lora_left_out_is_named(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe, styleC=None)
    rep = diagnose(
        check(base, bk, recipe, seeds=[1]), WeightRenderer(ck, lo), str(tmp / "out"), ck, variants=["rebake"]
    )
    assert rep["parity"]["overall"]["verdict"] not in PASSING
    left = [c for c in rep["causes"] if c["cause"] == "lora-left-out"]
    assert left and left[0]["lora"] == "styleC", summary(rep)


def test_tags_left_in_the_prompt_are_named(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)
    prompts = [p + " <lora:styleA:0.6>" for p in PROMPTS]
    rep = diagnose(
        check(base, bk, recipe, prompts), WeightRenderer(ck, lo), str(tmp / "out"), ck, variants=["untagged"]
    )
    assert any("double application" in w for w in rep["warnings"])
    assert rep["parity"]["overall"]["verdict"] in ("stronger", "diverged"), summary(rep)
    assert "double-application" in _causes(rep)
    untagged = next(v for v in rep["variants"] if v["id"] == "untagged")
    assert untagged["metrics"]["verdict"] in PASSING  # taking the tags out restores parity


def peft_lora(lo, base, name="peftD.safetensors"):
    """A diffusers/PEFT LoRA without alpha tensors whose header says lora_alpha 16, r 4: the writer meant
    scale 4, the WebUI applies 1 — it bakes 4× stronger than it runs."""
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(base).items()}
    g = torch.Generator().manual_seed(9)
    sd = {}
    for k in UNET_KEYS:
        n = "unet." + unet_ldm_to_diffusers(k[len(U) : -len(".weight")])
        out, inp = shapes[k]
        sd[n + ".lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.15
        sd[n + ".lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.15
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 16})}
    path = os.path.join(lo, name)
    save_file(sd, path, meta)
    return path


def test_a_lora_that_bakes_unlike_it_runs_is_named(models):
    ck, lo, base, recipe, tmp = models
    d = peft_lora(lo, base)
    rec = recipe[:2] + [RecipeLora("peftD", d, 0.5, 0.5)]
    bk = baked(ck, base, rec)
    rep = diagnose(check(base, bk, rec, seeds=[1]), WeightRenderer(ck, lo), str(tmp / "out"), ck, variants=["alone"])
    assert rep["parity"]["overall"]["verdict"] not in PASSING, summary(rep)
    named = [c for c in rep["causes"] if c["cause"] == "lora-bakes-differently"]
    assert [c["lora"] for c in named] == ["peftD"], summary(rep)


def test_fp16_precision_loss_is_named_and_fp32_restores_parity(models):
    ck, lo, base, recipe, tmp = models
    # a base saved fp32 whose text-encoder rows carry a large constant: a LayerNorm'd input makes it
    # invisible in exact arithmetic, but fp16 keeps only 1/8 of 512 + w
    from safetensors.torch import load_file

    sd = load_file(base)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    k = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"
    sd[k] = sd[k] + 512.0
    b32 = os.path.join(ck, "base32.safetensors")
    save_file(sd, b32)
    bk = baked(ck, b32, recipe, name="baked16.safetensors")
    rep = diagnose(check(b32, bk, recipe), WeightRenderer(ck, lo), str(tmp / "out"), ck, variants=["rebake", "fp32"])
    v = {x["id"]: x["metrics"] for x in rep["variants"]}
    assert rep["parity"]["overall"]["verdict"] not in PASSING, summary(rep)
    assert v["fp32"]["verdict"] in PASSING and v["rebake"]["verdict"] not in PASSING
    assert "precision" in _causes(rep), summary(rep)


def test_full_variant_batch_on_a_correct_bake_names_nothing_and_leaves_no_scratch(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)
    r = WeightRenderer(ck, lo)
    rep = diagnose(check(base, bk, recipe, PROMPTS[:2], seeds=[1]), r, str(tmp / "out"), ck)
    ids = [v["id"] for v in rep["variants"]]
    assert ids == [
        "rebake",
        "fp32",
        "alone:styleA",
        "alone:styleB",
        "alone:styleC",
        "unet",
        "te",
        "sequential",
        "scaled",
        "cfg",
    ]  # "untagged" only runs when a prompt holds a baked LoRA's tag
    assert rep["causes"] == [] and "Parity holds" in rep["no_cause"]
    scaled = next(v for v in rep["variants"] if v["id"] == "scaled")["metrics"]
    assert scaled["verdict"] == "weaker" and 0.6 < scaled["effect_ratio"] < 0.95  # 0.8× strengths, measured
    assert len(next(v for v in rep["variants"] if v["id"] == "cfg")["sweep"]) == 4
    assert rep["timing"]["seconds_baking"] > 0 and len(rep["timing"]["bakes"]) == 9
    assert no_scratch(ck) and not rep.get("failed_cells")


def test_cancel_removes_the_scratch_bakes(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)
    r = WeightRenderer(ck, lo)
    cancel = threading.Event()
    seen = []

    def hook(n):  # cancel while the first variant's renders run (its bake is on disk then)
        scratch = [x for x in os.listdir(ck) if x.startswith(SCRATCH)]
        if scratch and os.listdir(os.path.join(ck, scratch[0])):
            seen.append(scratch[0])
            cancel.set()

    r.on_call = hook
    with pytest.raises(Cancelled):
        diagnose(check(base, bk, recipe, PROMPTS[:1]), r, str(tmp / "out"), ck, variants=["fp32"], cancel=cancel)
    assert seen and no_scratch(ck)


def test_keep_scratch_keeps_the_variant_bakes(models):
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)
    rep = diagnose(
        check(base, bk, recipe, PROMPTS[:1]),
        WeightRenderer(ck, lo),
        str(tmp / "out"),
        ck,
        variants=["fp32"],
        keep_scratch=True,
    )
    assert os.listdir(rep["scratch"]) == ["lorakit-doctor-fp32.safetensors"]


@pytest.mark.parametrize("chunk", [None, 96])
def test_sequential_rounding_equals_chained_bakes(tmp_path, monkeypatch, chunk):
    if chunk:  # weights spanning many row chunks (full-size models do)
        import lib_lorakit.bake.engine as engine

        monkeypatch.setattr(engine, "CHUNK_ELEMS", chunk)
    base = tiny_checkpoint(tmp_path, "sd15", name="base.safetensors")
    a = tiny_lora(tmp_path, "sd15", "lora", name="a.safetensors", seed=1, std=0.2)
    b = tiny_lora(tmp_path, "sd15", "loha", name="b.safetensors", seed=2, std=0.2)
    seq = str(tmp_path / "seq.safetensors")
    bake(base, [LoraSpec(a, 0.7), LoraSpec(b, 0.4)], seq, save_dtype="fp16", rounding="sequential")
    one = str(tmp_path / "one.safetensors")
    two = str(tmp_path / "two.safetensors")
    bake(base, [LoraSpec(a, 0.7)], one, save_dtype="fp16")
    bake(one, [LoraSpec(b, 0.4)], two, save_dtype="fp16")  # what a chain of bakes leaves
    summed = str(tmp_path / "sum.safetensors")
    bake(base, [LoraSpec(a, 0.7), LoraSpec(b, 0.4)], summed, save_dtype="fp16")
    from safetensors.torch import load_file

    s, t, u = load_file(seq), load_file(two), load_file(summed)
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert any(not torch.equal(s[k], u[k]) for k in s)  # summing first rounds differently somewhere


def test_runtime_precision_from_the_hosts_flags():
    """What each host applies runtime LoRAs in (doctor/runtime.py), from the flags that decide it."""
    from lib_lorakit.doctor.runtime import precision_warning, runtime_precision

    a1111 = runtime_precision("a1111", {"no_half": True, "precision": "autocast"})
    assert (a1111["text_encoder"], a1111["unet"]) == ("fp32", "fp32")
    assert runtime_precision("a1111", {"no_half": False, "precision": "autocast"})["unet"] == "fp16"
    forge_cpu = runtime_precision("forge", {"always_cpu": True, "clip_in_fp32": False})
    assert (forge_cpu["text_encoder"], forge_cpu["unet"]) == ("fp16", "fp32")
    assert runtime_precision("forge", {"always_cpu": True, "clip_in_fp32": True})["text_encoder"] == "fp32"
    assert runtime_precision("forge", {"all_in_fp32": True})["unet"] == "fp32"
    assert runtime_precision("forge", {}) is None and runtime_precision("a1111", None) is None
    w = precision_warning(forge_cpu, fp32_variant=True)
    assert "text encoder in fp16" in w and "--clip-in-fp32" in w and "UNet" not in w
    assert precision_warning(forge_cpu, fp32_variant=False) is None
    assert precision_warning(a1111, fp32_variant=True) is None


def test_diagnose_records_the_hosts_runtime_precision(models):
    """A host that keeps the text encoder in fp16 (Forge on CPU by default) gets a warning beside the fp32
    variant; one started with --clip-in-fp32 does not. Both reports record what the host said."""
    ck, lo, base, recipe, tmp = models
    bk = baked(ck, base, recipe)

    class Forge(WeightRenderer):
        flags: dict = {}

        def engine(self):
            return "forge"

        def cmd_flags(self):
            return self.flags

    reps = []
    for flags in ({"always_cpu": True}, {"always_cpu": True, "clip_in_fp32": True}):
        be = Forge(ck, lo)
        be.flags = flags
        reps.append(
            diagnose(check(base, bk, recipe, PROMPTS[:1], SEEDS[:1]), be, str(tmp / "o"), ck, variants=["fp32"])
        )
    fp16_te, fp32_te = reps
    assert fp16_te["host_precision"]["text_encoder"] == "fp16" and fp32_te["host_precision"]["text_encoder"] == "fp32"
    assert any("--clip-in-fp32" in w for w in fp16_te["warnings"]), fp16_te["warnings"]
    assert not any("--clip-in-fp32" in w for w in fp32_te["warnings"]), fp32_te["warnings"]
    assert "--clip-in-fp32" in summary(fp16_te)


def test_host_precision_through_a_pool_of_webuis(tmp_path):
    """The command line's --webui makes a pool: the report takes the precision from the member that keeps
    a part below fp32 (it decides the warning), and names that WebUI."""
    from fake_gen import FakeBackend
    from fake_sdapi import FakeWebUI

    from lib_lorakit.doctor.diagnose import _host_precision
    from lib_lorakit.gen.backend import HttpBackend
    from lib_lorakit.gen.pool import Pool

    fake = FakeBackend(str(tmp_path), str(tmp_path), {})
    a = FakeWebUI(fake, engine="a1111", cmd_flags={"no_half": True})
    f = FakeWebUI(fake, engine="forge", cmd_flags={"always_cpu": True})
    try:
        pool = Pool([HttpBackend(a.url), HttpBackend(f.url)])
        pool.refresh()
        p = _host_precision(pool)
        assert (p["engine"], p["text_encoder"], p["webui"]) == ("forge", "fp16", f.url)
        alone = Pool([HttpBackend(a.url)])
        alone.refresh()
        assert _host_precision(alone)["text_encoder"] == "fp32"
    finally:
        a.close()
        f.close()
