"""The report reads finished stages only, the config's rounds and variants only, and shows "-"
where a part has not been written yet; every cell is checked against the numbers written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST
from pipeline.config import RunConfig
from pipeline.report import header, headline, load_run, write_report
from stages.judge.agreement import agreement

CFG = RunConfig(name="t", rounds=2, pairs={"scenarios": [1, 2]}, train={"lr": 1e-5},
                variants={"s1": {"scenario": 1}, "s2": {"scenario": 2, "method": {"type": "dpo", "beta": 0.2}}})  # fmt: skip

API_JUDGE = {"rows": 16, "scored": 13, "unscored": 3, "score_counts": {"1": 2, "2": 0, "3": 4, "4": 3, "5": 4},
             "unscored_reasons": {"unparseable": 1, "http 500 after 6 tries": 2}, "requests": 19, "retried": 2,
             "cache_hits": 4, "prompt_tokens": 12000, "completion_tokens": 3400, "cost_usd": 0.064}  # fmt: skip
SOLUTIONS = {"rows": 4, "scored": 4, "unscored": 0, "score_counts": {"5": 4}, "unscored_reasons": {}}
PAIRS = {"prompts": 4, "rows": 5, "s1": {"pairs": 1, "dropped_uniform": 2, "dropped_margin": 0, "dropped_unscored": 1},
         "s2": {"pairs": 4, "dropped_uniform": 0, "dropped_margin": 0, "dropped_unscored": 0}}  # fmt: skip


def _held_out(five: float, four_five: float, mean: float, tokens: float, unscored: int = 0) -> dict:
    return {"model": "m", "prompts": 8, "5_points": five, "4&5_points": four_five, "mean_score": mean,
            "unscored": unscored, "response_tokens": tokens}  # fmt: skip


def _logps(chosen: float, rejected: float, tokens: int = 100) -> dict:
    """A before/after block: per-sequence logps and, for responses of `tokens` tokens, per token."""
    return {"model": "m", "logps/chosen": chosen * tokens, "logps/rejected": rejected * tokens,
            "logps_per_token/chosen": chosen, "logps_per_token/rejected": rejected}  # fmt: skip


def _variant(five, four_five, mean, tokens, variant, scenario, before, after, unscored=0) -> dict:
    return {**_held_out(five, four_five, mean, tokens, unscored), "variant": variant, "scenario": scenario,
            "method": "dpo", "pairs": 4, "before": _logps(*before), "after": _logps(*after)}  # fmt: skip


def _write(path: Path, content: dict | list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, list):  # metrics.jsonl
        path.write_text("".join(json.dumps(line) + "\n" for line in content))
    else:
        path.write_text(json.dumps(content))


def _stats(run_dir: Path, round_: int, stage: str, stats: dict) -> None:
    """A finished part's manifest; `stage` may name the part (`judge/policy`)."""
    _write(run_dir / f"round-{round_}" / stage / MANIFEST, {"stage": stage.split("/")[0], "round": round_, "stats": stats})


