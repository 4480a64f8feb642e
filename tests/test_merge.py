"""Merging, against closed forms and sd-mecha, on tiny real-layout checkpoints."""

import hashlib
import json
import os
import threading

import pytest
import safetensors.torch
import torch
from factories import files_in, tiny_checkpoint, write
from helpers import worst_fp16_rounding

from lib_lorakit.cli import main
from lib_lorakit.errors import ArchitectureError, Cancelled, RecipeError
from lib_lorakit.formats.arch import ARCHS, block_of, component_of
from lib_lorakit.formats.safetensors_io import SafetensorsFile
from lib_lorakit.merge import ModelSpec, merge
from lib_lorakit.merge.diff import chart, diff

XL = ARCHS["sdxl"]


def load(p):
    return safetensors.torch.load_file(p)


@pytest.fixture
def three(tmp_path):
    return [
        tiny_checkpoint(
            tmp_path,
            "sdxl",
            dtype=torch.float32,
            seed=i,
            name=f"m{i}.safetensors",
            metadata={"modelspec.title": f"M{i}"},
        )
        for i in range(3)
    ]


def is_vae(k):
    return k.startswith("first_stage_model.")


def float_keys(sd):
    return [k for k, v in sd.items() if v.is_floating_point()]


def close(a, b, tol=1e-6):
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_weighted_three_way_normalised(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(three[0], 7), ModelSpec(three[1], 2), ModelSpec(three[2], 1)], out, save_dtype="fp32")
    s = [load(p) for p in three]
    o = load(out)
    assert rep["weights"]["effective"] == pytest.approx([0.7, 0.2, 0.1])
    for k in float_keys(o):
        if is_vae(k):
            continue
        assert close(o[k], 0.7 * s[0][k].double() + 0.2 * s[1][k].double() + 0.1 * s[2][k].double()), k


def test_weighted_unnormalised_and_fp16_rounds_once(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    merge([ModelSpec(three[0], 0.5), ModelSpec(three[1], 0.8)], out, normalize=False)
    s, o = [load(p) for p in three[:2]], load(out)
    for k in float_keys(o):
        if is_vae(k):
            continue
        exact = 0.5 * s[0][k].double() + 0.8 * s[1][k].double()
        half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(2**-14))) - 11)
        assert bool(((o[k].double() - exact).abs() <= half_ulp * 1.001 + 1e-7).all()), k


