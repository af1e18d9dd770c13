"""A guard against the drastic drop (beyond the paper): watch the rejected responses' log-ratio
and act when it falls.

Seed 003 §3 shows DPO's likelihood of the rejected responses collapsing long before the chosen
ones move ("Drastic drop"), after which training degrades into unlearning. The guard watches
`logratios/rejected` = mean over the step's pairs of logp(y−) − ref_logp(y−) — the same pairs
under policy and reference, so unlike `logps/rejected` it does not jump with each batch's
lengths — and fires once, at the first step where either
- the mean fall over the last `window` steps exceeds `drop_per_step` nats per step, or
- it is below −`below_reference` nats (the policy gives the rejected responses e^X times less
  probability than the reference does).
Then it logs a warning naming the step and, by `action`, changes the objective for the rest of the
run: `lower_beta_rejected` multiplies β− by `factor` (Flex-DPO; DPO becomes Flex-DPO with
β+ = β), `raise_sft_weight` sets DPO+SFT's λ to `sft_weight` (DPO becomes DPO+SFT).
`guard_reason` and `guarded_method` are pure functions; `Guard` is the loop's state (the history,
fired once), saved in checkpoints.
"""

from __future__ import annotations

from typing import Any


def guard_reason(history: list[float], cfg: Any) -> str | None:
    """Why the guard fires on `history` (logratios/rejected per step so far, the current last), or None."""
    if not history:
        return None
    current = history[-1]
    if cfg.below_reference is not None and current < -cfg.below_reference:
        return f"logratios/rejected = {current:.2f} nats, below the reference by more than {cfg.below_reference:g}"
    if cfg.drop_per_step is not None and len(history) > cfg.window:
        fall = (history[-1 - cfg.window] - current) / cfg.window
        if fall > cfg.drop_per_step:
            return (f"logratios/rejected fell {fall:.2f} nats per step over the last {cfg.window} steps "
                    f"(limit {cfg.drop_per_step:g})")  # fmt: skip
    return None


def guarded_method(method: Any, cfg: Any) -> Any:
    """The method config for the rest of the run after the guard fired (unchanged for `warn`)."""
    from pipeline.config import DPOSFTMethod, FlexDPOMethod

    if cfg.action == "lower_beta_rejected":
        if method.type == "dpo":
            return FlexDPOMethod(beta_chosen=method.beta, beta_rejected=method.beta * cfg.factor)
        return method.model_copy(update={"beta_rejected": method.beta_rejected * cfg.factor})
    if cfg.action == "raise_sft_weight":
        if method.type == "dpo":
            return DPOSFTMethod(beta=method.beta, sft_weight=cfg.sft_weight)
        return method.model_copy(update={"sft_weight": max(method.sft_weight, cfg.sft_weight)})
    return method


class Guard:
    """The guard's state in the loop: the watched history, fired once."""

    def __init__(self, cfg, method):
        self.cfg, self.method, self.history, self.fired = cfg, method, [], False

    def update(self, metrics: dict[str, float], step: int) -> str | None:
        """The guard's message at `step` if it fires now (and `self.method` is then the new method)."""
        if self.fired:
            return None
        self.history.append(metrics["logratios/rejected"])
        reason = guard_reason(self.history, self.cfg)
        if reason is None:
            return None
        self.fired, before = True, self.method
        self.method = guarded_method(self.method, self.cfg)
        changed = "" if self.method == before else f"; method from now on: {self.method.model_dump()}"
        return f"{reason}; action {self.cfg.action}{changed}"

    def state(self) -> dict:
        return {"history": self.history, "fired": self.fired, "method": self.method.model_dump()}

    def load(self, state: dict) -> None:
        from pipeline.config import TrainConfig

        self.history, self.fired = list(state["history"]), bool(state["fired"])
        self.method = TrainConfig.model_validate({"method": state["method"]}).method
