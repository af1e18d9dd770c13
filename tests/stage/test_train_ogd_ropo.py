"""The train stage with `update: ogd` and `parameterisation: ropo` together (the two compose):
Ray Train, 2 FSDP2 workers, micro-batches of 1, bf16, the tiny Llama — and the failures DPO survives:
a killed worker restored from the checkpoint (Ray Train's restart: the test of it for every
method, since the restore path does not depend on the method), a NaN stopping the run."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from tests.stage.test_train_stage import _lines, _train

OGD_ROPO = {"batch_size": 4, "num_workers": 2, "micro_batch_size": 1, "lr": 1e-3, "epochs": 3, "checkpoint_every": 2,
            "optimizer": "rmsprop", "update": {"type": "ogd"}, "diagnostics_every": 2, "dtype": "bfloat16",
            "parameterisation": {"type": "ropo", "modules": ["q_proj", "v_proj"], "stages": 2}}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, ray_local, tmp_path_factory):
    return _train(tiny_llama, tmp_path_factory.mktemp("ogd-ropo"), OGD_ROPO)


def test_ogd_logs_its_rule_and_the_dpo_loss_beside_it(uninterrupted):
    stats, out = uninterrupted
    lines = _lines(out)
    assert stats["steps"] == 6 and [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    for r in lines:
        assert r["ogd/projected"] in (0.0, 1.0) and r["ogd/grad_norm_chosen"] > 0 and r["ogd/grad_norm_rejected"] > 0
        # the logged numbers are one computation: c = max(0, g_w·g_l)/‖g_l‖²
        assert r["ogd/coefficient"] == pytest.approx(max(0.0, r["ogd/dot"]) / r["ogd/grad_norm_rejected"] ** 2, rel=1e-6)
        assert r["ogd/projected"] == float(r["ogd/dot"] > 0)
        assert r["grad_norm/rejected"] == pytest.approx(r["ogd/coefficient"] * r["ogd/grad_norm_rejected"], rel=1e-6)
        assert "logps/chosen" in r and "rewards/margins" in r  # the usual metrics, of the logged method
    assert any(r["ogd/projected"] == 1.0 for r in lines), "the projection never fired: the test shows nothing"
    # The logged loss is DPO's at β = 0.1 from the starting policy: ln 2 at step 1 (RoPO starts at the
    # reference exactly; in bf16 too, as the reference pass runs OGD's own per-side forwards), and
    # OGD, which never sees it, still lowers it (seed 001 Fig. 6).
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert lines[-1]["loss"] < math.log(2) - 1e-3
    assert lines[-1]["logratios/chosen"] > 0  # the chosen responses' likelihood rose from the reference's
    assert (out / "reference_logps.parquet").is_file()  # from the starting policy: no second model


def test_ropo_trains_its_share_and_exports_a_plain_model_with_the_same_neuron_angles(uninterrupted, tiny_llama):
    from transformers import AutoModelForCausalLM

    from stages.evaluate.geometry import hyperspherical_energy, neuron_cosines

    stats, out = uninterrupted
    assert stats["trainable_parameters"] == 2 * 2 * (256 + 128)  # 2 layers × (q, v) × (angles + magnitudes)
    assert stats["trainable_percent"] == pytest.approx(100 * 1536 / stats["parameters"]["total"], rel=1e-3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    trained, info = AutoModelForCausalLM.from_pretrained(out / "checkpoint", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    after = trained.state_dict()
    assert after.keys() == base.keys()
    for key, w in after.items():
        if key.endswith(("q_proj.weight", "v_proj.weight")):
            assert float((w - base[key]).abs().max()) > 1e-4, key
            assert float((neuron_cosines(w) - neuron_cosines(base[key])).abs().max()) <= 1e-5, key
            assert hyperspherical_energy(w) == pytest.approx(hyperspherical_energy(base[key]), rel=1e-6), key
        else:
            assert torch.equal(w, base[key]), f"{key} is frozen under RoPO"


def test_a_killed_worker_is_restored_and_a_nan_then_stops_the_run(uninterrupted, tiny_llama, ray_local, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """Rank 1 dies after step 3 (checkpoints after 2 and 4): the workers restore step 2's rotations,
    RMSprop state and schedule and redo steps 3–4 as the uninterrupted run did; a NaN at step 5
    then stops the run before any update from it, with the error a user acts on."""
    monkeypatch.setenv("PIPELINE_TRAIN_KILL", "1:3")
    monkeypatch.setenv("PIPELINE_TRAIN_INJECT_NAN_AT_STEP", "5")
    with pytest.raises(UserError, match=r"training stopped: non-finite loss or gradient at step 5"):
        _train(tiny_llama, tmp_path, {**OGD_ROPO, "max_failures": 1})
    lines, want = _lines(tmp_path / "train"), _lines(uninterrupted[1])
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r.get("restored_from_step") for r in lines] == [None, None, 2, None]
    for got, ref in zip(lines, want):
        for key in ("loss", "logps/chosen", "logps/rejected", "ogd/dot", "ogd/coefficient", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-8), (got["step"], key)
