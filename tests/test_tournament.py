"""Blind tournaments: the rules, blind ballots, votes that are never lost, generation integrity, rounds."""

from __future__ import annotations

import json
import os
import threading

import pytest
from fake_gen import FakeBackend

from lib_lorakit.errors import RecipeError
from lib_lorakit.eval import tournament as T
from lib_lorakit.eval.store import Store
from lib_lorakit.gen.run import Run

PROMPTS = [
    {"prompt": p, "negative_prompt": "blurry", "seed": 100 + i}
    for i, p in enumerate(["a portrait", "a castle", "a cat", "a street at night", "a forest", "a robot"])
]


def spec(**kw):
    cands = kw.pop("candidates", None) or [
        T.Candidate("v1", checkpoint="base", control=True),
        T.Candidate("v2", checkpoint="other"),
        T.Candidate("v2-style", checkpoint="other", loras=[{"name": "styleA", "strength": 0.6}]),
    ]
    return T.TournamentSpec(
        name="t", candidates=cands, prompts=kw.pop("prompts", PROMPTS), settings={"width": 64, "height": 64}, **kw
    )


@pytest.fixture
def env(tmp_path):
    ck, lo = tmp_path / "ck", tmp_path / "Lora"
    ck.mkdir()
    lo.mkdir()
    for f in ("base", "other"):
        (ck / f"{f}.safetensors").write_bytes(b"x")
    (lo / "styleA.safetensors").write_bytes(b"x")
    be = FakeBackend(str(ck), str(lo))
    return T.Tournaments(Store(str(tmp_path / "data"))), be, str(tmp_path / "out"), tmp_path


def test_the_prompt_floor_and_the_control_rule(env):
    tours, *_ = env
    with pytest.raises(RecipeError, match="at least 5 prompts; this one has 4"):
        tours.create(spec(prompts=PROMPTS[:4]))
    no_control = [T.Candidate("a", checkpoint="base"), T.Candidate("b", checkpoint="other")]
    with pytest.raises(RecipeError, match="Exactly one candidate must be the control"):
        tours.create(spec(candidates=no_control))
    two = [T.Candidate("a", checkpoint="base", control=True), T.Candidate("b", checkpoint="other", control=True)]
    with pytest.raises(RecipeError, match="2 are"):
        tours.create(spec(candidates=two))
    tid = tours.create(spec(candidates=no_control, first_version=True))
    assert tours.spec(tid).first_version


def test_generation_integrity_under_failures_and_checkpoints_loaded_once(env):
    tours, be, out, _ = env
    tid = tours.create(spec())
    be.fail_calls = {4, 11}
    rec = T.generate(tours, tid, be, out)
    assert rec["failed"] == 2 and tours.get(tid)["state"] == "incomplete"
    assert rec["model_switches"] <= 2  # base then other (each loaded once)
    n = len(be.calls)
    rec = T.generate(tours, tid, be, out)
    assert len(be.calls) - n == 2 and tours.get(tid)["state"] == "ready"
    run = Run(tours.get(tid)["run_dir"])
    res = run.results()
    for c in run.cells:  # each image is its own cell's: the seed in the pixels, the LoRA tag in the infotext
        from fake_gen import decode

        seed, strength = decode(run.load_image(res[c.key]))
        assert seed == c.seed % 256 and strength == (0.6 if c.extra["candidate"] == "v2-style" else 0.0)
        assert res[c.key]["checkpoint"].startswith("base" if c.extra["candidate"] == "v1" else "other")


def test_blind_ballots_shuffle_per_prompt_and_evaluator_and_hide_recipes(env):
    tours, be, out, _ = env
    tid = tours.create(spec(candidates=[T.Candidate(f"c{i}", checkpoint="base", control=i == 0) for i in range(6)]))
    T.generate(tours, tid, be, out)
    a = T.ballot(tours, tid, "alice")
    orders = {tuple(tours.order(tid, "alice", p)) for p in range(6)}
    assert len(orders) > 1  # the order changes between prompts
    assert T.ballot(tours, tid, "alice")["prompts"][0]["entries"] == a["prompts"][0]["entries"]  # stored
    assert [tours.order(tid, "bob", p) for p in range(6)] != [tours.order(tid, "alice", p) for p in range(6)]
    text = json.dumps(a)
    assert not any(f'"c{i}"' in text for i in range(6)) and "recipe" not in text
    assert [e["letter"] for e in a["prompts"][0]["entries"]] == list("ABCDEF")
    path = T.image_path(tours, tid, "alice", 0, "C")
    cand = tours.order(tid, "alice", 0)[2]
    run = Run(tours.get(tid)["run_dir"])
    key = next(c.key for c in run.cells if c.extra == {"prompt": 0, "candidate": cand})
    assert os.path.basename(path) == run.results()[key]["image"]
    blind = T.scores(tours, tid, resamples=50)
    assert set(blind["candidates"]) == {f"candidate {i}" for i in range(1, 7)}  # blind names before Reveal
    assert blind["enough_votes"] is False and blind["schemes"] == {}  # and no scores before any vote
    tours.update(tid, revealed=1)
    assert "recipe" in json.dumps(T.ballot(tours, tid, "alice"))


