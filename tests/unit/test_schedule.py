"""Tests for stages/train/schedule.py: each worker's micro-batches of a global batch (against the
reference pass's batches in stages/train/loop.py) and the learning-rate multiplier (against
`transformers.get_scheduler`)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from stages.train.loop import epoch_order, reference_batches
from stages.train.schedule import lr_factor, micro_batches

# (global batch size, world, micro-batch size): shares of 1..8, one to four micro-batches per rank
SPLITS = [(1, 1, 1), (8, 1, 8), (8, 1, 2), (8, 2, 4), (8, 2, 2), (8, 2, 1), (12, 3, 2), (12, 4, 3), (24, 3, 4), (16, 4, 1)]  # fmt: skip


# ── micro_batches ────────────────────────────────────────────────────────────────────────────
def test_micro_batches_written_out():
    """12 pairs, 2 workers, micro-batches of 2: chunk j·world + r of the global batch goes to rank r."""
    indices = [7, 3, 11, 0, 5, 9, 1, 8, 2, 10, 4, 6]
    assert micro_batches(indices, 0, 2, 2) == [[7, 3], [5, 9], [2, 10]]
    assert micro_batches(indices, 1, 2, 2) == [[11, 0], [1, 8], [4, 6]]
    assert micro_batches(indices, 0, 2, 6) == [[7, 3, 11, 0, 5, 9]]
    assert micro_batches(indices, 1, 2, 6) == [[1, 8, 2, 10, 4, 6]]
    assert micro_batches(indices, 0, 1, 4) == [[7, 3, 11, 0], [5, 9, 1, 8], [2, 10, 4, 6]]


@pytest.mark.parametrize("batch, world, micro", SPLITS)
def test_every_index_once_across_ranks(batch, world, micro):
    indices = epoch_order(3 * batch, seed=5, epoch=0)[:batch]  # a shuffled global batch, not 0..n-1
    per_rank = [micro_batches(indices, rank, world, micro) for rank in range(world)]
    for mine in per_rank:
        assert len(mine) == batch // world // micro  # every rank runs the same number of forwards
        assert all(len(chunk) == micro for chunk in mine)
    seen = Counter(i for mine in per_rank for chunk in mine for i in chunk)
    assert seen == Counter(indices)
    assert all(n == 1 for n in seen.values())


@pytest.mark.parametrize("batch, world", [(1, 1), (8, 1), (8, 2), (12, 3), (12, 4), (16, 8)])
def test_one_micro_batch_is_the_contiguous_share(batch, world):
    indices = epoch_order(batch, seed=1, epoch=2)
    share = batch // world
    for rank in range(world):
        assert micro_batches(indices, rank, world, share) == [indices[rank * share : (rank + 1) * share]]


@pytest.mark.parametrize("batch, world, micro", SPLITS)
def test_matches_the_reference_pass_batches(batch, world, micro):
    """The first epoch's global batches, micro-batch by micro-batch, are the reference pass's
    batches: batch g of `reference_batches` runs on rank g % world, in order."""
    num_pairs = 3 * batch
    order = epoch_order(num_pairs, seed=7, epoch=0)
    reference = reference_batches(order, micro, world)
    per_global = batch // micro  # reference batches per global batch
    for step in range(num_pairs // batch):
        indices = order[step * batch : (step + 1) * batch]
        for rank in range(world):
            theirs = [b for g, b in enumerate(reference[step * per_global : (step + 1) * per_global]) if g % world == rank]
            assert micro_batches(indices, rank, world, micro) == theirs, (step, rank)


@pytest.mark.parametrize("batch, world, micro", [
    (10, 1, 3),  # 10 is not a multiple of 3
    (8, 3, 1),  # 8 pairs over 3 workers
    (6, 2, 2),  # 3 micro-batches over 2 workers
    (8, 2, 8),  # a micro-batch larger than a worker's share
    (12, 2, 5),
])  # fmt: skip
def test_indivisible_sizes_raise(batch, world, micro):
    with pytest.raises(ValueError, match=f"global batch of {batch}"):
        micro_batches(list(range(batch)), 0, world, micro)


# ── lr_factor vs transformers ────────────────────────────────────────────────────────────────
HF_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def _transformers_factors(kind: str, total: int, warmup: int) -> list[float]:
    """The multiplier transformers' scheduler gives optimiser step s = 0..total−1, read the way
    the Trainer (and our loop) uses it: the lr before `optimizer.step()`, then `scheduler.step()`."""
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(HF_NAME[kind], optimizer, num_warmup_steps=warmup, num_training_steps=total)
    factors = []
    for _ in range(total):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total, warmup", [(1, 0), (10, 0), (10, 3), (37, 10), (100, 1), (100, 99)])
def test_lr_factor_matches_transformers_after_warmup(kind, total, warmup):
    hf = _transformers_factors(kind, total, warmup)
    ours = [lr_factor(step, total, warmup, kind) for step in range(total)]
    for step in range(warmup, total):
        assert abs(ours[step] - hf[step]) <= 1e-12, (step, ours[step], hf[step])
    if kind != "constant" and total - warmup > 1:  # it does decay, to (not past) 0
        assert ours[total - 1] < ours[warmup] == 1.0 and ours[total - 1] > 0
    assert all(0.0 < f <= 1.0 for f in ours)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total, warmup", [(10, 3), (37, 10), (100, 1), (100, 99)])
def test_lr_factor_warmup_is_step_plus_one_over_warmup_plus_one(kind, total, warmup):
    """The documented difference: ours (s + 1)/(w + 1) trains at step 0; transformers' s/w spends
    step 0 at lr 0. Both rise linearly and reach 1 at step w."""
    hf = _transformers_factors(kind, total, warmup)
    for step in range(warmup):
        assert lr_factor(step, total, warmup, kind) == pytest.approx((step + 1) / (warmup + 1), rel=1e-15)
        assert hf[step] == pytest.approx(step / warmup, rel=1e-15, abs=0)
        assert lr_factor(step, total, warmup, kind) > hf[step]
    assert hf[0] == 0.0 and lr_factor(0, total, warmup, kind) > 0.0
    assert lr_factor(warmup, total, warmup, kind) == 1.0 == hf[warmup]


def test_lr_factor_written_out():
    """Total 10, warm-up 2: warm-up 1/3, 2/3; then progress (s − 2)/8."""
    assert [lr_factor(s, 10, 2, "constant") for s in range(10)] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8, rel=1e-15)
    assert [lr_factor(s, 10, 2, "linear") for s in range(2, 10)] == pytest.approx([1 - k / 8 for k in range(8)], rel=1e-15)
    assert lr_factor(6, 10, 2, "linear") == 0.5
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5, rel=1e-15)  # progress ½: cos(π/2) = 0
    assert lr_factor(4, 10, 2, "cosine") == pytest.approx(0.5 + math.sqrt(2) / 4, rel=1e-15)  # cos(π/4)
    assert lr_factor(9, 10, 2, "cosine") == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)), rel=1e-15)


@pytest.mark.parametrize("kind", ["constant_with_warmup", "exponential", "", "Linear"])
def test_lr_factor_unknown_kind_raises(kind):
    with pytest.raises(ValueError, match="lr schedule"):
        lr_factor(5, 10, 2, kind)


def test_lr_factor_unknown_kind_raises_during_warmup():
    """A typo fails at step 0, not after the warm-up."""
    with pytest.raises(ValueError, match="lr schedule"):
        lr_factor(0, 10, 2, "exponential")
