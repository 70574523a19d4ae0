"""The async gate from other threads: a webhook handler in a worker thread, a metrics scrape.

``invalidate``, ``quarantine``, ``restore`` and a slot's ``mark_submitted``/``mark_busy`` run
on the gate's event loop whatever thread calls them, as promptly as from inside it. Real
time on both backends: a plain thread is invisible to trio's virtual clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

from capgate import AccountQuarantined

pytestmark = pytest.mark.anyio

A = "a@x.io"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends, on real clocks."""
    return str(request.param)


def in_thread(delay: float, fn: Callable[[], Any]) -> threading.Thread:
    """Call ``fn`` from a plain thread (not anyio's) after ``delay`` seconds."""

    def run() -> None:
        time.sleep(delay)
        fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_invalidate_from_a_plain_thread_wakes_a_waiter_at_once(make_gate):
    """poll_interval=30, a job ends at 0.3 s, invalidate() from a thread at 0.5 s: a slot by 2 s.

    Regression: from a thread the gate found no event loop and silently did nothing, so the
    waiter saw the free slot only at the next poll, 30 s later.
    """
    gate, fake = make_gate({A: 1}, poll_interval=30.0)
    fake.add_outside_job(A, duration=0.3)
    started = anyio.current_time()
    thread = in_thread(0.5, gate.invalidate)
    with anyio.fail_after(5):
        async with gate.slot() as slot:
            waited = anyio.current_time() - started
    await anyio.to_thread.run_sync(thread.join)
    assert slot.account == A
    assert 0.5 <= waited < 2.0
    assert fake.polls == 2


async def test_mark_submitted_from_a_plain_thread_settles_the_slot(make_gate):
    """A slot handed to a worker thread is marked submitted there, with no NoEventLoopError."""
    gate, _ = make_gate({A: 2})
    errors: list[BaseException] = []
    async with gate.slot() as slot:

        def submit() -> None:
            try:
                slot.mark_submitted("job-1")
            except BaseException as exc:  # noqa: BLE001 - the test asserts on it
                errors.append(exc)

        await anyio.to_thread.run_sync(in_thread(0.0, submit).join)
        assert errors == []
        assert slot.submitted
        assert gate.statistics().held == 0


async def test_quarantine_from_a_plain_thread_fails_its_waiters_at_once(make_gate):
    """quarantine() from a thread reaches the loop: a waiter for that account fails at once."""
    gate, fake = make_gate({A: 1}, poll_interval=30.0)
    fake.add_outside_job(A, duration=60)
    started = anyio.current_time()
    thread = in_thread(0.3, lambda: gate.quarantine(A, seconds=600, reason="HTTP 596"))
    with anyio.fail_after(5), pytest.raises(AccountQuarantined):
        async with gate.slot(account=A):
            pytest.fail("granted on a full, quarantined account")
    await anyio.to_thread.run_sync(thread.join)
    assert anyio.current_time() - started < 2.0
    assert gate.statistics().accounts[0].quarantine_reason == "HTTP 596"


async def test_restore_from_a_plain_thread_puts_the_account_back(make_gate):
    """restore() from a thread brings the account back into rotation on the loop."""
    gate, _ = make_gate({A: 1})
    await gate.refresh()
    gate.quarantine(A, seconds=600)
    await anyio.to_thread.run_sync(in_thread(0.0, lambda: gate.restore(A)).join)
    with anyio.fail_after(5):
        async with gate.slot(account=A) as slot:
            assert slot.account == A


async def test_statistics_from_a_plain_thread_sees_free_slots(make_gate):
    """statistics() from a thread (a metrics scrape) is read on the loop: free slots show."""
    gate, _ = make_gate({A: 3})
    async with gate.slot():
        seen: list[Any] = []
        await anyio.to_thread.run_sync(in_thread(0.0, lambda: seen.append(gate.statistics())).join)
    assert seen[0].free == 2
    assert seen[0].held == 1


