"""End-to-end bakes on tiny real-layout checkpoints, checked against float64 recomputations."""

import hashlib
import json
import math
import os
import threading

import pytest
import safetensors.torch
import torch
from factories import files_in, tiny_checkpoint, write
from helpers import worst_fp16_rounding

from lib_lorakit.bake import LoraSpec, bake, parse_lora_arg, summary
from lib_lorakit.errors import Cancelled, MatchError, OutputError, RecipeError, ValueProblem
from lib_lorakit.synth import kohya_modules, make_lora

TE = ("conditioner.", "cond_stage_model.")


def load(path):
    return safetensors.torch.load_file(path)


def expected_lora(base, lora_sd, arch, strength, te_strength=None, *, conv=True, te=True):
    """W + m * alpha/rank * up @ down for every kohya module, in float64."""
    te_strength = strength if te_strength is None else te_strength
    out = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    for name, shape, key, rows in kohya_modules(arch, conv=conv, te=te):
        if name + ".lora_down.weight" not in lora_sd:
            continue
        up = lora_sd[name + ".lora_up.weight"].double()
        down = lora_sd[name + ".lora_down.weight"].double()
        alpha = float(lora_sd[name + ".alpha"])
        r = down.shape[0]
        d = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * (alpha / r)
        m = te_strength if key.startswith(TE) else strength
        w = out[key]
        r0, r1 = rows or (0, w.shape[0])
        w[r0:r1] += m * d.reshape((r1 - r0,) + tuple(w.shape[1:]))
    return out


def half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of float16 numbers around |x| (the largest error one rounding may make)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return 2.0 ** (e - 11)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_lora_matches_float64_and_rounds_once(tmp_path, arch):
    base_p = tiny_checkpoint(tmp_path, arch)
    sd = make_lora(arch, "lora", seed=3)
    lora_p = write(tmp_path, "style.safetensors", sd)
    out = str(tmp_path / "out.safetensors")
    report = bake(base_p, [LoraSpec(lora_p, 0.8, 0.5)], out)
    base, got = load(base_p), load(out)
    exp = expected_lora(base, sd, arch, 0.8, 0.5)
    changed = 0
    for k, v in got.items():
        if not v.is_floating_point():
            assert torch.equal(v, base[k])
            continue
        err = (v.double() - exp[k]).abs()
        assert bool((err <= half_ulp(exp[k]) * 1.001 + 1e-9).all()), k  # one rounding of the fp32 sum
        changed += not torch.equal(v, base[k])
    n_modules = len(kohya_modules(arch))
    assert report["loras"][0]["layers"] == n_modules
    assert sum(report["loras"][0]["matched"].values()) == n_modules
    assert report["tensors"]["modified"] == changed == len({key for _, _, key, _ in kohya_modules(arch)})
    assert "unet" in summary(report) and report["rounding"]["max_abs_rounding_loss"] > 0


