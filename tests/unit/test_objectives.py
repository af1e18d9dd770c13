"""Tests for stages/train/objectives.py: every objective's loss, metrics and closed-form
derivatives against float64 hand computations in plain `math` (from the formulas in
shared/research/METHODS.md, "Objectives"), against autograd, and against TRL 1.16's own code
(`DPOTrainer._compute_loss` for sigmoid, ipo, hinge and sigmoid+sft; `CPOTrainer` for SimPO)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DPOMethod, DPOSFTMethod, FlexDPOMethod, IPOMethod, RewardModelMethod, SimPOMethod, SLiCMethod
from stages.train.objectives import (
    PairLogps,
    bradley_terry,
    dpo,
    dpo_sft,
    flex_dpo,
    hinge,
    ipo,
    needs_reference,
    objective_for,
    simpo,
    slic,
)

# (c, r, c₀, r₀, |y+|, |y−|): policy and reference sequence log-probs, response lengths
PAIRS = [
    (-10.0, -12.0, -11.0, -11.5, 5, 7),  # h = 1 - (-0.5) = 1.5: right order
    (-20.0, -8.0, -19.0, -10.0, 10, 4),  # h = -1 - 2 = -3: wrong order
    (-10.0, -5.0, -12.0, -7.0, 3, 3),  # h = 2 - 2 = 0: tie, equal lengths
    (-3.25, -40.5, -3.0, -39.0, 2, 20),  # h = -0.25 + 1.5 = 1.25
    (-0.5, -100.0, -7.0, -2.0, 1, 50),  # h = 6.5 + 98 = 104.5: large
]
METRICS = {
    "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token",
    "grads/chosen_logps", "grads/rejected_logps",
}  # fmt: skip
LOGRATIOS = {"logratios/chosen", "logratios/rejected"}  # only when a reference is given
WITH_REFERENCE = [dpo, flex_dpo, dpo_sft, ipo, hinge]


# ── hand computations: plain float64 `math`, one formula per paper ──────────────────────────
def _softplus(x: float) -> float:
    """log(1 + exp(x)), evaluated without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _hand_flex_dpo(c, r, c0, r0, lc, lr, beta_chosen, beta_rejected):
    """−log σ(z), z = β+(c − c₀) − β−(r − r₀); dz/dc = β+, dz/dr = −β−; d(−log σ(z))/dz = −σ(−z)."""
    z = beta_chosen * (c - c0) - beta_rejected * (r - r0)
    s = _sigmoid(-z)
    return dict(loss=_softplus(-z), chosen=beta_chosen * (c - c0), rejected=beta_rejected * (r - r0),
                dc=-beta_chosen * s, dr=beta_rejected * s)  # fmt: skip


def _hand_dpo(c, r, c0, r0, lc, lr, beta):
    """−log σ(β·h), h = (c − c₀) − (r − r₀), written out on its own (not via flex)."""
    h = (c - c0) - (r - r0)
    return dict(loss=_softplus(-beta * h), chosen=beta * (c - c0), rejected=beta * (r - r0),
                dc=-beta * _sigmoid(-beta * h), dr=beta * _sigmoid(-beta * h))  # fmt: skip


def _hand_dpo_sft(c, r, c0, r0, lc, lr, beta, sft_weight):
    """DPO + λ·(−c/|y+|)."""
    h = (c - c0) - (r - r0)
    return dict(loss=_softplus(-beta * h) - sft_weight * c / lc, chosen=beta * (c - c0), rejected=beta * (r - r0),
                dc=-beta * _sigmoid(-beta * h) - sft_weight / lc, dr=beta * _sigmoid(-beta * h))  # fmt: skip


def _hand_ipo(c, r, c0, r0, lc, lr, beta):
    """(h̄ − 1/(2β))², h̄ = (c − c₀)/|y+| − (r − r₀)/|y−|; rewards as TRL logs them."""
    residual = (c - c0) / lc - (r - r0) / lr - 1 / (2 * beta)
    return dict(loss=residual**2, chosen=beta * (c - c0), rejected=beta * (r - r0),
                dc=2 * residual / lc, dr=-2 * residual / lr)  # fmt: skip


def _hand_slic(c, r, c0, r0, lc, lr, delta, sft_weight):
    """max(0, δ − c + r) − λ·c; the hinge's slope is 1 where δ − c + r > 0, else 0."""
    m = delta - c + r
    active = 1.0 if m > 0 else 0.0
    return dict(loss=max(0.0, m) - sft_weight * c, chosen=c, rejected=r, dc=-active - sft_weight, dr=active)


def _hand_hinge(c, r, c0, r0, lc, lr, beta):
    """max(0, 1 − β·h)."""
    z = beta * ((c - c0) - (r - r0))
    active = 1.0 if z < 1 else 0.0
    return dict(loss=max(0.0, 1 - z), chosen=beta * (c - c0), rejected=beta * (r - r0),
                dc=-beta * active, dr=beta * active)  # fmt: skip


def _hand_simpo(c, r, c0, r0, lc, lr, beta, gamma):
    """−log σ(β·c/|y+| − β·r/|y−| − γ); no reference."""
    z = beta * c / lc - beta * r / lr - gamma
    s = _sigmoid(-z)
    return dict(loss=_softplus(-z), chosen=beta * c / lc, rejected=beta * r / lr, dc=-beta * s / lc, dr=beta * s / lr)


def _hand(objective, pair, **hp) -> dict[str, float]:
    """Loss, every metric and both derivatives of one pair."""
    c, r, c0, r0, lc, lr = pair
    h = HAND[objective](c, r, c0, r0, lc, lr, **hp)
    return {
        "loss": h["loss"],
        "dc": h["dc"],
        "dr": h["dr"],
        "rewards/chosen": h["chosen"],
        "rewards/rejected": h["rejected"],
        "rewards/margins": h["chosen"] - h["rejected"],
        "rewards/accuracies": 1.0 if h["chosen"] > h["rejected"] else 0.0,
        "logps/chosen": c,
        "logps/rejected": r,
        "logps/chosen_per_token": c / lc,
        "logps/rejected_per_token": r / lr,
        "grads/chosen_logps": abs(h["dc"]),
        "grads/rejected_logps": abs(h["dr"]),
        "logratios/chosen": c - c0,
        "logratios/rejected": r - r0,
    }


