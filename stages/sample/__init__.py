"""sample: `n` candidates per training prompt, by sampler `type:`.

The runner runs this stage once per *source* of candidates (`round-K/sample/<source>/`):
`policy` (the round's policy, `sampler`), `other` (another model, `other_sampler`, scenarios 3
and 4) and `reference` (the dataset's solutions, scenarios 2 and 4). It hands each run a config
whose `sampler` is that source's (`RunConfig.for_source`), so this module only dispatches:

- vllm      `stages/sample/vllm.py`       Ray Data + ray.data.llm engines
- hf        `stages/sample/hf.py`         transformers generate on a Ray Data actor pool
- openai    `stages/sample/openai_api.py` an OpenAI-compatible endpoint
- reference `stages/sample/reference.py`  the dataset's worked solutions

A sampler with `model: None` samples the round's policy (`inputs["policy"]`), which is what makes
round k+1's data on-policy for round k's checkpoint.
"""

from __future__ import annotations

import importlib

from pipeline.artifacts import Location
from pipeline.config import RunConfig
from pipeline.data import load_prompts
from pipeline.models import resolve_model

PLUGINS = {"vllm": "stages.sample.vllm", "hf": "stages.sample.hf", "openai": "stages.sample.openai_api"}


def model_of(sampler, inputs: dict[str, str]) -> tuple[str, str]:
    """(path, display name) of the model a sampler draws from: its own `model`, or the round's policy."""
    if getattr(sampler, "model", None) is None:  # a folder, or a checkpoint in an object-store run dir
        return inputs["policy"], inputs["policy_name"]
    return resolve_model(sampler.model), sampler.model


def run(cfg: RunConfig, inputs: dict[str, str], out: Location) -> dict:
    prompts = load_prompts(cfg.data, "train")
    sampler = cfg.sampler
    if sampler.type == "reference":
        from stages.sample import reference

        reference.generate(prompts, sampler, out, source=_data_name(cfg))
        return {"prompts": len(prompts), "rows": len(prompts), "model": "dataset"}
    if sampler.type == "openai":
        path, name = None, sampler.model
    else:
        path, name = model_of(sampler, inputs)
    importlib.import_module(PLUGINS[sampler.type]).generate(sampler, path, name, prompts, out)
    return {"prompts": len(prompts), "rows": len(prompts) * sampler.n, "model": name}


def _data_name(cfg: RunConfig) -> str:
    return f"data.path {cfg.data.path}" if hasattr(cfg.data, "path") else f"data ({cfg.data.type})"


def preflight(cfg: RunConfig) -> None:
    """Models named by a sampler resolve (a typo fails before any engine starts), an API
    sampler's key variable is set, and scenarios 2 and 4 find a solution for every prompt."""
    if "reference" in cfg.sources():
        from stages.sample import reference

        reference.candidates(load_prompts(cfg.data, "train"), cfg.sampler_of("reference"), source=_data_name(cfg))
    for source in cfg.sources():
        sampler = cfg.sampler_of(source)
        if getattr(sampler, "model", None) is not None and sampler.type in ("vllm", "hf"):
            resolve_model(sampler.model)
        if sampler.type == "openai":
            from stages.sample import openai_api

            openai_api.preflight(sampler, where="sampler" if source == "policy" else "other_sampler")
