"""What a successful run must not print, for the end-to-end tests that run the CLI.

Each pattern is a line the pipeline used to print (pipeline/quiet.py says where each came from):
- vLLM's engine actors, torn down by Ray before vLLM could shut them down: Python's
  `resource_tracker` "process died unexpectedly" warning and its KeyError tracebacks;
- Ray Train's placement-group cleaner, asking a State API no dashboard serves: "Failed to query
  Ray Train Controller actor state" every second, or a ConnectionError traceback on a host that
  runs several Ray instances;
- Ray's notice that it enabled token authentication; vLLM's Triton, FutureWarning and NUMA lines.
"""

from __future__ import annotations

import os

NOISE = ["Traceback", "resource_tracker", "Failed to query Ray Train Controller", "Token authentication is enabled",
         "Triton is installed", "FutureWarning", "NUMA binding", "KillActor RPC failed"]  # fmt: skip


def noisy_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(pattern in line for pattern in NOISE)]


def user_env() -> dict[str, str]:
    """The environment a user's CLI starts with: none of the variables the test session sets for
    its own Ray, and unbuffered output."""
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_DEDUP_LOGS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}