HAND = {dpo: _hand_dpo, flex_dpo: _hand_flex_dpo, dpo_sft: _hand_dpo_sft, ipo: _hand_ipo, slic: _hand_slic,
        hinge: _hand_hinge, simpo: _hand_simpo}  # fmt: skip
# several hyper-parameter values per objective; the first is the function's own default
HYPER = {
    dpo:      [dict(beta=0.1), dict(beta=0.5), dict(beta=1.0), dict(beta=2.5)],
    flex_dpo: [dict(beta_chosen=0.1, beta_rejected=0.1), dict(beta_chosen=0.1, beta_rejected=0.05),
               dict(beta_chosen=0.5, beta_rejected=0.01), dict(beta_chosen=0.05, beta_rejected=0.3)],
    dpo_sft:  [dict(beta=0.1, sft_weight=1.0), dict(beta=0.5, sft_weight=0.3), dict(beta=2.0, sft_weight=0.0)],
    ipo:      [dict(beta=0.1), dict(beta=0.5), dict(beta=2.0)],
    slic:     [dict(delta=1.0, sft_weight=0.1), dict(delta=5.0, sft_weight=0.0), dict(delta=15.0, sft_weight=1.0)],
    hinge:    [dict(beta=0.1), dict(beta=0.5), dict(beta=2.0)],
    simpo:    [dict(beta=2.0, gamma=0.5), dict(beta=1.0, gamma=0.0), dict(beta=10.0, gamma=3.0)],
}  # fmt: skip
CASES = [pytest.param(fn, hp, id=f"{fn.__name__}-{'-'.join(f'{k}={v}' for k, v in hp.items())}")
         for fn, hps in HYPER.items() for hp in hps]  # fmt: skip


def _lp(pairs, dtype=torch.float64, requires_grad=False, reference=True) -> PairLogps:
    c, r, c0, r0, lc, lr = zip(*pairs)
    t = lambda v: torch.tensor(v, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return PairLogps(chosen=t(c), rejected=t(r), chosen_tokens=torch.tensor(lc), rejected_tokens=torch.tensor(lr),
                     ref_chosen=t(c0) if reference else None, ref_rejected=t(r0) if reference else None)  # fmt: skip


def _with(lp: PairLogps, c, r, c0, r0) -> PairLogps:
    return PairLogps(c, r, lp.chosen_tokens, lp.rejected_tokens, c0, r0)


# ── against hand computations ────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("objective, hp", CASES)
def test_matches_hand_computation(objective, hp):
    out = objective(_lp(PAIRS), **hp)
    assert out.losses.shape == out.dloss_dchosen.shape == out.dloss_drejected.shape == (len(PAIRS),)
    assert out.losses.dtype == torch.float64
    assert set(out.metrics) == METRICS | LOGRATIOS
    for i, pair in enumerate(PAIRS):
        want = _hand(objective, pair, **hp)
        assert out.losses[i].item() == pytest.approx(want["loss"], rel=1e-12, abs=1e-300), i
        assert out.dloss_dchosen[i].item() == pytest.approx(want["dc"], rel=1e-12, abs=1e-300), i
        assert out.dloss_drejected[i].item() == pytest.approx(want["dr"], rel=1e-12, abs=1e-300), i
        for name, tensor in out.metrics.items():
            assert tensor.shape == (len(PAIRS),), name
            assert tensor[i].item() == pytest.approx(want[name], rel=1e-12, abs=1e-12), (name, i)


@pytest.mark.parametrize("objective", list(HYPER))
def test_defaults(objective):
    """Each function's own defaults (DPO β = 0.1, SLiC δ = 1 and λ = 0.1, SimPO β = 2 and γ = 0.5, ...)."""
    lp = _lp(PAIRS)
    out = objective(lp)
    for i, pair in enumerate(PAIRS):
        assert out.losses[i].item() == pytest.approx(_hand(objective, pair, **HYPER[objective][0])["loss"], rel=1e-12, abs=1e-300)
    torch.testing.assert_close(out.losses, objective(lp, **HYPER[objective][0]).losses, rtol=0, atol=0)


def test_dpo_specific_values():
    """A few numbers written out in full, so a sign or factor slip can't cancel on both sides."""
    # h = 1.5, β = 0.1 → loss = log(1 + e^-0.15), ∂L/∂c = −0.1·σ(−0.15) = −0.1/(1 + e^0.15)
    out = dpo(_lp([PAIRS[0]]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.05)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.15)
    assert out.metrics["rewards/accuracies"].item() == 1.0
    assert out.metrics["logps/chosen_per_token"].item() == pytest.approx(-2.0)  # −10 over 5 tokens
    assert out.metrics["logps/rejected_per_token"].item() == pytest.approx(-12 / 7)
    assert out.dloss_dchosen.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), rel=1e-12)
    assert out.dloss_drejected.item() == pytest.approx(0.1 / (1 + math.exp(0.15)), rel=1e-12)
    # a tie: loss = log 2, accuracy 0 (chosen reward must be strictly larger), |∂L/∂c| = β/2
    tie = dpo(_lp([PAIRS[2]]), beta=0.7)
    assert tie.losses.item() == pytest.approx(math.log(2), rel=1e-12)
    assert tie.metrics["rewards/margins"].item() == 0.0
    assert tie.metrics["rewards/accuracies"].item() == 0.0
    assert tie.metrics["grads/chosen_logps"].item() == pytest.approx(0.35, rel=1e-12)
    # wrong order: accuracy 0, loss above log 2
    wrong = dpo(_lp([PAIRS[1]]), beta=0.1)
    assert wrong.metrics["rewards/accuracies"].item() == 0.0
    assert wrong.losses.item() == pytest.approx(math.log(1 + math.exp(0.3)), rel=1e-12)


