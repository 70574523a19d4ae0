"""A worker process for the fleet tests and benchmark (not a test module).

Usage::

    python tests/fleet_worker.py run URL REDIS NAMESPACE JOBS CONCURRENCY DURATION INTERVAL TTL
    python tests/fleet_worker.py hold URL REDIS NAMESPACE SLOTS INTERVAL TTL [EXTRA]

``run`` submits JOBS jobs of DURATION seconds through ``gate.submit`` with CONCURRENCY tasks
and prints one JSON line with what it saw (NAMESPACE ``-``: no store, the in-process ledger).
``hold`` takes SLOTS slots, prints ``HELD`` and sleeps with them until killed, while EXTRA
more tasks wait in the fleet's queue.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import anyio
import httpx
import structlog

from capgate import CapacityGate
from capgate.redis import RedisStore

TOKEN = "fake-token"


def _gate(url: str, redis_url: str, namespace: str, interval: float, ttl: float) -> CapacityGate:
    if namespace == "-":  # the in-process ledger, as a baseline
        return CapacityGate(TOKEN, url=url, poll_interval=interval, jitter=0.0)
    # FLEET_GRACE shortens the recovery grace where no restart happens (the benchmark)
    grace = os.environ.get("FLEET_GRACE")
    store = RedisStore(
        redis_url,
        namespace=namespace,
        lease_ttl=ttl,
        recovery_grace=None if grace is None else float(grace),
    )
    return CapacityGate(TOKEN, url=url, poll_interval=interval, jitter=0.0, store=store)


async def run(
    url: str,
    redis_url: str,
    namespace: str,
    jobs: int,
    concurrency: int,
    duration: float,
    interval: float,
    ttl: float,
) -> None:
    gate = _gate(url, redis_url, namespace, interval, ttl)
    create_url = url.replace("/scheduler/available", "/jobs")
    statuses: dict[int, int] = {}
    started = time.monotonic()
    queue = list(range(jobs))
    waits: list[float] = []
    async with httpx.AsyncClient(timeout=10) as client:

        async def create(account: str) -> httpx.Response:
            return await client.post(
                create_url,
                json={"email": account, "duration": duration},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )

        async def worker() -> None:
            while queue:
                queue.pop()
                t0 = time.monotonic()
                response = await gate.submit(create, max_attempts=20)
                waits.append(time.monotonic() - t0)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    elapsed = time.monotonic() - started
    stats = gate.statistics()
    await gate.aclose()
    print(
        json.dumps(
            {
                "done": statuses.get(200, 0),
                "statuses": statuses,
                "elapsed": elapsed,
                "mean_wait": sum(waits) / max(1, len(waits)),
                "grants": stats.grants,
            }
        ),
        flush=True,
    )


async def hold(
    url: str, redis_url: str, namespace: str, slots: int, interval: float, ttl: float, extra: int
) -> None:
    gate = _gate(url, redis_url, namespace, interval, ttl)
    async with anyio.create_task_group() as tg:
        ready = 0
        all_in = anyio.Event()

        async def holder() -> None:
            nonlocal ready
            async with gate.slot(timeout=3600):
                ready += 1
                if ready == slots:
                    print("HELD", flush=True)
                    all_in.set()
                await anyio.sleep(3600)

        for _ in range(slots):
            tg.start_soon(holder)
        await all_in.wait()
        for _ in range(extra):  # queued behind the holders; they die with the process
            tg.start_soon(holder)


def main(argv: list[str]) -> None:
    # stdout carries the result; the library's warnings go to stderr
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    mode, url, redis_url, namespace, *rest = argv
    if mode == "run":
        jobs, concurrency, duration, interval, ttl = rest
        anyio.run(
            run,
            url,
            redis_url,
            namespace,
            int(jobs),
            int(concurrency),
            float(duration),
            float(interval),
            float(ttl),
        )
    elif mode == "hold":
        slots, interval, ttl, *extra = rest
        anyio.run(
            hold,
            url,
            redis_url,
            namespace,
            int(slots),
            float(interval),
            float(ttl),
            int(extra[0]) if extra else 0,
        )
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
