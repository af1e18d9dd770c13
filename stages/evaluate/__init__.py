"""evaluate: the round's policy and each variant's checkpoint on held-out prompts, and how
training moved what the model does and knows.

The runner runs it once for the round's policy (`round-K/evaluate/policy/`, the "base model"
row of the paper's Table 2) and once per variant (`round-K/evaluate/<variant>/`):
- Held-out sets (`evaluate.sets`, `stages/evaluate/sets.py`): one greedy answer per prompt (the
  evaluate sampler, by default the run's, n=1, temperature 0), scored by the run's judge, all sets
  in one generation pass. Per set: the paper's "5 points" and "4&5 points" with 95% bootstrap
  intervals (`intervals.py`), mean score, answer length, distinct-1…4 (`diversity.py`). The
  first set is the headline (the summary's top level); the report pairs each model's answers
  with the base model's, prompt by prompt, for the paired interval of the difference.
- Forgetting (`evaluate.forgetting`): built-in exact-answer tasks (`pipeline/tasks.py`) in the
  same pass, graded by the verifier's rules: accuracy per task, from which the report computes
  TAX against the run's initial policy.
- Log-probs (variants only): the mean log-prob of the chosen and rejected responses of the
  variant's training pairs under the round's policy ("before") and the checkpoint ("after"), per
  sequence and per token (3D-properties, Table 1), and the "unseen" proxy: the round's policy's
  own greedy held-out answers under both (`unseen_logps`).
- Geometry (variants only): the hyperspherical energy of every decoder-layer matrix before and
  after training (`geometry.py`): DPO moves it, RoPO cannot.

Writes `generations.parquet` (every answer, with its `set`; judged for the held-out sets),
`summary.json`, and for a variant `logps.parquet` (one row per pair and side, `side` "before" or
"after") and `geometry.parquet` (one row per matrix: `layer, module, rows, cols, he_before,
he_after, he_relative_change`). A reward-model variant (`method: {type: reward_model}`) cannot
answer: its evaluation is its preference accuracy on the held-out pairs, read through the
reward-model judge (`rewards.parquet`, `summary.json`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.artifacts import Location, join, localize, name_of, parent_of, read_text, remove, write_table, write_text
from pipeline.config import RunConfig
from pipeline.errors import UserError
from stages.evaluate.diversity import distinct
from stages.evaluate.geometry import layer_energies, read_weights
from stages.evaluate.intervals import bootstrap_interval
from stages.evaluate.logps import pair_logps
from stages.evaluate.sets import FORGETTING, evaluation_prompts
from stages.judge import judge_dataset
from stages.judge.math_rules import score_math
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


def set_summary(judged: pd.DataFrame, resamples: int, seed: int) -> dict:
    """One held-out set's numbers: the shares with their 95% bootstrap intervals, the mean score,
    the answers' length (tokens, with its interval) and their distinct-1…4."""
    scored = judged["score"].dropna().to_numpy()
    tokens = judged["response_tokens"].to_numpy()
    return {"prompts": len(judged), **score_summary(judged["score"]),
            "5_points_ci": list(bootstrap_interval(scored == 5, resamples, seed)),
            "4&5_points_ci": list(bootstrap_interval(scored >= 4, resamples, seed)),
            "response_tokens": float(tokens.mean()),
            "response_tokens_ci": list(bootstrap_interval(tokens, resamples, seed)),
            **distinct(judged["response"].fillna("").tolist())}  # fmt: skip


def task_accuracy(rows: pd.DataFrame, resamples: int, seed: int) -> dict:
    """A forgetting task's accuracy: the share of answers whose final answer is the reference
    (the verifier's rules, score ≥ 4, whatever judge the run uses), with its interval."""
    correct = np.array([score_math(r, a, truncated=f == "length").score >= 4
                        for r, a, f in zip(rows["response"].fillna(""), rows["answer"], rows["finish_reason"])],
                       dtype=float)  # fmt: skip
    return {"prompts": len(rows), "accuracy": float(correct.mean()),
            "accuracy_ci": list(bootstrap_interval(correct, resamples, seed))}