def test_flex_dpo_specific_values():
    # c − c₀ = 1, r − r₀ = −0.5, β+ = 0.2, β− = 0.1 → z = 0.2 + 0.05 = 0.25
    out = flex_dpo(_lp([PAIRS[0]]), beta_chosen=0.2, beta_rejected=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.25)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.2, rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.05, rel=1e-12)
    assert out.dloss_dchosen.item() == pytest.approx(-0.2 / (1 + math.exp(0.25)), rel=1e-12)
    assert out.dloss_drejected.item() == pytest.approx(0.1 / (1 + math.exp(0.25)), rel=1e-12)
    assert out.metrics["grads/rejected_logps"].item() == pytest.approx(0.1 / (1 + math.exp(0.25)), rel=1e-12)


def test_dpo_sft_specific_values():
    # h = 1.5, β = 0.1, λ = 0.5, c = −10 over |y+| = 5 → loss = log(1 + e^-0.15) + 0.5·2
    out = dpo_sft(_lp([PAIRS[0]]), beta=0.1, sft_weight=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)) + 1.0, rel=1e-12)
    assert out.dloss_dchosen.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)) - 0.1, rel=1e-12)
    assert out.dloss_drejected.item() == pytest.approx(0.1 / (1 + math.exp(0.15)), rel=1e-12)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.15, rel=1e-12)  # DPO's rewards


def test_ipo_specific_values():
    # h̄ = 1/5 − (−0.5)/7 = 19/70; β = 0.5 → target 1, residual −51/70
    out = ipo(_lp([PAIRS[0]]), beta=0.5)
    assert out.losses.item() == pytest.approx(2601 / 4900, rel=1e-12)
    assert out.dloss_dchosen.item() == pytest.approx(-51 / 175, rel=1e-12)  # 2·(−51/70)/5
    assert out.dloss_drejected.item() == pytest.approx(51 / 245, rel=1e-12)  # −2·(−51/70)/7
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5, rel=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.25, rel=1e-12)


def test_slic_specific_values():
    # δ = 1, λ = 0.1. Margin not met: c = −4, r = −4.5 → max(0, 1 + 4 − 4.5) + 0.4 = 0.9.
    # Met: c = −4, r = −6 → 0 + 0.4. The reference is ignored (none given).
    lp = _lp([(-4.0, -4.5, 0.0, 0.0, 2, 3), (-4.0, -6.0, 0.0, 0.0, 2, 3)], reference=False)
    out = slic(lp, delta=1.0, sft_weight=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.9, 0.4], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert out.dloss_dchosen.tolist() == pytest.approx([-1.1, -0.1], rel=1e-12)
    assert out.dloss_drejected.tolist() == [1.0, 0.0]
    assert out.metrics["rewards/margins"].tolist() == [0.5, 2.0]  # the log-likelihood margin c − r


def test_hinge_specific_values():
    # h = 1.5: β = 0.5 → βh = 0.75 < 1, loss 0.25, slopes ∓β; β = 1 → βh = 1.5 ≥ 1, all 0
    active = hinge(_lp([PAIRS[0]]), beta=0.5)
    assert active.losses.item() == pytest.approx(0.25, rel=1e-12)
    assert (active.dloss_dchosen.item(), active.dloss_drejected.item()) == (-0.5, 0.5)
    met = hinge(_lp([PAIRS[0]]), beta=1.0)
    assert met.losses.item() == 0.0
    assert (met.dloss_dchosen.item(), met.dloss_drejected.item()) == (0.0, 0.0)
    assert met.metrics["rewards/margins"].item() == pytest.approx(1.5, rel=1e-12)


