"""Tests for stages/train/objectives.py: DPO loss and metrics against float64 hand computations
(plain `math`) and against TRL 1.16's own sigmoid-loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DPOMethod
from stages.train.objectives import dpo, needs_reference, objective_for

# (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps): hand-picked pairs
PAIRS = [
    (-10.0, -12.0, -11.0, -11.5),  # h = 1 - (-0.5) = 1.5: right order
    (-20.0, -8.0, -19.0, -10.0),  # h = -1 - 2 = -3: wrong order
    (-10.0, -5.0, -12.0, -7.0),  # h = 2 - 2 = 0: tie
    (-3.25, -40.5, -3.0, -39.0),  # h = -0.25 + 1.5 = 1.25
    (-0.5, -100.0, -7.0, -2.0),  # h = 6.5 + 98 = 104.5: large
]


def _softplus(x: float) -> float:
    """log(1 + exp(x)), evaluated without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _hand(c: float, r: float, rc: float, rr: float, beta: float) -> dict[str, float]:
    h = (c - rc) - (r - rr)
    return {
        "loss": _softplus(-beta * h),  # -log σ(βh) = log(1 + exp(-βh))
        "rewards/chosen": beta * (c - rc),
        "rewards/rejected": beta * (r - rr),
        "rewards/margins": beta * h,
        "rewards/accuracies": 1.0 if beta * (c - rc) > beta * (r - rr) else 0.0,
        "logps/chosen": c,
        "logps/rejected": r,
    }


def _tensors(pairs, dtype=torch.float64, requires_grad=False):
    cols = list(zip(*pairs))
    return [torch.tensor(col, dtype=dtype, requires_grad=requires_grad) for col in cols]


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.5])
def test_dpo_matches_hand_computation(beta):
    out = dpo(*_tensors(PAIRS), beta=beta)
    assert out.losses.shape == (len(PAIRS),)
    assert out.losses.dtype == torch.float64
    assert set(out.metrics) == {
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected",
    }  # fmt: skip
    for i, pair in enumerate(PAIRS):
        want = _hand(*pair, beta=beta)
        assert out.losses[i].item() == pytest.approx(want["loss"], rel=1e-12, abs=1e-300)
        for name, tensor in out.metrics.items():
            assert tensor.shape == (len(PAIRS),), name
            assert tensor[i].item() == pytest.approx(want[name], rel=1e-12, abs=1e-12), (name, i)


def test_specific_values():
    """A few numbers written out in full, so a sign or factor slip can't cancel on both sides."""
    # h = 1.5, beta = 0.1 → loss = log(1 + e^-0.15)
    out = dpo(*_tensors([PAIRS[0]]), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.05)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.15)
    assert out.metrics["rewards/accuracies"].item() == 1.0
    # a tie: loss = log 2, accuracy 0 (chosen reward must be strictly larger)
    tie = dpo(*_tensors([PAIRS[2]]), beta=0.7)
    assert tie.losses.item() == pytest.approx(math.log(2), rel=1e-12)
    assert tie.metrics["rewards/margins"].item() == 0.0
    assert tie.metrics["rewards/accuracies"].item() == 0.0
    # wrong order: accuracy 0, loss above log 2
    wrong = dpo(*_tensors([PAIRS[1]]), beta=0.1)
    assert wrong.metrics["rewards/accuracies"].item() == 0.0
    assert wrong.losses.item() == pytest.approx(math.log(1 + math.exp(0.3)), rel=1e-12)


def test_default_beta_is_0_1():
    t = _tensors(PAIRS)
    torch.testing.assert_close(dpo(*t).losses, dpo(*t, beta=0.1).losses, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [1e4, -1e4, 1e6, -1e6])
