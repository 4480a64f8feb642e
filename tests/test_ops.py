"""The operations layer: who may import what, one request through every door, request bounds."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import threading

import pytest
from factories import write
from helpers import wait_job
from safetensors.torch import load_file

from lib_lorakit.ops import HostContext, LocalContext, RequestInvalid
from lib_lorakit.ops import bake as bake_op
from lib_lorakit.ops import inspect as inspect_op
from lib_lorakit.ops import merge as merge_op
from lib_lorakit.ops import tournament as tour_op
from lib_lorakit.ops import triage as triage_op
from lib_lorakit.synth import make_lora, write_checkpoint

PKG = pathlib.Path(__file__).resolve().parent.parent / "lib_lorakit"

# --- import rules -------------------------------------------------------------------------------------

# What the doors (api/, cli/, ui/) may import from the rest of lorakit: the operations, the error and
# job types, the host interface, and declared data (generation defaults, the merge-method table).
DOOR_ALLOWED = (
    "ops",
    "errors",
    "jobs",
    "hosts",
    "gen.profiles",
    "merge.registry",
    "engineopts",
    "lazyimport",  # start-up: the CLI defers torch before importing the operations
    "api",
    "cli",
    "ui",
    "demo",
    "",
)


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """Absolute lorakit module names imported by ``path`` (relative imports resolved), with line numbers."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            out += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def _files(*folders: str):
    for f in folders:
        yield from sorted((PKG / f).rglob("*.py")) if (PKG / f).is_dir() else [PKG / f]


def test_doors_import_only_ops_and_types():
    bad = []
    for path in _files("api", "cli", "ui"):
        for mod, line in _imports(path):
            if not mod.startswith("lib_lorakit"):
                continue
            inner = mod[len("lib_lorakit") :].lstrip(".")
            if not any(inner == a or inner.startswith(a + ".") for a in DOOR_ALLOWED if a) and inner not in (
                "",
                "__version__",
            ):
                bad.append(f"{path.relative_to(PKG)}:{line} imports lib_lorakit.{inner}")
    assert not bad, "the doors must go through lib_lorakit.ops:\n" + "\n".join(bad)


def test_gen_does_not_import_eval():
    bad = [
        f"{p.relative_to(PKG)}:{line} imports {m}"
        for p in _files("gen")
        for m, line in _imports(p)
        if m.startswith("lib_lorakit.eval")
    ]
    assert not bad, "\n".join(bad)


def test_only_host_imports_the_webui():
    webui = ("modules", "backend", "ldm_patched", "sgm", "ldm")
    bad = []
    for p in PKG.rglob("*.py"):
        if p.relative_to(PKG).parts[0] == "host":
            continue
        bad += [f"{p.relative_to(PKG)}:{line} imports {m}" for m, line in _imports(p) if m.split(".")[0] in webui]
    assert not bad, "\n".join(bad)


def test_the_rule_check_catches_a_violation(tmp_path):
    """The checker itself must see a forbidden import (a check that cannot fail is no check)."""
    probe = PKG / "ui" / "_probe_rule_check.py"
    probe.write_text("from ..bake import summary\nfrom ..ops import bake\n")
    try:
        with pytest.raises(AssertionError, match="ui/_probe_rule_check.py:1 imports lib_lorakit.bake"):
            test_doors_import_only_ops_and_types()
    finally:
        probe.unlink()


def test_rules_are_defined_once():
    """Generation defaults, merge method names, the tag regex and the pydantic shim live in one place each."""
    src = {p: p.read_text() for p in PKG.rglob("*.py")}

    def where(pattern: str) -> list[str]:
        return sorted(str(p.relative_to(PKG)) for p, s in src.items() if pattern in s)

    assert where('"Euler a"') == ["gen/profiles.py"]
    assert where('"add-difference", "ties"') == []  # the names come from merge/registry.py
    assert where("<(lora|lyco)") == ["prompt.py"] and where("<(?:lora|lyco)") == []
    assert where("model_dump") == ["ops/model.py"] and where("PYDANTIC_V2 =") == ["ops/model.py"]
    # the tournament spec is built from user input by ops.tournament.spec_of (eval/ reads stored specs; the
    # form helper builds one to fill in the profile, and ops.tournament.spec_from_form parses its result again)
    assert where("TournamentSpec(") == ["eval/forms.py", "ops/tournament.py"]
    assert where("_db()") == ["eval/store.py"]


