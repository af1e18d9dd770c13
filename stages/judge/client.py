"""One judge request per row, done the way a paid API needs: bounded concurrency, a client-side
rate limit, retries with backoff and jitter, `Retry-After` honoured, secrets kept out of every
message, and an answer for every row — a score, or the reason there is none.

`JudgeClient.judge(messages)` never raises for a row's own trouble (429, 5xx, timeouts, dropped
connections, a 200 whose body or content cannot be parsed, a 400 for this prompt): it retries
what can succeed later and returns an `Outcome` with `score=None` and the reason when the tries
run out. It raises `EndpointError` only for what no retry can fix and every row would hit
(401/403: the key; 404: the model; the variable holding the key missing), so a run stops with
one message instead of burning the retry budget on every row.

Backoff before try k+1 (k ≥ 1 failed tries): the server's `Retry-After` (or `retry-after-ms`)
when it sent one, else d/2 + uniform(0, d/2) with d = min(backoff_max, backoff_base · 2^(k-1)).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pipeline.config import OpenAIJudge
from stages.judge.parse import Unparseable, describe_unparseable, parse_judgement
from stages.judge.rubric import JSON_SCHEMA

# Statuses no retry fixes and every row would meet: stop the run with one message.
FATAL = {401: "the API key was refused", 403: "the API key may not use this model or endpoint",
         404: "the server does not serve this model (or base_url lacks /v1)"}  # fmt: skip
# Statuses worth another try: request timeout, conflict, rate limit, server errors.
RETRYABLE = {408, 409, 429} | set(range(500, 600))


Store = Callable[["Outcome"], Awaitable[None]]


class EndpointError(Exception):
    """The endpoint refuses every request (bad key, unknown model, no key): no row can be judged."""


@dataclass(frozen=True)
class Outcome:
    score: int | None
    reason: str  # "judged" when scored, else why not, e.g. `http 500 after 6 tries`
    reasoning: str  # the judge's own explanation ("" when unscored)
    tries: int  # requests sent for the row this time (0 for a cache hit)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_api_key(env: str | None) -> str:
    """The key from the environment, read when requests are about to be made (never from config).
    A judge without `api_key_env` (a local server without auth) sends a placeholder."""
    if env is None:
        return "EMPTY"
    key = os.environ.get(env)
    if not key:
        raise EndpointError(
            f"judge.api_key_env: the environment variable {env} is not set (or empty) in this process; "
            f"export {env}=... before running (on a cluster, on every node or through the job's runtime_env); "
            "the key itself never goes in the config"
        )
    return key


def redact(text: str, secret: str | None) -> str:
    """`text` with the secret replaced: an error body may echo the request's headers."""
    if secret and secret != "EMPTY":
        text = text.replace(secret, "***")
    return text


def retry_after_seconds(headers: Any, now: float | None = None) -> float | None:
    """The server's requested wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(failed_tries: int, retry_after: float | None, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after `failed_tries` failures (module docstring)."""
    if retry_after is not None:
        return retry_after
    d = min(cap, base * 2 ** (failed_tries - 1))
    return d / 2 + rng.uniform(0, d / 2)


class RateLimiter:
    """At most `per_minute` request starts per minute, evenly spaced (a paced token bucket).
    `clock` and `sleep` are injectable so the schedule can be checked without waiting."""

    def __init__(self, per_minute: float, clock=time.monotonic, sleep=asyncio.sleep):
        self.interval = 60.0 / per_minute
        self._next = -math.inf
        self._clock, self._sleep = clock, sleep

    async def wait(self) -> None:
        now = self._clock()
        start = max(now, self._next)
        self._next = start + self.interval  # reserved before sleeping: no lock needed on one event loop
        if start > now:
            await self._sleep(start - now)


