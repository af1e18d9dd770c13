"""Preference objectives as pure functions of per-sequence log-probs.

Each objective takes a `PairLogps` — the policy's summed response log-probs of the chosen (y+)
and rejected (y−) responses, their token counts |y±|, and (for methods with a reference) the
reference's log-probs, all shape [B] — plus its hyper-parameters, and returns per-pair losses [B],
per-pair metrics [B] under TRL's names, and the closed-form per-pair derivatives ∂L/∂logp(y+) and
∂L/∂logp(y−). Per-pair (not batch-mean) outputs let the training loop average exactly over a
global batch split across workers. No Ray, no I/O: tested in float64 against hand computations,
autograd and TRL 1.16.

Notation (../shared/research/METHODS.md, "Objectives"):
    c, r   = logp(y+), logp(y−)                  (sums over response tokens)
    c₀, r₀ = ref_logp(y+), ref_logp(y−)
    h      = (c − c₀) − (r − r₀)
    σ      = the logistic function

Why the derivatives (3D-properties, seed 003 §3): with DPO, ∂L/∂c = −β·σ(−βh) and
∂L/∂r = +β·σ(−βh), so ∂L/∂π(y+) ∝ 1/π(y+) stays bounded while ∂L/∂π(y−) ∝ 1/π(y−) grows without
bound as π(y−) → 0: training turns into unlearning the rejected responses. Logging |∂L/∂c| and
|∂L/∂r| per step (`grads/chosen_logps`, `grads/rejected_logps`) shows which term drives each
method; every method below changes one of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairLogps:
    """Per-pair sequence log-probs and response lengths, [B] each. `ref_*` are None for a
    reference-free method (the training loop then skips the reference pass)."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass(frozen=True)
class ObjectiveOutput:
    losses: Tensor  # [B]
    metrics: dict[str, Tensor]  # name -> [B], detached; TRL's names plus ours (see `_logps_metrics`)
    dloss_dchosen: Tensor  # [B], ∂L_i/∂logp(y+_i), closed form, detached
    dloss_drejected: Tensor  # [B], ∂L_i/∂logp(y−_i)


Objective = Callable[[PairLogps], ObjectiveOutput]


def _require_reference(lp: PairLogps, method: str) -> tuple[Tensor, Tensor]:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError(f"{method} measures rewards against a reference: PairLogps.ref_chosen/ref_rejected are None")
    return lp.ref_chosen, lp.ref_rejected


def _output(losses: Tensor, chosen_reward: Tensor, rejected_reward: Tensor, lp: PairLogps,
            dc: Tensor, dr: Tensor) -> ObjectiveOutput:  # fmt: skip
    """Losses plus the metrics every method logs:
    - TRL's `rewards/{chosen,rejected,margins,accuracies}` (each method's implicit reward, below);
    - TRL's `logps/{chosen,rejected}` (sums over the response);
    - `logps/{chosen,rejected}_per_token`: the mean per-token log-prob logp(y)/|y|, comparable
      across responses of different lengths (Figure 10's y-axis is per sequence; this is the
      length-free view of the same drop);
    - `grads/{chosen,rejected}_logps`: |∂L/∂logp(y+)| and |∂L/∂logp(y−)| from the closed form;
    - `logratios/{chosen,rejected}`: logp − ref_logp, when there is a reference (the guard's input).
    """
    margins = chosen_reward - rejected_reward
    metrics = {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": margins,
        "rewards/accuracies": (chosen_reward > rejected_reward).to(losses.dtype),
        "logps/chosen": lp.chosen,
        "logps/rejected": lp.rejected,
        "logps/chosen_per_token": lp.chosen / lp.chosen_tokens.clamp(min=1).to(lp.chosen.dtype),
        "logps/rejected_per_token": lp.rejected / lp.rejected_tokens.clamp(min=1).to(lp.rejected.dtype),
        "grads/chosen_logps": dc.abs(),
        "grads/rejected_logps": dr.abs(),
    }
    if lp.ref_chosen is not None and lp.ref_rejected is not None:  # the drift from π_ref on these very pairs
        metrics["logratios/chosen"] = lp.chosen - lp.ref_chosen
        metrics["logratios/rejected"] = lp.rejected - lp.ref_rejected
    return ObjectiveOutput(losses=losses, metrics={k: v.detach() for k, v in metrics.items()},
                           dloss_dchosen=dc.detach(), dloss_drejected=dr.detach())  # fmt: skip


