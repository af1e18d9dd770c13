"""The rubric judge (`judge: {type: openai}`): a GPT-4-class model scores every candidate 1-5
with the paper's rubric (3D-properties, Appendix C), through the official `openai` client
against any OpenAI-compatible server: OpenAI, Azure, vLLM, SGLang, a proxy.

Where the work happens:
- Ray Data runs `JudgeWorker`, an async actor pool (`judge.workers` actors, each holding up to
  `concurrency / workers` requests open at once), so judging spreads over a cluster like
  sampling does. (`ray.data.llm`'s HTTP processor sends a batch's requests one after another,
  ignores Retry-After, does not retry 500 and raises when its retries run out.)
- `JudgeClient` does one row: `pipeline/openai_client.py` (shared with the OpenAI sampler) does
  the rate limit, retries, backoff and Retry-After, this module the parsing; a row it cannot
  score is kept with `score` null and the reason — never dropped, never guessed.
- `cache.py` stores each score as it arrives (a wave of replies in one write), in one SQLite
  file owned by one actor on the driver's node: a rerun of a killed stage sends requests only for
  rows not judged yet, and identical requests inside a worker share one reply. When the driver
  is killed its cache actor goes with it; the workers, which outlive it by a few seconds, then
  send nothing more, so at most about twice `concurrency` replies are not kept.
- Before the pool starts, the driver sends the first unjudged row itself (`probe`): a refused
  key, an unknown model or an unreachable server stops the stage with one message instead of
  failing every row.

Columns added: `score` (1-5 or null), `score_reason` ("judged", or why not: `http 500 after 6
tries`, `unparseable: no score found: "I cannot decide…"`), `judge_reasoning` (the judge's own
explanation), `judge_model`, `judge_tries` (requests sent this time; 0 for a cache hit),
`judge_cached`, `judge_prompt_tokens`, `judge_completion_tokens` (of the request that produced
the score), `judge` ("openai").

The API key is read from the variable `api_key_env` names when requests are made; it is never
in the config, a log line, an artifact, the cache or an error message (`openai_client.redact`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import pandas as pd
import ray

from pipeline.config import DataConfig, OpenAIJudge
from pipeline.errors import UserError
from pipeline.models import cache_root
from pipeline.openai_client import EndpointError, OpenAIClient, Rejected, Reply, no_reply, read_api_key
from stages.judge.cache import GroupCommit, JudgeCache, cache_key
from stages.judge.parse import Judgement, Unparseable, describe_unparseable, parse_judgement
from stages.judge.rubric import JSON_SCHEMA, judge_messages, load_rubric

log = logging.getLogger("pipeline")

# An HTTP-bound actor: half a core, so a pool as large as the cluster's cores still leaves Ray Data
# a CPU to read the candidates with (`judge` checks the pool fits).
WORKER_CPUS = 0.5

# The columns a row needs to be judged: the question, the response, the reference when there is one.
ROW_COLUMNS = ["prompt", "response", "solution", "answer"]


@dataclass(frozen=True)
class Outcome:
    score: int | None
    reason: str  # "judged" when scored, else why not, e.g. `http 500 after 6 tries`
    reasoning: str  # the judge's own explanation ("" when unscored)
    tries: int  # requests sent for the row this time (0 for a cache hit)
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JudgeClient(OpenAIClient):
    """One request per row, with the shared client's retries: a score, or the reason there is none.
    `judge_messages` never raises for a row's own trouble (`pipeline/openai_client.py`); a reply
    with no single 1-5 score in it is retried, and kept unscored when the tries run out."""

    def __init__(self, judge: OpenAIJudge, *, in_flight: int, requests_per_minute: float | None = None, seed: int = 0):
        super().__init__(judge, where="judge", in_flight=in_flight, requests_per_minute=requests_per_minute, seed=seed)

    async def judge_messages(self, messages: list[dict[str, str]],
                             store: Callable[[Outcome], Awaitable[None]] | None = None) -> Outcome:
        """The row's outcome, returned once `store(outcome)` has kept its score (see `send`)."""
        judge = self.endpoint
        kwargs: dict[str, Any] = {"messages": messages, "temperature": judge.temperature, "max_tokens": judge.max_tokens}
        if judge.response_format == "json_schema":
            kwargs["response_format"] = JSON_SCHEMA
        keep = None if store is None else (lambda reply: store(_outcome(reply)))
        return _outcome(await self.send(kwargs, self._verdict, keep))

    def _verdict(self, completion: Any) -> tuple[Judgement, int, int]:
        """The reply's score and reasoning, and its (prompt, completion) tokens."""
        content = completion.choices[0].message.content
        try:
            verdict = parse_judgement(content, self.endpoint.response_format)
        except Unparseable as err:
            raise Rejected(describe_unparseable(err, content)) from None
        usage = getattr(completion, "usage", None)
        return verdict, int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


