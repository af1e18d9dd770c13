"""Quiet success: a run that succeeds prints no traceback and no warning a user cannot act on.

Each setting below removes lines a successful run used to print, at their cause where we can
reach it (an option, an environment variable of the process that printed them); the filters
(a Ray Train warning, a torch deprecation inside vLLM, two worker lines no setting reaches) name
the upstream behaviour they stand in for. A failing stage still prints its traceback:
nothing here touches errors.

- `before_ray_import()`: the environment of a process that will start a local cluster.
- `ray_init_kwargs()`, `worker_setup()`: Ray's `worker_process_setup_hook` for its workers.
- `engine_env(level)`: the environment of vLLM's engine actors (`stages/sample/vllm.py`).
"""

from __future__ import annotations

import logging
import os
import re

# Ray Train v2 (2.60) starts a detached PlacementGroupCleaner with every TorchTrainer; it asks the
# State API every second whether the train controller is alive. The State API is served by the
# dashboard, which a local cluster here runs without (`include_dashboard=False`: ray[default] is
# not a dependency), so every poll fails and logs this warning, once a second, for the whole
# stage. The cleaner only acts when the controller dies without removing its placement group
# (ours removes it as it finishes), and without a State API it cannot act at all, so the warning
# tells a user nothing to do. ray-project/ray#65447 reworks this loop upstream.
_TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_TRAIN_CLEANER_POLL_FAILED = "Failed to query Ray Train Controller actor state"


# Worker output no setting reaches, skipped where the driver prints it (Ray's log deduplication,
# on unless RAY_DEDUP_LOGS=0):
_SKIPPED_WORKER_LINES = (
    # vLLM's engine processes, spawned from the engine actor, log this while importing vLLM,
    # before vLLM applies VLLM_LOGGING_LEVEL: the installed Triton (a GPU build that xgrammar
    # pulls in) has no CPU backend, so vLLM does not use it. Without Triton installed, torch
    # warns "Triton not available" in the same processes instead.
    "Triton is installed, but doesn't include CPU backend",
    # Ray Train's controller creates its PreemptionWatcher with restarts and an argument in the
    # object store; Ray's core worker logs it once per process: ray-project/ray#53727. (The
    # driver's own copy, for Ray Data's actor pools, is printed by Ray's C++ logger directly.)
    "has constructor arguments in the object store and max_restarts > 0",
    # When ray.data.llm shuts an engine down (`shutdown()`, no timeout), vLLM gives EngineCore
    # 5 s and EngineCore gives its CPU worker process 5 s, then 4 s more after a SIGTERM; the
    # worker often takes longer to exit and is killed holding a shared-memory segment. Python's
    # resource tracker, alive now that Ray leaves it be (see `engine_env`), unlinks the segment
    # and says so, in two lines (the warning and its source line).
    "resource_tracker: There appear to be",
    # When an actor pool is torn down (Ray Data's, after the vLLM engines stopped), the GCS sends
    # each actor a kill RPC; an actor whose process has just exited on its own cannot take it, and
    # the GCS logs an error for what is the end it was asked for (seen once in `make run`, between
    # the sample and judge stages; the stage had finished and written its rows).
    "KillActor RPC failed for actor",
)


_VLLM_ASYNC_LLM_LOGGER = "vllm.v1.engine.async_llm"


def before_ray_import() -> None:
    """For a process that will start a local cluster (no `ray.address`, no RAY_ADDRESS): call
    it before Ray is imported, which is when Ray reads these variables. Values already set are
    the user's."""
    # Ray 2.60 turns token authentication on for a new local cluster and warns that it did,
    # unless the mode is chosen explicitly: choose the same secure default. (Set after Ray is
    # loaded, it would disagree with Ray's cached config.)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(map(re.escape, _SKIPPED_WORKER_LINES)))
    for key, value in RAY_WORKER_ENV.items():
        os.environ.setdefault(key, value)


