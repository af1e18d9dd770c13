"""The four scenarios and two on-policy rounds, end to end through the CLI on the embedded model.

1. `configs/tiny_scenarios.yaml`: policy, dataset and stand-in other model are sampled and judged
   once; four pair sets → four trainings → four evaluations (+ the policy's own) → the report's
   Table 1 and Table 2 sections; the stand-in's samples are measurably off-policy; OGD on RoPO's
   rotations trains beside s1 and the report has its sections; the run's whole output has no
   traceback and no warning a user cannot act on (`tests/helpers/quiet.py`).
2. The same config with scenario 1 only and `rounds: 2`, from a copy of the first run's round-0
   samples (reused, not re-sampled): round 1 samples from round 0's checkpoint, and a rerun after a
   kill in round 1 resumes there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.helpers.quiet import noisy_lines, user_env

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_scenarios.yaml"
pytestmark = pytest.mark.e2e


def _pipeline(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=user_env())  # fmt: skip


SOURCES = {1: ("policy", "policy"), 2: ("reference", "policy"), 3: ("policy", "other"), 4: ("reference", "other")}
# the four scenarios' variants, and another method beside s1: the OGD update rule on RoPO's
# rotations (issue 10; SimPO's reference-free path is tests/stage/test_train_stage.py's)
OGD_ROPO = "{scenario: 1, update: {type: ogd}, optimizer: rmsprop, parameterisation: {type: ropo}, lr: 1.0e-3}"
VARIANTS = "variants={" + ", ".join(f"s{k}: {{scenario: {k}}}" for k in SOURCES) + f", s1-ogd-ropo: {OGD_ROPO}}}"


@pytest.fixture(scope="module")
def four_scenarios(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The four-scenario run (and OGD on RoPO beside s1), made once: the rounds test starts from its round 0."""
    run_dir = tmp_path_factory.mktemp("scenarios") / "run"
    return run_dir, _pipeline("run", str(CONFIG), VARIANTS, "--run-dir", str(run_dir))


