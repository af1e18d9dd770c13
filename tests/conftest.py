"""Shared fixtures: a tiny random Llama built on the spot (no hub), and a local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The API key of judge tests against our local OpenAI-protocol servers. Set before any test starts
# Ray: workers inherit the environment of the cluster's start, as on a real cluster.
JUDGE_KEY_ENV = "PIPELINE_TEST_JUDGE_KEY"
os.environ.setdefault(JUDGE_KEY_ENV, "sk-test-0a1b2c3d4e5f")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Tom has 3 bags of 4 apples: 3 × 4 = 12 apples. The answer is 12.",
    "Solve it step by step. Finish with a last line of the form 'The answer is N.'",
    "How many dollars does Lena make by selling all the boxes? 16 ÷ 2 = 8 boxes.",
    "0 1 2 3 4 5 6 7 8 9 + - = × ÷ % . , ? ! the a is of and to in",
]


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained here, ChatML template.

    Small enough for a CPU test (~0.3 M parameters), real enough for vLLM, transformers and FSDP.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """One local Ray cluster for the session (2 CPUs, as on CI), started again for a module that
    needs it after one that shut it down (tests/e2e/test_cluster_e2e.py: a cluster node holds
    one Ray instance)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield


@pytest.fixture(autouse=True)
def _no_ray_variables_leak_from_a_test():
    """The CLI (`pipeline.quiet.before_ray_import`) sets Ray's variables for a process that is about
    to import Ray; in this process Ray is imported already, so a local cluster started by a later
    test would disagree with them (RAY_AUTH_MODE=token without a token: GCS refuses to start)."""
    keys = ("RAY_AUTH_MODE", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DATA_LIST_FILES_THREADED_NUM_WORKERS")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ── one S3-protocol server for the session ──────────────────────────────────────────────────
# Started before any test, so every Ray cluster of the session (the shared local one, the
# tests' own) inherits its endpoint and credentials from the environment, as a cloud node
# inherits them from its provider chain: an object-store path is tested in the same Ray as the
# local one. The secret is random, so a test can check it was written nowhere.
S3_BUCKET = "pipeline-tests"
_S3 = None


def pytest_configure(config):
    global _S3
    from tests.helpers.s3_server import s3_server

    _S3 = s3_server(S3_BUCKET, secret="sec-" + os.urandom(12).hex())
    os.environ.update(_S3.__enter__())


def pytest_unconfigure(config):
    if _S3 is not None:
        _S3.__exit__(None, None, None)


@pytest.fixture(scope="session")
def s3() -> dict[str, str]:
    """The session's S3 server as environment variables (bucket `S3_BUCKET`)."""
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}


@pytest.fixture(scope="session")
def vllm_openai_server() -> str:
    """vLLM's OpenAI-compatible server on the embedded model, with the test key (ENVIRONMENT.md:
    `python -m vllm.entrypoints.openai.api_server`, not the `vllm` script), served as `smollm2`;
    started once for every module that needs a real endpoint (an engine start costs ~30 s)."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from pipeline.models import resolve_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model("embedded:smollm2-135m-instruct"),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smollm2", "--gpu-memory-utilization", "0.3",
           "--enforce-eager", "--max-model-len", "2048", "--api-key", os.environ[JUDGE_KEY_ENV]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"VLLM_LOGGING_LEVEL": "WARNING"})  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, "vLLM's server exited"
            assert time.time() < deadline, "vLLM's server did not come up"
            try:
                urllib.request.urlopen(f"{base_url}/models", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the key: it is up
                break
            except OSError:
                time.sleep(2)
        yield base_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
