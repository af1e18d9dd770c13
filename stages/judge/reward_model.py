"""The reward-model judge (`judge: {type: reward_model, model: PATH}`): an HF sequence-classification
model with one output (`num_labels == 1`, as TRL's `RewardTrainer` writes them) reads the prompt's
chat plus the candidate's response and returns one number, the reward. No reference answer and no
API: it scores open-ended prompts the verifier cannot, at the speed of a forward pass.

Per row: the conversation `messages + [{"role": "assistant", "content": response}]` is rendered with
the reward model's own chat template (no generation prompt), tokenized, and cut FROM THE LEFT to
`max_length` tokens (`pipeline/chat.py`, which the train stage's reward model reads the same way) (the end of the response is what a reward model reads its verdict from; a
long prompt loses its start). Rows are right-padded into batches of `batch_size`; the model's
`pad_token_id` is set so that HF pools the logit of each row's last non-pad token, as in training.
`reward = logits[:, 0]`.

The 1-5 score, from the rewards:

- `thresholds: [t0, t1, t2, t3]` (ascending): `r < t0 → 1, t0 ≤ r < t1 → 2, ..., r ≥ t3 → 5`
  (`threshold_scores`), inside the scoring actor;
- `thresholds: null`: by rank among the prompt's own candidates (`rank_scores`),
  `score = 1 + round(4 · rank / (n − 1))` with `rank` the 0-based ascending rank (ties share the
  average rank): best 5, worst 1, the rest spread evenly. Needs every candidate of a prompt at once,
  so it runs after the reward pass as a `groupby("prompt_id").map_groups`. It cannot score a prompt
  with one candidate (evaluate's one greedy answer per prompt): those stay unscored.

Columns added: `reward` (float), `reward_truncated` (bool: the conversation was cut to
`max_length`), `score` (1-5, null when the reward is NaN or a prompt has one candidate to rank),
`score_reason` (`reward 0.731 in [0.5, 1)`, `reward 0.731: rank 2 of 8 (1 = best)`, or
`kind: why` for an unscored row), `judge` = "reward_model".

Work runs on a Ray Data actor pool of `workers` actors, each loading the model once: with
`use_gpu` one GPU per actor (cuda), else one CPU each (fine for small reward models).
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from pipeline.chat import conversation_ids, keep_end, reward_pad_id
from pipeline.config import DataConfig, RewardModelJudge
from pipeline.errors import UserError

log = logging.getLogger("pipeline.judge")

JUDGE = "reward_model"
NEEDED = ("prompt_id", "messages", "response")  # the candidate columns the judge reads


# ── pure scoring ──────────────────────────────────────────────────────────────────────────────
def threshold_scores(rewards: Sequence[float], thresholds: Sequence[float]) -> list[int | None]:
    """`r < t[0] → 1, t[0] ≤ r < t[1] → 2, ..., r ≥ t[3] → 5` (a reward exactly at a cut point goes
    up); a NaN reward → None."""
    return [None if math.isnan(r) else bisect_right(thresholds, r) + 1 for r in map(float, rewards)]


def average_ranks(values: Sequence[float]) -> list[float]:
    """0-based ascending ranks; equal values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return ranks


def rank_scores(rewards: Sequence[float]) -> list[int | None]:
    """1-5 scores of ONE prompt's candidates from their rewards, by rank.

    `score = 1 + round(4 · rank / (n − 1))`, `rank` the 0-based ascending rank among the n
    candidates with a reward (ties share their average rank, so equal rewards score alike): the
    best 5, the worst 1, the rest spread evenly (n = 8: 1 2 2 3 3 4 4 5). An exact half rounds
    away from the middle score 3 (n = 9: 1 1 2 2 3 4 4 5 5), so negated rewards give mirrored
    scores, `6 − score`; Python's `round` (halves to even) would not. All rewards equal: every
    rank is (n − 1)/2, so every score is 3, and the pairs stage drops the prompt as uniform.
    A NaN reward is left out of the ranking and gets None; fewer than two rewards to rank: None.
    """
    rewards = [float(r) for r in rewards]
    valid = [i for i, r in enumerate(rewards) if not math.isnan(r)]
    scores: list[int | None] = [None] * len(rewards)
    n = len(valid)
    if n < 2:
        return scores
    for i, rank in zip(valid, average_ranks([rewards[i] for i in valid])):
        offset = 4 * rank / (n - 1) - 2  # in [-2, 2]; exact for the halves that matter
        scores[i] = 3 + int(math.copysign(math.floor(abs(offset) + 0.5), offset))
    return scores


