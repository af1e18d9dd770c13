"""The reward-model judge's pure scoring: rewards → 1-5 by thresholds, or by rank within a prompt."""

from __future__ import annotations

import math

from stages.judge.reward_model import average_ranks, rank_reasons, rank_scores, threshold_reason, threshold_scores

T = [-1.0, 0.0, 0.5, 2.0]


def test_threshold_scores_put_each_reward_in_its_interval():
    rewards = [-5.0, -1.0001, 0.3, 1.0, 100.0]
    assert threshold_scores(rewards, T) == [1, 1, 3, 4, 5]


def test_threshold_scores_a_reward_exactly_at_a_cut_point_goes_up():
    # r < t0 → 1, t0 ≤ r < t1 → 2, t1 ≤ r < t2 → 3, t2 ≤ r < t3 → 4, r ≥ t3 → 5
    assert threshold_scores([-1.0, 0.0, 0.5, 2.0], T) == [2, 3, 4, 5]
    assert threshold_scores([math.nextafter(t, -math.inf) for t in T], T) == [1, 2, 3, 4]


def test_threshold_scores_leave_a_nan_reward_unscored():
    assert threshold_scores([float("nan"), 0.1], T) == [None, 3]
    assert threshold_reason(float("nan"), None, T).startswith("nan_reward:")


def test_threshold_reasons_name_the_interval():
    assert threshold_reason(0.731, 4, T) == "reward 0.731 in [0.5, 2)"
    assert threshold_reason(-3.0, 1, T) == "reward -3 < -1"
    assert threshold_reason(2.0, 5, T) == "reward 2 ≥ 2"


def test_rank_scores_spread_eight_distinct_rewards_by_the_formula():
    # shuffled rewards: ascending rank of each is its value's position in sorted order
    rewards = [0.3, -2.0, 1.5, 0.9, -0.1, 4.0, 0.0, 2.2]
    ranks = [3, 0, 5, 4, 1, 7, 2, 6]
    # by hand: 1 + round(4 * rank / 7) for rank 0..7 = 1 + round(0, .571, 1.143, 1.714, 2.286, 2.857, 3.429, 4)
    by_rank = [1, 2, 2, 3, 3, 4, 4, 5]
    assert rank_scores(rewards) == [by_rank[r] for r in ranks]
    assert rank_scores(rewards) == [3, 1, 4, 3, 2, 5, 2, 4]


def test_rank_scores_round_halves_away_from_the_middle_so_negation_mirrors():
    # n = 9: 4 * rank / 8 = 0, .5, 1, 1.5, 2, 2.5, 3, 3.5, 4
    rewards = [float(r) for r in range(9)]
    assert rank_scores(rewards) == [1, 1, 2, 2, 3, 4, 4, 5, 5]
    assert rank_scores([-r for r in rewards]) == [6 - s for s in rank_scores(rewards)]


def test_rank_scores_give_tied_rewards_their_average_rank():
    # sorted: 0.1 | 0.5 0.5 | 0.9 → ranks 0, 1.5, 1.5, 3 → 1 + round(4 * r / 3) = 1, 3, 3, 5
    assert average_ranks([0.5, 0.1, 0.9, 0.5]) == [1.5, 0.0, 3.0, 1.5]
    assert rank_scores([0.5, 0.1, 0.9, 0.5]) == [3, 1, 5, 3]
    # best two tie: ranks 0, 1, 2.5, 2.5 → 1 + round(0, 1.333, 3.333, 3.333) = 1, 2, 4, 4
    assert rank_scores([0.0, 1.0, 2.0, 2.0]) == [1, 2, 4, 4]


def test_rank_scores_all_equal_rewards_all_score_three():
    assert rank_scores([0.7] * 4) == [3, 3, 3, 3]
    assert rank_scores([-1.0, -1.0]) == [3, 3]


def test_rank_scores_cannot_rank_a_single_candidate():
    assert rank_scores([0.4]) == [None]
    assert rank_reasons([0.4], [None])[0].startswith("unrankable:")
    assert rank_scores([]) == []


def test_rank_scores_two_candidates_are_best_and_worst():
    assert rank_scores([0.2, -0.3]) == [5, 1]


def test_rank_scores_leave_nan_out_of_the_ranking():
    nan = float("nan")
    assert rank_scores([nan, 0.1, 0.3, 0.2]) == [None, 1, 5, 3]
    assert rank_scores([nan, 0.1]) == [None, None]
    reasons = rank_reasons([nan, 0.1], [None, None])
    assert reasons[0].startswith("nan_reward:") and reasons[1].startswith("unrankable:")


def test_rank_reasons_count_from_the_best():
    rewards = [0.5, 0.1, 0.9, 0.5]
    assert rank_reasons(rewards, rank_scores(rewards)) == [
        "reward 0.5: rank 2.5 of 4 (1 = best)", "reward 0.1: rank 4 of 4 (1 = best)",
        "reward 0.9: rank 1 of 4 (1 = best)", "reward 0.5: rank 2.5 of 4 (1 = best)",
    ]  # fmt: skip
