"""Workshop: extract, resize, lora-merge and clean against independent computations.

Exactness is checked against the LoRA's own factors (up @ down · alpha/rank), float64 SVDs,
the bake engine and raw file bytes, never against the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch

from lib_lorakit.bake import LoraSpec, bake
from lib_lorakit.errors import Cancelled, FormatError, OutputError, RecipeError
from lib_lorakit.formats.arch import ARCHS
from lib_lorakit.formats.safetensors_io import SafetensorsFile, read_header, save_file
from lib_lorakit.networks.resolve import TargetIndex
from lib_lorakit.synth import kohya_modules, make_lora, write_checkpoint
from lib_lorakit.workshop import clean, extract, file_hashes, lora_merge, resize, svd
from lib_lorakit.workshop.modules import kohya_modules as workshop_modules

TINY = 16  # 1280 -> 80 wide: at rank 2, q = 34 < 80 / 2, so these layers go through the randomized path
TINY_M = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: the reference SVDs here are of small matrices, where a second thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(path):
    with SafetensorsFile(path) as f:
        return {k: f.read(k).clone() for k in f.keys()}, dict(f.metadata)


def _delta(sd, name, shape):
    """ΔW of a kohya module from its tensors: up @ down · alpha / rank, in float64."""
    up, down = sd[name + ".lora_up.weight"].double(), sd[name + ".lora_down.weight"].double()
    r = down.shape[0]
    alpha = float(sd[name + ".alpha"]) if name + ".alpha" in sd else r
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1) * (alpha / r)).reshape(shape[0], -1)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _ulps_fp16(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in fp16 units in the last place of each element of b (no floor but fp16's own:
    below 2^-14 the spacing is the subnormal 2^-24)."""
    a, b = a.double(), b.double()
    mag = b.abs().clamp_min(2.0**-14)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 10)
    return float(((a - b).abs() / ulp).max())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An fp32 SDXL base (real layout, 1/16 widths) and base + a known rank-4 LoRA baked in fp32."""
    d = tmp_path_factory.mktemp("pair")
    base = str(d / "base.safetensors")
    write_checkpoint(base, "sdxl", tiny=TINY, dtype=torch.float32)
    lora = str(d / "known.safetensors")
    save_file(make_lora("sdxl", "lora", rank=4, alpha=4, tiny=TINY, dtype=torch.float32, std=0.2, seed=3), lora)
    tuned = str(d / "tuned.safetensors")
    bake(base, [LoraSpec(path=lora)], tuned, save_dtype="fp32")
    return d, base, lora, tuned


@pytest.fixture(scope="module")
def ex4(pair):
    """The rank-4 extraction of the pair (fp32), with its report."""
    d, base, _, tuned = pair
    out = str(d / "ex4.safetensors")
    return out, extract(tuned, base, out, rank=4, conv_rank=4, save="fp32")


# --- SVD helpers ------------------------------------------------------------------------------


def test_choose_rank_follows_resize_lora_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.1])
    # sv_ratio:3 keeps values above 4/3 -> 2 of them; resize_lora.py's new rank is index + 1 = 3
    assert svd.choose_rank(s, 10, ("sv_ratio", 3.0)) == 3
    # sv_fro:0.9: cumulative S^2 / total = .7504, .9380, ... -> searchsorted(0.81) = 1 -> index 2 -> rank 3
    assert svd.choose_rank(s, 10, ("sv_fro", 0.9)) == 3
    # sv_cumulative:0.8: cumsum / 7.85 = .51, .764, .891 -> searchsorted(0.8) = 2 -> index 3 -> rank 4
    assert svd.choose_rank(s, 10, ("sv_cumulative", 0.8)) == 4
    assert svd.choose_rank(s, 2, ("sv_cumulative", 0.8)) == 2  # capped at the given rank
    assert svd.choose_rank(torch.zeros(4), 8, ("sv_fro", 0.9)) == 1  # zero matrix -> rank 1
    assert svd.choose_rank(s, 3, None) == 3


@pytest.mark.parametrize("text", ["sv_fro", "sv_fro:1.5", "sv_ratio:0.5", "foo:1", "sv_fro:x"])
def test_bad_dynamic_rules_are_refused(text):
    with pytest.raises(RecipeError, match="ynamic rank rule"):
        svd.parse_dynamic(text)


def _spectrum_matrix(out, inn, decay, noise, seed):
    g = torch.Generator().manual_seed(seed)
    r = min(out, inn)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inn, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -decay
    m = (u * s) @ v.T + noise * torch.randn(out, inn, generator=g, dtype=torch.float64) / inn**0.5
    return m.float()


@pytest.mark.parametrize("shape,decay,noise", [((320, 240), 0.7, 0.0), ((240, 480), 0.5, 0.05), ((400, 160), 1.0, 0.2)])
def test_randomized_svd_is_within_one_percent_of_the_optimum(shape, decay, noise):
    m = _spectrum_matrix(*shape, decay, noise, seed=1)
    f = svd.factor(m, 16)
    assert f.method == "randomized"
    s = torch.linalg.svdvals(m.double())
    optimum = float((s[16:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    achieved = float(torch.linalg.norm(m.double() - f.up.double() @ f.down.double()) / torch.linalg.norm(m.double()))
    assert achieved <= optimum * 1.01
    assert abs(f.rel_err - achieved) < 1e-3  # the reported error is the real one


def test_factor_batch_of_mixed_members_matches_float64_svd_per_layer():
    """One stack holding a decaying spectrum (iterates), a zero matrix and a rank-5 matrix (range
    caught at once): each member against its own float64 SVD."""
    g = torch.Generator().manual_seed(5)
    low = (torch.randn(200, 5, generator=g) @ torch.randn(5, 120, generator=g)).float()
    stack = torch.stack([_spectrum_matrix(200, 120, 0.6, 0.05, seed=2), torch.zeros(200, 120), low])
    fs = svd.factor_batch(stack, 8)
    for m, f in zip(stack, fs):
        m64 = m.double()
        got = f.up.double() @ f.down.double()
        if not m.any():
            assert f.rank == 1 and not got.any()
            continue
        s = torch.linalg.svdvals(m64)
        optimum = float((s[8:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        achieved = float(torch.linalg.norm(m64 - got) / torch.linalg.norm(m64))
        assert achieved <= optimum * 1.01 + 1e-6
        assert abs(f.rel_err - achieved) <= 1e-3 * max(optimum, 1e-3)
    assert fs[0].method == fs[2].method == "randomized"
    assert _rel(fs[2].up @ fs[2].down, low) < 1e-6  # rank 5 < 8: recovered to float32 rounding


def test_randomized_svd_recovers_a_low_rank_matrix_exactly():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(300, 6, generator=g) @ torch.randn(6, 200, generator=g)
    f = svd.factor(m, 8)
    assert f.method == "randomized" and f.rank == 8
    assert _rel(f.up @ f.down, m) < 1e-5


def test_factor_product_equals_truncated_svd_of_the_product():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(90, 12, generator=g), torch.randn(12, 70, generator=g)
    f = svd.factor_product(a, b, 5)
    u, s, vh = torch.linalg.svd(a.double() @ b.double())
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert _rel(f.up @ f.down, best) < 1e-5
    assert f.rel_err == pytest.approx(float((s[5:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), rel=1e-6)


def test_cholesky_qr_orthonormalises_full_ill_conditioned_and_rank_deficient_blocks():
    """The GPU's orthonormalisation (shifted CholeskyQR3), run here on the CPU: QᵀQ = I and span(Q) ⊇
    span(Y) to float32 rounding, checked against Householder QR's projector (LAPACK)."""
    g = torch.Generator().manual_seed(0)
    blocks = (
        torch.randn(2, 300, 24, generator=g),
        torch.randn(2, 300, 24, generator=g) @ torch.diag(torch.logspace(0, -6, 24)),
        torch.randn(2, 300, 3, generator=g) @ torch.randn(3, 24, generator=g),  # rank 3 of 24
    )
    for y in blocks:
        q = svd._cholesky_qr3(y).double()
        assert float((q.mT @ q - torch.eye(24, dtype=torch.float64)).abs().max()) < 1e-6
        ref = torch.linalg.qr(y.double()).Q
        y64 = y.double()
        for a in (q, ref):  # y lies in the span of both
            assert float(torch.linalg.norm(y64 - a @ (a.mT @ y64)) / torch.linalg.norm(y64)) < 1e-6
        if y.shape[-1] == torch.linalg.matrix_rank(y[0].double()):  # full rank: the same projector
            assert float((q @ q.mT - ref @ ref.mT).abs().max()) < 1e-5


