"""Every naming scheme resolves to the right checkpoint key (hand-written expectations)."""

import pytest

from lib_lorakit.formats.arch import ARCHS, load_layout
from lib_lorakit.networks.resolve import TargetIndex, candidates, parse_keys, split_key, unet_ldm_to_diffusers

U = "model.diffusion_model."


@pytest.fixture(scope="module")
def sd15():
    return TargetIndex({k: v[0] for k, v in load_layout("sd15-ldm").items()}, ARCHS["sd15"])


@pytest.fixture(scope="module")
def sdxl():
    return TargetIndex({k: v[0] for k, v in load_layout("sdxl-sgm").items()}, ARCHS["sdxl"])


def resolve(index, module):
    t, problem = index.lookup(candidates(module, index.arch))
    assert t is not None, f"{module}: {problem}"
    return t


SD15_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": "input_blocks.1.1.proj_in",
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": "input_blocks.5.1.transformer_blocks.0.attn2.to_k",
    "lora_unet_mid_block_attentions_0_proj_out": "middle_block.1.proj_out",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "output_blocks.11.1.transformer_blocks.0.ff.net.2",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0": "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "input_blocks.3.0.op",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.1.conv",
    "lora_unet_up_blocks_2_upsamplers_0_conv": "output_blocks.8.2.conv",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "input_blocks.4.0.skip_connection",
    "lora_unet_up_blocks_1_resnets_2_time_emb_proj": "output_blocks.5.0.emb_layers.1",
    "lora_unet_mid_block_resnets_1_conv1": "middle_block.2.in_layers.2",
    "lora_unet_down_blocks_3_resnets_1_conv2": "input_blocks.11.0.out_layers.3",
    "lora_unet_down_blocks_2_resnets_0_norm1": "input_blocks.7.0.in_layers.0",
    "lora_unet_conv_in": "input_blocks.0.0",
    "lora_unet_conv_out": "out.2",
    "lora_unet_conv_norm_out": "out.0",
    "lora_unet_time_embedding_linear_1": "time_embed.0",
}


@pytest.mark.parametrize("name,ldm", list(SD15_KOHYA.items()))
def test_kohya_sd1_diffusers_names(sd15, name, ldm):
    t = resolve(sd15, name)
    assert t.weight_key == U + ldm + ".weight" and t.component == "unet" and t.rows is None


def test_kohya_sd1_text_encoder(sd15):
    t = resolve(sd15, "lora_te_text_model_encoder_layers_11_mlp_fc2")
    assert t.weight_key == "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
    assert t.component == "te1" and t.block == "BASE" and t.bias_key.endswith("mlp.fc2.bias")


SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "lora_unet_output_blocks_2_2_conv": "output_blocks.2.2.conv",
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": "middle_block.1.transformer_blocks.9.ff.net.0.proj",
    "lora_unet_label_emb_0_0": "label_emb.0.0",
    # SDXL files with diffusers-style UNet names
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "output_blocks.2.2.conv",
    "lora_unet_up_blocks_0_attentions_2_proj_out": "output_blocks.2.1.proj_out",
    "lora_unet_down_blocks_1_downsamplers_0_conv": "input_blocks.6.0.op",
    "lora_unet_up_blocks_2_resnets_2_conv_shortcut": "output_blocks.8.0.skip_connection",
    "lora_unet_add_embedding_linear_1": "label_emb.0.0",
    # generic and full ldm names
    "diffusion_model.output_blocks.3.1.proj_out": "output_blocks.3.1.proj_out",
    "model.diffusion_model.middle_block.1.proj_in": "middle_block.1.proj_in",
    "lycoris_input_blocks_4_1_proj_in": "input_blocks.4.1.proj_in",
    # diffusers / PEFT
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "base_model.model.unet.mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_v": "input_blocks.8.1.transformer_blocks.3.attn2.to_v",
}


@pytest.mark.parametrize("name,ldm", list(SDXL.items()))
def test_sdxl_unet_names(sdxl, name, ldm):
    assert resolve(sdxl, name).weight_key == U + ldm + ".weight"


@pytest.mark.parametrize(
    "name",
    [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj",
    ],
)
def test_sdxl_te1(sdxl, name):
    t = resolve(sdxl, name)
    assert t.weight_key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert t.component == "te1"


@pytest.mark.parametrize("i,proj,rows", [(5, "q", (0, 1280)), (5, "k", (1280, 2560)), (31, "v", (2560, 3840))])
@pytest.mark.parametrize("scheme", ["kohya", "peft", "comfy"])
def test_clip_g_qkv_land_on_in_proj_slices(sdxl, i, proj, rows, scheme):
    name = {
        "kohya": f"lora_te2_text_model_encoder_layers_{i}_self_attn_{proj}_proj",
        "peft": f"text_encoder_2.text_model.encoder.layers.{i}.self_attn.{proj}_proj",
        "comfy": f"text_encoders.clip_g.transformer.text_model.encoder.layers.{i}.self_attn.{proj}_proj",
    }[scheme]
    t = resolve(sdxl, name)
    assert t.weight_key == f"conditioner.embedders.1.model.transformer.resblocks.{i}.attn.in_proj_weight"
    assert t.rows == rows and t.shape == (1280, 1280) and t.component == "te2"
    assert t.bias_key == f"conditioner.embedders.1.model.transformer.resblocks.{i}.attn.in_proj_bias"


