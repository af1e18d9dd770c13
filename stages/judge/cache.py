"""The judge cache: nothing is judged twice.

A paid judge is the one stage whose rerun costs money, and it is the one most likely to be
killed half-way (50,000 requests, a rate limit, a laptop lid). Every scored row is stored, the
moment its reply arrives, under a key that hashes everything that decides the reply: the judge
model, the rubric text, the sampling settings and the exact messages sent. A rerun, a `--force`,
a second run over the same candidates or the rerun of a killed stage sends requests only for
rows not stored yet. Unscored rows (a 500 after every retry, an unparseable reply) are not
stored: they were not judged, and the next run tries them again.

The store is SQLite in WAL mode (one file, transactions, no home-made format). On a cluster one
Ray actor owns it, pinned to the driver's node (`stages/judge/openai.py`), so every worker on
every node shares one cache and SQLite never sees concurrent writers over a network filesystem.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

FILENAME = "judgements.sqlite"

# What a stored judgement holds: enough to rebuild the row's judge columns and count its cost.
FIELDS = ("score", "reasoning", "tries", "prompt_tokens", "completion_tokens")


def cache_key(*, model: str, rubric: str, temperature: float, max_tokens: int, response_format: str,
              messages: list[dict[str, str]]) -> str:
    """sha256 over what decides the judge's reply; the endpoint's URL and key are not in it (the
    same model behind another proxy answers the same)."""
    payload = {"model": model, "rubric": rubric, "temperature": temperature, "max_tokens": max_tokens,
               "response_format": response_format, "messages": messages}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Judgements by cache key in `folder/judgements.sqlite`. Plain class; Ray makes it an actor."""

    def __init__(self, folder: str):
        path = Path(folder).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / FILENAME
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)  # autocommit; explicit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed row survives a killed process
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, score INTEGER NOT NULL, reasoning TEXT, "
            "tries INTEGER, prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
        )

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 500]
            rows = self._db.execute(
                f"SELECT key, {', '.join(FIELDS)} FROM judgements WHERE key IN ({','.join('?' * len(chunk))})", chunk
            )
            found |= {row[0]: dict(zip(FIELDS, row[1:])) for row in rows}
        return found

    def put_many(self, records: dict[str, dict[str, Any]]) -> None:
        """Store scored judgements (key → FIELDS) in one transaction."""
        now = time.time()
        self._db.execute("BEGIN")
        self._db.executemany(
            f"INSERT OR REPLACE INTO judgements (key, {', '.join(FIELDS)}, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(k, *(r[f] for f in FIELDS), now) for k, r in records.items()],
        )
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


class GroupCommit:
    """Scores arriving together share one write (group commit), and each caller returns only once
    its score is stored.

    Every reply's store is one round trip to the cache actor; at a few hundred replies a second
    those round trips are a large share of a worker's event loop. Here a score waits for the write
    in progress to finish, then goes out with every score that arrived meanwhile: no timer, so a
    lone score is written at once, and under load one `put_many` carries a whole wave.
    `put(records)` is the write (the cache actor's `put_many`); if it fails, every waiting caller
    gets its exception.
    """

    def __init__(self, put: Callable[[dict[str, dict[str, Any]]], Awaitable[None]]):
        self._put = put
        self._records: dict[str, dict[str, Any]] = {}
        self._waiters: list[asyncio.Future] = []
        self._writer: asyncio.Task | None = None

    async def store(self, key: str, record: dict[str, Any]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._records[key] = record
        self._waiters.append(done)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        await done

    async def _write(self) -> None:
        while self._records:
            records, waiters = self._records, self._waiters
            self._records, self._waiters = {}, []
            try:
                await self._put(records)
            except BaseException as err:  # noqa: BLE001 - handed to every caller waiting on this write
                for w in waiters:
                    if not w.done():
                        w.set_exception(err)
            else:
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
