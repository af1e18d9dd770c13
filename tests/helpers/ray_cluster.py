"""A real multi-node Ray cluster on this machine, driven with Ray's own CLI.

Each node is a `ray start --block` process in its own process group: it keeps the node's
daemons (GCS, raylet, dashboard and its job agent) as its children and shuts them down when it
gets SIGTERM, so the cluster is torn down by those process ids — never by a machine-wide
`ray stop`, which would kill every other Ray on the machine. The head has its own temp dir.
Nodes carry custom resources (`node_a`, `node_b`, and `trainer` on both) so a test can ask for a
placement and check where things ran. Ray 2.60's `ray start` turns token authentication on; the
cluster and every CLI call share a fresh token through `RAY_AUTH_TOKEN`, as a real cluster's
nodes and its users do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.helpers.s3_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    def __init__(self, env: dict[str, str], temp_dir: Path):
        self.env = env
        self.temp_dir = temp_dir
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, cpus: int, resources: dict[str, float], head: bool = False) -> None:
        # Every port a node opens is a free one, not Ray's fixed default: a second Ray on the machine
        # (another test's, a user's) must not take the job agent's port (the head then never
        # serves `ray job submit`: "No available agent").
        ports = {flag: free_port() for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
        args = [RAY, "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
                *(f"--{flag}={port}" for flag, port in ports.items())]  # fmt: skip
        if head:
            args += ["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                     "--include-dashboard=true", f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}"]  # fmt: skip
        else:
            args += [f"--address={self.gcs_address()}"]
        log = open(self.temp_dir / f"node-{len(self.nodes)}.log", "w")
        self.nodes.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def gcs_address(self) -> str:
        deadline = time.time() + 120
        while True:  # the head writes the address it bound once GCS is up
            found = list(self.temp_dir.glob("ray_current_cluster")) + list(self.temp_dir.glob("*/ray_current_cluster"))
            if found and found[0].read_text().strip():
                return found[0].read_text().strip()
            assert time.time() < deadline and self.nodes[0].poll() is None, (self.temp_dir / "node-0.log").read_text()[-3000:]
            time.sleep(0.5)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A Ray CLI command against this cluster (`ray job ...`, `ray list ...`)."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def wait_ready(self, nodes: int) -> None:
        """Until `nodes` nodes are alive and the job agent takes submissions."""
        deadline = time.time() + 180
        while True:
            listed = self.ray("list", "nodes", "--address", self.address, "--format", "json", "--filter", "state=ALIVE")
            alive = json.loads(listed.stdout) if listed.returncode == 0 and listed.stdout.strip().startswith("[") else []
            if len(alive) >= nodes:
                probe = self.ray("job", "list", "--address", self.address)
                if probe.returncode == 0:
                    return
            assert time.time() < deadline, f"cluster not ready: {listed.stderr[-2000:]}"
            time.sleep(1)

    def submit(self, *entrypoint: str, extra: tuple[str, ...] = (), wait: bool = False) -> str:
        """`ray job submit [--no-wait]`; the job id. Retries while the node's job agent starts."""
        for _ in range(60):
            result = self.ray("job", "submit", "--address", self.address, *(() if wait else ("--no-wait",)), *extra,
                              "--", *entrypoint, timeout=1800)  # fmt: skip
            if "No available agent" not in result.stderr:
                break
            time.sleep(2)
        assert "submitted successfully" in result.stdout + result.stderr, result.stdout[-2000:] + result.stderr[-3000:]
        return next(w.strip("'") for line in (result.stdout + result.stderr).splitlines() if "Job '" in line
                    for w in line.split() if w.startswith("'raysubmit_"))  # fmt: skip

    def status(self, job_id: str) -> str:
        """SUCCEEDED, FAILED, STOPPED, RUNNING or PENDING, as `ray job status` prints it."""
        out = self.ray("job", "status", "--address", self.address, job_id)
        text = out.stdout + out.stderr
        for status, said in (("SUCCEEDED", "succeeded"), ("FAILED", "failed"), ("STOPPED", "was stopped"),
                             ("RUNNING", "RUNNING"), ("PENDING", "PENDING")):  # fmt: skip
            if said in text:
                return status
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 1500) -> str:
        deadline = time.time() + timeout
        while (status := self.status(job_id)) in ("RUNNING", "PENDING", "UNKNOWN"):
            assert time.time() < deadline, f"job {job_id} still {status}"
            time.sleep(3)
        return status

    def logs(self, job_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, job_id).stdout

    def shutdown(self) -> None:
        """SIGTERM to every node's process group; what has not exited after 10 s (a node drains for
        up to 30 s, with nothing left to drain here) gets SIGKILL."""
        for proc in reversed(self.nodes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in reversed(self.nodes):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the daemons it started are in its group
            except ProcessLookupError:
                pass
            proc.wait()


@contextmanager
def local_cluster(nodes: list[tuple[int, dict[str, float]]], env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """Start a head and workers (`(cpus, resources)` each); yield when all are up; tear down by pid."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    from pipeline.quiet import RAY_WORKER_ENV  # what cluster.yaml's start commands set

    full = {**os.environ, **(env or {}), **RAY_WORKER_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    for inherited in ("RAY_ADDRESS", "RAY_DEDUP_LOGS"):  # another cluster's; a test's choice (dedup off skips no line)
        full.pop(inherited, None)
    cluster = LocalCluster(full, temp_dir)
    try:
        for i, (cpus, resources) in enumerate(nodes):
            cluster.start_node(cpus, resources, head=i == 0)
            if i == 0:
                cluster.gcs_address()
        cluster.wait_ready(len(nodes))
        yield cluster
    finally:
        cluster.shutdown()
