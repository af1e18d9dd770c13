"""The train stage end to end on the tiny Llama: Ray Train, 2 FSDP2 workers, real DPO steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.errors import UserError

TRL_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm"]  # fmt: skip


def _pairs(n: int) -> pd.DataFrame:
    """n conversational pairs in TRL's format (and the pairs stage's prompt_id column)."""
    rows = []
    for i in range(n):
        a, b = i + 2, 3 * i + 1
        rows.append({
            "prompt": [{"role": "user", "content": f"Tom has {a} bags of {b} apples. How many apples?"}],
            "chosen": [{"role": "assistant", "content": f"{a} × {b} = {a * b} apples. The answer is {a * b}."}],
            "rejected": [{"role": "assistant", "content": f"The answer is {a + b + i}." + " 0 1 2" * (i % 3)}],
            "prompt_id": f"p{i:03d}",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _write_pairs(root: Path, n: int) -> Path:
    folder = root / "pairs"
    (folder / "s1").mkdir(parents=True)
    _pairs(n).to_parquet(folder / "s1" / "pairs.parquet", index=False)
    return folder


def test_train_stage_runs_dpo_and_saves_a_checkpoint(tiny_llama, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train import run
    from stages.train.loop import epoch_order

    pairs = _write_pairs(tmp_path, 8)
    cfg = RunConfig.model_validate(
        {"policy": str(tiny_llama), "train": {"batch_size": 4, "num_workers": 2, "lr": 1e-3, "epochs": 2}}
    )
    out = tmp_path / "train"
    out.mkdir()
    stats = run(cfg, {"policy": str(tiny_llama), "pairs": str(pairs)}, out)

    assert stats["steps"] == 4
    assert stats["pairs"] == 8 and stats["batch_size"] == 4

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # 8 pairs / 4 per step × 2 epochs
    for record in lines:
        for key in TRL_KEYS:
            assert key in record, key
            assert math.isfinite(record[key]), (key, record)
        assert 0.0 <= record["rewards/accuracies"] <= 1.0
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"], abs=1e-5)
        assert record["logps/chosen"] < 0 and record["logps/rejected"] < 0
        assert record["grad_norm"] > 0

    first, last = lines[0], lines[-1]
    # Step 1: the policy is the reference, so every h = 0 and the loss is -log σ(0) = ln 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # At lr 1e-3 the second epoch (the same pairs again) is already ordered right.
    assert last["loss"] < first["loss"] - 1e-3, lines
    assert last["rewards/margins"] > first["rewards/margins"], lines

    # The reference log-probs step 1 was measured from: one row per pair, in the pairs file's order.
    ref = pd.read_parquet(out / "reference_logps.parquet")
    assert list(ref.columns) == ["prompt_id", "ref_chosen_logps", "ref_rejected_logps"]
    assert list(ref["prompt_id"]) == list(_pairs(8)["prompt_id"])
    assert ref[["ref_chosen_logps", "ref_rejected_logps"]].map(math.isfinite).all().all()
    assert (ref[["ref_chosen_logps", "ref_rejected_logps"]] < 0).all().all()
    step_one = epoch_order(8, cfg.train.seed, 0)[:4]  # the pairs of step 1, whose policy logps are the reference's
    assert ref["ref_chosen_logps"].iloc[step_one].mean() == pytest.approx(first["logps/chosen"], abs=1e-4)
    assert ref["ref_rejected_logps"].iloc[step_one].mean() == pytest.approx(first["logps/rejected"], abs=1e-4)

    # The checkpoint is a plain HF folder with updated weights and the same tokenizer.
    ckpt = out / "checkpoint"
    trained, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    before, after = initial.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    # AdamW moves every parameter that has a gradient, by about lr per step.
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], f"the optimizer never updated {unchanged}"
    assert all(torch.isfinite(v).all() for v in after.values())

    tok0, tok1 = AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(ckpt)
    text = "Tom has 3 bags of 4 apples: 3 × 4 = 12 apples. The answer is 12."
    assert tok1(text)["input_ids"] == tok0(text)["input_ids"]
    chat = [{"role": "user", "content": "16 ÷ 2 = ?"}]
    assert tok1.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == tok0.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert (tok1.eos_token_id, tok1.pad_token_id) == (tok0.eos_token_id, tok0.pad_token_id)

    # The trained model runs in plain transformers.
    with torch.no_grad():
        logits = trained(input_ids=torch.tensor([tok0(text)["input_ids"]])).logits
    assert torch.isfinite(logits).all()


def _with_attention_dropout(tiny_llama: Path, dest: Path, p: float) -> Path:
    """The tiny Llama (same weights and tokenizer) with `attention_dropout = p` in its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.config.attention_dropout = p
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(dest)
    return dest