class JudgeClient:
    """`AsyncOpenAI` with this module's retry policy; `in_flight` requests at once at most.

    Built inside the event loop that uses it (a Ray actor's, or `asyncio.run`'s)."""

    def __init__(self, judge: OpenAIJudge, *, in_flight: int, requests_per_minute: float | None = None, seed: int = 0):
        from openai import AsyncOpenAI, DefaultAioHttpClient

        self.judge = judge
        self._key = read_api_key(judge.api_key_env)
        # aiohttp under the client: the default transport checks every pooled connection on every
        # request, which at a few hundred requests a second is most of the event loop (bench/RESULTS.md)
        self._client = AsyncOpenAI(base_url=judge.base_url, api_key=self._key, max_retries=0, timeout=judge.timeout,
                                   http_client=DefaultAioHttpClient(timeout=judge.timeout))
        self._slots = asyncio.Semaphore(in_flight)
        self._limiter = RateLimiter(requests_per_minute) if requests_per_minute else None
        self._rng = random.Random(seed)
        self._stopped: BaseException | None = None  # set when a score could not be stored

    async def close(self) -> None:
        await self._client.close()

    async def judge_messages(self, messages: list[dict[str, str]], store: Store | None = None) -> Outcome:
        """The row's outcome, returned once `store(outcome)` has kept its score. When storing fails
        (the cache went with a killed driver) this client sends nothing more, so the replies not
        kept are at most those in flight plus those waiting for their write (about twice the
        requests in flight)."""
        judge = self.judge
        tries = judge.max_retries + 1
        last = "no reply"
        for attempt in range(1, tries + 1):
            retry_after = None
            async with self._slots:  # a slot is held while the request is open, not while backing off
                if self._stopped is not None:
                    raise self._stopped
                if self._limiter is not None:
                    await self._limiter.wait()
                outcome, last, retry_after = await self._try(messages, attempt)
            # stored after the slot is freed (holding it through the write cost 10% of throughput)
            if outcome is not None and outcome.score is not None and store is not None:
                try:
                    await store(outcome)
                except BaseException as err:
                    self._stopped = err
                    raise
            if outcome is not None:
                return outcome
            if attempt < tries:
                await asyncio.sleep(backoff_delay(attempt, retry_after, judge.backoff_base, judge.backoff_max, self._rng))
        return Outcome(None, f"{last} after {tries} tries" if not last.startswith("unparseable") else last, "", tries)

    async def _try(self, messages: list[dict[str, str]], attempt: int) -> tuple[Outcome | None, str, float | None]:
        """One request: (the row's outcome if final, else None; what went wrong; Retry-After)."""
        import openai

        judge = self.judge
        kwargs: dict[str, Any] = {"model": judge.model, "messages": messages, "temperature": judge.temperature,
                                  "max_tokens": judge.max_tokens}  # fmt: skip
        if judge.response_format == "json_schema":
            kwargs["response_format"] = JSON_SCHEMA
        try:
            completion = await self._client.chat.completions.create(**kwargs)
        except openai.APIStatusError as err:
            status = err.status_code
            detail = redact(_error_message(err), self._key)
            if status in FATAL:
                raise EndpointError(
                    f"judge at {judge.base_url or 'the default OpenAI endpoint'} answered http {status} for model "
                    f"{judge.model!r}: {FATAL[status]} ({detail}); check judge.model, judge.base_url and the key in "
                    f"{judge.api_key_env}"
                ) from None
            if status in RETRYABLE:
                return None, f"http {status}", retry_after_seconds(err.response.headers)
            return Outcome(None, f"http {status}: {detail}", "", attempt), "", None  # this prompt, not the server
        except openai.APIConnectionError as err:  # timeouts included
            dropped = _connection_failure(err)
            if dropped is None and isinstance(err, openai.APITimeoutError):
                return None, f"timeout ({judge.timeout:g} s)", None
            return None, f"connection error ({dropped or type(err.__cause__ or err).__name__})", None
        except (openai.APIResponseValidationError, ValueError) as err:
            return None, f"malformed reply ({type(err).__name__})", None
        content, usage = _content_and_usage(completion)
        if content is None:
            return None, "malformed reply (no choices)", None
        try:
            verdict = parse_judgement(content, judge.response_format)
        except Unparseable as err:
            return None, redact(describe_unparseable(err, content), self._key), None
        return Outcome(verdict.score, "judged", verdict.reasoning, attempt, *usage), "", None


def _connection_failure(err: BaseException) -> str | None:
    """The name of the connection failure under `err` (refused, reset, dropped), or None for a
    timeout: the aiohttp transport reports a refused connection as a connect *timeout*, and a
    user whose server is down should read "connection error", at once, not "timeout"."""
    import aiohttp

    cause = err.__cause__
    while cause is not None:
        if isinstance(cause, (aiohttp.ServerTimeoutError, aiohttp.SocketTimeoutError)):
            return None
        if isinstance(cause, (aiohttp.ClientConnectionError, ConnectionError)):
            return type(cause).__name__
        cause = cause.__cause__
    return None


def _error_message(err: Any) -> str:
    """The server's own error message (`{"error": {"message": ...}}`), short; redacted by the caller."""
    body = getattr(err, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or getattr(err, "message", "") or type(err).__name__)[:200]


def _content_and_usage(completion: Any) -> tuple[str | None, tuple[int, int]]:
    """The reply text and (prompt, completion) tokens; a body that is not a chat completion
    (some proxies answer 200 with an HTML page, which the client hands back as a string) → None."""
    choices = getattr(completion, "choices", None)
    if not choices:
        return None, (0, 0)
    usage = getattr(completion, "usage", None)
    tokens = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
    return choices[0].message.content, tokens
