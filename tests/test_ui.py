"""The lorakit tab builds under the installed gradio (CI runs this under 3.41.2 and 4.x)."""

import json

import pytest

gr = pytest.importorskip("gradio")

from lib_lorakit.errors import LorakitError  # noqa: E402
from lib_lorakit.hosts import LocalHost  # noqa: E402
from lib_lorakit.ops import HostContext  # noqa: E402
from lib_lorakit.ui import build_ui  # noqa: E402
from lib_lorakit.ui.bake_tab import rows_to_loras  # noqa: E402
from lib_lorakit.ui.common import progress_html  # noqa: E402
from lib_lorakit.ui.merge_tab import rows_to_models  # noqa: E402

IDS = [
    "lorakit_tabs",
    "lorakit_tab_bake",
    "lorakit_bake_base",
    "lorakit_bake_refresh",
    "lorakit_bake_lora",
    "lorakit_bake_strength",
    "lorakit_bake_te",
    "lorakit_bake_blocks",
    "lorakit_bake_add",
    "lorakit_bake_recipe",
    "lorakit_bake_prompt",
    "lorakit_bake_use_prompt",
    "lorakit_bake_dtype",
    "lorakit_bake_output",
    "lorakit_bake_overwrite",
    "lorakit_bake_allow_unmatched",
    "lorakit_bake_run",
    "lorakit_bake_check",
    "lorakit_bake_cancel",
    "lorakit_bake_progress",
    "lorakit_bake_summary",
    "lorakit_bake_report",
    "lorakit_bake_job",
    "lorakit_bake_done",
    "lorakit_tab_merge",
    "lorakit_merge_pick",
    "lorakit_merge_weight",
    "lorakit_merge_add",
    "lorakit_merge_preset",
    "lorakit_merge_models",
    "lorakit_merge_method",
    "lorakit_merge_base",
    "lorakit_merge_blocks",
    "lorakit_merge_vae",
    "lorakit_merge_te",
    "lorakit_merge_output",
    "lorakit_merge_run",
    "lorakit_merge_cancel",
    "lorakit_merge_progress",
    "lorakit_merge_summary",
    "lorakit_merge_chart",
    "lorakit_diff_a",
    "lorakit_diff_b",
    "lorakit_diff_run",
    "lorakit_diff_table",
    "lorakit_diff_chart",
    "lorakit_tab_inspect",
    "lorakit_inspect_lora",
    "lorakit_inspect_ckpt",
    "lorakit_inspect_weights",
    "lorakit_inspect_run",
    "lorakit_inspect_all",
    "lorakit_inspect_report",
    "lorakit_inspect_act",
    "lorakit_inspect_pref",
    "lorakit_inspect_write",
    "lorakit_inspect_confirm",
    "lorakit_inspect_summary",
    "lorakit_inspect_strengths",
    "lorakit_inspect_lineages",
    "lorakit_inspect_save",
]


def test_tab_builds_with_every_control(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "lo").mkdir()
    svc = HostContext(LocalHost(str(tmp_path / "ck"), str(tmp_path / "lo")))
    block = build_ui(svc)
    cfg = block.get_config_file() if hasattr(block, "get_config_file") else block.config
    ids = {c.get("props", {}).get("elem_id") for c in cfg["components"]}
    missing = [i for i in IDS if i not in ids]
    assert not missing, f"gradio {gr.__version__}: missing {missing}"
    assert len(cfg["dependencies"]) >= 19  # bake: refresh, add, tags, bake, check, cancel; merge: refresh, add,
    # preset, merge, cancel, compare; inspect: refresh, inspect, scan, ask, confirm, dismiss, save
    json.dumps(cfg)  # serialisable, as the WebUI sends it to the browser


def test_recipe_rows_are_read_and_checked():
    rows = [["ink", 0.8, "", "INALL"], ["", 1, "", ""], ["grain", "0.5", "0.2", ""]]
    loras = rows_to_loras(rows)
    assert [(x.name, x.strength, x.te_strength, x.blocks) for x in loras] == [
        ("ink", 0.8, None, "INALL"),
        ("grain", 0.5, 0.2, None),
    ]
    with pytest.raises(LorakitError, match="strength 'abc' is not a number"):
        rows_to_loras([["ink", "abc", "", ""]])


def test_progress_bar_html():
    h = progress_html(0.42, "baking <x>", "running")
    assert "width:42.0%" in h and "&lt;x&gt;" in h and "lorakit-running" in h


def test_merge_rows():
    models = rows_to_models([["a.safetensors", 0.7], ["", 1], ["b.safetensors", "0.3"]])
    assert [(m.name, m.weight) for m in models] == [("a.safetensors", 0.7), ("b.safetensors", 0.3)]
    with pytest.raises(LorakitError, match="weight 'x' is not a number"):
        rows_to_models([["a", "x"]])


def test_inspect_report_markdown(tmp_path):
    from factories import write

    from lib_lorakit.inspect import inspect_file
    from lib_lorakit.synth import kohya_metadata, make_lora
    from lib_lorakit.ui.inspect_tab import report_md, summary_rows

    meta = kohya_metadata(
        "sd15",
        output_name="zkw",
        keep_tokens=1,
        dim=2,
        alpha=1.0,
        folders={"10_zkw": (12, [("zkw", 12), ("1girl", 12), ("red <b>hair</b>", 11)])},
    )
    rep = inspect_file(
        write(tmp_path, "zkw.safetensors", make_lora("sd15", "lora", rank=2, alpha=1.0, tiny=False), meta)
    )
    md = report_md(rep)
    assert "| `zkw` | trigger-dependent | character" in md and "**0.9**" in md
    assert "&lt;b&gt;" in md and "<b>hair" not in md  # tags are escaped
    assert "Folder `10_zkw`" in md and "12 images × 10 repeats" in md
    row = summary_rows([rep, {"file": "/x/bad.safetensors", "lora": "bad", "error": "truncated"}])
    assert row[0][:2] == ["zkw", "SD1.5"] and row[0][4] == "zkw" and row[1][1] == "unreadable"


def test_data_fields_are_kept_out_of_the_webuis_saved_defaults(tmp_path):
    """A1111 and Forge restore each labelled component's value from ui-config.json over the code's default
    (modules/ui_loadsave.py), skipping components marked ``do_not_save_to_config``. A config saved by an
    older version held "Preferred weight" 0: fields filled from a LoRA or a job must not take it, while a
    user's default (the doctor's seeds) still does."""
    (tmp_path / "ck").mkdir()
    (tmp_path / "lo").mkdir()
    block = build_ui(HostContext(LocalHost(str(tmp_path / "ck"), str(tmp_path / "lo"))))
    stale = {
        "lorakit/Preferred weight/value": 0.0,
        "lorakit/Baked checkpoint (filled after a bake)/value": "old.safetensors",
        "lorakit/Seeds/value": "7",
    }
    by_id = {}
    for c in block.blocks.values():  # the host's walk: key = tab / label / field
        label = getattr(c, "label", None)
        if label is None:
            continue
        by_id[getattr(c, "elem_id", None)] = c
        key = f"lorakit/{label}/value"
        if key in stale and not getattr(c, "do_not_save_to_config", False):
            c.value = stale[key]
    assert by_id["lorakit_inspect_pref"].value == 1.0
    assert by_id["lorakit_doctor_baked"].value == ""
    assert by_id["lorakit_doctor_seeds"].value == "7"
