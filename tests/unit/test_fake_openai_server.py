"""The fake OpenAI server (tests/fakes/openai_server.py), driven by the official `openai` client.

Besides pinning the fake, these tests record what the official client raises for each fault, which
is what the OpenAI judge has to catch (openai 3.57, max_retries=0):

    429      -> openai.RateLimitError (APIStatusError); e.response.headers["retry-after"] is the header
    500      -> openai.InternalServerError (APIStatusError)
    stall    -> openai.APITimeoutError, a SUBCLASS of APIConnectionError (catch it first)
    garbage  -> json.JSONDecodeError (a ValueError) straight from httpx2's response.json(): NOT an
                openai.OpenAIError, and the client does not retry it
    drop     -> openai.APIConnectionError, caused by httpx2.RemoteProtocolError, at once (no hang)
    401      -> openai.AuthenticationError; 404 -> openai.NotFoundError

openai 3.57 is built on `httpx2`, not `httpx`: the causes and `e.response` are httpx2 objects, so
catch the openai exceptions, never `httpx.*` ones.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest

from tests.fakes.openai_server import FAULT_KINDS, UNPARSEABLE_REPLY, FakeOpenAI, row_key

MODEL, KEY = "judge-model", "sk-test"
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": {"type": "object"}}}


def rows(text: str) -> list[dict]:
    return [{"role": "system", "content": "Grade 1-5."}, {"role": "user", "content": text}]


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def client():
    """`client(server, ...)` makes an official client with no retries; all are closed after the test."""
    made: list[openai.OpenAI] = []

    def make(server: FakeOpenAI, api_key: str = KEY, timeout: float = 5.0) -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=timeout))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def ask(client):
    """`ask(server, text, **kwargs)`: one chat completion of `rows(text)`, its content."""

    def ask(server: FakeOpenAI, text: str, **kwargs) -> str:
        reply = client(server).chat.completions.create(model=MODEL, messages=rows(text), temperature=0.0,
                                                       max_tokens=64, **kwargs)
        return reply.choices[0].message.content

    return ask


def test_marker_score_comes_back_in_text_and_json_modes_with_usage(client, ask):
    with FakeOpenAI(MODEL, KEY) as server:
        reply = client(server).chat.completions.create(model=MODEL, messages=rows("A vs B <score=4>"))
        assert reply.choices[0].message.content.endswith("\nScore: 4")
        assert reply.choices[0].finish_reason == "stop" and reply.model == MODEL
        assert reply.usage.prompt_tokens >= 1 and reply.usage.completion_tokens >= 1
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert json.loads(ask(server, "A vs B <score=2>", response_format=JSON_SCHEMA))["score"] == 2
        assert [m.id for m in client(server).models.list()] == [MODEL]
        assert server.answered() == {row_key(rows("A vs B <score=4>")), row_key(rows("A vs B <score=2>"))}


def test_score_without_marker_is_stable_and_in_range_and_score_fn_replaces_it(ask):
    with FakeOpenAI() as server:
        first, again = ask(server, "no marker here"), ask(server, "no marker here")
        assert first == again and first[-1] in "12345"
    with FakeOpenAI(score_fn=lambda messages: 3) as server:
        assert ask(server, "<score=5>").endswith("Score: 3")


def test_wrong_key_gets_401_and_only_echo_headers_leaks_it(client):
    with FakeOpenAI(api_key=KEY) as server:
        with pytest.raises(openai.AuthenticationError) as info:
            client(server, api_key="sk-wrong-secret-key").models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert "sk-wrong-secret-key" not in str(info.value.body)
    with FakeOpenAI(api_key=KEY, echo_headers=True) as server:
        with pytest.raises(openai.AuthenticationError) as info:
            client(server, api_key="sk-wrong-secret-key").chat.completions.create(model=MODEL, messages=rows("a"))
        assert "Authorization: Bearer sk-wrong-secret-key" in info.value.message
        assert [r.outcome for r in server.requests] == ["401"]


def test_unknown_model_gets_404_model_not_found(client):
    with FakeOpenAI(MODEL) as server:
        with pytest.raises(openai.NotFoundError) as info:
            client(server).chat.completions.create(model="gpt-nope", messages=rows("a"))
        assert info.value.code == "model_not_found" and "`gpt-nope`" in info.value.message


def test_each_fault_kind_reaches_the_client_as_documented(client, ask):
    with FakeOpenAI(retry_after="0.2", stall=2.0, echo_headers=True) as server:
        with pytest.raises(openai.RateLimitError) as info:
            ask(server, "<fail=429>")
        assert info.value.response.headers["retry-after"] == "0.2"
        with pytest.raises(openai.InternalServerError) as info:
            ask(server, "<fail=500>")
        assert f"Authorization: Bearer {KEY}" in info.value.message  # the hostile proxy the judge must scrub
        t0 = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client(server, timeout=0.3).chat.completions.create(model=MODEL, messages=rows("<fail=stall>"))
        assert time.monotonic() - t0 < 1.9  # the stall itself is 2 s
        # A 200 labelled JSON whose body is not JSON: the client's response.json() raises, unwrapped.
        with pytest.raises(json.JSONDecodeError):
            ask(server, "<fail=garbage>")
        t0 = time.monotonic()
        with pytest.raises(openai.APIConnectionError) as info:
            ask(server, "<fail=drop>")
        assert not isinstance(info.value, openai.APITimeoutError) and time.monotonic() - t0 < 3.0
        assert type(info.value.__cause__).__name__ == "RemoteProtocolError"
        wait_until(lambda: len(server.requests) == 5)  # the abandoned stall ends when the client hangs up
        assert [r.outcome for r in server.requests] == ["429", "500", "stall", "garbage", "drop"]
        assert server.answered() == set()


def test_fault_rate_one_fails_the_first_try_and_the_second_succeeds(ask):
    with FakeOpenAI(fault_rate=1.0, fault_kinds=["500"]) as server:
        with pytest.raises(openai.InternalServerError):
            ask(server, "row <score=5>")
        assert ask(server, "row <score=5>").endswith("Score: 5")
        ask(server, "row <score=5>")
        key = row_key(rows("row <score=5>"))
        assert [(r.key, r.attempt, r.outcome) for r in server.requests] == [
            (key, 1, "500"), (key, 2, "ok"), (key, 3, "ok")]
        assert server.count_by_key() == {key: 3}
        server.reset()
        assert server.requests == [] and server.max_in_flight == 0
        with pytest.raises(openai.InternalServerError):  # after reset() a key is on its first try again
            ask(server, "row <score=5>")


def test_fail_marker_fails_every_try_and_unparseable_marker_never_scores(ask):
    with FakeOpenAI() as server:
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                ask(server, "<fail=500>")
            assert ask(server, "<reply=unparseable>", response_format=JSON_SCHEMA) == UNPARSEABLE_REPLY
        assert [r.attempt for r in server.requests if r.outcome == "500"] == [1, 2, 3]
        assert {r.outcome for r in server.requests} == {"500", "unparseable"} and server.answered() == set()


def test_faults_are_reproducible_from_seed_and_follow_the_rate():
    keys = [row_key(rows(f"row {i}")) for i in range(1000)]
    a, b = FakeOpenAI(fault_rate=0.3, seed=7), FakeOpenAI(fault_rate=0.3, seed=7)
    faults = [a.fault_for(k, "", 1) for k in keys]
    assert faults == [b.fault_for(k, "", 1) for k in keys]
    assert faults != [FakeOpenAI(fault_rate=0.3, seed=8).fault_for(k, "", 1) for k in keys]
    assert 250 < sum(f is not None for f in faults) < 350 and set(faults) == {None, *FAULT_KINDS}
    assert all(a.fault_for(k, "", 2) is None for k in keys)


def test_twenty_concurrent_requests_are_all_in_flight_at_once():
    async def burst(server: FakeOpenAI) -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as aclient:
            replies = await asyncio.gather(*(
                aclient.chat.completions.create(model=MODEL, messages=rows(f"row {i}")) for i in range(20)))
        return [r.choices[0].message.content for r in replies]

    with FakeOpenAI(latency=0.3) as server:
        t0 = time.monotonic()
        assert len(asyncio.run(burst(server))) == 20
        assert time.monotonic() - t0 < 3.0 and server.max_in_flight >= 20  # one by one: 6 s


def test_exit_with_a_stall_in_flight_is_quick_quiet_and_leaves_no_thread(capfd, ask):
    server = FakeOpenAI(stall=30.0).start()
    seen: list[Exception] = []

    def call() -> None:
        try:
            ask(server, "<fail=stall>")
        except Exception as exc:
            seen.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    caller.join(timeout=5)
    assert time.monotonic() - t0 < 3.0 and not caller.is_alive()  # the stall is 30 s
    assert len(seen) == 1 and type(seen[0]) is openai.APIConnectionError
    assert not [t for t in threading.enumerate() if t.name == "fake-openai"]
    assert capfd.readouterr().err == ""


def test_standalone_process_announces_its_port_and_serves_stats_and_reset():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--fault-rate", "1",
                             "--fault-kinds", "429"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.removeprefix("listening on ")
        server_root = base_url.removesuffix("/v1")
        body = {"model": MODEL, "messages": rows("x")}
        headers = {"Authorization": f"Bearer {KEY}"}
        codes = [httpx.post(f"{base_url}/chat/completions", json=body, headers=headers).status_code for _ in range(2)]
        assert codes == [429, 200]
        stats = httpx.get(f"{server_root}/stats").json()
        assert stats["requests"] == 2 and stats["outcomes"] == {"429": 1, "ok": 1} and stats["max_in_flight"] >= 1
        httpx.post(f"{server_root}/reset")
        assert httpx.get(f"{server_root}/stats").json()["requests"] == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and err == ""
