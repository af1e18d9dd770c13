"""Tests for the reference pass's batches (stages/train/loop.py) and evaluate's use of them.

In bf16 a pair's log-probs depend on the batch it is padded in, so "step 1 = reference" and
"evaluate's before = reference" both rest on this bookkeeping being exact.
"""

from __future__ import annotations

import pytest

from pipeline.config import TrainConfig
from stages.evaluate.logps import plan_batches
from stages.train import reference_batches_for
from stages.train.loop import batch_schedule, epoch_order, first_appearances, reference_batches


@pytest.mark.parametrize("num_pairs, batch_size, world", [(10, 4, 2), (8, 8, 2), (7, 6, 3), (5, 1, 1)])
def test_reference_batches_are_the_first_epochs_per_rank_batches(num_pairs, batch_size, world):
    share = batch_size // world
    batches = reference_batches(epoch_order(num_pairs, 0, 0), share, world)
    for step, indices in enumerate(batch_schedule(num_pairs, batch_size, 1, 0, None)):
        for rank in range(world):
            # what train_loop's rank r runs at step s; batch g runs on rank g % world
            assert batches[step * world + rank] == indices[rank * share : (rank + 1) * share]
    assert len(batches) % world == 0 and all(len(b) == share for b in batches)  # every rank joins every forward
    assert sorted(set(i for b in batches for i in b)) == list(range(num_pairs))


def test_the_padded_tail_repeats_the_start_of_the_order():
    order = [4, 0, 1, 3, 2]
    assert reference_batches(order, 2, 2) == [[4, 0], [1, 3], [2, 4], [0, 1]]


def test_a_pairs_reference_is_its_first_appearance():
    """Pairs 4, 0, 1 run again in the tail; their step-1 batch comes first and must win."""
    assert first_appearances([[4, 0], [1, 3], [2, 4], [0, 1]]) == {4: 0, 0: 1, 1: 2, 3: 3, 2: 4}


def test_reference_batches_for_follows_the_shrunk_global_batch():
    """3 pairs for a configured batch of 8 on 2 workers: the train driver shrinks it to 2."""
    tc = TrainConfig(batch_size=8, num_workers=2, seed=3)
    assert reference_batches_for(3, tc) == reference_batches(epoch_order(3, 3, 0), 1, 2)


def test_plan_batches_without_batches_is_file_order():
    assert plan_batches(None, 5, 2) == [[0, 1], [2, 3], [4]]


def test_plan_batches_runs_only_batches_with_pairs_not_yet_seen():
    batches = [[4, 0], [1, 3], [2, 4], [0, 1]]
    assert plan_batches(batches, 5, 4) == [[4, 0], [1, 3], [2, 4]]
    assert plan_batches(batches, 2, 4) == [[4, 0], [1, 3]]  # a limit of 2 pairs: 0 and 1


def test_plan_batches_names_pairs_the_batches_never_run():
    with pytest.raises(ValueError, match=r"pair\(s\) \[2\]"):
        plan_batches([[0, 1]], 3, 4)


def test_held_out_pairs_are_the_files_tail_and_never_in_the_reference_batches():
    from pipeline.errors import UserError
    from stages.train import trained_pairs

    tc = TrainConfig(batch_size=4, num_workers=2, held_out_pairs=3)
    assert trained_pairs(11, tc) == 8
    batches = reference_batches_for(11, tc)
    assert {i for b in batches for i in b} == set(range(8))  # pairs 8, 9, 10 are held out
    assert batches == reference_batches_for(8, TrainConfig(batch_size=4, num_workers=2))
    with pytest.raises(UserError, match="train.held_out_pairs=3: scenario 1 has only 3 pairs"):
        trained_pairs(3, tc)
