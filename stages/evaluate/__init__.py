"""evaluate: the round's policy and each variant's checkpoint on held-out prompts, and how
the training pairs' log-probs moved.

The runner runs it once for the round's policy (`round-K/evaluate/policy/`, the "base model"
row of the paper's Table 2) and once per variant (`round-K/evaluate/<variant>/`):
- Held-out prompts: one greedy answer per prompt (the evaluate sampler, by default the run's,
  with n=1, temperature 0), scored by the run's judge. Reported as the paper's "5 points" (share
  scoring 5) and "4&5 points" (share scoring 4 or 5), plus the mean score and answer length.
- Log-probs (variants only): the mean log-prob of the chosen and rejected responses of the
  variant's training pairs under the round's policy ("before") and the checkpoint ("after"), per
  sequence and per token (3D-properties, Table 1): DPO should raise chosen against rejected, and
  the drop of logp(rejected) shows how far training went into "unlearning"; "before" shows how
  on-policy each scenario's data is.

- Diversity: distinct-1…4 of the held-out answers (`stages/evaluate/diversity.py`).
- Geometry (variants only): the hyperspherical energy of every decoder-layer matrix before and
  after training (`stages/evaluate/geometry.py`): DPO moves it, RoPO cannot.

Writes `generations.parquet` (judged answers), `summary.json`, and for a variant
`logps.parquet` (one row per pair and side, `side` "before" or "after") and `geometry.parquet`
(one row per matrix: `layer, module, rows, cols, he_before, he_after, he_relative_change`). A reward-model variant
(`method: {type: reward_model}`) cannot answer: its evaluation is its preference accuracy on the
held-out pairs, read through the reward-model judge (`rewards.parquet`, `summary.json`).
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import ray

from pipeline.artifacts import Location, join, localize, name_of, parent_of, remove, write_table, write_text
from pipeline.config import RunConfig
from pipeline.data import load_prompts
from pipeline.errors import UserError
from stages.evaluate.diversity import distinct
from stages.evaluate.geometry import layer_energies, read_weights
from stages.evaluate.logps import pair_logps
from stages.judge import judge_dataset
from stages.judge import preflight as judge_preflight
from stages.train import reference_batches_for, trained_pairs


def score_summary(scores: pd.Series) -> dict[str, float]:
    """The paper's headline shares from judge scores (1-5), over the answers the judge scored;
    answers it could not score (null) are counted apart, not read as failures."""
    scored = scores.dropna()
    return {
        "5_points": float((scored == 5).mean()),
        "4&5_points": float((scored >= 4).mean()),
        "mean_score": float(scored.mean()),
        "unscored": int(scores.isna().sum()),
    }


def preflight(cfg: RunConfig) -> None:
    """Evaluation judges with the run's judge (its own checks: answers, rubric, key), and scores one
    greedy answer per prompt: a reward-model judge scoring by rank has nothing to rank there."""
    judge_preflight(cfg)
    if cfg.judge.type == "reward_model" and cfg.judge.thresholds is None:
        raise UserError(
            "judge.thresholds: the reward-model judge scores by rank among a prompt's candidates when no "
            "thresholds are given, but evaluate judges one answer per prompt; give 4 ascending reward "
            "thresholds (judge.thresholds=[t1,t2,t3,t4]; `compare-judges` against a trusted judge helps pick them)"
        )


def held_out(cfg: RunConfig, model_path: str, model_name: str, out: Location) -> tuple[pd.DataFrame, dict]:
    """Greedy answers of one model to the held-out prompts, judged: (answers, their summary)."""
    import importlib

    from stages.sample import PLUGINS

    prompts = load_prompts(cfg.data, "eval")[: cfg.evaluate.num_prompts]
    sampler = cfg.evaluate.sampler or cfg.sampler
    greedy = sampler.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.evaluate.max_tokens})
    raw = join(out, ".raw")  # Ray Data writes it from any node: in the stage's folder, local or remote
    importlib.import_module(PLUGINS[greedy.type]).generate(greedy, model_path, model_name, prompts, raw)
    judged = judge_dataset(ray.data.read_parquet(str(raw)), cfg.judge).to_pandas()
    remove(raw)
    summary = {"model": model_name, "prompts": len(prompts), **score_summary(judged["score"]),
               "response_tokens": float(judged["response_tokens"].mean()),
               **distinct(judged["response"].fillna("").tolist())}  # fmt: skip
    # the text is what a reader compares; the chat and token ids are in the sample stage
    return judged.drop(columns=["messages", "prompt_token_ids", "response_token_ids"]), summary


def logp_summary(lp: pd.DataFrame) -> dict[str, float]:
    """Mean per-sequence and per-token log-probs of chosen and rejected (Table 1's numbers)."""
    return {
        "logps/chosen": float(lp["logps_chosen"].mean()),
        "logps/rejected": float(lp["logps_rejected"].mean()),
        "logps_per_token/chosen": float((lp["logps_chosen"] / lp["tokens_chosen"]).mean()),
        "logps_per_token/rejected": float((lp["logps_rejected"] / lp["tokens_rejected"]).mean()),
    }


@ray.remote(num_cpus=1, max_calls=1)
def layer_geometry(before: str, after: str) -> list[dict]:
    """Hyperspherical energy of every decoder-layer matrix of two models (`geometry.layer_energies`),
    on the node that holds their copies."""
    import torch

    return layer_energies(read_weights(str(localize(before))), read_weights(str(localize(after))), dtype=torch.float32)


def geometry_summary(geometry: pd.DataFrame) -> dict[str, float]:
    """How far training moved the layers' hyperspherical energy: the mean and the largest
    |relative change| over the matrices (0 for RoPO, up to float rounding)."""
    change = geometry["he_relative_change"].abs() if len(geometry) else pd.Series([0.0])
    return {"matrices": int(len(geometry)), "he_mean_abs_relative_change": float(change.mean()),
            "he_max_abs_relative_change": float(change.max())}  # fmt: skip


def run(cfg: RunConfig, inputs: dict[str, str], out: Location) -> dict:
    if "train" not in inputs:  # the round's own policy: the base row the variants are compared with
        judged, summary = held_out(cfg, inputs["policy"], inputs["policy_name"], out)
        write_table(judged, join(out, "generations.parquet"))
        write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
        return {"prompts": summary["prompts"], "rows": len(judged), "summary": summary}

    # a folder, or an object-store URI: each process that loads it uses its node's copy (`localize`)
    checkpoint = str(join(inputs["train"], "checkpoint"))
    variant = name_of(inputs["train"])
    name = f"{name_of(parent_of(parent_of(inputs['train'])))}/{variant}"  # round-K/<variant>
    pairs_file = join(inputs["pairs"], f"s{cfg.train.scenario}", "pairs.parquet")
    num_pairs = pq.read_metadata(pairs_file).num_rows
    trained = trained_pairs(num_pairs, cfg.train)
    if cfg.train.trains_reward_model:
        return reward_model_run(cfg, checkpoint, name, pairs_file, trained, out)
    # Training's precision policy, in the reference pass's batches and on a training worker's
    # threads: "before" is, bit for bit, the train stage's reference_logps.parquet when the
    # reference is the round's policy. Both passes run side by side, one CPU each, before the
    # engine starts.
    ref_batches = reference_batches_for(num_pairs, cfg.train)
    limit = min(cfg.evaluate.logp_pairs or trained, trained)  # the trained pairs (held-out ones are the file's tail)
    models = {"before": inputs["policy"], "after": checkpoint}
    logp_refs = {side: pair_logps.remote(path, str(pairs_file), cfg.train.max_length, limit,
                                         cfg.train.dtype, batches=ref_batches)
                 for side, path in models.items()}  # fmt: skip
    energies = layer_geometry.remote(inputs["policy"], checkpoint)
    logps = {side: ray.get(ref).assign(side=side) for side, ref in logp_refs.items()}
    judged, summary = held_out(cfg, checkpoint, name, out)
    summary |= {"variant": variant, "scenario": cfg.train.scenario, "method": cfg.train.method.type,
                "pairs": num_pairs,
                "before": {"model": inputs["policy_name"], **logp_summary(logps["before"])},
                "after": {"model": name, **logp_summary(logps["after"])}}  # fmt: skip
    geometry = pd.DataFrame(ray.get(energies))
    summary["geometry"] = geometry_summary(geometry)
    write_table(geometry, join(out, "geometry.parquet"))
    write_table(judged, join(out, "generations.parquet"))
    write_table(pd.concat(logps.values(), ignore_index=True), join(out, "logps.parquet"))
    write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
    return {"prompts": summary["prompts"], "rows": len(judged), "summary": summary}


def reward_model_run(cfg: RunConfig, checkpoint: str, name: str, pairs_file: Location, trained: int, out: Location) -> dict:
    """A reward-model variant writes no answers: it is scored as a judge, through the reward-model
    judge's own scorer (`stages/judge/reward_model.py`) on the held-out pairs (all pairs when none
    are held out): preference accuracy = share of pairs with r(x,y+) > r(x,y−), seed 003 §5.3's metric."""
    pairs = pq.read_table(pairs_file).to_pandas()
    held = pairs.iloc[trained:] if trained < len(pairs) else pairs
    rewards = ray.get(pair_rewards.remote(checkpoint, held, cfg.train.max_length))
    accuracy = float((rewards["reward_chosen"] > rewards["reward_rejected"]).mean())
    summary = {"model": name, "variant": name_of(parent_of(checkpoint)), "scenario": cfg.train.scenario,
               "method": "reward_model", "pairs": len(pairs),
               "preference": {"pairs": len(held), "held_out": trained < len(pairs), "accuracy": accuracy,
                              "margin": float((rewards["reward_chosen"] - rewards["reward_rejected"]).mean())}}  # fmt: skip
    write_table(rewards, join(out, "rewards.parquet"))
    write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
    return {"pairs": len(held), "rows": len(rewards), "summary": summary}


@ray.remote(num_cpus=1, max_calls=1)
def pair_rewards(model_path: str, pairs: pd.DataFrame, max_length: int) -> pd.DataFrame:
    """r(x,y+) and r(x,y−) of each pair, as `judge: {type: reward_model, model: model_path}` reads them."""
    from pipeline.config import RewardModelJudge
    from stages.judge.reward_model import RewardScorer

    model_path = str(localize(model_path))  # this node's copy of a checkpoint on an object store
    scorer = RewardScorer(model_path, RewardModelJudge(model=model_path, max_length=max_length, thresholds=None))

    def rewards(side: str) -> list[float]:
        rows = pd.DataFrame({"messages": pairs["prompt"], "response": [turns[0]["content"] for turns in pairs[side]]})
        return scorer(rows)["reward"].tolist()

    return pd.DataFrame({"prompt_id": pairs["prompt_id"].tolist(), "reward_chosen": rewards("chosen"),
                         "reward_rejected": rewards("rejected")})  # fmt: skip
