"""The run dir on an object store, against a real S3-protocol server (moto's, on 127.0.0.1).

An object store has no folder rename, so `atomic_dir` writes in place and the manifest, written
last, is the commit marker. What must hold, checked from the server's own listing (boto3), not
through the code under test: nothing is finished before the manifest, a failed or killed stage
leaves nothing a reader takes as finished and nothing the next run mixes with its rows, the same
resumable work goes on from what it left, and finished work of another config is set aside.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from pipeline import artifacts
from pipeline.artifacts import MANIFEST, atomic_dir, join, localize, read_manifest
from tests.conftest import S3_BUCKET as BUCKET
from tests.helpers.s3_server import environment, get_text, objects


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """This module's node-local copies in a folder of its own."""
    with environment({"PIPELINE_CACHE": str(tmp_path_factory.mktemp("cache"))}):
        yield


def keys(s3, prefix: str) -> set[str]:
    """Object names under a folder; pyarrow's empty directory markers (`key/`) are not files."""
    return {k[len(prefix) + 1 :] for k in objects(s3, BUCKET, prefix) if not k.endswith("/")}


def test_locations_keep_the_uri_and_join_with_slashes():
    assert artifacts.location("s3://b/run/") == "s3://b/run"
    assert join("s3://b/run", "round-0", "sample") == "s3://b/run/round-0/sample"
    assert artifacts.name_of("s3://b/run/round-0/train/s1") == "s1"
    assert artifacts.parent_of("s3://b/run/x") == "s3://b/run"
    assert artifacts.location("file:///tmp/x").as_posix() == "/tmp/x"
    assert not artifacts.is_uri("runs/x") and artifacts.is_uri("gs://b/x")


def test_the_manifest_is_written_last_and_marks_the_folder_finished(s3):
    final = f"s3://{BUCKET}/a/round-0/sample/policy"
    with atomic_dir(final, {"stage": "sample", "key": "k1"}) as out:
        assert out == final  # written in place: there is no rename
        artifacts.write_table(pa.table({"x": [1, 2, 3]}), join(out, "part-0.parquet"))
        # half-way: files are there, but no reader takes the folder as finished
        assert "part-0.parquet" in keys(s3, "a/round-0/sample/policy")
        assert MANIFEST not in keys(s3, "a/round-0/sample/policy")
        assert read_manifest(final) is None
    assert keys(s3, "a/round-0/sample/policy") == {"part-0.parquet", MANIFEST}  # _partial.json gone
    assert json.loads(get_text(s3, BUCKET, f"a/round-0/sample/policy/{MANIFEST}"))["key"] == "k1"
    assert read_manifest(final)["key"] == "k1"


def test_a_failed_stage_leaves_nothing_and_a_killed_ones_rows_are_cleared(s3):
    final = f"s3://{BUCKET}/b/round-0/judge/policy"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, {"key": "k1"}) as out:
            artifacts.write_text(join(out, "part-0.parquet"), "half")
            raise RuntimeError("the judge died")
    assert keys(s3, "b/round-0/judge/policy") == set()
    # a kill gives no chance to clean up: simulate what it leaves (rows, no manifest)
    artifacts.write_text(join(final, "part-9.parquet"), "rows of the killed run")
    assert read_manifest(final) is None
    with atomic_dir(final, {"key": "k1"}) as out:
        artifacts.write_text(join(out, "part-0.parquet"), "new")
    assert keys(s3, "b/round-0/judge/policy") == {"part-0.parquet", MANIFEST}, "the killed run's rows were mixed in"


def test_resumable_work_goes_on_only_for_the_same_key(s3):
    final = f"s3://{BUCKET}/c/round-0/train/s1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final, {"key": "k1"}, resumable=True) as out:
            artifacts.write_text(join(out, ".ray-train", "step-2"), "checkpoint")
            raise KeyboardInterrupt
    assert keys(s3, "c/round-0/train/s1") == {".ray-train/step-2", "_partial.json"}
    with atomic_dir(final, {"key": "k1"}, resumable=True) as out:  # the same work: it finds step 2
        assert artifacts.read_text(join(out, ".ray-train", "step-2")) == "checkpoint"
        artifacts.remove(join(out, ".ray-train"))
        artifacts.write_text(join(out, "metrics.jsonl"), "{}\n")
    assert keys(s3, "c/round-0/train/s1") == {"metrics.jsonl", MANIFEST}

    final2 = f"s3://{BUCKET}/c/round-0/train/s2"
    artifacts.write_text(join(final2, "_partial.json"), json.dumps({"key": "old"}))
    artifacts.write_text(join(final2, ".ray-train", "step-9"), "another config's checkpoint")
    with atomic_dir(final2, {"key": "new"}, resumable=True) as out:
        assert not artifacts.exists(join(out, ".ray-train", "step-9"))


