"""The whole pipeline through its CLI on the embedded model (configs/tiny.yaml), killed and resumed.

1. `python -m pipeline run configs/tiny.yaml` is killed (SIGKILL, whole process group) while the
   train stage is running;
2. the same command again finishes: finished stages are skipped, train re-runs from scratch,
   the row counts are those of the config and no row is duplicated, and its whole output has no
   traceback and no warning a user cannot act on (`tests/helpers/quiet.py`);
3. the artifacts are checked: layout, manifests, TRL pair columns, metrics, a checkpoint that
   transformers loads, the report;
4. a third run skips everything;
5. after an edit of `pairs.*`, `stage train` refuses the stale pairs and names the command to run;
6. `compare-judges` scores the run's real candidates with the verifier and with the rubric judge
   on vLLM's own OpenAI-compatible server (the embedded model as the judge), and the report shows
   their agreement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import JUDGE_KEY_ENV
from tests.helpers.quiet import noisy_lines, user_env

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.e2e


def _cli(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(TINY), "--run-dir", str(run_dir), *args]


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=user_env())


def _kill_when(cmd: list[str], ready, timeout: float = 600) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group once `ready()` holds."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run never reached the point to kill it"
            time.sleep(0.5)
        time.sleep(3)  # well inside the stage
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The tiny run's folder, shared by the tests below (the first one makes it)."""
    return tmp_path_factory.mktemp("e2e") / "run"


