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
