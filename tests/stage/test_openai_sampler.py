"""The OpenAI sampler against our fault-injecting OpenAI-protocol server and against vLLM's own.

Our server (tests/fakes/openai_server.py) fails 30% of first tries in every way real endpoints do
(429 with Retry-After, 500, stalls past the timeout, a 200 whose body is not JSON, dropped
connections) and, like providers that cap `n`, returns at most 3 choices per reply, so the tests
check that every prompt still gets exactly `n` candidates, each the server's own text, with the
retries and the follow-up requests in the server's log; that a prompt failing every try stops
the stage naming it; that a refused key or an unknown model stops after one request; and that
the key never shows. The last test samples from vLLM's OpenAI-compatible server on the embedded
model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import OpenAISampler
from pipeline.errors import UserError
from stages.sample import openai_api
from stages.sample.candidates import CANDIDATE_COLUMNS, build_messages
from tests.conftest import JUDGE_KEY_ENV
from tests.fakes.openai_server import FAULT_KINDS, FakeOpenAI, row_key, sample_text

REPO = Path(__file__).resolve().parents[2]
MODEL = "sampler-model"
N, SEED, MAX_TOKENS = 4, 7, 12


def prompts(count: int) -> list[dict]:
    return [{"prompt_id": f"p{i:02d}", "prompt": f"Tom has {i} apples and buys 3 more. How many apples does he have?",
             "solution": f"{i} + 3 = {i + 3}", "answer": str(i + 3)} for i in range(count)]  # fmt: skip


def sampler_for(server: FakeOpenAI, **overrides) -> OpenAISampler:
    block = {"model": server.model, "base_url": server.base_url, "api_key_env": JUDGE_KEY_ENV, "n": N, "seed": SEED,
             "max_tokens": MAX_TOKENS, "concurrency": 8, "max_retries": 3, "timeout": 1.0, "backoff_base": 0.02,
             "backoff_max": 0.1} | overrides  # fmt: skip
    return OpenAISampler(**block)


def sample(sampler: OpenAISampler, rows: list[dict], out: Path) -> pd.DataFrame:
    out.mkdir(parents=True)
    openai_api.generate(sampler, None, sampler.model, rows, out)
    return pd.read_parquet(out).sort_values(["prompt_id", "candidate_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI(MODEL, api_key=os.environ[JUDGE_KEY_ENV], fault_rate=0.3, retry_after="0.05", stall=3.0, seed=4,
                    max_choices=3) as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module", autouse=True)
def fresh_ray_after_this_module():
    """A stage that fails inside Ray Data (the tests below make it fail on purpose) can leave its
    actor pool holding a CPU after the exception; a CLI run ends its process there, but this test
    session goes on, and the next module's 2-worker training would wait for that CPU. The next
    module gets a fresh cluster (Ray starts one on first use)."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def first_run(server, ray_local, tmp_path_factory):
    """30 prompts, 4 candidates each, against the faulty server; the output and the server's log."""
    rows = prompts(30)
    sampler = sampler_for(server)
    server.reset()
    out = sample(sampler, rows, tmp_path_factory.mktemp("openai-sampler") / "sample")
    return {"rows": rows, "sampler": sampler, "out": out, "log": server.requests}


def test_every_prompt_gets_exactly_n_candidates_through_30_percent_faults(first_run):
    out, log = first_run["out"], first_run["log"]
    assert list(out.columns) == list(CANDIDATE_COLUMNS)
    assert len(out) == 30 * N and not out.duplicated(["prompt_id", "candidate_id"]).any()
    assert all(sorted(ids) == list(range(N)) for ids in out.groupby("prompt_id").candidate_id.apply(list))
    assert set(out.prompt_id) == {r["prompt_id"] for r in first_run["rows"]}
    # the server injected every kind of fault, and each faulted prompt was tried again until answered
    first_faults = {r.key: r.outcome for r in log if r.attempt == 1 and r.outcome != "ok"}
    assert set(first_faults.values()) == set(FAULT_KINDS)
    assert 5 <= len(first_faults) <= 15  # about 30% of 30 prompts
    for key in first_faults:
        tries = [r for r in log if r.key == key]
        assert [r.attempt for r in tries] == list(range(1, len(tries) + 1))
        assert tries[1].outcome == "ok", tries  # a fault on the first try only: the retry was answered


