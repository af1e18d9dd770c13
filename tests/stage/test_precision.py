"""One precision policy: the train stage's bf16 path and evaluate's log-probs against its reference.

One train-stage run per precision (a Ray Train start costs ~20 s), shared by every test here:
the tiny Llama, 8 pairs, 2 workers, a global batch of 2 (one pair per worker per forward), one
step. The reference pass writes `reference_logps.parquet`; evaluate's `pair_logps` is run on the
same model and pairs and compared with it.

Measured on a 2-core AVX512-BF16 CPU (|logp| ≈ 95 per response):

| evaluate's forward (bf16)                        | max |Δ| vs reference | mean |Δ| |
|---|---:|---:|
| before: CPU autocast, micro_batch 1 or 4         | 9.5e-3               | 2.7e-3   |
| now: `for_inference`, micro_batch 1 (= training's batches) | 0          | 0        |
| now: `for_inference`, micro_batch 4 (evaluate's default)   | 1.9e-3     | 2.9e-4   |
| `model.to(bf16)` (rotary buffers cast too), micro_batch 1 | 6.1e-3     |          |

Autocast keeps fp32 weights and residual stream and rounds only matmul inputs to bf16; FSDP2's
param_dtype runs the whole forward in bf16, which `for_inference` reproduces bit for bit on the
same batches. What remains at evaluate's default batching is bf16 rounding that depends on the
batch's shape. In fp32 every variant is within 1e-6.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import ray

from pipeline.config import RunConfig

NUM_PAIRS = 8
# The same forward on the same batches is bit-identical (measured 0); autocast is 9.5e-3 away.
SAME_BATCHES_TOL = {"bfloat16": 1e-6, "float32": 1e-4}
# Evaluate's default micro-batches of 4 pad differently from training's: measured mean |Δ| 2.9e-4
# in bf16, against 2.7e-3 for autocast.
DEFAULT_BATCHING_MEAN_TOL = 1e-3
# Step 1 runs the reference pass's very batches through the same forward, so every h is exactly 0
# (measured 0.0 in bf16). A reference computed in other batches would be off by β × ~1e-3.
STEP_ONE_REWARD_TOL = 1e-6


def _write_pairs(root: Path) -> Path:
    """Pairs of different lengths (so batches are padded), TRL's conversational format."""
    rows = []
    for i in range(NUM_PAIRS):
        a, b = i + 2, 3 * i + 1
        rows.append({
            "prompt": [{"role": "user", "content": f"Tom has {a} bags of {b} apples. How many apples?"}],
            "chosen": [{"role": "assistant", "content": f"{a} × {b} = {a * b} apples. The answer is {a * b}."}],
            "rejected": [{"role": "assistant", "content": f"The answer is {a + b + i}." + " 0 1 2" * (i % 3)}],
            "prompt_id": f"p{i:03d}",
        })  # fmt: skip
    (root / "pairs" / "s1").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "pairs" / "s1" / "pairs.parquet", index=False)
    return root / "pairs"


@pytest.fixture(scope="module")
def trained(tiny_llama, ray_local, tmp_path_factory) -> dict[str, Path]:
    """dtype → the train stage's output folder (one step on the shared pairs)."""
    from stages.train import run

    root = tmp_path_factory.mktemp("precision")
    pairs = _write_pairs(root)
    outs = {}
    for dtype in ("bfloat16", "float32"):
        cfg = RunConfig.model_validate({"policy": str(tiny_llama), "train": {
            "batch_size": 2, "num_workers": 2, "max_steps": 1, "lr": 1e-3, "dtype": dtype}})  # fmt: skip
        out = root / f"train-{dtype}"
        out.mkdir()
        run(cfg, {"policy": str(tiny_llama), "pairs": str(pairs)}, out)
        outs[dtype] = out
    outs["pairs_file"] = pairs / "s1" / "pairs.parquet"
    return outs


def _step_one(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_bf16_step_one_rewards_are_zero(trained):
    first = _step_one(trained["bfloat16"])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) <= STEP_ONE_REWARD_TOL, (key, first)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reference_logps_file_has_one_finite_row_per_pair_in_file_order(trained, dtype):
    ref = pd.read_parquet(trained[dtype] / "reference_logps.parquet")
    assert list(ref.columns) == ["prompt_id", "ref_chosen_logps", "ref_rejected_logps"]
    assert list(ref["prompt_id"]) == list(pd.read_parquet(trained["pairs_file"])["prompt_id"])
    values = ref[["ref_chosen_logps", "ref_rejected_logps"]]
    assert values.map(math.isfinite).all().all() and (values < 0).all().all()


def _evaluate_gap(trained, tiny_llama, dtype: str, micro_batch: int) -> pd.Series:
    """|evaluate's logps − the training reference|, chosen then rejected, per pair."""
    from stages.evaluate.logps import pair_logps

    ref = pd.read_parquet(trained[dtype] / "reference_logps.parquet")
    lp = ray.get(pair_logps.remote(str(tiny_llama), str(trained["pairs_file"]), 512, None, dtype, micro_batch))
    assert list(lp["prompt_id"]) == list(ref["prompt_id"])
    return pd.concat([(lp["logps_chosen"] - ref["ref_chosen_logps"]).abs(),
                      (lp["logps_rejected"] - ref["ref_rejected_logps"]).abs()])  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_evaluate_logps_on_training_batches_equal_the_reference(trained, tiny_llama, dtype):
    """micro_batch 1 = one pair per forward, as each worker ran the reference pass: the same
    computation if evaluate uses training's precision policy (autocast: 9.5e-3 off in bf16)."""
    gap = _evaluate_gap(trained, tiny_llama, dtype, micro_batch=1)
    assert gap.max() <= SAME_BATCHES_TOL[dtype], f"max |Δlogp| = {gap.max():.3g}"


def test_evaluate_logps_at_default_batching_within_bf16_noise(trained, tiny_llama):
    gap = _evaluate_gap(trained, tiny_llama, "bfloat16", micro_batch=4)
    assert gap.mean() <= DEFAULT_BATCHING_MEAN_TOL, f"mean |Δlogp| = {gap.mean():.3g}, max {gap.max():.3g}"
