"""The engine's cheap reads of the running loop agree with anyio's; a gate carries on when
it moves to another loop (a second ``trio.run()``, or ``asyncio.run()`` after trio)."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from capgate import AccountQuarantined, CapacityGate
from capgate._engine.loop import checkpoint, continued, current_time, loop_marker
from capgate.testing import FakeScheduler, serve

pytestmark = pytest.mark.anyio


async def test_current_time_is_anyios_clock():
    """The same clock as ``anyio.current_time()`` (trio's virtual one on trio)."""
    await anyio.sleep(0.01)
    before = anyio.current_time()
    mine = current_time()
    after = anyio.current_time()
    assert before <= mine <= after


@pytest.mark.trio_only
async def test_current_time_follows_the_virtual_clock():
    start = current_time()
    await anyio.sleep(3600)
    assert current_time() - start == pytest.approx(3600)


async def test_checkpoint_is_cancellable():
    """A cancelled scope's checkpoint raises, as ``anyio.lowlevel.checkpoint()`` does."""
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await checkpoint()
        reached = True
    assert not reached


async def test_checkpoint_lets_others_run():
    ran = anyio.Event()

    async def other() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        for _ in range(10):  # trio may run a new task one batch later than the caller
            if ran.is_set():
                break
            await checkpoint()
        assert ran.is_set()


def test_current_time_outside_a_loop_raises_like_anyio():
    with pytest.raises(Exception) as mine:  # whatever anyio raises
        current_time()
    with pytest.raises(Exception) as anyios:
        anyio.current_time()
    assert type(mine.value) is type(anyios.value)


async def test_loop_marker_is_the_same_within_a_run():
    first = loop_marker()
    await checkpoint()
    assert loop_marker() is first


def test_loop_marker_differs_between_runs():
    markers = [anyio.run(_marker) for _ in range(2)]
    assert markers[0] is not markers[1]


async def _marker() -> object:
    return loop_marker()


class _Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_continued_carries_on_from_the_old_clocks_present():
    old, new = _Clock(100_000.0), _Clock(5.0)
    now = continued(new, old)
    assert now() == 100_000.0
    new.at += 2.5
    assert now() == 100_002.5  # the new clock's pace from the old one's present


def test_continued_is_the_new_clock_itself_on_the_first_loop_and_on_the_same_clock():
    new = _Clock(5.0)
    assert continued(new, None) is new
    assert continued(new, _Clock(5.0 + 1e-6)) is new  # asyncio after asyncio: one clock


def test_continued_takes_an_unreadable_old_clock_as_no_shift():
    def gone() -> float:
        raise RuntimeError("no running event loop")

    new = _Clock(5.0)
    assert continued(new, gone) is new


Runner = Callable[[Callable[[], Awaitable[None]]], object]


def _grants_on_each_run(gate: CapacityGate, runs: list[Runner]) -> None:
    """One acquire+release in each event loop run, each within 20 seconds of its loop."""

    async def once() -> None:
        with anyio.fail_after(20):
            async with gate.slot():
                pass

    for run in runs:
        run(once)


def test_a_gate_used_in_a_second_trio_run_polls_on_that_runs_clock():
    """The first run's clock stood at a day, the second's starts at zero: the snapshot of
    the first is not taken for one from the future, good for another day."""
    trio = pytest.importorskip("trio")
    fake = FakeScheduler({"a@x.io": 1}, service="kling")
    client = httpx.AsyncClient(transport=fake.transport())
    gate = CapacityGate(fake.token, service="kling", client=client, poll_interval=5)

    def later_in_the_day(fn: Callable[[], Awaitable[None]]) -> None:
        clock = trio.testing.MockClock(autojump_threshold=0)
        clock.jump(86_400)
        trio.run(fn, clock=clock)

    def at_dawn(fn: Callable[[], Awaitable[None]]) -> None:
        trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))

    _grants_on_each_run(gate, [later_in_the_day, at_dawn])
    assert fake.polls == 2  # a fresh answer in each run, neither served from the other's


# the first run's connection cannot be closed from the second run's loop: the collector
# closes it, with the ResourceWarning Python gives any socket it closes
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_gate_moved_from_trio_to_asyncio_makes_itself_a_new_client():
    """The client the gate made holds trio's connections: on asyncio it needs its own."""
    trio = pytest.importorskip("trio")
    fake = FakeScheduler({"a@x.io": 1}, service="kling")
    with serve(fake) as url:
        gate = CapacityGate(fake.token, service="kling", url=url, poll_interval=0.2)

        async def then_close(fn: Callable[[], Awaitable[None]]) -> None:
            await fn()
            await gate.aclose()

        _grants_on_each_run(gate, [trio.run, lambda fn: asyncio.run(then_close(fn))])
        gc.collect()  # here, not in a later test: the first run's connection
        assert fake.polls == 2


@pytest.mark.parametrize("first_loop", ["asyncio", "trio"])
def test_a_quarantine_on_a_new_loop_in_another_thread_is_kept(first_loop):
    """The gate ran on a loop in a thread that lives on (a pool's); its first call on a new
    loop in another thread is quarantine(). Before, the call went to the stopped loop and
    was dropped without a word: the next waiter was granted the quarantined account."""
    if first_loop == "trio":
        pytest.importorskip("trio")
    fake = FakeScheduler({"a@x.io": 1}, service="kling")
    client = httpx.AsyncClient(transport=fake.transport())
    gate = CapacityGate(fake.token, service="kling", client=client, poll_interval=5)
    first_done, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    def first() -> None:
        anyio.run(_one_slot, gate, backend=first_loop)
        first_done.set()
        release.wait(10)  # this thread lives on, its loop stopped

    async def second() -> None:
        gate.quarantine("a@x.io", 60, "provider said so")
        try:
            async with gate.slot(timeout=1):
                outcome.append("granted")
        except AccountQuarantined:
            outcome.append("refused")

    pool_thread = threading.Thread(target=first)
    pool_thread.start()
    try:
        assert first_done.wait(10)
        other = threading.Thread(target=lambda: asyncio.run(second()))
        other.start()
        other.join(10)
    finally:
        release.set()
        pool_thread.join(10)
    assert outcome == ["refused"]


async def _one_slot(gate: CapacityGate) -> None:
    async with gate.slot(timeout=5):
        pass
