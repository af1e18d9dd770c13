"""The report's evaluation sections from a hand-written finished run: paired intervals and their
verdicts, held-out sets, forgetting (TAX), the unseen proxy, diversity, several runs side by
side, and the self-contained page in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.artifacts import MANIFEST
from pipeline.config import RunConfig
from pipeline.report import headline, write_report, write_side_by_side
from tests.helpers.browser import images_in_browser

SETS = {"in_domain": {}, "ood": {"data": {"type": "builtin_math", "templates": ["share"]}}}
CFG = RunConfig(name="t", pairs={"scenarios": [1]}, evaluate={"sets": SETS, "bootstrap": 1000})
# 20 in-domain prompts: the checkpoint wins 8 the base lost and loses 1 it won (base 6/20 → 13/20 at 4&5)
BASE = [5, 4, 4, 5, 4, 4] + [1] * 14
NEW = [5, 4, 4, 5, 4, 1] + [5] * 8 + [1] * 6
OOD_BASE, OOD_NEW = [4, 1, 1, 1], [4, 1, 4, 1]


def _answers(scores: list[int], ood: list[int]) -> pd.DataFrame:
    rows = [{"prompt_id": f"p{i}", "set": "in_domain", "score": s, "response_tokens": 10 + i} for i, s in enumerate(scores)]
    rows += [{"prompt_id": f"ood/p{i}", "set": "ood", "score": s, "response_tokens": 5} for i, s in enumerate(ood)]
    return pd.DataFrame(rows)


def _summary(scores, ood, forgetting, **extra) -> dict:
    def block(s):
        s = np.array(s)
        return {"prompts": len(s), "5_points": float((s == 5).mean()), "4&5_points": float((s >= 4).mean()),
                "5_points_ci": [0.1, 0.5], "4&5_points_ci": [0.2, 0.6], "mean_score": float(s.mean()), "unscored": 0,
                "response_tokens": 12.0, "response_tokens_ci": [10.0, 14.0], "distinct_1": 0.5, "distinct_2": 0.6,
                "distinct_3": 0.7, "distinct_4": 0.8, "dropped_overlap": 0}  # fmt: skip
    sets = {"in_domain": block(scores), "ood": block(ood)}
    return {"model": "m", **sets["in_domain"], "sets": sets,
            "forgetting": {t: {"prompts": 10, "accuracy": a, "accuracy_ci": [0.0, 1.0]} for t, a in forgetting.items()},
            **extra}  # fmt: skip


def _finished(folder: Path, summary: dict, answers: pd.DataFrame) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    answers.to_parquet(folder / "generations.parquet")
    (folder / MANIFEST).write_text(json.dumps({"stage": "evaluate", "stats": {}}))


def _run(root: Path, name: str = "run") -> Path:
    run = root / name
    logps = {"logps_per_token/chosen": -0.5, "logps_per_token/rejected": -0.7}
    _finished(run / "round-0/evaluate/policy", _summary(BASE, OOD_BASE, {"times_table": 0.5, "next_number": 0.0}),
              _answers(BASE, OOD_BASE))
    _finished(run / "round-0/evaluate/s1",
              _summary(NEW, OOD_NEW, {"times_table": 0.4, "next_number": 0.2}, variant="s1", scenario=1,
                       before=logps, after={"logps_per_token/chosen": -0.4, "logps_per_token/rejected": -1.2},
                       unseen={"answers": 20, "before": {"logps_per_token": -0.3}, "after": {"logps_per_token": -0.45}},
                       geometry={"he_mean_abs_relative_change": 3e-8}),
              _answers(NEW, OOD_NEW))  # fmt: skip
    (run / "config.yaml").write_text(json.dumps(CFG.model_dump(mode="json")))  # JSON is YAML
    return run


def _direct_paired(base, new, resamples=1000, seed=0):
    """An independent paired bootstrap: a loop over resamples of the prompt indices."""
    b, n = (np.array(base) >= 4).astype(float), (np.array(new) >= 4).astype(float)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, len(b), size=len(b))
        diffs.append(n[idx].mean() - b[idx].mean())
    return np.quantile(diffs, [0.025, 0.975])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("r"))


def test_the_headline_shows_the_paired_interval_and_says_whether_it_excludes_zero(run):
    text = headline(run, CFG)
    low, high = _direct_paired(BASE, NEW)
    cell = f"+35.0 pp [{100 * low:+.1f}, {100 * high:+.1f}]"
    assert f"| 0 | round-0/s1 | 1: policy × policy | dpo | 50.0% [10.0%, 50.0%] | 65.0% [20.0%, 60.0%] |" in text
    assert text.splitlines()[3].endswith(f"| {cell} |")
    assert low > 0
    assert f"- round-0/s1: 4&5 points {cell} against the round's policy on 20 paired prompts: better (the 95% interval excludes 0)." in text


def test_sets_forgetting_unseen_and_diversity_sections(run):
    report = write_report(CFG, run).read_text()
    sets = report.split("## Held-out sets and answer length")[1].split("\n## ")[0]
    low, high = _direct_paired(OOD_BASE, OOD_NEW)
    assert f"| ood | round-0/s1 (dpo) | 4 | 0.0% [10.0%, 50.0%] | 50.0% [20.0%, 60.0%] | +25.0 pp [{100 * low:+.1f}, {100 * high:+.1f}] | 12 [10, 14] | 0.800 | 0 |" in sets
    forgetting = report.split("## Forgetting (TAX)")[1].split("\n## ")[0]
    # TAX = 100/|T| Σ min(0, Δ/base): next_number's base is 0 → left out; times_table −20% → TAX −20.0
    assert "| round-0/s1 (dpo) | 40.0% [0.0%, 100.0%] | 20.0% [0.0%, 100.0%] | -20.0 |" in forgetting
    assert "![forgetting tasks](forgetting.png)" in forgetting
    unseen = report.split("## 3D-properties: where the probability mass went")[1].split("\n## ")[0]
    assert "| round-0/s1 | dpo | -0.500 → -0.400 (+0.100) | -0.700 → -1.200 (-0.500) | -0.300 → -0.450 (-0.150) | 20 |" in unseen
    diversity = report.split("## Diversity and geometry")[1].split("\n## ")[0]
    assert "| round-0/s1 (dpo) | 0.500 | 0.600 | 0.700 | 0.800 | 3.00e-08 |" in diversity


def test_several_runs_side_by_side_and_the_page_loads_every_image_in_chromium(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    report = write_side_by_side([a, b], tmp_path / "both")
    text = report.read_text()
    assert text.startswith("# Runs side by side: a, b")
    assert "| a | 0 | round-0/s1 |" in text and "| b | 0 | round-0/s1 |" in text
    assert "## Run a" in text and "## Run b" in text and "### Held-out sets and answer length" in text
    assert "![forgetting tasks](a/forgetting.png)" in text and (tmp_path / "both/b/forgetting.png").is_file()
    page = images_in_browser(report.parent / "index.html")
    assert page["images"] and all(img["loaded"] for img in page["images"])
    assert len(page["images"]) == text.count("![")
    assert page["tables"] == text.count("\n|---")  # one alignment row per table


def test_the_report_command_takes_run_dirs_and_names_a_folder_that_is_not_one(tmp_path, capsys):
    from pipeline.cli import main

    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    assert main(["report", str(a)]) == 0
    assert (a / "report/index.html").is_file() and "round-0/s1" in capsys.readouterr().out
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "ab")]) == 0
    assert (tmp_path / "ab/report.md").read_text().startswith("# Runs side by side: a, b")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_the_toy_models_claims_join_the_report_when_the_toy_ran_into_the_run_dir(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = _run(tmp_path)
    (run / "toy").mkdir()
    claims = {"s1_highest_peak": {"holds": True, "peak": [0.9, 0.3]}, "unseen_grows": {"holds": False, "final": 1e-16}}
    (run / "toy/claims.json").write_text(json.dumps(claims))
    fig = plt.figure(figsize=(2, 1))
    fig.savefig(run / "toy/toy_dpo_scenarios.png")
    report = write_report(CFG, run).read_text()
    toy = report.split("## The toy model (seed 003 §3.2)")[1]
    assert "| `s1_highest_peak` | yes | peak [0.9, 0.3] |" in toy and "| `unseen_grows` | **no** |" in toy
    assert "![toy: toy_dpo_scenarios](toy-toy_dpo_scenarios.png)" in toy
    page = images_in_browser(run / "report/index.html")
    assert all(img["loaded"] for img in page["images"]) and len(page["images"]) == report.count("![")
