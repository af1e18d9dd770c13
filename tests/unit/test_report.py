"""The report reads finished stages only, and only the rounds the config has."""

from __future__ import annotations

import json

from pipeline.report import headline, headline_rows


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
