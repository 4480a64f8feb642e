"""Every algorithm baked from a file with real kohya/LyCORIS key names, against closed forms."""

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from factories import tiny_checkpoint, write

from lib_lorakit.bake import LoraSpec, bake

U = "model.diffusion_model."
G = torch.Generator().manual_seed(42)


def r(*s, std=0.1):
    return torch.randn(s, generator=G) * std


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("base"), "sdxl", dtype=torch.float32, seed=3)


def bake_one(tmp_path, base_path, tensors, strength=0.7, metadata=None):
    lora = write(tmp_path, "net.safetensors", tensors, metadata)
    out = str(tmp_path / "out.safetensors")
    rep = bake(base_path, [LoraSpec(lora, strength)], out, save_dtype="fp32")
    return safetensors.torch.load_file(base_path), safetensors.torch.load_file(out), rep


def close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_locon_tucker_on_a_resnet_conv(tmp_path, base_path):
    name = "lora_unet_input_blocks_4_0_in_layers_2"  # conv 3x3 [10, 5, 3, 3] at tiny size
    down, mid, up = r(2, 5, 1, 1), r(2, 2, 3, 3), r(10, 2, 1, 1)
    b, o, rep = bake_one(
        tmp_path,
        base_path,
        {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_mid.weight": mid,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(1.0),
        },
    )
    k = U + "input_blocks.4.0.in_layers.2.weight"
    x = r(1, 5, 6, 6, std=1.0)
    y_lora = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 0.5 * 0.7
    assert close(F.conv2d(x, o[k] - b[k], padding=1), y_lora, 1e-4)
    assert rep["loras"][0]["algorithms"] == {"lora": 1}


def test_dylora_file_bakes_like_lora(tmp_path, base_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    down, up = r(8, 10), r(10, 8)
    b, o, _ = bake_one(
        tmp_path,
        base_path,
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)},
        metadata={"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "4"}'},
    )
    k = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert close(o[k] - b[k], 0.7 * 0.5 * up @ down)


def test_full_diff_with_bias(tmp_path, base_path):
    name = "lora_unet_input_blocks_4_1_proj_in"
    diff, db = r(10, 10), r(10)
    b, o, rep = bake_one(tmp_path, base_path, {f"{name}.diff": diff, f"{name}.diff_b": db})
    assert close(o[U + "input_blocks.4.1.proj_in.weight"] - b[U + "input_blocks.4.1.proj_in.weight"], 0.7 * diff)
    assert close(o[U + "input_blocks.4.1.proj_in.bias"] - b[U + "input_blocks.4.1.proj_in.bias"], 0.7 * db)
    assert rep["loras"][0]["algorithms"] == {"full": 1}


def test_norm_layers(tmp_path, base_path):
    unet, te = "lora_unet_input_blocks_4_1_norm", "lora_te1_text_model_encoder_layers_0_layer_norm1"
    t = {f"{unet}.w_norm": r(10), f"{unet}.b_norm": r(10), f"{te}.w_norm": r(12), f"{te}.b_norm": r(12)}
    b, o, rep = bake_one(tmp_path, base_path, t)
    for prefix, ck in (
        (unet, U + "input_blocks.4.1.norm"),
        (te, "conditioner.embedders.0.transformer.text_model.encoder.layers.0.layer_norm1"),
    ):
        assert close(o[ck + ".weight"] - b[ck + ".weight"], 0.7 * t[f"{prefix}.w_norm"])
        assert close(o[ck + ".bias"] - b[ck + ".bias"], 0.7 * t[f"{prefix}.b_norm"])
    assert rep["loras"][0]["matched"] == {"unet": 1, "te1": 1, "te2": 0}


def test_ia3(tmp_path, base_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # [10, 32]
    w = r(10)
    b, o, _ = bake_one(tmp_path, base_path, {f"{name}.weight": w, f"{name}.on_input": torch.tensor(False)})
    k = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert close(o[k] - b[k], 0.7 * b[k] * w[:, None])


def test_glora(tmp_path, base_path):
    name = "lora_unet_input_blocks_5_1_proj_out"
    a1, a2, b1, b2 = r(10, 2), r(2, 10), r(10, 2), r(2, 10)
    b, o, _ = bake_one(
        tmp_path,
        base_path,
        {
            f"{name}.a1.weight": a1,
            f"{name}.a2.weight": a2,
            f"{name}.b1.weight": b1,
            f"{name}.b2.weight": b2,
            f"{name}.alpha": torch.tensor(1.0),
        },
    )
    k = U + "input_blocks.5.1.proj_out.weight"
    assert close(o[k] - b[k], 0.7 * 0.5 * (b[k] @ a1 @ a2 + b1 @ b2))


def test_oft_on_a_clip_g_slice(tmp_path, base_path):
    """OFT on CLIP-G k_proj: the rotation must act on rows 20:40 of in_proj_weight only."""
    name = "lora_te2_text_model_encoder_layers_2_self_attn_k_proj"
    blocks = r(4, 5, 5)
    b, o, _ = bake_one(tmp_path, base_path, {f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(0.0)})
    k = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"
    q = blocks - blocks.transpose(1, 2)
    eye = torch.eye(5)
    R = torch.block_diag(*((eye + q) @ torch.linalg.inv(eye - q)))
    w = b[k][20:40]
    assert close(o[k][20:40] - w, 0.7 * (R.T @ w - w), 1e-4)
    assert torch.equal(o[k][:20], b[k][:20]) and torch.equal(o[k][40:], b[k][40:])


def test_boft_against_lycoris(tmp_path, base_path):
    boft = pytest.importorskip("lycoris.functional.boft")
    name = "lora_unet_output_blocks_0_1_proj_in"  # [20, 20]
    blocks = r(2, 10, 2, 2)
    b, o, _ = bake_one(tmp_path, base_path, {f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(0.0)}, 1.0)
    k = U + "output_blocks.0.1.proj_in.weight"
    assert close(o[k] - b[k], boft._diff_weight(b[k], blocks, None, 0, 1), 1e-4)


def test_peft_diffusers_file(tmp_path, base_path):
    """A diffusers/PEFT-format SDXL LoRA (no alpha: scale 1) covering UNet, te1 and te2."""
    t = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight": r(2, 10),
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_B.weight": r(10, 2),
        "text_encoder.text_model.encoder.layers.3.mlp.fc1.lora_A.weight": r(2, 12),
        "text_encoder.text_model.encoder.layers.3.mlp.fc1.lora_B.weight": r(48, 2),
        "text_encoder_2.text_model.encoder.layers.4.self_attn.v_proj.lora_A.weight": r(2, 20),
        "text_encoder_2.text_model.encoder.layers.4.self_attn.v_proj.lora_B.weight": r(20, 2),
    }
    b, o, rep = bake_one(tmp_path, base_path, t, strength=1.0)
    k1 = U + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"
    p = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    assert close(o[k1] - b[k1], t[p + ".lora_B.weight"] @ t[p + ".lora_A.weight"])
    kv = "conditioner.embedders.1.model.transformer.resblocks.4.attn.in_proj_weight"
    p = "text_encoder_2.text_model.encoder.layers.4.self_attn.v_proj"
    assert close(o[kv][40:] - b[kv][40:], t[p + ".lora_B.weight"] @ t[p + ".lora_A.weight"])
    assert rep["loras"][0]["matched"] == {"unet": 1, "te1": 1, "te2": 1}