def _outcome(reply: Reply[tuple[Judgement, int, int]]) -> Outcome:
    if reply.value is None:
        return Outcome(None, reply.reason, "", reply.tries)
    verdict, prompt_tokens, completion_tokens = reply.value
    return Outcome(verdict.score, "judged", verdict.reasoning, reply.tries, prompt_tokens, completion_tokens)


def cache_folder(judge: OpenAIJudge) -> str:
    return judge.cache_dir or str(cache_root() / "judge")


def row_messages(judge: OpenAIJudge, rubric: str, row: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """(cache key, messages) of one candidate row."""
    messages = judge_messages(rubric, question=row["prompt"], response=row["response"], solution=row.get("solution"),
                              answer=row.get("answer"), response_format=judge.response_format)  # fmt: skip
    key = cache_key(model=judge.model, rubric=rubric, temperature=judge.temperature, max_tokens=judge.max_tokens,
                    response_format=judge.response_format, messages=messages)  # fmt: skip
    return key, messages


class JudgeWorker:
    """A Ray Data actor: judges batches of rows with up to `in_flight` requests open at once
    over all the batches it is working on."""

    def __init__(self, judge: OpenAIJudge, rubric: str, cache: Any, in_flight: int, requests_per_minute: float | None,
                 probed: dict[str, Outcome] | None = None):
        self.judge, self.rubric, self.cache = judge, rubric, cache
        self.probed = probed or {}  # the driver's probe: judged this run, not a cache hit
        self.in_flight, self.requests_per_minute = in_flight, requests_per_minute
        self._client: JudgeClient | None = None
        self._pending: dict[str, asyncio.Future] = {}  # key → the reply being awaited (duplicates share it)
        self._writes: GroupCommit | None = None
        self._batches = 0  # batches in progress (Ray Data runs several at once on the actor's loop)

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self._client is None:  # built in the actor's event loop
            try:
                self._client = JudgeClient(self.judge, in_flight=self.in_flight, requests_per_minute=self.requests_per_minute)
            except EndpointError as err:
                raise EndpointError(f"{err} (it is set on the driver, not in this Ray worker's environment)") from None
            self._writes = GroupCommit(lambda records: self.cache.put_many.remote(records))
        self._batches += 1
        try:
            rows = [row_messages(self.judge, self.rubric, r) for r in batch[ROW_COLUMNS].to_dict("records")]
            hits = await self.cache.get_many.remote([key for key, _ in rows])
            results = await asyncio.gather(*(self._row(key, messages, hits.get(key)) for key, messages in rows))
        finally:
            self._batches -= 1
            if self._batches == 0:  # idle, perhaps for good: close the connections (reopened if more comes)
                client, self._client = self._client, None
                await client.close()
        return with_judge_columns(batch, [o for o, _ in results], [c for _, c in results], self.judge.model)

    async def _row(self, key: str, messages: list[dict[str, str]], hit: dict | None) -> tuple[Outcome, bool]:
        if key in self.probed:
            return self.probed[key], False
        if hit is not None:
            return Outcome(hit["score"], "judged", hit["reasoning"], 0, hit["prompt_tokens"], hit["completion_tokens"]), True
        if key in self._pending:  # the same request is already open: share its reply, send nothing
            outcome = await asyncio.shield(self._pending[key])
            return Outcome(outcome.score, outcome.reason, outcome.reasoning, 0, 0, 0), outcome.score is not None
        future = self._pending[key] = asyncio.get_running_loop().create_future()

        async def store(outcome: Outcome) -> None:
            await self._writes.store(key, _record(outcome))

        try:
            outcome = await self._client.judge_messages(messages, store)
            future.set_result(outcome)
            return outcome, False
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved: no "exception never retrieved" warning when nobody shares it
            raise
        finally:
            del self._pending[key]


def _record(outcome: Outcome) -> dict[str, Any]:
    return {"score": outcome.score, "reasoning": outcome.reasoning, "tries": outcome.tries,
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens}  # fmt: skip


def with_judge_columns(batch: pd.DataFrame, outcomes: list[Outcome], cached: list[bool], model: str) -> pd.DataFrame:
    return batch.assign(
        score=pd.array([o.score for o in outcomes], dtype="Int64"),
        score_reason=[o.reason for o in outcomes],
        judge_reasoning=[o.reasoning for o in outcomes],
        judge_model=model,
        judge_tries=[o.tries for o in outcomes],
        judge_cached=cached,
        judge_prompt_tokens=[o.prompt_tokens for o in outcomes],
        judge_completion_tokens=[o.completion_tokens for o in outcomes],
        judge="openai",
    )


def _cache_actor(folder: str) -> Any:
    """The one owner of the SQLite file, on the driver's node (where `cache_dir` is)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(JudgeCache).options(num_cpus=0, scheduling_strategy=here).remote(folder)


def probe(judge: OpenAIJudge, rubric: str, rows: pd.DataFrame, cache: Any) -> dict[str, Outcome]:
    """Judge the first row the cache does not hold, here in the driver, before the pool starts:
    a refused key, an unknown model or an unreachable server becomes one UserError. Returns
    that row's outcome by key (it counts as judged this run, not as a cache hit)."""
    keyed = [row_messages(judge, rubric, r) for r in rows[ROW_COLUMNS].to_dict("records")]
    hits = ray.get(cache.get_many.remote([k for k, _ in keyed]))
    todo = [(k, m) for k, m in keyed if k not in hits]
    log.info("judge %s: %d of %d rows already judged (cache %s)", judge.model, len(keyed) - len(todo), len(keyed), cache_folder(judge))
    if not todo:
        return {}
    key, messages = todo[0]

    async def one() -> Outcome:
        client = JudgeClient(judge, in_flight=1)
        try:
            return await client.judge_messages(messages)
        finally:
            await client.close()

    try:
        outcome = asyncio.run(one())
    except EndpointError as err:
        raise UserError(str(err)) from None
    if outcome.score is not None:
        ray.get(cache.put_many.remote({key: _record(outcome)}))
    elif (message := no_reply(judge, "judge", outcome.reason)) is not None:
        raise UserError(message)
    return {key: outcome}


def judge(ds: "ray.data.Dataset", judge: OpenAIJudge, where: str) -> "ray.data.Dataset":
    rubric = load_rubric(judge.rubric)
    cpus = ray.cluster_resources().get("CPU", 0)
    if judge.workers * WORKER_CPUS > cpus - 1:
        raise UserError(
            f"judge.workers={judge.workers}: {judge.workers} actors of {WORKER_CPUS} CPU each leave this Ray cluster "
            f"({cpus:g} CPUs) no CPU to read the candidates with; use at most {max(1, int((cpus - 1) / WORKER_CPUS))} "
            "(one actor keeps hundreds of requests in flight: raise judge.concurrency instead)"
        )
    _check_key(judge)
    cache = _cache_actor(cache_folder(judge))
    probed = probe(judge, rubric, ds.select_columns(ROW_COLUMNS).to_pandas(), cache)
    in_flight = math.ceil(judge.concurrency / judge.workers)
    rpm = judge.max_requests_per_minute / judge.workers if judge.max_requests_per_minute else None
    return ds.map_batches(
        JudgeWorker,
        fn_constructor_kwargs={"judge": judge, "rubric": rubric, "cache": cache, "in_flight": in_flight,
                               "requests_per_minute": rpm, "probed": probed},  # fmt: skip
        compute=ray.data.ActorPoolStrategy(size=judge.workers),
        batch_size=4 * in_flight,  # few batch boundaries: each waits for its slowest row
        batch_format="pandas",
        num_cpus=WORKER_CPUS,
    )


def preflight(judge: OpenAIJudge, data: DataConfig) -> None:
    """Before any sampling: the rubric has its placeholders and the key's variable is set."""
    load_rubric(judge.rubric)
    _check_key(judge)


def _check_key(judge: OpenAIJudge) -> None:
    try:
        read_api_key(judge.api_key_env, "judge")
    except EndpointError as err:
        raise UserError(str(err)) from None
