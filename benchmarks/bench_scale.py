"""3. Scale: 10,000 waiters over 1,000 accounts.

Runs on trio with a MockClock that stands still (rate 0, no autojump): virtual time moves only
when the benchmark jumps it, so it controls exactly when polls fall due, while the timings are
wall clock (time.perf_counter) and the memory is tracemalloc's.

- dispatch pass: the waiters are queued behind an answer with no free slot; then the answer
  gains free slots, a poll falls due, and the time of the gate's one dispatch pass that follows
  the snapshot is taken by wrapping the gate's private ``_dispatch`` method (a benchmark-only
  reach into the internals: the pass has no public hook).
- memory per waiter: tracemalloc before and after the waiters queue, minus the same number of
  bare tasks waiting on an ``anyio.Event`` (what any waiting task costs without the gate).
- requests: polls made over 60 virtual seconds with no free slot, for 10 to 10,000 waiters.
- parsing: ``json.loads`` plus capgate's parser on a 1,000-account answer.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import tracemalloc
from typing import Any

import anyio
import httpx
import trio
import trio.testing

from bench_overhead import StaticServer
from capgate import CapacityGate
from capgate._models import parse_snapshot
from capgate._services import get_service

N_ACCOUNTS = 1_000
ACCOUNTS = [f"a{i:04d}@x.io" for i in range(N_ACCOUNTS)]
FULL = {"available": [], "executing": []}


def _one_free_each() -> dict[str, Any]:
    return {
        "available": [{"email": a, "maxJobs": 2, "executing": 1, "available": 1} for a in ACCOUNTS],
        "executing": [],
    }


async def _queue(
    gate: CapacityGate, waiters: int, release: anyio.Event, restrict: str | None = None
) -> None:
    async def waiter(task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with gate.slot(account=restrict):
            await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(waiters):
            tg.start_soon(waiter)


async def _dispatch_pass(waiters: int, restrict: str | None) -> dict[str, Any]:
    clock = trio.lowlevel.current_clock()
    server = StaticServer(FULL)
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handle))
    gate = CapacityGate("bench-token", service="kling", client=client, poll_interval=5.0)
    release = anyio.Event()
    passes: list[float] = []
    store = gate._engine.store  # the in-memory store: its dispatch pass is what is timed
    original = store.dispatch

    def timed(queue: Any, now: float) -> Any:
        t = time.perf_counter()
        grants = original(queue, now)
        if grants:  # the pass the poll's answer brings (empty passes before it don't count)
            passes.append(time.perf_counter() - t)
        return grants

    async with anyio.create_task_group() as tg:
        tg.start_soon(_queue, gate, waiters, release, restrict)
        await trio.testing.wait_all_tasks_blocked()
        queued = gate.statistics().waiting
        store.dispatch = timed  # type: ignore[method-assign]
        server.set(_one_free_each())
        clock.jump(10.0)  # the next poll falls due
        await trio.testing.wait_all_tasks_blocked()
        stats = gate.statistics()
        store.dispatch = original  # type: ignore[method-assign]
        tg.cancel_scope.cancel()  # the waiters left over would wait for ever
    await gate.aclose()
    await client.aclose()
    return {
        "queued": queued,
        "pass_ms": round(passes[0] * 1e3, 3),
        "grants": stats.grants,
        "requests": server.requests,
    }


async def _requests_over_time(waiters: int, seconds: float = 60.0) -> int:
    clock = trio.lowlevel.current_clock()
    server = StaticServer(FULL)
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handle))
    gate = CapacityGate("bench-token", service="kling", client=client, poll_interval=5.0)
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_queue, gate, waiters, release, None)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(int(seconds)):
            clock.jump(1.0)
            await trio.testing.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    await gate.aclose()
    await client.aclose()
    return server.requests


async def _memory(waiters: int, with_gate: bool) -> float:
    server = StaticServer(FULL)
    client = httpx.AsyncClient(transport=httpx.MockTransport(server.handle))
    gate = CapacityGate("bench-token", service="kling", client=client, poll_interval=5.0)
    release = anyio.Event()

    async def bare() -> None:
        await release.wait()

    # one waiter first so the first poll and its snapshot are not counted per waiter
    async with anyio.create_task_group() as outer:
        if with_gate:
            outer.start_soon(_queue, gate, 1, release, None)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        before = tracemalloc.take_snapshot()
        async with anyio.create_task_group() as tg:
            if with_gate:
                tg.start_soon(_queue, gate, waiters, release, None)
            else:
                for _ in range(waiters):
                    tg.start_soon(bare)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.take_snapshot()
            release.set()
            tg.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    await gate.aclose()
    await client.aclose()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / waiters


def _run_trio(fn: Any, *args: Any) -> Any:
    return trio.run(fn, *args, clock=trio.testing.MockClock())


def _parse(repeats: int) -> dict[str, Any]:
    service = get_service("ltxstudio")
    body = {
        "available": [{"email": a, "maxJobs": 5, "executing": 3, "available": 2} for a in ACCOUNTS],
        "executing": [
            {
                "jobId": f"email:{a}:{i:08x}-0000-0000-0000-000000000000-type:video",
                "email": a,
                "started": "2026-01-01T00:00:00.000Z",
                "elapsed": "01:00",
            }
            for a in ACCOUNTS
            for i in range(3)
        ],
    }
    raw = json.dumps(body).encode()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        snapshot, _ = parse_snapshot(json.loads(raw), service, requested_at=0.0, received_at=0.0)
        times.append(time.perf_counter() - t)
    assert len(snapshot.accounts) == N_ACCOUNTS
    return {
        "accounts": N_ACCOUNTS,
        "executing_rows": len(body["executing"]),
        "bytes": len(raw),
        "parse_ms": round(statistics.median(times) * 1e3, 3),
    }


def run(quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    waiters = 10_000
    repeats = 1 if quick else 3
    for case, restrict in (
        ("1,000 free, any account", None),
        ("worst: all on one account", ACCOUNTS[0]),
    ):
        results = [_run_trio(_dispatch_pass, waiters, restrict) for _ in range(repeats)]
        best = sorted(results, key=lambda r: r["pass_ms"])[len(results) // 2]
        rows.append(
            {
                "benchmark": "scale",
                "case": f"dispatch pass: {case}",
                "waiters": waiters,
                "accounts": N_ACCOUNTS,
                **best,
                "pass_ms_all": [r["pass_ms"] for r in results],
            }
        )
    tracemalloc.start()
    n = 2_000 if quick else waiters
    with_gate = _run_trio(_memory, n, True)
    bare = _run_trio(_memory, n, False)
    tracemalloc.stop()
    rows.append(
        {
            "benchmark": "scale",
            "case": "memory per waiter",
            "waiters": n,
            "bytes_per_waiter": round(with_gate),
            "bare_task_bytes": round(bare),
            "gate_bytes_per_waiter": round(with_gate - bare),
        }
    )
    counts = (10, 100, 1_000) if quick else (10, 100, 1_000, 10_000)
    rows.append(
        {
            "benchmark": "scale",
            "case": "requests in 60 s, nothing free",
            "requests_by_waiters": {str(w): _run_trio(_requests_over_time, w) for w in counts},
        }
    )
    rows.append(
        {"benchmark": "scale", "case": "parse 1,000-account answer", **_parse(20 if quick else 100)}
    )
    return rows