def _lengths(lp: PairLogps) -> tuple[Tensor, Tensor]:
    """|y+|, |y−| in the log-probs' dtype, at least 1 (as TRL's `clamp(min=1.0)`)."""
    return lp.chosen_tokens.to(lp.chosen.dtype).clamp(min=1), lp.rejected_tokens.to(lp.chosen.dtype).clamp(min=1)


# ── the objectives ───────────────────────────────────────────────────────────────────────────
def flex_dpo(lp: PairLogps, beta_chosen: float = 0.1, beta_rejected: float = 0.1) -> ObjectiveOutput:
    """Flex-DPO (seed 003 §3.3): `L = −log σ(β+·(c − c₀) − β−·(r − r₀))`.

    DPO with the two log-ratios scaled apart: ∂L/∂c = −β+·σ(−z), ∂L/∂r = +β−·σ(−z) with z the
    argument of σ. Fixing β+ and lowering β− slows the drop of π(y−) (the paper's best β− ≈ 0.08
    on poems, 0.01 on math). Rewards: β+·(c − c₀) and β−·(r − r₀). β+ = β− = β is DPO exactly.
    """
    c0, r0 = _require_reference(lp, "flex_dpo")
    chosen_reward = beta_chosen * (lp.chosen - c0)
    rejected_reward = beta_rejected * (lp.rejected - r0)
    z = chosen_reward - rejected_reward
    weight = torch.sigmoid(-z)
    return _output(-F.logsigmoid(z), chosen_reward, rejected_reward, lp, -beta_chosen * weight, beta_rejected * weight)


def dpo(lp: PairLogps, beta: float = 0.1) -> ObjectiveOutput:
    """DPO (Rafailov et al., 2023): `L = −log σ(β·h)`.

    Rewards are the implicit `β·(logp − ref_logp)`; `rewards/margins` = β·h. The gradient
    weights each pair by σ(−β·h): ∂L/∂c = −β·σ(−βh) = −∂L/∂r, so pairs the policy already orders
    right count less — and as π(y−) → 0 the push on y− keeps growing in probability space while
    the pull on y+ vanishes ("drastic drop"): watch `logps/rejected` against `logps/chosen`.
    """
    return flex_dpo(lp, beta_chosen=beta, beta_rejected=beta)


def dpo_sft(lp: PairLogps, beta: float = 0.1, sft_weight: float = 1.0) -> ObjectiveOutput:
    """DPO+SFT: `L = −log σ(β·h) + λ·(−c/|y+|)`.

    The length-normalised negative log-likelihood of the chosen response keeps a gradient on y+
    (∂L/∂c = −β·σ(−βh) − λ/|y+|) after DPO's own weight σ(−βh) has faded, so π(y+) keeps being
    pulled up while π(y−) falls. Per pair the SFT term is the *mean per-token* NLL of y+; TRL's
    `loss_type=["sigmoid", "sft"]` instead takes the token mean over the whole batch
    (Σ_i c_i / Σ_i |y+_i|), which weights long responses more: equal when all |y+| are equal
    (tests/stage/test_train_vs_trl.py pins the difference). Rewards are DPO's.
    """
    base = dpo(lp, beta=beta)
    chosen_len, _ = _lengths(lp)
    nll = -lp.chosen / chosen_len
    return _output(base.losses + sft_weight * nll, base.metrics["rewards/chosen"], base.metrics["rewards/rejected"], lp,
                   base.dloss_dchosen - sft_weight / chosen_len, base.dloss_drejected)  # fmt: skip


