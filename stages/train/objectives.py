"""Preference objectives as pure functions of per-sequence log-probs.

Each takes the policy's and the reference's summed response log-probs of the chosen (y+) and
rejected (y-) responses, shape [B], and returns per-pair losses [B] and per-pair metrics [B]
under TRL's names. Per-pair (not batch-mean) outputs let the training loop average exactly over
a global batch split across workers. No Ray, no I/O: tested in float64 against hand computations.

Notation (../shared/research/METHODS.md):
    h = (logp(y+) - ref_logp(y+)) - (logp(y-) - ref_logp(y-))
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ObjectiveOutput:
    losses: Tensor  # [B]
    metrics: dict[str, Tensor]  # name -> [B], TRL's metric names


Objective = Callable[[Tensor, Tensor, Tensor, Tensor], ObjectiveOutput]


def dpo(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> ObjectiveOutput:
    """DPO (Rafailov et al., 2023): `loss = -log σ(β·h)`.

    The implicit rewards `β·(logp - ref_logp)` of chosen and rejected are logged as
    `rewards/chosen` and `rewards/rejected`; their difference is `rewards/margins` (= β·h), and
    `rewards/accuracies` is the share of pairs whose chosen reward is the larger.
    The gradient weights each pair by σ(-β·h): pairs the policy already orders right count
    less. As π(y-) → 0 the push on y- keeps growing while the pull on y+ vanishes
    (3D-properties, "drastic drop"): watch `logps/rejected` against `logps/chosen`.
    """
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margins)
    metrics = {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_logps.dtype).detach(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }
    return ObjectiveOutput(losses=losses, metrics=metrics)


def objective_for(method) -> Objective:
    """The objective a method config names (`train.method.type`), with its hyper-parameters bound."""
    if method.type == "dpo":
        return partial(dpo, beta=method.beta)
    raise ValueError(f"no objective for method type {method.type!r}")


def needs_reference(method) -> bool:
    """Reference-free methods (SimPO, OGD) skip the reference pass."""
    return method.type in {"dpo"}