def test_add_difference(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    merge(
        [ModelSpec(three[0]), ModelSpec(three[1], 0.6)], out, method="add-difference", base=three[2], save_dtype="fp32"
    )
    a, b, c, o = load(three[0]), load(three[1]), load(three[2]), load(out)
    for k in float_keys(o):
        if not is_vae(k):
            assert close(o[k], a[k].double() + 0.6 * (b[k].double() - c[k].double())), k
    assert torch.equal(o["first_stage_model.decoder.conv_out.weight"], a["first_stage_model.decoder.conv_out.weight"])


def ties_reference(base, models, weights, density, scale):
    """TIES written independently, in float64 with numpy."""
    import numpy as np

    b = base.double().numpy()
    taus = []
    for m in models:
        t = m.double().numpy() - b
        k = max(1, int(round(density * t.size)))
        thr = np.sort(np.abs(t).ravel())[t.size - k]
        taus.append(np.where(np.abs(t) >= thr, t, 0.0))
    elected = np.sign(sum(w * t for w, t in zip(weights, taus)))
    num = np.zeros_like(b)
    den = np.zeros_like(b)
    for w, t in zip(weights, taus):
        agree = (np.sign(t) == elected) & (t != 0)
        num += np.where(agree, w * t, 0.0)
        den += np.where(agree, w, 0.0)
    merged = np.divide(num, den, out=np.zeros_like(num), where=den != 0)
    return torch.from_numpy(b + scale * merged)


def test_ties(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    merge(
        [ModelSpec(three[1], 1.0), ModelSpec(three[2], 0.5)],
        out,
        method="ties",
        base=three[0],
        density=0.3,
        scale=0.8,
        save_dtype="fp32",
    )
    c, m1, m2, o = load(three[0]), load(three[1]), load(three[2]), load(out)
    for k in [
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.out.2.weight",
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight",
    ]:
        assert close(o[k], ties_reference(c[k], [m1[k], m2[k]], [1.0, 0.5], 0.3, 0.8), 1e-5), k


def test_dare_is_seeded_unbiased_and_rescaled(tmp_path, three):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    merge([ModelSpec(three[1], 1.0)], a, method="dare", base=three[0], drop=0.75, seed=7, save_dtype="fp32")
    merge([ModelSpec(three[1], 1.0)], b, method="dare", base=three[0], drop=0.75, seed=7, save_dtype="fp32")
    oa, ob = load(a), load(b)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    c, m = load(three[0]), load(three[1])
    k = "model.diffusion_model.middle_block.1.transformer_blocks.3.ff.net.0.proj.weight"
    d = oa[k].double() - c[k].double()
    tau = m[k].double() - c[k].double()
    kept = d != 0
    assert 0.2 < float(kept.double().mean()) < 0.3  # 1 - p of the entries survive
    assert close(d[kept], tau[kept] / 0.25, 1e-5)  # and are rescaled by 1/(1-p)
    other = str(tmp_path / "c.safetensors")
    merge([ModelSpec(three[1], 1.0)], other, method="dare", base=three[0], drop=0.75, seed=8, save_dtype="fp32")
    assert not torch.equal(load(other)[k], oa[k])


def test_slerp(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    merge([ModelSpec(three[0], 0.7), ModelSpec(three[1], 0.3)], out, method="slerp", save_dtype="fp32")
    a, b, o = load(three[0]), load(three[1]), load(out)
    k = "model.diffusion_model.input_blocks.5.1.proj_out.weight"
    x, y, t = a[k].double().reshape(-1), b[k].double().reshape(-1), 0.3
    om = torch.arccos((x / x.norm()) @ (y / y.norm()))
    ref = (torch.sin((1 - t) * om) * x / x.norm() + torch.sin(t * om) * y / y.norm()) / torch.sin(om)
    ref = ref * ((1 - t) * x.norm() + t * y.norm())
    assert close(o[k].reshape(-1), ref, 1e-5)


def test_block_weights(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    merge(
        [ModelSpec(three[0], 0.0), ModelSpec(three[1], 1.0)], out, blocks="IN04=0,OUT02=0.25,BASE=1", save_dtype="fp32"
    )  # SuperMerger style: model 2 at 1, the vector is the per-block alpha
    a, b, o = load(three[0]), load(three[1]), load(out)
    for k in float_keys(o):
        comp = component_of(k, XL)
        if comp in ("vae", "other"):
            continue
        alpha = {"IN04": 0.0, "OUT02": 0.25}.get(block_of(k, XL), 1.0)
        assert close(o[k], (1 - alpha) * a[k].double() + alpha * b[k].double()), k


def test_vae_is_copied_byte_for_byte(tmp_path, three):
    vae = {k[len("first_stage_model.") :]: v.half() for k, v in load(three[2]).items() if is_vae(k)}
    vae_file = write(tmp_path, "my.vae.safetensors", vae)
    for vae_from, src in ((None, three[0]), (2, three[1]), (vae_file, None)):
        out = str(tmp_path / f"out-{len(files_in(tmp_path))}.safetensors")
        rep = merge([ModelSpec(three[0], 0.5), ModelSpec(three[1], 0.5)], out, vae_from=vae_from)
        with SafetensorsFile(out) as f:
            for k in f.keys():
                if not is_vae(k):
                    continue
                got = f.read(k)
                ref = vae[k[len("first_stage_model.") :]] if src is None else load(src)[k]
                assert got.dtype == ref.dtype and torch.equal(got, ref), (vae_from, k)
        assert rep["tensors"]["copied"]["vae"] == 248


def test_te_from_copies_the_text_encoders(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(three[0], 0.5), ModelSpec(three[1], 0.5)], out, te_from=2)
    o, b = load(out), load(three[1])
    for k in o:
        if component_of(k, XL) in ("te1", "te2"):
            assert torch.equal(o[k], b[k]), k
    assert rep["te_from"] == 2 and rep["tensors"]["copied"]["text encoder source"] > 0


def test_keys_in_some_inputs_integers_and_family_warnings(tmp_path):
    extra = {"alphas_cumprod": torch.linspace(1, 0, 1000), "v_pred": torch.zeros(0, dtype=torch.int64)}
    a = tiny_checkpoint(
        tmp_path, "sdxl", seed=1, name="a.safetensors", extra=extra, metadata={"modelspec.title": "NoobAI vpred"}
    )
    b = tiny_checkpoint(tmp_path, "sdxl", seed=2, name="b.safetensors", metadata={"modelspec.title": "Pony mix"})
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(a), ModelSpec(b)], out)
    assert set(rep["copied_outside_components"]) == {"alphas_cumprod", "v_pred"}
    o = load(out)
    assert torch.equal(o["alphas_cumprod"], extra["alphas_cumprod"])
    pid = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    assert o[pid].dtype == torch.int64 and torch.equal(o[pid], load(a)[pid])
    assert any("v-prediction differs" in w for w in rep["warnings"])
    assert any("lineages differ" in w and "NoobAI" in w and "Pony" in w for w in rep["warnings"])


def test_mismatched_architectures_are_refused(tmp_path, three):
    sd15 = tiny_checkpoint(tmp_path, "sd15", name="sd15.safetensors")
    with pytest.raises(
        ArchitectureError, match=r"Cannot merge .*m0\.safetensors \(SDXL\) with .*sd15\.safetensors \(SD1\.5\)"
    ):
        merge([ModelSpec(three[0]), ModelSpec(sd15)], str(tmp_path / "o.safetensors"))
    assert "o.safetensors" not in files_in(tmp_path)


def test_structure_mismatch_names_the_key(tmp_path):
    a = tiny_checkpoint(tmp_path, "sd15", name="a.safetensors")
    sd = load(a)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(5, 9, 3, 3, dtype=torch.float16)  # inpaint
    b = write(tmp_path, "inpaint.safetensors", sd)
    with pytest.raises(RecipeError, match=r"input_blocks\.0\.0\.weight has different shapes .*\[5, 9, 3, 3\]"):
        merge([ModelSpec(a), ModelSpec(b)], str(tmp_path / "o.safetensors"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="add-difference"), "needs a base model"),
        (dict(method="slerp", n=3), "exactly 2"),
        (dict(method="weighted", n=1), "at least 2"),
        (dict(method="nope"), "Unknown merge method"),
        (dict(method="weighted", base=True), "only used by"),
        (dict(vae_from=5), "VAE from model 5"),
    ],
)
def test_bad_recipes(tmp_path, three, kw, match):
    n = kw.pop("n", 2)
    if kw.pop("base", False):
        kw["base"] = three[2]
    with pytest.raises(RecipeError, match=match):
        merge([ModelSpec(p) for p in three[:n]], str(tmp_path / "o.safetensors"), **kw)
    assert "o.safetensors" not in files_in(tmp_path)


