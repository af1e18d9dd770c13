"""Atomic stage folders and manifests (the runner's keys: tests/unit/test_runner.py)."""

from __future__ import annotations

import pytest

from pipeline.artifacts import MANIFEST, atomic_dir, read_manifest


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


def test_a_resumable_stage_finds_its_partial_work_after_a_failure_and_only_for_the_same_key(tmp_path):
    final = tmp_path / "train"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, {"key": "k1"}, resumable=True) as tmp:
            (tmp / "checkpoint-2").write_text("step 2")
            raise RuntimeError("killed at step 3")
    assert not final.exists()
    with atomic_dir(final, {"key": "k1"}, resumable=True) as tmp:  # the same work again: it finds step 2
        assert (tmp / "checkpoint-2").read_text() == "step 2"
        (tmp / "done").write_text("yes")
    assert (final / "done").read_text() == "yes" and (final / "checkpoint-2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def test_a_changed_config_starts_a_resumable_stage_afresh(tmp_path):
    final = tmp_path / "train"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, {"key": "old"}, resumable=True) as tmp:
            (tmp / "checkpoint-2").write_text("step 2 of the old config")
            raise RuntimeError("killed")
    with atomic_dir(final, {"key": "new"}, resumable=True) as tmp:
        assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
