"""One precision policy: the train stage's bf16 path, and evaluate's log-probs against its reference.

One train-stage run per precision (a Ray Train start costs ~20 s), shared by every test here:
the tiny Llama, 5 pairs, 2 workers, a global batch of 4 (two pairs per worker per forward), one
step. 5 pairs in global batches of 4 leave a padded tail: the reference pass runs pairs 4, 0 and
1 of step 1 again there, pair 4 next to pair 2, whose long rejected response widens that batch.

Why evaluate must use both training's precision policy and the reference pass's batches — the
gap max |Δlogp| between evaluate's bf16 log-probs and `reference_logps.parquet`, measured on a
2-core AVX512-BF16 CPU (|logp| ≈ 20-100 per response):

| evaluate's forward (bf16)                                     | tiny Llama (here) | SmolLM2-135M |
|---|---:|---:|
| before: CPU autocast (fp32 weights, bf16 matmul inputs), any batches | 5.1e-3     | 0.44-0.67    |
| `for_inference`, file-order micro-batches of 4 (no batches given)    | 2.1e-3     | 0.58-0.70    |
| `for_inference`, the reference pass's batches (now)                  | 0          | 0            |
| `model.to(bf16)` (rotary buffers cast too), the reference's batches  | 4.0e-3     |              |

(SmolLM2: the train stage on 8 pairs like these, global batch 2 or 8.) FSDP2's param_dtype runs
the whole forward in bf16 with fp32 buffers, which `for_inference` reproduces bit for bit on the
same batches; in bf16 the padded width of a batch alone moves a SmolLM2 response's logp by 0.23
nats. With the old reference pass (a pair repeated in the padded tail took its reference from
the tail's batch) step 1's rewards/chosen here was 1.3e-5, not 0.
In fp32 every variant is within 1e-6.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import ray

from pipeline.config import RunConfig

NUM_PAIRS, BATCH_SIZE, LONG_PAIR = 5, 4, 2  # LONG_PAIR: the last of epoch_order(5, seed 0), in the tail batch
# The same forward on the same batches is bit-identical (measured 0); autocast is 5.1e-3 away in bf16.
SAME_BATCHES_TOL = {"bfloat16": 1e-6, "float32": 1e-4}
# Step 1 runs the reference pass's very batches through the same forward, so every h is exactly 0
# (measured 0.0 in bf16). A reference taken from another batch would be off by β × ~1e-3 here
# (β × 0.2 on SmolLM2): the tail's repeat of pair 4 or 0, for one.
STEP_ONE_REWARD_TOL = 1e-6


def _write_pairs(root: Path) -> Path:
    """Pairs of different lengths (so batches are padded), TRL's conversational format."""
    rows = []
    for i in range(NUM_PAIRS):
        a, b = i + 2, 3 * i + 1
        tail = " 0 1 2 3 4 5 6 7 8 9" * 4 if i == LONG_PAIR else " 0 1 2" * (i % 3)
        rows.append({
            "prompt": [{"role": "user", "content": f"Tom has {a} bags of {b} apples. How many apples?"}],
            "chosen": [{"role": "assistant", "content": f"{a} × {b} = {a * b} apples. The answer is {a * b}."}],
            "rejected": [{"role": "assistant", "content": f"The answer is {a + b + i}." + tail}],
            "prompt_id": f"p{i:03d}",
        })  # fmt: skip
    (root / "pairs" / "s1").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(root / "pairs" / "s1" / "pairs.parquet", index=False)
    return root / "pairs" / "s1" / "pairs.parquet"


def _config(tiny_llama: Path, dtype: str) -> RunConfig:
    return RunConfig.model_validate({"policy": str(tiny_llama), "train": {
        "batch_size": BATCH_SIZE, "num_workers": 2, "max_steps": 1, "lr": 1e-3, "dtype": dtype}})  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_llama, ray_local, tmp_path_factory) -> dict:
    """dtype → the train stage's output folder (one step); "pairs_file" → the pairs."""
    from stages.train import run

    root = tmp_path_factory.mktemp("precision")
    pairs_file = _write_pairs(root)
    outs: dict = {"pairs_file": pairs_file}
    for dtype in ("bfloat16", "float32"):
        out = root / f"train-{dtype}"
        out.mkdir()
        run(_config(tiny_llama, dtype), {"policy": str(tiny_llama), "pairs": str(pairs_file.parent.parent)}, out)
        outs[dtype] = out
    return outs


def test_the_tail_repeats_step_one_pairs_next_to_the_long_pair():
    """The setup the step-1 test relies on (else it could not catch a reference from the tail)."""
    from stages.train import reference_batches_for

    batches = reference_batches_for(NUM_PAIRS, _config(Path("."), "bfloat16").train)
    step_one, tail = batches[:2], batches[2:]
    assert any(LONG_PAIR in b and set(b) & set(step_one[0] + step_one[1]) for b in tail), batches


def test_bf16_step_one_rewards_are_zero(trained):
    first = json.loads((trained["bfloat16"] / "metrics.jsonl").read_text().splitlines()[0])
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


def _evaluate_gap(trained, tiny_llama, dtype: str, limit: int | None = None) -> pd.Series:
    """|evaluate's logps − the training reference| per pair, chosen then rejected, computed as
    the evaluate stage does: training's precision policy, the reference pass's batches."""
    from stages.evaluate.logps import pair_logps
    from stages.train import reference_batches_for

    ref = pd.read_parquet(trained[dtype] / "reference_logps.parquet")[:limit]
    batches = reference_batches_for(NUM_PAIRS, _config(tiny_llama, dtype).train)
    lp = ray.get(pair_logps.remote(str(tiny_llama), str(trained["pairs_file"]), 512, limit, dtype, batches=batches))
    assert list(lp["prompt_id"]) == list(ref["prompt_id"])
    return pd.concat([(lp["logps_chosen"] - ref["ref_chosen_logps"]).abs(),
                      (lp["logps_rejected"] - ref["ref_rejected_logps"]).abs()])  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_evaluate_before_logps_equal_the_training_reference(trained, tiny_llama, dtype):
    """Fails with the old evaluate (CPU autocast, file-order batches): 5.1e-3 off in bf16."""
    gap = _evaluate_gap(trained, tiny_llama, dtype)
    assert gap.max() <= SAME_BATCHES_TOL[dtype], f"max |Δlogp| = {gap.max():.3g}"


def test_evaluate_logps_of_the_first_pairs_equal_the_training_reference(trained, tiny_llama):
    """`evaluate.logp_pairs` limits the pairs; each still runs in its reference batch."""
    gap = _evaluate_gap(trained, tiny_llama, "bfloat16", limit=2)
    assert len(gap) == 4 and gap.max() <= SAME_BATCHES_TOL["bfloat16"], f"max |Δlogp| = {gap.max():.3g}"
