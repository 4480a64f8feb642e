"""Tournament scoring: closed-form cases for every scheme, and Bradley–Terry on simulated voters."""

from __future__ import annotations

import numpy as np
import pytest

from lib_lorakit.eval.scoring import (
    Ballot,
    average_rank,
    bootstrap_bt,
    bradley_terry,
    never_bombs,
    points,
    score,
    versus,
    wins_matrix,
)

C = ["A", "B", "C", "D"]


def tie_at_21():
    """10 prompts. A: 1st six times, 3rd three times, bombed once = 21 points. B: 2nd nine times, 1st once =
    21 points, never bombed. C and D fill the rest."""
    out = []
    for i in range(10):
        if i < 6:
            ranks, bombs = ["A", "B", "C"], []
        elif i < 9:
            ranks, bombs = (["C", "B", "A"], []) if i < 8 else (["D", "B", "A"], [])
        else:
            ranks, bombs = ["B", "C", "D"], ["A"]
        out.append(Ballot(prompt=f"p{i}", evaluator="e", ranks=ranks, bombs=bombs))
    return out


def test_a_321_tie_at_21_that_other_schemes_separate():
    ballots = tie_at_21()
    std = points(ballots, C, (3, 2, 1))
    assert std["A"] == std["B"] == 21
    wh = points(ballots, C, (5, 2, 1))
    assert wh["A"] == 6 * 5 + 3 * 1 and wh["B"] == 9 * 2 + 5  # 33 vs 23: A wins more often
    nb = never_bombs(ballots, C)
    assert nb["A"] == 9 - 2 and nb["B"] == 10  # B never bombs
    res = score(ballots, C, resamples=200)
    assert res["leaders"]["standard 3/2/1"] == ["A", "B"]
    assert res["leaders"]["win-heavy 5/2/1"] == ["A"] and res["leaders"]["never-bombs"] == ["B"]
    assert any("disagree" in n for n in res["notes"])
    assert any("standard 3/2/1: a tie between A and B" in n and "separate them" in n for n in res["notes"])


def test_average_rank_shares_the_remaining_ranks():
    b = [Ballot("p", "e", ranks=["B"], bombs=["D"])]
    # B 1st; A and C unranked share ranks 2 and 3 (2.5); D bombed takes the last rank (4)
    assert average_rank(b, C) == {"A": 2.5, "B": 1.0, "C": 2.5, "D": 4.0}
    assert average_rank([Ballot("p", "e", no_preference=True)], C) == {c: 2.5 for c in C}


def test_all_bad_and_no_preference():
    b = [Ballot("p1", "e", all_bad=True), Ballot("p2", "e", no_preference=True)]
    assert points(b, C, (3, 2, 1)) == {c: 0 for c in C}
    assert never_bombs(b, C) == {c: -2 for c in C}
    assert wins_matrix(b, C).sum() == 0


def test_wins_matrix_from_tiers():
    w = wins_matrix([Ballot("p", "e", ranks=["C", "A"], bombs=["D"])], C)
    i = {c: n for n, c in enumerate(C)}
    assert w[i["C"], i["A"]] == 1 and w[i["C"], i["B"]] == 1 and w[i["A"], i["B"]] == 1
    assert w[i["B"], i["D"]] == 1 and w[i["A"], i["D"]] == 1 and w[i["C"], i["D"]] == 1
    assert w.sum() == 6  # four tiers, every pair across tiers once


def test_bradley_terry_closed_form_two_players():
    # A beat B 3 times and lost once: with half a pseudo-win each way, p_A/p_B = 3.5/1.5
    w = np.array([[0, 3], [1, 0]], dtype=float)
    ls = bradley_terry(w)
    assert ls[0] - ls[1] == pytest.approx(np.log(3.5 / 1.5), abs=1e-8)


def simulate(true_ls, prompts, rng, evaluators=1, bomb_worst=0.1):
    cands = [f"c{i}" for i in range(len(true_ls))]
    out = []
    for p in range(prompts):
        for e in range(evaluators):
            u = np.asarray(true_ls) + rng.gumbel(size=len(true_ls))  # Plackett-Luce: pairwise marginals are BT
            order = [cands[i] for i in np.argsort(-u)]
            bombs = [order[-1]] if rng.random() < bomb_worst else []
            out.append(Ballot(f"p{p}", f"e{e}", ranks=order[:3], bombs=bombs))
    return cands, out


def test_bradley_terry_bootstrap_recovers_the_order_with_calibrated_intervals():
    true_ls = np.array([0.9, 0.3, -0.3, -0.9])
    covered = recovered = 0
    sims = 40
    for seed in range(sims):
        rng = np.random.default_rng(1000 + seed)
        cands, ballots = simulate(true_ls, prompts=40, rng=rng, evaluators=1, bomb_worst=0.0)
        bt = bootstrap_bt(ballots, cands, resamples=1000, seed=seed)
        est = np.array([bt["log_strength"][c] for c in cands])
        recovered += list(np.argsort(-est)) == [0, 1, 2, 3]
        inside = [
            bt["interval90"][c][0] <= t <= bt["interval90"][c][1] for c, t in zip(cands, true_ls - true_ls.mean())
        ]
        covered += sum(inside)
    coverage = covered / (sims * len(true_ls))
    assert coverage >= 0.85, coverage
    assert recovered / sims >= 0.85, recovered


def test_separability_says_how_many_prompts():
    rng = np.random.default_rng(7)
    cands, ballots = simulate([0.25, 0.2, -1.0], prompts=8, rng=rng)
    res = score(ballots, cands, resamples=1000)
    sep = res["separability"]
    assert not sep["separable"] and sep["p_ahead"] < 0.9
    assert sep["prompts_needed"] > 8 and "add prompts" in sep["text"] and sep["text"] in res["notes"]
    cands, ballots = simulate([2.0, 0.0, -2.0], prompts=30, rng=rng)
    assert score(ballots, cands, resamples=500)["separability"]["separable"]


def test_versus_the_control():
    b = [Ballot(f"p{i}", "e", ranks=["A", "B"] if i < 7 else ["B", "A"]) for i in range(10)]
    v = versus(b, ["A", "B", "C"], control="B")
    assert v["A"] == {"beats": 7, "loses": 3, "ties": 0, "prompts": 10}
    assert v["C"]["loses"] == 10