def test_simpo_specific_values():
    # c = −6 over 3 tokens, r = −12 over 4, β = 2, γ = 0.5 → z = −4 + 6 − 0.5 = 1.5
    out = simpo(_lp([(-6.0, -12.0, 0.0, 0.0, 3, 4)], reference=False), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == -4.0
    assert out.metrics["rewards/rejected"].item() == -6.0
    assert out.metrics["rewards/margins"].item() == 2.0  # γ is not part of the logged margin
    assert out.dloss_dchosen.item() == pytest.approx(-2 / 3 / (1 + math.exp(1.5)), rel=1e-12)
    assert out.dloss_drejected.item() == pytest.approx(2 / 4 / (1 + math.exp(1.5)), rel=1e-12)


@pytest.mark.parametrize("objective, hp", [(simpo, dict(beta=2.0, gamma=0.5)), (ipo, dict(beta=0.5)),
                                           (dpo_sft, dict(beta=0.1, sft_weight=1.0))])  # fmt: skip
def test_zero_lengths_count_as_one_token(objective, hp):
    """As TRL's `clamp(min=1)`: an empty response must not divide by 0."""
    pair = (-3.0, -5.0, -2.0, -6.0, 0, 0)
    out = objective(_lp([pair]), **hp)
    want = _hand(objective, (-3.0, -5.0, -2.0, -6.0, 1, 1), **hp)
    assert out.losses.item() == pytest.approx(want["loss"], rel=1e-12)
    assert out.metrics["logps/chosen_per_token"].item() == -3.0
    assert out.dloss_dchosen.item() == pytest.approx(want["dc"], rel=1e-12)


# ── large margins ────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [1e4, -1e4, 1e6, -1e6])
@pytest.mark.parametrize("objective, hp", [(dpo, dict(beta=0.1)), (flex_dpo, dict(beta_chosen=0.1, beta_rejected=0.3)),
                                           (simpo, dict(beta=0.1, gamma=5.0))])  # fmt: skip
def test_sigmoid_losses_large_margins_no_overflow(objective, hp, margin, dtype):
    """c = margin, r = r₀ = −50, c₀ = 0, one token each: z = 0.1·margin for all three
    (SimPO: 0.1·margin + 0.1·50 − 5)."""
    lp = PairLogps(*(torch.tensor([v], dtype=dtype, requires_grad=(i == 0)) for i, v in enumerate([margin, -50.0])),
                   torch.tensor([1]), torch.tensor([1]), torch.tensor([0.0], dtype=dtype), torch.tensor([-50.0], dtype=dtype))  # fmt: skip
    out = objective(lp, **hp)
    loss = out.losses.item()
    assert math.isfinite(loss)
    z = 0.1 * margin
    if margin > 0:
        assert loss == pytest.approx(0.0, abs=1e-30)
        assert out.metrics["rewards/accuracies"].item() == 1.0
    else:
        assert loss == pytest.approx(-z, rel=1e-6)  # −log σ(z) → −z for z ≪ 0
        assert out.metrics["rewards/accuracies"].item() == 0.0
    # the gradient stays finite too, and so does the closed form
    (grad,) = torch.autograd.grad(out.losses.sum(), lp.chosen)
    assert torch.isfinite(grad).all() and torch.isfinite(out.dloss_dchosen).all()
    assert grad.item() == pytest.approx(-0.1 * _sigmoid(-z), rel=1e-5, abs=1e-30)
    assert out.dloss_dchosen.item() == pytest.approx(-0.1 * _sigmoid(-z), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [1e4, -1e4, 1e6, -1e6])
@pytest.mark.parametrize("objective, hp", CASES)
def test_large_margins_match_hand(objective, hp, margin, dtype):
    pairs = [(margin, -50.0, 0.0, -50.0, 1, 1), (-50.0, margin, -50.0, 0.0, 3, 2)]
    out = objective(_lp(pairs, dtype=dtype), **hp)
    rel = 1e-6 if dtype == torch.float32 else 1e-12
    for i, pair in enumerate(pairs):
        want = _hand(objective, pair, **hp)
        for got, key in [(out.losses, "loss"), (out.dloss_dchosen, "dc"), (out.dloss_drejected, "dr")]:
            assert math.isfinite(got[i].item()), key
            assert got[i].item() == pytest.approx(want[key], rel=rel, abs=1e-30), (key, i)


# ── derivatives: closed form vs autograd ─────────────────────────────────────────────────────
def _autograd(objective, pairs, **hp):
    lp = _lp(pairs, requires_grad=True)
    out = objective(lp, **hp)
    grads = torch.autograd.grad(out.losses.sum(), (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected),
                                allow_unused=True)  # fmt: skip
    return out, grads


@pytest.mark.parametrize("objective, hp", CASES)
def test_closed_form_derivatives_match_autograd(objective, hp):
    out, (dc, dr, _, _) = _autograd(objective, PAIRS, **hp)
    torch.testing.assert_close(out.dloss_dchosen, dc, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(out.dloss_drejected, dr, rtol=1e-12, atol=1e-300)
    assert out.dloss_dchosen.abs().sum() > 0  # not a vacuous match


@pytest.mark.parametrize("objective, hp", [c for c in CASES if c.values[0] in (dpo, flex_dpo, ipo, hinge)])
def test_reference_enters_with_the_opposite_sign(objective, hp):
    """It is frozen in training, but the math says so: the loss depends on c − c₀ and r − r₀ only."""
    out, (dc, dr, dc0, dr0) = _autograd(objective, PAIRS, **hp)
    torch.testing.assert_close(dc0, -dc, rtol=0, atol=0)
    torch.testing.assert_close(dr0, -dr, rtol=0, atol=0)


# (c, r, c₀, r₀, |y+|, |y−|) either side of, and exactly at, the kinks
SLIC_KINK = [
    (-4.0, -4.5, 0.0, 0.0, 2, 3),  # δ=1: m = 0.5 > 0, active
    (-4.0, -6.0, 0.0, 0.0, 2, 3),  # m = −1, margin met
    (-2.0, -3.0, 0.0, 0.0, 4, 1),  # m = 0 exactly: the kink
    (-2.0, -3.0 + 1e-9, 0.0, 0.0, 4, 1),  # just active
    (-2.0, -3.0 - 1e-9, 0.0, 0.0, 4, 1),  # just met
]
HINGE_KINK = [  # β = 0.5: βh = 0.5·((c − c₀) − (r − r₀))
    (-1.0, -2.0, -1.5, -1.0, 4, 1),  # h = 0.5 + 1 = 1.5 → βh = 0.75: active
    (-1.0, -5.0, -1.5, -1.0, 4, 1),  # h = 4.5 → βh = 2.25: met
    (-1.0, -2.5, -1.5, -1.0, 4, 1),  # h = 2 → βh = 1 exactly: the kink
    (-1.0, -2.5 + 1e-9, -1.5, -1.0, 4, 1),  # just active
    (-1.0, -2.5 - 1e-9, -1.5, -1.0, 4, 1),  # just met
]


@pytest.mark.parametrize("objective, hp, pairs, active", [
    (slic, dict(delta=1.0, sft_weight=0.1), SLIC_KINK, [1, 0, 0, 1, 0]),
    (slic, dict(delta=1.0, sft_weight=0.0), SLIC_KINK, [1, 0, 0, 1, 0]),
    (hinge, dict(beta=0.5), HINGE_KINK, [1, 0, 0, 1, 0]),
])  # fmt: skip
def test_kinks_closed_form_matches_autograd(objective, hp, pairs, active):
    """Both sides of the hinge, and at the kink itself both take the slope 0 (relu's subgradient)."""
    out, (dc, dr, _, _) = _autograd(objective, pairs, **hp)
    torch.testing.assert_close(out.dloss_dchosen, dc, rtol=0, atol=0)
    torch.testing.assert_close(out.dloss_drejected, dr, rtol=0, atol=0)
    slope = hp.get("beta", 1.0)
    assert out.dloss_drejected.tolist() == [slope * a for a in active]
    assert out.dloss_dchosen.tolist() == pytest.approx([-slope * a - hp.get("sft_weight", 0.0) for a in active], rel=1e-12)


@pytest.mark.parametrize("objective, hp", CASES)
def test_gradcheck_float64(objective, hp):
    """Finite differences agree with autograd (PAIRS are far from the hinge kinks)."""
    lp = _lp(PAIRS)
    inputs = tuple(t.clone().requires_grad_(True) for t in (lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected))
    assert torch.autograd.gradcheck(lambda *x: objective(_with(lp, *x), **hp).losses, inputs)


@pytest.mark.parametrize("objective, hp", CASES)
def test_metrics_and_derivatives_are_detached(objective, hp):
    out = objective(_lp(PAIRS, requires_grad=True), **hp)
    assert out.losses.requires_grad
    for name, tensor in out.metrics.items():
        assert not tensor.requires_grad, name
    assert not out.dloss_dchosen.requires_grad and not out.dloss_drejected.requires_grad
    assert out.metrics["rewards/accuracies"].dtype == torch.float64
    assert set(out.metrics["rewards/accuracies"].tolist()) <= {0.0, 1.0}


# ── identities ───────────────────────────────────────────────────────────────────────────────
def _assert_same(a, b, ignore=frozenset()):
    torch.testing.assert_close(a.losses, b.losses, rtol=0, atol=0)
    torch.testing.assert_close(a.dloss_dchosen, b.dloss_dchosen, rtol=0, atol=0)
    torch.testing.assert_close(a.dloss_drejected, b.dloss_drejected, rtol=0, atol=0)
    assert set(a.metrics) - ignore == set(b.metrics) - ignore
    for name in set(a.metrics) - ignore:
        torch.testing.assert_close(a.metrics[name], b.metrics[name], rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_flex_dpo_with_equal_betas_is_dpo(beta):
    lp = _lp(PAIRS)
    _assert_same(flex_dpo(lp, beta_chosen=beta, beta_rejected=beta), dpo(lp, beta=beta))
    assert not torch.equal(flex_dpo(lp, beta_chosen=beta, beta_rejected=beta / 2).losses, dpo(lp, beta=beta).losses)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_dpo_sft_without_sft_is_dpo(beta):
    lp = _lp(PAIRS)
    _assert_same(dpo_sft(lp, beta=beta, sft_weight=0.0), dpo(lp, beta=beta))


@pytest.mark.parametrize("beta, sft_weight", [(0.1, 1.0), (0.5, 0.3), (2.0, 2.5)])
def test_dpo_sft_adds_the_chosen_mean_token_nll(beta, sft_weight):
    """Loss and ∂L/∂c differ from DPO's by λ·(−c/|y+|) and −λ/|y+|; ∂L/∂r and the rewards not at all."""
    lp = _lp(PAIRS)
    both, base = dpo_sft(lp, beta=beta, sft_weight=sft_weight), dpo(lp, beta=beta)
    for i, (c, _, _, _, lc, _) in enumerate(PAIRS):
        assert (both.losses - base.losses)[i].item() == pytest.approx(sft_weight * (-c / lc), rel=1e-12, abs=1e-12)
        assert (both.dloss_dchosen - base.dloss_dchosen)[i].item() == pytest.approx(-sft_weight / lc, rel=1e-12)
    torch.testing.assert_close(both.dloss_drejected, base.dloss_drejected, rtol=0, atol=0)
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        torch.testing.assert_close(both.metrics[name], base.metrics[name], rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.5, 0.25, 2.0])
def test_ipo_stops_at_its_target_margin(beta):
    """h̄ = 1/(2β) exactly: loss and both derivatives vanish (π(y−) stops falling). Past the target
    the derivatives flip: descent lowers c − c₀ and raises r − r₀ back towards it."""
    target = 1 / (2 * beta)  # exact in binary for these β
    # |y+| = 4, |y−| = 2: (c − c₀)/4 = 0.75·target, (r − r₀)/2 = −0.25·target
    at = (-10.0 + 3 * target, -20.0 - 0.5 * target, -10.0, -20.0, 4, 2)
    past = (-10.0 + 3 * target + 4.0, -20.0 - 0.5 * target, -10.0, -20.0, 4, 2)  # h̄ = target + 1
    short = (-10.0 + 3 * target - 4.0, -20.0 - 0.5 * target, -10.0, -20.0, 4, 2)  # h̄ = target − 1
    out, (dc, dr, _, _) = _autograd(ipo, [at, past, short], beta=beta)
    assert out.losses.tolist() == [0.0, 1.0, 1.0]
    assert (out.dloss_dchosen[0].item(), out.dloss_drejected[0].item()) == (0.0, 0.0)
    assert (dc[0].item(), dr[0].item()) == (0.0, 0.0)
    assert out.dloss_dchosen.tolist()[1:] == [0.5, -0.5]  # 2·(±1)/4
    assert out.dloss_drejected.tolist()[1:] == [-1.0, 1.0]  # −2·(±1)/2


@pytest.mark.parametrize("delta, sft_weight", [(1.0, 0.1), (3.0, 0.0), (0.5, 2.0)])
def test_slic_stops_pushing_rejected_once_the_margin_is_met(delta, sft_weight):
    """c − r ≥ δ: ∂L/∂r = 0 and the loss is the SFT term alone; below: ∂L/∂r = 1."""
    gaps = [delta + 0.5, delta + 30.0, delta - 0.25, delta - 10.0]
    pairs = [(-15.0, -15.0 - g, 0.0, 0.0, 3, 3) for g in gaps]
    out, (_, dr, _, _) = _autograd(slic, pairs, delta=delta, sft_weight=sft_weight)
    assert out.dloss_drejected.tolist() == [0.0, 0.0, 1.0, 1.0] == dr.tolist()
    assert out.losses[:2].tolist() == pytest.approx([15.0 * sft_weight] * 2, rel=1e-12, abs=1e-15)
    assert out.losses[2:].tolist() == pytest.approx([0.25 + 15.0 * sft_weight, 10.0 + 15.0 * sft_weight], rel=1e-12)
    assert out.dloss_dchosen.tolist() == pytest.approx([-sft_weight] * 2 + [-1 - sft_weight] * 2, rel=1e-12)


@pytest.mark.parametrize("objective", [simpo, slic], ids=lambda f: f.__name__)
def test_reference_free_methods_ignore_the_reference(objective):
    """No reference needed, and one given changes nothing but the logged log-ratios."""
    without, given = _lp(PAIRS, reference=False), _lp(PAIRS)
    assert set(objective(without).metrics) == METRICS
    _assert_same(objective(without), objective(given), ignore=LOGRATIOS)
    shifted = _with(given, given.chosen, given.rejected, given.ref_chosen + 3.0, given.ref_rejected - 7.0)
    _assert_same(objective(without), objective(shifted), ignore=LOGRATIOS)
    assert objective(shifted).metrics["logratios/chosen"].tolist() == [c - c0 - 3.0 for c, _, c0, *_ in PAIRS]


@pytest.mark.parametrize("objective", WITH_REFERENCE, ids=lambda f: f.__name__)
def test_reference_methods_raise_without_reference(objective):
    lp = _lp(PAIRS)
    for c0, r0 in [(None, None), (lp.ref_chosen, None), (None, lp.ref_rejected)]:
        with pytest.raises(ValueError, match="reference"):
            objective(_with(lp, lp.chosen, lp.rejected, c0, r0))


# ── binding from the config ──────────────────────────────────────────────────────────────────
BINDINGS = [  # (config with non-default values, function, the same values as keywords, config's defaults)
    (DPOMethod(beta=0.3), dpo, dict(beta=0.3), DPOMethod()),
    (IPOMethod(beta=0.7), ipo, dict(beta=0.7), IPOMethod()),
    (SLiCMethod(delta=3.0, sft_weight=0.5), slic, dict(delta=3.0, sft_weight=0.5), SLiCMethod()),
    (SLiCMethod(form="hinge", beta=0.4, delta=7.0, sft_weight=0.9), hinge, dict(beta=0.4), SLiCMethod(form="hinge")),
    (SimPOMethod(beta=3.0, gamma=1.0), simpo, dict(beta=3.0, gamma=1.0), SimPOMethod()),
    (FlexDPOMethod(beta_chosen=0.2, beta_rejected=0.02), flex_dpo, dict(beta_chosen=0.2, beta_rejected=0.02), FlexDPOMethod()),
    (DPOSFTMethod(beta=0.2, sft_weight=0.3), dpo_sft, dict(beta=0.2, sft_weight=0.3), DPOSFTMethod()),
]  # fmt: skip


@pytest.mark.parametrize("config, objective, hp, default", BINDINGS, ids=lambda x: getattr(x, "__name__", None))
def test_objective_for_binds_the_configs_hyper_parameters(config, objective, hp, default):
    lp = _lp(PAIRS)
    out = objective_for(config)(lp)
    _assert_same(out, objective(lp, **hp))
    for i, pair in enumerate(PAIRS):
        assert out.losses[i].item() == pytest.approx(_hand(objective, pair, **hp)["loss"], rel=1e-12, abs=1e-300)
    assert not torch.equal(out.losses, objective_for(default)(lp).losses)
    assert not torch.equal(out.losses, objective(lp).losses)


def test_objective_for_slic_ignores_beta_and_hinge_ignores_delta():
    lp = _lp(PAIRS)
    _assert_same(objective_for(SLiCMethod(beta=5.0))(lp), objective_for(SLiCMethod())(lp))
    _assert_same(objective_for(SLiCMethod(form="hinge", delta=9.0, sft_weight=0.0))(lp), objective_for(SLiCMethod(form="hinge"))(lp))


def test_objective_for_unknown_method():
    with pytest.raises(ValueError, match="nope"):
        objective_for(SimpleNamespace(type="nope"))
    with pytest.raises(ValueError, match="nope"):
        needs_reference(SimpleNamespace(type="nope"))


@pytest.mark.parametrize("config, needed", [
    (DPOMethod(), True), (IPOMethod(), True), (FlexDPOMethod(), True), (DPOSFTMethod(), True),
    (SLiCMethod(form="hinge"), True), (SLiCMethod(), False), (SLiCMethod(form="slic"), False), (SimPOMethod(), False),
    (RewardModelMethod(), False),
])  # fmt: skip
def test_needs_reference(config, needed):
    assert needs_reference(config) is needed
    # and it agrees with the objective: one that needs it raises without it, one that doesn't runs
    lp = _lp(PAIRS, reference=False)
    if needed:
        with pytest.raises(ValueError):
            objective_for(config)(lp)
    else:
        assert torch.isfinite(objective_for(config)(lp).losses).all()


# ── the reward model's Bradley–Terry loss ──────────────────────────────────────────────────────
# (r+, r−): the reward head's outputs; one tie, one wrong order, one large margin either way
REWARDS = [(1.5, -0.5), (-2.0, 1.0), (0.25, 0.25), (40.0, -3.0), (-30.0, 25.0)]


def _hand_bradley_terry(rc: float, rr: float, alpha: float | None) -> dict[str, float]:
    """−log σ(r+ − r−) [+ α(r+ + r−)²]; d/dr+ = −σ(r− − r+) [+ 2α(r+ + r−)], d/dr− = +σ(r− − r+) [+ ...]."""
    z = rc - rr
    loss, dc, dr = _softplus(-z), -_sigmoid(-z), _sigmoid(-z)
    if alpha is not None:
        loss += alpha * (rc + rr) ** 2
        dc += 2 * alpha * (rc + rr)
        dr += 2 * alpha * (rc + rr)
    return dict(loss=loss, dc=dc, dr=dr, accuracy=1.0 if rc > rr else 0.0, margin=z, mean_reward=(rc + rr) / 2)


def _rewards(requires_grad=False) -> PairLogps:
    rc, rr = zip(*REWARDS)
    t = lambda v: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)  # noqa: E731
    ones = torch.ones(len(REWARDS), dtype=torch.long)  # lengths: unused by the reward model
    return PairLogps(t(rc), t(rr), 7 * ones, 3 * ones)


@pytest.mark.parametrize("alpha", [None, 0.01, 0.5])
def test_bradley_terry_matches_hand_computation_and_autograd(alpha):
    lp = _rewards(requires_grad=True)
    out = bradley_terry(lp, center_rewards_coefficient=alpha)
    dc, dr = torch.autograd.grad(out.losses.sum(), (lp.chosen, lp.rejected))
    torch.testing.assert_close(out.dloss_dchosen, dc, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(out.dloss_drejected, dr, rtol=1e-12, atol=1e-300)
    for i, (rc, rr) in enumerate(REWARDS):
        want = _hand_bradley_terry(rc, rr, alpha)
        assert out.losses[i].item() == pytest.approx(want["loss"], rel=1e-12), i
        assert out.dloss_dchosen[i].item() == pytest.approx(want["dc"], rel=1e-12, abs=1e-300), i
        for name in ("accuracy", "margin", "mean_reward"):
            assert out.metrics[name][i].item() == pytest.approx(want[name], rel=1e-12, abs=1e-12), (name, i)
        # the DPO names carry the same numbers, so one plot holds both methods' curves
        assert out.metrics["rewards/accuracies"][i].item() == want["accuracy"]
        assert out.metrics["rewards/margins"][i].item() == pytest.approx(want["margin"], rel=1e-12, abs=1e-12)
        assert out.metrics["grads/chosen_rewards"][i].item() == pytest.approx(abs(want["dc"]), rel=1e-12, abs=1e-300)
    assert "logps/chosen" not in out.metrics  # rewards are not log-probs


def test_bradley_terry_is_dpo_on_the_reward_margin():
    """DPO's loss with β = 1 and a zero reference is Bradley–Terry on c, r (seed 003 eq. 2 vs 3)."""
    lp = _rewards()
    zero = torch.zeros(len(REWARDS), dtype=torch.float64)
    as_dpo = dpo(PairLogps(lp.chosen, lp.rejected, lp.chosen_tokens, lp.rejected_tokens, zero, zero), beta=1.0)
    out = objective_for(RewardModelMethod())(lp)
    torch.testing.assert_close(out.losses, as_dpo.losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.dloss_drejected, as_dpo.dloss_drejected, rtol=1e-12, atol=0)
    centred = objective_for(RewardModelMethod(center_rewards_coefficient=0.1))(lp)
    assert (centred.losses > out.losses).any()


# ── against TRL 1.16 ─────────────────────────────────────────────────────────────────────────
def _trl_sigmoid_expression(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """TRL 1.16.0's sigmoid DPO loss and reward metrics, copied verbatim from
    trl/trainer/dpo_trainer.py, `DPOTrainer._compute_loss`:
      l.1350-1351  chosen_logratios = chosen_logps - ref_chosen_logps
                   rejected_logratios = rejected_logps - ref_rejected_logps
      l.1353-1355  (f_divergence_type == "reverse_kl") chosen_scores = chosen_logratios, ...
      l.1383       delta_score = chosen_scores - rejected_scores
      l.1387-1388  if loss_type == "sigmoid": per_sequence_loss = -F.logsigmoid(self.beta * delta_score)
      l.1582-1595  chosen_rewards = self.beta * chosen_logratios.detach(); ... accuracies, margins
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta_score = chosen_logratios - rejected_logratios
    per_sequence_loss = -F.logsigmoid(beta * delta_score)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return per_sequence_loss, {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
    }


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_expression(beta):
    """Per pair, not only the batch mean."""
    lp = _lp(PAIRS)
    ours = dpo(lp, beta=beta)
    trl_loss, trl_metrics = _trl_sigmoid_expression(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, beta=beta)
    torch.testing.assert_close(ours.losses, trl_loss, rtol=1e-12, atol=1e-12)
    for name, value in trl_metrics.items():
        torch.testing.assert_close(ours.metrics[name].to(value.dtype), value, rtol=1e-12, atol=1e-12)


def _trl():
    pytest.importorskip("trl")
    import trl

    if trl.__version__ != "1.16.0":
        pytest.skip(f"stub written against trl 1.16.0, found {trl.__version__}")


def _trl_compute_loss(lp: PairLogps, beta: float, loss_types: list[str], loss_weights: list[float]):
    """Run TRL 1.16's real `DPOTrainer._compute_loss` (unbound, on a stub trainer and a stub model)
    and return its batch loss and logged metrics.

    Row i of the batch is [chosen_0..B-1, rejected_0..B-1]; its `completion_mask` is one prompt
    token then |y| completion tokens then padding, so both TRL's lengths — `completion_mask.sum`
    (IPO) and the shifted mask (SFT) — are |y|. The stub model's per-token log-probs are 0 except
    the first completion position, which holds the whole sequence log-prob: their sum over the
    row (TRL's `logps`) and over the masked positions (SFT's) are exactly c and r.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    B = len(lp.chosen)
    lengths = torch.cat([lp.chosen_tokens, lp.rejected_tokens])
    T = 1 + int(lengths.max())
    log_probs = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.cat([lp.chosen, lp.rejected])
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, 1 : 1 + n] = 1

    def model(**kwargs):
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(2 * B, T - 1),
            mean_logits=torch.zeros(2 * B, T - 1),
            is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool),
        )

    model.training = True
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, precompute_ref_logps=True,
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    inputs = {
        "input_ids": torch.ones(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": lp.ref_chosen,
        "ref_rejected_logps": lp.ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _assert_trl_metrics(ours, logged):
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"]:  # fmt: skip
        # TRL casts the accuracies to float32 (`.float()`, l.1590)
        rel = 1e-6 if name == "rewards/accuracies" else 1e-12
        assert ours.metrics[name].mean().item() == pytest.approx(logged[name], rel=rel, abs=1e-12), name


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_dpo_matches_trl_compute_loss(beta):
    """TRL reports the batch mean; ours are per pair."""
    _trl()
    lp = _lp(PAIRS)
    trl_loss, logged = _trl_compute_loss(lp, beta, ["sigmoid"], [1.0])
    ours = dpo(lp, beta=beta)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, rel=1e-12)
    _assert_trl_metrics(ours, logged)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_matches_trl_compute_loss(beta):
    """TRL's length-averaged IPO, with the lengths from `completion_mask` (all different here)."""
    _trl()
    lp = _lp(PAIRS)
    trl_loss, logged = _trl_compute_loss(lp, beta, ["ipo"], [1.0])
    ours = ipo(lp, beta=beta)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, rel=1e-12, abs=1e-12)
    _assert_trl_metrics(ours, logged)
    # the lengths matter: with every length 1 TRL's loss is another number
    assert trl_loss != pytest.approx(_trl_compute_loss(_lp([p[:4] + (1, 1) for p in PAIRS]), beta, ["ipo"], [1.0])[0])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge_matches_trl_compute_loss(beta):
    _trl()
    lp = _lp(PAIRS + HINGE_KINK)
    trl_loss, logged = _trl_compute_loss(lp, beta, ["hinge"], [1.0])
    ours = hinge(lp, beta=beta)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, rel=1e-12, abs=1e-12)
    _assert_trl_metrics(ours, logged)


