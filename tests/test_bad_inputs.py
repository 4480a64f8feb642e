"""A corpus of bad inputs, generated at test time, through every door (command line and HTTP API).

Each case must fail as the user's error — exit 2 / HTTP 4xx — with a message naming the file, field or value,
no traceback on stderr or in the body, nothing new on disk (no output, no temp file) and every input
byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from factories import tiny_checkpoint, write

from lib_lorakit.cli import main
from lib_lorakit.synth import make_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_SPEC = {
    "name": "t",
    "candidates": [{"checkpoint": "a.safetensors"}, {"checkpoint": "b.safetensors", "control": True}],
    "prompts": ["a cat", "a dog", "a tree", "a house", "a car"],
}


def _mount_tmpfs(path: str, options: str) -> bool:
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The inputs (one tiny SDXL checkpoint and LoRAs, good and broken), a read-only folder and a full disk."""
    root = tmp_path_factory.mktemp("bad")
    inp = root / "in"
    inp.mkdir()
    base = tiny_checkpoint(inp, "sdxl")
    sd = make_lora("sdxl", "lora", conv=False)
    lora = write(inp, "style.safetensors", sd)
    down = next(k for k in sd if k.endswith("lora_down.weight"))
    nan = dict(sd)
    nan[down] = sd[down].clone()
    nan[down].view(-1)[0] = float("nan")
    write(inp, "nan.safetensors", nan)
    a3 = dict(sd)
    a3[next(k for k in sd if k.endswith(".alpha"))] = torch.ones(3)
    write(inp, "alpha3.safetensors", a3)
    (inp / "notes.safetensors").write_bytes(b"this is not a model file\n" * 10)
    data = open(base, "rb").read()
    (inp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    for name, obj in {
        "list": [GOOD_SPEC],
        "pstr": {**GOOD_SPEC, "prompts": "a cat"},
        "unknown": {**GOOD_SPEC, "bogus": 1},
        "abc": {
            **GOOD_SPEC,
            "candidates": [
                {"checkpoint": "a.safetensors", "loras": [{"name": "x", "strength": "abc"}]},
                {"checkpoint": "b.safetensors", "control": True},
            ],
        },
        "few": {**GOOD_SPEC, "prompts": ["one", "two"]},
    }.items():
        (inp / f"spec-{name}.json").write_text(json.dumps(obj))
    (inp / "spec-malformed.json").write_text('{"name": "t", candidates: [')
    out = root / "out"
    out.mkdir()
    ro = root / "ro"
    mounted = []
    if _mount_tmpfs(str(ro), "size=1m,ro"):
        mounted.append(ro)
    else:
        ro.mkdir(exist_ok=True)
        os.chmod(ro, 0o555)
    full = root / "full"
    if _mount_tmpfs(str(full), "size=64k"):
        mounted.append(full)
    yield {
        "root": root,
        "in": inp,
        "out": out,
        "ro": ro,
        "full": full if full in mounted else None,
        "base": base,
        "lora": lora,
        "data": root / "data",
    }
    for m in mounted:
        subprocess.run(["umount", str(m)], capture_output=True)


def snapshot(root) -> dict[str, str]:
    """Every file under ``root`` (temp files included) with its SHA-256."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def P(ws, key, name=""):
    return str(ws[key] / name) if name else str(ws[key])


def _ro_writable(ws) -> bool:
    try:
        open(os.path.join(ws["ro"], ".probe"), "w").close()
        os.unlink(os.path.join(ws["ro"], ".probe"))
        return True
    except OSError:
        return False


# (id, argv builder, the words the message must hold)
CLI_CASES = [
    (
        "bake-missing-base",
        lambda w: ["bake", P(w, "in", "nope.safetensors"), "--lora", w["lora"], "-o", P(w, "out", "o.safetensors")],
        ["nope.safetensors"],
    ),
    (
        "bake-truncated-base",
        lambda w: [
            "bake",
            P(w, "in", "truncated.safetensors"),
            "--lora",
            w["lora"],
            "-o",
            P(w, "out", "o.safetensors"),
        ],
        ["truncated.safetensors"],
    ),
    (
        "bake-not-a-model",
        lambda w: ["bake", w["base"], "--lora", P(w, "in", "notes.safetensors"), "-o", P(w, "out", "o.safetensors")],
        ["notes.safetensors"],
    ),
    (
        "bake-strength-abc",
        lambda w: ["bake", w["base"], "--lora", w["lora"] + ":abc", "-o", P(w, "out", "o.safetensors")],
        ["'abc'", "not a number"],
    ),
    (
        "bake-te-strength-abc",
        lambda w: ["bake", w["base"], "--lora", w["lora"] + ":0.5:x1", "-o", P(w, "out", "o.safetensors")],
        ["x1", "not a number"],
    ),
    ("bake-strength-nan", lambda w: ["bake", w["base"], "--lora", w["lora"] + ":nan", "--dry-run"], ["nan", "finite"]),
    ("bake-strength-inf", lambda w: ["bake", w["base"], "--lora", w["lora"] + ":inf", "--dry-run"], ["inf", "finite"]),
    ("bake-strength-huge", lambda w: ["bake", w["base"], "--lora", w["lora"] + ":1e9", "--dry-run"], ["strength"]),
    (
        "bake-alpha-shape-3",
        lambda w: ["bake", w["base"], "--lora", P(w, "in", "alpha3.safetensors"), "-o", P(w, "out", "o.safetensors")],
        ["alpha", "[3]", "alpha3.safetensors"],
    ),
    (
        "bake-nan-lora",
        lambda w: ["bake", w["base"], "--lora", P(w, "in", "nan.safetensors"), "-o", P(w, "out", "o.safetensors")],
        ["nan.safetensors", "NaN"],
    ),
    (
        "bake-output-is-input",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "-o", w["base"], "--overwrite"],
        ["sdxl-base.safetensors"],
    ),
    (
        "bake-output-exists",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "-o", P(w, "in", "notes.safetensors")],
        ["notes.safetensors", "exists"],
    ),
    (
        "bake-bad-blocks",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "--blocks", "style=NOPRESET", "--dry-run"],
        ["NOPRESET"],
    ),
    (
        "bake-blocks-no-lora",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "--blocks", "other=INALL", "--dry-run"],
        ["other=INALL"],
    ),
    (
        "bake-read-only-output",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "-o", P(w, "ro", "o.safetensors")],
        ["o.safetensors", "Fix:"],
    ),
    (
        "bake-report-read-only",
        lambda w: [
            "bake",
            w["base"],
            "--lora",
            w["lora"],
            "-o",
            P(w, "out", "o.safetensors"),
            "--report",
            P(w, "ro", "r.json"),
        ],
        ["r.json", "Fix:"],
    ),
    (
        "bake-disk-full",
        lambda w: ["bake", w["base"], "--lora", w["lora"], "-o", P(w, "full", "o.safetensors")],
        ["o.safetensors", "disk is full"],
    ),
    (
        "merge-disk-full",
        lambda w: ["merge", "--model", w["base"], "--model", w["base"], "-o", P(w, "full", "m.safetensors")],
        ["m.safetensors", "disk is full"],
    ),
    (
        "merge-weight-abc",
        lambda w: ["merge", "--model", w["base"], "--model", w["base"] + ":abc", "-o", P(w, "out", "m.safetensors")],
        ["'abc'", "not a number"],
    ),
    (
        "merge-weight-nan",
        lambda w: ["merge", "--model", w["base"], "--model", w["base"] + ":nan", "-o", P(w, "out", "m.safetensors")],
        ["nan"],
    ),
    (
        "merge-unknown-method",
        lambda w: [
            "merge",
            "--model",
            w["base"],
            "--model",
            w["base"],
            "--method",
            "avg",
            "-o",
            P(w, "out", "m.safetensors"),
        ],
        ["avg"],
    ),
    (
        "merge-te-from-text",
        lambda w: [
            "merge",
            "--model",
            w["base"],
            "--model",
            w["base"],
            "--te-from",
            "x",
            "-o",
            P(w, "out", "m.safetensors"),
        ],
        ["'x'"],
    ),
    (
        "merge-missing-model",
        lambda w: [
            "merge",
            "--model",
            w["base"],
            "--model",
            P(w, "in", "gone.safetensors"),
            "-o",
            P(w, "out", "m.safetensors"),
        ],
        ["gone.safetensors"],
    ),
    (
        "merge-lora-as-model",
        lambda w: ["merge", "--model", w["base"], "--model", w["lora"], "-o", P(w, "out", "m.safetensors")],
        ["style.safetensors"],
    ),
    (
        "merge-read-only-output",
        lambda w: ["merge", "--model", w["base"], "--model", w["base"], "-o", P(w, "ro", "m.safetensors")],
        ["m.safetensors", "Fix:"],
    ),
    (
        "merge-report-read-only",
        lambda w: [
            "merge",
            "--model",
            w["base"],
            "--model",
            w["base"],
            "-o",
            P(w, "out", "m.safetensors"),
            "--report",
            P(w, "ro", "r.json"),
        ],
        ["r.json"],
    ),
    ("diff-chart-read-only", lambda w: ["diff", w["base"], w["base"], "--chart", P(w, "ro", "c.png")], ["c.png"]),
    (
        "inspect-weights-nan",
        lambda w: ["inspect", P(w, "in", "nan.safetensors"), "--weights", "--checkpoint", w["base"], "--jobs", "1"],
        ["nan.safetensors", "NaN"],
    ),
    (
        "inspect-missing",
        lambda w: ["inspect", P(w, "in", "nothing.safetensors"), "--jobs", "1"],
        ["nothing.safetensors"],
    ),
    (
        "inspect-not-a-model",
        lambda w: ["inspect", P(w, "in", "notes.safetensors"), "--jobs", "1"],
        ["notes.safetensors"],
    ),
    (
        "spec-as-list",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-list.json")],
        ["tournament spec", "list"],
    ),
    (
        "spec-prompts-string",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-pstr.json")],
        ["prompts", "a cat"],
    ),
    (
        "spec-unknown-key",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-unknown.json")],
        ["bogus"],
    ),
    (
        "spec-strength-abc",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-abc.json")],
        ["strength", "abc"],
    ),
    (
        "spec-malformed",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-malformed.json")],
        ["spec-malformed.json"],
    ),
    (
        "spec-missing-file",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "no-spec.json")],
        ["no-spec.json"],
    ),
    (
        "spec-few-prompts",
        lambda w: ["tournament", "create", "--data-dir", P(w, "data"), P(w, "in", "spec-few.json")],
        ["prompt"],
    ),
    ("triage-unknown-id", lambda w: ["triage", "report", "nosuch", "--data-dir", P(w, "data")], ["nosuch"]),
    (
        "ui-missing-models-dir",
        lambda w: ["ui", "--models-dir", P(w, "in", "nodir"), "--loras-dir", P(w, "in")],
        ["nodir"],
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, capsys, case):
    name, argv, words = case
    if "read-only" in name and _ro_writable(ws):
        pytest.skip("no read-only folder here (running as root without mount)")
    if name.endswith("disk-full") and ws["full"] is None:
        pytest.skip("needs root to mount a small tmpfs")
    before = snapshot(ws["root"])
    code = main(argv(ws))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "lorakit failed unexpectedly" not in err, err
    for w in words:
        assert w in err, f"{w!r} not in: {err}"
    assert "GET /lorakit" not in err and "POST /lorakit" not in err  # a CLI user is not sent to the HTTP API
    assert snapshot(ws["root"]) == before  # no output, no temp file; inputs byte-identical


def test_dry_run_does_not_read_as_no_change(ws, capsys):
    assert main(["bake", ws["base"], "--lora", ws["lora"], "--dry-run", "-q"]) == 0
    out = capsys.readouterr().out
    assert "0 changed" not in out and "no change" not in out
    assert "would change" in out


def test_launcher_refuses_a_taken_port_before_printing_its_url(ws):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "lib_lorakit",
                "ui",
                "--models-dir",
                P(ws, "in"),
                "--loras-dir",
                P(ws, "in"),
                "--port",
                str(port),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 2, r.stderr
    assert str(port) in r.stderr and "Traceback" not in r.stderr
    assert "http://" not in r.stdout


def test_vae_with_inf_is_reported(tmp_path, capsys):
    from lib_lorakit.formats.safetensors_io import SafetensorsFile

    base = tiny_checkpoint(tmp_path, "sdxl")
    with SafetensorsFile(base) as f:
        sd = {k: f.read(k) for k in f.tensors}
    vkey = next(k for k in sd if k.startswith("first_stage_model.") and sd[k].numel() > 1)
    sd[vkey] = sd[vkey].clone()
    sd[vkey].view(-1)[0] = float("inf")
    broken = write(tmp_path, "broken-vae.safetensors", sd)
    lora = write(tmp_path, "l.safetensors", make_lora("sdxl", "lora", conv=False))
    out = str(tmp_path / "o.safetensors")
    assert main(["bake", broken, "--lora", lora, "-o", out, "-q"]) == 0
    text = capsys.readouterr().out
    assert "VAE" in text and vkey in text and "NaN/inf" in text
    assert (
        main(["merge", "--model", broken, "--model", base, "-o", str(tmp_path / "m.safetensors"), "-q", "--json"]) == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert any(vkey in w for w in rep["warnings"])


# --- the HTTP API ------------------------------------------------------------------------------------------

fastapi = pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lib_lorakit.ui.standalone import create_app

    root = tmp_path_factory.mktemp("api")
    ckpt, loras = root / "models" / "Stable-diffusion", root / "models" / "Lora"
    ckpt.mkdir(parents=True)
    loras.mkdir(parents=True)
    tiny_checkpoint(ckpt, "sdxl", name="base.safetensors")
    write(loras, "ink.safetensors", make_lora("sdxl", "lora", conv=False))
    app, _ = create_app(str(ckpt), str(loras), data_dir=str(root / "data"))
    with TestClient(app) as c:
        tid = c.post(
            "/lorakit/v1/tournaments",
            json={
                **GOOD_SPEC,
                "candidates": [
                    {"checkpoint": "base.safetensors", "id": "one"},
                    {"checkpoint": "base.safetensors", "id": "two", "control": True},
                ],
            },
        ).json()["id"]
        c.tid = tid
        c.root = root
        yield c


def _bake(**kw):
    return {"base": "base.safetensors", "output": "o", "loras": [{"name": "ink", **kw}]}


API_CASES = [
    ("bake-strength-abc", "post", "/lorakit/v1/bake", _bake(strength="abc"), ["strength", "abc"]),
    (
        "bake-strength-nan",
        "raw",
        "/lorakit/v1/bake",
        '{"base": "base.safetensors", "output": "o", "loras": [{"name": "ink", "strength": NaN}]}',
        ["strength"],
    ),
    (
        "bake-strength-infinity",
        "raw",
        "/lorakit/v1/bake",
        '{"base": "base.safetensors", "output": "o", "loras": [{"name": "ink", "strength": Infinity}]}',
        ["strength"],
    ),
    ("bake-unknown-field", "post", "/lorakit/v1/bake", {**_bake(), "colour": 1}, ["colour"]),
    ("bake-malformed-json", "raw", "/lorakit/v1/bake", '{"base": ', ["JSON"]),
    (
        "bake-lora-outside",
        "post",
        "/lorakit/v1/bake",
        {"base": "base.safetensors", "output": "o", "loras": [{"name": "../../../etc/passwd"}]},
        ["passwd"],
    ),
    ("bake-unknown-lora", "post", "/lorakit/v1/bake", _bake(name="inc"), ["inc"]),
    ("bake-output-traversal", "post", "/lorakit/v1/bake", {**_bake(), "output": "../../x"}, ["x"]),
    (
        "merge-weight-nan",
        "raw",
        "/lorakit/v1/merge",
        '{"models": [{"name": "base.safetensors"}, {"name": "base.safetensors", "weight": NaN}], "output": "m"}',
        ["weight"],
    ),
    ("inspect-outside", "get", "/lorakit/v1/inspect?lora=../../../etc/passwd", None, ["passwd"]),
    ("tournament-spec-list", "post", "/lorakit/v1/tournaments", [GOOD_SPEC], ["list"]),
    ("tournament-prompts-string", "post", "/lorakit/v1/tournaments", {**GOOD_SPEC, "prompts": "a cat"}, ["prompts"]),
    ("tournament-unknown-key", "post", "/lorakit/v1/tournaments", {**GOOD_SPEC, "bogus": 1}, ["bogus"]),
    (
        "tournament-strength-abc",
        "post",
        "/lorakit/v1/tournaments",
        {
            **GOOD_SPEC,
            "candidates": [
                {"checkpoint": "a.safetensors", "loras": [{"name": "x", "strength": "abc"}]},
                {"checkpoint": "b.safetensors", "control": True},
            ],
        },
        ["strength"],
    ),
    (
        "votes-four-ranks",
        "post",
        "/lorakit/v1/tournaments/{tid}/votes",
        {"evaluator": "ann", "votes": [{"prompt": 0, "ranks": ["A", "B", "C", "D"]}]},
        ["ranks"],
    ),
    (
        "votes-rank-and-bomb",
        "post",
        "/lorakit/v1/tournaments/{tid}/votes",
        {"evaluator": "ann", "votes": [{"prompt": 0, "ranks": ["A"], "bombs": ["A"]}]},
        ["A"],
    ),
    (
        "votes-no-evaluator",
        "post",
        "/lorakit/v1/tournaments/{tid}/votes",
        {"evaluator": "", "votes": [{"prompt": 0, "no_preference": True}]},
        ["evaluator"],
    ),
    (
        "votes-missing-image",
        "post",
        "/lorakit/v1/tournaments/{tid}/votes",
        {"evaluator": "ann", "votes": [{"prompt": 0, "ranks": ["A"]}]},
        ["missing"],
    ),
    (
        "votes-unknown-prompt",
        "post",
        "/lorakit/v1/tournaments/{tid}/votes",
        {"evaluator": "ann", "votes": [{"prompt": 9, "no_preference": True}]},
        ["9"],
    ),
    (
        "next-round-before-reveal",
        "post",
        "/lorakit/v1/tournaments/{tid}/next-round",
        {"mode": "narrow"},
        ["blind", "Reveal"],
    ),
    ("image-before-generation", "get", "/lorakit/v1/tournaments/{tid}/image/ann/0/A", None, ["no images"]),
    ("report-before-reveal", "get", "/lorakit/v1/tournaments/{tid}/report", None, ["reveal"]),
    ("winner-before-reveal", "get", "/lorakit/v1/tournaments/{tid}/winner", None, ["reveal"]),
    ("tournament-unknown-id", "get", "/lorakit/v1/tournaments/nosuch/scores", None, ["nosuch"]),
    ("triage-unknown-filter", "get", "/lorakit/v1/triage/nosuch/items?filter=bogus", None, ["bogus"]),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(api, case):
    name, how, path, body, words = case
    before = snapshot(api.root / "models")
    path = path.replace("{tid}", api.tid)
    if how == "get":
        r = api.get(path)
    elif how == "raw":
        r = api.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = api.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    data = r.json()
    assert set(data) == {"error", "message"}, data
    assert "Traceback" not in r.text and 'File "' not in r.text
    for w in words:
        assert w in data["message"], f"{w!r} not in: {data['message']}"
    assert "--" not in data["message"].replace("---", "")  # no CLI flag told to an API user
    # No file changed (the database aside: a ballot's shuffle is stored on first sight), and no vote was stored.
    assert snapshot(api.root / "models") == before
    assert api.get(f"/lorakit/v1/tournaments/{api.tid}/ballot?evaluator=ann").json()["voted"] == 0


def test_unexpected_failure_is_logged_and_answered_as_json(api, monkeypatch, caplog):
    import lib_lorakit.ops.jobs as jobs_op
    import lib_lorakit.ops.models as models_op

    def boom(*a, **k):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(jobs_op, "jobs", boom)
    monkeypatch.setattr(models_op, "loras", boom)
    for path in ("/lorakit/v1/jobs", "/lorakit/v1/loras"):
        with caplog.at_level("ERROR", logger="lorakit.api"):
            r = api.get(path)
        assert r.status_code == 500 and set(r.json()) == {"error", "message"}
        assert "server log" in r.json()["message"] and "on fire" not in r.text and "Traceback" not in r.text
    assert "Traceback" in caplog.text and "disk controller on fire" in caplog.text


def test_lists_and_bulk_inspect_skip_links_that_leave_the_model_folders(tmp_path):
    from fastapi.testclient import TestClient

    from lib_lorakit.ui.standalone import create_app

    ckpt, loras, outside = tmp_path / "ck", tmp_path / "lo", tmp_path / "outside"
    for d in (ckpt, loras, outside):
        d.mkdir()
    tiny_checkpoint(ckpt, "sdxl", name="inside.safetensors")
    tiny_checkpoint(outside, "sdxl", name="secret-ck.safetensors")
    write(loras, "ink.safetensors", make_lora("sdxl", "lora", conv=False))
    write(outside, "secret.safetensors", make_lora("sdxl", "lora", conv=False))
    os.symlink(outside / "secret-ck.safetensors", ckpt / "linked.safetensors")
    os.symlink(outside / "secret.safetensors", loras / "linked.safetensors")
    app, _ = create_app(str(ckpt), str(loras), data_dir=str(tmp_path / "data"))
    c = TestClient(app)
    assert [m["name"] for m in c.get("/lorakit/v1/checkpoints").json()] == ["inside.safetensors"]
    assert [m["name"] for m in c.get("/lorakit/v1/loras").json()] == ["ink"]
    r = c.post("/lorakit/v1/inspect", json={"all": True, "weights": True})
    assert r.status_code == 200 and "secret" not in r.text and "linked" not in r.text
    assert c.get("/lorakit/v1/inspect", params={"lora": "linked"}).status_code in (400, 403, 404)
