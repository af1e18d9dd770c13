"""Our DPO train step vs TRL's `DPOTrainer`: tokens/s, s/step and peak memory on the same data and model.

    .venv/bin/python bench/train_step_vs_trl.py [--pairs 40] [--batch-size 8] [--warmup-steps 1] [--threads 2]

One run, two sides, each in its own subprocess (so each side's RSS high-water mark is its own):
- ours: the building blocks of `stages/train/loop.py` exactly as `train_loop` uses them, on a
  single-process gloo group (NCCL on cuda): `load_policy` (FSDP2 `fully_shard`, bf16
  `MixedPrecisionPolicy` over fp32 master weights), `tokenize_pair`, `reference_logps` (once,
  before training), AdamW, then per step
  `collate → step_loss → backward → clip → optimizer.step → zero_grad → global_means`;
- TRL: `DPOTrainer` with `DPOConfig(use_cpu=True, bf16=True)` (`use_cpu=False` on cuda; bf16 is
  autocast over fp32 weights), `precompute_ref_log_probs=True` (reference log-probs computed once
  before training, no reference model kept: the closest match to ours), no gradient checkpointing
  (TRL's default is on, ours has none), `optim="adamw_torch"` (plain `torch.optim.AdamW`, as ours),
  reporting/logging/saving off.

`--ours-precision autocast` puts our side in TRL's precision policy (fp32 FSDP2 weights, the
forward and the reference pass under `torch.autocast(device, bf16)`), for a ratio with both sides
computing the same thing; the default is the trainer's own policy (`stages/train/precision.py`).

Both get the same rows (built deterministically from `math_problems`, no sampling), beta 0.1,
sigmoid loss, lr 5e-6, weight decay 0, grad clip 1.0, constant lr, global batch `--batch-size`
pairs without accumulation, max_length 384 (`--seq-len` when given), the same threads, and the
very same batches: the rows are handed to TRL in our first-epoch order (`epoch_order`) with a
sequential sampler, and TRL's reference precompute uses the training batch size, so both sides'
reference pass and training steps see identical pair groupings.

What is counted:
- tokens: non-padding tokens of every training batch, i.e. `attention_mask.sum()` over the 2B
  rows (prompt+chosen and prompt+rejected per pair), each side from its own tokenized batch;
- time: per optimiser step, from the collated batch in hand to the step's end (forward, backward,
  metrics, clip, optimiser step, lr step, zero_grad). For TRL that is `on_step_begin` →
  `on_step_end` of a TrainerCallback (the dataloader fetch, collate and copy to the device happen
  before `on_step_begin`); for ours the same span around the loop body, collate and copy excluded.
  On cuda each span starts and ends with `torch.cuda.synchronize()`. Model load, tokenization, the
  reference pass and the first `--warmup-steps` steps are not counted;
- tokens/s = measured tokens / measured seconds;
- peak RSS: `ru_maxrss` of the side's process (whole life: load, reference pass, training), and
  `train_peak_rss_gib`, the high-water mark (VmHWM) reset right before the first training step;
- first-step loss: before any update the policy is the reference, so both must be ln 2; the
  script asserts |loss - ln 2| < 5e-3 (bf16 rounding) on each side (`--loss-warn-only`: warn and
  record `first_step_loss_ok` instead, so a device run still returns its timings).

On a GPU (bench/gpu_check.sh runs this on a lent machine, wheels and tokenizer carried in .gpu/):

    python3 bench/train_step_vs_trl.py --device cuda --shape qwen2.5-0.5b --pairs 48 --batch-size 8 \\
        --seq-len 512 --tokenizer .gpu/tokenizer

- `--device cuda`: ours on a single-process NCCL group, both models on cuda:0; peak memory is
  torch's CUDA allocator high-water mark: `peak_gpu_gib` (max_memory_allocated over the side's
  whole life: load, reference pass, training), `peak_gpu_reserved_gib` (max_memory_reserved, what
  the caching allocator held), and `train_peak_gpu_gib` / `train_peak_gpu_reserved_gib` (reset
  right before the first training step).
- `--shape NAME`: instead of `--model`, a randomly initialised `Qwen2ForCausalLM` of that shape
  (`SHAPES`: `qwen2.5-0.5b` has Qwen2.5-0.5B's dims; `tiny` is for a seconds-long CPU smoke test),
  seeded with `--seed`, built once in its own subprocess and saved (fp32) as an HF folder in a temp
  dir with the tokenizer of `--tokenizer` (default: `--model`'s), so both sides load the very same
  model from disk. The tokenizer's ids must fit the shape's vocab (SmolLM2's 49,152 ≤ 151,936).
- `--seq-len S`: every response is grown with the deterministic filler sentences (`FILLERS`) until
  prompt + response + the chat template's end-of-turn tokens is S tokens on TRL's side (ours ends
  a response with one EOS instead of `<|im_end|>\\n`, so its rows are S-1), and max_length
  defaults to S on both sides: nothing is truncated, each side pads to its batch's longest row.
- MFU, both sides: FLOPs of a measured step = 6 · N · T (2N forward + 4N backward per token), N =
  the model's parameters with the tied embedding counted once (the lookup is free, the LM head's
  matmul is not), T = the step's non-padding tokens. Left out: attention's score and value
  matmuls (per token 12 · layers · hidden · s over forward+backward, +4.5% at s = 512 on the 0.5B
  shape), the reference pass (not timed) and padding (computed, not counted).
  `model_tflops_per_s` = 6 · N · tokens / seconds; `mfu` = that / `--peak-tflops` (default 989,
  H100 SXM dense bf16, on cuda; on cpu measured in the same run by `matmul_peak`).

Prints one JSON line per side (the children) and one combined JSON line (last line of stdout)
with the ratios ours/TRL, and a readable summary on stderr. bench/RESULTS.md records it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "
LN2 = math.log(2)
LOSS_TOL = 5e-3  # bf16: the reference and the training forward round differently (bench/RESULTS.md)

FILLERS = [
    "Let me double-check the arithmetic once more.",
    "Rounding the intermediate result keeps the numbers simple.",
    "So the total has to be a little larger than that.",
]

# Randomly initialised Qwen2ForCausalLM shapes (`--shape`). qwen2.5-0.5b: Qwen2.5-0.5B's config.json
# dims (494M parameters, tied embedding); tiny: the same code paths in seconds on a CPU (vocab kept
# at SmolLM2's 49,152 so its tokenizer fits).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=49152, max_position_embeddings=4096,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
}  # fmt: skip


# ── data ────────────────────────────────────────────────────────────────────────────────────
def build_rows(num_pairs: int, tokenizer=None, seq_len: int | None = None) -> list[dict]:
    """Conversational TRL rows: chosen = the reference solution; rejected = filler + a wrong final answer.

    With `seq_len` (and the tokenizer both sides use), both responses are grown with filler
    sentences to fill the row to `seq_len` tokens (`_filled`)."""
    from pipeline.data import math_problems

    end_tokens = _end_of_turn_tokens(tokenizer) if seq_len else 0
    rows = []
    for i, problem in enumerate(math_problems(num_pairs, seed=0, split="train")):
        answer = problem["answer"]
        try:
            wrong = str(int(answer) + 1 + i % 7)
        except ValueError:
            wrong = str(float(answer) + 1 + i % 7)
        steps = problem["solution"].split("\n")[:-1]  # drop "The answer is N."
        prompt = [{"role": "user", "content": problem["prompt"]}]
        if seq_len is None:
            filler = " ".join(FILLERS[: 1 + i % len(FILLERS)])
            chosen = problem["solution"]
            rejected = "\n".join([*steps, filler, f"The answer is {wrong}."])
        else:
            budget = seq_len - _prompt_tokens(tokenizer, prompt) - end_tokens
            chosen = _filled(tokenizer, steps, f"The answer is {answer}.", budget, start=i)
            rejected = _filled(tokenizer, steps, f"The answer is {wrong}.", budget, start=i + 1)
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })  # fmt: skip
    return rows


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_tokens(tokenizer, prompt: list[dict]) -> int:
    """The rendered prompt's tokens, as `tokenize_pair` (and TRL) count them."""
    return _count(tokenizer, tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))