@pytest.mark.parametrize("beta, sft_weight", [(0.1, 1.0), (0.5, 0.3)])
def test_dpo_sft_equals_trl_sigmoid_sft_when_chosen_lengths_are_equal(beta, sft_weight):
    _trl()
    lp = _lp([p[:4] + (6, p[5]) for p in PAIRS])  # every |y+| = 6; the |y−| still differ
    trl_loss, logged = _trl_compute_loss(lp, beta, ["sigmoid", "sft"], [1.0, sft_weight])
    ours = dpo_sft(lp, beta=beta, sft_weight=sft_weight)
    assert ours.losses.mean().item() == pytest.approx(trl_loss, rel=1e-12)
    _assert_trl_metrics(ours, logged)


@pytest.mark.parametrize("beta, sft_weight", [(0.1, 1.0), (0.5, 0.3)])
def test_dpo_sft_differs_from_trl_sigmoid_sft_when_chosen_lengths_differ(beta, sft_weight):
    """The documented difference: TRL's SFT term is the token mean over the whole batch,
    −Σc/Σ|y+|; ours is the mean over pairs of −c/|y+|."""
    _trl()
    lp = _lp(PAIRS)
    trl_loss, _ = _trl_compute_loss(lp, beta, ["sigmoid", "sft"], [1.0, sft_weight])
    dpo_mean = sum(_hand(dpo, p, beta=beta)["loss"] for p in PAIRS) / len(PAIRS)
    batch_nll = -sum(p[0] for p in PAIRS) / sum(p[4] for p in PAIRS)  # 43.75 / 21 = 2.0833
    assert trl_loss == pytest.approx(dpo_mean + sft_weight * batch_nll, rel=1e-12)
    pair_nll = sum(-p[0] / p[4] for p in PAIRS) / len(PAIRS)
    ours = dpo_sft(lp, beta=beta, sft_weight=sft_weight).losses.mean().item()
    assert ours == pytest.approx(dpo_mean + sft_weight * pair_nll, rel=1e-12)
    assert abs(ours - trl_loss) == pytest.approx(sft_weight * abs(pair_nll - batch_nll), rel=1e-9)
    assert pair_nll == pytest.approx(227 / 120, rel=1e-12)  # (2 + 2 + 10/3 + 1.625 + 0.5)/5 = 1.8917: a real difference


