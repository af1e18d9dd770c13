"""The OpenAI client's pure parts (pipeline/openai_client.py): backoff, Retry-After, secret redaction, pacing; and the judge cache."""

from __future__ import annotations

import asyncio
import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from pipeline.openai_client import RateLimiter, backoff_delay, redact, retry_after_seconds
from stages.judge.cache import JudgeCache, cache_key


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half():
    rng = random.Random(0)
    for failed, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (9, 5.0)]:
        delays = [backoff_delay(failed, None, base=0.5, cap=5.0, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failed, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not a constant


def test_retry_after_from_the_server_wins_over_backoff():
    assert backoff_delay(1, 7.5, base=0.5, cap=5.0, rng=random.Random(0)) == 7.5
    assert backoff_delay(6, 0.0, base=0.5, cap=5.0, rng=random.Random(0)) == 0.0


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
    later = format_datetime(datetime(2026, 11, 25, 12, 0, 10, tzinfo=timezone.utc), usegmt=True)
    assert retry_after_seconds({"retry-after": later}, now=now.timestamp()) == pytest.approx(10.0)
    assert retry_after_seconds({"retry-after": "-4"}) == 0.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds(None) is None


def test_redact_removes_the_key_wherever_it_is_echoed():
    key = "sk-live-0123456789abcdef"
    text = f'upstream said: {{"authorization": "Bearer {key}", "x": "{key}"}}'
    assert key not in redact(text, key) and redact(text, key).count("***") == 2
    assert redact(text, None) == text and redact("EMPTY", "EMPTY") == "EMPTY"


def test_rate_limiter_spaces_request_starts_evenly():
    now, starts, slept = [100.0], [], []

    async def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    async def main():
        limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one start per 0.5 s
        for _ in range(5):
            await limiter.wait()
            starts.append(now[0])
        now[0] += 10  # idle: the next start is not delayed by the past
        await limiter.wait()
        starts.append(now[0])

    asyncio.run(main())
    assert starts == [100.0, 100.5, 101.0, 101.5, 102.0, 112.0]


def _key(**change):
    base = dict(model="gpt-4o", rubric="R {question} {response}", temperature=0.0, max_tokens=512,
                response_format="json_schema", messages=[{"role": "user", "content": "Q1 / A1"}])
    return cache_key(**(base | change))


def test_cache_key_changes_with_everything_that_decides_the_reply_and_nothing_else():
    base = _key()
    assert _key() == base
    variants = [_key(model="gpt-4o-mini"), _key(rubric="other {question} {response}"), _key(temperature=0.7),
                _key(max_tokens=256), _key(response_format="text"), _key(messages=[{"role": "user", "content": "Q1 / A2"}])]
    assert len({base, *variants}) == 7


def test_cache_stores_scores_across_reopening(tmp_path):
    cache = JudgeCache(str(tmp_path / "c"))
    record = {"score": 4, "reasoning": "right answer, thin process", "tries": 2, "prompt_tokens": 120, "completion_tokens": 30}
    cache.put_many({"k1": record, "k2": record | {"score": 1}})
    del cache
    again = JudgeCache(str(tmp_path / "c"))
    assert again.get_many(["k1", "k2", "k3"]) == {"k1": record, "k2": record | {"score": 1}}
    assert len(again) == 2
    again.put_many({f"k{i}": record for i in range(1200)})  # beyond SQLite's bound-parameter limit per query
    assert len(again.get_many([f"k{i}" for i in range(1200)])) == 1200


def test_group_commit_writes_waves_together_and_returns_only_once_stored():
    from stages.judge.cache import GroupCommit

    written: list[dict] = []
    returned: list[str] = []

    async def put(records):
        await asyncio.sleep(0.01)  # a round trip to the cache actor
        written.append(dict(records))

    async def one(writes, key):
        await writes.store(key, {"score": int(key[1:])})
        assert any(key in w for w in written), "returned before its record was written"
        returned.append(key)

    async def main():
        writes = GroupCommit(put)
        await one(writes, "k0")  # alone: written at once, by itself
        await asyncio.gather(*(one(writes, f"k{i}") for i in range(1, 41)))

    asyncio.run(main())
    assert written[0] == {"k0": {"score": 0}}
    assert sorted(returned) == sorted(f"k{i}" for i in range(41))
    assert {k for w in written for k in w} == set(returned) and sum(map(len, written)) == 41
    assert len(written) <= 3  # the wave of 40 went out in one or two writes, not 40


def test_group_commit_hands_a_failed_write_to_every_waiting_caller():
    from stages.judge.cache import GroupCommit

    async def put(records):
        raise ConnectionError("cache actor died")

    async def main():
        writes = GroupCommit(put)
        return await asyncio.gather(*(writes.store(f"k{i}", {}) for i in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, ConnectionError) for r in results)