def _steps(loss: tuple[float, float], chosen: tuple[float, float], rejected: tuple[float, float], accuracy: float) -> list[dict]:
    return [{"step": step, "loss": loss[i], "logps/chosen": chosen[i], "logps/rejected": rejected[i],
             "rewards/chosen": 0.01 * i, "rewards/rejected": -0.02 * i, "rewards/margins": 0.03 * i,
             "rewards/accuracies": accuracy if i else 0.0, "grad_norm": 1.0, "lr": 1e-5}
            for i, step in enumerate((1, 2))]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Two finished rounds of s1 (scenario 1) and s2 (scenario 2), except round 1's s2, trained but
    not evaluated; plus a round and a variant the config does not have."""
    run = tmp_path / "run"
    for r in (0, 1):
        _stats(run, r, "sample/policy", {"prompts": 4, "rows": 16, "model": "embedded:smollm2" if r == 0 else "round-0/s1"})
        _stats(run, r, "sample/reference", {"prompts": 4, "rows": 4, "model": "dataset"})
        _stats(run, r, "judge/policy", API_JUDGE if r == 0 else API_JUDGE | {"unscored": 0, "scored": 16,
                                                                              "unscored_reasons": {}, "cost_usd": None})
        _stats(run, r, "judge/reference", SOLUTIONS)
        _stats(run, r, "pairs", PAIRS)
        _write(run / f"round-{r}/train/s1/metrics.jsonl", _steps((0.6931, 0.65), (-60.0, -55.5), (-90.0, -101.5), 0.75))
        _write(run / f"round-{r}/train/s2/metrics.jsonl", _steps((0.6931, 0.5), (-150.0, -125.0), (-75.0, -200.0), 1.0))
    evaluate = run / "round-0/evaluate"
    _write(evaluate / "policy/summary.json", _held_out(0.25, 0.5, 3.0, 90.0))
    _write(evaluate / "s1/summary.json", _variant(0.375, 0.625, 3.4, 80.0, "s1", 1, (-0.5, -0.75), (-0.45, -1.25), unscored=1))
    _write(evaluate / "s2/summary.json", _variant(0.125, 0.375, 2.75, 120.0, "s2", 2, (-1.5, -0.75), (-1.25, -2.0)))
    _write(evaluate / "old/summary.json", _variant(0.9, 0.9, 4.9, 1.0, "old", 1, (-9, -9), (-9, -9)))  # not in the config
    evaluate = run / "round-1/evaluate"
    _write(evaluate / "policy/summary.json", _held_out(0.375, 0.625, 3.5, 85.0))
    _write(evaluate / "s1/summary.json", _variant(0.5, 0.75, 3.75, 70.0, "s1", 1, (-0.25, -0.5), (-0.125, -1.0)))
    _write(run / "round-2/evaluate/policy/summary.json", _held_out(1.0, 1.0, 5.0, 1.0))  # rounds: 2 → not shown
    return run


def _report(run_dir: Path, cfg: RunConfig = CFG) -> str:
    return write_report(cfg, run_dir).read_text()


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}")[1].split("\n## ")[0]


# ── held-out evaluation (Table 2) ────────────────────────────────────────────────────────────
def test_the_headline_lists_each_rounds_policy_then_its_variants_with_the_delta_against_it(run_dir):
    lines = headline(run_dir, CFG).splitlines()
    assert lines[:8] == [
        "| round | model | scenario | method | 5 points | 4&5 points | mean score | answer tokens | Δ 4&5 vs the round's policy (paired) |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
        "| 0 | base model |  |  | 25.0% | 50.0% | 3.00 | 90 |  |",
        "| 0 | round-0/s1 | 1: policy × policy | dpo | 37.5% | 62.5% | 3.40 | 80 | +12.5 pp |",
        "| 0 | round-0/s2 | 2: solution × policy | dpo | 12.5% | 37.5% | 2.75 | 120 | -12.5 pp |",
        "| 1 | round-1 policy (= round-0/s1) |  |  | 37.5% | 62.5% | 3.50 | 85 |  |",
        "| 1 | round-1/s1 | 1: policy × policy | dpo | 50.0% | 75.0% | 3.75 | 70 | +12.5 pp |",
        # trained, not evaluated yet
        "| 1 | round-1/s2 | 2: solution × policy | dpo | - | - | - | - | - |",
    ]  # fmt: skip
    assert lines[8] == "" and "percentage points" in lines[9] and len(lines) == 10


def test_without_the_rounds_policy_evaluated_the_delta_is_a_dash(run_dir):
    (run_dir / "round-0/evaluate/policy/summary.json").unlink()
    table = headline(run_dir, CFG)
    assert "| 0 | base model |  |  | - | - | - | - |  |" in table
    assert "| 0 | round-0/s1 | 1: policy × policy | dpo | 37.5% | 62.5% | 3.40 | 80 | - |" in table


def test_only_the_configs_rounds_and_variants_are_shown(run_dir):
    one_round = CFG.model_copy(update={"rounds": 1})
    table = headline(run_dir, one_round)
    assert "| 0 | round-0/s2 |" in table and "| 1 |" not in table
    report = _report(run_dir)
    assert not any(line.startswith("| 2 |") for line in report.splitlines())  # on disk, but the config has 2 rounds
    assert "round-2" not in report and "Round 2" not in report
    assert "old" not in report  # a variant the config no longer has
    assert sorted(load_run(run_dir, CFG).evals) == [(0, "policy"), (0, "s1"), (0, "s2"), (1, "policy"), (1, "s1")]


def test_a_run_with_nothing_written_yet_still_reports(tmp_path):
    assert headline(tmp_path / "empty", CFG) == "(no round has started yet)"
    (tmp_path / "started" / "round-0").mkdir(parents=True)
    report = _report(tmp_path / "started")
    assert "| 0 | base model |  |  | - | - | - | - |  |" in report
    assert "| 0 | round-0/s1 | 1: policy × policy | dpo | - | - | - | - | - |" in report
    assert "| 0 | policy | - | - | - | - | - |" in report  # candidates
    assert "| 0 | 1: policy × policy | - | - | - | - | - |" in report  # pairs
    assert "![" not in report and not list((tmp_path / "started" / "report").glob("*.png"))


def test_the_report_says_which_held_out_answers_were_not_scored(run_dir):
    assert "Held-out answers the judge could not score: round-0/s1 1." in _report(run_dir)


# ── the config in brief ──────────────────────────────────────────────────────────────────────
def test_the_header_names_the_models_judge_scenarios_and_each_variants_changed_settings(run_dir):
    head = _report(run_dir).split("## Held-out evaluation")[0]
    assert "- policy: `embedded:smollm2-135m-instruct`" in head
    assert "- rounds: 2 (round k > 0 samples from and trains round k-1's `s1` checkpoint; π_ref: the checkpoint it starts from)" in head
    assert "- sampler: `vllm`, n=8 (the round's policy)" in head
    assert "other sampler" not in head
    assert "- judge: `verifier`" in head
    assert "- scenarios: 1: policy × policy, 2: solution × policy" in head
    assert ("- variants: s1: scenario 1 (policy × policy), dpo (lr=1e-05); "
            "s2: scenario 2 (solution × policy), dpo (beta=0.2, lr=1e-05)") in head


def test_the_header_names_the_other_model_of_scenarios_3_and_4():
    cfg = RunConfig(name="t", pairs={"scenarios": [3]}, other_sampler={"type": "vllm", "model": "embedded:other", "n": 4})
    head = "\n".join(header(cfg))
    assert "- other sampler: `vllm`, n=4, model `embedded:other`" in head
    assert "- variants: s3: scenario 3 (policy × other model), dpo" in head


# ── how on-policy is the data (Table 1) ──────────────────────────────────────────────────────
def test_the_onpolicy_tables_take_before_from_the_scenarios_variant_and_after_from_each_checkpoint(run_dir):
    section = _section(_report(run_dir), "How on-policy is the data?")
    assert "lower = further from what the policy writes itself" in section and '"drastic drop"' in section
    round0, round1 = section.split("Round 1, ", 1)
    per_token, per_sequence = round0.split("mean log-prob per sequence")
    assert "\n".join([
        "| model | 1: policy × policy | 2: solution × policy |",
        "|---|---:|---:|",
        "| round's policy (before training) | -0.500 / -0.750 | -1.500 / -0.750 |",
        "| after training (s1) | -0.450 / -1.250 |  |",
        "| after training (s2) |  | -1.250 / -2.000 |",
    ]) in per_token  # fmt: skip
    assert "\n".join([
        "| round's policy (before training) | -50.0 / -75.0 | -150.0 / -75.0 |",
        "| after training (s1) | -45.0 / -125.0 |  |",
        "| after training (s2) |  | -125.0 / -200.0 |",
    ]) in per_sequence  # fmt: skip
    # round 1: s2 not evaluated, so neither its scenario's "before" nor its "after" is known
    assert "round-1 policy (= round-0/s1): mean log-prob per token" in round1
    assert "| round's policy (before training) | -0.250 / -0.500 | - |" in round1
    assert "| after training (s1) | -0.125 / -1.000 |  |" in round1
    assert "| after training (s2) |  | - |" in round1


def test_a_scenarios_before_comes_from_a_later_variant_when_the_first_is_not_evaluated(run_dir):
    cfg = RunConfig(name="t", rounds=1, pairs={"scenarios": [1]}, variants={"a": {"scenario": 1}, "s1": {"scenario": 1}})
    section = _section(_report(run_dir, cfg), "How on-policy is the data?")
    assert "| round's policy (before training) | -0.500 / -0.750 |" in section
    assert "| after training (a) | - |\n| after training (s1) | -0.450 / -1.250 |" in section


# ── data ─────────────────────────────────────────────────────────────────────────────────────
def test_the_data_section_shows_candidates_per_source_and_pairs_per_scenario(run_dir):
    section = _section(_report(run_dir), "Data")
    assert "\n".join([
        "| round | source | written by | prompts | candidates | scored / unscored | score counts (1..5) |",
        "|---:|---|---|---:|---:|---:|---|",
        "| 0 | policy | embedded:smollm2 | 4 | 16 | 13 / 3 | 2 / 0 / 4 / 3 / 4 |",
        "| 0 | reference | dataset | 4 | 4 | 4 / 0 | 0 / 0 / 0 / 0 / 4 |",
        "| 1 | policy | round-0/s1 | 4 | 16 | 16 / 0 | 2 / 0 / 4 / 3 / 4 |",
    ]) in section  # fmt: skip
    assert "\n".join([
        "| round | scenario | prompts | pairs | dropped (uniform: no contrast) | dropped (below min_margin) | dropped (unscored) |",
        "|---:|---|---:|---:|---:|---:|---:|",
        "| 0 | 1: policy × policy | 4 | 1 | 2 | 0 | 1 |",
        "| 0 | 2: solution × policy | 4 | 4 | 0 | 0 | 0 |",
    ]) in section  # fmt: skip


def test_the_data_section_shows_unscored_reasons_and_the_judges_requests_per_round_and_source(run_dir):
    section = _section(_report(run_dir), "Data")
    # the reasons, most frequent first; a part without unscored rows is not listed
    assert ("Unscored candidates by reason (they take no part in pairs): "
            "round 0 policy: http 500 after 6 tries 2, unparseable 1.") in section
    assert "\n".join([
        "| round | source | requests | retried rows | cache hits | prompt tokens | completion tokens | estimated cost |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
        "| 0 | policy | 19 | 2 | 4 | 12000 | 3400 | $0.0640 |",
        "| 1 | policy | 19 | 2 | 4 | 12000 | 3400 | no prices configured |",
    ]) in section  # fmt: skip


def test_old_manifests_without_the_new_keys_still_render(tmp_path):
    # before judge_stats: rows and score counts only (int keys as a stage returns them), no dropped_unscored
    _stats(tmp_path, 0, "judge/policy", {"rows": 32, "score_counts": {1: 8, 5: 24}})
    _stats(tmp_path, 0, "pairs", {"prompts": 8, "s1": {"pairs": 5, "dropped_uniform": 3, "dropped_margin": 0}})
    report = _report(tmp_path, RunConfig(name="t"))
    assert "| 0 | policy | - | - | 32 | - | 8 / 0 / 0 / 0 / 24 |" in report
    assert "| 0 | 1: policy × policy | 8 | 5 | 3 | 0 | - |" in report
    assert "Unscored candidates" not in report and "Judge requests" not in report
    assert "Judge agreement" not in report  # no comparison in this run


# ── training and plots ───────────────────────────────────────────────────────────────────────
def test_the_training_section_sums_up_each_round_and_variant(run_dir):
    section = _section(_report(run_dir), "Training")
    assert "- round 0 / s1: 2 steps; loss 0.6931 → 0.6500; logps/chosen -60.0 → -55.5; logps/rejected -90.0 → -101.5; " \
        "rewards/accuracies (last step) 0.75" in section
    assert "- round 1 / s2: 2 steps; loss 0.6931 → 0.5000; logps/chosen -150.0 → -125.0; logps/rejected -75.0 → -200.0; " \
        "rewards/accuracies (last step) 1.00" in section
    assert section.index("round 0 / s1") < section.index("round 0 / s2") < section.index("round 1 / s1")


def test_every_plot_is_written_and_linked(run_dir):
    report = _report(run_dir)
    for name in ("eval_scores.png", "logps.png", "train_curves.png"):
        image = run_dir / "report" / name
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000, name
        assert f"]({name})" in report


# ── judge agreement ──────────────────────────────────────────────────────────────────────────
def _comparison(run_dir: Path, folder: str, a_scores: list, b_scores: list, **extra) -> dict:
    out = run_dir / "compare-judges" / folder
    out.mkdir(parents=True)
    a, b = folder.split("-vs-")
    summary = {"a": a, "b": b, "round": 0, "limit": None, "prompts": 3, **extra, **agreement(a_scores, b_scores)}
    (out / "agreement.json").write_text(json.dumps(summary))
    (out / "confusion.png").write_bytes(b"png")
    return summary


def test_the_report_lists_every_judge_comparison_with_its_numbers_matrix_and_heatmap(tmp_path):
    _comparison(tmp_path, "verifier-vs-gpt4o", [5, 4, 1, 3, None], [5, 3, 1, 3, 2], limit=3)
    _comparison(tmp_path, "rm-vs-verifier", [3, 3], [3, 3], round=1)
    (tmp_path / "compare-judges" / ".rm-vs-verifier.tmp-123").mkdir()  # a killed run's leftovers are not listed
    report = _report(tmp_path)
    section = report.split("## Judge agreement")[1]
    assert section.index("### rm vs verifier") < section.index("### verifier vs gpt4o")
    # both scored: (5,5) (4,3) (1,1) (3,3). p_o = 3/4; marginals A {1,3,4,5}, B {1,3,3,5}: p_e = (1 + 2 + 1)/16,
    # κ = (3/4 − 1/4)/(3/4) = 2/3. Quadratic: Σ w O = 1/16; Σ_ij r_i c_j (i−j)² = 24 + 8 + 12 + 24 = 68,
    # so Σ w E = 68 / (16 · 4) and κ_q = 1 − (1/16)/(68/64) = 16/17 = 0.941
    assert "Round 0's candidates (3 prompts, --limit 3): scored by both: 4; excluded (unscored by either): 1 " \
        "(verifier: 1 unscored, gpt4o: 0); exact agreement: 75.0%; Cohen's κ: 0.667; quadratic-weighted κ: 0.941; " \
        "mean score: verifier 3.25, gpt4o 3.00 (on the 4 rows both scored)." in section
    assert "| verifier ↓ / gpt4o → | 1 | 2 | 3 | 4 | 5 |" in section
    assert "| **3** | 0 | 0 | 1 | 0 | 0 |\n| **4** | 0 | 0 | 1 | 0 | 0 |\n| **5** | 0 | 0 | 0 | 0 | 1 |" in section
    assert "![verifier vs gpt4o](confusion-verifier-vs-gpt4o.png)" in section
    # two constant judges: κ is undefined, said so, not shown as 1
    assert "Round 1's candidates" in section
    assert "exact agreement: 100.0%; Cohen's κ: undefined (both judges gave every row one score)" in section
    assert ".tmp-" not in section


# ── methods side by side (Table 10) and the 3D diagnostics ──────────────────────────────────
METHODS_CFG = RunConfig(name="m", rounds=1, variants={"dpo": {"method": {"type": "dpo"}},
                                                      "simpo": {"method": {"type": "simpo", "gamma": 1.0}}})  # fmt: skip


def test_methods_table_has_table_10s_shape_base_first(tmp_path):
    run = tmp_path / "run"
    evaluate = run / "round-0/evaluate"
    _write(evaluate / "policy/summary.json", _held_out(0.25, 0.5, 3.0, 90.0))
    _write(evaluate / "dpo/summary.json", _variant(0.375, 0.625, 3.4, 80.0, "dpo", 1, (-0.5, -0.75), (-0.45, -1.25)))
    _write(evaluate / "simpo/summary.json", _variant(0.125, 0.875, 3.1, 60.0, "simpo", 1, (-0.5, -0.75), (-0.4, -0.9)))
    table = _section(_report(run, METHODS_CFG), "Methods (Table 10)").strip().splitlines()
    assert table[-5:] == [
        "| method | 5 points | 4&5 points |",
        "|---|---:|---:|",
        "| base model | 25.0% | 50.0% |",
        "| dpo (dpo) | 37.5% | 62.5% |",
        "| simpo (simpo) | 12.5% | 87.5% |",
    ]


def test_no_methods_table_for_one_method(run_dir):
    assert "## Methods (Table 10)" not in _report(run_dir)  # CFG's variants are both dpo


def test_diagnostics_plot_and_the_guard_mark(tmp_path):
    run = tmp_path / "run"
    steps = [{"step": s, "loss": 0.69 - 0.1 * s, "logps/chosen": -50.0, "logps/rejected": -60.0 - 5 * s,
              "logps/chosen_per_token": -0.5, "logps/rejected_per_token": -0.6 - 0.05 * s,
              "grads/chosen_logps": 0.05, "grads/rejected_logps": 0.05 + 0.01 * s, "grad_norm": 1.0, "lr": 1e-5,
              **({"grad_norm/chosen": 0.4, "grad_norm/rejected": 0.9} if s in (1, 3) else {}),
              **({"guard": "logratios/rejected fell 3.00 nats per step; action warn"} if s == 2 else {})}
             for s in (1, 2, 3)]  # fmt: skip
    _write(run / "round-0/train/dpo/metrics.jsonl", steps)
    report = _report(run, METHODS_CFG)
    assert (run / "report/diagnostics.png").stat().st_size > 1000
    assert "![3D diagnostics](diagnostics.png)" in report
    assert "**guard fired at step 2**: logratios/rejected fell 3.00 nats per step; action warn" in report


def test_no_diagnostics_plot_without_diagnostic_metrics(run_dir):
    report = _report(run_dir)  # _steps writes TRL's metrics only
    assert not (run_dir / "report/diagnostics.png").exists() and "diagnostics.png" not in report


RM_CFG = RunConfig(name="t", train={"held_out_pairs": 4},
                   variants={"dpo": {"scenario": 1}, "rm": {"scenario": 1, "method": {"type": "reward_model"}}})  # fmt: skip


def test_held_out_accuracy_puts_the_reward_model_beside_dpo_and_keeps_it_out_of_the_answer_tables(tmp_path):
    run = tmp_path / "run"
    dpo_curve, rm_curve = [0.5, 1.0, 0.25, 0.75], [0.5, 0.75, 0.75, 1.0]
    for name, curve in (("dpo", dpo_curve), ("rm", rm_curve)):
        _write(run / f"round-0/train/{name}/metrics.jsonl",
               [{"step": s + 1, "loss": 0.6, "eval_loss": 0.7 - 0.1 * s, "eval_rewards/accuracies": a} for s, a in enumerate(curve)])
    evaluate = run / "round-0/evaluate"
    _write(evaluate / "policy/summary.json", _held_out(0.25, 0.5, 3.0, 90.0))
    _write(evaluate / "dpo/summary.json", _variant(0.375, 0.625, 3.4, 80.0, "dpo", 1, (-0.5, -0.75), (-0.45, -1.25)))
    _write(evaluate / "rm/summary.json", {"model": "round-0/rm", "variant": "rm", "scenario": 1, "method": "reward_model",
                                          "pairs": 12, "preference": {"pairs": 4, "held_out": True, "accuracy": 0.75}})
    report = _report(run, RM_CFG)
    table = _section(report, "Held-out preference accuracy (seed 003 §5.3)").strip().splitlines()
    assert table[-6:-2] == [
        "| variant | method | held-out pairs | accuracy first → last | best | swing | as a judge |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| r0/dpo | dpo | 4 | 0.50 → 0.75 | 1.00 | 0.583 | - |",  # swing (0.5 + 0.75 + 0.5) / 3
        "| r0/rm | reward_model | 4 | 0.50 → 1.00 | 1.00 | 0.167 | 0.75 |",
    ]
    assert table[-1] == "![held-out preference accuracy](held_out_accuracy.png)"
    assert (run / "report/held_out_accuracy.png").stat().st_size > 1000
    # a reward model writes no answers: not in Table 2, nor in the on-policy tables
    assert "round-0/rm" not in _section(report, "Held-out evaluation (greedy, judged 1-5)")
    assert "(rm)" not in _section(report, "How on-policy is the data?")


def test_no_held_out_section_without_held_out_metrics(run_dir):
    report = _report(run_dir)
    assert "Held-out preference accuracy" not in report and not (run_dir / "report/held_out_accuracy.png").exists()


# ── OGD and RoPO beside DPO ──────────────────────────────────────────────────────────────────
OGD_ROPO_CFG = RunConfig(name="m", variants={
    "dpo": {"method": {"type": "dpo"}},
    "ogd": {"update": {"type": "ogd"}, "optimizer": "rmsprop"},
    "ropo": {"parameterisation": {"type": "ropo", "modules": ["q_proj", "up_proj"]}, "lr": 1e-3},
})  # fmt: skip


def _method_steps(chosen: list[float], projected: list[float] | None = None) -> list[dict]:
    out = []
    for i, c in enumerate(chosen):
        line = {"step": i + 1, "loss": 0.6931 - 0.01 * i, "logps/chosen": -50.0, "logps/rejected": -60.0,
                "logratios/chosen": c, "logratios/rejected": -0.5 * i, "rewards/margins": 0.0, "rewards/accuracies": 0.5}  # fmt: skip
        if projected is not None:
            line |= {"ogd/projected": projected[i], "ogd/coefficient": 0.3 * projected[i], "ogd/dot": projected[i] - 0.5}
        out.append(line)
    return out


def _geometry_rows(change: float) -> list[dict]:
    return [{"layer": k, "module": m, "rows": 4, "cols": 4, "he_before": 10.0, "he_after": 10.0 * (1 + change * k),
             "he_relative_change": change * k} for k in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")]  # fmt: skip


@pytest.fixture
def methods_run(tmp_path: Path) -> Path:
    import pandas as pd

    run = tmp_path / "run"
    train, evaluate = run / "round-0/train", run / "round-0/evaluate"
    _write(train / "dpo/metrics.jsonl", _method_steps([0.0, 0.4, 0.9, 0.2]))
    _write(train / "ogd/metrics.jsonl", _method_steps([0.0, 0.3, 0.6, 1.1], projected=[1.0, 0.0, 1.0, 1.0]))
    _write(train / "ropo/metrics.jsonl", _method_steps([0.0, 0.1, 0.2, 0.3]))
    _stats(run, 0, "train/ropo", {"steps": 4, "trainable_parameters": 92160, "trainable_percent": 0.06851})
    _stats(run, 0, "train/dpo", {"steps": 4, "trainable_parameters": 134515008, "trainable_percent": 100.0})
    _write(evaluate / "policy/summary.json", _held_out(0.25, 0.5, 3.0, 90.0) | {"distinct_1": 0.5, "distinct_2": 0.6,
                                                                                "distinct_3": 0.7, "distinct_4": 0.8})  # fmt: skip
    for name, change, before, after in (("dpo", 2e-3, (-0.5, -0.75), (-0.6, -1.5)), ("ogd", 0.0, (-0.5, -0.75), (-0.4, -0.74)),
                                        ("ropo", 1e-9, (-0.5, -0.75), (-0.5, -0.8))):  # fmt: skip
        summary = _variant(0.375, 0.625, 3.4, 80.0, name, 1, before, after)
        summary |= {"distinct_1": 0.25, "distinct_2": 0.5, "distinct_3": 0.625, "distinct_4": 0.75,
                    "geometry": {"matrices": 6, "he_mean_abs_relative_change": change, "he_max_abs_relative_change": 2 * change}}
        _write(evaluate / name / "summary.json", summary)
        _stats(run, 0, f"evaluate/{name}", {"rows": 8})
        pd.DataFrame(_geometry_rows(change)).to_parquet(evaluate / name / "geometry.parquet")
    return run


def test_methods_are_labelled_by_update_rule_and_parameterisation(methods_run):
    report = _report(methods_run, OGD_ROPO_CFG)
    table = _section(report, "Methods (Table 10)")
    assert "| ogd (ogd) |" in table and "| dpo + ropo (ropo) |" in table and "| dpo (dpo) |" in table
    variants = next(line for line in report.splitlines() if line.startswith("- variants:"))
    assert "ogd: scenario 1 (policy × policy), ogd (logs dpo, optimizer=rmsprop)" in variants
    assert "ropo: scenario 1 (policy × policy), dpo + ropo (modules=['q_proj', 'up_proj'], lr=0.001)" in variants


def test_ogd_section_puts_ogd_beside_dpo_with_the_rules_numbers_and_a_plot(methods_run):
    report = _report(methods_run, OGD_ROPO_CFG)
    section = _section(report, "OGD beside DPO (seed 001)")
    rows = [line for line in section.splitlines() if line.startswith("| r0/")]
    assert rows == [
        "| r0/ogd | ogd | 4 | +1.10 (peak +1.10 at step 4) | -1.50 | 0.6931 → 0.6631 | -0.500 → -0.400 | -0.750 → -0.740 | 75% |",
        "| r0/dpo | dpo | 4 | +0.20 (peak +0.90 at step 3) | -1.50 | 0.6931 → 0.6631 | -0.500 → -0.600 | -0.750 → -1.500 | - |",
    ]  # the RoPO variant is not compared here: it is neither OGD nor plain DPO
    assert "![OGD beside DPO](ogd_vs_dpo.png)" in section
    assert (methods_run / "report" / "ogd_vs_dpo.png").stat().st_size > 10_000


def test_ropo_section_shows_trainable_share_energy_change_and_diversity(methods_run):
    section = _section(_report(methods_run, OGD_ROPO_CFG), "RoPO beside DPO (seed 000)")
    rows = [line for line in section.splitlines() if line.startswith("| r0/")]
    assert rows == [
        "| r0/policy |  |  |  |  | 0.500 | 0.600 | 0.700 | 0.800 |",
        "| r0/ropo | dpo + ropo | 0.06851% | 1.00e-09 | 2.00e-09 | 0.250 | 0.500 | 0.625 | 0.750 |",
        "| r0/dpo | dpo | 100% | 2.00e-03 | 4.00e-03 | 0.250 | 0.500 | 0.625 | 0.750 |",
    ]
    assert "![hyperspherical energy change per layer](he_change.png)" in section
    assert (methods_run / "report" / "he_change.png").stat().st_size > 10_000


def test_no_ogd_or_ropo_section_without_such_variants(run_dir):
    report = _report(run_dir)
    assert "OGD beside DPO" not in report and "RoPO beside DPO" not in report