def test_a_gate_used_in_a_second_event_loop_takes_calls_from_threads_there(monkeypatch):
    """A gate used in two anyio.run()s in turn: a thread's mark_submitted reaches the second.

    Regression: the gate remembered only its first loop, so in the second run a thread's
    mark_submitted() went to the closed first loop and was dropped: the slot said
    submitted, was never settled, and counted against its account for ever.
    """
    import httpx

    from capgate import CapacityGate
    from capgate.testing import FakeScheduler

    fake = FakeScheduler({A: 2}, service="kling")
    gate = CapacityGate(
        fake.token, service="kling", client=httpx.AsyncClient(transport=fake.transport())
    )

    async def one_run(job: str) -> int:
        async with gate.slot() as slot:
            await anyio.to_thread.run_sync(in_thread(0.0, lambda: slot.mark_submitted(job)).join)
        return gate.statistics().held

    assert anyio.run(one_run, "job-1") == 0
    assert anyio.run(one_run, "job-2") == 0


@pytest.fixture
def stopped_gate() -> Iterator[Any]:
    """A gate that polled once on an asyncio loop which has stopped since, not closed (a
    program ending): that loop will never run a call handed to it."""
    import asyncio

    import httpx

    from capgate import CapacityGate
    from capgate.testing import FakeScheduler

    fake = FakeScheduler({A: 1}, service="kling")
    loop = asyncio.new_event_loop()

    async def build() -> CapacityGate:
        gate = CapacityGate(
            fake.token, service="kling", client=httpx.AsyncClient(transport=fake.transport())
        )
        await gate.refresh()
        return gate

    try:
        yield loop.run_until_complete(build())
    finally:
        loop.close()


def test_a_call_from_a_thread_returns_when_the_loop_has_stopped(stopped_gate, monkeypatch):
    """A loop that stopped without closing never runs the call: the thread gives up, bounded."""
    from capgate._engine import waiting

    monkeypatch.setattr(waiting, "ON_LOOP_TIMEOUT", 0.2)
    started = time.monotonic()
    in_thread(0.0, stopped_gate.invalidate).join(timeout=5)
    assert time.monotonic() - started < 2.0


def test_a_scrape_from_a_thread_does_not_wait_out_a_loop_that_stopped(stopped_gate):
    """statistics() from a thread while the gate's loop has stopped (its program ending,
    close() of a sync twin): answered at once from the gate's state, not after waiting
    ON_LOOP_TIMEOUT for a loop that will never run the call (found by a review: 5 s)."""
    from capgate._engine import waiting

    got: list[Any] = []
    started = time.monotonic()
    in_thread(0.0, lambda: got.append(stopped_gate.statistics())).join(timeout=10)
    assert time.monotonic() - started < waiting.ON_LOOP_TIMEOUT / 5
    assert got[0].polls == 1


def test_a_loop_that_refuses_the_call_neither_crashes_nor_keeps_the_thread(monkeypatch):
    """A trio run that is ending refuses new system tasks ("Nursery is closed"): a call
    from a thread then returns at once, and the run is not crashed with TrioInternalError
    (found by a review, scraping statistics() while trio.run() ended)."""
    trio = pytest.importorskip("trio")
    import httpx

    from capgate import CapacityGate
    from capgate._engine import waiting
    from capgate.testing import FakeScheduler

    def closed(fn: object, tasks: object) -> None:
        raise RuntimeError("Nursery is closed to new arrivals")

    fake = FakeScheduler({A: 1}, service="kling")
    took: list[float] = []

    async def main() -> None:
        gate = CapacityGate(
            fake.token, service="kling", client=httpx.AsyncClient(transport=fake.transport())
        )
        await gate.refresh()
        monkeypatch.setattr(waiting, "_spawn", closed)

        def scrape() -> None:
            started = time.monotonic()
            assert gate.statistics().polls == 1
            took.append(time.monotonic() - started)

        await trio.to_thread.run_sync(scrape)

    trio.run(main)
    assert took[0] < waiting.ON_LOOP_TIMEOUT / 5


async def test_quarantine_from_a_thread_before_the_gate_was_used(make_gate):
    """A gate built in async code takes quarantine() from a thread before its first wait."""
    gate, _ = make_gate({A: 1})
    errors: list[BaseException] = []

    def quarantine() -> None:
        try:
            gate.quarantine(A, seconds=60, reason="HTTP 596")
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            errors.append(exc)

    await anyio.to_thread.run_sync(in_thread(0.0, quarantine).join)
    assert errors == []
    with pytest.raises(AccountQuarantined):
        async with gate.slot(account=A):
            pytest.fail("granted on a quarantined account")
