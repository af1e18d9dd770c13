"""The `openai` sampler: candidates from any OpenAI-compatible chat endpoint (OpenAI, Azure,
vLLM's or SGLang's server, a proxy), through the client the OpenAI judge uses
(`pipeline/openai_client.py`: rate limit, retries with backoff, Retry-After, redaction).

- One chat request per prompt for its `n` candidates, with the sampler's `seed`, temperature,
  top_p and max_tokens. A server that returns fewer choices (some cap `n`) is asked again for
  the rest, with the seed moved on by the number already drawn (the same seed would repeat them).
- Ray Data runs `SampleWorker`, an async actor pool like the judge's: `workers` actors, each
  holding up to `concurrency / workers` requests open at once.
- Before the pool starts, the driver sends the first prompt's request itself (`probe`): a
  refused key, an unknown model or an unreachable server stops the stage with one message.
- The output is complete or there is none: a prompt still without its `n` candidates after
  `max_retries` retries stops the stage with its id and the reason (`http 500 after 6 tries`).
  The runner renames a stage's folder into place only when it succeeds, so a rerun starts over.

Rows (`candidates.CANDIDATE_COLUMNS`): `response` is the choice's text, `finish_reason` the
server's ("stop", or "length" when `max_tokens` cut it off); no token ids (an API does not show
them: training tokenizes the text); `prompt_tokens` from the reply's usage, `response_tokens`
only when the reply held one choice (usage counts the tokens of all its choices together).

The API key is read from the variable `api_key_env` names when requests are made; it is never
in the config, a row, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from pipeline.config import OpenAISampler
from pipeline.errors import UserError
from pipeline.openai_client import Choice, EndpointError, OpenAIClient, no_reply, read_api_key
from stages.sample.candidates import build_messages
from stages.sample.candidates import SCHEMA

log = logging.getLogger("pipeline")

# An HTTP-bound actor: half a core, so the pool leaves Ray Data a CPU to write the rows with.
WORKER_CPUS = 0.5
# Error messages name the config block; the runner hands every source's sampler in as `sampler`.
WHERE = "sampler"


@dataclass(frozen=True)
class Candidate:
    choice: Choice
    prompt_tokens: int | None
    response_tokens: int | None


class PromptFailed(Exception):
    """A prompt did not get its `n` candidates: the stage stops (its output must be complete)."""

    def __init__(self, prompt_id: str, reason: str):
        super().__init__(f"prompt {prompt_id!r}: {reason}")
        self.prompt_id, self.reason = prompt_id, reason

    def __reduce__(self):  # back to the driver from a Ray worker with both fields
        return PromptFailed, (self.prompt_id, self.reason)


async def draw(client: OpenAIClient, sampler: OpenAISampler, prompt: dict[str, Any]) -> list[Candidate]:
    """`sampler.n` candidates for one prompt: one request, and more if the server returns fewer."""
    messages = build_messages(sampler, prompt["prompt"])
    drawn: list[Candidate] = []
    while len(drawn) < sampler.n:
        reply = await client.choices(messages, n=sampler.n - len(drawn), temperature=sampler.temperature,
                                     top_p=sampler.top_p, max_tokens=sampler.max_tokens, seed=sampler.seed + len(drawn))  # fmt: skip
        if reply.value is None:
            raise PromptFailed(prompt["prompt_id"], reply.reason)
        got = reply.value
        response_tokens = got.completion_tokens if len(got.choices) == 1 else None
        drawn += [Candidate(c, got.prompt_tokens, response_tokens) for c in got.choices[: sampler.n - len(drawn)]]
    return drawn


def candidate_rows(sampler: OpenAISampler, prompt: dict[str, Any], drawn: list[Candidate]) -> list[dict[str, Any]]:
    messages = build_messages(sampler, prompt["prompt"])
    return [{
        "prompt_id": prompt["prompt_id"], "candidate_id": i, "prompt": prompt["prompt"], "messages": messages,
        "solution": prompt.get("solution"), "answer": prompt.get("answer"), "response": c.choice.text,
        "prompt_token_ids": None, "response_token_ids": None, "prompt_tokens": c.prompt_tokens,
        "response_tokens": c.response_tokens, "finish_reason": c.choice.finish_reason, "sampler": "openai",
        "model": sampler.model, "seed": sampler.seed,
    } for i, c in enumerate(drawn)]  # fmt: skip


class SampleWorker:
    """A Ray Data actor: samples batches of prompts with up to `in_flight` requests open at once
    over all the batches it is working on."""

    def __init__(self, sampler: OpenAISampler, in_flight: int, requests_per_minute: float | None,
                 probed: dict[str, list[Candidate]]):
        self.sampler, self.in_flight, self.requests_per_minute = sampler, in_flight, requests_per_minute
        self.probed = probed  # the driver's probe: its prompt is not asked again
        self._client: OpenAIClient | None = None
        self._batches = 0  # batches in progress (Ray Data runs several at once on the actor's loop)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._client is None:  # built in the actor's event loop
            try:
                self._client = OpenAIClient(self.sampler, where=WHERE, in_flight=self.in_flight,
                                            requests_per_minute=self.requests_per_minute)
            except EndpointError as err:
                raise EndpointError(f"{err} (it is set on the driver, not in this Ray worker's environment)") from None
        self._batches += 1
        prompts = batch.to_pylist()
        tasks = [asyncio.ensure_future(self._draw(p)) for p in prompts]
        try:
            drawn = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one prompt failed: the stage stops, the others' requests are abandoned
                task.cancel()
            raise
        finally:
            self._batches -= 1
            if self._batches == 0:  # idle, perhaps for good: close the connections (reopened if more comes)
                client, self._client = self._client, None
                await client.close()
        rows = [row for p, d in zip(prompts, drawn) for row in candidate_rows(self.sampler, p, d)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    async def _draw(self, prompt: dict[str, Any]) -> list[Candidate]:
        if prompt["prompt_id"] in self.probed:
            return self.probed[prompt["prompt_id"]]
        return await draw(self._client, self.sampler, prompt)


def probe(sampler: OpenAISampler, prompt: dict[str, Any]) -> list[Candidate]:
    """Draw the first prompt's candidates here in the driver, before the pool starts: a refused
    key, an unknown model or an unreachable server becomes one UserError after one request."""

    async def one() -> list[Candidate]:
        client = OpenAIClient(sampler, where=WHERE, in_flight=1)
        try:
            return await draw(client, sampler, prompt)
        finally:
            await client.close()

    try:
        return asyncio.run(one())
    except EndpointError as err:
        raise UserError(str(err)) from None
    except PromptFailed as err:
        raise UserError(no_reply(sampler, WHERE, err.reason) or _failed(sampler, err)) from None


def _failed(sampler: OpenAISampler, err: PromptFailed) -> str:
    return (f"{WHERE} {sampler.model} at {sampler.base_url or 'the default OpenAI endpoint'}: {err}; the stage "
            f"keeps no candidates (every prompt needs its {sampler.n}); rerun it once the endpoint answers "
            f"(or raise {WHERE}.max_retries, {WHERE}.timeout)")  # fmt: skip


def generate(sampler: OpenAISampler, model_path: None, model_name: str, prompts: list[dict], out_dir: Path) -> None:
    """Write `sampler.n` candidates for every prompt as Parquet files under `out_dir`, or raise."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if sampler.workers * WORKER_CPUS > cpus - 1:
        raise UserError(
            f"{WHERE}.workers={sampler.workers}: {sampler.workers} actors of {WORKER_CPUS} CPU each leave this Ray "
            f"cluster ({cpus:g} CPUs) no CPU to write the candidates with; use at most "
            f"{max(1, int((cpus - 1) / WORKER_CPUS))} (one actor keeps hundreds of requests in flight: raise "
            f"{WHERE}.concurrency instead)"
        )
    preflight(sampler, WHERE)
    if not prompts:
        return
    log.info("sampler %s at %s: %d prompts, %d candidates each, up to %d requests in flight", sampler.model,
             sampler.base_url or "the OpenAI default", len(prompts), sampler.n, sampler.concurrency)  # fmt: skip
    probed = {prompts[0]["prompt_id"]: probe(sampler, prompts[0])}
    in_flight = math.ceil(sampler.concurrency / sampler.workers)
    rpm = sampler.max_requests_per_minute / sampler.workers if sampler.max_requests_per_minute else None
    context = ray.data.DataContext.get_current()
    wrap = context.raise_original_map_exception
    # Ray Data wraps a worker's exception in a UserCodeException that keeps only its text; with
    # this flag the driver gets a RayTaskError that *is* a PromptFailed (or EndpointError).
    context.raise_original_map_exception = True
    try:
        ray.data.from_items(prompts).map_batches(
            SampleWorker,
            fn_constructor_kwargs={"sampler": sampler, "in_flight": in_flight, "requests_per_minute": rpm, "probed": probed},
            compute=ray.data.ActorPoolStrategy(size=sampler.workers),
            batch_size=4 * in_flight,  # few batch boundaries: each waits for its slowest prompt
            batch_format="pyarrow",
            num_cpus=WORKER_CPUS,
        ).write_parquet(str(out_dir))
    except PromptFailed as err:
        raise UserError(_failed(sampler, _original(err))) from None
    except EndpointError as err:
        raise UserError(str(_original(err))) from None
    finally:
        context.raise_original_map_exception = wrap


def _original(err: Exception) -> Any:
    """The worker's own exception: a RayTaskError's `str` is the whole remote traceback."""
    return err.cause if isinstance(err, ray.exceptions.RayTaskError) else err


def preflight(sampler: OpenAISampler, where: str) -> None:
    """Before any work: the variable holding the key is set (its value is not shown anywhere)."""
    try:
        read_api_key(sampler.api_key_env, where)
    except EndpointError as err:
        raise UserError(str(err)) from None
