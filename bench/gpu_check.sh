#!/usr/bin/env bash
# Our DPO train step vs TRL 1.16's DPOTrainer on a lent GPU: the device command, run from the repo
# root with `.gpu` carried (wheels in .gpu/whl/, SmolLM2's tokenizer in .gpu/tokenizer/; both are
# git-ignored through .git/info/exclude and made by hand, see bench/train_step_vs_trl.py).
#
#   bash bench/gpu_check.sh        # on the device machine; writes $OUT/gpu_check.log and $OUT/result.json
#
# The GPU image has torch, transformers, accelerate, pandas, pyarrow, ... but not trl, datasets
# (nor dill, multiprocess) or pydantic (pipeline.config, imported by pipeline.data and
# stages/train/__init__.py): those come as wheels, installed offline into /tmp/site.
# Expect about 2-3 minutes on an H100 (a 0.5B random model built and saved once, then each side
# in its own process: load, reference pass, 6 steps of 8 pairs x 512 tokens).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
{
    set -euo pipefail
    echo "== $(date -u +%FT%TZ) $(hostname)"
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    python3 - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], sys.executable)
for d in ["torch", "transformers", "accelerate", "trl", "datasets", "pyarrow", "fsspec", "huggingface-hub",
          "tokenizers", "pydantic", "pydantic-core", "typing-extensions", "dill", "multiprocess", "peft", "triton"]:
    try:
        print(f"{d:18} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d:18} -")
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "nccl", torch.cuda.nccl.version())
import datasets, trl, pipeline.config  # fail here, not after the model build, if an import is missing
EOF
    timeout -k 10 360 python3 bench/train_step_vs_trl.py --device cuda --shape qwen2.5-0.5b --tokenizer .gpu/tokenizer \
        --pairs 48 --batch-size 8 --seq-len 512 --warmup-steps 2 --loss-warn-only \
        | tee "$OUT/result.jsonl"
    tail -n 1 "$OUT/result.jsonl" > "$OUT/result.json"
    echo "== done $(date -u +%FT%TZ)"
} 2>&1 | tee "$OUT/gpu_check.log"
