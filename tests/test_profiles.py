"""Generation profiles: a checkpoint of each lineage (tiny, real key layout, the metadata/keys that
identify it) gets that profile's settings in the grid Script, a grid job, an autotest, a triage and a
tournament, and the run records hold them. Expected values are read straight from profiles.json."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from fake_gen import FakeBackend
from test_grid_script import load_script_class, processing_object, webui  # noqa: F401 (fixture)

from lib_lorakit.errors import RecipeError
from lib_lorakit.eval import tournament as T
from lib_lorakit.eval import triage as tr
from lib_lorakit.eval.forms import tournament_spec_from_form, triage_form_defaults
from lib_lorakit.eval.store import Store
from lib_lorakit.gen import profiles as P
from lib_lorakit.gen.autotest import AutotestOptions
from lib_lorakit.gen.autotest import test_lora as autotest_one
from lib_lorakit.gen.grid import build_spec, run_grid
from lib_lorakit.gen.run import Run
from lib_lorakit.synth import kohya_metadata, make_lora, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "lib_lorakit", "gen", "profiles.json"), encoding="utf-8") as _f:
    RAW = json.load(_f)
GEN = ("width", "height", "steps", "cfg_scale", "sampler_name", "scheduler", "clip_skip")

_VPRED = {"v_pred": torch.zeros(0, dtype=torch.int64), "ztsnr": torch.zeros(0, dtype=torch.int64)}
# profile -> (arch, checkpoint metadata, extra keys): what real files of that family carry
LINEAGES = {
    "sd15": ("sd15", {"modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "dreamy photo v3"}, None),
    "sdxl": (
        "sdxl",
        {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "juggernaut v9"},
        None,
    ),
    "pony": ("sdxl", {"modelspec.title": "Pony Diffusion V6 XL"}, None),
    "illustrious": ("sdxl", {"modelspec.title": "Illustrious-XL v0.1"}, None),
    "noobai-eps": ("sdxl", {"modelspec.title": "NoobAI-XL 1.0 (epsilon)"}, None),
    "noobai-vpred": ("sdxl", {"modelspec.title": "NoobAI-XL V-Pred 1.0"}, _VPRED),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {
        name: write_checkpoint(str(d / f"{name}.safetensors"), arch, metadata=meta, extra=extra, seed=3)
        for name, (arch, meta, extra) in LINEAGES.items()
    }


def expected(name: str) -> dict:
    raw = RAW["profiles"][name]
    return {k: raw.get(k) for k in GEN}  # no clip_skip: the host's own setting (None sent)


def sent(call: dict) -> dict:
    return {k: call.get(k) for k in GEN}


def workspace(tmp_path, checkpoints, name, lora_meta=True):
    """A host folder with the lineage's checkpoint as 'base', a stand-in 'other', and a character LoRA
    of the same architecture with a trigger."""
    arch = LINEAGES[name][0]
    ck, lo = tmp_path / "ck", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    shutil.copy(checkpoints[name], ck / "base.safetensors")
    (ck / "other.safetensors").write_bytes(b"x")
    meta = kohya_metadata(
        arch,
        output_name="qzchar",
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        folders={"10_qzchar woman": (20, [("qzchar", 20), ("1girl", 20), ("blue hair", 19), ("solo", 18)])},
    )
    from safetensors.torch import save_file

    save_file(make_lora(arch, "lora", rank=2, te=True, seed=4), str(lo / "qzchar.safetensors"), meta)
    return FakeBackend(str(ck), str(lo)), str(ck / "base.safetensors")


# --- detection and settings ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LINEAGES))
def test_each_lineage_gets_its_profile(checkpoints, name):
    got = P.settings_for(checkpoints[name])
    assert got["profile"] == name, got["reason"]
    assert {k: got["settings"].get(k) for k in GEN} == expected(name)
    assert got["quality"] == RAW["profiles"][name]["quality"]
    assert got["negative"] == RAW["profiles"][name]["negative"]
    assert got["reason"] and got["overridden"] == []


def test_vpred_reason_names_the_key_and_header_pairs_work(checkpoints):
    got = P.settings_for(checkpoints["noobai-vpred"])
    assert "'v_pred' key" in got["reason"] and "ztsnr" in got["reason"]
    assert got["settings"]["cfg_rescale"] == RAW["profiles"]["noobai-vpred"]["cfg_rescale"] > 0
    assert any("CFG rescale" in n for n in got["notes"])
    from lib_lorakit.formats.safetensors_io import read_header

    tensors, meta = read_header(checkpoints["pony"])
    assert P.settings_for(({k: t.shape for k, t in tensors.items()}, meta))["profile"] == "pony"
    # an Illustrious checkpoint whose title also names NoobAI is NoobAI (trained from Illustrious)
    meta2 = {**meta, "modelspec.title": "NoobAI-XL (Illustrious based)"}
    assert P.settings_for(({k: t.shape for k, t in tensors.items()}, meta2))["profile"] == "noobai-eps"


def test_overrides_win_and_bad_ones_are_refused(checkpoints):
    got = P.settings_for(checkpoints["illustrious"], {"steps": 12, "cfg_scale": None, "negative": "bad"})
    assert (
        got["settings"]["steps"] == 12 and got["settings"]["cfg_scale"] == RAW["profiles"]["illustrious"]["cfg_scale"]
    )
    assert got["negative"] == "bad" and got["overridden"] == ["negative", "steps"]
    with pytest.raises(RecipeError, match="Unknown generation setting 'stepz'"):
        P.settings_for(checkpoints["illustrious"], {"stepz": 3})
    with pytest.raises(RecipeError, match=r"cfg_scale = 99 is outside 0\.\.30"):
        P.settings_for(checkpoints["illustrious"], {"cfg_scale": 99})
    with pytest.raises(RecipeError, match="did you mean 'pony'"):
        P.settings_for(None, profile="ponny")
    assert P.settings_for(checkpoints["sd15"], profile="pony")["profile"] == "pony"


def test_unreadable_checkpoint_falls_back_and_says_why(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"x")
    got = P.settings_for(str(bad))
    assert got["profile"] == "sd15" and "could not be read" in got["reason"]
    assert {k: got["settings"][k] for k in P.GEN_DEFAULTS} == dict(P.GEN_DEFAULTS)  # the old defaults


def test_user_profiles_from_the_settings_file(checkpoints, tmp_path):
    from lib_lorakit import settings as S

    S.update(
        str(tmp_path),
        {
            "generation_profiles": {
                "illustrious": {"cfg_scale": 4.0},
                "mylineage": {
                    "arch": "sdxl",
                    "lineage": "Illustrious",
                    "width": 896,
                    "height": 1152,
                    "steps": 24,
                    "cfg_scale": 5.0,
                    "sampler_name": "Euler a",
                },
            }
        },
    )
    st = S.load(str(tmp_path))
    got = P.settings_for(checkpoints["illustrious"], settings=st)
    assert got["profile"] == "mylineage" and got["settings"]["width"] == 896  # a user profile for the lineage wins
    assert P.load_profiles(P.user_profiles(st))["illustrious"].settings["cfg_scale"] == 4.0
    with pytest.raises(RecipeError, match="unknown field"):
        P.load_profiles({"pony": {"cfgscale": 3}})


def test_trigger_positions():
    assert (
        P.compose("1girl, solo, smile", quality="q1, q2", trigger="zq", trigger_position="after_count")
        == "q1, q2, 1girl, zq, solo, smile"
    )
    assert (
        P.compose("1girl, solo", quality="score_9", trigger="zq", trigger_position="after_quality")
        == "score_9, zq, 1girl, solo"
    )
    assert P.compose("a person standing", trigger="zq", trigger_position="first") == "zq, a person standing"
    assert (
        P.compose("scenery, no humans", quality="q", trigger="zq", trigger_position="after_count")
        == "q, zq, scenery, no humans"
    )


def test_readme_table_is_the_shipped_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert P.table_markdown() in readme


def test_gen_defaults_are_the_sd15_profile():
    sd15 = RAW["profiles"]["sd15"]
    assert dict(P.GEN_DEFAULTS) == {k: sd15[k] for k in P.GEN_DEFAULTS} == P.default_settings()


# --- every generating feature --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LINEAGES))
def test_grid_job_uses_the_profile_and_records_it(tmp_path, checkpoints, name):
    be, path = workspace(tmp_path, checkpoints, name)
    spec, notes = build_spec(
        be.loras(),
        loras=["qzchar"],
        prompt="qzchar, 1girl",
        strengths="0, 1",
        seeds=[1],
        checkpoint=be.checkpoints()[0].name,
        checkpoint_path=path,
    )
    res = run_grid(be, spec, str(tmp_path / "out"), notes=notes)
    assert be.calls and all(sent(c) == expected(name) for c in be.calls)
    assert all(c["negative_prompt"] == RAW["profiles"][name]["negative"] for c in be.calls)
    rec = Run(res["run_dir"]).record()
    assert rec["profile"] == name and {k: rec["settings"].get(k) for k in GEN} == expected(name)
    assert Run(res["run_dir"]).plan["meta"]["profile"]["profile"] == name
    with open(res["summary"], encoding="utf-8") as f:
        assert f"(`{name}`)" in f.read()


@pytest.mark.parametrize("name", ["sd15", "illustrious", "noobai-vpred"])
def test_autotest_uses_the_profile_prompts_and_settings(tmp_path, checkpoints, name):
    be, _ = workspace(tmp_path, checkpoints, name)
    lora = os.path.join(be.lora_dir, "qzchar.safetensors")
    res = autotest_one(be, lora, str(tmp_path / "out"), AutotestOptions(strengths="0, 1", checkpoint="base"))
    assert all(sent(c) == expected(name) for c in be.calls)
    style = RAW["profiles"][name]["prompt_style"]
    quality = RAW["profiles"][name]["quality"]
    base_prompts = {c["prompt"] for c in be.calls if "<lora:" not in c["prompt"]}
    assert len(base_prompts) == len(RAW["prompt_sets"][style])
    for body in RAW["prompt_sets"][style]:  # each prompt of the set, with quality tags and trigger
        assert any(body.split(", ")[-1] in p and p.startswith(quality) and "qzchar" in p for p in base_prompts)
    assert Run(res["run_dir"]).record()["profile"] == name


@pytest.mark.parametrize("name", list(LINEAGES))
def test_triage_uses_the_profile_and_records_it(tmp_path, checkpoints, name):
    be, _ = workspace(tmp_path, checkpoints, name)
    store = Store(str(tmp_path / "data"))
    t = tr.create_triage(store, be, checkpoint="base", seeds=[1])
    it = next(i for i in t.items if i["lora"] == "qzchar")
    raw = RAW["profiles"][name]
    body = RAW["prompts"][raw["prompt_style"]]["character"]
    assert it["trigger"] == "qzchar" and it["kind"] == "trigger-dependent"
    if raw["trigger_position"] == "first":
        assert it["prompt"] == f"qzchar, {body}"
    elif raw["trigger_position"] == "after_quality":
        assert it["prompt"] == f"{raw['quality']}, qzchar, {body}"
    else:  # after the count tag: "1girl, qzchar, solo, ..."
        first, rest = body.split(", ", 1)
        assert it["prompt"] == f"{raw['quality']}, {first}, qzchar, {rest}"
    rec = tr.generate(t, be, str(tmp_path / "out"))
    assert rec["profile"] == name and {k: rec["settings"].get(k) for k in GEN} == expected(name)
    assert be.calls and all(sent(c) == expected(name) and c["negative_prompt"] == raw["negative"] for c in be.calls)
    assert tr.Triage(store, t.id).rec["params"]["profile"]["profile"] == name
    # the triage form shows the same
    form = triage_form_defaults(os.path.join(be.ckpt_dir, "base.safetensors"))
    assert form["profile"] == name and form["prompts"]["character"].startswith(raw["quality"] or body[:5])


@pytest.mark.parametrize("name", list(LINEAGES))
def test_tournament_from_the_form_uses_the_profile_and_records_it(tmp_path, checkpoints, name):
    be, _ = workspace(tmp_path, checkpoints, name)
    names = {c.name: c.path for c in be.checkpoints()}
    base, other = sorted(names)
    spec = tournament_spec_from_form(
        [
            {"kind": "checkpoint", "checkpoint": base},
            {"kind": "checkpoint", "checkpoint": other},
            {"kind": "recipe", "checkpoint": other, "loras": "qzchar:0.6"},
        ],
        control=0,
        prompts=None,
        seeds="7",
        checkpoint_path=names,
        name="form",
    )
    raw = RAW["profiles"][name]
    assert spec["profile"]["profile"] == name and {k: spec["settings"].get(k) for k in GEN} == expected(name)
    assert [c["control"] for c in spec["candidates"]] == [True, False, False]
    assert [p["seed"] for p in spec["prompts"]] == [7, 8, 9, 10, 11]
    assert all(p["negative_prompt"] == raw["negative"] for p in spec["prompts"])
    assert all(p["prompt"].startswith(raw["quality"]) for p in spec["prompts"])
    tours = T.Tournaments(Store(str(tmp_path / "data")))
    tid = tours.create(T.TournamentSpec.from_dict(spec))
    rec = T.generate(tours, tid, be, str(tmp_path / "out"))
    assert rec["profile"] == name and {k: rec["settings"].get(k) for k in GEN} == expected(name)
    assert len(be.calls) == 15 and all(sent(c) == expected(name) for c in be.calls)


def test_tournament_form_errors(tmp_path):
    with pytest.raises(RecipeError, match="The control 'zz' is not one of the candidates"):
        tournament_spec_from_form([{"checkpoint": "a"}, {"checkpoint": "b"}], "zz", None, None)
    with pytest.raises(RecipeError, match="Exactly one candidate must be the control"):
        tournament_spec_from_form([{"checkpoint": "a"}, {"checkpoint": "b"}], None, None, None)
    with pytest.raises(RecipeError, match="merge recipe with 1 model"):
        tournament_spec_from_form(
            [{"checkpoint": "a"}, {"kind": "merge", "merge": {"models": [{"name": "a"}]}}], 0, None, None
        )
    with pytest.raises(RecipeError, match="3 seeds for 5 prompts"):
        tournament_spec_from_form([{"checkpoint": "a"}, {"checkpoint": "b"}], 0, None, "1, 2, 3")
    with pytest.raises(RecipeError, match="at least 5 prompts; this one has 2"):
        tournament_spec_from_form([{"checkpoint": "a"}, {"checkpoint": "b"}], 0, "one\ntwo", None)
    d = tournament_spec_from_form(
        [
            {"checkpoint": "a.safetensors [12]"},
            {"checkpoint": "a.safetensors [12]"},
            {"kind": "merge", "merge": {"models": [{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}]}},
        ],
        "a-2",
        None,
        [1, 2, 3, 4, 5],
        first_version=False,
    )
    assert [c["id"] for c in d["candidates"]] == ["a", "a-2", "merge-a-b"] and d["candidates"][1]["control"]
    assert d["profile"]["profile"] == "sd15"  # no checkpoint file to read: the SD1.5 defaults, said so
    assert "no checkpoint to read" in d["profile"]["reason"]


# --- the grid Script -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd15", "sdxl", "pony", "illustrious", "noobai-eps", "noobai-vpred"])
def test_grid_script_uses_the_loaded_checkpoints_profile(webui, checkpoints, name):  # noqa: F811
    fake, tmp = webui
    shutil.copy(checkpoints[name], os.path.join(str(tmp), "models", "Stable-diffusion", "base.safetensors"))
    s = load_script_class()()
    p = processing_object(negative_prompt="")
    processed = s.run(p, ["styleA"], "0, 1", False, "5", False, True)
    calls = [c for c, _ in fake.processing.calls]
    raw = RAW["profiles"][name]
    assert calls and all(
        (c.width, c.height, c.steps, c.cfg_scale, c.sampler_name, c.scheduler)
        == (raw["width"], raw["height"], raw["steps"], raw["cfg_scale"], raw["sampler_name"], raw["scheduler"])
        for c in calls
    )
    assert all(c.override_settings.get("CLIP_stop_at_last_layers") == raw.get("clip_skip") for c in calls)
    assert all(c.negative_prompt == raw["negative"] for c in calls)
    assert (p.width, p.steps) == (64, 4)  # the user's processing object is untouched
    run_dir = processed.infotexts[0].split("run folder ")[1].splitlines()[0]
    rec = Run(run_dir).record()
    assert rec["profile"] == name and {k: rec["settings"].get(k) for k in GEN} == expected(name)


def test_grid_script_without_the_profile_keeps_the_txt2img_fields(webui, checkpoints):  # noqa: F811
    fake, tmp = webui
    shutil.copy(checkpoints["illustrious"], os.path.join(str(tmp), "models", "Stable-diffusion", "base.safetensors"))
    s = load_script_class()()
    s.run(processing_object(), ["styleA"], "0, 1", False, "5", False)  # an API call without the 6th argument
    calls = [c for c, _ in fake.processing.calls]
    assert calls and all(
        (c.width, c.steps, c.sampler_name, c.negative_prompt) == (64, 4, "Euler", "blurry") for c in calls
    )


def test_profile_settings_are_checked_when_stored(tmp_path):
    from lib_lorakit import settings as S

    with pytest.raises(RecipeError, match=r"steps = 0 is outside 1\.\.150"):
        S.update(str(tmp_path), {"generation_profiles": {"pony": {"steps": 0}}})
    S.update(str(tmp_path), {"generation_profiles": {"pony": {"steps": 30}}})
    S.update(str(tmp_path), {"generation_profiles": {"pony": {"cfg_scale": 6}}})  # field by field
    assert S.load(str(tmp_path))["generation_profiles"] == {"pony": {"steps": 30, "cfg_scale": 6}}


def test_clip_skip_reaches_the_webui_as_its_setting(tmp_path):
    """HTTP: override_settings CLIP_stop_at_last_layers next to the checkpoint (restored afterwards)."""
    from fake_sdapi import FakeWebUI

    from lib_lorakit.gen.backend import HttpBackend

    ck, lo = tmp_path / "ck", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    (ck / "base.safetensors").write_bytes(b"x")
    srv = FakeWebUI(FakeBackend(str(ck), str(lo)))
    try:
        HttpBackend(srv.url).txt2img(
            {
                "prompt": "x",
                "seed": 1,
                "checkpoint": "base.safetensors [abc]",
                "clip_skip": 2,
                "width": 64,
                "height": 64,
            }
        )
        body = next(b for m, p, b in srv.requests if p == "/sdapi/v1/txt2img")
        assert body["override_settings"] == {
            "sd_model_checkpoint": "base.safetensors [abc]",
            "CLIP_stop_at_last_layers": 2,
        }
        assert body["override_settings_restore_afterwards"] is True
    finally:
        srv.close()


def test_a_json_spec_gets_the_controls_profile_under_its_own_settings(tmp_path, checkpoints):
    from lib_lorakit.eval.forms import spec_with_profile

    data = {
        "name": "j",
        "candidates": [{"id": "v1", "checkpoint": "ill", "control": True}, {"id": "v2", "checkpoint": "x"}],
        "prompts": [{"prompt": f"p{i}", "seed": i} for i in range(5)],
        "settings": {"steps": 9},
    }
    d = spec_with_profile(data, checkpoint_path={"ill": checkpoints["illustrious"]})
    raw = RAW["profiles"]["illustrious"]
    assert d["settings"]["steps"] == 9 and d["settings"]["width"] == raw["width"]
    assert d["profile"]["profile"] == "illustrious" and d["profile"]["overridden"] == ["steps"]
    assert all(p["negative_prompt"] == raw["negative"] for p in d["prompts"]) and data["settings"] == {"steps": 9}