def _number(x: float) -> str:
    return f"{x:.4g}"


def threshold_reason(reward: float, score: int | None, thresholds: Sequence[float]) -> str:
    """`reward 0.731 in [0.5, 1)`, `reward -2 < -1`, `reward 3.2 ≥ 2`, or why there is no score."""
    if score is None:
        return "nan_reward: the reward model returned NaN"
    if score == 1:
        return f"reward {_number(reward)} < {_number(thresholds[0])}"
    if score == 5:
        return f"reward {_number(reward)} ≥ {_number(thresholds[3])}"
    return f"reward {_number(reward)} in [{_number(thresholds[score - 2])}, {_number(thresholds[score - 1])})"


def rank_reasons(rewards: Sequence[float], scores: Sequence[int | None]) -> list[str]:
    """`reward 0.731: rank 2 of 8 (1 = best)` (ties share a rank such as 2.5), or why unscored."""
    valid = [i for i, r in enumerate(rewards) if not math.isnan(float(r))]
    from_best = {i: len(valid) - rank for i, rank in zip(valid, average_ranks([float(rewards[i]) for i in valid]))}
    reasons = []
    for i, (reward, score) in enumerate(zip(rewards, scores)):
        if math.isnan(float(reward)):
            reasons.append("nan_reward: the reward model returned NaN")
        elif score is None:
            reasons.append("unrankable: the only candidate of its prompt with a reward; rank scoring needs 2 or "
                           "more (set judge.thresholds to score single answers)")  # fmt: skip
        else:
            reasons.append(f"reward {_number(float(reward))}: rank {from_best[i]:g} of {len(valid)} (1 = best)")
    return reasons


# ── Ray glue ──────────────────────────────────────────────────────────────────────────────────
class RewardScorer:
    """A Ray Data actor: loads the reward model once, adds `reward` (and with thresholds the score)
    to pandas batches."""

    def __init__(self, model_path: str, judge: RewardModelJudge):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.judge = judge
        self.device = torch.device("cuda" if judge.use_gpu else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=getattr(torch, judge.dtype))
        check_num_labels(model.config.num_labels, model_path, model.config)
        # HF pools the logit of each row's rightmost token that is not `pad_token_id`: pad with it.
        self.pad_id = reward_pad_id(model.config, self.tokenizer)
        model.config.get_text_config().pad_token_id = model.config.pad_token_id = self.pad_id
        self.model = model.to(self.device).eval()

    def rewards(self, ids: list[list[int]]) -> list[float]:
        """One right-padded forward; rows `[batch]`, padded width the longest row."""
        import torch

        if not ids:
            return []
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            attention_mask[row, : len(x)] = 1
        with torch.inference_mode():
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits[:, 0].float().cpu().tolist()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        read = [keep_end(conversation_ids(self.tokenizer, m, r), self.judge.max_length)
                for m, r in zip(batch["messages"], batch["response"])]  # fmt: skip
        rewards = self.rewards([ids for ids, _ in read])
        cut = [c for _, c in read]
        out = batch.assign(reward=rewards, reward_truncated=cut, judge=JUDGE)
        if self.judge.thresholds is None:
            return out  # scored by rank once all of a prompt's candidates are together
        scores = threshold_scores(rewards, self.judge.thresholds)
        reasons = [threshold_reason(r, s, self.judge.thresholds) for r, s in zip(rewards, scores)]
        return out.assign(score=pd.array(scores, dtype="Int64"),
                          score_reason=with_cuts(reasons, out["reward_truncated"], self.judge.max_length))  # fmt: skip


