"""4. Real loopback HTTP: the simulator under uvicorn on 127.0.0.1, capgate over real sockets.

Wall clock, so the job durations and poll interval are scaled down (seconds instead of
minutes). The client side runs on asyncio in the main thread, the server in uvicorn's own
thread and loop; both read the same monotonic clock, so the fake's job times line up with
the client's.

- run: 200 workers push the jobs through ``capgate.simulation.run_scenario`` (the same
  capgate dispatcher as the virtual-time rows) and the fake counts every request.
- CPU per poll: ``gate.refresh()`` in a loop with nothing else running, measured with
  ``time.thread_time()`` of the client thread (request, response, parse, dispatch).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx

from capgate import CapacityGate
from capgate.simulation import Scenario, run_scenario, simulate
from capgate.testing import FakeScheduler, serve


def scenario(quick: bool) -> Scenario:
    return Scenario(
        name="loopback",
        accounts=(5,) * 20,
        jobs=200 if quick else 400,
        duration=(1.0, 4.0),
        poll_interval=0.25,
        workers=200,
        seed=1,
    )


async def _main(sc: Scenario, polls: int, oracle: float) -> dict[str, Any]:
    fake = FakeScheduler(
        dict(zip(sc.account_names, sc.accounts, strict=True)),
        service=sc.service,
        seed=sc.seed,
        job_duration=sc.duration,
    )
    with serve(fake) as url:
        # drop idle connections before uvicorn does (its keep-alive is 5 s): a worker that
        # waited longer for a slot would otherwise send its create on a connection the
        # server is closing, and httpx does not retry a POST that met a reset
        limits = httpx.Limits(
            max_connections=256, max_keepalive_connections=256, keepalive_expiry=2.0
        )
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
            cpu = time.thread_time()
            wall = time.perf_counter()
            result = await run_scenario(sc, "capgate", fake=fake, client=client, url=url)
            run_cpu = time.thread_time() - cpu
            run_wall = time.perf_counter() - wall

            gate = CapacityGate(fake.token, service=sc.service, url=url, client=client)
            await gate.refresh()  # connection warm
            cpu = time.thread_time()
            wall = time.perf_counter()
            for _ in range(polls):
                await gate.refresh()
            poll_cpu = (time.thread_time() - cpu) / polls
            poll_wall = (time.perf_counter() - wall) / polls
            await gate.aclose()
    return {
        "benchmark": "loopback",
        "scenario": sc.name,
        "dispatcher": result.dispatcher,
        "accounts": len(sc.accounts),
        "workers": sc.workers,
        "jobs": result.jobs,
        "poll_interval": sc.poll_interval,
        "makespan": round(result.makespan, 3),
        "ideal_makespan": round(result.ideal_makespan, 3),
        "oracle_makespan": round(oracle, 3),
        "makespan_ratio": round(result.makespan / oracle, 4),
        "utilisation": round(result.utilisation, 4),
        "polls": result.polls,
        "requests": result.requests,
        "requests_per_job": round(result.requests_per_job, 3),
        "rejected_429": result.rejected_429,
        "client_cpu_s": round(run_cpu, 3),
        "client_cpu_ms_per_job": round(run_cpu / result.jobs * 1e3, 3),
        "wall_s": round(run_wall, 3),
        "poll_cpu_ms": round(poll_cpu * 1e3, 3),
        "poll_wall_ms": round(poll_wall * 1e3, 3),
        "poll_samples": polls,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    sc = scenario(quick)
    # the bound: the oracle on the same seeded jobs, in virtual time (it needs the fake's
    # state in-process, which a real server in another thread does not offer safely)
    oracle = simulate(sc, "oracle", oracle=False).makespan
    return [anyio.run(_main, sc, 50 if quick else 200, oracle, backend="asyncio")]