def preflight(cfg: RunConfig) -> None:
    """Evaluation judges with the run's judge (its own checks: answers, rubric, key), and scores one
    greedy answer per prompt: a reward-model judge scoring by rank has nothing to rank there."""
    judge_preflight(cfg)
    prompts, _ = evaluation_prompts(cfg)  # every set loads and keeps a prompt
    if cfg.evaluate.forgetting and cfg.evaluate.forgetting.lm_eval:
        from stages.evaluate.lm_eval_tasks import check_available

        check_available(cfg.evaluate.forgetting.lm_eval, cfg.evaluate.forgetting.include_path)
    if cfg.judge.type == "verifier":
        from stages.judge.verifier import check_answers

        frame = pd.DataFrame([p for p in prompts if not p["set"].startswith(FORGETTING)])
        for name, rows in frame.groupby("set", sort=False):
            check_answers(rows, f"evaluate.sets.{name}")
    if cfg.judge.type == "reward_model" and cfg.judge.thresholds is None:
        raise UserError(
            "judge.thresholds: the reward-model judge scores by rank among a prompt's candidates when no "
            "thresholds are given, but evaluate judges one answer per prompt; give 4 ascending reward "
            "thresholds (judge.thresholds=[t1,t2,t3,t4]; `compare-judges` against a trusted judge helps pick them)"
        )


def held_out(cfg: RunConfig, model_path: str, model_name: str, out: Location) -> tuple[pd.DataFrame, dict]:
    """Greedy answers of one model to every held-out set and forgetting task, in one generation
    pass; the sets judged by the run's judge, the tasks graded exactly: (answers, their summary).
    The summary's top level is the first (headline) set's, `sets` has each set's, `forgetting`
    each task's accuracy."""
    import importlib

    from stages.sample import PLUGINS

    prompts, dropped = evaluation_prompts(cfg)
    set_of = {p["prompt_id"]: p["set"] for p in prompts}
    sampler = cfg.evaluate.sampler or cfg.sampler
    greedy = sampler.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.evaluate.max_tokens})
    raw = join(out, ".raw")  # Ray Data writes it from any node: in the stage's folder, local or remote
    importlib.import_module(PLUGINS[greedy.type]).generate(greedy, model_path, model_name, prompts, raw)
    answers = ray.data.read_parquet(str(raw)).to_pandas()
    answers["set"] = answers["prompt_id"].map(set_of)
    tasks = answers["set"].str.startswith(FORGETTING)
    judged = judge_dataset(ray.data.from_pandas(answers[~tasks].drop(columns="set")), cfg.judge).to_pandas()
    judged["set"] = judged["prompt_id"].map(set_of)
    remove(raw)
    seed, resamples = 0, cfg.evaluate.bootstrap  # a fixed seed: a rerun reproduces every interval
    sets = {name: {**set_summary(judged[judged["set"] == name], resamples, seed), "dropped_overlap": dropped[name]}
            for name in cfg.evaluate.sets}  # fmt: skip
    by_task = dict(list(answers[tasks].groupby("set", sort=False)))
    forgetting = {task: task_accuracy(by_task[FORGETTING + task], resamples, seed)
                  for task in (cfg.evaluate.forgetting.tasks if cfg.evaluate.forgetting else ())}  # in config order
    forgetting |= lm_eval_forgetting(cfg, model_path)
    headline = next(iter(sets.values()))
    summary = {"model": model_name, **headline, "sets": sets, "forgetting": forgetting}
    # the text is what a reader compares, the chat and the response's tokens what the unseen
    # proxy reads again (`unseen_logps`); the prompt's token ids are in the sample stage
    answers = pd.concat([judged, answers[tasks]], ignore_index=True).drop(columns=["prompt_token_ids"])
    # plain columns: Ray Data's frames carry Arrow dtypes whose pandas metadata pandas cannot read back
    return pa.Table.from_pandas(answers, preserve_index=False).replace_schema_metadata(None).to_pandas(), summary


def lm_eval_forgetting(cfg: RunConfig, model_path: str) -> dict[str, dict]:
    """lm-eval-harness tasks (`evaluate.forgetting.lm_eval`, the `eval` extra, data on disk):
    {task: {prompts, accuracy, metric}} in the built-in tasks' shape, nothing when none are named."""
    f = cfg.evaluate.forgetting
    if not f or not f.lm_eval:
        return {}
    from stages.evaluate.lm_eval_tasks import lm_eval_accuracy

    try:
        return ray.get(lm_eval_accuracy.remote(str(localize(model_path)), f.lm_eval, f.num_prompts, f.include_path))
    except ray.exceptions.RayTaskError as err:  # its text is the remote traceback: the user's error alone
        raise err.cause if isinstance(err.cause, UserError) else err


