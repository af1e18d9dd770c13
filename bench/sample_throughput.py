"""vLLM vs HF `generate`: output tokens per second on the same prompts, in the same run.

    .venv/bin/python bench/sample_throughput.py [--prompts 16] [--n 8] [--max-tokens 128] [--model embedded:smollm2-135m-instruct]

Both sample `n` candidates per built-in math prompt at the same temperature, dtype (bf16) and
token budget, from the same chat-templated prompts; each counts the tokens it generated up to
and including EOS. Engine start and model load are timed apart from generation. Prints one JSON
line; the ratio is what bench/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def hf_generate(model_path: str, texts: list[str], n: int, max_tokens: int, temperature: float) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=temperature, top_p=1.0, max_new_tokens=max_tokens,
                             num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    seconds = time.perf_counter() - start
    generated = out[:, batch["input_ids"].shape[1] :]
    eos = tokenizer.eos_token_id
    tokens = 0
    for row in generated.tolist():
        tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens, seconds


def vllm_generate(model_path: str, texts: list[str], n: int, max_tokens: int, temperature: float) -> tuple[int, float, float]:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model_path, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3,
              enforce_eager=True, seed=0)  # fmt: skip
    startup = time.perf_counter() - start
    params = SamplingParams(n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return tokens, seconds, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from pipeline.config import VLLMSampler
    from pipeline.data import math_problems
    from pipeline.models import resolve_model
    from stages.sample.vllm import build_messages

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sampler = VLLMSampler()
    texts = [
        tokenizer.apply_chat_template(build_messages(sampler, p["prompt"]), add_generation_prompt=True, tokenize=False)
        for p in math_problems(args.prompts, seed=0, split="train")
    ]
    vllm_tokens, vllm_s, vllm_start = vllm_generate(model_path, texts, args.n, args.max_tokens, args.temperature)
    hf_tokens, hf_s = hf_generate(model_path, texts, args.n, args.max_tokens, args.temperature)
    result = {
        "model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
        "vllm": {"tokens": vllm_tokens, "seconds": round(vllm_s, 1), "tok_per_s": round(vllm_tokens / vllm_s, 1),
                 "engine_start_s": round(vllm_start, 1)},
        "hf_generate": {"tokens": hf_tokens, "seconds": round(hf_s, 1), "tok_per_s": round(hf_tokens / hf_s, 1)},
    }  # fmt: skip
    result["ratio_vllm_over_hf"] = round(result["vllm"]["tok_per_s"] / result["hf_generate"]["tok_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
