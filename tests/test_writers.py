"""Files from the third-party writers users train and convert with bake as their writers meant.

Every file is written at test time by the real writer (diffusers ``save_lora_weights``, PEFT,
LyCORIS ``create_lycoris``, diffusers' kohya converter) on the writer's own model with the real
module names at 1/64 width, baked in fp32 into a tiny checkpoint with the real key layout, and
every weight is compared with what the writer's own module computes in float64 (tests/writers.py):
max relative error <= 1e-6, every module of the file matched, the report's component counts right.

transformers 5 cannot be installed beside the pinned transformers 4.46 (PEFT 0.13.2 and
huggingface_hub 0.25 need it). transformers >= 5 removed the ``text_model`` level of
``CLIPTextModel``: its ``named_modules()`` are ``embeddings.*``, ``encoder.layers.N.*``,
``final_layer_norm`` (the diffusers fix for it, PR #14014, keys on that missing submodule). So the
transformers-5 files here are made on exactly that module tree -- transformers 4.46's
``CLIPTextModel.text_model`` (a ``CLIPTextTransformer``, whose children are those modules) -- with
PEFT's own ``inject_adapter_in_model`` and ``get_peft_model_state_dict`` and diffusers'
``save_lora_weights``, which is the path that writes ``text_encoder.encoder.layers.N...`` keys.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-dev.txt)")
pytest.importorskip("lycoris", reason="LyCORIS (lycoris-lora) is a test dependency")

import writers as W  # noqa: E402

from lib_lorakit.bake import LoraSpec, bake, summary  # noqa: E402
from lib_lorakit.errors import MatchError  # noqa: E402
from lib_lorakit.formats.safetensors_io import save_file  # noqa: E402
from lib_lorakit.formats.sources import open_source  # noqa: E402
from lib_lorakit.inspect.structure import read_structure  # noqa: E402
from lib_lorakit.synth import write_checkpoint  # noqa: E402

TOL = 1e-6
F = 64  # width divisor of the tiny models (the synth checkpoints' "tiny")
SDXL_UNET = ["to_k", "to_out.0", "ff.net.2"]  # fewer SDXL modules keep the tests fast; all kinds stay covered


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ("sd15", "sdxl"):
        path = str(d / f"{arch}.safetensors")
        write_checkpoint(path, arch, tiny=True, dtype=torch.float32, seed=5)
        out[arch] = (path, W.diffusers_view(W.read_all(path), arch, F))
    return out


def bake_and_compare(ckpts, arch: str, w: W.Written, tmp_path, **kw) -> dict:
    """Bake ``w`` in fp32, compare every weight with the writer's reference, check the report's counts."""
    path, view = ckpts[arch]
    out = str(tmp_path / "baked.safetensors")
    rep = bake(path, [LoraSpec(w.path)], out, save_dtype="fp32", overwrite=True, **kw)
    lo = rep["loras"][0]
    assert lo["unmatched"] == [], lo["unmatched"][:3]
    baked = W.diffusers_view(W.read_all(out), arch, F)
    err, changed = W.compare(w, baked, view)
    assert err <= TOL, f"{w.writer} {w.algorithm}: max relative error {err:.3g}"
    assert changed == w.modules, (changed, w.modules)  # every module the writer attached reached its weight
    assert {c: n for c, n in lo["matched"].items() if n} == w.modules
    assert lo["layers"] == sum(w.modules.values())
    rep["_max_rel_err"] = err
    return rep


def scale_sources(rep) -> dict[str, int]:
    return rep["loras"][0]["scale"]["sources"]


# --- diffusers save_lora_weights: PEFT adapter metadata --------------------------------------


def test_diffusers_adapter_metadata_scale_is_applied_per_module(ckpts, tmp_path):
    """r=4, lora_alpha=8 (scale 2) with a rank_pattern (r=2: scale 4) and an alpha_pattern (alpha 3: 0.75)."""
    _, view = ckpts["sd15"]
    w = W.write_diffusers(
        str(tmp_path), "sd15", F, view, metadata=True, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"ff.net.2": 3.0}
    )
    meta = open_source(w.path).metadata
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 8  # the header as diffusers writes it
    rep = bake_and_compare(ckpts, "sd15", w, tmp_path)
    assert scale_sources(rep) == {
        "PEFT adapter metadata (lora_adapter_metadata, unet)": w.modules["unet"],
        "PEFT adapter metadata (lora_adapter_metadata, text_encoder)": w.modules["te1"],
    }
    runtime = rep["loras"][0]["scale"]["runtime_differs"]
    assert (
        "A1111 1.10 and Forge" in runtime
        and "2 (lora_alpha 8 / r 4)" in runtime
        and "4 (lora_alpha 8 / r 2)" in runtime
    )
    assert "PEFT adapter metadata" in summary(rep)

    # the runtime's reading: scale 1 everywhere, and the report says what the writer meant
    out = str(tmp_path / "runtime.safetensors")
    rr = bake(ckpts["sd15"][0], [LoraSpec(w.path)], out, save_dtype="fp32", scale_source="runtime")
    assert "Scale source 'runtime'" in rr["loras"][0]["scale"]["runtime_differs"]
    rt = W.diffusers_view(W.read_all(out), "sd15", F, parts=("unet",))["unet"]
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = view["unet"][k].double()
    ratio = (rt[k].double() - base) / (w.reference["unet"][k] - base)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=1e-5)  # the writer meant 2x


def test_inspector_reports_the_bakes_scale(tmp_path):
    """The inspector matches against the full-size layout: a full-width file from diffusers' writer."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig

    from lib_lorakit.formats.arch import ARCHS, load_layout
    from lib_lorakit.formats.sources import LayoutSource

    g = torch.Generator().manual_seed(0)
    te = {}
    for i in range(2):
        for proj, r in (("q_proj", 4), ("k_proj", 2)):
            m = f"text_model.encoder.layers.{i}.self_attn.{proj}"
            te[f"{m}.lora_A.weight"] = torch.randn(r, 768, generator=g)
            te[f"{m}.lora_B.weight"] = torch.randn(768, r, generator=g)
    cfg = LoraConfig(r=4, lora_alpha=8, rank_pattern={"k_proj": 2}, target_modules=["q_proj", "k_proj"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(tmp_path),
        text_encoder_lora_layers=te,
        weight_name="x.safetensors",
        save_function=W.diffusers_metadata_saver({"text_encoder": cfg}),
    )
    path = str(tmp_path / "x.safetensors")
    layout = LayoutSource(load_layout(ARCHS["sd15"].layout), path="<layout>")
    rep = bake(layout, [LoraSpec(path)], None, dry_run=True)
    src = open_source(path)
    st = read_structure(src)
    src.close()
    assert st.scale == rep["loras"][0]["scale"]
    assert st.scale["sources"] == {"PEFT adapter metadata (lora_adapter_metadata, text_encoder)": 4}
    assert st.alpha_source == "PEFT adapter metadata"
    m = next(x for x in st.modules if x.name.endswith("layers.0.self_attn.k_proj"))
    assert m.rank == 2 and m.alpha == pytest.approx(8.0)  # scale 4 = lora_alpha 8 / rank_pattern r 2


def test_diffusers_without_metadata_is_scale_one_and_says_so(ckpts, tmp_path):
    _, view = ckpts["sd15"]
    w = W.write_diffusers(str(tmp_path), "sd15", F, view, metadata=False, r=4, alpha=4.0)
    rep = bake_and_compare(ckpts, "sd15", w, tmp_path)
    assert scale_sources(rep) == {"none in file (scale 1 assumed)": sum(w.modules.values())}
    assert rep["loras"][0]["scale"]["runtime_differs"] is None


def test_diffusers_rslora_sdxl_all_components(ckpts, tmp_path):
    _, view = ckpts["sdxl"]
    w = W.write_diffusers(
        str(tmp_path), "sdxl", F, view, metadata=True, rslora=True, r=4, alpha=6.0, unet_targets=SDXL_UNET
    )
    rep = bake_and_compare(ckpts, "sdxl", w, tmp_path)
    assert set(w.modules) == {"unet", "te1", "te2"}
    assert "3 (lora_alpha 6 / sqrt(r) 4)" in rep["loras"][0]["scale"]["runtime_differs"]


def test_peft_dora_with_metadata(ckpts, tmp_path):
    """use_dora: PEFT's lora_magnitude_vector per output row, ΔW at lora_alpha/r before the decomposition."""
    _, view = ckpts["sd15"]
    w = W.write_diffusers(str(tmp_path), "sd15", F, view, metadata=True, te_only=True, dora=True)
    assert any(k.endswith("lora_magnitude_vector") for k in open_source(w.path).keys())
    rep = bake_and_compare(ckpts, "sd15", w, tmp_path)
    assert set(rep["loras"][0]["algorithms"]) == {"dora"}


# --- PEFT on transformers 4 and 5 text encoders ----------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("flat", [False, True], ids=["transformers4", "transformers5"])
def test_peft_text_encoders(ckpts, tmp_path, arch, flat):
    _, view = ckpts[arch]
    w = W.write_diffusers(str(tmp_path), arch, F, view, metadata=True, te_only=True, flat_te=flat)
    keys = list(open_source(w.path).keys())
    assert any(k.startswith("text_encoder.encoder.layers.0.") for k in keys) == flat
    rep = bake_and_compare(ckpts, arch, w, tmp_path)
    naming = rep["loras"][0]["naming_normalised"]
    if flat:
        assert naming == {
            "transformers-5 text-encoder names (no 'text_model.') read as text_model.*": sum(w.modules.values())
        }
        assert "naming normalised: transformers-5" in summary(rep)
    else:
        assert naming == {}


def test_transformers5_names_converted_to_kohya_are_not_taken_for_sdxl(ckpts, tmp_path):
    """``lora_te1_encoder_layers_N`` on SD1.5: no CLIP-G module, so no SDXL verdict."""
    _, view = ckpts["sd15"]
    w = W.write_diffusers(str(tmp_path), "sd15", F, view, metadata=False, te_only=True, flat_te=True, r=4, alpha=4.0)
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({k.replace(".lora.", ".lora_"): v for k, v in W.read_all(w.path).items()})
    assert any(k.startswith("lora_te1_encoder_layers_0_") for k in kohya)
    w.path = str(tmp_path / "te5-kohya.safetensors")
    save_file({k: v.contiguous() for k, v in kohya.items()}, w.path)
    bake_and_compare(ckpts, "sd15", w, tmp_path)


# --- LyCORIS create_lycoris ---------------------------------------------------------------


@pytest.mark.parametrize("algo", sorted(W.LYCORIS_ALGOS))
@pytest.mark.parametrize("arch,comp", [("sd15", "unet"), ("sd15", "te1"), ("sdxl", "te1"), ("sdxl", "te2")])
def test_lycoris(ckpts, tmp_path, arch, comp, algo):
    _, view = ckpts[arch]
    w = W.write_lycoris(str(tmp_path), arch, F, view, comp, algo)
    rep = bake_and_compare(ckpts, arch, w, tmp_path)
    assert scale_sources(rep) == {"alpha tensors": w.modules[comp]}
    expect = {"lora": "lora", "loha": "loha", "lokr": "lokr", "dora": "dora"}[algo]
    assert set(rep["loras"][0]["algorithms"]) == {expect}


# --- diffusers' kohya converter ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_kohya_converter(ckpts, tmp_path, arch):
    _, view = ckpts[arch]
    w = W.write_kohya_converted(str(tmp_path), arch, F, view, unet_targets=SDXL_UNET if arch == "sdxl" else None)
    keys = list(open_source(w.path).keys())
    glued = {k.partition(".")[0] for k in keys if k.endswith("_lora.down.weight")}
    assert glued  # the non-standard spelling this test is about
    rep = bake_and_compare(ckpts, arch, w, tmp_path)
    assert rep["loras"][0]["naming_normalised"] == {
        "kohya names with a '_lora.down/up' suffix (diffusers' kohya converter) read as lora_down/lora_up": len(glued)
    }


# --- refusals that remain give the true cause ------------------------------------------------


def test_lycoris_clip_g_file_on_sd15_names_the_shapes(ckpts, tmp_path):
    """CLIP-G names layers 0-11 fit SD1.5's CLIP-L by name only: each says so with both shapes."""
    _, view = ckpts["sdxl"]
    w = W.write_lycoris(str(tmp_path), "sdxl", F, view, "te2", "lora")
    with pytest.raises(MatchError) as e:
        bake(ckpts["sd15"][0], [LoraSpec(w.path)], str(tmp_path / "o.safetensors"), save_dtype="fp32")
    msg = str(e.value)
    assert (
        "lycoris_text_model_encoder_layers_0_mlp_fc1: shape mismatch with "
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight [48, 12]: "
        "lora_up [80, 4] x lora_down [4, 20] gives [80, 20]"
    ) in msg
    assert os.listdir(tmp_path) == [os.path.basename(w.path)]


def test_name_fitting_two_layers_with_no_fitting_shape_names_both(ckpts, tmp_path):
    t = {
        "lycoris_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 7),
        "lycoris_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(48, 4),
        "lycoris_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
    }
    path = str(tmp_path / "bad.safetensors")
    save_file(t, path)
    with pytest.raises(MatchError) as e:
        bake(ckpts["sdxl"][0], [LoraSpec(path)], str(tmp_path / "o.safetensors"), dry_run=True)
    msg = str(e.value)
    assert "embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight [48, 12]" in msg
    assert "embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight [80, 20]" in msg
    assert "the LoRA's shapes fit none of them" in msg and "another architecture" not in msg


def test_names_that_exist_nowhere_still_say_so(ckpts, tmp_path):
    t = {
        "lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(2, 5),
        "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(5, 2),
    }
    path = str(tmp_path / "nowhere.safetensors")
    save_file(t, path)
    with pytest.raises(MatchError, match="no such module in the checkpoint(.|\n)*none of the LoRA's layer names exist"):
        bake(ckpts["sd15"][0], [LoraSpec(path)], None, dry_run=True)


def test_unknown_scale_source_is_refused(ckpts, tmp_path):
    _, view = ckpts["sd15"]
    path = W.write_lycoris(str(tmp_path), "sd15", F, view, "te1", "lora").path
    with pytest.raises(Exception, match="Unknown scale source 'diffusers'"):
        bake(ckpts["sd15"][0], [LoraSpec(path)], None, dry_run=True, scale_source="diffusers")
    assert os.listdir(tmp_path) == [os.path.basename(path)]