def unseen_answers(cfg: RunConfig, base_generations: Location, path: Location) -> int:
    """The "unseen" proxy's responses (3D-properties: mass leaving what training never saw): the
    round's policy's own greedy answers to the headline held-out set, written to `path` as pairs
    whose chosen side is the answer (the rejected side empty), so that `pair_logps` reads them with
    the training code's tokenization and precision policy. Their mean log-prob under the round's
    policy (before) and the checkpoint (after): a fall means training moved mass away from the
    policy's typical answers to new prompts, not only from the rejected responses. Returns how many."""
    # the pandas metadata of a frame that came from Ray Data names Arrow dtypes pandas cannot read back
    answers = pq.read_table(str(base_generations)).to_pandas(ignore_metadata=True)
    answers = answers[answers["set"] == next(iter(cfg.evaluate.sets))]
    turn = [[{"role": "assistant", "content": r}] for r in answers["response"].fillna("")]
    empty = [[{"role": "assistant", "content": ""}]] * len(answers)  # no second response to pay for
    rows = pd.DataFrame({"prompt_id": answers["prompt_id"], "prompt": answers["messages"], "chosen": turn,
                         "rejected": empty, "chosen_token_ids": answers["response_token_ids"],
                         "rejected_token_ids": [[] for _ in range(len(answers))]})  # fmt: skip
    write_table(rows, path)
    return len(rows)


def unseen_summary(lp: pd.DataFrame) -> dict[str, float]:
    return {"logps": float(lp["logps_chosen"].mean()),
            "logps_per_token": float((lp["logps_chosen"] / lp["tokens_chosen"].clip(lower=1)).mean())}


def answered_before(evaluation: Location, model_name: str) -> tuple[pd.DataFrame, dict]:
    """Round k's policy is round k-1's checkpoint, and that round's evaluation already has its
    greedy answers to the same prompts, judged by the same judge: they are taken, not generated
    again (one engine start and a judge pass fewer per round). The held-out numbers only."""
    previous = json.loads(read_text(join(evaluation, "summary.json")))
    summary = {"model": model_name, **{k: v for k, v in previous.items() if k not in VARIANT_ONLY and k != "model"}}
    answers = pq.read_table(str(join(evaluation, "generations.parquet"))).to_pandas(ignore_metadata=True)
    return answers, summary


# what a variant's summary adds to the held-out numbers
VARIANT_ONLY = ("variant", "scenario", "method", "pairs", "before", "after", "unseen", "geometry")


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
    if "train" not in inputs and "previous_evaluate" in inputs:  # round k's policy: round k-1's checkpoint
        judged, summary = answered_before(inputs["previous_evaluate"], inputs["policy_name"])
        write_table(judged, join(out, "generations.parquet"))
        write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
        return {"prompts": summary["prompts"], "rows": len(judged), "summary": summary, "reused": True}
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
    unseen_file = join(out, ".unseen.parquet")
    unseen = {"answers": unseen_answers(cfg, join(inputs["evaluate"], "generations.parquet"), unseen_file)}
    models = {"before": inputs["policy"], "after": checkpoint}
    logp_refs = {side: pair_logps.remote(path, str(pairs_file), cfg.train.max_length, limit,
                                         cfg.train.dtype, batches=ref_batches, also=str(unseen_file))
                 for side, path in models.items()}  # fmt: skip
    energies = layer_geometry.remote(inputs["policy"], checkpoint)
    logps = {}
    for side, ref in logp_refs.items():
        pairs_lp, unseen_lp = ray.get(ref)
        logps[side], unseen[side] = pairs_lp.assign(side=side), unseen_summary(unseen_lp)
    remove(unseen_file)
    judged, summary = held_out(cfg, checkpoint, name, out)
    summary |= {"variant": variant, "scenario": cfg.train.scenario, "method": cfg.train.method.type,
                "pairs": num_pairs,
                "before": {"model": inputs["policy_name"], **logp_summary(logps["before"])},
                "after": {"model": name, **logp_summary(logps["after"])}, "unseen": unseen}  # fmt: skip
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
