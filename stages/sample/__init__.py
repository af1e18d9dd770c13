"""sample: n candidates per prompt from the policy, by sampler `type:` (today: vllm)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig
from pipeline.data import load_prompts
from stages.sample import vllm


def run(cfg: RunConfig, inputs: dict[str, str], out: Path) -> dict:
    """Candidates of the policy `inputs['policy']` (a resolved model path) for the train prompts."""
    prompts = load_prompts(cfg.data, "train")
    vllm.generate(cfg.sampler, inputs["policy"], inputs["policy_name"], prompts, out)
    return {"prompts": len(prompts), "rows": len(prompts) * cfg.sampler.n}
