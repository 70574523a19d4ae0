"""Fleet mode: many processes sharing one gate through Redis, in real time.

Two measurements, printed as tables and written as JSON:

1. **Processes.** 1, 4 and 16 OS processes (``tests/fleet_worker.py``) submit the same
   total load (JOBS jobs of DURATION s, CONCURRENCY tasks in all, split over the processes)
   through fleet gates against one ``capgate.testing.FakeScheduler`` served over loopback HTTP
   and one Redis. Reported: jobs done, 429s, scheduler requests per job (polls and creates
   over jobs), polls per poll interval over the run, and slot utilisation (busy slot-seconds
   over capacity x makespan, makespan from the first poll to the last job's end). The
   first row is the baseline: one process with the in-process ledger (no Redis).
2. **Grant cost.** In this one process, on asyncio: one grant and release (``async with
   gate.slot(): pass``) on a fresh snapshot with room, through the in-process ledger and
   through Redis, in the same run; reported in microseconds and as a ratio.

Run (needs Redis; CAPGATE_REDIS_URL, default redis://127.0.0.1:6379/15)::

    .venv/bin/python benchmarks/fleet.py [--quick] [--json benchmarks/results/fleet.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import redis
import structlog

from capgate import CapacityGate
from capgate.redis import RedisStore
from capgate.testing import FakeScheduler, serve

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "fleet_worker.py"
REDIS_URL = os.environ.get("CAPGATE_REDIS_URL", "redis://127.0.0.1:6379/15")
ACCOUNTS = {"a@x.io": 5, "b@x.io": 3, "c@x.io": 2}


def _cleanup(namespace: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def processes_row(
    n: int, jobs: int, concurrency: int, duration: float, interval: float, *, fleet: bool = True
) -> dict[str, Any]:
    """One run of ``n`` worker processes sharing the load (``fleet=False``: no store)."""
    namespace = f"capgate-bench-{uuid.uuid4().hex[:10]}" if fleet else "-"
    fake = FakeScheduler(ACCOUNTS, job_duration=duration)
    per_jobs = [jobs // n + (1 if i < jobs % n else 0) for i in range(n)]
    per_tasks = [max(1, concurrency // n + (1 if i < concurrency % n else 0)) for i in range(n)]
    try:
        with serve(fake) as url:
            procs = [
                subprocess.Popen(  # noqa: S603 - our own worker script
                    [
                        sys.executable,
                        str(WORKER),
                        "run",
                        url,
                        REDIS_URL,
                        namespace,
                        str(per_jobs[i]),
                        str(per_tasks[i]),
                        str(duration),
                        str(interval),
                        "10",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "FLEET_GRACE": "0.3"},  # no restarts here
                )
                for i in range(n)
            ]
            results = []
            for proc in procs:
                out, err = proc.communicate(timeout=600)
                if proc.returncode != 0:
                    raise RuntimeError(f"worker failed: {err[-2000:]}")
                results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        _cleanup(namespace)
    ours = [j for j in fake.jobs.values() if not j.outside]
    start = min(fake.poll_times)
    end = max(j.end for j in ours)
    makespan = end - start
    busy = sum(j.end - j.start for j in ours)
    capacity = sum(ACCOUNTS.values())
    return {
        "store": "redis" if fleet else "in-process",
        "processes": n,
        "jobs": jobs,
        "done": sum(r["done"] for r in results),
        "429s": fake.rejected_429,
        "polls": fake.polls,
        "requests_per_job": round(fake.requests / jobs, 3),
        "polls_per_job": round(fake.polls / jobs, 3),
        "polls_per_interval": round(fake.polls / (makespan / interval), 3),
        "makespan_s": round(makespan, 2),
        "ideal_s": round(jobs * duration / capacity, 2),
        "utilisation": round(busy / (capacity * makespan), 3),
        "mean_wait_s": round(sum(r["mean_wait"] for r in results) / n, 3),
    }


async def _grant_loop(gate: CapacityGate, n: int) -> float:
    async with gate.slot():  # first grant polls; not timed
        pass
    t0 = time.perf_counter()
    for _ in range(n):
        async with gate.slot():
            pass
    return (time.perf_counter() - t0) / n


async def grant_cost(n: int) -> dict[str, Any]:
    """Microseconds per grant and release, in-process ledger vs Redis, same run."""
    fake = FakeScheduler({"a@x.io": 10 * n + 100})
    namespace = f"capgate-bench-{uuid.uuid4().hex[:10]}"
    results: dict[str, float] = {}
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        service = fake.spec.name
        local = CapacityGate(fake.token, service=service, client=client, poll_interval=3600)
        store = RedisStore(REDIS_URL, namespace=namespace, recovery_grace=0)
        fleet = CapacityGate(
            fake.token, service=service, client=client, poll_interval=3600, store=store
        )
        try:
            for _ in range(3):  # interleaved rounds; the best of each is kept
                for name, gate in (("in_process", local), ("redis", fleet)):
                    cost = await _grant_loop(gate, n)
                    results[name] = min(results.get(name, cost), cost)
        finally:
            await local.aclose()
            await fleet.aclose()
            _cleanup(namespace)
    return {
        "in_process_us": round(results["in_process"] * 1e6, 1),
        "redis_us": round(results["redis"] * 1e6, 1),
        "ratio": round(results["redis"] / results["in_process"], 1),
        "grants": n,
    }


def machine() -> dict[str, Any]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        server = client.info("server").get("redis_version")
    finally:
        client.close()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_server": server,
        "redis_py": redis.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # the library logs every grant at debug level; printing them would be the benchmark
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    jobs, duration, interval = (60, 0.4, 0.25) if args.quick else (160, 0.5, 0.25)
    concurrency = 32
    info = machine()
    print(f"# fleet benchmark: {json.dumps(info)}")
    print(
        f"# {jobs} jobs of {duration} s, {concurrency} tasks in all, accounts "
        f"{ACCOUNTS} ({sum(ACCOUNTS.values())} slots), poll_interval {interval} s"
    )
    rows = [processes_row(1, jobs, concurrency, duration, interval, fleet=False)]
    rows += [processes_row(n, jobs, concurrency, duration, interval) for n in (1, 4, 16)]
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    cost = anyio.run(grant_cost, 300 if args.quick else 1000)
    print(
        f"grant+release: in-process {cost['in_process_us']} us, redis {cost['redis_us']} us, "
        f"ratio {cost['ratio']}x ({cost['grants']} grants, best of 3)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": info, "processes": rows, "grant_cost": cost}, indent=2)
        )


if __name__ == "__main__":
    main()