def test_four_scenarios_four_trainings_on_the_same_judged_data(four_scenarios):
    run_dir, result = four_scenarios
    assert result.returncode == 0, result.stderr[-4000:]
    # a run that succeeds is quiet: vLLM engines started and torn down, Ray Train, every stage
    noisy = noisy_lines(result.stdout + result.stderr)
    assert not noisy, "\n".join(noisy)
    round0 = run_dir / "round-0"

    # every source sampled and judged once, each row naming who wrote it
    candidates = {s: pd.read_parquet(round0 / "judge" / s) for s in ("policy", "reference", "other")}
    assert len(candidates["policy"]) == len(candidates["other"]) == 12 * 4 and len(candidates["reference"]) == 12
    assert set(candidates["policy"].model) == {"embedded:smollm2-135m-instruct"} and set(candidates["policy"].sampler) == {"hf"}
    assert set(candidates["reference"].model) == {"dataset"} and set(candidates["reference"].sampler) == {"reference"}
    assert (candidates["reference"].score == 5).all()  # the built-in solutions are right

    sources = SOURCES
    stats = json.loads((round0 / "pairs" / "_manifest.json").read_text())["stats"]
    for k, (chosen, rejected) in sources.items():
        pairs = pq.read_table(round0 / "pairs" / f"s{k}" / "pairs.parquet").to_pandas()
        s = stats[f"s{k}"]
        assert len(pairs) == s["pairs"] >= 1
        assert s["pairs"] + s["dropped_uniform"] + s["dropped_margin"] + s["dropped_unscored"] == 12
        assert (pairs.chosen_source == chosen).all() and (pairs.rejected_source == rejected).all()
        assert (pairs.chosen_score > pairs.rejected_score).all()
        # the text of each side is the named source's candidate
        for side, source in (("chosen", chosen), ("rejected", rejected)):
            by_id = candidates[source].set_index(["prompt_id", "candidate_id"]).response
            texts = [by_id[(p, c)] for p, c in zip(pairs.prompt_id, pairs[f"{side}_candidate_id"])]
            assert [turns[0]["content"] for turns in pairs[side]] == texts

    # one training and one evaluation per scenario, on these pairs
    for k in sources:
        train = json.loads((round0 / "train" / f"s{k}" / "_manifest.json").read_text())
        assert train["stats"]["pairs"] == stats[f"s{k}"]["pairs"] and (round0 / "train" / f"s{k}" / "checkpoint").is_dir()
        summary = json.loads((round0 / "evaluate" / f"s{k}" / "summary.json").read_text())
        assert (summary["scenario"], summary["variant"], summary["pairs"]) == (k, f"s{k}", stats[f"s{k}"]["pairs"])
    # the stand-in other model is off-policy: its samples are less likely under the policy than the policy's own
    before = {k: json.loads((round0 / "evaluate" / f"s{k}" / "summary.json").read_text())["before"] for k in sources}
    assert before[3]["logps_per_token/rejected"] < before[1]["logps_per_token/rejected"]
    assert before[4]["logps_per_token/rejected"] < before[2]["logps_per_token/rejected"]
    report = (run_dir / "report" / "report.md").read_text()
    assert "How on-policy" in report and "base model" in report
    for k in sources:
        assert f"round-0/s{k}" in report

    # another method on the same judged data: OGD on RoPO's rotations (issue 10), through train,
    # evaluate (the layers' hyperspherical energy) and the report's sections
    ogd_ropo = round0 / "train" / "s1-ogd-ropo"
    stats = json.loads((ogd_ropo / "_manifest.json").read_text())["stats"]
    assert stats["trainable_parameters"] == 92160 and "trainable_percent=0.06851" in result.stderr  # q_proj, v_proj
    steps = [json.loads(line) for line in (ogd_ropo / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # RoPO starts at the reference; DPO's loss is logged
    assert all("ogd/coefficient" in r and r["ogd/grad_norm_chosen"] > 0 for r in steps)
    geometry = {v: pd.read_parquet(round0 / "evaluate" / v / "geometry.parquet") for v in ("s1", "s1-ogd-ropo")}
    assert len(geometry["s1"]) == len(geometry["s1-ogd-ropo"]) == 30 * 7  # every decoder layer's 7 matrices
    ropo_change, dpo_change = (geometry[v]["he_relative_change"].abs().max() for v in ("s1-ogd-ropo", "s1"))
    assert ropo_change < 1e-7 and dpo_change > ropo_change, (ropo_change, dpo_change)  # float32 rounding vs DPO's drift
    report = (run_dir / "report" / "report.md").read_text()
    assert "| r0/s1-ogd-ropo | ogd + ropo |" in report.split("## OGD beside DPO")[1].split("\n## ")[0]
    assert "| r0/s1-ogd-ropo | ogd + ropo | 0.06851% |" in report.split("## RoPO beside DPO")[1].split("\n## ")[0]
    methods = report.split("## Methods (Table 10)")[1].split("\n## ")[0]
    assert "| base model |" in methods and "| dpo (s1) |" in methods and "| ogd + ropo (s1-ogd-ropo) |" in methods


def test_every_checkpoint_is_evaluated_with_intervals_sets_forgetting_and_the_unseen_proxy(four_scenarios):
    """Issue 12 on the same run: two held-out sets and a forgetting task answered in one pass per
    model, intervals that contain their estimate, the unseen proxy from the policy's own answers,
    and the report (markdown and a page whose every image loads in headless Chromium)."""
    from pipeline.cli import main
    from tests.helpers.browser import images_in_browser

    run_dir, result = four_scenarios
    assert result.returncode == 0, result.stderr[-4000:]
    round0 = run_dir / "round-0" / "evaluate"
    base = json.loads((round0 / "policy" / "summary.json").read_text())
    answers = pd.read_parquet(round0 / "policy" / "generations.parquet")
    assert answers.groupby("set").size().to_dict() == {"in_domain": 4, "ood": 4, "forgetting/times_table": 4}
    assert answers[answers.set == "ood"].prompt_id.str.startswith("ood/").all()
    for k in (1, 2, 3, 4):
        s = json.loads((round0 / f"s{k}" / "summary.json").read_text())
        for name in ("in_domain", "ood"):
            block = s["sets"][name]
            assert block["prompts"] == 4 and block["dropped_overlap"] == 0
            for key in ("5_points", "4&5_points", "response_tokens"):
                low, high = block[f"{key}_ci"]
                assert low <= block[key] <= high
        task = s["forgetting"]["times_table"]
        assert task["prompts"] == 4 and task["accuracy"] in (0, 0.25, 0.5, 0.75, 1)
        # the unseen proxy reads the round's policy's own 4 in-domain answers: "before" is the same for every variant
        unseen = s["unseen"]
        assert unseen["answers"] == 4 and unseen["before"]["logps_per_token"] < 0
        assert unseen["before"] == json.loads((round0 / "s1" / "summary.json").read_text())["unseen"]["before"]
    assert base["sets"]["in_domain"]["prompts"] == base["prompts"] == 4

    assert main(["report", str(run_dir)]) == 0  # the report command on a run dir (its own config.yaml)
    report = (run_dir / "report" / "report.md").read_text()
    for section in ("Held-out evaluation", "Held-out sets and answer length", "Forgetting (TAX)",
                    "How on-policy is the data?", "3D-properties: where the probability mass went",
                    "Diversity and geometry", "Data", "Training"):
        assert f"\n## {section}" in report, section
    assert "against the round's policy on 4 paired prompts:" in report
    pngs = sorted((run_dir / "report").glob("*.png"))
    assert {"forgetting.png", "he_change.png", "eval_scores.png"} <= {p.name for p in pngs}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = images_in_browser(run_dir / "report" / "index.html")
    assert len(page["images"]) == report.count("![") >= 5
    assert all(img["loaded"] for img in page["images"]), page["images"]


def _kill_when(cmd: list[str], ready, timeout: float = 900) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group once `ready()` holds."""
    import os
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run never reached the point to kill it"
            time.sleep(0.5)
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)


def _mean_token_logp(model, frame: pd.DataFrame) -> float:
    """Mean per-token log-prob of the sampled responses under `model` (one forward per candidate)."""
    import torch

    values = []
    with torch.no_grad():
        for prompt, response in zip(frame.prompt_token_ids, frame.response_token_ids):
            ids = torch.tensor([list(prompt) + list(response)])
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            values.append(logps[len(prompt) - 1 :].mean().item())
    return sum(values) / len(values)


def test_two_rounds_sample_from_the_newest_checkpoint_and_resume(four_scenarios, tmp_path):
    """Scenario 1 only, two rounds, from a copy of the four-scenario run's round-0 policy samples,
    judgements and evaluation: another config whose keys match finds them finished and reuses
    them (a new variant or round trains without re-sampling); round 0's training differs (lr) and
    reruns. Killed in round 1's training, run again, it resumes there."""
    import shutil

    run_dir = tmp_path / "run"
    for part in ("sample/policy", "judge/policy", "evaluate/policy"):
        shutil.copytree(four_scenarios[0] / "round-0" / part, run_dir / "round-0" / part)
    reused = (run_dir / "round-0" / "sample" / "policy" / "_manifest.json").read_text()
    args = ["run", str(CONFIG), "pairs.scenarios=[1]", "other_sampler=null", "rounds=2", "train.lr=1e-4",
            "--run-dir", str(run_dir)]  # fmt: skip
    round1 = run_dir / "round-1"
    _kill_when([sys.executable, "-m", "pipeline", *args], lambda: any((round1 / "train").glob(".s1.partial-*")))
    assert (run_dir / "round-0" / "evaluate" / "s1" / "_manifest.json").is_file()
    assert (run_dir / "round-0" / "sample" / "policy" / "_manifest.json").read_text() == reused, "round 0 was re-sampled"
    result = _pipeline(*args)
    assert result.returncode == 0, result.stderr[-4000:]
    for node in ("sample/policy", "judge/policy", "pairs", "train/s1", "evaluate/policy", "evaluate/s1"):
        assert f"round 0 {node}: up to date" in result.stderr, node
    assert "round 1 sample/policy: up to date" in result.stderr and "round 1 train/s1: running" in result.stderr

    first, second = (pd.read_parquet(run_dir / f"round-{r}" / "sample" / "policy") for r in (0, 1))
    assert set(second.model) == {"round-0/s1"}  # round 1 sampled round 0's checkpoint
    # same prompts, same seed: only the weights differ, and so do the samples and their likelihood
    assert sorted(first.prompt_id.unique()) == sorted(second.prompt_id.unique())
    key = ["prompt_id", "candidate_id"]
    joined = first.set_index(key).response.to_frame("r0").join(second.set_index(key).response.to_frame("r1"))
    assert (joined.r0 != joined.r1).mean() > 0.25
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"), dtype=torch.float32)
    assert abs(_mean_token_logp(base, first) - _mean_token_logp(base, second)) > 1e-3
    # round 1's training started from round 0's checkpoint, against it as the reference (ref_model: previous)
    summary = json.loads((round1 / "evaluate" / "s1" / "summary.json").read_text())
    assert summary["before"]["model"] == "round-0/s1" and summary["model"] == "round-1/s1"
    # round 1's policy is round 0's checkpoint: its held-out answers are round 0's evaluation of it
    policy1 = json.loads((round1 / "evaluate" / "policy" / "_manifest.json").read_text())["stats"]
    assert policy1["reused"] and policy1["summary"]["model"] == "round-0/s1"
    reused = pd.read_parquet(round1 / "evaluate" / "policy" / "generations.parquet")
    assert reused.response.tolist() == pd.read_parquet(run_dir / "round-0/evaluate/s1/generations.parquet").response.tolist()
    report = (run_dir / "report" / "report.md").read_text()
    assert "round-1 policy" in report and "round-1/s1" in report
