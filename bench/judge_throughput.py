"""Judge throughput: the OpenAI rubric judge's own path against a fake OpenAI server in its own process.

    .venv/bin/python bench/judge_throughput.py [--latency 0.2] [--concurrency 16 64 256]
        [--rows-per-slot 20] [--min-rows 400] [--repeat 1] [--fault-rows 1000] [--fault-rate 0.3] [--quick]

What is measured, in one local Ray cluster (`ray.init(num_cpus=2)`, started once):

- **throughput**: for each concurrency C, `stages.judge.run(cfg, {"sample": folder}, out)` (Ray Data
  read → `JudgeWorker` async actor pool + the SQLite cache actor → Parquet) over max(min_rows,
  rows_per_slot·C) candidates, every row a cache miss (a fresh `cache_dir` per call). The server
  answers every request after `latency` seconds, no faults. The judging time is the server's: from
  the first pool request's arrival to the last reply (the driver's `probe` request, sent before the
  pool starts, is left out). requests/s = pool requests / that span; ideal = C / latency; the target
  is ≥ 0.8 × ideal. Also: the whole call's wall time (Ray Data start-up, probe, Parquet write and
  read-back included), the server's peak of requests open at once (`max_in_flight`), the mean open
  over the span (Σ request durations / span, Little's law), the share of the span with all C open
  (`full_share`), the rate over the middle 80% of replies, and CPU% of each process during the span.
- **faults**: `fault_rows` candidates against a second server that fails `fault_rate` of first
  tries (429 with Retry-After, 500, stalls past the client's timeout, 200 with a non-JSON body,
  dropped connections; which row and how is a hash of the row). Checks: every row out once (unique
  (prompt_id, candidate_id)), each scored or unscored with a reason, each score equal to its row's
  `<score=N>` marker, and the tries the rows report equal the requests the server saw.

The server is `tests/fakes/openai_server.py`'s `FakeOpenAI` in a child process (this script re-runs
itself with `--serve`), so its CPU is not the judge's; the child adds one route, `GET /bench/log`,
with each request's arrival and reply times (`time.monotonic()`, which Linux keeps system-wide, so
the driver compares them with its own CPU samples). CPU% is per process, polled every 0.25 s with
psutil over the driver's process tree (the driver's share includes this poller): 100% = one core.
The machine's 1-min load average is sampled too: on a shared machine, compare runs of similar load.
Prints a table per part and one JSON line (`JUDGE_THROUGHPUT_RESULT {...}`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench/` is run as a script: the repo's packages from the root

RESULT_PREFIX = "JUDGE_THROUGHPUT_RESULT "
KEY_ENV = "JUDGE_BENCH_API_KEY"
KEY = "sk-bench-7f3e9a1c"  # the fake server's key; a bench value, not a secret
MODEL = "judge-model"
RUBRIC = str(ROOT / "configs" / "rubrics" / "math_1to5.txt")
TARGET = 0.8  # of the ideal C / latency
_MARKER = re.compile(r"<score=(\d)>")


# ── the fake server, in its own process ─────────────────────────────────────────────────────────
def serve(settings: dict) -> None:
    """`FakeOpenAI` with `GET /bench/log`: [attempt, outcome, t_start, t_end] per request."""

    from aiohttp import web

    from tests.fakes.openai_server import FakeOpenAI, serve_until_signalled

    class BenchServer(FakeOpenAI):
        def make_app(self) -> web.Application:
            app = super().make_app()

            async def log(request: web.Request) -> web.Response:
                return web.json_response([[r.attempt, r.outcome, r.t_start, r.t_end] for r in self.requests])

            app.router.add_get("/bench/log", log)
            return app

    serve_until_signalled(BenchServer(MODEL, KEY, **settings))


class Server:
    """This script's `--serve` child; `base_url`, `stats()`, `log()`, `reset()`."""

    def __init__(self, **settings):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(settings)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise SystemExit(f"the fake server did not start (said {line!r})")
        self.base_url = line.split()[-1]
        self._root = self.base_url.removesuffix("/v1")

    def _call(self, path: str, method: str = "GET"):
        with urllib.request.urlopen(urllib.request.Request(self._root + path, method=method), timeout=30) as reply:
            return json.loads(reply.read())

    def stats(self) -> dict:
        return self._call("/stats")

    def log(self) -> list[list]:
        return self._call("/bench/log")

    def reset(self) -> None:
        self._call("/reset", "POST")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