def _end_of_turn_tokens(tokenizer) -> int:
    """Tokens the chat template puts after an assistant turn's content (SmolLM2: `<|im_end|>`, `\\n`):
    TRL's rows carry them, ours one EOS instead."""
    prompt = [{"role": "user", "content": "Hi"}]
    turn = [*prompt, {"role": "assistant", "content": "Yes"}]
    full = _count(tokenizer, tokenizer.apply_chat_template(turn, tokenize=False))
    return max(1, full - _prompt_tokens(tokenizer, prompt) - _count(tokenizer, "Yes"))


def _filled(tokenizer, steps: list[str], last: str, budget: int, start: int) -> str:
    """`steps`, a line of filler (FILLERS in turn from `start`, cut at a token), then `last`: the
    longest such text of at most `budget` tokens (the bare steps + last when even that is over)."""
    bare = "\n".join([*steps, last])
    room = budget - _count(tokenizer, bare) - 1  # the filler line's newline
    if room <= 0:
        return bare
    sentences = [FILLERS[(start + k) % len(FILLERS)] for k in range(room // 4 + len(FILLERS))]
    ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    while len(ids) < room:  # a tokenizer with very long filler tokens: grow the pool
        sentences += sentences
        ids = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    for n in range(room, 0, -1):  # merges at the joins can add a token or two: shrink until it fits
        text = "\n".join([*steps, tokenizer.decode(ids[:n]).strip(), last])
        if _count(tokenizer, text) <= budget:
            return text
    return bare


# ── model of a given shape ──────────────────────────────────────────────────────────────────
def build_shape(args, out_dir: str) -> dict:
    """A seeded, randomly initialised Qwen2ForCausalLM of `args.shape`, saved (fp32) with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    dims = dict(SHAPES[args.shape])
    rope_theta = dims.pop("rope_theta")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_path(args))
    if len(tokenizer) > dims["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} ids, more than shape {args.shape}'s vocab {dims['vocab_size']}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Qwen2Config(
        **dims,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="silu",
        attention_dropout=0.0,
        use_sliding_window=False,
        max_window_layers=dims["num_hidden_layers"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"side": "build", "shape": args.shape, "params": _params(model), "vocab_size": dims["vocab_size"],
            "tokenizer_ids": len(tokenizer), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def _tokenizer_path(args) -> str:
    from pipeline.models import resolve_model

    return args.tokenizer or resolve_model(args.model)


def _params(model) -> int:
    """Parameters, each once (a tied embedding is one Parameter; a DTensor counts its global shape)."""
    return sum(p.numel() for p in model.parameters())


# ── device and memory helpers ───────────────────────────────────────────────────────────────
def _device(args):
    import torch

    if args.device == "cuda":
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _sync(device) -> None:
    """Wait for the device's queued work (cuda); a no-op on cpu, where every op has finished on return."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuPeaks:
    """torch's CUDA allocator high-water marks: over the whole life, and over training alone
    (`start_training` resets them, keeping the earlier peak). Reports nothing on cpu."""

    def __init__(self, device):
        self.device, self.before = device, (0, 0)

    def start_training(self) -> None:
        import torch

        if self.device.type == "cuda":
            self.before = (torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict:
        import torch

        if self.device.type != "cuda":
            return {}
        train = (torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device))
        gib = lambda b: round(b / 2**30, 3)  # noqa: E731
        return {
            "peak_gpu_gib": gib(max(self.before[0], train[0])),
            "peak_gpu_reserved_gib": gib(max(self.before[1], train[1])),
            "train_peak_gpu_gib": gib(train[0]),
            "train_peak_gpu_reserved_gib": gib(train[1]),
            "gpu": torch.cuda.get_device_name(self.device),
        }


def _ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _hwm_gib() -> float | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    return None


def _summary(side: str, step_tokens: list[int], step_seconds: list[float], losses: list[float], args,
             hwm_reset: bool, params: int, extra: dict) -> dict:  # fmt: skip
    warmup = args.warmup_steps
    tokens, seconds = sum(step_tokens[warmup:]), sum(step_seconds[warmup:])
    measured = len(step_seconds) - warmup
    model_flops = 6 * params * tokens / seconds  # see the module docstring: MFU
    return {
        "side": side,
        "device": args.device,
        "steps_measured": measured,
        "warmup_steps": warmup,
        "tokens_measured": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "s_per_step": round(seconds / measured, 3),
        "step_seconds": [round(s, 3) for s in step_seconds],
        "step_tokens": step_tokens,
        "first_step_loss": round(losses[0], 6),
        "losses": [round(x, 6) for x in losses],
        "peak_rss_gib": round(_ru_maxrss_gib(), 3),
        "train_peak_rss_gib": round(_hwm_gib(), 3) if hwm_reset else None,
        "params": params,
        "model_tflops_per_s": round(model_flops / 1e12, 3),
        **({"mfu": round(model_flops / (args.peak_tflops * 1e12), 4)} if args.peak_tflops else {}),
        **extra,
    }


# ── ours ────────────────────────────────────────────────────────────────────────────────────
def run_ours(args, model_path: str, rows: list[dict]) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from pipeline.config import DPOMethod, TrainConfig
    from stages.train.batch import collate, tokenize_pair
    from stages.train.loop import _clip, batch_schedule, epoch_order, global_means, load_policy, reference_logps, step_loss
    from stages.train.objectives import objective_for

    torch.set_num_threads(args.threads)
    device = _device(args)
    backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        cfg = TrainConfig(method=DPOMethod(beta=args.beta), num_workers=1, batch_size=args.batch_size,
                          lr=args.lr, max_length=args.max_length, dtype=args.dtype, seed=args.seed)  # fmt: skip
        torch.manual_seed(cfg.seed)
        peaks = GpuPeaks(device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # --ours-precision autocast: TRL's policy on our blocks (fp32 FSDP2 weights, matmuls in bf16 under autocast)
        autocast = args.ours_precision == "autocast" and cfg.dtype == "bfloat16"
        model = load_policy(model_path, "float32" if autocast else cfg.dtype, device)
        precision = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        params = _params(model)
        pairs = [tokenize_pair(tokenizer, row, cfg.max_length) for row in rows]
        objective = objective_for(cfg.method)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        share = cfg.batch_size  # one worker: the whole global batch
        t0 = time.perf_counter()
        with precision():
            ref_chosen, ref_rejected = reference_logps(model, pairs, pad_id, share, device, epoch_order(len(pairs), cfg.seed, 0))
        _sync(device)
        ref_seconds = time.perf_counter() - t0
        schedule = batch_schedule(len(pairs), cfg.batch_size, cfg.epochs, cfg.seed, cfg.max_steps)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
        model.train()
        hwm_reset = _reset_hwm()
        peaks.start_training()
        step_tokens, step_seconds, losses = [], [], []
        for indices in schedule:
            mine = torch.tensor(indices)
            cpu_batch = collate([pairs[i] for i in indices], pad_id)
            step_tokens.append(int(cpu_batch.attention_mask.sum()))
            batch = cpu_batch.to(device)
            _sync(device)
            start = time.perf_counter()
            with precision():
                loss, outputs = step_loss(model, batch, ref_chosen[mine], ref_rejected[mine], objective)
            loss.backward()
            _clip(model, cfg.grad_clip)
            optimizer.step()
            warmup.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = global_means(outputs, cfg.batch_size)
            _sync(device)
            step_seconds.append(time.perf_counter() - start)
            losses.append(metrics["loss"])
        return _summary("ours", step_tokens, step_seconds, losses, args, hwm_reset, params,
                        {"ref_pass_s": round(ref_seconds, 2), "threads": torch.get_num_threads(),
                         "precision": "autocast" if autocast else f"fsdp2 {cfg.dtype}",
                         "dist_backend": backend, **peaks.report()})  # fmt: skip
    finally:
        dist.destroy_process_group()


# ── TRL ─────────────────────────────────────────────────────────────────────────────────────
def run_trl(args, model_path: str, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from stages.train.loop import epoch_order

    torch.set_num_threads(args.threads)
    device = _device(args)
    peaks = GpuPeaks(device)
    # Our first epoch's order, read sequentially: the same batches as ours, in the same order.
    ordered = [rows[i] for i in epoch_order(len(rows), args.seed, 0)]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    params = _params(model)

    # Kept as tensors while training (no host sync inside a timed step), read after it.
    step_tokens: list = []
    losses: list = []
    step_seconds: list[float] = []
    state = {"hwm_reset": False}

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            state["hwm_reset"] = _reset_hwm()
            peaks.start_training()

        def on_step_begin(self, *_, **__):
            _sync(device)
            state["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(device)
            step_seconds.append(time.perf_counter() - state["start"])

    class CountingDPOTrainer(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            step_tokens.append(inputs["attention_mask"].sum())
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss.detach() if torch.is_tensor(loss) else loss)
            return loss

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            use_cpu=device.type == "cpu",
            bf16=args.dtype == "bfloat16",
            beta=args.beta,
            loss_type=["sigmoid"],
            learning_rate=args.lr,
            weight_decay=0.0,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            num_train_epochs=1,
            max_length=args.max_length,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=args.batch_size,
            gradient_checkpointing=False,
            train_sampling_strategy="sequential",
            dataloader_drop_last=True,
            report_to="none",
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        trainer = CountingDPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(ordered),
                                     processing_class=tokenizer, callbacks=[Timer()])  # fmt: skip
        _sync(device)
        init_seconds = time.perf_counter() - t0  # tokenization + reference precompute
        trainer.train()
    return _summary("trl", [int(t) for t in step_tokens], step_seconds, [float(x) for x in losses], args,
                    state["hwm_reset"], params,
                    {"init_incl_ref_pass_s": round(init_seconds, 2), "threads": torch.get_num_threads(),
                     "autocast_bf16": bool(config.bf16), "precision": "autocast" if config.bf16 else "float32", "model_device": str(next(model.parameters()).device),
                     **peaks.report()})  # fmt: skip


# ── driver ──────────────────────────────────────────────────────────────────────────────────
def matmul_peak(args) -> dict:
    """The CPU's achievable dense-matmul rate in the run's compute dtype on the run's threads: the
    best of 5 [4096 × 4096] @ [4096 × 4096] products (2·4096³ FLOPs each). On a CPU there is no
    datasheet peak the way an H100 has one; MFU against this is "the share of what a plain matmul
    gets here"."""
    import torch

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    a, b = torch.randn(4096, 4096).to(dtype), torch.randn(4096, 4096).to(dtype)
    a @ b  # warm-up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"side": "peak", "dtype": args.dtype, "threads": args.threads, "tflops": round(2 * 4096**3 / best / 1e12, 3)}


def child(args) -> None:
    if args.side == "build":
        print(MARK + json.dumps(build_shape(args, args.model_dir)), flush=True)
        return
    if args.side == "peak":
        print(MARK + json.dumps(matmul_peak(args)), flush=True)
        return
    if args.model_dir:
        model_path = args.model_dir
    else:
        from pipeline.models import resolve_model

        model_path = resolve_model(args.model)
    tokenizer = None
    if args.seq_len:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = build_rows(args.pairs, tokenizer, args.seq_len)
    result = (run_ours if args.side == "ours" else run_trl)(args, model_path, rows)
    n_steps = args.pairs // args.batch_size
    assert len(result["step_seconds"]) == n_steps, f"{args.side}: {len(result['step_seconds'])} steps, expected {n_steps}"
    result["first_step_loss_ok"] = ok = abs(result["first_step_loss"] - LN2) < LOSS_TOL
    message = f"{args.side}: first-step loss {result['first_step_loss']} is not ln 2 = {LN2:.6f} (policy == reference)"
    if not ok and not args.loss_warn_only:
        raise AssertionError(message)
    if not ok:
        print(f"WARNING {message}", file=sys.stderr, flush=True)
    print(MARK + json.dumps(result), flush=True)


def _run_side(side: str, env: dict, extra: list[str]) -> dict | None:
    cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:], *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        print(f"{side} side failed (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(lines[-1][len(MARK) :])


def _ratio(ours: dict, trl: dict, key: str) -> float | None:
    return round(ours[key] / trl[key], 3) if ours.get(key) and trl.get(key) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a randomly initialised Qwen2 of this shape instead of --model")
    parser.add_argument("--tokenizer", help="tokenizer folder for --shape (default: --model's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pairs", type=int, default=40, help="pairs; steps = pairs // batch-size (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch of pairs per optimiser step")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, help="fill every prompt+response to this many tokens (TRL's count)")
    parser.add_argument("--max-length", type=int, help="truncation length on both sides (default: --seq-len, else 384)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="compute dtype on both sides (fp32 weights either way)")  # fmt: skip
    parser.add_argument("--ours-precision", choices=["fsdp", "autocast"], default="fsdp",
                        help="bf16 on our side: fsdp = the trainer's own (FSDP2 casts the parameters to bf16, the whole "
                        "forward in bf16); autocast = TRL's policy (fp32 weights, matmuls in bf16 under torch.autocast)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak FLOP/s in TFLOP/s for MFU (default: 989, H100 SXM dense bf16, on cuda; "
                        "on cpu measured: a 4096² matmul in --dtype on --threads, `matmul_peak`)")  # fmt: skip
    parser.add_argument("--dist-backend", help="our process group's backend (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--loss-warn-only", action="store_true",
                        help="a first-step loss off ln 2 warns (first_step_loss_ok: false) instead of failing")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["ours", "trl", "build", "peak"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)  # the built --shape model, handed to the sides
    args = parser.parse_args()
    if args.pairs // args.batch_size <= args.warmup_steps:
        parser.error("need more steps (pairs // batch-size) than --warmup-steps")
    if args.max_length is None:
        args.max_length = args.seq_len or 384
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = 989.0

    if args.side:
        child(args)
        return 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-model-") as model_dir:
        extra, build = [], None
        if args.shape:  # built in its own process: this driver stays small (a child's ru_maxrss can inherit it)
            build = _run_side("build", env, ["--model-dir", model_dir])
            if build is None:
                return 1
            print(f"built {args.shape}: {build['params']:,} parameters in {build['seconds']} s", file=sys.stderr, flush=True)
            extra = ["--model-dir", model_dir]
        results = {}
        if args.peak_tflops is None:  # cpu: measured in a child of its own, before the sides
            peak = _run_side("peak", env, [])
            if peak is None:
                return 1
            args.peak_tflops = peak["tflops"]
            print(f"cpu matmul peak ({args.dtype}, {args.threads} threads): {peak['tflops']} TFLOP/s", file=sys.stderr, flush=True)
        for side in ("ours", "trl"):
            results[side] = _run_side(side, env, extra)
            if results[side] is None:
                return 1
            print(json.dumps(results[side]), flush=True)

    ours, trl = results["ours"], results["trl"]
    for side in (ours, trl):  # the sides ran without the measured cpu peak
        side["mfu"] = round(side["model_tflops_per_s"] / args.peak_tflops, 4)
    keep = ["precision"] + ["tokens_per_s", "s_per_step", "tokens_measured", "peak_rss_gib", "train_peak_rss_gib", "first_step_loss"]
    keep += ["first_step_loss_ok", "model_tflops_per_s", "mfu"]
    gpu_keys = ["peak_gpu_gib", "peak_gpu_reserved_gib", "train_peak_gpu_gib", "train_peak_gpu_reserved_gib"]
    if args.device == "cuda":
        keep += gpu_keys
    combined = {
        "pairs": args.pairs, "batch_size": args.batch_size, "steps_measured": ours["steps_measured"],
        "warmup_steps": args.warmup_steps, "threads": args.threads, "dtype": args.dtype, "max_length": args.max_length,
        "device": args.device, "shape": args.shape, "seq_len": args.seq_len, "params": ours["params"],
        "peak_tflops": args.peak_tflops, "ours_precision": args.ours_precision, **({"gpu": ours.get("gpu")} if args.device == "cuda" else {}),
        "ours": {k: ours[k] for k in keep if k in ours},
        "trl": {k: trl[k] for k in keep if k in trl},
        "ratio_tokens_per_s": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
        "ratio_peak_rss": round(ours["peak_rss_gib"] / trl["peak_rss_gib"], 3),
    }  # fmt: skip
    if ours["train_peak_rss_gib"] and trl["train_peak_rss_gib"]:
        combined["ratio_train_peak_rss"] = round(ours["train_peak_rss_gib"] / trl["train_peak_rss_gib"], 3)
    if args.device == "cuda":
        for key in gpu_keys:
            combined[f"ratio_{key.removesuffix('_gib')}"] = _ratio(ours, trl, key)
    _print_readable(combined)
    print(json.dumps(combined), flush=True)
    return 0


def _print_readable(c: dict) -> None:
    mem = "peak_gpu_gib" if c["device"] == "cuda" else "peak_rss_gib"
    for side in ("ours", "trl"):
        r = c[side]
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        print(f"{side:>4}: {r['tokens_per_s']:>10,.0f} tokens/s, {r['s_per_step']:.3f} s/step, {mem} {r[mem]}, "
              f"{r['model_tflops_per_s']} TFLOP/s{mfu}, first-step loss {r['first_step_loss']}", file=sys.stderr)  # fmt: skip
    ratio_mem = c.get(f"ratio_{mem.removesuffix('_gib')}")
    print(f"ours/trl: tokens/s ×{c['ratio_tokens_per_s']}, {mem} ×{ratio_mem}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
