"""The lorakit tab builds under the installed gradio (CI runs this under 3.41.2 and 4.x)."""

import json

import pytest

gr = pytest.importorskip("gradio")

from lib_lorakit.errors import LorakitError  # noqa: E402
from lib_lorakit.hosts import LocalHost  # noqa: E402
from lib_lorakit.service import Lorakit  # noqa: E402
from lib_lorakit.ui import build_ui  # noqa: E402
from lib_lorakit.ui.bake_tab import rows_to_loras  # noqa: E402
from lib_lorakit.ui.common import progress_html  # noqa: E402
from lib_lorakit.ui.merge_tab import rows_to_models  # noqa: E402

IDS = ["lorakit_tabs", "lorakit_tab_bake", "lorakit_bake_base", "lorakit_bake_refresh", "lorakit_bake_lora",
       "lorakit_bake_strength", "lorakit_bake_te", "lorakit_bake_blocks", "lorakit_bake_add", "lorakit_bake_recipe",
       "lorakit_bake_prompt", "lorakit_bake_use_prompt", "lorakit_bake_dtype", "lorakit_bake_output",
       "lorakit_bake_overwrite", "lorakit_bake_allow_unmatched", "lorakit_bake_run", "lorakit_bake_check",
       "lorakit_bake_cancel", "lorakit_bake_progress", "lorakit_bake_summary", "lorakit_bake_report",
       "lorakit_bake_job", "lorakit_bake_done", "lorakit_tab_merge", "lorakit_merge_pick", "lorakit_merge_weight",
       "lorakit_merge_add", "lorakit_merge_preset", "lorakit_merge_models", "lorakit_merge_method", "lorakit_merge_base",
       "lorakit_merge_blocks", "lorakit_merge_vae", "lorakit_merge_te", "lorakit_merge_output", "lorakit_merge_run",
       "lorakit_merge_cancel", "lorakit_merge_progress", "lorakit_merge_summary", "lorakit_merge_chart",
       "lorakit_diff_a", "lorakit_diff_b", "lorakit_diff_run", "lorakit_diff_table", "lorakit_diff_chart"]


def test_tab_builds_with_every_control(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "lo").mkdir()
    svc = Lorakit(LocalHost(str(tmp_path / "ck"), str(tmp_path / "lo")))
    block = build_ui(svc)
    cfg = block.get_config_file() if hasattr(block, "get_config_file") else block.config
    ids = {c.get("props", {}).get("elem_id") for c in cfg["components"]}
    missing = [i for i in IDS if i not in ids]
    assert not missing, f"gradio {gr.__version__}: missing {missing}"
    assert len(cfg["dependencies"]) >= 12  # bake: refresh, add, tags, bake, check, cancel; merge: refresh, add,
    # preset, merge, cancel, compare
    json.dumps(cfg)  # serialisable, as the WebUI sends it to the browser


def test_recipe_rows_are_read_and_checked():
    rows = [["ink", 0.8, "", "INALL"], ["", 1, "", ""], ["grain", "0.5", "0.2", ""]]
    loras = rows_to_loras(rows)
    assert [(x.name, x.strength, x.te_strength, x.blocks) for x in loras] == [
        ("ink", 0.8, None, "INALL"), ("grain", 0.5, 0.2, None)]
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