def test_fp32_save_is_exact_to_float64(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl", dtype=torch.float32)
    sd = make_lora("sdxl", "lora", seed=4, dtype=torch.float32)
    lora_p = write(tmp_path, "a.safetensors", sd)
    out = str(tmp_path / "out.safetensors")
    bake(base_p, [LoraSpec(lora_p, 1.3)], out, save_dtype="fp32")
    got, exp = load(out), expected_lora(load(base_p), sd, "sdxl", 1.3)
    worst = max(float(((got[k].double() - exp[k]).abs() / exp[k].abs().max()).max()) for k in exp)
    assert worst < 1e-6


def test_untouched_tensors_are_byte_identical_and_inputs_unchanged(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora_p = write(tmp_path, "a.safetensors", make_lora("sdxl", "lora", conv=False, te=False))
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (base_p, lora_p)}
    out = str(tmp_path / "out.safetensors")
    bake(base_p, [LoraSpec(lora_p)], out)
    base, got = load(base_p), load(out)
    targets = {key for _, _, key, _ in kohya_modules("sdxl", conv=False, te=False)}
    for k in base:
        if k not in targets:
            assert got[k].dtype == base[k].dtype and torch.equal(got[k], base[k]), k
    assert got["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert before == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (base_p, lora_p)}
    assert files_in(tmp_path) == sorted(["sdxl-base.safetensors", "a.safetensors", "out.safetensors"])


def test_clip_g_q_proj_changes_only_its_slice(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(20, 2, generator=g), torch.randn(2, 20, generator=g)
    lora = {
        "lora_te2_text_model_encoder_layers_7_self_attn_k_proj.lora_up.weight": up,
        "lora_te2_text_model_encoder_layers_7_self_attn_k_proj.lora_down.weight": down,
        "lora_te2_text_model_encoder_layers_7_self_attn_k_proj.alpha": torch.tensor(1.0),
    }
    lora_p = write(tmp_path, "g.safetensors", lora)
    out = str(tmp_path / "out.safetensors")
    rep = bake(base_p, [LoraSpec(lora_p, 1.0, 0.6)], out, save_dtype="fp32")
    key = "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight"
    w0, w1 = load(base_p)[key].double(), load(out)[key].double()
    assert torch.equal(w0[:20], w1[:20]) and torch.equal(w0[40:], w1[40:])  # q and v untouched
    assert torch.allclose(w1[20:40] - w0[20:40], 0.6 * 0.5 * (up @ down).double(), atol=1e-6)
    assert rep["loras"][0]["matched"] == {"unet": 0, "te1": 0, "te2": 1}


@pytest.mark.parametrize("readers", [1, 3])
def test_mixed_algorithms_summed_once_against_float64(tmp_path, monkeypatch, readers):
    """Also with three reader threads taking the keys in turn (what a machine with 8+ cores gets)."""
    import lib_lorakit.bake.engine as bk

    monkeypatch.setattr(bk, "reader_count", lambda: readers)
    base_p = tiny_checkpoint(tmp_path, "sdxl", seed=5)
    from lib_lorakit.formats.sources import open_source

    with open_source(base_p) as src:
        sds = {
            "lora": make_lora("sdxl", "lora", seed=6),
            "lokr": make_lora("sdxl", "lokr", seed=7, conv=False),
            "loha": make_lora("sdxl", "loha", seed=8, te=False),
            "dora": make_lora("sdxl", "dora", seed=9, conv=False, te=False, base=src),
        }
    strengths = {"lora": 0.7, "lokr": 0.6, "loha": 0.9, "dora": 0.5}
    paths = {n: write(tmp_path, f"{n}.safetensors", sd) for n, sd in sds.items()}
    out = str(tmp_path / "out.safetensors")
    bake(base_p, [LoraSpec(paths[n], strengths[n]) for n in sds], out)
    base = load(base_p)
    w0 = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for n, sd in sds.items():
        for name, shape, key, rows in kohya_modules("sdxl"):
            p = {k.split(".", 1)[1]: v.double() for k, v in sd.items() if k.split(".")[0] == name}
            if not p:
                continue
            r0, r1 = rows or (0, w0[key].shape[0])
            w = w0[key][r0:r1]
            if n == "lora":
                rk = p["lora_down.weight"].shape[0]
                d = p["lora_up.weight"].reshape(-1, rk) @ p["lora_down.weight"].reshape(rk, -1) * p["alpha"] / rk
            elif n == "loha":
                rk = p["hada_w1_b"].shape[0]
                d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * p["alpha"] / rk
            elif n == "lokr":
                w2 = (
                    p["lokr_w2"]
                    if "lokr_w2" in p
                    else p["lokr_w2_a"] @ p["lokr_w2_b"].reshape(p["lokr_w2_b"].shape[0], -1)
                )
                rk = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else None
                d = torch.kron(p["lokr_w1"], w2.reshape(w2.shape[0], -1)) * (p["alpha"] / rk if rk else 1.0)
            else:  # DoRA, per-output magnitudes: m * V / |V|_row - W
                rk = p["lora_down.weight"].shape[0]
                v = w.reshape(w.shape[0], -1) + p["lora_up.weight"] @ p["lora_down.weight"] * p["alpha"] / rk
                d = p["dora_scale"].reshape(-1, 1) * v / v.norm(dim=1, keepdim=True) - w.reshape(w.shape[0], -1)
            total[key][r0:r1] += strengths[n] * d.reshape(w.shape)
    got = load(out)
    for k in w0:
        exp = w0[k] + total[k]
        err = (got[k].double() - exp).abs()
        assert bool((err <= half_ulp(exp) * 1.001 + 1e-6).all()), k


def test_sequential_rounding_drifts_but_bake_rounds_once(tmp_path):
    """The quiet fp16 drift of add-then-round per LoRA, which lorakit avoids."""
    base_p = tiny_checkpoint(tmp_path, "sd15", seed=11)
    sds = [make_lora("sd15", "lora", seed=20 + i, std=0.01, conv=False) for i in range(4)]
    paths = [write(tmp_path, f"l{i}.safetensors", sd) for i, sd in enumerate(sds)]
    out = str(tmp_path / "out.safetensors")
    bake(base_p, [LoraSpec(p, 0.5) for p in paths], out)
    base, got = load(base_p), load(out)
    exact = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    seq = {k: v.clone() for k, v in base.items() if v.is_floating_point()}
    for sd in sds:
        e1 = expected_lora({k: v.float() for k, v in seq.items()}, sd, "sd15", 0.5, conv=False)
        seq = {k: v.half() for k, v in e1.items()}
    for sd in sds:
        exact = {
            k: v
            for k, v in expected_lora({k: v.float() for k, v in exact.items()}, sd, "sd15", 0.5, conv=False).items()
        }
    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    ours = (got[key].double() - exact[key]).abs().max()
    theirs = (seq[key].double() - exact[key]).abs().max()
    assert ours <= half_ulp(exact[key]).max() * 1.001
    assert theirs > ours


def test_block_weights_preset_and_vector(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sd15")
    lora_p = write(tmp_path, "a.safetensors", make_lora("sd15", "lora", conv=False))
    base = load(base_p)
    out = str(tmp_path / "ins.safetensors")
    rep = bake(base_p, [LoraSpec(lora_p, 1.0, blocks="INALL")], out)
    got = load(out)
    outkey = "model.diffusion_model.output_blocks.4.1.proj_in.weight"
    inkey = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    tekey = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(got[outkey], base[outkey]) and not torch.equal(got[inkey], base[inkey])
    assert not torch.equal(got[tekey], base[tekey])  # INALL keeps BASE = 1
    assert rep["loras"][0]["blocks"].startswith("1,0,1,1,0,1,1")  # full 26-value vector: BASE, IN00=0 (unlisted)...
    out2 = str(tmp_path / "vec.safetensors")
    vec = ",".join(["0"] + ["1"] * 16)  # 17 values: text encoder off
    bake(base_p, [LoraSpec(lora_p, 1.0, blocks=vec)], out2)
    got2 = load(out2)
    assert torch.equal(got2[tekey], base[tekey]) and not torch.equal(got2[outkey], base[outkey])


def test_block_weights_scale_the_update(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl", dtype=torch.float32)
    sd = make_lora("sdxl", "lora", conv=False, te=False, dtype=torch.float32)
    lora_p = write(tmp_path, "a.safetensors", sd)
    full = str(tmp_path / "full.safetensors")
    half = str(tmp_path / "half.safetensors")
    bake(base_p, [LoraSpec(lora_p)], full, save_dtype="fp32")
    bake(base_p, [LoraSpec(lora_p, blocks="IN04=0.5,OUT02=0")], half, save_dtype="fp32")
    b, f, h = load(base_p), load(full), load(half)
    k4 = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    k7 = "model.diffusion_model.input_blocks.7.1.proj_in.weight"
    ko = "model.diffusion_model.output_blocks.2.1.proj_in.weight"
    assert torch.allclose(h[k4] - b[k4], 0.5 * (f[k4] - b[k4]), atol=1e-6)
    assert torch.equal(h[k7], f[k7]) and torch.equal(h[ko], b[ko])


def test_recipe_metadata_and_hashes(tmp_path):
    base_p = tiny_checkpoint(
        tmp_path,
        "sdxl",
        metadata={
            "modelspec.title": "Base",
            "modelspec.hash_sha256": "stale",
            "modelspec.architecture": "stable-diffusion-xl-v1-base",
        },
    )
    lora_p = write(tmp_path, "style.safetensors", make_lora("sdxl", "lora", conv=False))
    out = str(tmp_path / "out.safetensors")
    rep = bake(base_p, [LoraSpec(lora_p, 0.75, 0.25, blocks="ALL")], out, save_dtype="bf16")
    from lib_lorakit import __version__
    from lib_lorakit.formats.safetensors_io import SafetensorsFile

    with SafetensorsFile(out) as f:
        meta = f.metadata
    recipe = json.loads(meta["lorakit.recipe"])
    sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert recipe["base"] == {"file": "sdxl-base.safetensors", "sha256": sha(base_p), "arch": "sdxl"}
    assert recipe["loras"][0]["sha256"] == sha(lora_p) and recipe["loras"][0]["name"] == "style"
    assert recipe["loras"][0]["strength"] == 0.75 and recipe["loras"][0]["te_strength"] == 0.25
    assert recipe["loras"][0]["blocks"] == ",".join(["1"] * 20)
    assert recipe["save_dtype"] == "bf16" and meta["lorakit.version"] == __version__
    assert meta["modelspec.title"] == "Base" and "modelspec.hash_sha256" not in meta
    assert rep["base"]["sha256"] == sha(base_p)
    got = load(out)
    assert all(v.dtype in (torch.bfloat16, torch.int64) for v in got.values())


def test_fp16_overflow_is_refused(tmp_path):
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora = {
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.full((10, 1), 300.0),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.full((1, 10), 300.0),
    }
    lora_p = write(tmp_path, "hot.safetensors", lora)
    with pytest.raises(ValueProblem, match=rf"{key}: a baked weight reaches 9\d{{4}}.*float16 range") as e:
        bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))
    assert "save dtype bf16 or fp32" in str(e.value)
    assert files_in(tmp_path) == ["hot.safetensors", "sdxl-base.safetensors"]
    rep = bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"), save_dtype="fp32")
    assert rep["rounding"]["max_abs_weight"] > 65504


def test_dry_run_writes_nothing(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora_p = write(tmp_path, "a.safetensors", make_lora("sdxl", "lokr", conv=False))
    rep = bake(base_p, [LoraSpec(lora_p)], None, dry_run=True)
    assert rep["dry_run"] and rep["output"] is None and rep["loras"][0]["algorithms"] == {"lokr": 986}
    assert files_in(tmp_path) == ["a.safetensors", "sdxl-base.safetensors"]


def test_unmatched_layers_fail_loudly_or_are_listed(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    sd = make_lora("sdxl", "lora", conv=False, te=False)
    sd["lora_unet_input_blocks_11_1_proj_in.lora_up.weight"] = torch.zeros(5, 2)
    sd["lora_unet_input_blocks_11_1_proj_in.lora_down.weight"] = torch.zeros(2, 5)
    sd["lora_unet_input_blocks_4_1_proj_in.mystery_param"] = torch.zeros(2)
    lora_p = write(tmp_path, "odd.safetensors", sd)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(MatchError) as e:
        bake(base_p, [LoraSpec(lora_p)], out)
    msg = str(e.value)
    assert "2 of 724 LoRA layers in" in msg and "odd.safetensors" in msg
    assert "lora_unet_input_blocks_11_1_proj_in: no such module in the checkpoint" in msg
    assert "unknown algorithm" in msg and "allow-unmatched option" in msg
    assert not os.path.exists(out)
    rep = bake(base_p, [LoraSpec(lora_p)], out, allow_unmatched=True)
    assert {u["layer"] for u in rep["loras"][0]["unmatched"]} == {
        "lora_unet_input_blocks_11_1_proj_in",
        "lora_unet_input_blocks_4_1_proj_in.mystery_param",
    }
    assert any("matched nothing" in w for w in rep["warnings"])


def test_shape_mismatch_is_an_error(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora = {
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(7, 2),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 10),
    }
    lora_p = write(tmp_path, "bad.safetensors", lora)
    with pytest.raises(
        MatchError, match=r"shape mismatch with model\.diffusion_model\.input_blocks\.4\.1\.proj_in\.weight \[10, 10\]"
    ):
        bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))


def _nan_lora(tmp_path):
    """An SDXL base and a LoRA with one NaN (in a UNet up weight): (base, LoRA, that key)."""
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    sd = make_lora("sdxl", "lora", conv=False, te=False)
    k = "lora_unet_input_blocks_5_1_proj_out.lora_up.weight"
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    return base_p, write(tmp_path, "nan.safetensors", sd), k


def test_nan_lora_is_refused_and_nothing_is_left(tmp_path):
    base_p, lora_p, k = _nan_lora(tmp_path)
    with pytest.raises(ValueProblem, match=rf"nan\.safetensors has NaN/inf weights in 1 tensor\(s\): {k} \(1 of"):
        bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))
    assert files_in(tmp_path) == ["nan.safetensors", "sdxl-base.safetensors"]


def test_nan_lora_found_by_the_stream_first_still_names_the_lora(tmp_path, monkeypatch):
    """The LoRA check runs beside the stream: when the maths meets the NaN before the check has read
    it, the error is still the check's (the file and tensor), and nothing is left."""
    import lib_lorakit.bake.engine as bk

    base_p, lora_p, k = _nan_lora(tmp_path)
    real = bk.check_lora_values
    streamed = threading.Event()

    def late_check(plan, progress=None, cancel=None):
        streamed.wait(30)  # start only once the stream has failed
        return real(plan, cancel=None)

    real_prefer = bk._LoraCheck.prefer

    def prefer(self, e):
        assert isinstance(e, ValueProblem) and "gives NaN/inf" in str(e)  # the stream's own error came first
        streamed.set()
        return real_prefer(self, e)

    monkeypatch.setattr(bk, "check_lora_values", late_check)
    monkeypatch.setattr(bk._LoraCheck, "prefer", prefer)
    with pytest.raises(ValueProblem, match=rf"nan\.safetensors has NaN/inf weights in 1 tensor\(s\): {k} \(1 of"):
        bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))
    assert streamed.is_set()
    assert files_in(tmp_path) == ["nan.safetensors", "sdxl-base.safetensors"]