def test_killed_run_resumes_and_produces_a_loadable_checkpoint(run_dir):
    round0 = run_dir / "round-0"
    # 1. kill it while train runs
    _kill_when(_cli(run_dir), lambda: any((round0 / "train").glob(".s1.partial-*")))
    assert (round0 / "pairs" / "_manifest.json").is_file()
    assert not (round0 / "train" / "s1").exists(), "a killed stage must not leave a finished-looking folder"
    sample_manifest = json.loads((round0 / "sample" / "policy" / "_manifest.json").read_text())

    # 2. resume
    result = _run(_cli(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    for node in ("sample/policy", "judge/policy", "pairs"):
        assert f"round 0 {node}: up to date" in log
    assert "round 0 train/s1: running" in log
    assert not list(round0.rglob(".*.tmp-*")) and not list(round0.rglob(".*.partial-*")), "temporary folders left behind"
    assert json.loads((round0 / "sample" / "policy" / "_manifest.json").read_text()) == sample_manifest
    # a run that succeeds is quiet: train (Ray Train) and evaluate (vLLM engines, started and torn down)
    noisy = noisy_lines(result.stdout + result.stderr)
    assert not noisy, "\n".join(noisy)

    # 3. artifacts
    candidates = pd.read_parquet(round0 / "sample" / "policy")
    assert len(candidates) == 8 * 4 == sample_manifest["stats"]["rows"]
    assert not candidates.duplicated(["prompt_id", "candidate_id"]).any()
    judged = pd.read_parquet(round0 / "judge" / "policy")
    assert len(judged) == len(candidates) and judged.score.between(1, 5).all()

    pairs_manifest = json.loads((round0 / "pairs" / "_manifest.json").read_text())
    pairs = pq.read_table(round0 / "pairs" / "s1" / "pairs.parquet").to_pylist()
    assert len(pairs) == pairs_manifest["stats"]["s1"]["pairs"] >= 2
    s1 = pairs_manifest["stats"]["s1"]
    assert s1["pairs"] + s1["dropped_uniform"] + s1["dropped_margin"] + s1["dropped_unscored"] == 8
    assert {"prompt", "chosen", "rejected", "prompt_id", "chosen_score", "rejected_score", "scenario"} <= set(pairs[0])
    from trl.data_utils import is_conversational

    assert all(is_conversational(p) for p in pairs)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)

    train = round0 / "train" / "s1"
    metrics = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
    train_manifest = json.loads((train / "_manifest.json").read_text())
    assert len(metrics) == train_manifest["stats"]["steps"] >= 1
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)), "duplicated metric lines"
    assert abs(metrics[0]["loss"] - 0.693147) < 1e-4  # policy == reference at step 1
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in metrics[0]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(train / "checkpoint", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(train / "checkpoint")
    ids = tokenizer("The answer is", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert sum(p.numel() for p in model.parameters()) > 100e6  # the real 135M model, not a stub

    base = json.loads((round0 / "evaluate" / "policy" / "summary.json").read_text())
    summary = json.loads((round0 / "evaluate" / "s1" / "summary.json").read_text())
    assert (summary["variant"], summary["scenario"], summary["model"]) == ("s1", 1, "round-0/s1")
    for side in (base, summary):
        assert 0 <= side["5_points"] <= side["4&5_points"] <= 1
    for name in ("policy", "s1"):  # 4 held-out prompts, one greedy answer each
        assert len(pd.read_parquet(round0 / "evaluate" / name / "generations.parquet")) == 4 + 2  # + 2 forgetting prompts
    # evaluate's "before" logps are the reference logps training saw at step 1
    logps = pd.read_parquet(round0 / "evaluate" / "s1" / "logps.parquet")
    before = logps[logps.side == "before"].set_index("prompt_id")
    reference = pd.read_parquet(train / "reference_logps.parquet").set_index("prompt_id")
    assert sorted(before.index) == sorted(reference.index) == sorted(p["prompt_id"] for p in pairs)
    # the same numbers, bit for bit: configs/tiny.yaml trains in bf16 like the default, where the
    # batch shapes and the thread count change the rounding (a 2-thread pass was 1.4 nats off)
    assert (before.logps_chosen - reference.ref_chosen_logps).abs().max() < 1e-6
    assert (before.logps_rejected - reference.ref_rejected_logps).abs().max() < 1e-6
    after = logps[logps.side == "after"].set_index("prompt_id")
    assert (after.logps_chosen - before.logps_chosen).abs().max() > 1e-3, "training moved nothing"
    report = (run_dir / "report" / "report.md").read_text()
    assert "5 points" in report and "base model" in report and "round-0/s1" in report
    assert (run_dir / "report" / "train_curves.png").stat().st_size > 5000
    assert "report:" in result.stdout and "base model" in result.stdout

    # 4. nothing left to do
    again = _run(_cli(run_dir))
    assert again.returncode == 0
    assert again.stderr.count("up to date") == 6  # sample, judge, pairs, train, evaluate of the policy and of s1

    # 5. an edit of pairs.* makes the pairs stale: training alone refuses them and says what to run
    stale = _run([sys.executable, "-m", "pipeline", "stage", "train", str(TINY), "pairs.min_margin=2",
                  "--run-dir", str(run_dir)], timeout=300)  # fmt: skip
    assert stale.returncode == 2, stale.stderr[-2000:]
    assert "round-0/pairs, which is out of date with the config (its config (pairs) changed)" in stale.stderr
    assert f"`python -m pipeline stage pairs {TINY}`" in stale.stderr and "Traceback" not in stale.stderr


def test_compare_judges_on_the_runs_candidates_with_vllms_server_as_the_rubric_judge(run_dir, vllm_openai_server, tmp_path):
    rubric_judge = tmp_path / "smollm2.yaml"
    rubric_judge.write_text(
        f"type: openai\nmodel: smollm2\nbase_url: {vllm_openai_server}\napi_key_env: {JUDGE_KEY_ENV}\n"
        f"max_tokens: 160\nmax_retries: 0\nconcurrency: 16\ncache_dir: {tmp_path / 'cache'}\n"
    )
    verifier = tmp_path / "verifier.yaml"
    verifier.write_text("type: verifier\n")
    # the first 4 of the 8 prompts (16 candidates): a 135M judge writes 160 tokens a row on the CPU
    result = _run([sys.executable, "-m", "pipeline", "compare-judges", str(TINY), "--judge", str(verifier),
                   "--judge", str(rubric_judge), "--run-dir", str(run_dir), "--limit", "4"], timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    out = run_dir / "compare-judges" / "verifier-vs-smollm2"
    scores = pd.read_parquet(out / "scores.parquet")
    candidates = pd.read_parquet(run_dir / "round-0" / "sample" / "policy")
    candidates = candidates[candidates.prompt_id.isin(list(dict.fromkeys(candidates.prompt_id))[:4])]
    assert len(candidates) == 16
    assert sorted(zip(scores.prompt_id, scores.candidate_id)) == sorted(zip(candidates.prompt_id, candidates.candidate_id))
    # every row scored by the 135M judge, or kept unscored with the reason
    judged = scores.score_smollm2.notna()
    assert scores.score_smollm2[judged].between(1, 5).all() and judged.sum() >= len(scores) // 2
    assert (scores.reason_smollm2[judged] == "judged").all()
    assert scores.reason_smollm2[~judged].str.match(r"^(unparseable: |http \d{3})").all()
    agreement = json.loads((out / "agreement.json").read_text())
    assert agreement["n"] == judged.sum() and agreement["n"] + agreement["n_excluded"] == len(candidates)
    assert "Cohen's κ:" in result.stdout and "quadratic-weighted κ:" in result.stdout
    report = _run([sys.executable, "-m", "pipeline", "report", str(TINY), "--run-dir", str(run_dir)], timeout=120)
    assert report.returncode == 0 and "Judge agreement" in (run_dir / "report" / "report.md").read_text()


def test_user_errors_end_with_one_message_and_no_traceback(tmp_path):
    cases = {
        "sampler.n=abc": "sampler.n",
        "train.lrr=1": "train.lrr: unknown key",
        'data={"type":"file"}': "data.path: required key is missing",
        f'data={{"type":"file","path":"{tmp_path / "missing.jsonl"}"}}': "prompt file not found",
        f"policy={tmp_path / 'no-model'}": "model not found",
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\n{"prompt": "2+2?"}\n')
    cases[f'data={{"type":"file","path":"{bad}"}}'] = "line 1: no field 'prompt'"
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"prompt": "1+1?"}\n{"prompt": "2+2?"}\n')
    cases[f'data={{"type":"file","path":"{no_answers}"}}'] = "have no reference answer"
    cases[f'data={{"type":"file","path":"{no_answers}","eval_fraction":0}}'] = "held-out (eval) split is empty"
    for overrides, expected in cases.items():
        result = _run([sys.executable, "-m", "pipeline", "run", str(TINY), *overrides.split(), "--run-dir", str(tmp_path / "r")], timeout=120)
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        assert expected in result.stderr, (overrides, result.stderr)
        assert "Traceback" not in result.stderr, (overrides, result.stderr)
    assert not (tmp_path / "r" / "round-0").exists(), "bad input must stop before any work"


def test_a_stage_without_its_inputs_names_the_stage_to_run_first(tmp_path):
    result = _run([sys.executable, "-m", "pipeline", "stage", "train", str(TINY), "--run-dir", str(tmp_path)], timeout=120)
    assert result.returncode == 2
    assert f"round-0/pairs, which is not finished: run `python -m pipeline stage pairs {TINY}` first" in result.stderr
    assert "Traceback" not in result.stderr
