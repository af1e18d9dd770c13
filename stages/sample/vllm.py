"""The vLLM sampler: Ray Data + `ray.data.llm`, the same code on a CPU laptop and a GPU cluster.

`ray.data.llm` returns one completion per input row (it reads `outputs[0]`), so `n` candidates
per prompt are `n` rows with `candidate_id = 0..n-1`; vLLM's prefix cache makes the repeated
prompt nearly free. Per-request seeds crash vLLM's CPU worker ("CPU Generator does not use
offset"), so the engine is seeded once (`sampler.seed`) and the seed is recorded in every row.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import ray

from pipeline import quiet
from pipeline.artifacts import WEIGHTS, localize
from pipeline.config import VLLMSampler
from stages.sample.candidates import build_messages, finish_reason, stop_token_ids

# On CPU, the stages around the engine (our pre/post-processing, ray.data.llm's chat template,
# tokenizer, detokenizer) each reserve a whole CPU by Ray's default: with the engine's, more than
# a 2-core node has, and the engine's placement group may never be scheduled. They are light.
_LIGHT = {"num_cpus": 0.25}


def _preprocess(row: dict[str, Any], sampler: VLLMSampler) -> dict[str, Any]:
    # ray.data.llm's engine stage pops the `prompt` column (it means the rendered chat text);
    # keep the user's question under another name until postprocess.
    question = row.pop("prompt")
    return {
        **row,
        "question": question,
        "messages": build_messages(sampler, question),
        "sampling_params": {
            "temperature": sampler.temperature,
            "top_p": sampler.top_p,
            "max_tokens": sampler.max_tokens,
        },
    }


def _postprocess(row: dict[str, Any], sampler: VLLMSampler, model_name: str, stop_ids: frozenset[int]) -> dict[str, Any]:
    response_ids = [int(t) for t in row["generated_tokens"]]
    messages = row["messages"]
    messages = messages.tolist() if hasattr(messages, "tolist") else messages
    return {
        "prompt_id": row["prompt_id"],
        "candidate_id": int(row["candidate_id"]),
        "prompt": row["question"],
        "messages": [dict(m) for m in messages],
        "solution": row.get("solution"),
        "answer": row.get("answer"),
        "response": row["generated_text"],
        # The very tokens the policy produced (EOS included when it stopped on one): training
        # scores these, not a re-tokenisation of the decoded text, which can differ.
        "prompt_token_ids": [int(t) for t in row["prompt_token_ids"]],
        "response_token_ids": response_ids,
        "prompt_tokens": int(row["num_input_tokens"]),
        "response_tokens": len(response_ids),
        "finish_reason": finish_reason(response_ids, stop_ids, sampler.max_tokens),
        "sampler": sampler.type,
        "model": model_name,
        "seed": sampler.seed,
    }


def processor_config(sampler: VLLMSampler, model_path: str):
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs = dict(
        dtype=sampler.dtype,
        max_model_len=sampler.max_model_len,
        gpu_memory_utilization=sampler.gpu_memory_utilization,
        enforce_eager=sampler.enforce_eager,
        tensor_parallel_size=sampler.tensor_parallel_size,
        seed=sampler.seed,
        enable_prefix_caching=True,
        **sampler.engine_kwargs,  # the user's word wins
    )
    # vLLM logs every engine start at INFO, and a warning per weight when an fp32 checkpoint is
    # loaded in bf16: `sampler.engine_log_level` (default "error") keeps a run's output readable.
    # `engine_env` also lets vLLM, not Ray, shut the engine's processes down (pipeline/quiet.py).
    env = quiet.engine_env(sampler.engine_log_level)
    extra: dict[str, Any] = {}
    if sampler.use_gpu and sampler.tensor_parallel_size > 1:
        # an engine's GPUs on one node (NVLink); its replicas spread over the nodes that have room
        extra["placement_group_config"] = dict(bundles=[{"GPU": 1}] * sampler.tensor_parallel_size, strategy="STRICT_PACK")
    if not sampler.use_gpu:
        # Without an explicit CPU bundle Ray Data asks for a GPU per engine and waits forever.
        extra["placement_group_config"] = dict(bundles=[{"CPU": 1}] * sampler.tensor_parallel_size)
        # vLLM's CPU backend binds its OpenMP threads to all cores but `reserved` ones.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(sampler.cpu_reserved)
        extra.update(chat_template_stage=_LIGHT, tokenize_stage=_LIGHT, detokenize_stage=_LIGHT)
    extra["runtime_env"] = {"env_vars": env}
    return vLLMEngineProcessorConfig(
        # a local folder, or a checkpoint on an object store (s3://, gs://), which Ray downloads
        # on each engine's node
        model_source=model_path,
        batch_size=sampler.batch_size,
        concurrency=sampler.replicas,
        # The metrics exporter needs Ray Serve's extras; without them the engine actor dies.
        log_engine_metrics=False,
        engine_kwargs=engine_kwargs,
        accelerator_type=sampler.accelerator_type,
        **extra,
    )


def generate(sampler: VLLMSampler, model_path: str, model_name: str, prompts: list[dict], out_dir: Path) -> None:
    """Write `sampler.n` candidates for every prompt as Parquet files under `out_dir`."""
    # This process imports vLLM too (ray.data.llm builds the processor with it), and what vLLM
    # logs on import reaches the run's own log handler: the engines' level holds here as well.
    logging.getLogger("vllm").setLevel(sampler.engine_log_level.upper())
    from ray.data.llm import build_processor

    rows = [{**p, "candidate_id": c} for p in prompts for c in range(sampler.n)]
    light = None if sampler.use_gpu else _LIGHT
    processor = build_processor(
        processor_config(sampler, model_path),
        preprocess=partial(_preprocess, sampler=sampler),
        postprocess=partial(_postprocess, sampler=sampler, model_name=model_name,
                            stop_ids=stop_token_ids(str(localize(model_path, exclude=WEIGHTS)))),
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    ds = processor(ray.data.from_items(rows))
    ds.write_parquet(str(out_dir))
