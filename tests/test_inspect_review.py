"""Inspector: tag normalisation, several triggers, the training-settings review, checkpoints, and
agreement with the bake on the demo's files."""

from __future__ import annotations

import json
import os

import pytest
from factories import tiny_checkpoint, write

from lib_lorakit.bake import LoraSpec, plan_bake
from lib_lorakit.inspect import inspect_file, inspect_paths, render
from lib_lorakit.inspect.tags import emphasis_in, normalise_tag
from lib_lorakit.synth import kohya_metadata, make_lora


@pytest.mark.parametrize(
    "raw, want, emph",
    [
        ("blue_hair", "blue hair", False),
        ("Blue Hair", "blue hair", False),
        ("(blue_hair:1.2)", "blue hair", True),
        ("((smile))", "smile", True),
        ("[smile]", "smile", True),
        (r"hatsune miku \(cosplay\)", "hatsune miku (cosplay)", False),
        ("^_^", "^_^", False),
        ("score_9", "score 9", False),
        ("  long   hair ", "long hair", False),
    ],
)
def test_normalise_tag(raw, want, emph):
    assert normalise_tag(raw) == want and emphasis_in(raw) is emph


def lora(tmp_path, name, folders, arch="sd15", rank=2, alpha=1.0, **kw):
    meta = kohya_metadata(
        arch,
        output_name=name,
        dim=kw.pop("dim", rank),
        alpha=alpha,
        folders=folders,
        keep_tokens=kw.pop("keep_tokens", 1),
        epochs=kw.pop("epochs", 10),
        extra=kw.pop("extra", None),
    )
    return write(
        tmp_path, f"{name}.safetensors", make_lora(arch, "lora", rank=rank, alpha=alpha, te=True, seed=2), meta
    )


def char_tags(sep: str) -> list[tuple[str, int]]:
    u = lambda s: s.replace(" ", sep)
    return [
        (u("zxq girl"), 20),
        ("1girl", 20),
        (u("blue hair"), 19),
        (u("long hair"), 18),
        (u("school uniform"), 16),
        (u("hair ribbon"), 15),
        ("solo", 20),
    ]


def test_underscore_and_space_captions_give_the_same_category_and_trigger(tmp_path):
    a = inspect_file(lora(tmp_path, "mine_a", {"10_mine": (20, char_tags("_"))}))
    b = inspect_file(lora(tmp_path, "mine_b", {"10_mine": (20, char_tags(" "))}))
    assert a["category"] == b["category"] == "character"
    assert a["trigger_normalised"] == b["trigger_normalised"] == "zxq girl"
    assert (a["trigger"], b["trigger"]) == ("zxq_girl", "zxq girl")  # as each set of captions wrote it
    assert a["category_detail"]["scores"] == b["category_detail"]["scores"]


def test_emphasis_forms_count_as_one_tag(tmp_path):
    tags = [("zxq girl", 20), ("blue hair", 10), ("(blue hair:1.2)", 6), ("blue_hair", 4), ("1girl", 20)]
    rep = inspect_file(lora(tmp_path, "emph", {"10_emph": (20, tags)}))
    folder = rep["training"]["folders"][0]
    assert {t["tag"]: t["count"] for t in folder["tags"]}["blue hair"] == 20
    assert [f["check"] for f in rep["training_review"]] == ["caption_emphasis"]


def test_two_characters_give_both_triggers(tmp_path):
    folders = {
        "10_alicezq": (20, [("alicezq", 20), ("1girl", 20), ("red hair", 18)]),
        "10_borkzq": (30, [("borkzq", 30), ("1boy", 30), ("black hair", 27)]),
    }
    rep = inspect_file(lora(tmp_path, "pair", folders))
    got = {t["tag"]: t for t in rep["triggers"]}
    assert set(got) == {"alicezq", "borkzq"}
    assert got["alicezq"]["share"] == 0.4 and got["borkzq"]["share"] == 0.6
    assert all(t["evidence"] for t in rep["triggers"]) and rep["trigger"] == "borkzq"
    assert "2 concepts" in rep["trigger_reason"] and "concept    'alicezq'" in render(rep)
    # one folder whose rare tags split its captions
    one = {"10_duo": (40, [("alicezq", 21), ("borkzq", 19), ("1girl", 40), ("smile", 30)])}
    got = {t["tag"]: t["share"] for t in inspect_file(lora(tmp_path, "duo", one))["triggers"]}
    assert got == {"alicezq": 0.525, "borkzq": 0.475}
    # one concept: no list
    assert inspect_file(lora(tmp_path, "single", {"10_mine": (20, char_tags(" "))}))["triggers"] == []