@pytest.mark.parametrize(
    "hf,openclip",
    [
        ("self_attn_out_proj", "attn.out_proj"),
        ("mlp_fc1", "mlp.c_fc"),
        ("mlp_fc2", "mlp.c_proj"),
        ("layer_norm1", "ln_1"),
    ],
)
def test_clip_g_other_layers(sdxl, hf, openclip):
    t = resolve(sdxl, f"lora_te2_text_model_encoder_layers_3_{hf}")
    assert t.weight_key == f"conditioner.embedders.1.model.transformer.resblocks.3.{openclip}.weight" and t.rows is None


def test_clip_g_text_projection_is_transposed(sdxl):
    t = resolve(sdxl, "lora_te2_text_projection")
    assert t.weight_key == "conditioner.embedders.1.model.text_projection" and t.transpose
    assert not resolve(sdxl, "conditioner.embedders.1.model.text_projection").transpose  # OpenCLIP name: as stored


def test_ambiguous_and_missing_names_are_explained(sdxl):
    t, problem = sdxl.lookup(candidates("lycoris_text_model_encoder_layers_0_mlp_fc1", sdxl.arch))
    assert t is None and problem.startswith("ambiguous") and "embedders.0" in problem and "embedders.1" in problem
    t, problem = sdxl.lookup(candidates("lora_unet_input_blocks_11_1_proj_in", sdxl.arch))
    assert t is None and problem == "no such module in the checkpoint"


def test_sd15_has_no_second_text_encoder(sd15):
    t, problem = sd15.lookup(candidates("lora_te2_text_model_encoder_layers_0_mlp_fc1", sd15.arch))
    assert t is None and problem == "no such module in the checkpoint"


def test_key_parsing_all_spellings():
    cases = {
        "lora_unet_a_b.lora_down.weight": ("lora_unet_a_b", "lora_down.weight"),
        "lora_unet_a_b.alpha": ("lora_unet_a_b", "alpha"),
        "lora_unet_a_b.hada_w1_a": ("lora_unet_a_b", "hada_w1_a"),
        "lora_unet_a_b.weight": ("lora_unet_a_b", "weight"),  # IA3
        "lora_te2_x.a1.weight": ("lora_te2_x", "a1.weight"),
        "unet.x.to_q.lora_A.weight": ("unet.x.to_q", "lora_down.weight"),
        "unet.x.to_q.lora_B.weight": ("unet.x.to_q", "lora_up.weight"),
        "unet.x.proj_in.lora.up.weight": ("unet.x.proj_in", "lora_up.weight"),
        "text_encoder.t.q_proj.lora_linear_layer.down.weight": ("text_encoder.t.q_proj", "lora_down.weight"),
        "unet.x.attn1.processor.to_out_lora.up.weight": ("unet.x.attn1.to_out.0", "lora_up.weight"),
        "unet.x.attn2.processor.to_k_lora.down.weight": ("unet.x.attn2.to_k", "lora_down.weight"),
        "unet.x.to_q.lora_magnitude_vector": ("unet.x.to_q", "lora_magnitude_vector"),
        "diffusion_model.input_blocks.0.0.diff": ("diffusion_model.input_blocks.0.0", "diff"),
    }
    for key, expected in cases.items():
        assert split_key(key) == expected, key
    assert split_key("unet.something.weird") is None


def test_parse_groups_embeddings_and_unknown_keys():
    p = parse_keys(
        [
            "lora_unet_a.lora_down.weight",
            "lora_unet_a.lora_up.weight",
            "lora_unet_a.alpha",
            "bundle_emb.mychar.clip_l",
            "bundle_emb.mychar.clip_g",
            "totally.unknown",
        ]
    )
    assert p.modules == {
        "lora_unet_a": {
            "lora_down.weight": "lora_unet_a.lora_down.weight",
            "lora_up.weight": "lora_unet_a.lora_up.weight",
            "alpha": "lora_unet_a.alpha",
        }
    }
    assert p.embeddings == {"mychar": ["bundle_emb.mychar.clip_l", "bundle_emb.mychar.clip_g"]}
    assert p.unknown == ["totally.unknown"]


def test_ldm_to_diffusers_covers_every_unet_module():
    """Every UNet weight of both layouts has a diffusers name, and the map is one-to-one."""
    for layout in ("sd15-ldm", "sdxl-sgm"):
        rels = [k[len(U) : -len(".weight")] for k in load_layout(layout) if k.startswith(U) and k.endswith(".weight")]
        names = [unet_ldm_to_diffusers(r) for r in rels]
        assert None not in names
        assert len(set(names)) == len(names)
