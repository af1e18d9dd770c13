"""Atomic stage folders, manifests, and the runner's skip rule."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.artifacts import MANIFEST, atomic_dir, read_manifest
from pipeline.config import RunConfig
from pipeline.runner import STAGES, Runner


def test_finished_folder_appears_only_with_its_manifest(tmp_path):
    final = tmp_path / "round-0" / "sample"
    with atomic_dir(final, {"stage": "sample", "key": "k1"}) as tmp:
        (tmp / "part-0.parquet").write_bytes(b"rows")
        assert not final.exists(), "nothing under the final name while the stage runs"
    assert (final / "part-0.parquet").read_bytes() == b"rows"
    manifest = read_manifest(final)
    assert manifest["key"] == "k1" and "finished_at" in manifest and "torch" in manifest["versions"]
    assert [p.name for p in final.parent.iterdir()] == ["sample"]


def test_a_stage_that_dies_leaves_no_folder_and_no_temp(tmp_path):
    final = tmp_path / "judge"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, {"key": "k"}) as tmp:
            (tmp / "half.parquet").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_temp_folders_of_a_killed_process_are_cleared_on_the_next_run(tmp_path):
    final = tmp_path / "train"
    leftover = tmp_path / ".train.tmp-99999"  # what SIGKILL leaves: no cleanup code ran
    leftover.mkdir()
    (leftover / "metrics.jsonl").write_text('{"step": 1}\n')
    with atomic_dir(final, {"key": "k"}) as tmp:
        (tmp / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert not leftover.exists()
    assert (final / "metrics.jsonl").read_text().count("step") == 2


def test_a_replaced_artifact_is_moved_aside_not_deleted(tmp_path):
    final = tmp_path / "pairs"
    with atomic_dir(final, {"key": "old"}) as tmp:
        (tmp / "v").write_text("1")
    with atomic_dir(final, {"key": "new"}) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and read_manifest(final)["key"] == "new"
    assert (tmp_path / ".pairs.old-old" / "v").read_text() == "1"


def test_manifest_is_hidden_from_parquet_readers(tmp_path):
    import pandas as pd

    final = tmp_path / "sample"
    with atomic_dir(final, {"key": "k"}) as tmp:
        pd.DataFrame({"a": [1, 2]}).to_parquet(tmp / "part.parquet")
    assert (final / MANIFEST).is_file() and MANIFEST.startswith("_")
    assert pd.read_parquet(final)["a"].tolist() == [1, 2]


def _finish(runner: Runner, name: str, input_keys: dict) -> str:
    key = runner.key(STAGES[name], input_keys)
    with atomic_dir(runner.run_dir / "round-0" / name, {"key": key}):
        pass
    return key


def test_stage_key_follows_its_config_blocks_and_inputs(tmp_path):
    base = RunConfig()
    runner = Runner(base, tmp_path)
    judge_key = runner.key(STAGES["judge"], {"sample": "s1"})
    # a block the judge does not read leaves its key alone; its own block or its input changes it
    assert Runner(base.model_copy(update={"train": base.train.model_copy(update={"lr": 1.0})}), tmp_path).key(
        STAGES["judge"], {"sample": "s1"}) == judge_key  # fmt: skip
    assert runner.key(STAGES["judge"], {"sample": "s2"}) != judge_key
    sampler = base.sampler.model_copy(update={"n": 4})
    assert Runner(base.model_copy(update={"sampler": sampler}), tmp_path).key(STAGES["sample"], {}) != runner.key(
        STAGES["sample"], {})  # fmt: skip


def test_runner_reads_input_keys_from_finished_manifests_and_names_missing_ones(tmp_path):
    from pipeline.errors import UserError

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({}))
    runner = Runner(RunConfig(policy=str(tmp_path / "m")), tmp_path / "run")
    with pytest.raises(UserError, match="run `stage sample` first"):
        runner.inputs(STAGES["judge"], 0)
    sample_key = _finish(runner, "sample", {"policy": str(tmp_path / "m")})
    paths, keys = runner.inputs(STAGES["judge"], 0)
    assert keys["sample"] == sample_key and os.path.isdir(paths["sample"])
    with pytest.raises(UserError, match="run round 0 first"):
        runner.policy(1)


def test_round_k_samples_from_round_k_minus_1_checkpoint(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    runner = Runner(RunConfig(policy=str(tmp_path / "m"), rounds=2), tmp_path / "run")
    assert runner.policy(0)[0] == str((tmp_path / "m").resolve())
    train_key = _finish(runner, "train", {"pairs": "p"})
    path, name, key = runner.policy(1)
    assert path == str(runner.run_dir / "round-0" / "train" / "checkpoint")
    assert (name, key) == ("round-0", train_key)
    # so a retrained round 0 changes every key of round 1
    assert runner.key(STAGES["sample"], {"policy": key}) != runner.key(STAGES["sample"], {"policy": "other"})