def test_step_one_is_the_reference_for_a_model_with_dropout(tiny_llama, ray_local, tmp_path):
    """The reference pass runs under no_grad in eval mode, training in train mode: with the
    config's attention dropout (0.5) left on, step 1's loss is not ln 2 (it fails without
    `disable_dropout`). The checkpoint keeps the user's dropout setting."""
    from transformers import AutoConfig

    from stages.train import run

    policy = _with_attention_dropout(tiny_llama, tmp_path / "llama-dropout", 0.5)
    pairs = _write_pairs(tmp_path, 4)
    cfg = RunConfig.model_validate(
        {"policy": str(policy), "train": {"batch_size": 4, "num_workers": 2, "max_steps": 1, "dtype": "float32"}}
    )
    out = tmp_path / "train"
    out.mkdir()
    run(cfg, {"policy": str(policy), "pairs": str(pairs)}, out)

    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert AutoConfig.from_pretrained(out / "checkpoint").attention_dropout == 0.5


def test_one_pair_for_two_workers_is_a_user_error(tiny_llama, ray_local, tmp_path):
    from stages.train import run

    pairs = _write_pairs(tmp_path, 1)
    cfg = RunConfig.model_validate({"policy": str(tiny_llama), "train": {"batch_size": 4, "num_workers": 2}})
    out = tmp_path / "train"
    out.mkdir()
    with pytest.raises(UserError, match="1 preference pair"):
        run(cfg, {"policy": str(tiny_llama), "pairs": str(pairs)}, out)
    assert not (out / "metrics.jsonl").exists()


def test_a_reference_model_other_than_the_policy_sets_the_rewards(tiny_llama, ray_local, tmp_path):
    """`next_round.ref_model: initial` in round k > 0: π_ref is another model than the one training
    starts from. Its log-probs (an independent float32 forward here) are the reference, so step 1
    is no longer "policy = reference": the margin is the two models' difference, not 0."""
    from tests.conftest import build_tiny_llama
    from stages.evaluate.logps import pair_logps
    from stages.train import run

    reference = build_tiny_llama(tmp_path / "reference", seed=1)
    pairs = _write_pairs(tmp_path, 4)
    cfg = RunConfig.model_validate(
        {"policy": str(tiny_llama), "train": {"batch_size": 4, "num_workers": 2, "max_steps": 1, "dtype": "float32", "lr": 1e-9}}
    )
    out = tmp_path / "train"
    out.mkdir()
    run(cfg, {"policy": str(tiny_llama), "ref_model": str(reference), "pairs": str(pairs)}, out)

    ref = pd.read_parquet(out / "reference_logps.parquet")
    import ray

    expected = ray.get(pair_logps.remote(str(reference), str(pairs / "s1" / "pairs.parquet"), 512, None, "float32"))
    policy = ray.get(pair_logps.remote(str(tiny_llama), str(pairs / "s1" / "pairs.parquet"), 512, None, "float32"))
    assert ref.ref_chosen_logps.to_numpy() == pytest.approx(expected.logps_chosen.to_numpy(), abs=1e-4)
    assert ref.ref_rejected_logps.to_numpy() == pytest.approx(expected.logps_rejected.to_numpy(), abs=1e-4)
    assert (ref.ref_chosen_logps - policy.logps_chosen).abs().max() > 0.1  # the two models differ
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    beta = cfg.train.method.beta
    margins = beta * ((policy.logps_chosen - expected.logps_chosen) - (policy.logps_rejected - expected.logps_rejected))
    assert first["rewards/margins"] == pytest.approx(float(margins.mean()), abs=1e-4)


