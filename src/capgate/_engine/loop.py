"""The running event loop, reached cheaply: its clock, a checkpoint and an event.

:func:`current_time` is ``anyio.current_time()``, :func:`checkpoint` is
``anyio.lowlevel.checkpoint()`` and :func:`event` is ``anyio.Event()``: the same clock, the
same yield and the same event underneath (asyncio's ``loop.time()``, ``asyncio.sleep(0)``
and ``asyncio.Event``; trio's ``trio.current_time()``, ``trio.lowlevel.checkpoint()`` and
``trio.Event``, so trio's ``MockClock`` and the cancel scopes of either library work as
before), without the backend lookup and the wrapper anyio adds on every call. On the hot path that
lookup costs about as much as the read itself, and a queued acquisition reads the clock
about six times (``benchmarks/README.md``, the hot path). Everything else goes through anyio.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, Protocol

import anyio
import anyio.lowlevel

_library: Any
try:  # trio needs sniffio, so with no sniffio there is no trio either
    from sniffio import thread_local as _library
except ImportError:  # pragma: no cover - sniffio comes with trio and the test extras
    _library = None

__all__ = [
    "Event",
    "checkpoint",
    "checkpoint_if_cancelled",
    "clock",
    "continued",
    "current_time",
    "event",
    "loop_marker",
]

#: the C function behind asyncio.get_running_loop(), returning None instead of raising
_running_loop = asyncio._get_running_loop
_trio: ModuleType | None = None


def _on_trio() -> ModuleType | None:
    """trio, when the running loop is trio's (it names itself while its tasks run, guest
    mode included); ``None`` on asyncio or outside any loop."""
    global _trio
    if _library is None or _library.name != "trio":
        return None
    if _trio is None:
        import trio

        _trio = trio
    return _trio


def loop_marker() -> object:
    """A cheap identity of the running event loop: trio's token, or the asyncio loop."""
    trio = _on_trio()
    if trio is not None:
        return trio.lowlevel.current_trio_token()
    loop = _running_loop()
    if loop is None:
        raise RuntimeError("no running event loop")
    return loop


def current_time() -> float:
    """Seconds on the running event loop's clock (as ``anyio.current_time()``, which also
    decides what happens outside an event loop)."""
    if _library is None or _library.name is None:
        loop = _running_loop()
        if loop is not None:
            return loop.time()
    trio = _on_trio()
    if trio is not None:
        return float(trio.current_time())
    return anyio.current_time()


def clock() -> Callable[[], float]:
    """The running event loop's clock itself: :func:`current_time` with the loop looked up
    once (asyncio's ``loop.time``, the trio run's clock, else ``anyio.current_time``).
    Valid while that loop runs: the engine keeps one per loop it is bound to."""
    trio = _on_trio()
    if trio is not None:
        reader: Callable[[], float] = trio.lowlevel.current_clock().current_time
        return reader
    loop = _running_loop()
    if loop is not None:
        return loop.time
    return anyio.current_time


#: a shift smaller than this between two loops' clocks is none (asyncio's are the same clock)
CLOCK_SLACK = 1e-3


def continued(new: Callable[[], float], old: Callable[[], float] | None) -> Callable[[], float]:
    """``new``, a loop's clock, shifted to carry on from ``old``'s present.

    Each event loop keeps its own time: asyncio's is ``time.monotonic()``, a trio run's
    starts at a random offset (hours from the next run's) or at a test's ``MockClock``. A
    gate moved from one loop to another (two ``trio.run()`` in a row, or a trio run and then
    ``asyncio.run()``) keeps timestamps of the first: read on the second loop's own clock
    they would lie hours ahead or behind, and the gate would wait for a poll hours away. So
    the gate reads the new loop's clock shifted by the difference between the two at the
    move; its time runs on without a jump. A stopped loop's clock can still be read (asyncio's
    and trio's, ``MockClock`` too); one that cannot is taken as no shift.
    """
    if old is None:
        return new
    try:
        shift = old() - new()
    except Exception:  # noqa: BLE001 - a clock that needs its loop: nothing to carry on
        return new
    if abs(shift) < CLOCK_SLACK or not math.isfinite(shift):
        return new

    def shifted() -> float:
        return new() + shift

    return shifted


class Event(Protocol):
    """What :func:`event` returns (``asyncio.Event``, ``trio.Event`` or ``anyio.Event``)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    def wait(self) -> Awaitable[Any]: ...


def event() -> Event:
    """A new event of the running loop's own kind. Unlike ``anyio.Event``, waiting on one
    already set does not yield (asyncio): wait only on an event not set yet."""
    trio = _on_trio()
    if trio is not None:
        made: Event = trio.Event()
        return made
    if _running_loop() is not None:
        return asyncio.Event()
    return anyio.Event()


def checkpoint_if_cancelled() -> Awaitable[None]:
    """Raise if the task is cancelled, else go on without yielding (as
    ``anyio.lowlevel.checkpoint_if_cancelled()``; trio's own is several times cheaper)."""
    trio = _on_trio()
    if trio is not None:
        check: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint_if_cancelled
        return check()
    return anyio.lowlevel.checkpoint_if_cancelled()


def checkpoint() -> Awaitable[None]:
    """Yield to the scheduler once, cancellable (as ``anyio.lowlevel.checkpoint()``)."""
    trio = _on_trio()
    if trio is not None:
        do: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint
        return do()
    if _running_loop() is not None:
        return asyncio.sleep(0)
    return anyio.lowlevel.checkpoint()
