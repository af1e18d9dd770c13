"""The reward-model judge on real Ray with a tiny random Llama reward model (num_labels 1).

Every reward is checked against an independent float64 forward of that one conversation, unpadded,
rendered here by hand in ChatML and read at its last token: a padding, pooling, truncation or
row-order slip moves it far past the tolerance (the score head is scaled so rewards are O(1) and
differ between rows). Two judge runs share the module: rank scoring (with a prompt of one
candidate) and threshold scoring with a `max_length` that cuts about half the conversations.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import stages.judge
from pipeline.config import RunConfig
from pipeline.errors import UserError
from stages.judge.reward_model import rank_scores, threshold_scores
from stages.sample.candidates import CANDIDATE_COLUMNS

SYSTEM = {"role": "system", "content": "Solve it step by step."}
QUESTIONS = {
    "apples": ("Tom has 3 bags of 4 apples. How many apples?", [SYSTEM]),
    "boxes": ("How many dollars does Lena make by selling 8 boxes at 2 dollars?", []),
    "sum": ("What is 7 + 5?", [SYSTEM]),
}
RESPONSES = [
    "12",
    "3 × 4 = 12 apples. The answer is 12.",
    "Tom has 3 bags of 4 apples: 3 × 4 = 12 apples.\nCheck: 12 ÷ 4 = 3 bags.\nThe answer is 12.",
    "The answer is 7, maybe, or 8, or 9, or 10, or 11, or 12, or 13, or 14, or 15, or 16, and so on.",
]
LONE = ("alone", "What is 2 + 2?", "2 + 2 = 4. The answer is 4.")  # one candidate: rank cannot score it
JUDGE_COLUMNS = {"reward", "reward_truncated", "score", "score_reason", "judge"}


@pytest.fixture(scope="module")
def reward_model(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama's tokenizer and shape with a one-output score head, scaled so rewards are O(1).
    Its config has no pad_token_id (like many reward models): the judge must set one to batch."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("models") / "tiny-reward"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = LlamaConfig.from_pretrained(tiny_llama, num_labels=1, tie_word_embeddings=False, pad_token_id=None)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.mul_(100.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    records = []
    for prompt_id, (question, before) in QUESTIONS.items():
        for candidate_id, response in enumerate(RESPONSES):
            records.append(_row(prompt_id, candidate_id, before + [{"role": "user", "content": question}],
                                question, response))  # fmt: skip
    records.append(_row(LONE[0], 0, [{"role": "user", "content": LONE[1]}], LONE[1], LONE[2]))
    frame = pd.DataFrame(records, columns=list(CANDIDATE_COLUMNS))
    folder = tmp_path_factory.mktemp("sample")
    frame.to_parquet(folder / "candidates-0.parquet", index=False)
    return folder, frame


def _row(prompt_id, candidate_id, messages, question, response) -> dict:
    return {
        "prompt_id": prompt_id, "candidate_id": candidate_id, "prompt": question, "messages": messages,
        "solution": "", "answer": "12", "response": response, "prompt_token_ids": [1, 2, 3],
        "response_token_ids": [4, 5], "prompt_tokens": 3, "response_tokens": 2, "finish_reason": "stop",
        "sampler": "vllm", "model": "hand-written", "seed": 0,
    }  # fmt: skip


def reference_ids(tokenizer, row) -> list[int]:
    """The conversation in ChatML, written out by hand (not through the judge's code)."""
    chat = [*row.messages, {"role": "assistant", "content": row.response}]
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_rewards(model_path: Path, frame: pd.DataFrame, max_length: int) -> tuple[list[float], list[int]]:
    """Each conversation alone, its last `max_length` tokens, in float64: the score head at the last token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32).double().eval()
    rewards, lengths = [], []
    with torch.no_grad():
        for row in frame.itertuples():
            ids = reference_ids(tokenizer, row)
            lengths.append(len(ids))
            hidden = model.model(input_ids=torch.tensor([ids[-max_length:]])).last_hidden_state
            rewards.append(model.score(hidden[0, -1]).item())
    return rewards, lengths


def judge(model_path: Path, folder: Path, out: Path, **options) -> tuple[dict, pd.DataFrame]:
    cfg = RunConfig(judge={"type": "reward_model", "model": str(model_path), "batch_size": 3, **options})
    out.mkdir()
    stats = stages.judge.run(cfg, {"sample": str(folder)}, out)
    return stats, pd.read_parquet(out)


def by_row(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def ranked(reward_model, candidates, ray_local, tmp_path_factory):
    folder, frame = candidates
    stats, judged = judge(reward_model, folder, tmp_path_factory.mktemp("rank") / "judge")
    rewards, lengths = reference_rewards(reward_model, frame, 1024)
    return stats, by_row(judged), by_row(frame.assign(expected=rewards, length=lengths))


@pytest.fixture(scope="module")
def thresholded(reward_model, candidates, ranked, tmp_path_factory):
    folder, frame = candidates
    max_length = int(sorted(ranked[2].length)[len(frame) // 2])  # about half the conversations are cut
    rewards, lengths = reference_rewards(reward_model, frame, max_length)
    ordered = sorted(rewards)
    # cut points halfway between neighbouring rewards: every score appears, none is a near tie
    thresholds = [(ordered[i] + ordered[i + 1]) / 2 for i in (1, 4, 7, 10)]
    assert min(abs(r - t) for r in rewards for t in thresholds) > 1e-3
    stats, judged = judge(reward_model, folder, tmp_path_factory.mktemp("thresholds") / "judge",
                          thresholds=thresholds, max_length=max_length)  # fmt: skip
    expected = by_row(frame.assign(expected=rewards, length=lengths))
    return stats, by_row(judged), expected, thresholds, max_length


def test_each_reward_is_its_conversation_scored_alone_in_float64(ranked):
    _, judged, expected = ranked
    assert list(zip(judged.prompt_id, judged.candidate_id)) == list(zip(expected.prompt_id, expected.candidate_id))
    assert expected.length.nunique() > 8  # rows of many lengths share batches: padding is exercised
    assert pd.Series(expected.expected).round(3).nunique() == len(expected)  # distinct: a row swap shows
    assert (judged.reward - expected.expected).abs().max() < 1e-4
    assert not judged.reward_truncated.any()


def test_rank_scoring_gives_each_prompts_best_5_and_worst_1(ranked):
    stats, judged, expected = ranked
    for prompt_id, group in judged[judged.prompt_id != LONE[0]].groupby("prompt_id"):
        assert group.loc[group.reward.idxmax(), "score"] == 5, prompt_id
        assert group.loc[group.reward.idxmin(), "score"] == 1, prompt_id
        want = rank_scores(expected[expected.prompt_id == prompt_id].expected.tolist())
        assert group.score.tolist() == want
        assert sorted(want) == [1, 2, 4, 5]  # 4 distinct rewards: 1 + round(4 · rank / 3)
    ranked_reasons = judged[judged.prompt_id != LONE[0]].score_reason
    assert all(r.startswith("reward ") and "of 4 (1 = best)" in r for r in ranked_reasons)
    lone = judged[judged.prompt_id == LONE[0]].iloc[0]
    assert pd.isna(lone.score) and lone.score_reason.startswith("unrankable:")
    assert stats == {"rows": 13, "scored": 12, "unscored": 1, "score_counts": {1: 3, 2: 3, 4: 3, 5: 3},
                     "unscored_reasons": {"unrankable": 1}}  # fmt: skip


def test_every_candidate_column_is_kept_unchanged(ranked, candidates):
    _, judged, _ = ranked
    frame = by_row(candidates[1])
    assert set(judged.columns) == set(CANDIDATE_COLUMNS) | JUDGE_COLUMNS
    assert (judged.judge == "reward_model").all()
    lists = ["messages", "prompt_token_ids", "response_token_ids"]
    plain = [c for c in CANDIDATE_COLUMNS if c not in lists]
    pd.testing.assert_frame_equal(judged[plain], frame[plain], check_dtype=False)
    assert [[dict(m) for m in ms] for ms in judged.messages] == list(frame.messages)
    for column in ("prompt_token_ids", "response_token_ids"):
        assert [list(ids) for ids in judged[column]] == list(frame[column])


def test_threshold_scoring_matches_threshold_scores_of_the_rewards(thresholded):
    stats, judged, expected, thresholds, _ = thresholded
    assert (judged.reward - expected.expected).abs().max() < 1e-4
    assert judged.score.tolist() == threshold_scores(expected.expected.tolist(), thresholds)
    assert stats["score_counts"] == {1: 2, 2: 3, 3: 3, 4: 3, 5: 2}
    assert (stats["rows"], stats["scored"], stats["unscored"]) == (13, 13, 0)  # thresholds score the lone prompt
    assert all(r.startswith("reward ") for r in judged.score_reason)


def test_long_conversations_are_cut_from_the_left_to_max_length(thresholded):
    _, judged, expected, _, max_length = thresholded
    # the reference reads each conversation's last max_length tokens
    cut = expected.length > max_length
    assert 3 < cut.sum() < len(expected) - 3
    assert (judged.reward - expected.expected)[cut].abs().max() < 1e-4
    assert judged.reward_truncated.tolist() == cut.tolist()
    assert all(f"cut to the last {max_length} tokens" in r for r in judged.score_reason[cut])


def test_preflight_passes_a_reward_model_folder(reward_model):
    stages.judge.preflight(RunConfig(judge={"type": "reward_model", "model": str(reward_model)}))


def test_preflight_refuses_a_classifier_with_two_labels(reward_model, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(reward_model)
    config.num_labels = 2
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(tmp_path)  # preflight reads no weights

    with pytest.raises(UserError) as error:
        stages.judge.preflight(RunConfig(judge={"type": "reward_model", "model": str(tmp_path)}))

    message = str(error.value)
    assert message.startswith("judge.model:") and str(tmp_path) in message
    assert "num_labels 2" in message and "num_labels 1" in message


def test_preflight_refuses_the_policy_folder_a_causal_lm(tiny_llama):
    with pytest.raises(UserError, match=r"judge.model: .*LlamaForCausalLM"):
        stages.judge.preflight(RunConfig(judge={"type": "reward_model", "model": str(tiny_llama)}))


def test_preflight_refuses_a_missing_folder_and_skips_a_hub_id(tmp_path, caplog):
    with pytest.raises(UserError, match="judge.model: .* neither an existing folder nor a hub id"):
        stages.judge.preflight(RunConfig(judge={"type": "reward_model", "model": str(tmp_path / "missing")}))
    stages.judge.preflight(RunConfig(judge={"type": "reward_model", "model": "org/some-reward-model"}))
    assert "hub id" in caplog.text and "network" in caplog.text


def test_a_table_without_the_chat_is_refused_naming_it(reward_model, candidates, ray_local):
    import ray

    cfg = RunConfig(judge={"type": "reward_model", "model": str(reward_model)})
    ds = ray.data.from_pandas(candidates[1].drop(columns=["messages"]))
    with pytest.raises(UserError, match=r"generations.parquet: no column messages; the reward_model judge reads"):
        stages.judge.judge_dataset(ds, cfg.judge, where="generations.parquet")