def _train(tiny_llama: Path, tmp_path: Path, train: dict, n_pairs: int = 8) -> tuple[dict, Path]:
    from stages.train import run

    pairs = _write_pairs(tmp_path, n_pairs)
    cfg = RunConfig.model_validate({"policy": str(tiny_llama), "train": train})
    out = tmp_path / "train"
    out.mkdir()
    return run(cfg, {"policy": str(tiny_llama), "pairs": str(pairs)}, out), out


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_simpo_skips_the_reference_and_logs_the_3d_diagnostics(tiny_llama, ray_local, tmp_path):
    """SimPO is reference-free: no reference pass (no reference_logps.parquet), no logratios; every
    step logs per-token logps and |∂L/∂logp|, diagnostic steps (1, 3 and the last) the chosen and
    rejected terms' parameter-gradient norms; all of it also in TensorBoard event files. Micro-batches
    of 1 (accumulation 2 per worker) on the way."""
    from tests.helpers.tensorboard_reader import scalars

    train = {"batch_size": 4, "num_workers": 2, "micro_batch_size": 1, "lr": 1e-3, "epochs": 2, "held_out_pairs": 2,
             "eval_every": 2, "method": {"type": "simpo", "beta": 2.0, "gamma": 0.5}, "diagnostics_every": 2,
             "lr_schedule": "cosine"}  # fmt: skip
    stats, out = _train(tiny_llama, tmp_path, train, n_pairs=10)
    assert stats["steps"] == 4  # 8 trained pairs, 2 held out
    assert not (out / "reference_logps.parquet").exists()
    lines = _lines(out)
    for record in lines:
        assert "logratios/rejected" not in record
        # SimPO's rewards are β·logp/|y|, the per-token logps times β
        assert record["rewards/chosen"] == pytest.approx(2.0 * record["logps/chosen_per_token"], rel=1e-4)
        assert record["grads/chosen_logps"] > 0 and record["grads/rejected_logps"] > 0
    # Step 1 of SimPO is not ln 2 (no reference): loss = mean −log σ(β(c̄ − r̄) − γ), with c̄, r̄ logged
    assert [("grad_norm/chosen" in r) for r in lines] == [True, False, True, True]
    # the held-out pairs every `eval_every` steps: SimPO's implicit-reward accuracy, as a reward model logs its own
    assert [("eval_rewards/accuracies" in r) for r in lines] == [False, True, False, True]
    assert all(0.0 <= r["eval_rewards/accuracies"] <= 1.0 and r["eval_loss"] > 0 for r in (lines[1], lines[3]))
    for r in (lines[0], lines[2], lines[3]):
        assert r["grad_norm/chosen"] > 0 and r["grad_norm/rejected"] > 0
        # the two terms' gradients add up to the step's: the triangle inequality bounds the total
        assert r["grad_norm"] <= r["grad_norm/chosen"] + r["grad_norm/rejected"] + 1e-6
    assert [r["lr"] for r in lines] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert lines[-1]["loss"] < lines[0]["loss"]
    logged = scalars(out / "tensorboard")
    assert [s for s, _ in logged["train/loss"]] == [r["step"] for r in lines]
    assert [v for _, v in logged["train/loss"]] == pytest.approx([r["loss"] for r in lines], rel=1e-5)
    assert [s for s, _ in logged["train/grad_norm/chosen"]] == [1, 3, 4]


