"""Per-sequence log-probs of the response tokens, without a full-vocabulary log-softmax tensor.

`logp(y|x) = Σ_t log π(y_t | x, y_<t)` over response tokens only. `log_softmax(logits)` would
materialise a [B, T, V] tensor as large as the logits (V = 49k for SmolLM2, 150k for Qwen); we
need one entry per position, `logit[label] - logsumexp(logits)`, computed one sequence at a time
so the transient is [T, V] instead of [B, T, V] (as TRL's `selective_log_softmax`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _row_logps(row_logits: Tensor, row_labels: Tensor) -> Tensor:
    row_logits = row_logits.float() if row_logits.dtype in (torch.bfloat16, torch.float16) else row_logits
    picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(row_logits, dim=-1)


@functools.cache
def _fused_logps():
    """`_row_logps` compiled (Triton on a GPU): the fp32 cast, gather and logsumexp fuse into one
    pass over the bf16 logits — no fp32 copy in either direction — and the backward recomputes the
    softmax from the bf16 logits and the saved logsumexp. Profiled on an H200 (bench/RESULTS.md),
    the eager row loop spent 60-80 ms of a 135 ms GPU step on this."""
    return torch.compile(_row_logps, dynamic=True)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(label_t) at each position. logits [B, T, V], labels [B, T] → [B, T] (in logits' dtype
    for fp32/fp64; bf16 logits are reduced in fp32, where bf16's 8-bit mantissa would lose the sum).

    For bf16 logits that need a gradient, each row's fp32 copy is recomputed in the backward pass
    (activation checkpointing of `_row_logps`) instead of being kept for it: autograd would
    otherwise hold B × T × V fp32 values — 4.6 GiB for 8 pairs × 512 tokens × Qwen's 152k
    vocabulary, twice the bf16 logits themselves — until backward."""
    if logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16):  # the reference pass too: same kernel
        return _fused_logps()(logits, labels)
    low_precision = logits.dtype in (torch.bfloat16, torch.float16) and logits.requires_grad
    out = []
    for row_logits, row_labels in zip(logits, labels):
        if low_precision:
            from torch.utils.checkpoint import checkpoint

            out.append(checkpoint(_row_logps, row_logits, row_labels, use_reentrant=False))
        else:
            out.append(_row_logps(row_logits, row_labels))
    return torch.stack(out)


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of response-token log-probs per sequence.

    logits [B, T, V] from `model(input_ids)`; position t predicts token t+1, so logits are shifted
    against the labels. loss_mask [B, T] is 1 on response tokens (and 0 on prompt and padding).
    """
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(-1)