def test_metadata_recipe_and_report(tmp_path, three):
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(three[0], 0.7), ModelSpec(three[1], 0.3)], out, blocks="ALL0.5")
    with SafetensorsFile(out) as f:
        meta = f.metadata
    recipe = json.loads(meta["lorakit.recipe"])
    sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [m["sha256"] for m in recipe["models"]] == [sha(three[0]), sha(three[1])]
    assert recipe["method"] == "weighted" and recipe["models"][1]["weight"] == 0.3
    assert recipe["blocks"] == ",".join(["0.5"] * 20) and meta["modelspec.title"] == "M0"
    d = rep["diagnostics"][0]
    assert d["ingredient"] == "m1" and set(d["by_component"]) >= {"unet", "te1", "te2"}
    assert "IN04" in d["by_block"]["unet"]


def test_cancel_leaves_nothing(tmp_path, three):
    ev = threading.Event()

    def progress(frac, msg):
        if "merging" in msg:
            ev.set()

    import lib_lorakit.merge.engine as eng

    ticks = iter(range(10**9))
    old = eng.time.perf_counter
    eng.time.perf_counter = lambda: next(ticks)
    try:
        with pytest.raises(Cancelled):
            merge(
                [ModelSpec(three[0]), ModelSpec(three[1])],
                str(tmp_path / "o.safetensors"),
                progress=progress,
                cancel=ev,
            )
    finally:
        eng.time.perf_counter = old
    assert sorted(files_in(tmp_path)) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


def test_diff_against_closed_form_and_chart(tmp_path, three):
    r = diff(three[0], three[1])
    a, b = load(three[0]), load(three[1])
    keys = [k for k in a if block_of(k, XL) == "OUT03" and a[k].is_floating_point()]
    d2 = sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in keys)
    a2 = sum(float((a[k].double() ** 2).sum()) for k in keys)
    ab = sum(float((a[k].double() * b[k].double()).sum()) for k in keys)
    b2 = sum(float((b[k].double() ** 2).sum()) for k in keys)
    got = r["by_block"]["unet"]["OUT03"]
    assert got["rel_change"] == pytest.approx((d2 / a2) ** 0.5, rel=1e-5)
    assert got["cosine"] == pytest.approx(ab / (a2 * b2) ** 0.5, rel=1e-5)
    assert r["by_component"]["vae"]["rel_change"] > 0
    img = chart(r)
    assert img.size[0] == 720 and img.size[1] > 300


def test_cli_merge_and_diff(tmp_path, three, capsys):
    out = str(tmp_path / "cli.safetensors")
    code = main(
        [
            "merge",
            "--model",
            f"{three[0]}:0.7",
            "--model",
            f"{three[1]}:0.2",
            "--model",
            f"{three[2]}:0.1",
            "-o",
            out,
            "-q",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    cap = capsys.readouterr()
    assert code == 0 and "weight 0.7" in cap.out and os.path.exists(out)
    png = str(tmp_path / "d.png")
    code = main(["diff", three[0], out, "--chart", png, "-q"])
    cap = capsys.readouterr()
    assert code == 0 and "| unet IN04 |" in cap.out and os.path.getsize(png) > 1000
    sd15 = tiny_checkpoint(tmp_path, "sd15", name="sd15.safetensors")
    code = main(["merge", "--model", three[0], "--model", sd15, "-o", str(tmp_path / "x.safetensors"), "-q"])
    assert code == 2 and "different architectures" in capsys.readouterr().err
    code = main(
        [
            "merge",
            "--model",
            three[0],
            "--model",
            three[1],
            "--method",
            "add-difference",
            "-o",
            str(tmp_path / "x.safetensors"),
            "-q",
        ]
    )
    assert code == 2 and "needs a base model" in capsys.readouterr().err


mecha = pytest.importorskip("sd_mecha", reason="sd-mecha is a test dependency")


def mecha_merge(recipe):
    class Quiet:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def update(self, *a, **k):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float32, threads=1, tqdm=Quiet)


def agree(ours, theirs):
    worst = 0.0
    for k, v in ours.items():
        if is_vae(k) or k not in theirs or not v.is_floating_point():
            continue
        t = theirs[k].float()
        worst = max(worst, float((v.float() - t).abs().max() / t.abs().max().clamp_min(1e-30)))
    return worst


def test_agreement_with_sd_mecha(tmp_path):
    ps = [tiny_checkpoint(tmp_path, "sd15", dtype=torch.float32, seed=i, name=f"s{i}.safetensors") for i in range(3)]
    a, b, c = (mecha.model(p) for p in ps)
    out = str(tmp_path / "w.safetensors")
    merge([ModelSpec(ps[0], 0.65), ModelSpec(ps[1], 0.35)], out, save_dtype="fp32")
    assert agree(load(out), mecha_merge(mecha.weighted_sum(a, b, alpha=0.35))) <= 1e-6
    out3 = str(tmp_path / "w3.safetensors")
    merge([ModelSpec(ps[0], 0.7), ModelSpec(ps[1], 0.2), ModelSpec(ps[2], 0.1)], out3, save_dtype="fp32")
    theirs = mecha_merge(mecha.weighted_sum(mecha.weighted_sum(a, b, alpha=2 / 9), c, alpha=0.1))
    assert agree(load(out3), theirs) <= 1e-6
    outd = str(tmp_path / "d.safetensors")
    merge([ModelSpec(ps[0]), ModelSpec(ps[1], 0.8)], outd, method="add-difference", base=ps[2], save_dtype="fp32")
    assert agree(load(outd), mecha_merge(mecha.add_difference(a, b, c, alpha=0.8))) <= 1e-6


@pytest.mark.parametrize("method", ["weighted", "add-difference", "ties", "slerp"])
def test_small_chunks_give_the_same_result(tmp_path, three, monkeypatch, method):
    """Row chunking (flat memory for huge tensors) must not change any value."""
    import lib_lorakit.merge.engine as eng

    kw = {
        "weighted": dict(),
        "add-difference": dict(base=three[2]),
        "ties": dict(base=three[2], density=0.4),
        "slerp": dict(),
    }[method]
    models = [ModelSpec(three[0], 0.6), ModelSpec(three[1], 0.4)]
    big = str(tmp_path / "big.safetensors")
    merge(models, big, method=method, save_dtype="fp32", **kw)
    monkeypatch.setattr(eng, "CHUNK_ELEMS", 7)  # odd, smaller than a row: chunks of one row, and row groups
    small = str(tmp_path / "small.safetensors")
    merge(models, small, method=method, save_dtype="fp32", **kw)
    a, b = load(big), load(small)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point() and a[k].numel())
    assert worst <= 1e-6


def test_reported_rounding_loss_is_the_largest_of_the_whole_merge(tmp_path, three, monkeypatch):
    """As for the bake: the loss is measured only where it could beat the largest so far, and must still be
    the exact maximum (float64 recomputation), with tensors split over many tiny chunks."""
    import lib_lorakit.merge.engine as eng

    monkeypatch.setattr(eng, "CHUNK_ELEMS", 2048)
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(three[0], 0.3), ModelSpec(three[1], 0.9)], out, normalize=False)
    s = [load(p) for p in three[:2]]
    exact = {k: 0.3 * s[0][k].double() + 0.9 * s[1][k].double() for k in float_keys(s[0]) if not is_vae(k)}
    worst, worst_key = worst_fp16_rounding(exact)
    r = rep["rounding"]
    assert r["max_abs_rounding_loss"] == pytest.approx(worst, rel=1e-3), (r, worst_key)
    assert r["key"] == worst_key