def test_large_margins_no_overflow(margin, dtype):
    beta = 0.1
    # h = margin: chosen logp ratio carries it all
    c, r = torch.tensor([margin], dtype=dtype), torch.tensor([-50.0], dtype=dtype)
    rc, rr = torch.tensor([0.0], dtype=dtype), torch.tensor([-50.0], dtype=dtype)
    out = dpo(c, r, rc, rr, beta=beta)
    loss = out.losses.item()
    assert math.isfinite(loss)
    if margin > 0:
        assert loss == pytest.approx(0.0, abs=1e-30)
        assert out.metrics["rewards/accuracies"].item() == 1.0
    else:
        # -log σ(x) → -x for x ≪ 0
        assert loss == pytest.approx(-beta * margin, rel=1e-6)
        assert out.metrics["rewards/accuracies"].item() == 0.0
    # the gradient stays finite too
    c.requires_grad_(True)
    dpo(c, r, rc, rr, beta=beta).losses.sum().backward()
    assert torch.isfinite(c.grad).all()
    want = -beta * _sigmoid(-beta * margin)
    assert c.grad.item() == pytest.approx(want, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_gradients_match_analytic(beta):
    c, r, rc, rr = _tensors(PAIRS, requires_grad=True)
    dpo(c, r, rc, rr, beta=beta).losses.sum().backward()
    for i, (ci, ri, rci, rri) in enumerate(PAIRS):
        h = (ci - rci) - (ri - rri)
        w = beta * _sigmoid(-beta * h)
        assert c.grad[i].item() == pytest.approx(-w, rel=1e-12, abs=1e-300)
        assert r.grad[i].item() == pytest.approx(+w, rel=1e-12, abs=1e-300)
        # the reference enters with the opposite sign (it is frozen in training, but the math says so)
        assert rc.grad[i].item() == pytest.approx(+w, rel=1e-12, abs=1e-300)
        assert rr.grad[i].item() == pytest.approx(-w, rel=1e-12, abs=1e-300)


def test_gradcheck_float64():
    t = _tensors(PAIRS, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: dpo(*x, beta=0.3).losses, t)


def test_metrics_are_detached():
    c, r, rc, rr = _tensors(PAIRS, requires_grad=True)
    out = dpo(c, r, rc, rr, beta=0.1)
    assert out.losses.requires_grad
    for name, tensor in out.metrics.items():
        assert not tensor.requires_grad, name
    assert out.metrics["rewards/accuracies"].dtype == torch.float64


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
def test_matches_trl_expression(beta):
    t = _tensors(PAIRS)
    ours = dpo(*t, beta=beta)
    trl_loss, trl_metrics = _trl_sigmoid_expression(*t, beta=beta)
    torch.testing.assert_close(ours.losses, trl_loss, rtol=1e-12, atol=1e-12)
    for name, value in trl_metrics.items():
        torch.testing.assert_close(ours.metrics[name].to(value.dtype), value, rtol=1e-12, atol=1e-12)


def test_matches_trl_compute_loss():
    """Run TRL 1.16's real `DPOTrainer._compute_loss` (unbound, on a stub trainer and a stub model
    whose per-token log-probs sum to the given sequence log-probs) and compare loss and metrics.
    TRL reports the batch mean; ours are per pair."""
    pytest.importorskip("trl")
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    if trl.__version__ != "1.16.0":
        pytest.skip(f"stub written against trl 1.16.0, found {trl.__version__}")

    beta = 0.25
    c, r, rc, rr = _tensors(PAIRS)
    B, T = len(PAIRS), 4
    log_probs = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    log_probs[:, 0] = torch.cat([c, r])  # the sum over the sequence is the sequence log-prob

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
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )  # fmt: skip
    completion_mask = torch.tensor([[0, 1, 1, 1]] * (2 * B))
    inputs = {
        "input_ids": torch.ones(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    ours = dpo(c, r, rc, rr, beta=beta)
    assert ours.losses.mean().item() == pytest.approx(float(trl_loss), rel=1e-12)
    logged = trainer._metrics["train"]
    for name in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"]:  # fmt: skip
        # TRL casts the accuracies to float32 (`.float()`, l.1590)
        rel = 1e-6 if name == "rewards/accuracies" else 1e-12
        assert ours.metrics[name].mean().item() == pytest.approx(logged[name][-1], rel=rel, abs=1e-12), name


# ── binding from the config ──────────────────────────────────────────────────────────────────
def test_objective_for_binds_beta():
    t = _tensors(PAIRS)
    objective = objective_for(DPOMethod(beta=0.3))
    out = objective(*t)
    torch.testing.assert_close(out.losses, dpo(*t, beta=0.3).losses, rtol=0, atol=0)
    for i, pair in enumerate(PAIRS):
        assert out.losses[i].item() == pytest.approx(_hand(*pair, beta=0.3)["loss"], rel=1e-12)
    assert not torch.allclose(out.losses, dpo(*t, beta=0.1).losses)
    assert out.metrics["rewards/margins"][0].item() == pytest.approx(0.3 * 1.5)


def test_objective_for_unknown_method():
    with pytest.raises(ValueError, match="nope"):
        objective_for(SimpleNamespace(type="nope"))


def test_dpo_needs_reference():
    assert needs_reference(DPOMethod())
    assert not needs_reference(SimpleNamespace(type="simpo"))
