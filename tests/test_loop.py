"""The engine's cheap reads of the running loop agree with anyio's."""

from __future__ import annotations

import anyio
import pytest

from capgate._engine.loop import checkpoint, current_time, loop_marker

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
