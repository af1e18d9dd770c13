"""The report reads finished stages only, and only the rounds the config has."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import MANIFEST
from pipeline.config import RunConfig
from pipeline.report import headline, headline_rows, write_report
from stages.judge.agreement import agreement


def test_the_report_shows_only_the_configs_rounds(tmp_path):
    run_dir = tmp_path / "run"
    for r in (0, 1):
        folder = run_dir / f"round-{r}" / "evaluate"
        folder.mkdir(parents=True)
        side = {"model": "m", "5_points": 0.1 * r, "4&5_points": 0.2, "mean_score": 2.0, "response_tokens": 9.0,
                "logps/chosen": -1.0, "logps/rejected": -2.0}  # fmt: skip
        (folder / "summary.json").write_text(json.dumps({"before": side, "after": side}))
    assert [row["round"] for row in headline_rows(run_dir, rounds=2)] == [0, 0, 1]
    assert [row["round"] for row in headline_rows(run_dir, rounds=1)] == [0, 0]


def test_the_headline_labels_in_sample_logps_apart_from_held_out_scores(tmp_path):
    folder = tmp_path / "round-0" / "evaluate"
    folder.mkdir(parents=True)
    side = {"model": "m", "5_points": 0.25, "4&5_points": 0.5, "mean_score": 3.0, "response_tokens": 90.0,
            "logps/chosen": -10.0, "logps/rejected": -20.0}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"before": side, "after": side}))
    table = headline(tmp_path, rounds=1)
    assert "| base | 25.0% | 50.0% | 3.00 | 90 | -10.0 | -20.0 |" in table
    assert "logps/chosen (train pairs)" in table and "in-sample, not held out" in table


def _stats(run_dir: Path, round_: int, stage: str, stats: dict) -> None:
    folder = run_dir / f"round-{round_}" / stage
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps({"stage": stage, "round": round_, "stats": stats}))


def _report(run_dir: Path, rounds: int = 1) -> str:
    return write_report(RunConfig(name="t", rounds=rounds), run_dir).read_text()


API_JUDGE = {"rows": 16, "scored": 13, "unscored": 3, "score_counts": {"1": 2, "2": 0, "3": 4, "4": 3, "5": 4},
             "unscored_reasons": {"unparseable": 1, "http 500 after 6 tries": 2}, "requests": 19, "retried": 2,
             "cache_hits": 4, "prompt_tokens": 12000, "completion_tokens": 3400, "cost_usd": 0.064}  # fmt: skip
PAIRS = {"prompts": 4, "rows": 1, "s1": {"pairs": 1, "dropped_uniform": 1, "dropped_margin": 1, "dropped_unscored": 1}}


def test_the_data_section_shows_scored_unscored_their_reasons_and_the_judges_requests(tmp_path):
    _stats(tmp_path, 0, "judge", API_JUDGE)
    _stats(tmp_path, 0, "pairs", PAIRS)
    _stats(tmp_path, 1, "judge", API_JUDGE | {"unscored": 0, "scored": 16, "unscored_reasons": {}, "cost_usd": None})
    _stats(tmp_path, 1, "pairs", PAIRS)
    report = _report(tmp_path, rounds=2)
    assert ("| round | prompts | candidates | scored / unscored | score counts (1..5) | pairs | dropped (uniform) "
            "| dropped (below min_margin) | dropped (unscored) |") in report
    assert "| 0 | 4 | 16 | 13 / 3 | 2 / 0 / 4 / 3 / 4 | 1 | 1 | 1 | 1 |" in report
    # the reasons, most frequent first; a round without unscored rows is not listed
    assert "Unscored candidates by reason (they take no part in pairs): round 0: http 500 after 6 tries 2, unparseable 1." in report
    assert "round 1:" not in report.split("Unscored candidates by reason")[1].split("\n")[0]
    assert "| round | requests | retried rows | cache hits | prompt tokens | completion tokens | estimated cost |" in report
    assert "| 0 | 19 | 2 | 4 | 12000 | 3400 | $0.0640 |" in report
    assert "| 1 | 19 | 2 | 4 | 12000 | 3400 | no prices configured |" in report


def test_old_manifests_without_the_new_keys_still_render(tmp_path):
    # before judge_stats: rows and score counts only (int keys as a stage returns them), no dropped_unscored
    _stats(tmp_path, 0, "judge", {"rows": 32, "score_counts": {1: 8, 5: 24}})
    _stats(tmp_path, 0, "pairs", {"prompts": 8, "s1": {"pairs": 5, "dropped_uniform": 3, "dropped_margin": 0}})
    report = _report(tmp_path)
    assert "| 0 | 8 | 32 | - | 8 / 0 / 0 / 0 / 24 | 5 | 3 | 0 | - |" in report
    assert "Unscored candidates" not in report and "Judge requests" not in report
    assert "Judge agreement" not in report  # no comparison in this run


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
    assert "![verifier vs gpt4o](../compare-judges/verifier-vs-gpt4o/confusion.png)" in section
    # two constant judges: κ is undefined, said so, not shown as 1
    assert "Round 1's candidates" in section
    assert "exact agreement: 100.0%; Cohen's κ: undefined (both judges gave every row one score)" in section
    assert ".tmp-" not in section
