import os

import pytest
import torch
from factories import ShapeSource, reference, tiny_checkpoint, tiny_lora, write

from lib_lorakit.errors import ArchitectureError
from lib_lorakit.formats.arch import (
    ARCHS,
    block_of,
    component_of,
    detect_checkpoint,
    detect_lora,
    lineage_hints,
    load_layout,
    load_optional,
)
from lib_lorakit.formats.sources import open_source
from lib_lorakit.synth import make_lora


@pytest.mark.parametrize("arch,ref", [("sd15", "sd15_ldm.json"), ("sdxl", "sdxl_sgm.json")])
def test_layout_tables_agree_with_real_checkpoints(shared_reference, arch, ref):
    mine = load_layout(ARCHS[arch].layout)
    theirs = reference(ref)
    assert set(mine) == set(theirs)
    assert {k: v for k, v in mine.items()} == theirs  # shapes and dtypes, key by key


def test_optional_keys_cover_the_reference_extras(shared_reference):
    import json

    with open(os.path.join(shared_reference, "ldm_sgm_optional_extra_keys.json")) as f:
        extra = json.load(f)
    for arch, name in (("sd15", "sd15_ldm"), ("sdxl", "sdxl_sgm")):
        opt = load_optional(ARCHS[arch].layout)
        for k, (shape, dt) in extra[name].items():
            assert k in opt and list(opt[k][0]) == shape, k


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_every_key_has_a_component_and_unet_keys_a_block(arch):
    a = ARCHS[arch]
    layout = load_layout(a.layout)
    comps = {k: component_of(k, a) for k in layout}
    assert "other" not in comps.values()
    expected = {"unet", "te1", "vae"} | ({"te2"} if arch == "sdxl" else set())
    assert set(comps.values()) == expected
    blocks = {block_of(k, a) for k in layout if comps[k] == "unet"}
    assert blocks == set(a.blocks) - {"BASE"}  # IN00..IN{n-1}, M00, OUT00..OUT{n-1}, all present
    assert {block_of(k, a) for k in layout if comps[k] in ("te1", "te2")} == {"BASE"}
    assert {block_of(k, a) for k in layout if comps[k] == "vae"} == {None}


def test_block_ids_match_the_conventions():
    assert ARCHS["sd15"].blocks[:3] == ("BASE", "IN00", "IN01") and len(ARCHS["sd15"].blocks) == 26
    assert ARCHS["sdxl"].blocks[-1] == "OUT08" and len(ARCHS["sdxl"].blocks) == 20
    a = ARCHS["sdxl"]
    assert block_of("model.diffusion_model.input_blocks.4.1.proj_in.weight", a) == "IN04"
    assert block_of("model.diffusion_model.middle_block.1.proj_in.weight", a) == "M00"
    assert block_of("model.diffusion_model.output_blocks.8.0.skip_connection.weight", a) == "OUT08"
    assert block_of("model.diffusion_model.out.2.weight", a) == "OUT08"
    assert block_of("model.diffusion_model.label_emb.0.0.weight", a) == "IN00"


@pytest.mark.parametrize("arch,ref", [("sd15", "sd15_ldm.json"), ("sdxl", "sdxl_sgm.json")])
def test_detects_real_layout_checkpoints(shared_reference, arch, ref):
    shapes = {k: v[0] for k, v in reference(ref).items()}
    fam = detect_checkpoint(shapes, {})
    assert fam.arch == arch and fam.vpred is None and fam.variant == ""


def test_detects_tiny_checkpoints_vpred_and_lineage(tmp_path):
    p = tiny_checkpoint(
        tmp_path,
        "sdxl",
        metadata={"modelspec.title": "NoobAI-XL v-pred 1.0"},
        extra={"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])},
    )
    with open_source(p) as s:
        fam = detect_checkpoint(s.shapes(), s.metadata, p)
    assert fam.arch == "sdxl"
    assert fam.vpred is True and "v_pred" in fam.vpred_evidence
    assert [n for n, _ in fam.lineage] == ["NoobAI"]
    q = tiny_checkpoint(tmp_path, "sd15")
    with open_source(q) as s:
        assert detect_checkpoint(s.shapes(), s.metadata, q).arch == "sd15"


def test_refuses_other_families():
    base = {k: v[0] for k, v in load_layout("sdxl-sgm").items()}
    sd2 = {
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    }
    with pytest.raises(ArchitectureError, match="SD2"):
        detect_checkpoint(sd2, {})
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in base.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    with pytest.raises(ArchitectureError, match="refiner"):
        detect_checkpoint(refiner, {})
    with pytest.raises(ArchitectureError, match="LoRA/LyCORIS file, not a checkpoint"):
        detect_checkpoint({"lora_unet_x.lora_down.weight": (4, 8)}, {})
    with pytest.raises(ArchitectureError, match="SD3/Flux"):
        detect_checkpoint({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9, 3)}, {})


def test_inpaint_variant_is_sd15():
    shapes = {k: v[0] for k, v in load_layout("sd15-ldm").items()}
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    fam = detect_checkpoint(shapes, {})
    assert fam.arch == "sd15" and fam.variant == "inpaint"


@pytest.mark.parametrize("arch,ref", [("sd15", "lora_kohya_sd15.json"), ("sdxl", "lora_kohya_sdxl.json")])
def test_detects_real_kohya_loras(shared_reference, arch, ref):
    shapes = {k: v[0] for k, v in reference(ref).items()}
    fam = detect_lora(shapes, {})
    assert fam.arch == arch
    assert any("input width" in e for e in fam.evidence)  # the context width decided it


def test_detects_tiny_loras_by_structure_and_metadata():
    for arch in ("sd15", "sdxl"):
        sd = make_lora(arch, "lora", conv=False)
        assert detect_lora({k: tuple(v.shape) for k, v in sd.items()}, {}).arch == arch
    only_meta = detect_lora({"lora_unet_foo.lora_down.weight": (4, 8)}, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert only_meta.arch == "sdxl"
    sd2 = detect_lora({"lora_unet_foo_attn2_to_k.lora_down.weight": (4, 1024)}, {})
    assert sd2.arch == "sd2"
    v = detect_lora({"lora_unet_x.lora_down.weight": (4, 8)}, {"ss_v_parameterization": "True"})
    assert v.vpred is True


def test_lineage_hints():
    assert [n for n, _ in lineage_hints({"ss_sd_model_name": "ponyDiffusionV6XL.safetensors"})] == ["Pony"]
    assert [n for n, _ in lineage_hints({}, "/x/illustriousXL_v01.safetensors")] == ["Illustrious"]
    assert lineage_hints({"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}) == []


def test_shape_source_helper_never_reads(tmp_path):
    s = ShapeSource({"a": ((2,), "float16")})
    with pytest.raises(AssertionError):
        s.read("a")
    write(tmp_path, "x.safetensors", {"a": torch.zeros(2)})
    assert tiny_lora(tmp_path, "sd15", conv=False).endswith(".safetensors")
