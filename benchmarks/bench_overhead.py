"""2. Local overhead, wall clock: the gate's hot path beside anyio.CapacityLimiter.

No network: the gate polls an httpx.MockTransport answering a fixed body, once, and then
works from that fresh snapshot (poll_interval is an hour, so no poll is due during a round).
Both sides run in the same process and event loop, in alternating rounds; the figure is the
median round, and the headline is the ratio gate / limiter.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx

from capgate import CapacityGate

ACCOUNT = "a@x.io"
LISTED_JOB = "email:a@x.io:held-0-type:video"


class StaticServer:
    """Answers every poll with the same body and counts the requests."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.requests = 0
        self.set(body)

    def set(self, body: dict[str, Any]) -> None:
        self.content = json.dumps(body).encode()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return httpx.Response(
            200, content=self.content, headers={"content-type": "application/json"}
        )


def _gate(body: dict[str, Any]) -> tuple[CapacityGate, httpx.AsyncClient, StaticServer]:
    server = StaticServer(body)
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handle))
    gate = CapacityGate("bench-token", service="kling", client=client, poll_interval=3600.0)
    return gate, client, server


async def _acquire_release(n: int, rounds: int) -> dict[str, Any]:
    # room enough for every reservation the rounds leave counting (each released slot counts
    # until a newer snapshot, and none comes within the hour)
    room = 10**9
    gate, client, server = _gate(
        {
            "available": [{"email": ACCOUNT, "maxJobs": room, "executing": 0, "available": room}],
            "executing": [],
        }
    )
    limiter = anyio.CapacityLimiter(10)
    async with gate.slot():  # the one poll
        pass
    gate_times, limiter_times = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            async with gate.slot():
                pass
        gate_times.append((time.perf_counter() - t) / n)
        t = time.perf_counter()
        for _ in range(n):
            async with limiter:
                pass
        limiter_times.append((time.perf_counter() - t) / n)
    await gate.aclose()
    await client.aclose()
    g, lim = statistics.median(gate_times), statistics.median(limiter_times)
    # each round times both sides back to back, so the ratio is taken per round (the
    # machine's drift cancels out) and the median round reported
    ratio = statistics.median(a / b for a, b in zip(gate_times, limiter_times, strict=True))
    return {
        "gate_us": round(g * 1e6, 2),
        "limiter_us": round(lim * 1e6, 2),
        "ratio": round(ratio, 2),
        "ops_per_round": n,
        "rounds": rounds,
        "polls": server.requests,
    }


async def _churn(tasks: int, per_task: int, slots: int, rounds: int) -> dict[str, Any]:
    # The snapshot lists one job; each holder marks its slot submitted with that job's id,
    # so the reservation stops counting at once (the accounting rule's fast path) and the
    # slot goes straight to the next waiter without a poll. This isolates the gate's
    # queueing and wake-ups from polling.
    gate, client, server = _gate(
        {
            "available": [
                {"email": ACCOUNT, "maxJobs": slots + 1, "executing": 1, "available": slots}
            ],
            "executing": [{"jobId": LISTED_JOB, "email": ACCOUNT}],
        }
    )
    limiter = anyio.CapacityLimiter(slots)
    async with gate.slot() as slot:  # the one poll
        slot.mark_submitted(LISTED_JOB)
    peak = 0
    held = 0

    async def through_gate() -> None:
        nonlocal held, peak
        for _ in range(per_task):
            async with gate.slot() as slot:
                held += 1
                peak = max(peak, held)
                await anyio.lowlevel.checkpoint()
                held -= 1
                slot.mark_submitted(LISTED_JOB)

    async def through_limiter() -> None:
        for _ in range(per_task):
            async with limiter:
                await anyio.lowlevel.checkpoint()

    gate_times, limiter_times = [], []
    for _ in range(rounds):
        for worker, times in ((through_gate, gate_times), (through_limiter, limiter_times)):
            t = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(worker)
            times.append(time.perf_counter() - t)
    await gate.aclose()
    await client.aclose()
    g, lim = statistics.median(gate_times), statistics.median(limiter_times)
    ratio = statistics.median(a / b for a, b in zip(gate_times, limiter_times, strict=True))
    ops = tasks * per_task
    return {
        "tasks": tasks,
        "slots": slots,
        "acquisitions": ops,
        "gate_s": round(g, 4),
        "limiter_s": round(lim, 4),
        "gate_us_per_acquisition": round(g / ops * 1e6, 2),
        "limiter_us_per_acquisition": round(lim / ops * 1e6, 2),
        "ratio": round(ratio, 2),
        "peak_held": peak,
        "polls": server.requests,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    rows = []
    n, rounds = (5_000, 5) if quick else (20_000, 9)
    per_task, churn_rounds = (5, 3) if quick else (20, 5)
    for backend in ("asyncio", "trio"):
        micro = anyio.run(_acquire_release, n, rounds, backend=backend)
        rows.append(
            {"benchmark": "overhead", "case": "acquire+release", "backend": backend, **micro}
        )
        churn = anyio.run(_churn, 1000, per_task, 10, churn_rounds, backend=backend)
        rows.append({"benchmark": "overhead", "case": "churn", "backend": backend, **churn})
    return rows
