"""The train guard (stages/train/guard.py): fires on a drastic drop of logratios/rejected, not on a
flat or noisy-flat curve, and changes the method as its action says."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from pipeline.config import DPOMethod, DPOSFTMethod, FlexDPOMethod, GuardConfig, IPOMethod, SimPOMethod, TrainConfig
from stages.train.guard import Guard, guard_reason, guarded_method


def _first_fire(series: list[float], cfg: GuardConfig) -> int | None:
    """The 1-based step at which the guard fires on `series`, as the loop feeds it."""
    for step in range(1, len(series) + 1):
        if guard_reason(series[:step], cfg):
            return step
    return None


def test_fires_on_a_drastic_drop_at_the_first_step_over_the_limit():
    # flat for 6 steps, then −3 nats per step: the mean fall over a window of 3 first exceeds 2 nats/step
    # when the window holds 3 falling steps (fall = 9/3 = 3 > 2); with 2 of 3 it is 6/3 = 2, not over.
    series = [0.0] * 6 + [-3.0 * k for k in range(1, 8)]
    cfg = GuardConfig(drop_per_step=2.0, window=3)
    assert _first_fire(series, cfg) == 9
    assert "fell 3.00 nats per step over the last 3 steps" in guard_reason(series[:9], cfg)


def test_does_not_fire_on_flat_or_noisy_curves():
    cfg = GuardConfig(drop_per_step=2.0, window=3)
    assert _first_fire([0.0] * 50, cfg) is None
    noisy = [1.5 * math.sin(k) for k in range(50)]  # swings of ±1.5 nats, no trend
    assert _first_fire(noisy, cfg) is None
    slow = [-0.5 * k for k in range(50)]  # a steady fall of 0.5 nats per step: under the limit
    assert _first_fire(slow, cfg) is None


def test_below_reference():
    cfg = GuardConfig(drop_per_step=None, below_reference=10.0)
    assert _first_fire([-1.0, -5.0, -9.9, -10.5, -20.0], cfg) == 4
    assert _first_fire([-1.0, -5.0, -9.9], cfg) is None


def test_both_off_never_fires():
    assert _first_fire([0.0, -100.0, -1000.0], GuardConfig(drop_per_step=None, below_reference=None)) is None


def test_actions_change_the_method():
    lower = GuardConfig(action="lower_beta_rejected", factor=0.25)
    assert guarded_method(DPOMethod(beta=0.2), lower) == FlexDPOMethod(beta_chosen=0.2, beta_rejected=0.05)
    assert guarded_method(FlexDPOMethod(beta_chosen=0.1, beta_rejected=0.08), lower) == FlexDPOMethod(
        beta_chosen=0.1, beta_rejected=0.02)  # fmt: skip
    raise_ = GuardConfig(action="raise_sft_weight", sft_weight=2.0)
    assert guarded_method(DPOMethod(beta=0.1), raise_) == DPOSFTMethod(beta=0.1, sft_weight=2.0)
    assert guarded_method(DPOSFTMethod(beta=0.1, sft_weight=0.5), raise_).sft_weight == 2.0
    assert guarded_method(IPOMethod(), GuardConfig(action="warn")) == IPOMethod()


def test_loop_guard_fires_once_and_hands_over_the_new_method():
    guard = Guard(GuardConfig(drop_per_step=1.0, window=1, action="lower_beta_rejected", factor=0.5), DPOMethod(beta=0.1))
    messages = [guard.update({"logratios/rejected": v}, step) for step, v in enumerate([0.0, -0.5, -3.0, -9.0], 1)]
    assert messages[:2] == [None, None] and messages[3] is None  # once, at step 3
    assert "fell 2.50 nats per step" in messages[2] and "lower_beta_rejected" in messages[2]
    assert guard.method == FlexDPOMethod(beta_chosen=0.1, beta_rejected=0.05)


def test_config_rejects_a_guard_without_reference_or_with_a_foreign_action():
    with pytest.raises(ValidationError, match="no reference model"):
        TrainConfig(method=SimPOMethod(), guard=GuardConfig())
    with pytest.raises(ValidationError, match="applies to dpo and flex_dpo, not ipo"):
        TrainConfig(method=IPOMethod(), guard=GuardConfig(action="lower_beta_rejected"))
    assert TrainConfig(method=IPOMethod(), guard=GuardConfig(action="warn")).guard.action == "warn"