def test_lora_hashes_are_patched_in_when_the_check_ends_after_the_stream(tmp_path, monkeypatch):
    import lib_lorakit.bake.engine as bk

    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora_p = write(tmp_path, "style.safetensors", make_lora("sdxl", "lora", conv=False, te=False))
    real = bk.check_lora_values
    real_result = bk._LoraCheck.result
    streamed = threading.Event()
    order = []

    def late_check(plan, progress=None, cancel=None):
        assert streamed.wait(30)  # begins only once every tensor is written and the stream waits for it
        order.append("check")
        return real(plan, cancel=cancel)

    def result(self, cancel, profile):
        order.append("stream done")
        streamed.set()
        return real_result(self, cancel, profile)

    monkeypatch.setattr(bk, "check_lora_values", late_check)
    monkeypatch.setattr(bk._LoraCheck, "result", result)
    out = str(tmp_path / "out.safetensors")
    rep = bake(base_p, [LoraSpec(lora_p)], out)
    assert order == ["stream done", "check"]
    from lib_lorakit.formats.safetensors_io import SafetensorsFile

    with SafetensorsFile(out) as f:
        recipe = json.loads(f.metadata["lorakit.recipe"])
    assert recipe["loras"][0]["sha256"] == hashlib.sha256(open(lora_p, "rb").read()).hexdigest()
    assert rep["loras"][0]["sha256"] == recipe["loras"][0]["sha256"]
    assert rep["engine"]["stages"]["wait check"] > 0