# ── CPU of every process in the tree, over time ─────────────────────────────────────────────────
def _role(proc, named: dict[int, str]) -> str | None:
    """What a process of the tree is; None for an idle Ray worker (it may become an actor later)."""
    if proc.pid in named:
        return named[proc.pid]
    if proc.name() in ("raylet", "gcs_server"):
        return "raylet" if proc.name() == "raylet" else "gcs"
    title = (proc.cmdline() or [""])[0]  # a Ray worker's title: ray::<actor>[.<method>], ray::IDLE
    if not title.startswith("ray::"):
        return "other ray"
    if "JudgeWorker" in title:
        return "judge actor"
    if "JudgeCache" in title:
        return "cache actor"
    return None if title.startswith("ray::IDLE") else "other ray"


class CPUMonitor:
    """Every 0.25 s: (time.monotonic(), {(pid, create_time): cpu seconds}); roles by process title
    (a Ray worker's title names its actor once it has one)."""

    def __init__(self, named: dict[int, str]):
        import psutil

        self._psutil, self._me = psutil, os.getpid()
        self._named = {self._me: "driver"} | named
        self.samples: list[tuple[float, dict]] = []
        self.loads: list[tuple[float, float]] = []  # (time, 1-min load average of the whole machine)
        self.roles: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            root = self._psutil.Process(self._me)
            cpu = {}
            for proc in [root, *root.children(recursive=True)]:
                try:
                    with proc.oneshot():
                        key = (proc.pid, proc.create_time())
                        times = proc.cpu_times()
                        role = _role(proc, self._named)
                except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                    continue
                cpu[key] = times.user + times.system
                if role is not None and self.roles.get(key, "other ray") == "other ray":  # an actor's role sticks
                    self.roles[key] = role
            self.samples.append((time.monotonic(), cpu))
            self.loads.append((time.monotonic(), os.getloadavg()[0]))

    def percent(self, start: float, end: float) -> dict[str, float]:
        """CPU% by role between the last sample before `start` and the first after `end`."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        (t0, cpu0), (t1, cpu1) = before[-1], after[0]
        by_role: dict[str, float] = defaultdict(float)
        for key, seconds in cpu1.items():
            by_role[self.roles.get(key, "other ray")] += seconds - cpu0.get(key, 0.0)
        ranked = sorted(by_role.items(), key=lambda kv: -kv[1])
        return {role: round(100 * s / max(t1 - t0, 1e-9), 1) for role, s in ranked}

    def load(self, start: float, end: float) -> dict[str, float]:
        during = [load for t, load in self.loads if start <= t <= end] or [self.loads[-1][1]]
        return {"mean": round(sum(during) / len(during), 2), "max": round(max(during), 2)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ── candidates and one judge call ────────────────────────────────────────────────────────────────
def candidate_rows(count: int, per_prompt: int = 8) -> list[dict]:
    """Rows shaped like the sample stage's; each response carries `<score=N>` (N cycles 1,3,5,2,4 and
    shifts every 5 rows), the score the server gives it."""
    rows = []
    for i in range(count):
        p, c = divmod(i, per_prompt)
        score = 1 + (i * 7 + i // 5) % 5
        rows.append({
            "prompt_id": f"p{p:05d}", "candidate_id": c, "prompt": f"What is {p} + 1?",
            "messages": [{"role": "user", "content": f"What is {p} + 1?"}], "solution": f"{p} + 1 = {p + 1}",
            "answer": str(p + 1), "response": f"Try {c}: {p} + 1 = {p + c}. The answer is {p + c}. <score={score}>",
            "prompt_token_ids": [1, 2], "response_token_ids": [3, 4], "prompt_tokens": 2, "response_tokens": 2,
            "finish_reason": "stop", "sampler": "vllm", "model": "hand-written", "seed": 0,
        })  # fmt: skip
    return rows


def judge_call(server: Server, rows: list[dict], tmp: Path, name: str, **judge) -> tuple:
    """`stages.judge.run` over `rows` with a fresh cache: (output frame, stats, wall seconds, server log)."""
    import pandas as pd

    import stages.judge
    from pipeline.config import RunConfig
    from stages.sample.candidates import CANDIDATE_COLUMNS

    sample, out = tmp / name / "sample", tmp / name / "judge"
    sample.mkdir(parents=True)
    out.mkdir()
    pd.DataFrame(rows, columns=list(CANDIDATE_COLUMNS)).to_parquet(sample / "candidates-0.parquet", index=False)
    cfg = RunConfig(judge={"type": "openai", "model": MODEL, "base_url": server.base_url, "api_key_env": KEY_ENV,
                           "rubric": RUBRIC, "cache_dir": str(tmp / name / "cache")} | judge)  # fmt: skip
    server.reset()
    start = time.perf_counter()
    stats = stages.judge.run(cfg, {"sample": str(sample)}, out)
    wall = time.perf_counter() - start
    frame = pd.read_parquet(out)
    return frame, stats, wall, server.log()


def throughput(server: Server, cpu: CPUMonitor, tmp: Path, concurrency: int, rows: int, latency: float) -> dict:
    frame, stats, wall, log = judge_call(server, candidate_rows(rows), tmp, f"c{concurrency}", concurrency=concurrency)
    if len(frame) != rows or stats["scored"] != rows:  # no faults here: every row must come back scored
        raise SystemExit(f"C={concurrency}: {len(frame)} of {rows} rows came back, {stats['scored']} scored: {stats}")
    log.sort(key=lambda r: r[2])
    pool = log[1:]  # the first request is the driver's probe, sent before Ray Data starts the pool
    start, end = pool[0][2], max(r[3] for r in pool)
    span = end - start
    ends = sorted(r[3] for r in pool)
    lo, hi = ends[len(ends) // 10], ends[(len(ends) * 9) // 10]
    rate = len(pool) / span
    ideal = concurrency / latency
    cpu_percent = cpu.percent(start, end)
    return {
        "concurrency": concurrency, "rows": rows, "requests": len(log), "wall_s": round(wall, 2),
        "span_s": round(span, 3), "req_per_s": round(rate, 1), "ideal_req_per_s": round(ideal, 1),
        "ratio": round(rate / ideal, 3), "pass": rate >= TARGET * ideal,
        "middle80_req_per_s": round((len(ends) * 8 // 10) / (hi - lo), 1),
        "max_in_flight": server.stats()["max_in_flight"],
        "mean_in_flight": round(sum(r[3] - r[2] for r in pool) / span, 1),
        "mean_request_s": round(sum(r[3] - r[2] for r in pool) / len(pool), 4),
        "full_share": round(_share_at(pool, concurrency, start, end), 3),
        "cpu_percent": cpu_percent,
        "client_cpu_ms_per_req": round(10 * sum(v for k, v in cpu_percent.items() if "server" not in k) / rate, 2),
        "judge_actor_cpu_ms_per_req": round(10 * cpu_percent.get("judge actor", 0.0) / rate, 2),
        "loadavg1_during": cpu.load(start, end),
    }  # fmt: skip


def _share_at(requests: list[list], level: int, start: float, end: float) -> float:
    """Share of [start, end] during which at least `level` requests were open at the server."""
    events = sorted([(r[2], 1) for r in requests] + [(r[3], -1) for r in requests])
    open_, since, at_level = 0, start, 0.0
    for t, step in events:
        if open_ >= level:
            at_level += t - since
        open_, since = open_ + step, t
    return at_level / (end - start)


def faults(server: Server, tmp: Path, count: int, concurrency: int, timeout: float) -> dict:
    import pandas as pd

    rows = candidate_rows(count)
    judge = {"concurrency": concurrency, "timeout": timeout, "backoff_base": 0.1, "backoff_max": 2.0}
    frame, stats, wall, log = judge_call(server, rows, tmp, "faults", **judge)
    ids = list(zip(frame["prompt_id"], frame["candidate_id"]))
    expected = {(r["prompt_id"], r["candidate_id"]): r for r in rows}
    wrong = [  # a row whose response is not its own, or whose score is not its own marker's
        (r.prompt_id, r.candidate_id) for r in frame.itertuples()
        if r.response != expected[r.prompt_id, r.candidate_id]["response"]
        or (not pd.isna(r.score) and int(r.score) != int(_MARKER.search(r.response).group(1)))
    ]  # fmt: skip
    unscored = frame[frame["score"].isna()]
    first_tries = Counter(r[1] for r in log if r[0] == 1)
    checks = {
        "rows_out_equal_rows_in": len(frame) == count,
        "none_lost": set(ids) == set(expected),
        "none_duplicated": len(set(ids)) == len(ids),
        "every_row_its_own_response_and_score": not wrong,
        "every_unscored_row_has_a_reason": bool((unscored["score_reason"].str.len() > 0).all()),
        "row_tries_equal_server_requests": int(frame["judge_tries"].sum()) == len(log),
    }
    return {
        "rows_in": count, "rows_out": len(frame), "unique_ids": len(set(ids)), "scored": stats["scored"],
        "unscored": stats["unscored"], "unscored_reasons": stats["unscored_reasons"], "wrong_scores": len(wrong),
        "retried_rows": stats["retried"], "row_tries": int(frame["judge_tries"].sum()), "server_requests": len(log),
        "first_try_outcomes": dict(first_tries), "later_try_outcomes": dict(Counter(r[1] for r in log if r[0] > 1)),
        "max_tries": int(frame["judge_tries"].max()), "wall_s": round(wall, 2), "judge": judge, "checks": checks,
        "pass": all(checks.values()),
    }  # fmt: skip


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ── report ──────────────────────────────────────────────────────────────────────────────────────
def print_throughput(results: list[dict], latency: float) -> None:
    print(f"\nthroughput at {latency * 1000:g} ms server latency, no faults, workers=1, fresh cache per call")
    head = ("C", "rows", "req/s", "ideal", "ratio", f"≥ {TARGET}", "mid-80% req/s", "max open", "mean open",
            "time at C open", "judging s", "call wall s", "client CPU ms/req")  # fmt: skip
    print(" | ".join(head))
    for r in results:
        verdict = "PASS" if r["pass"] else "FAIL"
        print(" | ".join(str(x) for x in (
            r["concurrency"], r["rows"], r["req_per_s"], r["ideal_req_per_s"], r["ratio"], verdict,
            r["middle80_req_per_s"], r["max_in_flight"], r["mean_in_flight"], f"{100 * r['full_share']:.0f}%",
            r["span_s"], r["wall_s"], r["client_cpu_ms_per_req"],
        )))  # fmt: skip
    print("CPU% during the judging span (100 = one core):")
    for r in results:
        print(f"  C={r['concurrency']}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_percent"].items())
              + f"; machine 1-min load average {r['loadavg1_during']}")


def print_faults(f: dict) -> None:
    print(f"\n{f['rows_in']} candidates, {f['first_try_outcomes']} on first tries; judge {f['judge']}")
    for key in ("rows_out", "unique_ids", "scored", "unscored", "unscored_reasons", "wrong_scores", "retried_rows",
                "max_tries", "row_tries", "server_requests", "later_try_outcomes", "wall_s"):  # fmt: skip
        print(f"  {key}: {f[key]}")
    for name, ok in f["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--rows-per-slot", type=int, default=20, help="rows = max(min_rows, this x concurrency)")
    parser.add_argument("--min-rows", type=int, default=400)
    parser.add_argument("--fault-rows", type=int, default=1000, help="0 skips the fault part")
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--fault-concurrency", type=int, default=64)
    parser.add_argument("--fault-timeout", type=float, default=2.0, help="the judge's timeout; stalls last 5x this")
    parser.add_argument("--repeat", type=int, default=1, help="run the throughput part this many times")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: concurrency 16 64, 5 rows per slot (at least 100), 200 fault rows; too few "
                        "rows for the 0.8 verdict (start-up and the last wave weigh too much)")  # fmt: skip
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(json.loads(args.serve))
    if args.quick:  # new defaults; flags given on the command line still win
        parser.set_defaults(concurrency=[16, 64], rows_per_slot=5, min_rows=100, fault_rows=200)
        args = parser.parse_args()

    os.environ[KEY_ENV] = KEY  # before ray.init: Ray workers inherit the environment of the cluster's start
    import ray

    servers = {"fake server": Server(latency=args.latency)}
    if args.fault_rows:
        servers["fault server"] = Server(latency=args.latency, fault_rate=args.fault_rate, retry_after="0.5",
                                         stall=5 * args.fault_timeout, seed=1)  # fmt: skip
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    ray_init_s = time.perf_counter() - start
    cpu = CPUMonitor({server.proc.pid: role for role, server in servers.items()})
    result: dict = {"latency_s": args.latency, "cpus": os.cpu_count(), "ray_init_s": round(ray_init_s, 2),
                    "versions": {"ray": ray.__version__, "openai": _version("openai")},
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()], "throughput": []}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="judge-throughput-") as tmp:
            for rep in range(args.repeat):
                for c in args.concurrency:
                    rows = max(args.min_rows, args.rows_per_slot * c)
                    run = throughput(servers["fake server"], cpu, Path(tmp) / f"rep{rep}", c, rows, args.latency)
                    result["throughput"].append(run)
                    print(f"C={c}: {run}", file=sys.stderr, flush=True)
            if args.fault_rows:
                result["faults"] = faults(servers["fault server"], Path(tmp), args.fault_rows,
                                          args.fault_concurrency, args.fault_timeout)  # fmt: skip
    finally:
        cpu.stop()
        ray.shutdown()
        for server in servers.values():
            server.stop()
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_throughput(result["throughput"], args.latency)
    if "faults" in result:
        print_faults(result["faults"])
    print(RESULT_PREFIX + json.dumps(result), flush=True)

if __name__ == "__main__":
    main()