def test_the_rows_are_the_servers_choices_with_the_samplers_columns(first_run):
    out, sampler = first_run["out"], first_run["sampler"]
    by_id = {r["prompt_id"]: r for r in first_run["rows"]}
    for got in out.itertuples():
        prompt = by_id[got.prompt_id]
        messages = build_messages(sampler, prompt["prompt"])
        assert [dict(m) for m in got.messages] == messages and got.prompt == prompt["prompt"]
        assert (got.solution, got.answer) == (prompt["solution"], prompt["answer"])
        # the server returns 3 choices at most: candidates 0-2 from the first request (seed 7),
        # candidate 3 from a second request for the one missing, with the seed moved on by 3
        seed, index = (SEED, got.candidate_id) if got.candidate_id < 3 else (SEED + 3, 0)
        words = sample_text(messages, seed, index).split()
        assert got.response == " ".join(words[:MAX_TOKENS])
        assert got.finish_reason == ("length" if len(words) > MAX_TOKENS else "stop")
        assert (got.sampler, got.model, got.seed) == ("openai", MODEL, SEED)
        assert got.prompt_token_ids is None and got.response_token_ids is None
        assert got.prompt_tokens == len("\n".join(m["content"] for m in messages)) // 4  # the fake's usage
        # usage counts all the choices of a reply together: a candidate's own count is known only
        # when its reply held it alone
        assert pd.isna(got.response_tokens) if got.candidate_id < 3 else got.response_tokens == min(len(words), MAX_TOKENS)
    assert {"stop", "length"} == set(out.finish_reason)


def test_the_server_saw_one_request_for_three_choices_and_one_for_the_rest(first_run):
    answered: dict[str, list[int]] = {}
    for record in first_run["log"]:
        if record.outcome == "ok":
            answered.setdefault(record.key, []).append(record.choices)
    keys = {row_key(build_messages(first_run["sampler"], r["prompt"])) for r in first_run["rows"]}
    assert set(answered) == keys
    assert all(choices == [3, 1] for choices in answered.values()), answered


def test_a_prompt_that_fails_every_try_stops_the_stage_naming_it(server, ray_local, tmp_path):
    rows = prompts(6)
    rows[3]["prompt"] += " <fail=500>"
    server.reset()
    with pytest.raises(UserError) as error:
        sample(sampler_for(server, max_retries=2), rows, tmp_path / "sample")
    message = str(error.value)
    assert "prompt 'p03': http 500 after 3 tries" in message and "sampler.max_retries" in message
    assert "Traceback" not in message and os.environ[JUDGE_KEY_ENV] not in message
    failing = row_key(build_messages(sampler_for(server), rows[3]["prompt"]))
    assert [r.outcome for r in server.requests if r.key == failing] == ["500"] * 3


@pytest.mark.parametrize("fault", ["401", "404"])
def test_a_refused_key_or_an_unknown_model_stops_with_one_message_after_one_request(fault, server, ray_local, tmp_path,
                                                                                     monkeypatch):  # fmt: skip
    monkeypatch.setenv("PIPELINE_TEST_WRONG_KEY", "sk-wrong-key-123456")
    overrides = {"api_key_env": "PIPELINE_TEST_WRONG_KEY"} if fault == "401" else {"model": "gpt-9"}
    server.reset()
    with pytest.raises(UserError) as error:
        sample(sampler_for(server, **overrides), prompts(5), tmp_path / "sample")
    message = str(error.value)
    assert f"answered http {fault}" in message and "sampler.model" in message
    assert ("PIPELINE_TEST_WRONG_KEY" in message) if fault == "401" else ("'gpt-9'" in message)
    assert "sk-wrong-key-123456" not in message and os.environ[JUDGE_KEY_ENV] not in message
    assert len(server.requests) == 1  # not retried, not tried prompt by prompt