# Read by Ray's worker processes, so set where a cluster starts (here for a local one; cluster.yaml
# for a cluster). Ray Data 2.60 lists a read's files with a thread pool whose completion thread can
# find the queue already shut when the listing task ends: "Exception in thread
# pool-1/completion-signaler ... InterruptedError" with its traceback, after a read that
# succeeded (seen on an s3:// run dir). A stage folder holds a handful of files: one listing thread.
RAY_WORKER_ENV = {"RAY_DATA_LIST_FILES_THREADED_NUM_WORKERS": "1"}


def before_joining_cluster() -> None:
    """For a driver that joins a running cluster (`ray job submit`, RAY_ADDRESS): the same filter
    of the workers' lines it prints; the cluster's own settings (its auth mode) are the cluster's."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "|".join(map(re.escape, _SKIPPED_WORKER_LINES)))


def ray_init_kwargs() -> dict:
    """Extra `ray.init()` arguments for a local cluster: the worker setup hook below."""
    return {"runtime_env": {"worker_process_setup_hook": "pipeline.quiet.worker_setup"}}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _DropEngineDeadTraceback(logging.Filter):
    """vLLM's AsyncLLM output handler logs `EngineDeadError` with a traceback when the engine core
    process exits under it — which is also what happens when ray.data.llm shuts a finished engine
    down, a race seen after a successful evaluate stage. An engine that really dies mid-run fails
    every request it holds, and the stage fails with that error: the log record adds nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return type(exc).__name__ != "EngineDeadError"


def worker_setup() -> None:
    """Runs in every Ray worker process of a local cluster, before its first task."""
    import ray

    # The State API client finds "the" cluster by scanning the host; with several Ray instances
    # on one machine (tests beside a run, two runs) it raises ConnectionError in the cleaner's
    # thread, which dies with a traceback. Name our own cluster, as Ray's message asks.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    logging.getLogger(_TRAIN_CLEANER_LOGGER).addFilter(_DropMessage(_TRAIN_CLEANER_POLL_FAILED))
    # vLLM 0.32 applies VLLM_LOGGING_LEVEL only when an engine starts; what it logs while being
    # imported (e.g. "Triton is installed, but doesn't include CPU backend") reaches the root
    # logger whatever the level. Apply the level from the start of the process.
    if level := os.environ.get("VLLM_LOGGING_LEVEL"):
        logging.getLogger("vllm").setLevel(level.upper())
    logging.getLogger(_VLLM_ASYNC_LLM_LOGGER).addFilter(_DropEngineDeadTraceback())


def engine_env(log_level: str) -> dict[str, str]:
    """Environment variables of vLLM's engine actors (and the processes vLLM starts from them)."""
    env = {
        "VLLM_LOGGING_LEVEL": log_level.upper(),
        # The C++ side of torch and vLLM's kernels (e.g. "NUMA binding: Using MEMBIND policy",
        # printed at every engine start on CPU) follows the same level.
        "TORCH_CPP_LOG_LEVEL": {"debug": "INFO"}.get(log_level, log_level.upper()),
        # Ray's core worker SIGKILLs an actor's child processes as the actor exits, *before* it
        # calls `__ray_shutdown__`, where Ray Data drops the UDF and ray.data.llm's
        # `vLLMEngineStageUDF.__del__` shuts vLLM down. So vLLM's EngineCore and Python's
        # resource tracker die first, the engine's worker process (a grandchild) is orphaned,
        # and its clean-up then meets a dead tracker: "resource_tracker: process died
        # unexpectedly" and KeyError tracebacks. Without that early kill vLLM shuts its own
        # processes down (SIGTERM, then SIGKILL of the tree after 5 s); whatever is left when
        # the actor process is gone, killed or crashed, the raylet still kills with the actor's
        # process group (per-worker process groups, on by default in Ray 2.60).
        "RAY_kill_child_processes_on_worker_exit": "0",
    }
    if logging.getLevelName(log_level.upper()) >= logging.ERROR:
        # torch's deprecation of `torch.distributed.reduce_op`, hit by vLLM's Triton dispatcher
        # at import: for vLLM's developers, not for a user of the engine.
        env["PYTHONWARNINGS"] = "ignore::FutureWarning:vllm.triton_utils.dispatcher"
    return env
