"""evaluate: the round's starting policy ("before") against its checkpoint ("after").

- Held-out prompts: one greedy answer per prompt from each model (the vLLM sampler with n=1,
  temperature 0), scored by the run's judge. Reported as the paper's "5 points" (share scoring
  5) and "4&5 points" (share scoring 4 or 5), plus the mean score and answer length.
- Log-probs: mean logp of the chosen and rejected responses of the training pairs under both
  models (3D-properties, Table 1): DPO should raise chosen against rejected, and the drop of
  logp(rejected) shows how far training went into "unlearning".

Writes `generations.parquet` (judged answers of both models), `logps.parquet` and
`summary.json` with one entry per model; the `side` column says "before" or "after".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import ray

from pipeline.config import RunConfig
from pipeline.data import load_prompts
from pipeline.errors import UserError
from stages.evaluate.logps import pair_logps
from stages.judge import judge_dataset
from stages.judge import preflight as judge_preflight
from stages.sample import vllm
from stages.train import reference_batches_for


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


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    prompts = load_prompts(cfg.data, "eval")[: cfg.evaluate.num_prompts]
    greedy = cfg.sampler.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": cfg.evaluate.max_tokens})
    models = {"before": (inputs["policy"], inputs["policy_name"]), "after": (str(Path(inputs["train"]) / "checkpoint"), "checkpoint")}
    pairs_file = Path(inputs["pairs"]) / f"s{cfg.train.scenario}" / "pairs.parquet"

    # Training's precision policy, in the reference pass's batches and on a training worker's
    # threads: "before" is, bit for bit, the train stage's reference_logps.parquet. The two
    # models' passes run side by side, one CPU each, before the engines start.
    ref_batches = reference_batches_for(pq.read_metadata(pairs_file).num_rows, cfg.train)
    logp_refs = {name: pair_logps.remote(path, str(pairs_file), cfg.train.max_length, cfg.evaluate.logp_pairs,
                                         cfg.train.dtype, batches=ref_batches)
                 for name, (path, _) in models.items()}  # fmt: skip
    logps = {name: ray.get(ref) for name, ref in logp_refs.items()}
    generations, summary = [], {}
    for name, (path, display) in models.items():
        raw = out / f".raw-{name}"
        vllm.generate(greedy, path, display, prompts, raw)
        judged = judge_dataset(ray.data.read_parquet(str(raw)), cfg.judge).to_pandas()
        judged.insert(0, "side", name)
        # the text is what a reader compares; the chat and token ids are in the sample stage
        generations.append(judged.drop(columns=["messages", "prompt_token_ids", "response_token_ids"]))
        lp = logps[name]
        lp.insert(0, "side", name)
        summary[name] = {
            "model": display,
            **score_summary(judged["score"]),
            "response_tokens": float(judged["response_tokens"].mean()),
            "logps/chosen": float(lp["logps_chosen"].mean()),
            "logps/rejected": float(lp["logps_rejected"].mean()),
        }
        shutil.rmtree(raw, ignore_errors=True)
    pd.concat(generations, ignore_index=True).to_parquet(out / "generations.parquet", index=False)
    pd.concat(logps.values(), ignore_index=True).to_parquet(out / "logps.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"prompts": len(prompts), "rows": len(prompts) * len(models), "summary": summary}
