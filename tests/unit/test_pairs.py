"""Tests for stages/pairs.py: best-vs-worst selection, tie rules, TRL conversational format."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PairsConfig
from stages.pairs import PAIR_COLUMNS, drop_counts, pick, scenario_pairs, select_pair


def _messages(prompt_id: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": f"Question {prompt_id}: what is 2 + 3?"},
    ]


def _cands(prompt_id: str, scores: dict[int, float]) -> list[dict]:
    """One candidate per (candidate_id → score); the response names its id, so picks are visible."""
    return [
        {
            "prompt_id": prompt_id,
            "candidate_id": cid,
            "score": score,
            "response": f"response #{cid} of {prompt_id}",
            "messages": _messages(prompt_id),
        }
        for cid, score in scores.items()
    ]


def _shuffled(rows: list[dict], seed: int) -> list[dict]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def test_best_vs_worst():
    rows = _cands("p0", {0: 3.0, 1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0})
    pair = select_pair(rows, PairsConfig())
    assert pair["chosen_candidate_id"] == 1
    assert pair["rejected_candidate_id"] == 2
    assert pair["chosen_score"] == 5.0
    assert pair["rejected_score"] == 1.0
    assert pair["chosen"] == [{"role": "assistant", "content": "response #1 of p0"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "response #2 of p0"}]
    assert pair["prompt"] == _messages("p0")
    assert pair["prompt_id"] == "p0"
    assert pair["num_candidates"] == 5
    assert pair["scenario"] == 1
    assert pair["chosen_source"] == "policy" and pair["rejected_source"] == "policy"


def test_output_columns_and_types():
    pair = select_pair(_cands("p1", {7: 4, 3: 2}), PairsConfig())
    assert list(pair) == PAIR_COLUMNS
    assert isinstance(pair["prompt"], list)
    assert all(set(m) == {"role", "content"} for m in pair["prompt"])
    for side in ("chosen", "rejected"):
        assert isinstance(pair[side], list) and len(pair[side]) == 1
        assert pair[side][0]["role"] == "assistant"
        assert isinstance(pair[side][0]["content"], str)
    assert isinstance(pair["chosen_score"], float) and isinstance(pair["rejected_score"], float)
    assert type(pair["chosen_candidate_id"]) is int and type(pair["rejected_candidate_id"]) is int
    assert (pair["chosen_candidate_id"], pair["rejected_candidate_id"]) == (7, 3)


def test_prompt_is_a_copy():
    rows = _cands("p2", {0: 5, 1: 1})
    pair = select_pair(rows, PairsConfig())
    pair["prompt"][0]["content"] = "changed"
    assert rows[0]["messages"][0]["content"] == "You are a careful solver."


@pytest.mark.parametrize("order_seed", range(6))
def test_tie_first_lowest_id_regardless_of_order(order_seed):
    # best score 5 shared by ids 4, 2, 9; worst score 1 shared by ids 8, 3, 6
    rows = _cands("p3", {4: 5, 8: 1, 2: 5, 7: 3, 3: 1, 9: 5, 6: 1})
    pair = select_pair(_shuffled(rows, order_seed), PairsConfig(tie_break="first"))
    assert pair["chosen_candidate_id"] == 2
    assert pair["rejected_candidate_id"] == 3


def _tied_rows(prompt_id: str) -> list[dict]:
    return _cands(prompt_id, {0: 5, 1: 1, 2: 5, 3: 1, 4: 5, 5: 1, 6: 3})


def test_tie_random_deterministic_and_order_independent():
    cfg = PairsConfig(tie_break="random", seed=11)
    for k in range(20):
        rows = _tied_rows(f"q{k}")
        first = select_pair(rows, cfg)
        for order_seed in range(4):
            again = select_pair(_shuffled(rows, order_seed), cfg)
            assert again["chosen_candidate_id"] == first["chosen_candidate_id"]
            assert again["rejected_candidate_id"] == first["rejected_candidate_id"]
        assert first["chosen_candidate_id"] in {0, 2, 4}
        assert first["rejected_candidate_id"] in {1, 3, 5}


def test_tie_random_varies_with_seed_and_prompt():
    picks = {}
    for seed in (0, 1):
        cfg = PairsConfig(tie_break="random", seed=seed)
        picks[seed] = [
            (p["chosen_candidate_id"], p["rejected_candidate_id"])
            for p in (select_pair(_tied_rows(f"q{k}"), cfg) for k in range(50))
        ]
    assert picks[0] != picks[1], "the seed does not change any draw"
    # it actually draws: every tied candidate is chosen for some prompt (not always the first)
    assert {c for c, _ in picks[0]} == {0, 2, 4}
    assert {r for _, r in picks[0]} == {1, 3, 5}


def test_tie_random_single_best_is_taken():
    cfg = PairsConfig(tie_break="random", seed=3)
    for k in range(10):
        pair = select_pair(_cands(f"s{k}", {0: 2, 1: 5, 2: 2, 3: 1}), cfg)
        assert pair["chosen_candidate_id"] == 1
        assert pair["rejected_candidate_id"] == 3


def test_pick_directly():
    rows = _cands("p", {5: 2, 1: 2, 3: 4, 0: 4})
    assert pick(rows, "max", "first", 0, "p")["candidate_id"] == 0
    assert pick(rows, "min", "first", 0, "p")["candidate_id"] == 1


@pytest.mark.parametrize("tie_break", ["first", "random"])
def test_uniform_prompt_dropped(tie_break):
    assert select_pair(_cands("u", {0: 3, 1: 3, 2: 3, 3: 3}), PairsConfig(tie_break=tie_break)) is None
    assert select_pair(_cands("u1", {0: 5}), PairsConfig(tie_break=tie_break)) is None


def test_min_margin():
    rows = _cands("m", {0: 3, 1: 2, 2: 3})
    assert select_pair(rows, PairsConfig(min_margin=2)) is None
    assert select_pair(rows, PairsConfig(min_margin=1)) is not None
    wide = _cands("w", {0: 3, 1: 1})
    pair = select_pair(wide, PairsConfig(min_margin=2))  # a gap of exactly min_margin is kept
    assert pair is not None and (pair["chosen_score"], pair["rejected_score"]) == (3.0, 1.0)


def test_scenario_pairs_read_arrow_like_rows():
    """Parquet hands list cells over as numpy arrays; the pair holds plain lists of dicts."""
    rows = _cands("g", {0: 1, 1: 4, 2: 2}) + _cands("g2", {0: 2, 1: 2})
    frame = pd.DataFrame(rows)
    frame["messages"] = [np.array(r["messages"], dtype=object) for r in rows]
    pairs, dropped = scenario_pairs({"policy": frame}, 1, PairsConfig())
    assert len(pairs) == 1 and list(pairs[0]) == PAIR_COLUMNS
    assert pairs[0]["prompt"] == _messages("g")
    assert (pairs[0]["chosen_candidate_id"], pairs[0]["rejected_candidate_id"]) == (1, 0)
    assert dropped == {"dropped_uniform": 1, "dropped_unscored": 0, "dropped_margin": 0}


def test_pairs_carry_each_sides_sampled_ids_and_finish_reason():
    rows = _cands("t", {0: 1, 1: 5, 2: 3})
    for r in rows:
        r["response_token_ids"] = np.array([10 + r["candidate_id"], 99])  # as Arrow hands them over
        r["finish_reason"] = "length" if r["candidate_id"] == 0 else "stop"
    pair = select_pair(rows, PairsConfig())
    assert (pair["chosen_token_ids"], pair["rejected_token_ids"]) == ([11, 99], [10, 99])
    assert (pair["chosen_finish_reason"], pair["rejected_finish_reason"]) == ("stop", "length")
    # candidates from elsewhere (no ids, no finish reason) give None, not an error
    plain = select_pair(_cands("x", {0: 1, 1: 5}), PairsConfig())
    assert plain["chosen_token_ids"] is None and plain["rejected_finish_reason"] is None


def test_prompts_dropped_as_uniform_and_by_min_margin_are_counted_apart():
    scores = pd.DataFrame(
        [("uniform", s) for s in (3, 3, 3)] + [("narrow", s) for s in (3, 2, 3)]
        + [("wide", s) for s in (5, 1, 2)] + [("single", 4)]
        + [("one-left", s) for s in (5, None, None)] + [("two-left", s) for s in (5, None, 1)],
        columns=["prompt_id", "score"],
    )
    cfg = PairsConfig(min_margin=2)
    frame = pd.concat([pd.DataFrame(_cands(p, dict(enumerate(g.score)))) for p, g in scores.groupby("prompt_id")])
    pairs, dropped = scenario_pairs({"policy": frame}, 1, cfg)
    kept = len(pairs)
    assert dropped == {"dropped_uniform": 2, "dropped_unscored": 1, "dropped_margin": 1}
    assert kept == 2  # "wide" and "two-left": an unscored candidate takes no part, the two scored ones pair
    assert drop_counts(scores, kept) == {"dropped_uniform": 2, "dropped_unscored": 1, "dropped_margin": 1}


# ── the four scenarios ─────────────────────────────────────────────────────────────────────────
def _source(name: str, scores: dict[str, dict[int, float | None]]) -> pd.DataFrame:
    """A source's judged candidates: per prompt, candidate_id → score; the text names the source."""
    rows = []
    for prompt_id, by_id in scores.items():
        for cid, score in by_id.items():
            rows.append({"prompt_id": prompt_id, "candidate_id": cid, "score": score, "messages": _messages(prompt_id),
                         "response": f"{name} #{cid} of {prompt_id}", "model": f"model-of-{name}",
                         "response_token_ids": None if name == "reference" else [cid, 2], "finish_reason": "stop"})
    return pd.DataFrame(rows)


