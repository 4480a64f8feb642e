"""Pre-flight warnings on bake and merge: each fires on a crafted recipe; a merge meeting broken CLIP
position_ids writes the integer arange and says so."""

from __future__ import annotations

import pytest
import torch
from factories import tiny_checkpoint, write
from safetensors.torch import load_file

from lib_lorakit.bake import LoraSpec, bake
from lib_lorakit.merge.engine import ModelSpec, merge
from lib_lorakit.preflight import bake_warnings
from lib_lorakit.synth import kohya_metadata, make_lora


def character(tmp_path, arch="sdxl", name="zxqchar", base_model=None):
    meta = kohya_metadata(
        arch,
        output_name=name,
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        base_model=base_model,
        folders={
            f"10_{name}": (
                20,
                [(name, 20), ("1girl", 20), ("blue hair", 19), ("long hair", 18), ("school uniform", 16)],
            )
        },
    )
    return write(tmp_path, f"{name}.safetensors", make_lora(arch, "lora", rank=2, alpha=1.0, te=True, seed=5), meta)


def style(tmp_path, i, arch="sdxl"):
    meta = kohya_metadata(
        arch,
        output_name=f"inkwash_style{i}",
        dim=2,
        alpha=1.0,
        folders={"5_art": (30, [("scenery", 12), ("outdoors", 15), ("traditional media", 28), ("monochrome", 26)])},
    )
    return write(
        tmp_path, f"inkwash_style{i}.safetensors", make_lora(arch, "lora", rank=2, alpha=1.0, seed=10 + i), meta
    )


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf")
    return {
        "plain": tiny_checkpoint(d, "sdxl", name="plain.safetensors", seed=1),
        "illustrious": tiny_checkpoint(
            d, "sdxl", name="ill.safetensors", seed=1, metadata={"modelspec.title": "Illustrious-XL v1.0"}
        ),
    }


def test_the_issue_recipe_warns_about_each_strength(tmp_path, ckpts):
    ch, s1, s2 = character(tmp_path), style(tmp_path, 1), style(tmp_path, 2)
    rep = bake(ckpts["plain"], [LoraSpec(ch, 1.4), LoraSpec(s1, 0.9), LoraSpec(s2, 0.9)], None, dry_run=True)
    w = rep["warnings"]
    assert any("zxqchar is baked at 1.4, above its max-safe strength 0.9 (character" in x for x in w)
    assert sum("above its max-safe strength 0.8 (style" in x for x in w) == 2
    assert not any("style LoRAs are stacked" in x for x in w)  # two styles are fine


def test_more_than_two_styles(tmp_path, ckpts):
    styles = [style(tmp_path, i) for i in range(3)]
    w = bake_warnings(ckpts["plain"], [(p, 0.5) for p in styles])
    assert w == [next(x for x in w if x.startswith("3 style LoRAs are stacked"))]


def test_other_lineage(tmp_path, ckpts):
    pony = character(tmp_path, name="ponychar", base_model="ponyDiffusionV6XL_v6.safetensors")
    w = bake_warnings(ckpts["illustrious"], [(pony, 0.3)])
    assert len(w) == 1 and "trained on Pony; the checkpoint is Illustrious" in w[0]
    # the cross-lineage ceiling (0.4 for Pony on Illustrious) is the max-safe strength there
    w = bake_warnings(ckpts["illustrious"], [(pony, 0.6)])
    assert (
        any(
            "above its max-safe strength 0.4 (character: cross-lineage" in x or "above its max-safe strength 0.4" in x
            for x in w
        )
        and len(w) == 2
    )


def test_a_clean_recipe_gets_no_preflight_warning(tmp_path, ckpts):
    ch, s1 = character(tmp_path), style(tmp_path, 1)
    assert bake_warnings(ckpts["plain"], [(ch, 0.8), (s1, 0.6)]) == []
    rep = bake(ckpts["plain"], [LoraSpec(ch, 0.8), LoraSpec(s1, 0.6)], None, dry_run=True)
    assert not any("max-safe" in x or "stacked" in x or "trained on" in x for x in rep["warnings"])


PID = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.mark.parametrize(
    "damage, said",
    [
        ("float", "it is a float tensor with position 3 stored as 2.9997"),
        ("order", "is out of order (position 3 holds 4)"),
    ],
)
@pytest.mark.parametrize("workers", [1, 4])
def test_merge_writes_the_arange_for_broken_position_ids(tmp_path, damage, said, workers):
    """Also with several maths threads: the repaired tensor waits its turn behind those still merging."""
    a = tiny_checkpoint(tmp_path, "sd15", name="a.safetensors", seed=1)
    sd = load_file(tiny_checkpoint(tmp_path, "sd15", name="b0.safetensors", seed=2))
    if damage == "float":
        bad = torch.arange(77, dtype=torch.float32).reshape(1, 77)
        bad[0, 3] = 2.9998  # what averaging a float copy leaves behind
        sd[PID] = bad
    else:
        bad = torch.arange(77).reshape(1, 77)
        bad[0, 3], bad[0, 4] = 4, 3
        sd[PID] = bad
    b = write(tmp_path, "b.safetensors", sd)
    out = str(tmp_path / "out.safetensors")
    rep = merge([ModelSpec(a), ModelSpec(b)], out, workers=workers)
    got = load_file(out)[PID]
    ref = load_file(a)  # every other tensor still under its own name, in the header's order
    assert list(load_file(out)) == list(ref)
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(77).reshape(1, 77))
    msg = next(w for w in rep["warnings"] if w.startswith(PID))
    assert said in msg and "written as the integer arange" in msg and "in b it" in msg
    assert rep["tensors"]["copied"]["position_ids repaired"] == 1


def test_a_healthy_merge_copies_position_ids_untouched(tmp_path):
    a = tiny_checkpoint(tmp_path, "sd15", name="a.safetensors", seed=1)
    b = tiny_checkpoint(tmp_path, "sd15", name="b.safetensors", seed=2)
    rep = merge([ModelSpec(a), ModelSpec(b)], str(tmp_path / "o.safetensors"))
    assert "position_ids repaired" not in rep["tensors"]["copied"]
    assert not any("position_ids" in w for w in rep["warnings"])


def test_the_bake_preflight_uses_the_users_max_safe_table(tmp_path, ckpts):
    """A character ceiling lowered to 0.5 in the user's settings warns on a 0.7 bake through ops; the shipped
    table (0.9) does not."""
    from lib_lorakit.ops import LocalContext
    from lib_lorakit.ops import bake as bake_op

    ch = character(tmp_path)
    req = {"base": ckpts["plain"], "loras": [{"name": ch, "strength": 0.7}], "dry_run": True}
    shipped = bake_op.bake(LocalContext(data_dir=str(tmp_path / "shipped")), req)["report"]["warnings"]
    assert not any("max-safe" in w for w in shipped), shipped
    ctx = LocalContext(data_dir=str(tmp_path / "mine"))
    (tmp_path / "mine").mkdir()
    ctx.update_settings({"max_safe_strength": {"character": 0.5}})
    mine = bake_op.bake(ctx, req)["report"]["warnings"]
    assert any("zxqchar is baked at 0.7, above its max-safe strength 0.5 (character" in w for w in mine), mine