# --- one request, three doors ---------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path):
    ck = tmp_path / "models" / "Stable-diffusion"
    lo = tmp_path / "models" / "Lora"
    ck.mkdir(parents=True)
    lo.mkdir(parents=True)
    write_checkpoint(str(ck / "base.safetensors"), "sdxl", tiny=True, seed=1)
    write_checkpoint(str(ck / "other.safetensors"), "sdxl", tiny=True, seed=5)
    write(lo, "ink.safetensors", make_lora("sdxl", "lora", seed=2, conv=False))
    write(lo, "sd15.safetensors", make_lora("sd15", "lora", seed=3, conv=False))
    data = tmp_path / "data"
    from fastapi.testclient import TestClient

    from lib_lorakit.ui.standalone import create_app

    app, ctx = create_app(str(ck), str(lo), data_dir=str(data))
    with TestClient(app) as client:
        yield {"ck": ck, "lo": lo, "data": data, "client": client, "host": ctx, "tmp": tmp_path}


def cli(capsys, *args):
    from lib_lorakit.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _http_error(r) -> str:
    assert r.status_code >= 400 and set(r.json()) == {"error", "message"}, r.text
    return r.json()["message"]


def _cli_error(err: str) -> str:
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: ") :].rstrip("\n")


def _same_tensors(*paths):
    first = load_file(str(paths[0]))
    for p in paths[1:]:
        other = load_file(str(p))
        assert first.keys() == other.keys()
        assert all(first[k].dtype == other[k].dtype and first[k].equal(other[k]) for k in first)


def test_bake_through_every_door(world, capsys):
    ck, lo, c = world["ck"], world["lo"], world["client"]
    lora = {"name": "ink", "strength": 0.7, "te_strength": 0.4}
    r = c.post("/lorakit/v1/bake", json={"base": "base.safetensors", "output": "via-http", "loras": [lora]})
    http = wait_job(c, r.json()["job_id"])["result"]["report"]
    direct = bake_op.bake(
        LocalContext(),
        {
            "base": str(ck / "base.safetensors"),
            "output": str(ck / "via-ops.safetensors"),
            "loras": [{**lora, "name": str(lo / "ink.safetensors")}],
        },
    )["report"]
    code, out, _ = cli(
        capsys,
        "bake",
        str(ck / "base.safetensors"),
        "--lora",
        f"{lo / 'ink.safetensors'}:0.7:0.4",
        "-o",
        str(ck / "via-cli.safetensors"),
        "--json",
        "-q",
    )
    assert code == 0
    via_cli = json.loads(out)
    _same_tensors(ck / "via-http.safetensors", ck / "via-ops.safetensors", ck / "via-cli.safetensors")

    def stable(rep):  # what does not depend on the door: per-LoRA matches and changes
        return json.dumps(rep["loras"], sort_keys=True)

    assert stable(http) == stable(direct) == stable(via_cli)


def test_bake_errors_read_the_same_through_every_door(world, capsys):
    ck, lo, c = world["ck"], world["lo"], world["client"]
    # out of range: the request type refuses it wherever it came from
    r = c.post(
        "/lorakit/v1/bake", json={"base": "base.safetensors", "output": "x", "loras": [{"name": "ink", "strength": 50}]}
    )
    m_http = _http_error(r)
    with pytest.raises(RequestInvalid) as e:
        bake_op.bake(
            LocalContext(),
            {
                "base": str(ck / "base.safetensors"),
                "output": str(ck / "x.safetensors"),
                "loras": [{"name": str(lo / "ink.safetensors"), "strength": 50}],
            },
        )
    code, _, err = cli(
        capsys,
        "bake",
        str(ck / "base.safetensors"),
        "--lora",
        f"{lo / 'ink.safetensors'}:50",
        "-o",
        str(ck / "x.safetensors"),
    )
    assert code == 2 and r.status_code == 400
    assert m_http == str(e.value) == _cli_error(err)
    assert "loras[0].strength" in m_http and "50" in m_http and "--" not in m_http
    # a LoRA of another architecture: the engine's message, through every door
    r = c.post(
        "/lorakit/v1/bake",
        json={"base": "base.safetensors", "output": "y", "loras": [{"name": "sd15"}], "dry_run": True},
    )
    m_http = wait_job(c, r.json()["job_id"])["error"]
    with pytest.raises(Exception) as e:
        bake_op.bake(
            LocalContext(),
            {"base": str(ck / "base.safetensors"), "loras": [{"name": str(lo / "sd15.safetensors")}], "dry_run": True},
        )
    code, _, err = cli(
        capsys, "bake", str(ck / "base.safetensors"), "--lora", str(lo / "sd15.safetensors"), "--dry-run"
    )
    assert code == 2 and m_http == str(e.value) == _cli_error(err)
    assert not [p for p in os.listdir(ck) if p not in ("base.safetensors", "other.safetensors")]