# --- extract ----------------------------------------------------------------------------------


def test_module_set_and_names_match_kohya_and_the_resolver(pair):
    _, base, _, _ = pair
    with SafetensorsFile(base) as f:
        shapes = {k: t.shape for k, t in f.tensors.items()}
    mods = workshop_modules(shapes, ARCHS["sdxl"], conv=True)
    expected = {(n, k, r) for n, _, k, r in kohya_modules("sdxl", conv=True, tiny=TINY)}
    assert {(m.name, m.key, m.rows) for m in mods} == expected
    index = TargetIndex(shapes, ARCHS["sdxl"])
    for m in mods:  # every name resolves back to the same weight (and the same CLIP-G slice)
        t, problem = index.find(m.name)
        assert t is not None, (m.name, problem)
        assert (t.weight_key, t.rows) == (m.key, m.rows)
    assert sum(1 for m in mods if m.rows) == 3 * 32  # CLIP-G q/k/v of 32 layers at 1/16 width


def test_extract_at_rank_at_least_r_recovers_delta(pair, ex4):
    d, base, lora, tuned = pair
    out, rep = ex4
    got, meta = _load(out)
    known, _ = _load(lora)
    names = {k.split(".")[0] for k in known}
    assert set(rep["layers"]) == names and not rep["skipped"]
    assert {k.split(".")[0] for k in got} == names
    shapes = {n: s for n, s, _, _ in kohya_modules("sdxl", conv=True, tiny=TINY)}
    worst = max(_rel(_delta(got, n, shapes[n]), _delta(known, n, shapes[n])) for n in names)
    assert worst <= 1e-4
    assert any(n.startswith("lora_te2_") and n.endswith("_q_proj") for n in names)
    info = json.loads(meta["lorakit.extract"])
    assert info["tuned"] == "tuned.safetensors" and len(info["tuned_sha256"]) == 64
    assert meta["ss_network_module"] == "networks.lora" and meta["modelspec.architecture"].endswith("/lora")