def test_an_unreachable_server_stops_after_the_retries(server, ray_local, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sampler = sampler_for(server, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(UserError) as error:
        sample(sampler, prompts(3), tmp_path / "sample")
    assert f"sampler.base_url http://127.0.0.1:{port}/v1: no reply (connection error" in str(error.value)
    assert "after 2 tries" in str(error.value)


def test_preflight_names_the_block_and_the_missing_variable(server):
    sampler = sampler_for(server, api_key_env="PIPELINE_TEST_UNSET_KEY")
    with pytest.raises(UserError, match=r"^other_sampler\.api_key_env: the environment variable PIPELINE_TEST_UNSET_KEY is not set"):
        openai_api.preflight(sampler, "other_sampler")
    openai_api.preflight(sampler_for(server), "sampler")  # set: nothing to say
    openai_api.preflight(sampler_for(server, api_key_env=None), "sampler")  # a server without auth


# ── through the CLI, in a process of its own: the key kept secret ──────────────────────────────
def _config(path: Path, policy: Path, server: FakeOpenAI, **sampler) -> Path:
    block = {"type": "openai", "model": server.model, "base_url": server.base_url, "api_key_env": "SAMPLER_SENTINEL_KEY",
             "n": 3, "max_tokens": 16, "concurrency": 4, "timeout": 1.0, "max_retries": 2, "backoff_base": 0.02,
             "backoff_max": 0.1} | sampler  # fmt: skip
    data = {"type": "builtin_math", "num_train": 8, "num_eval": 2}
    evaluate = {"sampler": {"type": "vllm"}}  # evaluation samples each checkpoint, which an API cannot serve
    path.write_text(yaml.safe_dump({"policy": str(policy), "data": data, "sampler": block, "evaluate": evaluate}))
    return path


def _stage_sample(config: Path, run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "stage", "sample", str(config), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_key_appears_in_no_file_the_stage_wrote_and_no_output(tiny_llama, tmp_path):
    key = "sk-SENTINEL-sampler-7c3e9a1f0b2d"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's session logs, short for its socket paths
    # a hostile proxy: its 500 and 401 bodies echo the request headers, Authorization included
    with FakeOpenAI(MODEL, api_key=key, echo_headers=True, fault_rate=0.5, fault_kinds=("500",), seed=2) as server, \
            FakeOpenAI(MODEL, api_key="sk-other", echo_headers=True) as refusing:  # fmt: skip
        env = os.environ | {"SAMPLER_SENTINEL_KEY": key, "RAY_TMPDIR": str(ray_tmp)}
        ok = _stage_sample(_config(tmp_path / "sample.yaml", tiny_llama, server), tmp_path / "run", env)
        refused = _stage_sample(_config(tmp_path / "refused.yaml", tiny_llama, refusing), tmp_path / "run2", env)
        assert any(r.outcome == "500" for r in server.requests), ok.stderr[-3000:]  # the echoing error bodies were sent
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert refused.returncode == 2 and "http 401" in refused.stderr and "Traceback" not in refused.stderr
    manifests = list((tmp_path / "run" / "round-0" / "sample").rglob("_manifest.json"))
    assert len(manifests) == 1
    out = pd.read_parquet(manifests[0].parent)
    assert len(out) == 8 * 3 and set(out.sampler) == {"openai"}
    for text in (ok.stdout, ok.stderr, refused.stdout, refused.stderr):
        assert key not in text
    written = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    assert len(written) > 10
    leaks = [p for p in written if key.encode() in p.read_bytes()]
    assert not leaks, leaks


# ── vLLM's own OpenAI-compatible server ────────────────────────────────────────────────────────
def test_n_candidates_per_prompt_from_vllms_server(vllm_openai_server, ray_local, tmp_path):
    sampler = OpenAISampler(model="smollm2", base_url=vllm_openai_server, api_key_env=JUDGE_KEY_ENV, n=3, max_tokens=24,
                            temperature=1.0, seed=3, concurrency=4, timeout=120.0, max_retries=1)  # fmt: skip
    out = sample(sampler, prompts(4), tmp_path / "sample")
    assert len(out) == 4 * 3
    assert all(sorted(ids) == [0, 1, 2] for ids in out.groupby("prompt_id").candidate_id.apply(list))
    assert out.response.str.strip().str.len().gt(0).all()
    assert set(out.model) == {"smollm2"} and set(out.sampler) == {"openai"} and set(out.seed) == {3}
    assert set(out.finish_reason) <= {"stop", "length"}
    assert (out.prompt_tokens > 10).all()  # the chat template and the question, counted by vLLM
    assert out.groupby("prompt_id").response.nunique().gt(1).all()  # three draws, not one thrice