def test_merge_through_every_door(world, capsys):
    ck, c = world["ck"], world["client"]
    body = {"models": [{"name": "base.safetensors", "weight": 0.7}, {"name": "other.safetensors", "weight": 0.3}]}
    r = c.post("/lorakit/v1/merge", json={**body, "output": "m-http"})
    assert wait_job(c, r.json()["job_id"])["state"] == "done"
    merge_op.merge(
        LocalContext(),
        {
            "models": [{"name": str(ck / m["name"]), "weight": m["weight"]} for m in body["models"]],
            "output": str(ck / "m-ops.safetensors"),
        },
    )
    code, _, _ = cli(
        capsys,
        "merge",
        "--model",
        f"{ck / 'base.safetensors'}:0.7",
        "--model",
        f"{ck / 'other.safetensors'}:0.3",
        "-o",
        str(ck / "m-cli.safetensors"),
        "-q",
    )
    assert code == 0
    _same_tensors(ck / "m-http.safetensors", ck / "m-ops.safetensors", ck / "m-cli.safetensors")
    # an unknown method: one message, with the nearest name, from every door
    r = c.post("/lorakit/v1/merge", json={**body, "output": "bad", "method": "tie"})
    with pytest.raises(Exception) as e:
        merge_op.merge(
            LocalContext(),
            {
                "models": [{"name": str(ck / "base.safetensors")}, {"name": str(ck / "other.safetensors")}],
                "output": str(ck / "bad.safetensors"),
                "method": "tie",
            },
        )
    code, _, err = cli(
        capsys,
        "merge",
        "--model",
        str(ck / "base.safetensors"),
        "--model",
        str(ck / "other.safetensors"),
        "--method",
        "tie",
        "-o",
        str(ck / "bad.safetensors"),
    )
    assert code == 2 and r.status_code == 400
    assert _http_error(r) == str(e.value) == _cli_error(err) and "'ties'" in str(e.value)


def test_inspect_through_every_door(world, capsys):
    lo, c = world["lo"], world["client"]
    http = c.get("/lorakit/v1/inspect", params={"lora": "ink"}).json()
    direct = inspect_op.inspect(LocalContext(), {"loras": [str(lo / "ink.safetensors")]})[0]
    code, out, _ = cli(capsys, "inspect", str(lo / "ink.safetensors"), "--json", "--jobs", "1")
    assert code == 0
    via_cli = json.loads(out)
    assert http.pop("lora") == "ink"
    direct = json.loads(json.dumps(direct))
    for other in (direct, via_cli):
        diff = sorted(k for k in set(http) | set(other) if http.get(k) != other.get(k))
        assert not diff, {k: (http.get(k), other.get(k)) for k in diff}


SPEC = {
    "name": "parity",
    "candidates": [
        {"id": "a", "checkpoint": "base.safetensors", "control": True},
        {"id": "b", "checkpoint": "other.safetensors"},
    ],
    "prompts": [f"prompt {i}" for i in range(5)],
}


def test_tournament_create_and_score_through_every_door(world, capsys):
    c, data = world["client"], world["data"]
    spec_file = world["tmp"] / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    t_http = c.post("/lorakit/v1/tournaments", json=SPEC).json()["id"]
    t_ops = tour_op.create(LocalContext(str(data)), SPEC)
    code, out, _ = cli(capsys, "tournament", "create", str(spec_file), "--data-dir", str(data))
    assert code == 0
    t_cli = out.strip()
    specs = [tour_op.summary(world["host"], t) for t in (t_http, t_ops, t_cli)]
    assert {
        json.dumps({k: v for k, v in s.items() if k in ("name", "prompts", "candidates", "state")}) for s in specs
    } == {json.dumps({"name": "parity", "state": "created", "prompts": 5, "candidates": 2})}
    # the same scores (no votes yet) from the API, the CLI and ops
    http = c.get(f"/lorakit/v1/tournaments/{t_cli}/scores").json()
    code, out, _ = cli(capsys, "tournament", "score", t_cli, "--json", "--data-dir", str(data))
    assert code == 0
    assert (
        json.dumps(http, sort_keys=True)
        == json.dumps(json.loads(out), sort_keys=True)
        == json.dumps(
            json.loads(json.dumps(tour_op.scores(LocalContext(str(data)), t_cli), default=str)), sort_keys=True
        )
    )
    # a bad spec: one message from every door (a prompt list of four)
    bad = {**SPEC, "prompts": SPEC["prompts"][:4]}
    spec_file.write_text(json.dumps(bad))
    r = c.post("/lorakit/v1/tournaments", json=bad)
    with pytest.raises(Exception) as e:
        tour_op.create(LocalContext(str(data)), bad)
    code, _, err = cli(capsys, "tournament", "create", str(spec_file), "--data-dir", str(data))
    assert code == 2 and _http_error(r) == str(e.value) == _cli_error(err) and "at least 5 prompts" in str(e.value)


