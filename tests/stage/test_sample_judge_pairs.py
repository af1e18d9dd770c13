"""sample → judge → pairs on real Ray and the real vLLM CPU engine, with a tiny random Llama.

One engine start (~40 s) feeds all three stages, so they share a module-scoped fixture.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import stages.pairs
import stages.sample
from pipeline.config import RunConfig
from pipeline.data import load_prompts
from tests.conftest import S3_BUCKET

N_PROMPTS, N = 6, 4


@pytest.fixture(scope="module")
def cfg(tiny_llama) -> RunConfig:
    return RunConfig.model_validate({
        "policy": str(tiny_llama),
        "data": {"type": "builtin_math", "num_train": N_PROMPTS, "num_eval": 2},
        "sampler": {"type": "vllm", "n": N, "max_tokens": 24, "temperature": 1.0, "dtype": "float32",
                    "max_model_len": 512, "batch_size": 8},
    })  # fmt: skip


@pytest.fixture(scope="module")
def sampled(cfg, tiny_llama, ray_local, s3, tmp_path_factory) -> Path:
    """The policy is read from an object store, as round k > 0 of a run dir on s3:// reads its
    checkpoint: the vLLM engine gets the URI and Ray fetches the model on the engine's node."""
    from pipeline.artifacts import copy_tree

    policy = f"s3://{S3_BUCKET}/models/tiny-llama"
    copy_tree(tiny_llama, policy)
    out = tmp_path_factory.mktemp("sample")
    stats = stages.sample.run(cfg, {"policy": policy, "policy_name": "tiny-llama"}, out)
    assert stats == {"prompts": N_PROMPTS, "rows": N_PROMPTS * N, "model": "tiny-llama"}
    return out


def test_sample_writes_n_candidates_per_prompt_with_all_columns(sampled, cfg, tiny_llama):
    df = pd.read_parquet(sampled)
    assert len(df) == N_PROMPTS * N
    assert set(stages.sample.candidates.CANDIDATE_COLUMNS) <= set(df.columns)
    assert not df.duplicated(["prompt_id", "candidate_id"]).any()
    assert sorted(df.groupby("prompt_id").size().unique()) == [N]
    assert set(df.candidate_id) == set(range(N))
    # the prompts are the built-in train split, carried through with their references
    prompts = {p["prompt_id"]: p for p in load_prompts(cfg.data, "train")}
    for row in df.itertuples():
        assert row.prompt == prompts[row.prompt_id]["prompt"]
        assert row.answer == prompts[row.prompt_id]["answer"]
        assert row.messages[-1]["content"].startswith(row.prompt)
    assert (df.response_tokens >= 1).all() and (df.response_tokens <= 24).all()
    assert (df.prompt_tokens > 10).all()
    assert set(df.finish_reason) <= {"stop", "length"}
    assert (df[df.finish_reason == "length"].response_tokens == 24).all()
    assert (df.model == "tiny-llama").all() and (df.sampler == "vllm").all() and (df.seed == 0).all()
    # a random model at temperature 1 does not repeat itself: candidates of a prompt differ
    assert df.groupby("prompt_id").response.nunique().min() > 1


def test_sampled_token_ids_are_what_training_scores(sampled, cfg, tiny_llama):
    """Each candidate keeps the ids vLLM produced. Training renders the prompt with the same chat
    template (so its prompt ids equal vLLM's) and scores the sampled response ids as they are."""
    from transformers import AutoTokenizer

    from stages.train.batch import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    df = pd.read_parquet(sampled)
    for row in df.itertuples():
        ids = list(row.response_token_ids)
        assert len(ids) == row.response_tokens
        # vLLM keeps the EOS it stopped on in the ids (not in the text); a cut-off one has none
        assert (ids[-1] == tokenizer.eos_token_id) == (row.finish_reason == "stop")
        assert tokenizer.decode(ids, skip_special_tokens=True) == row.response
        pair = {"prompt": list(row.messages), "chosen": row.response, "rejected": row.response,
                "chosen_token_ids": ids, "rejected_token_ids": ids}  # fmt: skip
        tokenized = tokenize_pair(tokenizer, pair, max_length=10_000)
        assert tokenized.prompt == list(row.prompt_token_ids)
        assert tokenized.chosen == ids


def test_pairs_from_hand_scored_candidates(sampled, cfg, tmp_path, ray_local):
    """Scores set by hand (a random model scores 1 everywhere): contrast in 4 prompts of 6."""
    df = pd.read_parquet(sampled)
    prompt_ids = sorted(df.prompt_id.unique())
    scores = {pid: [1, 1, 1, 1] for pid in prompt_ids}
    scores[prompt_ids[0]] = [1, 5, 3, 5]  # tie among the best → lowest candidate_id (1)
    scores[prompt_ids[1]] = [2, 2, 4, 1]
    scores[prompt_ids[2]] = [3, 3, 3, 3]  # uniform: dropped
    scores[prompt_ids[3]] = [5, 4, 4, 4]
    scores[prompt_ids[4]] = [1, 2, 1, 1]
    scores[prompt_ids[5]] = [1, 1, 1, 1.5]  # a gap below min_margin (1): dropped, but not uniform
    df["score"] = [scores[p][c] for p, c in zip(df.prompt_id, df.candidate_id)]
    judged = tmp_path / "judge"
    judged.mkdir()
    df.to_parquet(judged / "scored.parquet")
    out = tmp_path / "pairs"
    out.mkdir()
    stats = stages.pairs.run(cfg, {"judge/policy": str(judged)}, out)
    assert stats["s1"] == {"pairs": 4, "dropped_uniform": 1, "dropped_margin": 1, "dropped_unscored": 0}
    pairs = pq.read_table(out / "s1" / "pairs.parquet").to_pylist()
    assert [p["prompt_id"] for p in pairs] == [prompt_ids[i] for i in (0, 1, 3, 4)]
    by_id = {p["prompt_id"]: p for p in pairs}
    first = by_id[prompt_ids[0]]
    assert (first["chosen_candidate_id"], first["rejected_candidate_id"]) == (1, 0)
    assert (first["chosen_score"], first["rejected_score"]) == (5.0, 1.0)
    response = df.set_index(["prompt_id", "candidate_id"]).response
    assert first["chosen"] == [{"role": "assistant", "content": response[(prompt_ids[0], 1)]}]
    assert first["rejected"] == [{"role": "assistant", "content": response[(prompt_ids[0], 0)]}]
    assert first["prompt"][-1]["role"] == "user"
    assert by_id[prompt_ids[4]]["chosen_candidate_id"] == 1
    assert by_id[prompt_ids[4]]["rejected_candidate_id"] == 0
    assert all(p["scenario"] == 1 and p["chosen_source"] == p["rejected_source"] == "policy" for p in pairs)
    ids = df.set_index(["prompt_id", "candidate_id"]).response_token_ids
    assert first["chosen_token_ids"] == list(ids[(prompt_ids[0], 1)])
    finish = df.set_index(["prompt_id", "candidate_id"]).finish_reason
    assert first["rejected_finish_reason"] == finish[(prompt_ids[0], 0)]
