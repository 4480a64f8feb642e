"""LoRA triage: planning, decisions that survive everything, report, archive and restore."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from factories import write
from fake_gen import FakeBackend

from lib_lorakit.errors import RecipeError
from lib_lorakit.eval import triage as tr
from lib_lorakit.eval.store import Store
from lib_lorakit.gen.run import Run, execute
from lib_lorakit.inspect import inspect_paths
from lib_lorakit.synth import kohya_metadata, make_lora


def sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def make_loras(folder, n=5, arch="sd15"):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        if i % 2:
            meta = kohya_metadata(
                arch,
                output_name=f"character{i}",
                keep_tokens=1,
                dim=2,
                alpha=1.0,
                folders={f"10_qzchar{i} woman": (20, [(f"qzchar{i}", 20), ("1girl", 20), ("solo", 18)])},
            )
            name = f"character{i}"
        else:
            meta = kohya_metadata(
                arch,
                output_name=f"style{i}",
                dim=2,
                alpha=1.0,
                folders={
                    "5_art": (30, [("scenery", 12), ("outdoors", 15), ("traditional media", 28), ("monochrome", 26)])
                },
            )
            name = f"inkwash_style{i}"
        paths.append(
            write(folder, f"{name}.safetensors", make_lora(arch, "lora", rank=2, te=bool(i % 2), seed=i), meta)
        )
    return paths


@pytest.fixture
def setup(tmp_path):
    ck, lo, out, data = tmp_path / "ck", tmp_path / "Lora", tmp_path / "outputs", tmp_path / "data"
    ck.mkdir()
    (ck / "base.safetensors").write_bytes(b"x")
    paths = make_loras(str(lo), 5) + make_loras(str(lo / "xl"), 2, arch="sdxl")
    be = FakeBackend(str(ck), str(lo))
    be._loras = [
        __import__("lib_lorakit.gen.backend", fromlist=["ModelInfo"]).ModelInfo(
            os.path.splitext(os.path.basename(p))[0], p
        )
        for p in paths
    ]
    be.refresh = lambda: None
    return be, paths, str(out), Store(str(data)), tmp_path


def create(setup, **kw):
    be, paths, out, store, _ = setup
    reps = inspect_paths(paths)
    names = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
    items, cells = tr.plan(reps, names=names, checkpoint_arch="sd15", settings={"width": 64, "height": 64}, **kw)
    t = tr.Triage.create(store, items, {"test": True})
    run = Run.create(out, "triage", cells)
    store.set_triage(t.id, run_dir=run.dir, state="generating")
    execute(run, be, check_infotext=False)
    store.set_triage(t.id, state="ready")
    return tr.Triage(store, t.id)


def test_create_and_generate_through_a_backend(setup):
    be, paths, out, store, tmp = setup
    t = tr.create_triage(
        store,
        be,
        checkpoint="base",
        seeds=[1, 2],
        settings={"width": 64, "height": 64},
        roots=[str(tmp / "Lora")],
        folder="",
    )
    assert t.rec["params"]["checkpoint"] == "base.safetensors [abc]"
    be.fail_calls = {3}
    rec = tr.generate(t, be, out)
    assert rec["failed"] == 1 and store.triage(t.id)["state"] == "incomplete"
    n = len(be.calls)
    rec = tr.generate(tr.Triage(store, t.id), be, out)  # resumes in the same run folder
    assert len(be.calls) - n == 1 and store.triage(t.id)["state"] == "ready"
    st = tr.Triage(store, t.id).state()
    # the checkpoint is a 1-byte stand-in here, so no architecture is known and nothing is skipped
    assert st["items"] == 7 and st["skipped"] == 0
    assert all(v["image"]["status"] == "ok" for v in tr.Triage(store, t.id).views())


def test_plan_strengths_triggers_shared_baselines_and_skips(setup):
    t = create(setup)
    active = [it for it in t.items if not it.get("skipped")]
    skipped = [it for it in t.items if it.get("skipped")]
    assert len(active) == 5 and len(skipped) == 2
    assert all("a sdxl LoRA; the checkpoint is sd15" == it["skipped"] for it in skipped)
    chars = [it for it in active if it["lora"].startswith("character")]
    styles = [it for it in active if "style" in it["lora"]]
    assert all(it["prompt"].startswith(it["trigger"] + ", ") and it["kind"] == "trigger-dependent" for it in chars)
    assert all(it["category"] == "style" and it["strength"] == 0.8 for it in styles)
    assert all(it["category"] == "character" and it["strength"] == 0.9 for it in chars)
    run = t.run()
    bases = [c for c in run.cells if c.row == "baseline"]
    assert len(bases) == 1 + len(chars)  # the style prompt's baseline is shared; each trigger prompt has its own
    assert all(f"<lora:{c.lora}:" in c.prompt for c in run.cells if c.row != "baseline")
    v = t.views()
    assert all(x["image"]["status"] == "ok" and x["baseline"]["status"] == "ok" for x in v)


def test_filters_and_strength_override(setup):
    t = create(setup, category="character", strength=1.2)
    active = [it for it in t.items if not it.get("skipped")]
    assert {it["lora"] for it in active} == {"character1", "character3"} and all(it["strength"] == 1.2 for it in active)
    with pytest.raises(RecipeError, match="No LoRA"):
        create(setup, name_filter="^nothing$")


def test_decisions_survive_restart_and_two_concurrent_clients(setup):
    t = create(setup)
    data_dir = os.path.dirname(t.store.path)
    n_items = len(t.items)
    errors = []

    def client(name):
        try:
            s = Store(data_dir)  # each client its own connection, as two browser tabs / processes
            for i in range(500):
                s.decide(
                    t.id, [{"idx": i % n_items, "decision": ("yes", "maybe", "no")[i % 3], "client": name, "seq": i}]
                )
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(f"tab{k}",)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    again = Store(data_dir)  # a restart
    hist = again.history(t.id)
    assert len(hist) == 1000
    for k in range(2):
        assert sorted(h["client_seq"] for h in hist if h["client"] == f"tab{k}") == list(range(500))
    # a replay of already-sent decisions (localStorage after a dropped connection) adds nothing
    assert again.decide(t.id, [{"idx": 0, "decision": "no", "client": "tab0", "seq": 5}]) == 0
    assert len(again.history(t.id)) == 1000


def test_undo_passes_and_bad_input(setup):
    t = create(setup)
    s = t.store
    s.decide(t.id, [{"idx": 0, "decision": "yes", "client": "c", "seq": 1}])
    s.decide(t.id, [{"idx": 0, "decision": "clear", "client": "c", "seq": 2}])  # undo
    assert 0 not in s.current(t.id)
    s.decide(t.id, [{"idx": 0, "decision": "no", "client": "c", "seq": 3}])
    assert s.new_pass(t.id) == 2 and s.current(t.id) == {} and s.current(t.id, 1) == {0: "no"}
    with pytest.raises(ValueError, match="'nope'"):
        s.decide(t.id, [{"idx": 0, "decision": "nope", "client": "c", "seq": 4}])
    with pytest.raises(ValueError, match="item 99"):
        s.decide(t.id, [{"idx": 99, "decision": "yes", "client": "c", "seq": 5}])


def decide_all(t, mapping):
    idx = {it["lora"]: it["idx"] for it in t.items if not it.get("skipped")}
    t.store.decide(
        t.id, [{"idx": idx[k], "decision": v, "client": "t", "seq": i} for i, (k, v) in enumerate(mapping.items())]
    )


def test_report_markdown_and_csv(setup):
    t = create(setup)
    decide_all(t, {"character1": "yes", "inkwash_style0": "no", "inkwash_style2": "maybe", "character3": "no"})
    md = tr.report_markdown(t)
    assert "| YES | 1 |" in md and "| NO | 2 |" in md and "| Skipped | 2 |" in md and "| Undecided | 1 |" in md
    assert "## NO (2," in md and "qzchar3" in md and ".png`" in md
    csv_text = tr.report_csv(t)
    assert csv_text.splitlines()[0].startswith("lora,file,decision,category,strength,trigger,size")
    assert sum(1 for ln in csv_text.splitlines() if ",no," in ln) == 2


def test_archive_and_restore_are_byte_identical_with_sidecars(setup):
    be, paths, out, store, tmp = setup
    t = create(setup)
    lora_root = str(tmp / "Lora")
    victim = next(p for p in paths if p.endswith("inkwash_style0.safetensors"))
    stem = victim[: -len(".safetensors")]
    side = {stem + ".json": b'{"activation text": "x"}', stem + ".civitai.info": b"{}", stem + ".preview.png": b"png"}
    for p, b in side.items():
        open(p, "wb").write(b)
    other = os.path.join(lora_root, "inkwash_style0.v2.safetensors")  # shares the prefix: not a sidecar
    open(other, "wb").write(b"another model")
    before = {p: sha(p) for p in [*paths, *side, other]}
    decide_all(t, {"inkwash_style0": "no", "character3": "no", "character1": "yes"})
    with pytest.raises(RecipeError, match="inside a LoRA folder"):
        tr.archive(t, os.path.join(lora_root, "archive"), [lora_root])
    res = tr.archive(t, str(tmp / "Lora-archive"), [lora_root])
    assert res["loras"] == 2 and res["files"] == 2 + 3
    assert not os.path.exists(victim) and not any(os.path.exists(p) for p in side) and os.path.exists(other)
    back = tr.restore(res["batch"])
    assert back["state"] == "restored" and not back["conflicts"]
    assert {p: sha(p) for p in before} == before  # every file back at its path, byte for byte


def test_archive_name_clash_and_restore_conflict(setup):
    be, paths, out, store, tmp = setup
    t = create(setup)
    lora_root = str(tmp / "Lora")
    # two LoRAs whose paths relative to their roots are the same: both archived, neither overwritten
    second_root = tmp / "Lora2"
    second_root.mkdir()
    twin = os.path.join(second_root, "character1.safetensors")
    open(twin, "wb").write(open(os.path.join(lora_root, "character1.safetensors"), "rb").read() + b"")
    t.items.append({**next(it for it in t.items if it["lora"] == "character1"), "idx": len(t.items), "path": twin})
    store.create_triage("clash", "clash", {}, [{k: v for k, v in it.items() if k != "idx"} for it in t.items])
    t2 = tr.Triage(store, "clash")
    store.set_triage("clash", run_dir=t.run().dir)
    idx = [it["idx"] for it in t2.items if it["lora"] == "character1" and not it.get("skipped")]
    store.decide("clash", [{"idx": i, "decision": "no", "client": "t", "seq": n} for n, i in enumerate(idx)])
    res = tr.archive(t2, str(tmp / "arch"), [lora_root, str(second_root)])
    archived = sorted(os.path.basename(e["archived"]) for e in res["entries"])
    assert archived == ["character1.safetensors", "character1~1.safetensors"]
    # a file put back at an original path meanwhile is not overwritten by restore
    open(os.path.join(lora_root, "character1.safetensors"), "wb").write(b"new download")
    back = tr.restore(res["batch"])
    assert back["state"] == "partly restored" and len(back["conflicts"]) == 1
    assert open(os.path.join(lora_root, "character1.safetensors"), "rb").read() == b"new download"
    assert os.path.exists(twin)


def test_triage_cli_end_to_end(tmp_path, capsys):
    from fake_sdapi import FakeWebUI

    from lib_lorakit.cli import main

    ck, lo = tmp_path / "ck", tmp_path / "Lora"
    ck.mkdir()
    (ck / "base.safetensors").write_bytes(b"x")
    paths = make_loras(str(lo), 3)
    before = {p: sha(p) for p in paths}
    srv = FakeWebUI(FakeBackend(str(ck), str(lo)))
    data = str(tmp_path / "data")
    try:
        code = main(
            [
                "triage",
                "create",
                "--webui",
                srv.url,
                "--folder",
                str(lo),
                "--width",
                "64",
                "--height",
                "64",
                "--data-dir",
                data,
                "--out",
                str(tmp_path / "runs"),
                "--prompt",
                "style=an old harbour",
            ]
        )
        out = capsys.readouterr()
        assert code == 0, out.err
        tid = out.out.strip().splitlines()[-1]
    finally:
        srv.close()
    assert main(["triage", "list", "--data-dir", data]) == 0 and tid in capsys.readouterr().out
    t = tr.Triage(Store(data), tid)
    assert any(it.get("prompt", "").startswith("an old harbour") for it in t.items)
    style = next(it for it in t.items if it["category"] == "style")
    assert main(["triage", "decide", tid, str(style["idx"]), "no", "--data-dir", data]) == 0
    rep = tmp_path / "report.md"
    assert main(["triage", "report", tid, "-o", str(rep), "--data-dir", data]) == 0
    assert "| NO | 1 |" in rep.read_text()
    assert main(["triage", "report", tid, "-o", str(rep), "--data-dir", data]) == 2  # never overwrites
    capsys.readouterr()
    assert main(["triage", "archive", tid, "--archive-dir", str(tmp_path / "arch"), "--data-dir", data]) == 0
    batch = capsys.readouterr().out.split("triage restore ")[1].strip()
    assert not os.path.exists(style["path"])
    assert main(["triage", "restore", batch]) == 0
    assert {p: sha(p) for p in paths} == before
