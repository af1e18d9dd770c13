"""A real OpenAI-protocol chat-completions server that injects faults, for judge and sampler tests and benchmarks.

The OpenAI judge must survive what real servers do under load: 429s with `Retry-After`, 5xx,
stalls past the client's timeout, 200s whose body is not JSON, dropped connections, and error
bodies that echo secrets back. This server does each of those on demand, reproducibly: whether a
row's first try fails, and how, is a hash of (seed, row key), so a rerun sees the same faults.

In a test it runs in a background thread (`with FakeOpenAI(...) as server: server.base_url`);
for a benchmark, in its own process so the client's CPU does not slow it down:

    python -m tests.fakes.openai_server --port 0 --latency 0.2 --fault-rate 0.3

prints `listening on http://127.0.0.1:PORT/v1` once it accepts connections. `GET /stats` and
`POST /reset` give a separate process the request log's counts.

Markers in the messages' text steer one row: `<score=N>` fixes the score, `<fail=KIND>` makes
every try fail with KIND, `<reply=unparseable>` answers every try with text that holds no score.

A request that sends `n` (the OpenAI sampler's) is answered like a sampling model: `n` choices
(at most `max_choices`, as providers that cap `n` do), choice i's text `sample_text(messages,
seed, i)`, cut to `max_tokens` words with finish_reason "length", and usage counting words as
tokens. Faults and markers apply to it as to a judge's request.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from aiohttp import web

FAULT_KINDS: tuple[str, ...] = ("429", "500", "stall", "garbage", "drop")
UNPARSEABLE_REPLY = "I cannot decide between the two."
GARBAGE_BODY = "<html>upstream error</html>"

_SCORE = re.compile(r"<score=(\d)>")
_FAIL = re.compile(r"<fail=(429|500|stall|garbage|drop)>")
_UNPARSEABLE = "<reply=unparseable>"


@dataclass(frozen=True)
class RequestRecord:
    """One chat-completions request as the server saw it.

    `attempt` counts the requests seen for `key` so far, this one included (1 = first try).
    `outcome` is "ok", "unparseable", a fault kind, "401", "404" or "400"; `score` is set for
    "ok" and "unparseable". Times are `time.monotonic()` in this process.
    """

    key: str
    attempt: int
    outcome: str
    score: int | None
    t_start: float
    t_end: float
    choices: int = 0  # choices in the reply (1 for a judge's "ok"; a sampler's up to its `n`)


def row_key(messages: list[dict]) -> str:
    """The key a row's faults and attempts are tracked by: sha256 of its messages as canonical JSON."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def text_of(messages: list[dict]) -> str:
    """The messages' text joined by newlines; content may be a string or a list of text parts."""
    parts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(parts)


def score_of(messages: list[dict]) -> int:
    """`<score=N>` in the text if present, else a stable 1-5 from the text's hash."""
    text = text_of(messages)
    if match := _SCORE.search(text):
        return int(match.group(1))
    return 1 + int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5