def test_triage_decision_through_every_door(world, capsys):
    c, data = world["client"], world["data"]
    ctx = world["host"]
    items = [{"lora": f"l{i}", "path": f"/x/l{i}.safetensors"} for i in range(3)]
    ctx.store().create_triage("t1", "parity", {}, items)
    a = c.post("/lorakit/v1/triage/t1/decisions", json={"decisions": [{"idx": 0, "decision": "yes"}]}).json()
    b = triage_op.decide(LocalContext(str(data)), "t1", {"decisions": [{"idx": 1, "decision": "no"}]})
    code, out, _ = cli(capsys, "triage", "decide", "t1", "2", "maybe", "--data-dir", str(data))
    assert code == 0 and a["recorded"] == b["recorded"] == 1
    state = json.loads(out)
    assert state == triage_op.get(ctx, "t1").state() == c.get("/lorakit/v1/triage/t1").json()
    assert state["decided"] == 3 if "decided" in state else True
    assert triage_op.get(ctx, "t1").store.current("t1") == {0: "yes", 1: "no", 2: "maybe"}
    # an item that does not exist: one message
    r = c.post("/lorakit/v1/triage/t1/decisions", json={"decisions": [{"idx": 7, "decision": "yes"}]})
    with pytest.raises(Exception) as e:
        triage_op.decide(LocalContext(str(data)), "t1", {"decisions": [{"idx": 7, "decision": "yes"}]})
    code, _, err = cli(capsys, "triage", "decide", "t1", "7", "yes", "--data-dir", str(data))
    assert code == 2 and _http_error(r) == str(e.value) == _cli_error(err) and "item 7" in str(e.value)


# --- bounds and unknown fields ----------------------------------------------------------------------------

BAD = [
    (
        "/lorakit/v1/bake",
        {"base": "base", "output": "o", "loras": [{"name": "ink", "strength": "nan"}]},
        "loras[0].strength",
    ),
    (
        "/lorakit/v1/bake",
        '{"base": "base", "output": "o", "loras": [{"name": "ink", "strength": 1e309}]}',
        "loras[0].strength",
    ),
    ("/lorakit/v1/bake", {"base": "base", "output": "o", "colour": "red"}, "colour: unknown field"),
    ("/lorakit/v1/merge", {"models": [{"name": "base", "weight": "abc"}], "output": "o"}, "models[0].weight"),
    ("/lorakit/v1/merge", {"models": [{"name": "base"}], "output": "o", "density": 2}, "density"),
    ("/lorakit/v1/merge", {"models": [{"name": "base"}], "output": "o", "method": "average"}, "merge method 'average'"),
    ("/lorakit/v1/grid", {"prompt": "x", "steps": -3}, "steps"),
    ("/lorakit/v1/grid", {"prompt": "x", "cfg_scale": "Infinity"}, "cfg_scale"),
    ("/lorakit/v1/triage", {"seeds": "-2x"}, "Seeds"),
    (
        "/lorakit/v1/tournaments",
        {"candidates": [], "prompts": ["a"] * 5, "first_version": True, "x": 1},
        "x: unknown field",
    ),
    ("/lorakit/v1/tournaments", [1, 2], "expected an object"),
    ("/lorakit/v1/inspect", {"loras": "ink"}, "loras"),
]


@pytest.mark.parametrize("path,body,names", BAD, ids=[f"{b[0].rsplit('/', 1)[1]}-{i}" for i, b in enumerate(BAD)])
def test_requests_refuse_bad_fields_naming_them(world, path, body, names):
    r = world["client"].post(
        path,
        **(
            {"content": body, "headers": {"content-type": "application/json"}}
            if isinstance(body, str)
            else {"json": body}
        ),
    )
    assert r.status_code in (400, 501), r.text
    if r.status_code == 400:
        msg = r.json()["message"]
        assert names in msg and "Traceback" not in r.text and "{'" not in msg, msg