def test_a_reward_model_logs_held_out_accuracy_and_its_checkpoint_is_a_judge(tiny_llama, ray_local, tmp_path):
    """seed 003 §5.3 on the tiny Llama: `method: {type: reward_model}` trains on 8 pairs, the last 4
    of 12 held out, and logs held-out preference accuracy every step under the name every method
    uses (`eval_rewards/accuracies`; a policy's: the SimPO test below); the checkpoint is a
    one-output sequence-classification model the reward-model judge loads, and the judge's rewards
    of the held-out pairs are the ones training measured (train and judge read a pair alike);
    evaluate reports the judge's accuracy."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.config import RewardModelJudge
    from stages import evaluate
    from stages.judge.reward_model import RewardScorer
    from stages.judge.reward_model import preflight as judge_preflight

    common = {"batch_size": 4, "num_workers": 2, "lr": 1e-3, "epochs": 2, "held_out_pairs": 4, "diagnostics_every": None}
    rm_stats, rm = _train(tiny_llama, tmp_path / "rm", common | {"method": {"type": "reward_model"}}, n_pairs=12)
    assert rm_stats["steps"] == 4 and rm_stats["held_out_pairs"] == 4  # 8 trained pairs / 4 × 2 epochs
    assert not (rm / "reference_logps.parquet").exists()
    rm_lines = _lines(rm)
    assert [r["step"] for r in rm_lines] == [1, 2, 3, 4]
    assert all(0.0 <= r["eval_rewards/accuracies"] <= 1.0 and math.isfinite(r["eval_loss"]) for r in rm_lines)
    assert all(r["eval_accuracy"] == r["eval_rewards/accuracies"] for r in rm_lines)  # TRL's RM name, same number
    assert rm_lines[-1]["loss"] < rm_lines[0]["loss"]
    assert "logps/chosen" not in rm_lines[0] and "accuracy" in rm_lines[0] and "margin" in rm_lines[0]

    model, info = AutoModelForSequenceClassification.from_pretrained(rm / "checkpoint", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    judge = RewardModelJudge(model=str(rm / "checkpoint"), max_length=256, thresholds=None)
    judge_preflight(judge, None)  # a judge as it is
    held = _pairs(12).iloc[8:]
    scorer = RewardScorer(str(rm / "checkpoint"), judge)
    rewards = {side: scorer(pd.DataFrame({"messages": held["prompt"], "response": [t[0]["content"] for t in held[side]]}))
               ["reward"].to_numpy() for side in ("chosen", "rejected")}  # fmt: skip
    assert rewards["chosen"].mean() == pytest.approx(rm_lines[-1]["eval_rewards/chosen"], abs=1e-4)
    assert rewards["rejected"].mean() == pytest.approx(rm_lines[-1]["eval_rewards/rejected"], abs=1e-4)
    accuracy = float((rewards["chosen"] > rewards["rejected"]).mean())
    assert accuracy == rm_lines[-1]["eval_accuracy"]

    # evaluate: no answers from a reward model, its accuracy on the held-out pairs through the judge
    cfg = RunConfig.model_validate({"policy": str(tiny_llama), "train": common | {"method": {"type": "reward_model"},
                                                                                   "max_length": 256}})  # fmt: skip
    (tmp_path / "eval").mkdir()
    stats = evaluate.run(cfg, {"policy": str(tiny_llama), "policy_name": "tiny", "train": str(rm),
                               "pairs": str(tmp_path / "rm" / "pairs")}, tmp_path / "eval")  # fmt: skip
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["method"] == "reward_model" and summary["preference"]["held_out"] is True
    assert summary["preference"]["pairs"] == 4 and summary["preference"]["accuracy"] == accuracy
    assert stats["summary"] == summary and not (tmp_path / "eval" / "generations.parquet").exists()


def test_the_guard_fires_in_a_run_and_changes_the_method(tiny_llama, ray_local, tmp_path):
    """below_reference = 1e-6 nats: step 1 is the reference (log-ratio 0), so the guard fires at the
    first step whose rejected log-ratio is below 0, once, and DPO becomes Flex-DPO with β− halved:
    from then on the rewards of the rejected side are measured with β− = 0.05."""
    train = {"batch_size": 4, "num_workers": 2, "lr": 1e-3, "epochs": 3,
             "guard": {"drop_per_step": None, "below_reference": 1e-6, "action": "lower_beta_rejected", "factor": 0.5}}  # fmt: skip
    _, out = _train(tiny_llama, tmp_path, train)
    lines = _lines(out)
    fired = [r for r in lines if r.get("guard")]
    assert len(fired) == 1, lines
    k = fired[0]["step"]
    assert all(r["logratios/rejected"] >= -1e-6 for r in lines[: k - 1])
    assert fired[0]["logratios/rejected"] < -1e-6 and "flex_dpo" in fired[0]["guard"]
    for r in lines:
        beta_rejected = 0.05 if r["step"] > k else 0.1
        assert r["rewards/rejected"] == pytest.approx(beta_rejected * r["logratios/rejected"], rel=1e-4, abs=1e-7)
    assert k < len(lines), "the guard must fire before the last step for the test to see the change"


def test_a_nan_loss_stops_the_run_naming_the_step(tiny_llama, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_TRAIN_INJECT_NAN_AT_STEP", "2")
    with pytest.raises(UserError, match=r"training stopped: non-finite loss or gradient at step 2: loss=nan") as err:
        _train(tiny_llama, tmp_path, {"batch_size": 4, "num_workers": 2, "lr": 1e-3, "epochs": 2})
    assert "Traceback" not in str(err.value)
    out = tmp_path / "train"
    assert [r["step"] for r in _lines(out)] == [1]  # step 2 was never logged, nor applied
    assert not (out / "checkpoint").exists()


# ── checkpoints and failures ─────────────────────────────────────────────────────────────────
FT_TRAIN = {"batch_size": 4, "num_workers": 2, "lr": 1e-3, "epochs": 3, "checkpoint_every": 2, "dtype": "float32",
            "lr_schedule": "linear", "warmup_steps": 1}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, ray_local, tmp_path_factory) -> list[dict]:
    """FT_TRAIN's 6 steps with nothing killed: what a restored run must reproduce."""
    _, out = _train(tiny_llama, tmp_path_factory.mktemp("uninterrupted"), FT_TRAIN)
    return _lines(out)


