"""The pipeline as a Ray job on a real two-node Ray cluster, with its run dir on a real S3 server.

What a user with a GPU cluster does, on this machine: `ray job submit` (Ray's own CLI) of
`python -m pipeline run configs/tiny.yaml --run-dir s3://...` to a cluster of two Ray nodes
(`tests/helpers/ray_cluster.py`: `ray start` processes, torn down by their process ids), the
run dir on an S3-protocol server on 127.0.0.1 (`tests/helpers/s3_server.py`, moto). The nodes get
the endpoint and credentials from their environment (the session's S3 server, tests/conftest.py),
as a cloud node gets them from its provider chain; nothing passes them in the job, and the
random secret is checked to appear in no artifact and no log.

1. The job is stopped (`ray job stop`) while train runs: no stage folder is left looking
   finished; resubmitted, it skips sample, judge and pairs and finishes with the config's row
   counts. The train workers asked for a `trainer` resource that each node has once, so they
   must land on both nodes: the train manifest records each rank's node id.
2. `--working-dir .` ships the code: a job runs a stage from the shipped copy. Two Ray nodes on
   one machine share a session folder, and the second node setting up the same runtime env
   replaces the driver's working-dir copy under it (seen by hand; real clusters do not share
   it). So the shipped job is one that runs in the driver alone (the pairs stage), and the
   placement test above runs with the code installed in the environment, as a cluster image
   has it.
3. A failing job (a bad config) ends FAILED, and `ray job submit` exits non-zero with our message.
4. `--run-dir s3://...` works on the CLI outside any cluster: the report is rewritten from S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline import artifacts
from tests.helpers.ray_cluster import local_cluster
from tests.conftest import S3_BUCKET as BUCKET
from tests.helpers.s3_server import environment, get_text, objects

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
RUN = f"s3://{BUCKET}/cluster"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def no_other_ray_on_this_host():
    """A cluster node runs one Ray instance. A second one on the host (this process's own local
    Ray, if a test before started it) makes Ray's State API client, which Ray Train's
    placement-group cleaner calls inside the job, fail to tell which cluster is meant."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster_env(s3, tmp_path_factory) -> dict[str, str]:
    """What the nodes' environment holds: the S3 endpoint and credentials, and a cache of their own
    (the node-local copies of the S3 run dir) that shares the converted embedded model."""
    from pipeline.models import cache_root

    cache = tmp_path_factory.mktemp("node-cache")
    (cache_root() / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(cache_root() / "models")
    return {**s3, "PIPELINE_CACHE": str(cache)}


@pytest.fixture(scope="module")
def two_nodes(cluster_env):
    with local_cluster([(3, {"node_a": 1, "trainer": 1}), (2, {"node_b": 1, "trainer": 1})], env=cluster_env) as cluster:
        yield cluster


def _keys(s3, prefix: str = "cluster/") -> dict[str, int]:
    return {k: v for k, v in objects(s3, BUCKET, prefix).items() if not k.endswith("/")}


def _manifest(s3, folder: str) -> dict | None:
    key = f"cluster/{folder}/_manifest.json"
    return json.loads(get_text(s3, BUCKET, key)) if key in _keys(s3) else None


# The train workers ask for the `trainer` resource each node has once: one must land on each node.
# The candidates come from the hf sampler: vLLM on an object-store model is the sample stage
# test's (tests/stage/test_sample_judge_pairs.py), and this saves an engine start.
OVERRIDES = ("train.resources_per_worker={CPU: 1, trainer: 1}", "train.placement_strategy=SPREAD",
             "sampler={type: hf, n: 4, temperature: 1.0, max_tokens: 96, batch_size: 8}")


def test_a_job_stopped_mid_train_resumes_on_resubmit_with_workers_on_both_nodes(two_nodes, s3):
    entry = (sys.executable, "-m", "pipeline", "run", TINY, *OVERRIDES, "--run-dir", RUN)
    job = two_nodes.submit(*entry)
    deadline = time.time() + 900
    while "cluster/round-0/train/s1/_partial.json" not in _keys(s3):
        assert two_nodes.status(job) in ("PENDING", "RUNNING"), two_nodes.logs(job)[-4000:]
        assert time.time() < deadline, "train never started"
        time.sleep(1)
    time.sleep(5)  # well inside the stage
    stop = two_nodes.ray("job", "stop", "--address", two_nodes.address, job, timeout=300)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert two_nodes.wait(job) == "STOPPED"
    for folder in ("round-0/sample/policy", "round-0/judge/policy", "round-0/pairs"):
        assert _manifest(s3, folder) is not None, folder
    assert _manifest(s3, "round-0/train/s1") is None, "a stopped stage must not look finished"
    sample_manifest = _manifest(s3, "round-0/sample/policy")

    # resubmitted: `ray job submit` waits, streams the logs, and exits 0 when the job succeeded
    job2 = two_nodes.submit(*entry, wait=True)
    assert two_nodes.status(job2) == "SUCCEEDED"
    log = two_nodes.logs(job2)
    for node in ("sample/policy", "judge/policy", "pairs"):
        assert f"round 0 {node}: up to date" in log
    assert "round 0 train/s1: running" in log and "Traceback" not in log
    assert _manifest(s3, "round-0/sample/policy") == sample_manifest

    keys = _keys(s3)
    assert not [k for k in keys if "_partial.json" in k or ".tmp-" in k], "unfinished markers left behind"
    assert not [k for k in keys if "/.ray-train/" in k], "the sharded checkpoints are removed once train is done"
    for folder in ("sample/policy", "judge/policy", "pairs", "train/s1", "evaluate/policy", "evaluate/s1"):
        assert f"cluster/round-0/{folder}/_manifest.json" in keys, folder
    assert {"cluster/report/report.md", "cluster/report/index.html", "cluster/report/train_curves.png"} <= set(keys)

    with environment(s3):
        candidates = _read_folder(f"{RUN}/round-0/sample/policy")
        judged = _read_folder(f"{RUN}/round-0/judge/policy")
    assert len(candidates) == 8 * 4 == sample_manifest["stats"]["rows"]
    assert not candidates.duplicated(["prompt_id", "candidate_id"]).any()
    assert len(judged) == len(candidates) and judged.score.between(1, 5).all()

    train = _manifest(s3, "round-0/train/s1")
    metrics = [json.loads(line) for line in get_text(s3, BUCKET, "cluster/round-0/train/s1/metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, train["stats"]["steps"] + 1)) and metrics
    assert abs(metrics[0]["loss"] - 0.693147) < 1e-4  # policy == reference at step 1
    assert {"checkpoint/config.json", "checkpoint/model.safetensors", "reference_logps.parquet"} <= {
        k.split("round-0/train/s1/", 1)[1] for k in keys if "round-0/train/s1/" in k}  # fmt: skip
    placement = train["stats"]["placement"]
    assert placement["nodes"] == 2, placement  # one `trainer` per node: a worker on each
    assert sorted(w["rank"] for w in placement["workers"]) == [0, 1]
    assert len({w["node_id"] for w in placement["workers"]}) == 2
    alive = json.loads(two_nodes.ray("list", "nodes", "--address", two_nodes.address, "--format", "json").stdout)
    assert {w["node_id"] for w in placement["workers"]} == {n["node_id"] for n in alive if n["state"] == "ALIVE"}

    secret = s3["AWS_SECRET_ACCESS_KEY"]
    assert secret not in log
    for key in keys:
        if key.endswith((".json", ".jsonl", ".md", ".yaml")):
            assert secret not in get_text(s3, BUCKET, key), key


def _read_folder(uri: str) -> pd.DataFrame:
    return artifacts.read_folder(uri).to_pandas()


def test_working_dir_ships_the_code_and_a_failing_job_exits_non_zero(s3, two_nodes):
    # The pairs stage runs in the driver alone (on the head): no task on the second node sets up
    # the job's runtime env, which on one machine would replace the driver's working-dir copy.
    pairs = two_nodes.submit(
        "bash", "-c", f"{sys.executable} -m pipeline stage pairs configs/tiny.yaml {' '.join(map(repr, OVERRIDES))} "
        f"--run-dir {RUN} --force && {sys.executable} -c 'import pipeline; print(\"CODE FROM\", pipeline.__file__)'",
        extra=("--working-dir", str(REPO)), wait=True)  # fmt: skip
    assert two_nodes.status(pairs) == "SUCCEEDED"
    log = two_nodes.logs(pairs)
    code_from = next(line for line in log.splitlines() if line.startswith("CODE FROM"))
    assert "runtime_resources" in code_from and str(REPO) not in code_from, code_from  # the shipped copy ran
    assert "round 0 pairs: running" in log
    manifest = _manifest(s3, "round-0/pairs")
    assert manifest["stats"]["s1"]["pairs"] >= 2
    aside = f"cluster/round-0/.pairs.old-{manifest['key']}/_manifest.json"
    assert aside in _keys(s3), "the finished folder it replaced is set aside, not lost"

    bad = two_nodes.ray("job", "submit", "--address", two_nodes.address, "--", sys.executable, "-m", "pipeline", "run",
                        TINY, "train.lr=-1", "--run-dir", RUN, timeout=600)  # fmt: skip
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "error: " in out and "train.lr" in out and "Traceback" not in out.split("error: ", 1)[1]


def test_the_cli_reads_and_writes_an_s3_run_dir_outside_a_cluster(s3, tmp_path):
    before = get_text(s3, BUCKET, "cluster/report/report.md")
    env = {**os.environ, **s3, "PIPELINE_CACHE": str(tmp_path / "cache"), "HOME": os.environ.get("HOME", "")}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "pipeline", "report", TINY, "--run-dir", RUN],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {RUN}/report/report.md" in result.stdout and "base model" in result.stdout
    after = get_text(s3, BUCKET, "cluster/report/report.md")
    rows = [[line for line in text.splitlines() if "| round-0/s1 |" in line] for text in (before, after)]
    assert rows[0] and rows[0] == rows[1]  # the same run, read back from S3
    assert not (tmp_path / "runs").exists(), "nothing written to a local run dir"