def test_embedded_textual_inversions_are_reported(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    sd = make_lora("sdxl", "lora", conv=False, te=False)
    sd["bundle_emb.mychar.clip_l"] = torch.zeros(2, 12)
    sd["bundle_emb.mychar.clip_g"] = torch.zeros(2, 20)
    lora_p = write(tmp_path, "emb.safetensors", sd)
    rep = bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))
    assert rep["loras"][0]["embeddings_not_baked"] == ["mychar"]
    assert any("mychar" in w and "textual inversion" in w for w in rep["warnings"])


@pytest.mark.parametrize("readers", [1, 3])
@pytest.mark.parametrize("how", ["cancel", "interrupt", "error"])
def test_cancel_or_interrupt_leaves_no_debris(tmp_path, monkeypatch, how, readers):
    import lib_lorakit.bake.engine as bk

    monkeypatch.setattr(bk, "reader_count", lambda: readers)
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    lora_p = write(tmp_path, "a.safetensors", make_lora("sdxl", "lora"))
    out = str(tmp_path / "out.safetensors")
    ev = threading.Event()
    seen = []

    def progress(frac, msg):
        seen.append(frac)
        if frac > 0.02 and "baking" in msg:
            if how == "cancel":
                ev.set()
            elif how == "interrupt":
                raise KeyboardInterrupt
            else:
                raise RuntimeError("disk on fire")

    old = bk.time.perf_counter
    ticks = iter(range(10**9))
    bk.time.perf_counter = lambda: next(ticks)  # every tensor reports progress
    try:
        exc = {"cancel": Cancelled, "interrupt": KeyboardInterrupt, "error": RuntimeError}[how]
        with pytest.raises(exc):
            bake(base_p, [LoraSpec(lora_p)], out, progress=progress, cancel=ev)
    finally:
        bk.time.perf_counter = old
    assert seen and files_in(tmp_path) == ["a.safetensors", "sdxl-base.safetensors"]