def test_baking_the_extraction_gives_the_tuned_model_within_one_ulp(pair, ex4):
    d, base, _, tuned = pair
    ex = ex4[0]
    back = str(d / "back.safetensors")
    bake(base, [LoraSpec(path=ex)], back, save_dtype="fp16")
    a, _ = _load(back)
    b, _ = _load(tuned)  # the fp32 tuned model: rounding alone is half an ulp
    touched = {m[2] for m in kohya_modules("sdxl", conv=True, tiny=TINY)}
    assert max(_ulps_fp16(a[k], b[k]) for k in touched) <= 1
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].dtype == torch.float16) > 0


def test_extract_below_r_is_within_one_percent_of_eckart_young(pair):
    d, base, _, tuned = pair
    rep = extract(tuned, base, None, rank=2, conv_rank=2)
    assert rep["methods"].get("randomized", 0) > 0  # the 80-wide layers go through the randomized path
    t, _ = _load(tuned)
    b, _ = _load(base)
    mods = {n: (k, r) for n, _, k, r in kohya_modules("sdxl", conv=True, tiny=TINY)}
    for name, lay in rep["layers"].items():
        key, rows = mods[name]
        diff = t[key].double() - b[key].double()
        if rows:
            diff = diff[rows[0] : rows[1]]
        s = torch.linalg.svdvals(diff.reshape(diff.shape[0], -1))
        optimum = float((s[2:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        assert lay["rel_err"] <= optimum * 1.01 + 1e-7, name


def test_extract_real_error_matches_report_and_dynamic_caps(pair):
    d, base, _, tuned = pair
    out = str(d / "dyn.safetensors")
    rep = extract(tuned, base, out, rank=3, conv_rank=3, dynamic="sv_fro:0.5", blocks="IN04,te2")
    assert all(1 <= v["rank"] <= 3 for v in rep["layers"].values())
    _, meta = _load(out)
    assert meta["ss_network_dim"] == "Dynamic"


def test_extract_skips_unchanged_layers_and_lists_them(tmp_path):
    base = str(tmp_path / "b.safetensors")
    write_checkpoint(base, "sdxl", tiny=TINY, dtype=torch.float32)
    lora = str(tmp_path / "unet-only.safetensors")
    save_file(make_lora("sdxl", rank=2, tiny=TINY, te=False, conv=False, dtype=torch.float32), lora)
    tuned = str(tmp_path / "t.safetensors")
    bake(base, [LoraSpec(path=lora)], tuned, save_dtype="fp32")
    rep = extract(tuned, base, None, rank=2, blocks="te1,te2,IN04")
    skipped = {s["module"] for s in rep["skipped"]}
    assert skipped and all(n.startswith(("lora_te1_", "lora_te2_")) for n in skipped)
    assert rep["layers"] and all(n.startswith("lora_unet_input_blocks_4_") for n in rep["layers"])


def test_extract_refuses_bad_outputs_and_mixed_families(pair, tmp_path):
    d, base, _, tuned = pair
    with pytest.raises(OutputError, match="one of the inputs"):
        extract(tuned, base, base, rank=2, overwrite=True)
    existing = str(d / "known.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        extract(tuned, base, existing, rank=2)
    sd15 = str(tmp_path / "sd15.safetensors")
    write_checkpoint(sd15, "sd15", tiny=True)
    with pytest.raises(Exception, match="family|SD1.5"):
        extract(tuned, sd15, str(tmp_path / "x.safetensors"), rank=2)
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_extract_cancel_leaves_no_file(pair):
    d, base, _, tuned = pair
    out = str(d / "cancelled.safetensors")
    seen = []
    with pytest.raises(Cancelled):
        extract(tuned, base, out, rank=2, progress=lambda a, b, t: seen.append((a, b)), cancel=lambda: len(seen) > 5)
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(d) if "lorakit-tmp" in f]


# --- resize -----------------------------------------------------------------------------------


def test_resize_is_the_exact_truncated_svd_and_keeps_alpha_ratio(tmp_path):
    src = str(tmp_path / "r8.safetensors")
    save_file(make_lora("sdxl", rank=8, alpha=4, tiny=TINY, dtype=torch.float32, seed=5), src)
    out = str(tmp_path / "r3.safetensors")
    rep = resize(src, out, rank=3, save="fp32")
    a, _ = _load(src)
    b, meta = _load(out)
    shapes = {n: s for n, s, _, _ in kohya_modules("sdxl", conv=True, tiny=TINY)}
    for name, lay in rep["layers"].items():
        m = _delta(a, name, shapes[name])
        u, s, vh = torch.linalg.svd(m)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert _rel(_delta(b, name, shapes[name]), best) < 1e-4, name
        assert lay["rel_err"] == pytest.approx(float((s[3:] ** 2).sum().sqrt() / (s**2).sum().sqrt()), abs=1e-6)
        assert float(b[name + ".alpha"]) / 3 == pytest.approx(4 / 8)  # alpha/rank kept, as resize_lora.py
    assert meta["ss_network_dim"] == "3" and "sshs_model_hash" not in meta


def test_resize_loha_through_its_delta(tmp_path):
    base = str(tmp_path / "b.safetensors")
    write_checkpoint(base, "sdxl", tiny=TINY, dtype=torch.float32)
    src = str(tmp_path / "loha.safetensors")
    save_file(make_lora("sdxl", "loha", rank=4, tiny=TINY, dtype=torch.float32, seed=6), src)
    rep = resize(src, str(tmp_path / "loha-r4.safetensors"), rank=4, base=base, save="fp32")
    assert rep["modules"] > 100
    from lib_lorakit.networks import compute_delta, identify

    a, _ = _load(src)
    b, _ = _load(str(tmp_path / "loha-r4.safetensors"))
    shapes = {n: s for n, s, _, _ in kohya_modules("sdxl", conv=True, tiny=TINY)}
    for name in list(rep["layers"])[::25]:
        p = {k.split(".", 1)[1]: v for k, v in a.items() if k.split(".")[0] == name}
        dw = compute_delta(identify(frozenset(p))[0], p, shapes[name], None).to_dense(shapes[name]).double()
        s = torch.linalg.svdvals(dw.reshape(dw.shape[0], -1))
        optimum = float((s[4:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        got = _delta(b, name, shapes[name])
        err = float(torch.linalg.norm(got - dw.reshape(dw.shape[0], -1)) / torch.linalg.norm(dw))
        assert err <= optimum * 1.01 + 1e-6, name


def test_resize_needs_a_rank_or_a_rule(tmp_path):
    src = str(tmp_path / "l.safetensors")
    save_file(make_lora("sdxl", rank=2, tiny=TINY), src)
    with pytest.raises(RecipeError, match="needs a new rank"):
        resize(src, str(tmp_path / "o.safetensors"))


# --- lora-merge -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    base = str(d / "base.safetensors")
    write_checkpoint(base, "sdxl", tiny=TINY_M, dtype=torch.float16)
    a, b = str(d / "a.safetensors"), str(d / "b.safetensors")
    save_file(make_lora("sdxl", rank=4, alpha=2, tiny=TINY_M, seed=7, std=0.1), a)
    save_file(make_lora("sdxl", rank=2, alpha=2, tiny=TINY_M, seed=8, std=0.1), b)
    return d, base, a, b


def test_concat_merge_bakes_like_both_loras(two):
    d, base, a, b = two
    merged = str(d / "concat.safetensors")
    rep = lora_merge([f"{a}:0.7", (b, 0.5)], merged, mode="concat", save="fp32")
    assert set(rep["ranks"]) == {6}
    one, both = str(d / "bake-merged.safetensors"), str(d / "bake-both.safetensors")
    bake(base, [LoraSpec(path=merged)], one, save_dtype="fp16")
    bake(base, [LoraSpec(path=a, strength=0.7), LoraSpec(path=b, strength=0.5)], both, save_dtype="fp16")
    x, _ = _load(one)
    y, _ = _load(both)
    assert max(_ulps_fp16(x[k], y[k]) for k in x if x[k].dtype == torch.float16) <= 1


def test_svd_merge_is_the_truncated_svd_of_the_weighted_sum(two):
    d, _, a, b = two
    out = str(d / "svd.safetensors")
    rep = lora_merge([f"{a}:0.7", f"{b}:-0.5"], out, mode="svd", rank=3, save="fp32")
    la, _ = _load(a)
    lb, _ = _load(b)
    got, _ = _load(out)
    shapes = {n: s for n, s, _, _ in kohya_modules("sdxl", conv=True, tiny=TINY_M)}
    for name in list(rep["layers"])[::20]:
        m = 0.7 * _delta(la, name, shapes[name]) - 0.5 * _delta(lb, name, shapes[name])
        u, s, vh = torch.linalg.svd(m)
        assert _rel(_delta(got, name, shapes[name]), (u[:, :3] * s[:3]) @ vh[:3]) < 1e-4


def test_merge_blocks_and_te_weight(two):
    d, _, a, b = two
    rep = lora_merge([f"{a}:1:0", b], None, mode="concat", blocks="te1")
    assert rep["layers"] and all(n.startswith("lora_te1_") for n in rep["layers"])
    assert all(v["rank"] == 2 for v in rep["layers"].values())  # a's text-encoder weight is 0


def test_concat_refuses_loha(two, tmp_path):
    d, _, a, _ = two
    loha = str(tmp_path / "loha.safetensors")
    save_file(make_lora("sdxl", "loha", rank=2, tiny=TINY_M), loha)
    with pytest.raises(RecipeError, match="no exact LoRA form"):
        lora_merge([a, loha], None, mode="concat", base=str(d / "base.safetensors"))


# --- clean ------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _ckpt(tmp_path):
    sd = {}
    for k, v in _tiny_sd15().items():
        sd[k] = v
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    sd[pid] = torch.arange(77, dtype=torch.float32).reshape(1, 77)
    sd[pid][0, 3] = 2.9999
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(2)
    nan_key = "model.diffusion_model.out.2.weight"
    sd[nan_key] = sd[nan_key].clone()
    sd[nan_key].view(-1)[0] = float("nan")
    path = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": sd, "optimizer_states": [{"lr": torch.tensor(1e-4)}], "global_step": 12}, path)
    return path, pid, nan_key


def _tiny_sd15():
    from lib_lorakit.synth import iter_checkpoint

    return dict(iter_checkpoint("sd15", tiny=True, dtype=torch.float32))


def test_clean_ckpt_drops_ema_optimizer_repairs_position_ids_and_finds_nan(tmp_path):
    path, pid, nan_key = _ckpt(tmp_path)
    out = str(tmp_path / "clean.safetensors")
    rep = clean(path, out, save="fp16", title="My model", author="me", trigger_words="zzz style", preferred_weight=0.8)
    dropped = {d["key"]: d["reason"] for d in rep["dropped"]}
    assert dropped["model_ema.decay"] == "EMA copy"
    assert "optimizer_states" in dropped and "global_step" in dropped
    assert [r["key"] for r in rep["position_ids"]] == [pid] and "2.9999" in rep["position_ids"][0]["problem"]
    assert [n["key"] for n in rep["nonfinite"]] == [nan_key] and rep["nonfinite"][0]["nan"] == 1
    got, meta = _load(out)
    assert got[pid].dtype == torch.int64 and torch.equal(got[pid].reshape(-1), torch.arange(77))
    assert not any(k.startswith("model_ema.") for k in got)
    assert got["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert meta["modelspec.title"] == "My model" and meta["modelspec.trigger_phrase"] == "zzz style"
    assert meta["lorakit.preferred_weight"] == "0.8"


def test_clean_never_runs_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = str(marker)
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"a": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(FormatError, match="will not load"):
        clean(path, str(tmp_path / "out.safetensors"))
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_vae_swap_is_byte_identical_and_hashes_match_the_webui(tmp_path):
    ck = str(tmp_path / "ck.safetensors")
    write_checkpoint(ck, "sd15", tiny=32, dtype=torch.float16, metadata={"ss_network_dim": "4", "x": "y"})
    vae = str(tmp_path / "vae.safetensors")
    g = torch.Generator().manual_seed(9)
    with SafetensorsFile(ck) as f:
        vae_sd = {
            k[len("first_stage_model.") :]: torch.randn(f.tensors[k].shape, generator=g).to(torch.float32)
            for k in f.keys()
            if k.startswith("first_stage_model.")
        }
    vae_sd["loss.logvar"] = torch.zeros(1)
    save_file(vae_sd, vae)
    out = str(tmp_path / "swapped.safetensors")
    rep = clean(ck, out, vae=vae, save="fp16", strip_training=True)
    assert rep["vae_tensors"] == len(vae_sd) - 1 and rep["metadata_stripped"] == ["ss_network_dim"]
    hv, _ = read_header(vae)
    ho, meta = read_header(out)
    assert meta == {"x": "y"}
    raw_v, raw_o = open(vae, "rb").read(), open(out, "rb").read()
    for k, t in hv.items():
        if k.startswith("loss."):
            continue
        o = ho["first_stage_model." + k]
        assert raw_o[o.start : o.end] == raw_v[t.start : t.end]
    # the WebUI's hashes: sha256 of the file, [:10]; legacy: 64 KiB at 1 MiB, [:8]; addnet: bytes after header
    h = file_hashes(out)
    assert h["sha256"] == hashlib.sha256(raw_o).hexdigest() and h["shorthash"] == h["sha256"][:10]
    assert h["legacy"] == hashlib.sha256(raw_o[0x100000:0x110000]).hexdigest()[:8]
    n = struct.unpack("<Q", raw_o[:8])[0]
    assert h["addnet"] == hashlib.sha256(raw_o[8 + n :]).hexdigest() and h["addnet_short"] == h["addnet"][:12]
    assert rep["hashes"] == h
    assert len(raw_o) > 0x110000  # the legacy window lies inside the file


def test_addnet_hash_equals_kohya_precalculated_hash(tmp_path):
    """kohya's sshs_model_hash is the SHA-256 of safetensors.torch.save(tensors) after its header."""
    from safetensors.torch import save

    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.arange(4, dtype=torch.float32)}
    blob = save(tensors, {"k": "v"})
    path = str(tmp_path / "t.safetensors")
    with open(path, "wb") as f:
        f.write(blob)
    n = int.from_bytes(blob[:8], "little")
    assert file_hashes(path)["addnet"] == hashlib.sha256(blob[8 + n :]).hexdigest()


def test_clean_refuses_existing_output_and_wrong_vae(tmp_path):
    ck = str(tmp_path / "ck.safetensors")
    write_checkpoint(ck, "sd15", tiny=True)
    with pytest.raises(OutputError, match="one of the inputs"):
        clean(ck, ck, overwrite=True)
    bad = str(tmp_path / "badvae.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(FormatError, match="VAE"):
        clean(ck, str(tmp_path / "o.safetensors"), vae=bad)
    assert not os.path.exists(tmp_path / "o.safetensors")


# --- CLI --------------------------------------------------------------------------------------


def test_cli_commands(two, tmp_path, capsys):
    from lib_lorakit.cli import main

    d, base, a, b = two
    out = str(tmp_path / "r.safetensors")
    assert main(["resize", a, "-o", out, "--rank", "2", "-q"]) == 0
    assert "resized" in capsys.readouterr().out
    assert main(["resize", a, "-o", out, "--rank", "2", "-q"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "lora-merge",
                f"{a}:0.5",
                f"{b}:0.5",
                "-o",
                str(tmp_path / "m.safetensors"),
                "--mode",
                "svd",
                "--rank",
                "3",
                "-q",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["ranks"] == [3]
    assert main(["hash", out]) == 0
    assert hashlib.sha256(open(out, "rb").read()).hexdigest()[:10] in capsys.readouterr().out
    assert main(["clean", base, "-o", str(tmp_path / "c.safetensors"), "--title", "t", "-q"]) == 0
    assert main(["resize", a, "-o", str(tmp_path / "x.safetensors"), "--dynamic", "sv_fro"]) == 2
    assert "sv_fro:F" in capsys.readouterr().err
    same = str(tmp_path / "same.safetensors")
    assert main(["extract", base, base, "-o", base, "--rank", "2", "-q"]) == 2  # an input as output
    assert "one of the inputs" in capsys.readouterr().err
    copy = str(tmp_path / "copy.safetensors")
    with open(base, "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    assert main(["extract", copy, base, "-o", same, "--rank", "2", "-q"]) == 2
    assert "do not differ" in capsys.readouterr().err and not os.path.exists(same)
