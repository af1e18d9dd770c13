"""The toy model (stages/evaluate/toy.py, pipeline/toy.py): the mechanics exactly, the claims as found."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.toy import claims_table, write_toy
from stages.evaluate import toy
from stages.evaluate.toy import COLUMNS, METHODS, REJECTED, SCENARIOS, UNSEEN, ToyConfig

CLAIMS = {"s1_chosen_rises_then_falls", "rejected_below_1pct", "unseen_grows", "s1_highest_peak", "s1_least_unseen",
          "flex_slows_rejected", "sft_keeps_chosen"}  # fmt: skip
SHORT = ToyConfig(sft_steps=200, steps=30)  # mechanics only: seconds, not the claims


@pytest.fixture(scope="module")
def sft_models() -> dict[int, torch.nn.Module]:
    return {s: toy.sft_fit(s, ToyConfig(), seed=0) for s in SCENARIOS}


def _logit_grads(method: str, sft: torch.nn.Module, cfg: ToyConfig = ToyConfig()) -> torch.Tensor:
    """∂loss/∂logits [4, 10] at the SFT model, which is also the reference."""
    with torch.no_grad():
        logits = sft(toy.prompts())
    logits.requires_grad_(True)
    toy.policy_loss(method, logits, F.log_softmax(logits, -1).detach(), cfg).backward()
    return logits.grad


# ── the mechanics ────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sft_fits_each_scenarios_hand_set_distribution(sft_models, scenario):
    cfg = ToyConfig()
    with torch.no_grad():
        probs = F.softmax(sft_models[scenario](toy.prompts()), -1)
    torch.testing.assert_close(probs, toy.target_distribution(scenario, cfg), atol=1e-6, rtol=0)
    chosen_level, rejected_level = SCENARIOS[scenario]
    level = {"high": cfg.p_high, "low": cfg.p_low}
    m = toy.mass(probs)
    assert m["chosen"] == pytest.approx(level[chosen_level], abs=1e-6)  # on-policy high, off-policy low
    assert m["rejected"] == pytest.approx(4 * level[rejected_level], abs=1e-6)


def test_dpo_gradient_at_the_reference_is_the_hand_value_and_touches_only_the_pairs(sft_models):
    # at π = π_ref, h = 0 and σ(−βh) = ½: each pair pulls its chosen logit by −β·½ and pushes its rejected
    # logit by +β·½, over 16 pairs (4 per prompt); log π(y+) − log π(y−) is a logit difference, so no other
    # logit gets a gradient: what moves the unseen responses is the shared MLP, not the loss
    cfg = ToyConfig()
    grad = _logit_grads("dpo", sft_models[1], cfg)
    expected = torch.zeros(4, 10, dtype=torch.float64)
    expected[range(4), range(4)] = -cfg.beta * 0.5 * 4 / 16
    expected[:, list(REJECTED)] = cfg.beta * 0.5 / 16
    torch.testing.assert_close(grad, expected)


def test_flex_dpo_gradient_is_the_hand_value_with_an_sft_like_pull_on_every_logit(sft_models):
    # β+·log π(y+) − β−·log π(y−) = β+·z+ − β−·z− − (β+ − β−)·logsumexp(z): with β+ ≠ β− the normaliser stays,
    # so at π = π_ref each pair's ½·∂/∂z_k is −½·(β+·1[k=y+] − β−·1[k=y−] − (β+ − β−)·π_k), over 16 pairs
    cfg = ToyConfig()
    grad = _logit_grads("flex_dpo", sft_models[1], cfg)
    probs = F.softmax(sft_models[1](toy.prompts()), -1).detach()
    expected = (cfg.beta - cfg.beta_rejected) * probs * 0.5 * 4 / 16
    expected[range(4), range(4)] -= cfg.beta * 0.5 * 4 / 16
    expected[:, list(REJECTED)] += cfg.beta_rejected * 0.5 / 16
    torch.testing.assert_close(grad, expected)
    assert (grad[range(4), range(4)] < 0).all() and (grad[:, list(REJECTED)] > 0).all()


def test_sft_term_raises_the_chosen_logit_and_lowers_the_rest(sft_models):
    sft_term = _logit_grads("dpo_sft", sft_models[2]) - _logit_grads("dpo", sft_models[2])
    probs = F.softmax(sft_models[2](toy.prompts()), -1).detach()
    expected = ToyConfig().sft_weight * probs * 4 / 16  # −∂/∂z log softmax(z)_c = 1[k=c] − π_k, 4 pairs per prompt
    expected[range(4), range(4)] -= ToyConfig().sft_weight * 4 / 16
    torch.testing.assert_close(sft_term, expected)
    assert (sft_term[range(4), range(4)] < 0).all()


def test_bradley_terry_pulls_chosen_rewards_up_and_rejected_down_only():
    rewards = torch.zeros(4, 10, dtype=torch.float64, requires_grad=True)
    toy.rm_loss(rewards).backward()
    assert (rewards.grad[range(4), range(4)] < 0).all()
    assert (rewards.grad[:, list(REJECTED)] > 0).all()
    assert (rewards.grad[:, list(UNSEEN)] == 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_first_step_raises_chosen_and_lowers_rejected_but_dpo_sft_s4(sft_models, method, scenario):
    # Not a law (through shared layers a step moves every logit; the logit gradients above are the exact part),
    # but what the first step does, with one exception: DPO+SFT in S4 raises the rejected mass (0.0800 → 0.0805).
    # Its SFT term (λ = 1 against DPO's β·½ = 0.05) lowers each logit in proportion to its probability, and in
    # S4 the other responses hold 0.18 each against the rejected's 0.02: the rejected ones' share grows.
    before, after = toy.train(method, scenario, sft_models[scenario], ToyConfig(steps=1), seed=0)
    assert after["chosen"] > before["chosen"]
    if (method, scenario) != ("dpo_sft", 4):
        assert after["rejected"] < before["rejected"]


def test_rm_implied_policy_starts_at_the_sft_model(sft_models):
    first = {m: toy.train(m, 3, sft_models[3], ToyConfig(steps=1), seed=0)[0] for m in ("dpo", "rm")}
    for col in ("chosen", "rejected", "unseen", "outside"):
        assert first["rm"][col] == pytest.approx(first["dpo"][col], abs=1e-12)


def test_mass_bookkeeping_on_a_hand_made_distribution():
    probs = torch.full((4, 10), 0.1, dtype=torch.float64)
    probs[0] = torch.tensor([0.5, 0.1, 0, 0, 0.1, 0.1, 0, 0, 0.2, 0], dtype=torch.float64)
    m = toy.mass(probs)
    assert m["chosen"] == pytest.approx((0.5 + 0.1 * 3) / 4)
    assert m["rejected"] == pytest.approx((0.2 + 0.4 * 3) / 4)
    assert m["unseen"] == pytest.approx((0.2 + 0.2 * 3) / 4)
    assert m["outside"] == pytest.approx((0.3 + 0.5 * 3) / 4)


def test_curves_are_probability_masses_that_add_up():
    curves = toy.run_toy(SHORT, seed=0)
    assert list(curves.columns) == COLUMNS
    total = curves.chosen + curves.rejected + curves.outside
    assert (total - 1).abs().max() < 1e-12
    assert (curves.unseen <= curves.outside + 1e-12).all()
    assert ((curves[["chosen", "rejected", "unseen", "outside"]] >= 0).all()).all()
    assert set(curves.method) == set(METHODS) and set(curves.scenario) == set(SCENARIOS)
    assert sorted(curves.step.unique()) == list(range(SHORT.steps + 1))


def test_same_seed_same_files_other_seed_other_curves_global_rng_untouched(tmp_path):
    rng = torch.get_rng_state()
    write_toy(tmp_path / "a", seed=0, cfg=SHORT)
    write_toy(tmp_path / "b", seed=0, cfg=SHORT)
    write_toy(tmp_path / "c", seed=1, cfg=SHORT)
    assert torch.equal(torch.get_rng_state(), rng)
    for name in ("curves.csv", "claims.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "curves.csv").read_bytes() != (tmp_path / "c" / "curves.csv").read_bytes()


# ── the claim logic, on hand-made curves ─────────────────────────────────────────────────────
def _curves(**overrides: list[float]) -> pd.DataFrame:
    """3-step curves for every scenario and method, flat unless overridden: `s1_dpo_chosen=[...]`."""
    flat = {"chosen": [0.2] * 3, "rejected": [0.4] * 3, "unseen": [0.1] * 3}
    rows = []
    for s in SCENARIOS:
        for m in METHODS:
            cols = {c: overrides.get(f"s{s}_{m}_{c}", v) for c, v in flat.items()}
            for step in range(3):
                row = {c: cols[c][step] for c in cols}
                rows.append({"scenario": s, "method": m, "step": step, **row, "outside": 1 - row["chosen"] - row["rejected"]})
    return pd.DataFrame(rows, columns=COLUMNS)


@pytest.mark.parametrize(("chosen", "holds"), [([0.2, 0.5, 0.3], True), ([0.2, 0.3, 0.4], False),
                                               ([0.2, 0.15, 0.1], False), ([0.2, 0.205, 0.1], False)])  # fmt: skip
def test_rises_then_falls_needs_both(chosen, holds):
    assert toy.claims(_curves(s1_dpo_chosen=chosen))["s1_chosen_rises_then_falls"]["holds"] is holds


def test_rejected_below_1pct_needs_every_scenario():
    falling = {f"s{s}_dpo_rejected": [0.4, 0.1, 0.003] for s in SCENARIOS}
    assert toy.claims(_curves(**falling))["rejected_below_1pct"]["holds"] is True
    falling["s3_dpo_rejected"] = [0.4, 0.1, 0.005]  # 1.25% of its start
    assert toy.claims(_curves(**falling))["rejected_below_1pct"]["holds"] is False


def test_unseen_grows_in_one_scenario_is_enough_and_a_transient_rise_is_not():
    assert toy.claims(_curves(s4_dpo_unseen=[0.1, 0.1, 0.2]))["unseen_grows"]["holds"] is True
    found = toy.claims(_curves(s2_dpo_unseen=[0.1, 0.3, 0.0]))["unseen_grows"]
    assert found["holds"] is False and found["unseen_peak"][2] == 0.3  # a rise that does not last is reported, not counted


def test_s1_comparisons_are_strict():
    assert toy.claims(_curves(s1_dpo_chosen=[0.2, 0.9, 0.5]))["s1_highest_peak"]["holds"] is True
    assert toy.claims(_curves())["s1_highest_peak"]["holds"] is False  # a four-way tie is no "highest"
    assert toy.claims(_curves(s1_dpo_unseen=[0.1, 0.1, 0.05]))["s1_least_unseen"]["holds"] is True
    assert toy.claims(_curves(s3_dpo_unseen=[0.1, 0.1, 0.05]))["s1_least_unseen"]["holds"] is False


def test_flex_slows_rejected_compares_halving_steps():
    fast = {f"s{s}_dpo_rejected": [0.4, 0.1, 0.0] for s in SCENARIOS}
    slow = {f"s{s}_flex_dpo_rejected": [0.4, 0.3, 0.1] for s in SCENARIOS}
    assert toy.claims(_curves(**fast, **slow))["flex_slows_rejected"]["holds"] is True
    never = {f"s{s}_flex_dpo_rejected": [0.4, 0.4, 0.4] for s in SCENARIOS}
    found = toy.claims(_curves(**fast, **never))["flex_slows_rejected"]
    assert found["holds"] is True and found["halving_step_flex_dpo"][1] is None  # never halved: slower than any step
    assert toy.claims(_curves(**fast, **{**slow, "s2_flex_dpo_rejected": [0.4, 0.1, 0.0]}))["flex_slows_rejected"]["holds"] is False


def test_sft_keeps_chosen_fails_on_a_dip():
    assert toy.claims(_curves(s2_dpo_sft_chosen=[0.2, 0.195, 0.6]))["sft_keeps_chosen"]["holds"] is True  # within 5%
    assert toy.claims(_curves(s2_dpo_sft_chosen=[0.2, 0.15, 0.6]))["sft_keeps_chosen"]["holds"] is False


def test_claims_table_has_one_row_per_claim():
    table = claims_table(toy.claims(_curves()))
    assert table.splitlines()[0] == "| claim | holds | numbers |"
    assert len(table.splitlines()) == 2 + len(CLAIMS)


# ── the command, with the defaults: what it writes and what it found ─────────────────────────
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["toy", "--out", str(out)]) == 0
    return out, stdout.getvalue()


def test_cli_writes_curves_claims_figures_and_notes(toy_run):
    out, printed = toy_run
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.columns) == ["scenario", "method", "step", "chosen", "rejected", "unseen", "outside"]
    assert set(curves.method) == {"dpo", "flex_dpo", "dpo_sft", "rm"}
    assert set(curves.scenario) == {1, 2, 3, 4}
    found = json.loads((out / "claims.json").read_text())
    assert set(found) == CLAIMS
    assert all(isinstance(c["holds"], bool) for c in found.values())
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["toy_dpo_scenarios.png", "toy_regularisers.png", "toy_rm.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    assert "| claim | holds | numbers |" in (out / "toy.md").read_text()
    assert "| claim | holds | numbers |" in printed and str(out) in printed


@pytest.mark.parametrize("claim", ["s1_chosen_rises_then_falls", "rejected_below_1pct", "s1_highest_peak",
                                   "s1_least_unseen", "flex_slows_rejected", "sft_keeps_chosen"])  # fmt: skip
def test_claim_reproduces_with_the_defaults(toy_run, claim):
    assert json.loads((toy_run[0] / "claims.json").read_text())[claim]["holds"] is True


def test_unseen_does_not_grow_with_the_defaults_a_finding(toy_run):
    # A finding, not a bug: DPO drives the unseen responses 9-10 to ~0 in every scenario; the mass freed
    # from the rejected responses goes to the *other prompts'* chosen responses (`outside` grows in S1, S2).
    # Only a transient rise appears (S2, first ~50 steps). The check: the numbers say "no" on their own.
    out = toy_run[0]
    found = json.loads((out / "claims.json").read_text())["unseen_grows"]
    assert found["holds"] is False
    curves = pd.read_csv(out / "curves.csv")
    dpo = curves[curves.method == "dpo"].sort_values("step").groupby("scenario")
    start, final = dpo.unseen.first(), dpo.unseen.last()
    assert (final <= start * 1.05).all()
    assert final.to_dict() == pytest.approx({s: found["unseen_final"][str(s)] for s in SCENARIOS}, rel=1e-3)
    outside = dpo.outside.last() - dpo.outside.first()
    assert outside[1] > 0.1 and outside[2] > 0.1  # where the mass went instead