def test_votes_map_letters_and_two_concurrent_clients_lose_nothing(env):
    tours, be, out, tmp = env
    tid = tours.create(spec())
    order = tours.order(tid, "alice", 0)
    tours.vote(tid, "alice", [{"prompt": 0, "ranks": ["B", "A"], "bombs": ["C"], "client": "x", "seq": 1}])
    b = tours.ballots(tid)[0]
    assert b.ranks == [order[1], order[0]] and b.bombs == [order[2]]
    with pytest.raises(ValueError, match="not letters"):
        tours.vote(tid, "alice", [{"prompt": 0, "ranks": ["Z"]}])
    with pytest.raises(ValueError, match="prompt 9"):
        tours.vote(tid, "alice", [{"prompt": 9, "ranks": ["A"]}])
    errors = []

    def client(name):
        try:
            t2 = T.Tournaments(Store(str(tmp / "data")))
            for i in range(500):
                t2.vote(tid, name, [{"prompt": i % 6, "ranks": ["A", "B", "C"][: 1 + i % 3], "client": name, "seq": i}])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    th = [threading.Thread(target=client, args=(n,)) for n in ("e1", "e2")]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not errors
    votes = T.Tournaments(Store(str(tmp / "data"))).votes(tid)  # after a "restart"
    for n in ("e1", "e2"):
        assert sorted(v["client_seq"] for v in votes if v["client"] == n) == list(range(500))
    assert tours.vote(tid, "e1", [{"prompt": 0, "ranks": ["A"], "client": "e1", "seq": 3}]) == 0  # a replay


def test_reveal_report_and_next_rounds(env):
    tours, be, out, _ = env
    cands = [
        T.Candidate("v1", checkpoint="base", control=True),
        T.Candidate(
            "mix",
            merge={
                "models": [
                    {"name": "base", "weight": 0.7},
                    {"name": "other", "weight": 0.2},
                    {"name": "other", "weight": 0.1},
                ]
            },
        ),
        T.Candidate("v2", checkpoint="other", loras=[{"name": "styleA", "strength": 0.8}]),
    ]
    tid = tours.create(spec(candidates=cands))
    built = []

    def build(c, name):
        built.append((c.id, name))
        return "other"  # the merged checkpoint's name in the host's list (here: a stand-in)

    T.generate(tours, tid, be, out, build_merge=build)
    assert built == [("mix", T.merged_name(tid, cands[1]))]
    T.generate(tours, tid, be, out, build_merge=build)
    assert len(built) == 1  # built once, remembered in the spec
    for p in range(6):
        order = tours.order(tid, "alice", p)
        letter = {c: "ABC"[i] for i, c in enumerate(order)}
        tours.vote(tid, "alice", [{"prompt": p, "ranks": [letter["mix"], letter["v1"], letter["v2"]]}])
    with pytest.raises(RecipeError, match="reveal"):
        T.report_markdown(tours, tid)
    tours.update(tid, revealed=1)
    md = T.report_markdown(tours, tid)
    assert "Control (the previous version): **v1**" in md and "| mix | merge(weighted: base×0.7" in md
    assert "mix beats v1 in 6 of 6 prompts" in md
    assert T.report_csv(tours, tid).splitlines()[0].startswith("candidate,recipe,control,standard 3/2/1")
    nxt = T.propose_next(tours, tid, "narrow", step=0.05)
    ids = [c["id"] for c in nxt["candidates"]]
    assert nxt["winner"] == "mix" and ids[0] == "v1" and ids[1] == "mix" and "mix+m3" in ids and "mix-m1" in ids
    assert next(c for c in nxt["candidates"] if c["id"] == "mix+m3")["merge"]["models"][2]["weight"] == 0.15
    dial = T.propose_next(tours, tid, "dial-in")
    assert [c["merge"]["models"][2]["weight"] for c in dial["candidates"][2:]] == [0, 0.05, 0.15, 0.2]
    child = tours.create(
        T.TournamentSpec(
            name="r2",
            candidates=[T.Candidate(**c) for c in nxt["candidates"]],
            prompts=nxt["prompts"],
            settings=nxt["settings"],
        ),
        parent=tid,
        round_no=2,
    )
    assert [x["round"] for x in T.lineage(tours, child)] == [1, 2]


def test_tournament_cli(env, capsys):
    from fake_sdapi import FakeWebUI

    from lib_lorakit.cli import main

    tours, be, out, tmp = env
    data = str(tmp / "data")
    spec_file = tmp / "t.json"
    spec_file.write_text(
        json.dumps(
            {
                "name": "cli",
                "settings": {"width": 64, "height": 64},
                "prompts": [{"prompt": p["prompt"]} for p in PROMPTS[:5]],
                "candidates": [
                    {"id": "v1", "checkpoint": "base", "control": True},
                    {"id": "v2", "checkpoint": "other"},
                ],
            }
        )
    )
    assert main(["tournament", "create", str(spec_file), "--data-dir", data]) == 0
    tid = capsys.readouterr().out.strip()
    srv = FakeWebUI(be)
    try:
        assert main(["tournament", "generate", tid, "--webui", srv.url, "--out", out, "--data-dir", data]) == 0
    finally:
        srv.close()
    for p in range(5):
        order = tours.order(tid, "me", p)
        tours.vote(tid, "me", [{"prompt": p, "ranks": ["AB"[order.index("v2")]]}])
    capsys.readouterr()
    assert main(["tournament", "score", tid, "--data-dir", data]) == 0
    assert "candidate" in capsys.readouterr().out  # blind
    assert main(["tournament", "reveal", tid, "--data-dir", data]) == 0
    assert (
        main(
            ["tournament", "report", tid, "--data-dir", data, "-o", str(tmp / "r.md"), "--sheets", str(tmp / "sheets")]
        )
        == 0
    )
    assert sorted(os.listdir(tmp / "sheets")) == [f"prompt-{i:02d}.png" for i in range(1, 6)]
    assert "v2 beats v1 in 5 of 5 prompts" in (tmp / "r.md").read_text()
    capsys.readouterr()
    assert main(["tournament", "next-round", tid, "--data-dir", data]) == 2  # a plain checkpoint has no recipe
    assert "no recipe to vary" in capsys.readouterr().err
