"""What every sampler writes: one row per candidate, the same columns whoever wrote it.

A sampler turns prompt rows (`pipeline.data.PROMPT_COLUMNS`) into `n` candidate rows each with
`CANDIDATE_COLUMNS`. `sampler` and `model` name who wrote the row (for scenario pairs and for
checking that round k+1 sampled from round k's checkpoint); token ids are the very tokens the
model produced where the sampler sees them (vllm, hf), None where it does not (an API, the
dataset's solutions): training then tokenizes the text.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

CANDIDATE_COLUMNS = (
    "prompt_id", "candidate_id", "prompt", "messages", "solution", "answer", "response",
    "prompt_token_ids", "response_token_ids", "prompt_tokens", "response_tokens", "finish_reason",
    "sampler", "model", "seed",
)  # fmt: skip

SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("candidate_id", pa.int64()), ("prompt", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("solution", pa.string()), ("answer", pa.string()), ("response", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int64())), ("response_token_ids", pa.list_(pa.int64())),
    ("prompt_tokens", pa.int64()), ("response_tokens", pa.int64()), ("finish_reason", pa.string()),
    ("sampler", pa.string()), ("model", pa.string()), ("seed", pa.int64()),
])  # fmt: skip
assert tuple(SCHEMA.names) == CANDIDATE_COLUMNS  # the columns, typed


def build_messages(sampler: Any, question: str) -> list[dict[str, str]]:
    """The chat the model sees; stored with each candidate so training reuses it verbatim."""
    messages = [{"role": "system", "content": sampler.system_prompt}] if sampler.system_prompt else []
    return messages + [{"role": "user", "content": sampler.prompt_template.format(prompt=question)}]


def finish_reason(response_ids: list[int], stop_ids: frozenset[int], max_tokens: int) -> str:
    """vLLM's finish reason, which `ray.data.llm` does not pass on: "stop" when the model ended
    on an end-of-sequence token, "length" when the token budget cut it off."""
    if response_ids and response_ids[-1] in stop_ids:
        return "stop"
    return "length" if len(response_ids) >= max_tokens else "stop"


def stop_token_ids(model_path: str) -> frozenset[int]:
    """The ids generation stops on: the tokenizer's EOS and the generation config's `eos_token_id`(s)."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(model_path).eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return frozenset(i for i in ids if i is not None)