def _same_steps(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # one line per step: none lost, none twice
    for g, w in zip(got, want):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)


# A worker killed mid-run and restored by Ray Train (`max_failures`): tests/stage/test_train_ogd_ropo.py,
# on the OGD update rule and RoPO parameters (the restore path is the same for every method; a
# killed stage run again, below, restores DPO).


def test_a_killed_train_stage_run_again_resumes_from_its_last_checkpoint(uninterrupted, tiny_llama, ray_local,
                                                                          tmp_path, monkeypatch):  # fmt: skip
    """The runner's way: the stage works in a resumable folder (`atomic_dir(resumable=True)`); a worker
    dies after step 3 with no restarts allowed, so the stage fails and its folder stays; run again with
    the same config, it resumes after step 2 instead of starting over."""
    from pipeline.artifacts import atomic_dir
    from stages.train import run

    pairs = _write_pairs(tmp_path, 8)
    cfg = RunConfig.model_validate({"policy": str(tiny_llama), "train": FT_TRAIN})
    final, inputs = tmp_path / "train", {"policy": str(tiny_llama), "pairs": str(pairs)}
    monkeypatch.setenv("PIPELINE_TRAIN_KILL", "1:3")
    with pytest.raises(Exception):
        with atomic_dir(final, {"key": "k"}, resumable=True) as work:
            run(cfg, inputs, work)
    partial = tmp_path / ".train.partial-k"
    assert [r["step"] for r in _lines(partial)] == [1, 2, 3]
    assert sorted(p.name for p in (partial / ".ray-train" / "train").glob("step-*")) == ["step-000002"]
    # A NaN at step 1 would stop a run that started over; a resumed one never runs step 1 again.
    monkeypatch.setenv("PIPELINE_TRAIN_INJECT_NAN_AT_STEP", "1")
    with atomic_dir(final, {"key": "k"}, resumable=True) as work:
        run(cfg, inputs, work)
    lines = _lines(final)
    _same_steps(lines, uninterrupted)
    assert [r.get("restored_from_step") for r in lines] == [None, None, 2, None, None, None]