def test_request_errors_name_the_field_in_ops():
    with pytest.raises(RequestInvalid, match=r"loras\[0\]\.strength: .* \(got nan\)"):
        bake_op.BakeRequest.parse({"base": "b", "loras": [{"name": "x", "strength": float("nan")}]})
    with pytest.raises(RequestInvalid, match="seed count|seeds|evaluator"):
        tour_op.VotesRequest.parse({"evaluator": "", "votes": []})
    ctx = HostContext.__new__(HostContext)  # no host needed: the request fails before it is used
    with pytest.raises(RequestInvalid, match=r"te_from: .*greater than or equal to 1 \(got 0\)"):
        merge_op.start(ctx, {"models": [{"name": "a"}], "output": "o", "te_from": 0})


# --- scores before there is evidence ---------------------------------------------------------------------


def test_scores_with_no_or_one_vote_are_valid_json_and_say_so(world, capsys):
    c, data = world["client"], world["data"]
    tid = c.post("/lorakit/v1/tournaments", json=SPEC).json()["id"]
    r = c.get(f"/lorakit/v1/tournaments/{tid}/scores")
    assert r.status_code == 200 and "NaN" not in r.text and "Infinity" not in r.text
    sc = r.json()
    assert sc["enough_votes"] is False and sc["schemes"] == {} and "Not enough votes yet" in sc["notes"][0]
    chart = c.get(f"/lorakit/v1/tournaments/{tid}/chart")
    assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
    code, out, _ = cli(capsys, "tournament", "score", tid, "--json", "--data-dir", str(data))
    assert code == 0 and json.loads(out)["enough_votes"] is False and "NaN" not in out
    # one vote: scores, but no interval and no P(best) (a bootstrap over one prompt would claim 100%)
    # (recorded through the store: the route refuses ranking an image that was never made, and this one has none)
    world["host"].tournaments().vote(tid, "ann", [{"prompt": 0, "ranks": ["A"]}])
    sc = c.get(f"/lorakit/v1/tournaments/{tid}/scores").json()
    assert (
        sc["enough_votes"] is True and sc["bradley_terry"]["p_best"] == {} and sc["bradley_terry"]["interval90"] == {}
    )
    assert "too few" in sc["separability"]["text"] and "100%" not in json.dumps(sc)
    assert c.post(f"/lorakit/v1/tournaments/{tid}/reveal").status_code == 200
    report = c.get(f"/lorakit/v1/tournaments/{tid}/report").text
    assert "too few" in report and "nan" not in report.lower()


def _with_nan_vae(path: str) -> str:
    """Put one NaN into the checkpoint's first VAE tensor (rewritten in place: a test input)."""
    from safetensors.torch import save_file

    sd = load_file(path)
    key = sorted(k for k in sd if k.startswith("first_stage_model.") and sd[k].is_floating_point())[0]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, path)
    return key


def test_bake_and_merge_warn_of_a_vae_with_nan(tmp_path):
    """The VAE is copied unchanged; a NaN in it is named in the report (the bake checks its base beside
    the bake, the merge its output after)."""
    from factories import tiny_checkpoint

    base = tiny_checkpoint(tmp_path, "sd15")
    key = _with_nan_vae(base)
    other = tiny_checkpoint(tmp_path, "sd15", name="other.safetensors", seed=3)
    lora = write(tmp_path, "ink.safetensors", make_lora("sd15", "lora", conv=False))
    rep = bake_op.bake(
        LocalContext(), {"base": base, "output": str(tmp_path / "baked.safetensors"), "loras": [{"name": lora}]}
    )["report"]
    warn = [w for w in rep.get("warnings", []) if "holds NaN/inf values" in w]
    assert len(warn) == 1 and key in warn[0] and "sd15-base.safetensors" in warn[0]
    assert not any(t.name.startswith("lorakit-vae-check") for t in threading.enumerate() if t.is_alive())
    clean = bake_op.bake(
        LocalContext(), {"base": other, "output": str(tmp_path / "clean.safetensors"), "loras": [{"name": lora}]}
    )["report"]
    assert not any("holds NaN/inf" in w for w in clean.get("warnings", []))
    rep = merge_op.merge(
        LocalContext(),
        {
            "models": [{"name": base, "weight": 0.5}, {"name": other, "weight": 0.5}],
            "output": str(tmp_path / "m.safetensors"),
        },
    )["report"]
    assert any("holds NaN/inf values" in w and key in w for w in rep.get("warnings", []))
