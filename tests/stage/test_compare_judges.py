"""`compare-judges` on real Ray over a hand-written, finished sample folder whose verifier scores
are known (`test_judge_stage.ROWS`): the verifier against a tiny random reward model, and the
verifier against itself on the first prompts only (`--limit`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.artifacts import atomic_dir, stage_dir
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.report import write_report
from stages.judge.agreement import agreement
from tests.stage.test_judge_stage import ROWS, write_candidates

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def _known_scores() -> dict[tuple[str, int], int]:
    """(prompt_id, candidate_id) → the verifier's score, numbered as `write_candidates` numbers them."""
    known, counters = {}, {}
    for prompt_id, *_, score, _ in ROWS:
        counters[prompt_id] = counters.get(prompt_id, -1) + 1
        known[prompt_id, counters[prompt_id]] = score
    return known


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory whose round-0 sample folder is finished (it has its manifest)."""
    with atomic_dir(stage_dir(tmp_path / "run", 0, "sample") / "policy", {"stage": "sample", "round": 0, "key": "hand-made"}) as tmp:
        write_candidates(tmp)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_llama, tmp_path_factory) -> Path:
    """The tiny random Llama with a one-output classification head: a reward model, as TRL saves one."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_llama, num_labels=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-rm"
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return path


def test_verifier_vs_a_reward_model_on_the_same_candidates(run_dir, tiny_reward_model, ray_local, tmp_path, capsys):
    verifier = tmp_path / "verifier.yaml"
    verifier.write_text("type: verifier\nbatch_size: 4\n")
    rm = tmp_path / "rm.yaml"
    rm.write_text(f"type: reward_model\nmodel: {tiny_reward_model}\nbatch_size: 4\n")

    assert main(["compare-judges", TINY, "--run-dir", str(run_dir), "--judge", str(verifier), "--judge", str(rm)]) == 0

    out = run_dir / "compare-judges" / "verifier-vs-rm"
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "agreement.json", "confusion.png", "scores.parquet"]
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores.columns) == ["prompt_id", "candidate_id", "score_verifier", "score_rm", "reason_verifier", "reason_rm"]
    # every candidate once, the verifier's column the known scores, the reward model's 1-5 by rank
    assert {(p, c): s for p, c, s in zip(scores.prompt_id, scores.candidate_id, scores.score_verifier)} == _known_scores()
    assert scores.score_rm.between(1, 5).all() and scores.score_rm.nunique() > 1
    assert scores.reason_rm.str.contains("rank").all()

    saved = json.loads((out / "agreement.json").read_text())
    recomputed = agreement(scores.score_verifier, scores.score_rm)
    assert {k: saved[k] for k in recomputed} == recomputed
    assert (saved["a"], saved["b"], saved["round"], saved["limit"], saved["prompts"]) == ("verifier", "rm", 0, None, 3)
    assert saved["n"] == 13 and saved["n_excluded"] == 0
    assert [sum(row) for row in saved["confusion"]] == [3, 2, 2, 3, 3]  # rows: the verifier's known score counts
    assert saved["mean_a"] == pytest.approx(sum(_known_scores().values()) / 13)
    assert (out / "confusion.png").stat().st_size > 5000

    printed = capsys.readouterr().out
    assert "verifier ↓ / rm →" in printed and "scored by both: 13" in printed and f"output: {out}" in printed
    assert f"Cohen's κ: {saved['kappa']:.3f}" in printed

    report = write_report(RunConfig(name="t"), run_dir).read_text()
    assert "## Judge agreement" in report and "### verifier vs rm" in report
    assert "![verifier vs rm](confusion-verifier-vs-rm.png)" in report


def test_limit_takes_all_candidates_of_the_first_prompts_and_a_judge_agrees_with_itself(run_dir, ray_local, tmp_path):
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "verifier.yaml").write_text("type: verifier\n")

    assert main(["compare-judges", TINY, "--run-dir", str(run_dir), "--limit", "2",
                 "--judge", str(tmp_path / "a" / "verifier.yaml"), "--judge", str(tmp_path / "b" / "verifier.yaml")]) == 0  # fmt: skip

    out = run_dir / "compare-judges" / "verifier-1-vs-verifier-2"
    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(scores.prompt_id.unique()) == ["gain", "percent"]  # the first two prompts, in row order
    assert len(scores) == 7 + 4  # every candidate of each
    saved = json.loads((out / "agreement.json").read_text())
    assert (saved["n"], saved["prompts"], saved["limit"]) == (11, 2, 2)
    assert saved["exact"] == saved["kappa"] == saved["kappa_quadratic"] == 1.0
    assert saved["mean_a"] == saved["mean_b"]