def with_cuts(reasons: list[str], truncated: Sequence[bool], max_length: int) -> list[str]:
    """`...; cut to the last 1024 tokens` on the reasons of the rows the model read only in part."""
    return [f"{r}; cut to the last {max_length} tokens" if cut else r for r, cut in zip(reasons, truncated)]


def score_by_rank(group: pd.DataFrame, max_length: int) -> pd.DataFrame:
    """One prompt's candidates (a `map_groups` group) get their rank scores."""
    rewards = group["reward"].astype(float).tolist()
    scores = rank_scores(rewards)
    reasons = with_cuts(rank_reasons(rewards, scores), group["reward_truncated"], max_length)
    return group.assign(score=pd.array(scores, dtype="Int64"), score_reason=reasons)


def judge(ds: "ray.data.Dataset", judge: RewardModelJudge, where: str) -> "ray.data.Dataset":
    missing = [c for c in NEEDED if c not in ds.columns()]
    if missing:
        raise UserError(f"{where}: no column {', '.join(missing)}; the reward_model judge reads each row's "
                        f"{', '.join(NEEDED)} (the sample stage writes them)")  # fmt: skip
    rewarded = ds.map_batches(
        RewardScorer,
        fn_constructor_kwargs={"model_path": model_path(judge), "judge": judge},
        compute=ray.data.ActorPoolStrategy(size=judge.workers),
        num_gpus=1 if judge.use_gpu else 0,
        num_cpus=1,
        batch_size=judge.batch_size,
        batch_format="pandas",
    )
    if judge.thresholds is not None:
        return rewarded
    return rewarded.groupby("prompt_id").map_groups(
        score_by_rank, fn_kwargs={"max_length": judge.max_length}, batch_format="pandas"
    )


# ── checks ────────────────────────────────────────────────────────────────────────────────────
def model_path(judge: RewardModelJudge) -> str:
    """`judge.model` as `from_pretrained` takes it: an absolute folder, or a hub id as written."""
    path = Path(judge.model).expanduser()
    return str(path.resolve()) if path.exists() else judge.model


def check_num_labels(num_labels: int, where: str, config: Any) -> None:
    if num_labels != 1:
        raise UserError(
            f"judge.model: {where} is not a reward model: its config has num_labels {num_labels} "
            f"(architectures {getattr(config, 'architectures', None)}); the reward_model judge needs a "
            "sequence-classification model with one output (num_labels 1, as TRL's RewardTrainer saves), "
            "so point judge.model at one"
        )


def preflight(judge: RewardModelJudge, data: DataConfig) -> None:
    """Before any sampling, without loading weights: `judge.model` is a folder with an HF config
    of one output (`num_labels == 1`) and a tokenizer with a chat template. A hub id cannot be
    checked here; it is downloaded on the cluster (which needs network). `data` is not needed."""
    from transformers import AutoConfig, AutoTokenizer

    spec = judge.model
    path = Path(spec).expanduser()
    if not path.exists():
        if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
            raise UserError(
                f"judge.model: {spec!r} is neither an existing folder nor a hub id (org/name); "
                "point it at an HF reward-model folder (config.json with num_labels 1)"
            )
        log.warning("judge.model %r is not a local folder: taken as a hub id, downloaded by the judge's workers "
                    "(the cluster needs network); not checked before the run", spec)  # fmt: skip
        return
    if not (path / "config.json").is_file():
        raise UserError(f"judge.model: {path} has no config.json; point it at an HF reward-model folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 (any failure to read the config is the user's to fix)
        raise UserError(
            f"judge.model: cannot read the config of {path} ({err}); point it at an HF reward-model folder"
        ) from err
    check_num_labels(config.num_labels, str(path), config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"judge.model: cannot load the tokenizer of {path} ({err}); the folder needs its tokenizer files"
        ) from err
    if not tokenizer.chat_template:
        raise UserError(
            f"judge.model: the tokenizer of {path} has no chat template; the reward_model judge renders "
            "(prompt chat + response) with it: add the template the reward model was trained with "
            "(tokenizer_config.json chat_template or chat_template.jinja)"
        )