def test_output_rules(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sd15")
    lora_p = write(tmp_path, "a.safetensors", make_lora("sd15", "lora", conv=False))
    with pytest.raises(OutputError, match="is one of the inputs"):
        bake(base_p, [LoraSpec(lora_p)], base_p, overwrite=True)
    out = str(tmp_path / "out.safetensors")
    open(out, "wb").write(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        bake(base_p, [LoraSpec(lora_p)], out)
    assert open(out, "rb").read() == b"precious"
    bake(base_p, [LoraSpec(lora_p)], out, overwrite=True)
    assert len(load(out)) == 1131
    with pytest.raises(RecipeError, match="must end in .safetensors"):
        bake(base_p, [LoraSpec(lora_p)], str(tmp_path / "x.ckpt"))


def test_pickle_checkpoint_is_read_weights_only(tmp_path):
    base_p = tiny_checkpoint(tmp_path, "sd15", dtype=torch.float32)
    ckpt = str(tmp_path / "base.ckpt")
    torch.save({"state_dict": load(base_p), "global_step": 10}, ckpt)
    lora_p = write(tmp_path, "a.safetensors", make_lora("sd15", "lora", conv=False))
    a, b = str(tmp_path / "a.out.safetensors"), str(tmp_path / "b.out.safetensors")
    bake(base_p, [LoraSpec(lora_p)], a)
    bake(ckpt, [LoraSpec(lora_p)], b)
    ga, gb = load(a), load(b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/lorakit-pwned",))


def test_unsafe_pickle_is_refused(tmp_path):
    p = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, p)
    lora_p = write(tmp_path, "a.safetensors", make_lora("sd15", "lora", conv=False))
    from lib_lorakit.errors import FormatError

    with pytest.raises(FormatError, match=r"evil\.ckpt: this pickle file holds Python objects") as e:
        bake(p, [LoraSpec(lora_p)], str(tmp_path / "out.safetensors"))
    assert "safetensors" in str(e.value) and not os.path.exists("/tmp/lorakit-pwned")


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors") == LoraSpec("a.safetensors", 1.0, None)
    assert parse_lora_arg("a.safetensors:0.5") == LoraSpec("a.safetensors", 0.5, None)
    assert parse_lora_arg("C:\\loras\\a.safetensors:0.5:0.25") == LoraSpec("C:\\loras\\a.safetensors", 0.5, 0.25)
    assert parse_lora_arg("dir:with:colons/a.safetensors:-1") == LoraSpec("dir:with:colons/a.safetensors", -1.0, None)
    with pytest.raises(RecipeError, match="not a finite number"):
        parse_lora_arg("a.safetensors:nan")
    assert math.isfinite(parse_lora_arg("a:2").strength)


def test_reported_rounding_loss_is_the_largest_of_the_whole_bake(tmp_path, monkeypatch):
    """The engine measures the rounding loss only in chunks whose values could still beat the largest found
    so far (streaming.max_rounding_error); the figure must still be the exact maximum, recomputed here
    from float64 over every tensor. Tiny chunks put each tensor in many of them."""
    import lib_lorakit.bake.engine as eng

    monkeypatch.setattr(eng, "CHUNK_ELEMS", 2048)
    base_p = tiny_checkpoint(tmp_path, "sdxl")
    sd = make_lora("sdxl", "lora", seed=6, std=0.3)
    lora_p = write(tmp_path, "a.safetensors", sd)
    out = str(tmp_path / "out.safetensors")
    report = bake(base_p, [LoraSpec(lora_p, 1.7)], out)
    worst, worst_key = worst_fp16_rounding(expected_lora(load(base_p), sd, "sdxl", 1.7))
    r = report["rounding"]
    assert r["max_abs_rounding_loss"] == pytest.approx(worst, rel=1e-3), (r, worst_key)
    assert r["key"] == worst_key


def test_whole_tensor_maths_is_exact_too(tmp_path, monkeypatch):
    """LORAKIT_MATHS=whole (per-tensor maths, the many-core experiment) keeps one rounding of the fp32 sum."""
    monkeypatch.setenv("LORAKIT_MATHS", "whole")
    test_single_lora_matches_float64_and_rounds_once(tmp_path, "sdxl")
