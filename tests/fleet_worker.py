"""A worker process for the fleet tests and benchmark (not a test module).

Usage::

    python tests/fleet_worker.py run URL REDIS NAMESPACE JOBS CONCURRENCY DURATION INTERVAL TTL
    python tests/fleet_worker.py hold URL REDIS NAMESPACE SLOTS INTERVAL TTL [EXTRA]
    python tests/fleet_worker.py pause URL REDIS NAMESPACE SLOTS DURATION INTERVAL TTL
    python tests/fleet_worker.py wait URL REDIS NAMESPACE WAITERS INTERVAL TTL

``run`` submits JOBS jobs of DURATION seconds through ``gate.submit`` with CONCURRENCY tasks
and prints one JSON line with what it saw (NAMESPACE ``-``: no store, the in-process ledger).
``hold`` takes SLOTS slots, prints ``HELD`` and sleeps with them until killed (printing
``LOST`` for each slot that reports lost), while EXTRA more tasks wait in the fleet's queue.
``pause`` runs SLOTS ``gate.submit`` calls at once; when all SLOTS slots are held (inside
``submit``, before its check of ``slot.lost``) it prints ``HELD`` and stops itself with
SIGSTOP; once continued it finishes the jobs and prints one JSON line: the statuses its
creates met and how many of the paused slots reported ``lost``.
``wait`` queues WAITERS waiters (each would create a job of DURATION 0.3 s) and waits.
``FLEET_IDLE_TTL`` sets the store's ``idle_ttl``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

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
    idle = os.environ.get("FLEET_IDLE_TTL")
    store = RedisStore(
        redis_url,
        namespace=namespace,
        lease_ttl=ttl,
        recovery_grace=None if grace is None else float(grace),
        idle_ttl=86400.0 if idle is None else float(idle),
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
            async with gate.slot(timeout=3600) as slot:
                ready += 1
                if ready == slots:
                    print("HELD", flush=True)
                    all_in.set()
                while not slot.lost:  # noqa: ASYNC110 - a property, with no event to wait on
                    await anyio.sleep(0.05)
                print("LOST", flush=True)
                await anyio.sleep(3600)

        for _ in range(slots):
            tg.start_soon(holder)
        await all_in.wait()
        for _ in range(extra):  # queued behind the holders; they die with the process
            tg.start_soon(holder)


def _pausing(gate: CapacityGate, slots: int) -> dict[str, int]:
    """Wrap ``gate.slot`` (what ``gate.submit`` calls): the first ``slots`` slots stop the
    process once all are held, then count how many report ``lost``."""
    real_slot = gate.slot
    seen = {"entered": 0, "lost": 0}
    all_in = anyio.Event()

    class Pausing:
        def __init__(self, request: Any) -> None:
            self.request = request

        async def __aenter__(self) -> Any:
            slot = await self.request.__aenter__()
            if seen["entered"] < slots:
                seen["entered"] += 1
                if seen["entered"] == slots:
                    print("HELD", flush=True)
                    os.kill(os.getpid(), signal.SIGSTOP)  # every thread stops here
                    all_in.set()
                await all_in.wait()
                seen["lost"] += slot.lost
            return slot

        async def __aexit__(self, *exc: Any) -> Any:
            return await self.request.__aexit__(*exc)

    gate.slot = lambda *args, **kwargs: Pausing(real_slot(*args, **kwargs))  # type: ignore[method-assign]
    return seen


async def pause(
    url: str,
    redis_url: str,
    namespace: str,
    slots: int,
    duration: float,
    interval: float,
    ttl: float,
) -> None:
    gate = _gate(url, redis_url, namespace, interval, ttl)
    seen = _pausing(gate, slots)
    create_url = url.replace("/scheduler/available", "/jobs")
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(timeout=10) as client:

        async def create(account: str) -> httpx.Response:
            response = await client.post(
                create_url,
                json={"email": account, "duration": duration},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            return response

        async with anyio.create_task_group() as tg:
            for _ in range(slots):
                tg.start_soon(lambda: gate.submit(create, timeout=30, max_attempts=5))
    await gate.aclose()
    print(json.dumps({"statuses": statuses, "lost": seen["lost"]}), flush=True)


async def wait(
    url: str, redis_url: str, namespace: str, waiters: int, interval: float, ttl: float
) -> None:
    gate = _gate(url, redis_url, namespace, interval, ttl)

    async def waiter() -> None:
        async with gate.slot(timeout=3600):
            await anyio.sleep(3600)

    async with anyio.create_task_group() as tg:
        for _ in range(waiters):
            tg.start_soon(waiter)


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
    elif mode == "pause":
        slots, duration, interval, ttl = rest
        anyio.run(
            pause,
            url,
            redis_url,
            namespace,
            int(slots),
            float(duration),
            float(interval),
            float(ttl),
        )
    elif mode == "wait":
        waiters, interval, ttl = rest
        anyio.run(wait, url, redis_url, namespace, int(waiters), float(interval), float(ttl))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
