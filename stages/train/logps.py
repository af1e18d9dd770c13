"""Per-sequence log-probs of the response tokens, without a full-vocabulary log-softmax tensor.

`logp(y|x) = Σ_t log π(y_t | x, y_<t)` over response tokens only. `log_softmax(logits)` would
materialise a [B, T, V] tensor as large as the logits (V = 49k for SmolLM2, 150k for Qwen); we
need one entry per position, `logit[label] - logsumexp(logits)`, computed one sequence at a time
so the transient is [T, V] instead of [B, T, V] (as TRL's `selective_log_softmax`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(label_t) at each position. logits [B, T, V], labels [B, T] → [B, T] (in logits' dtype
    for fp32/fp64; bf16 logits are reduced in fp32, where bf16's 8-bit mantissa would lose the sum)."""
    out = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.float() if row_logits.dtype in (torch.bfloat16, torch.float16) else row_logits
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)


def sequence_logps(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of response-token log-probs per sequence.

    logits [B, T, V] from `model(input_ids)`; position t predicts token t+1, so logits are shifted
    against the labels. loss_mask [B, T] is 1 on response tokens (and 0 on prompt and padding).
    """
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(-1)