def test_finished_work_of_another_config_is_set_aside_not_lost(s3):
    final = f"s3://{BUCKET}/d/round-0/pairs"
    with atomic_dir(final, {"key": "old"}) as out:
        artifacts.write_text(join(out, "s1", "pairs.parquet"), "v1")
    with atomic_dir(final, {"key": "new"}) as out:
        assert read_manifest(final) is None  # uncommitted before anything is touched
        artifacts.write_text(join(out, "s1", "pairs.parquet"), "v2")
    assert artifacts.read_text(join(final, "s1", "pairs.parquet")) == "v2" and read_manifest(final)["key"] == "new"
    aside = f"s3://{BUCKET}/d/round-0/.pairs.old-old"
    assert artifacts.read_text(join(aside, "s1", "pairs.parquet")) == "v1" and read_manifest(aside)["key"] == "old"


def test_localize_downloads_once_and_follows_changes(s3):
    folder = f"s3://{BUCKET}/e/round-0/train/s1"
    artifacts.write_text(join(folder, "checkpoint", "config.json"), "{}")
    artifacts.write_text(join(folder, "checkpoint", "model.safetensors"), "weights-1")
    artifacts.write_text(join(folder, ".ray-train", "step-1"), "not needed")
    local = localize(folder, exclude=(".ray-train",))
    assert (local / "checkpoint" / "model.safetensors").read_text() == "weights-1"
    assert not (local / ".ray-train").exists()
    assert local == artifacts.mirror_path(folder) and str(local).startswith(os.environ["PIPELINE_CACHE"])
    before = (local / "checkpoint" / "config.json").stat().st_mtime_ns
    artifacts.write_text(join(folder, "checkpoint", "model.safetensors"), "weights-22")  # a re-run changed it
    artifacts.remove(join(folder, "checkpoint", "config.json"))
    artifacts.write_text(join(folder, "metrics.jsonl"), "{}\n")
    again = localize(folder, exclude=(".ray-train",))
    assert (again / "checkpoint" / "model.safetensors").read_text() == "weights-22"
    assert (again / "metrics.jsonl").is_file() and not (again / "checkpoint" / "config.json").exists()
    artifacts.write_text(join(folder, "checkpoint", "config.json"), "{}")
    localize(folder, exclude=(".ray-train",))
    stamp = (again / "metrics.jsonl").stat().st_mtime_ns
    localize(folder, exclude=(".ray-train",))  # unchanged: nothing downloaded again
    assert (again / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert before > 0


def test_staged_files_go_up_and_a_local_location_is_written_in_place(s3, tmp_path):
    with artifacts.staged(f"s3://{BUCKET}/f/report") as local:
        (local / "plot.png").write_bytes(b"\x89PNG")
    assert keys(s3, "f/report") == {"plot.png"}
    with artifacts.staged(tmp_path / "report") as local:
        assert local == tmp_path / "report"


def test_the_runner_names_object_store_folders_and_reads_their_manifests(s3):
    """The runner's graph over an s3:// run dir: URIs (never collapsed `s3:/`), a finished input
    recognised by its manifest, an unfinished one refused with the command to run."""
    from pipeline.config import RunConfig
    from pipeline.errors import UserError
    from pipeline.runner import Node, Runner

    cfg = RunConfig(rounds=2)
    runner = Runner(cfg, f"s3://{BUCKET}/g/")
    assert Node("train", 0, "s1").folder(runner.run_dir) == f"s3://{BUCKET}/g/round-0/train/s1"
    assert runner.policy(1)[0] == f"s3://{BUCKET}/g/round-0/train/s1/checkpoint"
    judge = Node("judge", 0, "policy")
    with pytest.raises(UserError, match=f"s3://{BUCKET}/g/round-0/sample/policy, which is not finished"):
        runner.inputs(judge)
    sample = Node("sample", 0, "policy")
    with atomic_dir(sample.folder(runner.run_dir), {"key": runner.expected_key(sample)}):
        pass
    assert runner.inputs(judge)["sample"] == f"s3://{BUCKET}/g/round-0/sample/policy"
    runner.save_config()
    assert "config.yaml" in keys(s3, "g")