def _cpo_logits(per_token: list[list[float]]):
    """Logits and labels whose token log-probs under `CPOTrainer.get_batch_logps` are `per_token`:
    row i is one prompt token (label −100), then its tokens (label 1, logits [log(1 − e^q), q]),
    then padding (−100)."""
    T = 1 + max(len(q) for q in per_token)
    logits = torch.zeros(len(per_token), T, 2, dtype=torch.float64)
    labels = torch.full((len(per_token), T), -100, dtype=torch.long)
    for i, qs in enumerate(per_token):
        for t, q in enumerate(qs):
            logits[i, t] = torch.tensor([math.log(-math.expm1(q)), q], dtype=torch.float64)
            labels[i, t + 1] = 1
    return logits, labels


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (1.0, 0.0), (10.0, 3.0)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma):
    """TRL 1.16's CPOTrainer, loss_type="simpo", cpo_alpha=0: its real `get_batch_logps` averages
    token log-probs over the completion, `cpo_loss` and `get_batch_loss_metrics` (unbound, on a stub)
    give per-pair losses and rewards equal to ours from sums and lengths."""
    _trl()
    try:
        from trl.experimental.cpo import CPOTrainer
    except ImportError:  # older layouts
        from trl.trainer.cpo_trainer import CPOTrainer

    pairs = [(-6.0, -12.0, 0.0, 0.0, 3, 4)] + PAIRS[:4]
    # spread each sequence log-prob unevenly over its tokens (weights ∝ t + 1)
    per_token = []
    for index in (0, 1):
        for p in pairs:
            n, total = p[4 + index], p[index]
            per_token.append([total * (t + 1) / (n * (n + 1) / 2) for t in range(n)])
    logits, labels = _cpo_logits(per_token)
    average = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    B = len(pairs)
    ours = simpo(_lp(pairs, reference=False), beta=beta, gamma=gamma)
    torch.testing.assert_close(average[:B], ours.metrics["logps/chosen_per_token"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(average[B:], ours.metrics["logps/rejected_per_token"], rtol=1e-12, atol=1e-12)

    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                           cpo_alpha=0.0, aux_loss_enabled=False,
                           accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))  # fmt: skip
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, average[:B], average[B:])
    torch.testing.assert_close(ours.losses, losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.metrics["rewards/chosen"], chosen_rewards, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.metrics["rewards/rejected"], rejected_rewards, rtol=1e-12, atol=1e-12)

    stub.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(stub, c, r)
    stub.concatenated_forward = lambda model, batch: (average[:B], average[B:], logits[:B], logits[B:], torch.tensor(0.0))
    loss, metrics = CPOTrainer.get_batch_loss_metrics(stub, None, None)
    assert ours.losses.mean().item() == pytest.approx(loss.item(), rel=1e-12)
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        assert ours.metrics[name].mean().item() == pytest.approx(metrics[name], rel=1e-6 if "acc" in name else 1e-12), name
    # CPO logs the averaged log-probs as `logps/*`: those are our `logps/*_per_token`
    assert ours.metrics["logps/chosen_per_token"].mean().item() == pytest.approx(metrics["logps/chosen"], rel=1e-12)
    assert ours.metrics["logps/rejected_per_token"].mean().item() == pytest.approx(metrics["logps/rejected"], rel=1e-12)
