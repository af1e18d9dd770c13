"""A successful sample and train prints no traceback and no warning a user cannot act on.

A child process does what a run does, on the tiny Llama: prepares its environment as the CLI
does, starts a fresh local Ray through the runner's `init_ray`, samples with the real vLLM engine
(`stages.sample.vllm.generate`) and trains one real DPO step with Ray Train (`stages.train.run`).
Its whole stdout and stderr are checked for the lines these used to print (pipeline/quiet.py
says where each came from):

- vLLM's engine actors, torn down by Ray before vLLM could shut them down: Python's
  `resource_tracker` "process died unexpectedly" warning and its KeyError tracebacks;
- Ray Train's placement-group cleaner, asking a State API no dashboard serves: "Failed to query
  Ray Train Controller actor state" every second, or a ConnectionError traceback on a host that
  runs several Ray instances;
- Ray's notice that it enabled token authentication; vLLM's Triton, FutureWarning and NUMA lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import sys
from pathlib import Path

from pipeline import quiet

quiet.before_ray_import()  # as `python -m pipeline` does for a local cluster

import pandas as pd
import ray

from pipeline.config import RunConfig
from pipeline.data import load_prompts
from pipeline.runner import init_ray
from stages import train
from stages.sample import vllm

model, root = sys.argv[1], Path(sys.argv[2])
cfg = RunConfig.model_validate({
    "policy": model,
    "data": {"type": "builtin_math", "num_train": 2, "num_eval": 2},
    "sampler": {"type": "vllm", "n": 2, "max_tokens": 8, "dtype": "float32", "max_model_len": 512,
                "batch_size": 8, "gpu_memory_utilization": 0.05},
    "train": {"num_workers": 2, "batch_size": 2, "epochs": 1, "max_steps": 1},
    "ray": {"num_cpus": 2},
})
init_ray(cfg)
vllm.generate(cfg.sampler, model, "tiny", load_prompts(cfg.data, "train"), root / "sample")
assert len(pd.read_parquet(root / "sample")) == 4

pair = {"prompt": [{"role": "user", "content": "Tom has 3 bags of 4 apples. How many apples?"}],
        "chosen": [{"role": "assistant", "content": "3 × 4 = 12. The answer is 12."}],
        "rejected": [{"role": "assistant", "content": "The answer is 7."}]}
(root / "pairs" / "s1").mkdir(parents=True)
pd.DataFrame([{**pair, "prompt_id": f"p{i}"} for i in range(4)]).to_parquet(root / "pairs" / "s1" / "pairs.parquet")
(root / "train").mkdir()
stats = train.run(cfg, {"policy": model, "pairs": str(root / "pairs")}, root / "train")
assert stats["steps"] == 1, stats
ray.shutdown()
print("child: done")
"""

# Each is a line a successful run must not print.
NOISE = [
    "Traceback",
    "resource_tracker",
    "Failed to query Ray Train Controller",
    "Token authentication is enabled",
    "Triton is installed",
    "FutureWarning",
    "NUMA binding",
]


def test_sample_and_train_succeed_without_tracebacks_or_unactionable_warnings(tiny_llama, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS")}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_llama), str(tmp_path)],
        cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "child: done" in proc.stdout, output[-5000:]
    noisy = [line for line in output.splitlines() if any(pattern in line for pattern in NOISE)]
    assert not noisy, "\n".join(noisy)
