"""What each step trains on and at which learning rate: pure functions, no torch.distributed.

- `micro_batch_for`, `micro_batches`: a worker's micro-batch size, and its micro-batches of one
  global batch. Gradient accumulation splits a worker's share into micro-batches of
  `micro_batch_size`; summing their losses, each divided by the share, gives the same gradient as
  one forward over the whole share (tested).
- `lr_factor`: the multiplier of the base learning rate at a step — linear warm-up, then
  constant, linear decay to 0, or a half cosine to 0 (as `transformers.get_scheduler`'s
  `constant_with_warmup`, `linear` and `cosine`, which the tests compare against).
"""

from __future__ import annotations

import math


def micro_batch_for(share: int, micro_batch_size: int | None) -> int:
    """The micro-batch a worker runs: its whole share, or `micro_batch_size` when that divides the share."""
    if micro_batch_size is None or micro_batch_size >= share:
        return share
    if share % micro_batch_size:
        raise ValueError(f"train.micro_batch_size ({micro_batch_size}) must divide each worker's share of the batch ({share})")
    return micro_batch_size


def micro_batches(indices: list[int], rank: int, world: int, micro: int) -> list[list[int]]:
    """Rank `rank`'s micro-batches of the global batch `indices` (len = world × share).

    Micro-batch j of rank r is the (j·world + r)-th chunk of `micro` consecutive indices: the very
    chunks, on the very ranks, of the reference pass (`loop.reference_batches` of the first epoch's
    order), so in bf16 step 1's forward widths — and hence its rounding — match the reference's
    and the first loss is exactly ln 2. With one micro-batch per step it is the rank's contiguous
    share.
    """
    chunks = len(indices) // micro
    if chunks * micro != len(indices) or chunks % world:
        raise ValueError(f"a global batch of {len(indices)} does not split into {world} worker(s) × micro-batches of {micro}")
    return [indices[(j * world + rank) * micro : (j * world + rank + 1) * micro] for j in range(chunks // world)]


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr for optimiser step `step` (0-based) of `total`.

    Warm-up rises as (step + 1)/(warmup + 1), so step 0 already trains (transformers' step/warmup
    spends step 0 at lr 0); from `warmup` on: 1 (constant), (total − step)/(total − warmup)
    (linear), ½(1 + cos(π·(step − warmup)/(total − warmup))) (cosine) — transformers' values.
    """
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown lr schedule {kind!r}: constant, linear or cosine")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine
