"""Wall time and peak memory of a whole pipeline command, Ray workers and vLLM engines included.

    python bench/measure_run.py -- python -m pipeline run configs/default.yaml --run-dir runs/bench

Peak memory is the largest sum of PSS (proportional set size: shared pages split between the
processes that map them) over the command's whole process tree, sampled every 2 s. RSS would
count the Ray object store and shared libraries once per process and overstate the peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else argv
    start = time.time()
    child = subprocess.Popen(cmd)
    root = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_pss(root))
        time.sleep(2.0)
    result = {"command": " ".join(cmd), "returncode": child.returncode,
              "wall_s": round(time.time() - start, 1), "peak_pss_gib": round(peak / 2**30, 2)}  # fmt: skip
    print(json.dumps(result), file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
