"""The waiting core: a waiter leaves the moment its fate is decided, whatever the poll is doing.

On trio's virtual clock with the in-memory fake: every request takes ``SLOW`` seconds, so
"at once" is exact (no virtual time passes) and "after the answer" would show as ``SLOW``.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from capgate import AccountQuarantined, GateClosed, SlotTimeout

pytestmark = [pytest.mark.anyio, pytest.mark.trio_only]

A, B = "a@x.io", "b@x.io"
SLOW = 20.0  # under the 30 s poll_timeout


async def test_driver_failed_mid_poll_returns_at_once(make_gate):
    """Regression (bug 2): the waiter whose poll is in flight gets AccountQuarantined at once.

    The waiter that drove a poll made the HTTP request itself, so a quarantine (or a grant,
    or aclose) decided while the request was out reached it only when the answer came.
    """
    gate, _ = make_gate({A: 1}, latency=SLOW, poll_interval=5.0)
    failed_at: list[float] = []

    async def waiter() -> None:
        with pytest.raises(AccountQuarantined):
            async with gate.slot(account=A):
                pytest.fail("granted on a quarantined account")
        failed_at.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(1.0)  # its poll is on the wire for another SLOW - 1 s
        quarantined_at = anyio.current_time()
        gate.quarantine(A, seconds=600, reason="HTTP 596")
    assert failed_at == [quarantined_at]


async def test_driver_granted_mid_poll_returns_at_once(make_gate):
    """Regression (bug 2): a slot given back while the driver's poll is out reaches it at once."""
    gate, _ = make_gate({A: 1}, latency=SLOW, poll_interval=5.0)
    holder = await gate.slot().__aenter__()  # t = SLOW; the snapshot is fresh for 5 s more
    got_at: list[float] = []

    async def waiter() -> None:
        async with gate.slot() as slot:
            got_at.append(anyio.current_time())
            assert slot.account == A

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)  # no room: it drives, and its poll goes out (due since t=5)
        await anyio.sleep(1.0)
        given_back_at = anyio.current_time()
        holder._give_back_unused()  # the holder never used it (as submit() does on a 401)
    assert got_at == [given_back_at] == [SLOW + 1.0]


async def test_driver_cancelled_mid_poll_leaves_its_answer_to_the_others(make_gate):
    """The driver cancelled mid-poll returns at once; the same answer serves the next waiter."""
    gate, fake = make_gate({A: 1}, latency=SLOW, poll_interval=5.0)
    scope = anyio.CancelScope()
    got: list[tuple[str, float]] = []
    left_at: list[float] = []

    async def driver() -> None:
        with scope:
            async with gate.slot():
                pytest.fail("granted after it was cancelled")
        left_at.append(anyio.current_time())

    async def other() -> None:
        async with gate.slot() as slot:
            got.append((slot.account, anyio.current_time()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(driver)
        await anyio.sleep(1.0)
        tg.start_soon(other)
        await anyio.sleep(1.0)
        scope.cancel()
        cancelled_at = anyio.current_time()
    assert left_at == [cancelled_at]
    assert got == [(A, SLOW)]  # the answer of the poll sent at 0, not a new one
    assert fake.polls == 1


async def test_aclose_mid_poll_fails_the_driver_at_once(make_gate):
    """aclose() while the poll is out: the driver gets GateClosed at once, aclose returns."""
    gate, _ = make_gate({A: 1}, latency=SLOW, poll_interval=5.0)
    failed_at: list[float] = []

    async def waiter() -> None:
        with pytest.raises(GateClosed):
            async with gate.slot():
                pytest.fail("granted after aclose")
        failed_at.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(1.0)
        await gate.aclose()
        closed_at = anyio.current_time()
    assert failed_at == [closed_at] == [1.0]


async def test_no_poll_runs_while_nobody_waits(make_gate):
    """Once the last waiter leaves and its poll lands, nothing polls again, however long."""
    gate, fake = make_gate({A: 1}, poll_interval=5.0)
    async with gate.slot():
        pass
    polls = fake.polls
    await anyio.sleep(3600)
    assert fake.polls == polls
    assert not gate._engine.polling


async def test_timeout_zero_never_sends_a_poll(make_gate):
    """slot(timeout=0) with no fresh snapshot fails at once and sends no request."""
    gate, fake = make_gate({A: 1})
    with pytest.raises(SlotTimeout):
        async with gate.slot(timeout=0):
            pytest.fail("granted without a snapshot")
    await anyio.sleep(60)
    assert fake.polls == 0


async def test_timeout_zero_takes_a_free_slot(make_gate):
    """slot(timeout=0) with a fresh snapshot and room grants at once."""
    gate, fake = make_gate({A: 2}, poll_interval=5.0)
    async with gate.slot(), gate.slot(timeout=0) as second:
        assert second.account == A
    assert fake.polls == 1


async def test_aclose_before_the_poll_task_ran_cancels_it_at_once(make_gate):
    """aclose() right after a driver started its poll task, before the task ran: no wait.

    Regression: the poll's cancel scope was made by the task itself, so aclose() found
    none to cancel and waited out its 5 s bound while the request went on.
    """
    gate, _ = make_gate({A: 1}, latency=SLOW, poll_interval=5.0)
    failed: list[float] = []

    async def waiter() -> None:
        with pytest.raises(GateClosed):
            async with gate.slot():
                pytest.fail("granted after aclose")
        failed.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.lowlevel.checkpoint()  # the waiter runs one step: it starts the poll task
        await anyio.lowlevel.checkpoint()
        await gate.aclose()
        closed_at = anyio.current_time()
    assert closed_at == 0.0
    assert failed == [0.0]


async def test_a_cancelled_refresh_leaves_its_poll_to_the_waiters(make_gate):
    """refresh() under a short deadline: its poll still lands and serves the waiter.

    Regression: refresh() made the request in the caller's own task, so cancelling the
    caller aborted the poll a waiter was counting on, and that waiter waited a whole
    poll_interval more (granted at 11 s instead of 6 s here).
    """
    gate, fake = make_gate({A: 1}, latency=2.0, poll_interval=5.0, jitter=0)
    fake.add_outside_job(A, duration=3.0)  # A is full until t=3
    got: list[float] = []

    async def waiter() -> None:
        async with gate.slot():
            got.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)  # polls at 0 (answer at 2: full); next poll due at 5
        await anyio.sleep(4.0)
        with anyio.move_on_after(1.0):  # a caller with a short deadline
            await gate.refresh()  # sent at 4, answered at 6
    assert got == [6.0]