CLEAN = {"10_mine": (20, char_tags(" "))}
CRAFTED = {  # check -> (lora kwargs, what the line must say)
    "dim_vs_rank": ({"dim": 32}, "says 32 but the tensors have rank 2"),
    "alpha_ratio": ({"alpha": 8.0}, "scales every update ×4"),
    "learning_rate": ({"extra": {"ss_optimizer": "prodigyopt.Prodigy"}}, "expects a learning rate near 1.0"),
    "epochs_repeats": ({"epochs": 40}, "seen 400 times"),
    "folder_imbalance": ({"folders": {"10_mine": (20, char_tags(" ")), "1_other": (5, [("zxq girl", 5)])}}, "(40.0×)"),
    "keep_tokens": ({"keep_tokens": 0}, "keep_tokens = 0"),
    "caption_emphasis": ({"folders": {"10_mine": (20, char_tags(" ") + [("(smile:1.3)", 4)])}}, "(smile:1.3)"),
    "resolution": ({"arch": "sdxl", "extra": {"ss_resolution": "(512, 512)"}}, "trained at 512 px for SDXL"),
}


def test_the_review_is_silent_on_a_clean_file(tmp_path):
    for arch in ("sd15", "sdxl"):
        assert inspect_file(lora(tmp_path, f"clean{arch}", CLEAN, arch=arch))["training_review"] == []


@pytest.mark.parametrize("check", list(CRAFTED))
def test_each_review_finding_fires_on_a_crafted_file(tmp_path, check):
    kw, text = CRAFTED[check]
    kw = dict(kw)
    folders = kw.pop("folders", CLEAN)
    rep = inspect_file(lora(tmp_path, check, folders, **kw))
    found = {f["check"]: f["text"] for f in rep["training_review"]}
    assert set(found) == {check}, found
    assert text in found[check] and "\n" not in found[check]
    assert f"training   {found[check]}" in render(rep)


def test_alpha_too_low_and_adam_learning_rate(tmp_path):
    rep = inspect_file(lora(tmp_path, "weak", CLEAN, alpha=0.05))
    assert [f["check"] for f in rep["training_review"]] == ["alpha_ratio"] and "×0.025" in rep["training_review"][0][
        "text"
    ]
    rep = inspect_file(lora(tmp_path, "hot", CLEAN, extra={"ss_unet_lr": "0.005"}))
    assert [f["check"] for f in rep["training_review"]] == ["learning_rate"]


def test_inspect_on_a_checkpoint_says_so(tmp_path):
    path = tiny_checkpoint(tmp_path, "sdxl", metadata={"modelspec.title": "Pony Diffusion V6 XL"})
    rep = inspect_paths([path])[0]
    assert rep["file_type"] == "checkpoint" and rep["architecture"] == "sdxl" and rep["profile"] == "pony"
    assert rep["family"]["lineage"][0]["lineage"] == "Pony"
    text = render(rep)
    assert "an SDXL checkpoint (Pony" in text and "not a LoRA" in text and "network" not in text


def test_demo_loras_match_the_demo_checkpoint_as_the_bake_does(tmp_path):
    from lib_lorakit.demo import _build  # what `python -m lib_lorakit demo` writes, without the bake

    base, files = _build(str(tmp_path), "sdxl", keep=False)
    good = [p for n, p in files.items() if n != "wrong"]
    for with_ckpt in (True, False):
        reps = inspect_paths(good, checkpoint=base if with_ckpt else None)
        for rep in reps:
            assert rep["structure"]["unmatched_count"] == 0, rep["warnings"]
            assert not any("baking it would fail" in w for w in rep["warnings"])
            assert rep["structure"]["matched_against"] == (
                f"the checkpoint {base}" if with_ckpt else "the SDXL layout at 1/64 width"
            )
            plan = plan_bake(base, [LoraSpec(path=rep["file"])])  # the bake's own planning, on the real file
            assert sum(len(cs) for cs in plan.weights.values()) == rep["structure"]["modules"]
    wrong = inspect_file(files["wrong"], checkpoint=base)
    assert wrong["max_safe_strength"] == 0.0 and "cannot be used there" in " ".join(wrong["warnings"])


def test_review_in_json_report_is_plain_data(tmp_path):
    rep = inspect_file(lora(tmp_path, "x", CLEAN, epochs=40))
    json.dumps(rep["training_review"])
    assert os.path.basename(rep["file"]) == "x.safetensors"


def test_worker_process_path_matches_against_the_checkpoint_too(tmp_path):
    """What each worker of a large folder scan runs: the same checkpoint context as the threads."""
    from lib_lorakit.demo import _build
    from lib_lorakit.inspect import _parse_safe

    base, files = _build(str(tmp_path), "sd15", keep=False)
    parsed = _parse_safe((files["style-locon"], False, base))
    assert parsed.structure.matched_against == f"the checkpoint {base}" and not parsed.structure.unmatched
    alone = _parse_safe((files["style-locon"], False, None))
    assert alone.structure.matched_against == "the SD1.5 layout at 1/64 width"
    assert len(alone.structure.modules) == len(parsed.structure.modules)
