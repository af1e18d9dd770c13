"""Requests to an OpenAI-compatible chat endpoint, done the way a paid API needs: bounded
concurrency, a client-side rate limit, retries with backoff and jitter, `Retry-After` honoured,
and secrets kept out of every message. One module for every stage that calls such an endpoint:
the OpenAI judge (`stages/judge/openai.py`) and the OpenAI sampler (`stages/sample/openai_api.py`).

`OpenAIClient.send(kwargs, read)` never raises for a request's own trouble (429, 5xx, timeouts,
dropped connections, a 200 whose body is not a chat completion, a 200 that `read` rejects, a 400
for this prompt): it retries what can succeed later and returns a `Reply` without a value and
with the reason when the tries run out. It raises `EndpointError` only for what no retry can fix
and every request would hit (401/403: the key; 404: the model; the variable holding the key
missing), so a run stops with one message instead of burning the retry budget on every row.

Backoff before try k+1 (k ≥ 1 failed tries): the server's `Retry-After` (or `retry-after-ms`)
when it sent one, else d/2 + uniform(0, d/2) with d = min(backoff_max, backoff_base · 2^(k-1)).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Protocol, TypeVar

# The HTTP client logs every request at INFO: thousands of lines that say nothing a user needs.
for _name in ("httpx", "httpx2", "openai"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Statuses no retry fixes and every request would meet: stop the run with one message.
FATAL = {401: "the API key was refused", 403: "the API key may not use this model or endpoint",
         404: "the server does not serve this model (or base_url lacks /v1)"}  # fmt: skip
# Statuses worth another try: request timeout, conflict, rate limit, server errors.
RETRYABLE = {408, 409, 429} | set(range(500, 600))

T = TypeVar("T")


class Endpoint(Protocol):
    """What the client reads of a config block (`OpenAIJudge`, `OpenAISampler`)."""

    model: str
    base_url: str | None
    api_key_env: str | None
    timeout: float
    max_retries: int
    backoff_base: float
    backoff_max: float


class EndpointError(Exception):
    """The endpoint refuses every request (bad key, unknown model, no key): nothing can be done."""


class Rejected(Exception):
    """Raised by a `read` function: the 200 reply is of no use (e.g. no score in it). Retried like
    a 5xx; when the tries run out, `why` is the reason as it is (no "after N tries")."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class Reply(Generic[T]):
    value: T | None  # what `read` made of the completion; None when there is none
    reason: str  # "ok", or why there is no value, e.g. `http 500 after 6 tries`, `http 400: ...`
    tries: int  # requests sent


def read_api_key(env: str | None, where: str) -> str:
    """The key from the environment, read when requests are about to be made (never from config).
    An endpoint without `api_key_env` (a local server without auth) gets a placeholder.
    `where` is the config block (`judge`, `sampler`) the error message names."""
    if env is None:
        return "EMPTY"
    key = os.environ.get(env)
    if not key:
        raise EndpointError(
            f"{where}.api_key_env: the environment variable {env} is not set (or empty) in this process; "
            f"export {env}=... before running (on a cluster, on every node or through the job's runtime_env); "
            "the key itself never goes in the config"
        )
    return key


def no_reply(endpoint: Endpoint, where: str, reason: str) -> str | None:
    """The message for a first request that got no reply at all (a server down, a wrong port or
    host, a server too slow for `timeout`), else None: every other request would meet it too."""
    if not reason.startswith(("connection error", "timeout")):
        return None
    return (f"{where}.base_url {endpoint.base_url or '(the OpenAI default)'}: no reply ({reason}); "
            f"start the server or fix {where}.base_url (and {where}.timeout for a slow one)")


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


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str | None  # "stop", "length", ... as the server says


@dataclass(frozen=True)
class Choices:
    """A completion's choices and its usage (None where the server sent none). `completion_tokens`
    counts the tokens of all the choices together."""

    choices: list[Choice]
    prompt_tokens: int | None
    completion_tokens: int | None