SOURCES = {
    "policy": _source("policy", {"a": {0: 5, 1: 3, 2: 1}, "b": {0: 4, 1: 4}, "c": {0: 2, 1: 2}, "d": {0: 5, 1: None}}),
    "reference": _source("reference", {"a": {0: 5}, "b": {0: 5}, "c": {0: 1}, "d": {0: None}}),
    "other": _source("other", {"a": {0: 2, 1: 1, 2: 1}, "b": {0: 4, 1: 5}, "c": {0: 1, 1: 1}, "d": {0: 1}}),
}


@pytest.mark.parametrize(
    "scenario, kept, dropped",
    [
        # a: 5 vs 1; b: uniform 4s; c: uniform 2s; d: one scored candidate
        (1, {"a": ((0, 5), (2, 1))}, {"dropped_uniform": 2, "dropped_unscored": 1, "dropped_margin": 0}),
        # solution (5) vs the policy's worst: a 5>1, b 5>4, c 1<2 (the judge faults the solution), d unscored
        (2, {"a": ((0, 5), (2, 1)), "b": ((0, 5), (0, 4))}, {"dropped_uniform": 1, "dropped_unscored": 1, "dropped_margin": 0}),
        # the policy's best vs the other model's worst: a 5>1 (tie of 1s: lowest id), b 4=4 none, c 2>1, d 5>1
        (3, {"a": ((0, 5), (1, 1)), "c": ((0, 2), (0, 1)), "d": ((0, 5), (0, 1))},
         {"dropped_uniform": 1, "dropped_unscored": 0, "dropped_margin": 0}),
        # solution vs the other model's worst: a 5>1, b 5>4, c 1=1 none, d unscored solution
        (4, {"a": ((0, 5), (1, 1)), "b": ((0, 5), (0, 4))}, {"dropped_uniform": 1, "dropped_unscored": 1, "dropped_margin": 0}),
    ],
)
def test_each_scenario_pairs_its_two_sources(scenario, kept, dropped):
    chosen_source, rejected_source = {1: ("policy", "policy"), 2: ("reference", "policy"), 3: ("policy", "other"),
                                      4: ("reference", "other")}[scenario]
    pairs, counts = scenario_pairs(SOURCES, scenario, PairsConfig())
    assert counts == dropped
    assert {p["prompt_id"]: ((p["chosen_candidate_id"], p["chosen_score"]), (p["rejected_candidate_id"], p["rejected_score"]))
            for p in pairs} == kept
    for p in pairs:
        assert p["scenario"] == scenario
        assert (p["chosen_source"], p["rejected_source"]) == (chosen_source, rejected_source)
        assert p["chosen"][0]["content"].startswith(chosen_source) and p["rejected"][0]["content"].startswith(rejected_source)
        assert (p["chosen_model"], p["rejected_model"]) == (f"model-of-{chosen_source}", f"model-of-{rejected_source}")
        assert p["chosen_score"] > p["rejected_score"]
        assert p["prompt"] == _messages(p["prompt_id"])
        # a dataset solution has no sampled ids: training tokenizes its text
        assert (p["chosen_token_ids"] is None) == (chosen_source == "reference")


def test_a_cross_source_gap_below_min_margin_is_dropped_as_margin():
    pairs, counts = scenario_pairs(SOURCES, 2, PairsConfig(min_margin=2))
    assert [p["prompt_id"] for p in pairs] == ["a"]  # b: 5 vs 4 is a contrast below 2
    assert counts == {"dropped_uniform": 1, "dropped_unscored": 1, "dropped_margin": 1}


def test_random_ties_in_a_cross_source_pair_are_seeded_per_prompt():
    cfg = PairsConfig(tie_break="random", seed=1)
    picks = {scenario_pairs(SOURCES, 3, cfg)[0][0]["rejected_candidate_id"] for _ in range(3)}
    assert len(picks) == 1 and picks <= {1, 2}  # a's other-model 1s tie: one seeded draw, the same every time