def sample_text(messages: list[dict], seed: int | None, index: int) -> str:
    """Choice `index` of a sampler request for `messages` with `seed`: a made-up worked answer,
    different for every (messages, seed, index), the same every time."""
    digest = hashlib.sha256(json.dumps([messages, seed, index], sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    steps = "".join(f" then {int(digest[i:i + 2], 16)}" for i in range(12, 12 + 2 * (int(digest[10:12], 16) % 6), 2))
    return f"Candidate {index} [{digest[:10]}]: first {int(digest[:2], 16)}{steps}. The answer is {int(digest[2:6], 16) % 100}."


def _error(status: int, message: str, type_: str, code: str | None, **headers: str) -> web.Response:
    """OpenAI's error body shape, which the official client turns into `APIStatusError.message`."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _mask(key: str) -> str:
    """How OpenAI shows a wrong key: a few characters each end, the rest starred."""
    return key[:3] + "*" * max(len(key) - 7, 4) + key[-4:] if len(key) > 8 else "*" * len(key)


class FakeOpenAI:
    """The server: configuration, request log, and (as a context manager) its background thread."""

    def __init__(
        self,
        model: str = "judge-model",
        api_key: str | None = "sk-test",
        *,
        latency: float = 0.0,
        fault_rate: float = 0.0,
        seed: int = 0,
        fault_kinds: Sequence[str] = FAULT_KINDS,
        retry_after: str = "1",
        stall: float = 30.0,
        echo_headers: bool = False,
        score_fn: Callable[[list[dict]], int] = score_of,
        max_choices: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        unknown = set(fault_kinds) - set(FAULT_KINDS)
        if unknown or not fault_kinds:
            raise ValueError(f"fault_kinds {list(fault_kinds)}: pick a non-empty subset of {list(FAULT_KINDS)}")
        self.model, self.api_key, self.latency, self.fault_rate, self.seed = model, api_key, latency, fault_rate, seed
        self.fault_kinds, self.retry_after, self.stall = tuple(fault_kinds), retry_after, stall
        self.echo_headers, self.score_fn, self.host, self.port = echo_headers, score_fn, host, port
        self.max_choices = max_choices
        # The log is written on the server's loop and read from the test's thread.
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._attempts: Counter[str] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ---- request log -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    @property
    def max_in_flight(self) -> int:
        """Peak number of chat-completions requests being handled at once since start or reset()."""
        return self._max_in_flight

    def answered(self) -> set[str]:
        """Keys that received a scored 200 ("ok")."""
        return {r.key for r in self.requests if r.outcome == "ok"}

    def count_by_key(self) -> Counter[str]:
        return Counter(r.key for r in self.requests)

    def reset(self) -> None:
        """Forget the log and the attempt counts: every key's next request is a first try again."""
        with self._lock:
            self._records.clear()
            self._attempts.clear()
            self._max_in_flight = self._in_flight

    def stats(self) -> dict[str, Any]:
        records = self.requests
        return {
            "requests": len(records),
            "outcomes": dict(Counter(r.outcome for r in records)),
            "keys": len({r.key for r in records}),
            "answered": len({r.key for r in records if r.outcome == "ok"}),
            "max_in_flight": self._max_in_flight,
        }

    # ---- faults ------------------------------------------------------------------------------

    def fault_for(self, key: str, text: str, attempt: int) -> str | None:
        """The fault this try gets: a `<fail=KIND>` marker's on every try, else maybe one on the first."""
        if match := _FAIL.search(text):
            return match.group(1)
        if attempt != 1 or self.fault_rate <= 0:
            return None
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 >= self.fault_rate:
            return None
        return self.fault_kinds[int.from_bytes(digest[8:16], "big") % len(self.fault_kinds)]

    # ---- handlers ----------------------------------------------------------------------------

    def _echo(self, request: web.Request) -> str:
        """The request headers verbatim, as a hostile proxy would put them in an error body
        (Authorization first, where a client that shortens error text still shows it)."""
        headers = sorted(request.headers.items(), key=lambda kv: kv[0].lower() != "authorization")
        return " Request headers: " + "; ".join(f"{k}: {v}" for k, v in headers)

    async def _models(self, request: web.Request) -> web.Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        model = {"id": self.model, "object": "model", "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {self.api_key}":
            return None
        message = f"Incorrect API key provided: {_mask(header.removeprefix('Bearer '))}."
        return _error(401, message + (self._echo(request) if self.echo_headers else ""),
                      "invalid_request_error", "invalid_api_key")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        t_start = time.monotonic()
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        key, attempt, outcome, score, returned = "", 0, "400", None, 0
        try:
            try:
                body = await request.json()
                messages = body["messages"]
                key = row_key(messages)
            except (ValueError, KeyError, TypeError):
                return _error(400, "The request body must be JSON with a `messages` list.",
                              "invalid_request_error", None)
            with self._lock:
                self._attempts[key] += 1
                attempt = self._attempts[key]
            if (denied := self._check_key(request)) is not None:
                outcome = "401"
                return denied
            if body.get("model") != self.model:
                outcome = "404"
                return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access to it.",
                              "invalid_request_error", "model_not_found")
            text = text_of(messages)
            outcome = self.fault_for(key, text, attempt) or "ok"
            # Faults wait `latency` too (an upstream that fails after working on it); a stall waits `stall`.
            await asyncio.sleep(self.stall if outcome == "stall" else self.latency)
            if outcome == "429":
                return _error(429, f"Rate limit reached for requests. Please try again in {self.retry_after}s.",
                              "requests", "rate_limit_exceeded", **{"Retry-After": self.retry_after})
            if outcome == "500":
                message = "The server had an error while processing your request. Sorry about that!"
                return _error(500, message + (self._echo(request) if self.echo_headers else ""), "server_error", None)
            if outcome == "garbage":
                return web.Response(status=200, text=GARBAGE_BODY, content_type="application/json")
            if outcome == "drop":
                # No response at all: close the socket; aiohttp then cancels this handler
                # (handler_cancellation=True), so nothing is written or logged as an error.
                if request.transport is not None:
                    request.transport.close()
                await asyncio.sleep(3600)
            if "n" in body:  # a sampler's request
                choices = self._samples(messages, body)
                returned = len(choices)
                return web.json_response(self._completion(key, attempt, text, choices))
            score = self.score_fn(messages)
            if _UNPARSEABLE in text:
                outcome, content = "unparseable", UNPARSEABLE_REPLY
            elif (body.get("response_format") or {}).get("type") in ("json_schema", "json_object"):
                content = json.dumps({"reasoning": "Judged against the rubric.", "score": score})
            else:
                content = f"The response was judged against the rubric.\nScore: {score}"
            returned = 1
            return web.json_response(self._completion(key, attempt, text, [(content, "stop", max(1, len(content) // 4))]))
        finally:
            # Also runs when the client gave up (stall) or the socket was dropped: the handler is cancelled.
            with self._lock:
                self._in_flight -= 1
                self._records.append(RequestRecord(key, attempt, outcome, score, t_start, time.monotonic(), returned))

    def _samples(self, messages: list[dict], body: dict) -> list[tuple[str, str, int]]:
        """(text, finish_reason, tokens) of each choice of a sampler request; a word is a token."""
        n = int(body.get("n") or 1)
        budget = body.get("max_tokens") or body.get("max_completion_tokens")
        choices = []
        for i in range(min(n, self.max_choices or n)):
            words = sample_text(messages, body.get("seed"), i).split()
            cut = budget is not None and len(words) > budget
            words = words[:budget] if cut else words
            choices.append((" ".join(words), "length" if cut else "stop", len(words)))
        return choices

    def _completion(self, key: str, attempt: int, prompt: str, choices: list[tuple[str, str, int]]) -> dict[str, Any]:
        """A chat completion of `choices`, each (content, finish_reason, completion tokens)."""
        prompt_tokens, completion_tokens = max(1, len(prompt) // 4), sum(tokens for _, _, tokens in choices)
        return {
            "id": f"chatcmpl-fake-{key[:16]}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{
                "index": i,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            } for i, (content, finish, _) in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        return app

    # ---- serving -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def serve(self, on_ready: Callable[[], None]) -> None:
        """Listen, call `on_ready`, serve until `request_stop()`, then close every connection."""
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        # handler_cancellation: a client that hangs up (timeout, dropped socket) cancels its handler,
        # so stalls cost nothing once abandoned. No access log: the handler stays cheap at 1k req/s.
        runner = web.AppRunner(self.make_app(), handle_signals=False, access_log=None,
                               handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        try:
            # A deep backlog: hundreds of clients connecting at once must not wait on SYN retries.
            site = web.TCPSite(runner, self.host, self.port, backlog=4096)
            await site.start()
            self.port = runner.addresses[0][1]
            on_ready()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def request_stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def _run_thread(self) -> None:
        try:
            asyncio.run(self.serve(self._ready.set))
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            self._failure = exc
        finally:
            self._ready.set()

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._run_thread, name="fake-openai", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10) or self._failure is not None:
            self.stop()
            raise RuntimeError(f"fake OpenAI server did not start on {self.host}:{self.port}") from self._failure
        return self

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    parser.add_argument("--model", default="judge-model")
    parser.add_argument("--api-key", default="sk-test", help="'' accepts any key")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-kinds", default=",".join(FAULT_KINDS), help="comma-separated subset")
    parser.add_argument("--retry-after", default="1")
    parser.add_argument("--stall", type=float, default=30.0)
    parser.add_argument("--echo-headers", action="store_true")
    parser.add_argument("--max-choices", type=int, default=None, help="at most this many choices per reply")
    args = parser.parse_args(argv)
    server = FakeOpenAI(args.model, args.api_key or None, latency=args.latency, fault_rate=args.fault_rate,
                        seed=args.seed, fault_kinds=args.fault_kinds.split(","), retry_after=args.retry_after,
                        stall=args.stall, echo_headers=args.echo_headers, max_choices=args.max_choices,
                        host=args.host, port=args.port)

    serve_until_signalled(server)


def serve_until_signalled(server: FakeOpenAI) -> None:
    """Serve in this process until SIGINT/SIGTERM; print `listening on URL` once ready."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.serve(lambda: print(f"listening on {server.base_url}", flush=True))

    asyncio.run(run())


if __name__ == "__main__":
    main()
