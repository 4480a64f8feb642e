"""Where a module's scale comes from: header parsing and cross-checks (the bake-level checks: test_writers.py)."""

import json
import math

import pytest
import torch
from factories import tiny_checkpoint, write

from lib_lorakit.bake import LoraSpec, bake
from lib_lorakit.networks.scale import ScaleResolver, crosscheck_network_alpha, read_adapter_metadata


def test_adapter_metadata_per_component_and_unprefixed():
    meta = {
        "lora_adapter_metadata": json.dumps(
            {
                "unet.r": 4,
                "unet.lora_alpha": 8,
                "text_encoder.r": 2,
                "text_encoder.lora_alpha": 2,
                "text_encoder.use_rslora": True,
            }
        )
    }
    cfg, notes = read_adapter_metadata(meta)
    assert notes == [] and set(cfg) == {"unet", "te1"}
    assert cfg["unet"].scale("down_blocks.0.x.to_q", 4)[0] == 2.0
    assert cfg["te1"].scale("text_model.encoder.layers.0.self_attn.q_proj", 2)[0] == pytest.approx(2 / math.sqrt(2))
    plain, _ = read_adapter_metadata({"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 4})})
    assert set(plain) == {"*"}
    bad, notes = read_adapter_metadata({"lora_adapter_metadata": "{not json"})
    assert bad == {} and "not valid JSON" in notes[0]


def test_patterns_follow_peft_suffix_matching():
    cfg, _ = read_adapter_metadata(
        {
            "lora_adapter_metadata": json.dumps(
                {
                    "unet.r": 4,
                    "unet.lora_alpha": 4,
                    "unet.rank_pattern": {"attn2.to_k": 2},
                    "unet.alpha_pattern": {"to_v": 8},
                }
            )
        }
    )
    u = cfg["unet"]
    assert u.scale("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 2)[:2] == (2.0, 2)
    assert u.scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 4)[:2] == (1.0, 4)  # attn1: no
    assert u.scale("mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 4)[0] == 2.0


def test_kohya_names_do_not_take_peft_metadata():
    r = ScaleResolver({"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})})
    assert (
        r.resolve("lora_unet_down_blocks_0_x", "unet", True, {"lora_up.weight": "", "lora_down.weight": ""}, 4) is None
    )
    assert r.resolve("unet.down_blocks.0.x", "unet", True, {"lora_up.weight": "", "lora_down.weight": ""}, 4) == 2.0
    assert r.report()["sources"] == {
        "none in file (scale 1 assumed)": 1,
        "PEFT adapter metadata (lora_adapter_metadata, unet)": 1,
    }


def test_network_alpha_crosscheck():
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4"}
    assert crosscheck_network_alpha(meta, [(8, 4.0, False), (8, 1.0, True)]) is None  # conv alphas differ by design
    note = crosscheck_network_alpha(meta, [(8, 8.0, False)])
    assert "ss_network_alpha 4" in note and "tensors say 8" in note
    assert crosscheck_network_alpha({}, [(8, 8.0, False)]) is None


def test_bake_reports_network_alpha_disagreement(tmp_path):
    base = tiny_checkpoint(tmp_path, "sd15", dtype=torch.float32)
    m = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = write(
        tmp_path,
        "l.safetensors",
        {
            f"{m}.lora_down.weight": torch.ones(2, 5, 1, 1),
            f"{m}.lora_up.weight": torch.ones(5, 2, 1, 1),
            f"{m}.alpha": torch.tensor(2.0),
        },
        {"ss_network_dim": "2", "ss_network_alpha": "1"},
    )
    rep = bake(base, [LoraSpec(lora)], None, dry_run=True)
    sc = rep["loras"][0]["scale"]
    assert sc["sources"] == {"alpha tensors": 1}
    assert any("ss_network_alpha 1" in n and "tensors say 2" in n for n in sc["notes"])