def ipo(lp: PairLogps, beta: float = 0.1) -> ObjectiveOutput:
    """IPO (Azar et al., 2023), length-averaged as TRL does: `L = (h̄ − 1/(2β))²` with
    `h̄ = (c − c₀)/|y+| − (r − r₀)/|y−|`; β plays the paper's τ.

    A squared loss regresses h̄ to a finite target instead of pushing it to infinity: the
    derivative ∂L/∂c = 2(h̄ − 1/(2β))/|y+| vanishes once the margin is reached, so π(y−) stops
    falling (seed 003 App. B.3.1). TRL normalises by the completion length (confirmed with the
    IPO authors); so do we. Rewards are TRL's: β·(c − c₀) and β·(r − r₀).
    """
    c0, r0 = _require_reference(lp, "ipo")
    chosen_len, rejected_len = _lengths(lp)
    delta = (lp.chosen - c0) / chosen_len - (lp.rejected - r0) / rejected_len
    residual = delta - 1 / (2 * beta)
    return _output(residual**2, beta * (lp.chosen - c0), beta * (lp.rejected - r0), lp,
                   2 * residual / chosen_len, -2 * residual / rejected_len)  # fmt: skip


def slic(lp: PairLogps, delta: float = 1.0, sft_weight: float = 0.1) -> ObjectiveOutput:
    """SLiC-HF (Zhao et al., 2023): `L = max(0, δ − c + r) − λ·c`.

    A calibration hinge on the sequence log-likelihoods — y+ must beat y− by δ nats under the
    policy itself, no reference model — plus cross-entropy on the SFT target, here the chosen
    response (SLiC-HF's "y_ref"). Once the margin is met the hinge's gradient is 0 (∂L/∂r = 0):
    π(y−) is no longer pushed down (seed 003 App. B.3.2). Rewards are the log-likelihoods c, r
    (the margin is the calibrated quantity).
    """
    active = (delta - lp.chosen + lp.rejected > 0).to(lp.chosen.dtype)
    losses = F.relu(delta - lp.chosen + lp.rejected) - sft_weight * lp.chosen
    return _output(losses, lp.chosen, lp.rejected, lp, -active - sft_weight, active)


def hinge(lp: PairLogps, beta: float = 0.1) -> ObjectiveOutput:
    """SLiC's calibration loss in TRL's form (`loss_type="hinge"`): `L = max(0, 1 − β·h)`, on the
    reference-relative margin h, with no SFT term. ∂L/∂c = −β·1[βh < 1] = −∂L/∂r. Rewards are DPO's."""
    c0, r0 = _require_reference(lp, "slic (hinge)")
    chosen_reward, rejected_reward = beta * (lp.chosen - c0), beta * (lp.rejected - r0)
    z = chosen_reward - rejected_reward
    active = (1 - z > 0).to(lp.chosen.dtype)
    return _output(F.relu(1 - z), chosen_reward, rejected_reward, lp, -beta * active, beta * active)


def simpo(lp: PairLogps, beta: float = 2.0, gamma: float = 0.5) -> ObjectiveOutput:
    """SimPO (Meng et al., 2024): `L = −log σ(β·c/|y+| − β·r/|y−| − γ)`.

    The implicit reward is the length-normalised log-likelihood β·logp(y)/|y|, with a target
    margin γ: no reference model, so no reference pass at all. ∂L/∂c = −β·σ(−z)/|y+|,
    ∂L/∂r = +β·σ(−z)/|y−|. Rewards: β·c/|y+| and β·r/|y−| (as TRL's CPO trainer logs them).
    """
    chosen_len, rejected_len = _lengths(lp)
    chosen_reward = beta * lp.chosen / chosen_len
    rejected_reward = beta * lp.rejected / rejected_len
    z = chosen_reward - rejected_reward - gamma
    weight = torch.sigmoid(-z)
    return _output(-F.logsigmoid(z), chosen_reward, rejected_reward, lp,
                   -beta * weight / chosen_len, beta * weight / rejected_len)  # fmt: skip