class OpenAIClient:
    """`AsyncOpenAI` with this module's retry policy; `in_flight` requests at once at most.
    `where` names the config block in error messages (`judge`, `sampler`, `other_sampler`).

    Built inside the event loop that uses it (a Ray actor's, or `asyncio.run`'s)."""

    def __init__(self, endpoint: Endpoint, *, where: str, in_flight: int, requests_per_minute: float | None = None,
                 seed: int = 0):
        from openai import AsyncOpenAI, DefaultAioHttpClient

        self.endpoint, self.where = endpoint, where
        self.key = read_api_key(endpoint.api_key_env, where)
        # aiohttp under the client: the default transport checks every pooled connection on every
        # request, which at a few hundred requests a second is most of the event loop (bench/RESULTS.md)
        self._client = AsyncOpenAI(base_url=endpoint.base_url, api_key=self.key, max_retries=0, timeout=endpoint.timeout,
                                   http_client=DefaultAioHttpClient(timeout=endpoint.timeout))
        self._slots = asyncio.Semaphore(in_flight)
        self._limiter = RateLimiter(requests_per_minute) if requests_per_minute else None
        self._rng = random.Random(seed)
        self._stopped: BaseException | None = None  # set when a reply could not be stored

    async def close(self) -> None:
        await self._client.close()

    async def send(self, kwargs: dict[str, Any], read: Callable[[Any], T],
                   store: Callable[[Reply[T]], Awaitable[None]] | None = None) -> Reply[T]:
        """`chat.completions.create(model=..., **kwargs)` until `read(completion)` returns a value
        (it raises `Rejected` for a reply of no use) or the tries run out.

        With `store`, the reply is returned once `store(reply)` has kept it. When storing fails
        (the judge's cache went with a killed driver) this client sends nothing more, so the
        replies not kept are at most those in flight plus those waiting for their write."""
        endpoint = self.endpoint
        tries = endpoint.max_retries + 1
        last, verbatim = "no reply", False
        for attempt in range(1, tries + 1):
            async with self._slots:  # a slot is held while the request is open, not while backing off
                if self._stopped is not None:
                    raise self._stopped
                if self._limiter is not None:
                    await self._limiter.wait()
                reply, last, verbatim, retry_after = await self._try(kwargs, read, attempt)
            # stored after the slot is freed (holding it through the write cost 10% of throughput)
            if reply is not None and reply.value is not None and store is not None:
                try:
                    await store(reply)
                except BaseException as err:
                    self._stopped = err
                    raise
            if reply is not None:
                return reply
            if attempt < tries:
                await asyncio.sleep(backoff_delay(attempt, retry_after, endpoint.backoff_base, endpoint.backoff_max, self._rng))
        return Reply(None, last if verbatim else f"{last} after {tries} tries", tries)

    async def choices(self, messages: list[dict[str, str]], *, n: int, **params: Any) -> Reply[Choices]:
        """One request for `n` choices of `messages` (`params`: temperature, top_p, max_tokens, seed).
        A server may return fewer than `n`; the caller asks again for the rest."""
        return await self.send({"messages": messages, "n": n, **params}, self._read_choices)

    def _read_choices(self, completion: Any) -> Choices:
        usage = getattr(completion, "usage", None)
        return Choices(
            # a text that echoes the key (a hostile proxy) is not stored with it
            [Choice(redact(c.message.content or "", self.key), c.finish_reason) for c in completion.choices],
            _int_or_none(getattr(usage, "prompt_tokens", None)),
            _int_or_none(getattr(usage, "completion_tokens", None)),
        )

    async def _try(self, kwargs: dict[str, Any], read: Callable[[Any], T], attempt: int
                   ) -> tuple[Reply[T] | None, str, bool, float | None]:
        """One request: (the reply if final, else None; what went wrong; whether that reason is
        final as it is; Retry-After)."""
        import openai

        endpoint = self.endpoint
        try:
            completion = await self._client.chat.completions.create(model=endpoint.model, **kwargs)
        except openai.APIStatusError as err:
            status = err.status_code
            detail = redact(_error_message(err), self.key)
            if status in FATAL:
                where = self.where
                raise EndpointError(
                    f"{where} at {endpoint.base_url or 'the default OpenAI endpoint'} answered http {status} for model "
                    f"{endpoint.model!r}: {FATAL[status]} ({detail}); check {where}.model, {where}.base_url and the key in "
                    f"{endpoint.api_key_env}"
                ) from None
            if status in RETRYABLE:
                return None, f"http {status}", False, retry_after_seconds(err.response.headers)
            return Reply(None, f"http {status}: {detail}", attempt), "", False, None  # this prompt, not the server
        except openai.APIConnectionError as err:  # timeouts included
            dropped = _connection_failure(err)
            if dropped is None and isinstance(err, openai.APITimeoutError):
                return None, f"timeout ({endpoint.timeout:g} s)", False, None
            return None, f"connection error ({dropped or type(err.__cause__ or err).__name__})", False, None
        except (openai.APIResponseValidationError, ValueError) as err:
            return None, f"malformed reply ({type(err).__name__})", False, None
        # some proxies answer 200 with an HTML page, which the client hands back as a string
        if not getattr(completion, "choices", None):
            return None, "malformed reply (no choices)", False, None
        try:
            value = read(completion)
        except Rejected as err:
            return None, redact(err.why, self.key), True, None
        return Reply(value, "ok", attempt), "", False, None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


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