def bradley_terry(lp: PairLogps, center_rewards_coefficient: float | None = None) -> ObjectiveOutput:
    """Reward-model training (Bradley–Terry; seed 003 eq. 2, TRL's `RewardTrainer`):
    `L = −log σ(r(x,y+) − r(x,y−))`, plus `α·(r+ + r−)²` with TRL's `center_rewards_coefficient` α.

    Here `lp.chosen` and `lp.rejected` hold the reward head's scalar r(x,y±), not log-probs (the
    loop's `pair_logps` puts them there for a sequence-classification model); lengths and
    references are unused. DPO's loss is this one with r = β·(logπ − logπ_ref): the same
    logistic regression on a margin, which is why seed 003 §5.3 trains both on the same pairs —
    the RM's accuracy rises steadily where DPO's, pulling on likelihoods, swings.
    ∂L/∂r+ = −σ(r− − r+) + 2α(r+ + r−), ∂L/∂r− = +σ(r− − r+) + 2α(r+ + r−).
    Metrics: TRL's `accuracy`, `margin`, `mean_reward`, and the same numbers under the DPO names
    `rewards/*` so one plot holds both methods' curves; `grads/{chosen,rejected}_rewards`.
    """
    chosen, rejected = lp.chosen, lp.rejected
    z = chosen - rejected
    weight = torch.sigmoid(-z)
    losses, dc, dr = -F.logsigmoid(z), -weight, weight
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
        dc = dc + 2 * center_rewards_coefficient * (chosen + rejected)
        dr = dr + 2 * center_rewards_coefficient * (chosen + rejected)
    accuracy = (chosen > rejected).to(losses.dtype)
    metrics = {"accuracy": accuracy, "margin": z, "mean_reward": (chosen + rejected) / 2,
               "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": z, "rewards/accuracies": accuracy,
               "grads/chosen_rewards": dc.abs(), "grads/rejected_rewards": dr.abs()}  # fmt: skip
    return ObjectiveOutput(losses=losses, metrics={k: v.detach() for k, v in metrics.items()},
                           dloss_dchosen=dc.detach(), dloss_drejected=dr.detach())  # fmt: skip


# ── from the config ──────────────────────────────────────────────────────────────────────────
def objective_for(method) -> Objective:
    """The objective a method config names (`train.method.type`), with its hyper-parameters bound."""
    kind = method.type
    if kind == "dpo":
        return partial(dpo, beta=method.beta)
    if kind == "ipo":
        return partial(ipo, beta=method.beta)
    if kind == "slic":
        if method.form == "hinge":
            return partial(hinge, beta=method.beta)
        return partial(slic, delta=method.delta, sft_weight=method.sft_weight)
    if kind == "simpo":
        return partial(simpo, beta=method.beta, gamma=method.gamma)
    if kind == "flex_dpo":
        return partial(flex_dpo, beta_chosen=method.beta_chosen, beta_rejected=method.beta_rejected)
    if kind == "dpo_sft":
        return partial(dpo_sft, beta=method.beta, sft_weight=method.sft_weight)
    if kind == "reward_model":
        return partial(bradley_terry, center_rewards_coefficient=method.center_rewards_coefficient)
    raise ValueError(f"no objective for method type {kind!r}")


def needs_reference(method) -> bool:
    """Whether the method measures against π_ref: SimPO and SLiC's own form are reference-free, so
    training skips the reference pass (no reference model, no reference_logps.parquet); so does
    a reward model."""
    if method.type == "slic":
        return method.form == "hinge"
    if method.type in {"dpo", "ipo", "flex_dpo", "dpo_sft"}:
        return True
    if method.type in {"simpo", "reward_model"}:
        return False
    raise ValueError(f"no objective for method type {method.type!r}")
