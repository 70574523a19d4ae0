"""The waiting core: one engine for every store.

How a caller gets a slot, in one place:

- **The fast path.** With nobody queued, the store is asked for a slot at once
  (``grant_nowait``); the in-memory store answers from a fresh snapshot with no await.
- **The queue.** Otherwise the caller waits in a queue ordered by priority, then arrival.
  Whenever what is known changes (a snapshot lands, a slot is given back, an account returns
  to rotation) one *dispatch pass* walks the queue in order and grants each waiter an account
  it may use that has room by the accounting rule. A later waiter is served before an earlier
  one only when the earlier one cannot use any account with room. In fleet mode the pass runs
  inside Redis over the fleet's queue, and this core collects the grants (``exchange``).
- **The driver.** One waiting task at a time is the driver: it sleeps until the next poll
  is due, something changes by itself (a quarantine ends) or news comes (fleet mode), and
  starts the poll. When the driver leaves (granted, timed out, cancelled, failed) the role
  passes to the next waiter. With nobody waiting, nothing polls.
- **The poll runs in a task of its own.** This is the one departure from the
  no-background-task habit, and a deliberate one: a waiter that started a poll must be free
  to leave the moment it is granted, failed or cancelled, while the poll's answer still serves
  everyone else (one request in flight at a time, none wasted). So the request runs in a
  short-lived task (trio: a system task; asyncio: a loop task), started only by a driver or
  by ``refresh()`` and ending with its one request. Nothing runs while nobody waits, and
  ``aclose()`` cancels a poll in flight.
- **Threads.** ``invalidate``, ``quarantine``, ``restore`` and a slot's ``mark_*`` may be
  called from any thread: from a thread other than the gate's event loop they run on that
  loop (``anyio.from_thread.run_sync`` with the loop's token), as promptly as from inside.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import math
import random
import threading
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import httpx

from .._config import GateConfig
from .._errors import (
    AccountQuarantined,
    AuthenticationError,
    CapacityGateError,
    GateClosed,
    PollError,
    SlotTimeout,
)
from .._log import log
from .._models import GateStatistics, Snapshot, WaitHistogram, account_statistics
from .._policy import poll_spacing
from .._poll import fetch_capacity
from .base import Lease, PollTicket, Store, Waiter
from .forecast import Forecast
from .ledger import row_limit
from .loop import (
    checkpoint,
    checkpoint_if_cancelled,
    clock,
    continued,
    current_time,
    loop_marker,
)

__all__ = ["Engine"]

T = TypeVar("T")

#: what a waiter without a timeout waits in (stateless, so one serves every waiter)
_NO_SCOPE: contextlib.nullcontext[None] = contextlib.nullcontext()

#: seconds refresh() waits beyond the poll timeout for another fleet member's answer
LOCK_MARGIN = 5.0


def now_or_none() -> float | None:
    """``anyio.current_time()`` inside an event loop, else ``None`` (for reprs)."""
    try:
        return anyio.current_time()
    except Exception:  # noqa: BLE001 - no running loop: the error type varies by backend
        return None


def _own_client() -> httpx.AsyncClient:
    """The client a gate makes for itself. No timeout of its own: ``poll_timeout`` bounds
    each poll as a whole (``_poll``), where httpx's default would cut it at 5 s."""
    return httpx.AsyncClient(follow_redirects=False, timeout=None)  # noqa: S113 - see above


def _need_clock() -> None:
    if now_or_none() is None:
        raise RuntimeError(
            "the gate has no event loop yet: call this from async code, "
            "or once the gate has been used"
        )


#: seconds a call from another thread waits for the gate's loop to run it
ON_LOOP_TIMEOUT = 5.0
#: ... looking every this many seconds whether that loop still runs
ON_LOOP_SLICE = 0.05
#: reads of the gate's state for its repr, from another thread, before giving up
DESCRIBE_TRIES = 3


def _loop_alive(token: anyio.lowlevel.EventLoopToken) -> bool:
    """Whether the loop of ``token`` still runs (trio's: taken as yes; a finished run
    refuses new work when it is handed over)."""
    native = token.native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return native.is_running() and not native.is_closed()
    return True


def _spawn_from_thread(
    token: anyio.lowlevel.EventLoopToken,
    fn: Callable[[], Coroutine[Any, Any, None]],
    tasks: set[Any],
    refused: Callable[[], object],
) -> None:
    """Start ``fn()`` as a task on the loop of ``token``, from another thread, not waiting;
    ``refused()`` is called on that loop if it is ending and takes no new task.

    Raises:
        RuntimeError: That loop is closed.
    """

    def start() -> None:
        try:
            _spawn(fn, tasks)
        except RuntimeError:  # trio: "Nursery is closed to new arrivals" as the run ends
            refused()  # (raised here, it would crash the run with TrioInternalError)

    native = token.native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        native.call_soon_threadsafe(start)
    else:  # trio's token (RunFinishedError is a RuntimeError)
        run_sync_soon: Callable[[Callable[[], None]], None] = getattr(native, "run_sync_soon")  # noqa: B009
        run_sync_soon(start)


def _retrieved(task: asyncio.Task[None]) -> None:
    """Mark a poll task's end as seen. Only a KeyboardInterrupt or SystemExit can end it
    with an exception (it catches the rest), and asyncio has already sent that on to whoever
    runs the loop: without this, asyncio would also print it as "never retrieved"."""
    if not task.cancelled():
        task.exception()


def _spawn(fn: Callable[[], Coroutine[Any, Any, None]], tasks: set[Any]) -> None:
    """Start ``fn()`` in a task that outlives the caller (the poll's; see the docstring)."""
    try:
        import trio

        trio.lowlevel.current_trio_token()
    except (ImportError, RuntimeError):
        import asyncio

        task = asyncio.get_running_loop().create_task(fn())
        tasks.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(tasks.discard)
        task.add_done_callback(_retrieved)
    else:
        trio.lowlevel.spawn_system_task(fn, name="capgate poll")


class _Inflight:
    """The poll in flight, which every caller of refresh() joins."""

    __slots__ = ("done", "error", "scope", "snapshot", "ticket")

    def __init__(self, ticket: PollTicket) -> None:
        self.ticket = ticket
        self.done = anyio.Event()
        # made now, entered by the poll's task: aclose() may cancel it before the task runs
        self.scope = anyio.CancelScope()
        self.snapshot: Snapshot | None = None
        self.error: CapacityGateError | None = None


class Engine:
    """The waiting core over one store (internal; the facade's only collaborator)."""

    def __init__(self, config: GateConfig, store: Store, client: httpx.AsyncClient | None) -> None:
        self.config = config
        self.service = config.service.name
        self.store = store
        self.rng = random.Random()
        self._owns_client = client is None  # then ours to make (per loop) and to close
        self._client = _own_client() if client is None else client
        self._queues: dict[int, dict[Waiter, None]] = {}
        self._waiting = 0
        self._model_waiters = 0  # waiters for one model: they must be checked one by one
        self._restricted = 0  # waiters for some accounts only, or for one model
        self._driver: Waiter | None = None
        self._inflight: _Inflight | None = None
        self._tasks: set[Any] = set()
        self._known: set[str] = set()
        self._caps_seen: dict[str, int] = {}
        self._auth_seen: object = None
        self._loop: tuple[anyio.lowlevel.EventLoopToken, int, object] | None = None
        self._now: Callable[[], float] = current_time  # the bound loop's clock, read directly
        if now_or_none() is not None:  # built inside async code: that is its loop
            self._bind_loop()
        # when slots are likely to free (see forecast.py): the next poll may go later than
        # its floor, decided once per snapshot; invalidate() and freed room call it off
        self.forecast = Forecast(config.poll_interval)
        self._unlearnable: Snapshot | None = None  # the forecast failed on it: not again
        self._planned_for: Snapshot | None = None
        self._planned_at = -math.inf
        self._planned_floor = math.inf
        self.closed = False
        self.grants = 0
        self.timeouts = 0
        self.waits = WaitHistogram()

    # --- threads --------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        """Remember the loop the gate runs on (again, when it runs on a new one)."""
        marker = loop_marker()
        loop = self._loop
        if loop is None or loop[2] is not marker:
            self._loop = (anyio.lowlevel.current_token(), threading.get_ident(), marker)
            # a new loop's clock, carried on from the old one's present: the instants the
            # gate keeps stay valid (loop.py, continued())
            self._now = continued(clock(), None if loop is None else self._now)
            self.store.bind(self._now)
            if loop is not None and self._owns_client:
                # its pooled connections belong to the old loop (trio's fail on asyncio):
                # a fresh client, and the old one left to the collector, unclosable here
                self._client = _own_client()

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Run ``fn(*args)`` on the gate's event loop, from whatever thread calls.

        From another thread the call is handed to the loop without blocking it, and the
        caller waits for the result at most :data:`ON_LOOP_TIMEOUT` seconds (a loop that
        stopped without closing never runs it): then ``None``, logged.

        With no loop yet, ``fn`` runs here: it decides what that means (``invalidate`` does
        nothing; ``quarantine`` needs a clock and raises ``RuntimeError``). Called on a
        loop of its own once the gate's has stopped (a second ``asyncio.run()``, in this
        thread or another), the gate moves to this loop and ``fn`` runs here.
        """
        loop = self._loop
        if now_or_none() is not None and (
            loop is None
            or (
                loop[2] is not loop_marker()
                and (loop[1] == threading.get_ident() or not _loop_alive(loop[0]))
            )
        ):
            self._bind_loop()  # this loop is the gate's from now on, its clock too
            loop = self._loop
        if loop is None or loop[1] == threading.get_ident():
            return fn(*args)
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def call() -> None:
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # handed to the calling thread  # noqa: BLE001
                done.set_exception(exc)

        try:
            _spawn_from_thread(loop[0], call, self._tasks, done.cancel)
        except RuntimeError:  # that loop is gone (a trio run that finished)
            if now_or_none() is None:
                return None  # and no loop here: nothing waits on this gate any more
            self._bind_loop()  # a loop runs here: the gate's from now on
            return fn(*args)
        # in slices: a loop that stops meanwhile (its program ending) will never run it
        for _ in range(round(ON_LOOP_TIMEOUT / ON_LOOP_SLICE)):
            try:
                return done.result(timeout=ON_LOOP_SLICE)
            except concurrent.futures.CancelledError:  # the ending loop refused the task
                return None
            except concurrent.futures.TimeoutError:
                if done.done():
                    raise  # fn's own TimeoutError (a SlotTimeout is one), not the wait's
                if not _loop_alive(loop[0]):
                    return None
        log.warning("capgate.loop_unresponsive", service=self.service, call=fn.__name__)
        return None

    # --- waiting ----------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise GateClosed(f"{self.service}: the gate is closed")

    async def acquire(
        self,
        allowed: frozenset[str] | None,
        timeout: float | None,
        priority: int,
        model: str | None = None,
    ) -> tuple[Lease, float]:
        """Wait for a slot (not on an account out for ``model``); returns the lease and
        the seconds waited."""
        await checkpoint_if_cancelled()  # a cancelled task gets no slot, and no other error
        self._bind_loop()
        self.check_open()
        store = self.store
        now = self._now()
        self._refuse_early(allowed, now, model)
        if not self._waiting and model is None:  # a model's waiter takes the queue's pass
            # nobody queued ahead: a fresh snapshot with room grants at once (the hot path)
            deadline = math.inf if timeout is None else now + timeout
            lease = store.grant_nowait(allowed, now, deadline)
            if lease is not None:
                # like trio's CapacityLimiter, a grant yields to the scheduler once, so a
                # loop of grants cannot starve other tasks; a task cancelled meanwhile gives
                # the slot back, as a queued one granted and cancelled before it ran does
                # (a plain checkpoint: the limiter's shielded one costs twice as much)
                try:
                    await checkpoint()
                except BaseException:
                    self.give_back(lease, "cancelled")
                    await store.flush()
                    raise
                self._count_grant(lease, 0.0, priority)
                self.waits.observe(0.0)
                return lease, 0.0
        waiter = Waiter("", 0, priority, allowed, now)  # a store that needs an id names it
        waiter.model = model
        if timeout is not None:
            waiter.deadline = now + timeout
        self._enqueue(waiter)
        try:
            if timeout == 0:
                # try once and never start a poll that nobody would wait for
                await self._exchange()
            else:
                # no scope at all without a timeout: it is a waiter's largest piece of memory
                scope = _NO_SCOPE if timeout is None else anyio.move_on_after(timeout)
                with scope:
                    if not (store.in_process and self._restricted == 0) or store.holding:
                        await self._exchange()
                    while waiter.lease is None and waiter.error is None:
                        await self._wait_turn(waiter)
            if waiter.lease is not None:
                # granted, but cancelled before this task ran again: the holder never
                # reaches the body, so the slot goes straight to the next waiter
                await checkpoint_if_cancelled()
        except BaseException:
            self._abandon(waiter)
            await store.flush()
            raise
        if waiter.lease is None or waiter.error is not None:
            self._abandon(waiter)
            await store.flush()
            if waiter.error is not None:
                raise waiter.error
            self.timeouts += 1
            log.info(
                "capgate.timeout", service=self.service, timeout=timeout, waiting=self._waiting
            )
            assert timeout is not None  # noqa: S101 - no timeout, no way out but a grant
            # polls that keep failing are why, more often than full accounts: say so
            failed = store.view(self._now()).last_error
            why = "" if failed is None else f" (the latest poll failed: {failed})"
            raise SlotTimeout(
                f"{self.service}: no free slot within {timeout:g} s{why}", timeout=timeout
            )
        self._leave(waiter)
        waited = self._now() - waiter.arrived
        self.waits.observe(waited)
        return waiter.lease, waited

    def _out(self, now: float, model: str | None) -> dict[str, tuple[float, str]]:
        """Accounts out of rotation now, for a waiter for ``model``."""
        if model is None:
            return self.store.quarantined(now)
        return self.store.quarantined(now, model)

    def _refuse_early(self, allowed: frozenset[str] | None, now: float, model: str | None) -> None:
        """Fail at once when every allowed account is out, or the token was just refused."""
        store = self.store
        out = self._out(now, model)
        if out:
            error = self._quarantine_error(allowed, out)
            if error is not None:
                raise error
        auth = store.auth_failure(now)
        if auth is not None and auth[1] < self.config.poll_interval:
            raise copy.copy(auth[0])

    async def _wait_turn(self, waiter: Waiter) -> None:
        """One step of waiting: sleep until woken, or drive."""
        if self._driver is None:
            self._driver = waiter
        if self._driver is not waiter:
            await waiter.sleep()
            return
        store = self.store
        now = self._now()
        wait = min(store.next_change_in(now), self._expect(now) - now)
        if waiter.lease is not None or waiter.error is not None:
            return  # granted a probe's slot just now
        if self._inflight is None:
            due = self._poll_due_in(now)
            if due <= 0:
                ticket = await store.begin_poll(force=False)
                if isinstance(ticket, PollTicket):
                    self._start_poll(ticket)
                else:
                    wait = min(wait, ticket)  # another process polls: its answer wakes us
            else:
                wait = min(wait, due)
        if waiter.lease is None and waiter.error is None:
            await store.wait(waiter, max(wait, 0.0))
            self._expect(self._now())
        await self._exchange()

    def _expect(self, now: float) -> float:
        """Counts that lag: tell the store which listed jobs have probably ended by now;
        returns when the next one will have (``inf``: none)."""
        snapshot = self.store.snapshot()
        if snapshot is not None:
            self._observe(snapshot)  # the expectation must be of the ledger's snapshot
        if not self.forecast.ready:
            return math.inf
        # the least the counts surely lag by: a probe on a job not yet ended costs a 429
        lag = self.store.view(now).lag_floor
        if lag <= 0:
            return math.inf
        try:
            freed, soonest = self.forecast.probably_freed(now, lag)
        except Exception:  # a bug must cost the forecast, never the waiter  # noqa: BLE001
            self._forecast_failed()
            return math.inf
        if self.store.expect_freed(freed):
            self._dispatch()  # a slot more than before: hand it out now, not at the next step
        return soonest

    def _poll_due_in(self, now: float) -> float:
        """Seconds until the next poll: the store's floor, or later where the forecast says
        nothing is likely to free before (decided once per snapshot)."""
        store = self.store
        due = store.poll_due_in(now)
        snapshot = store.snapshot()
        if snapshot is None:
            return due
        floor = now + due
        if snapshot is not self._planned_for:
            self._planned_for = snapshot
            self._observe(snapshot)
            self._planned_at = -math.inf
            if not self._room(snapshot, now):  # else the waiters left can't use it: no guess
                try:
                    planned = self.forecast.next_poll(
                        floor=floor, interval=self.config.poll_interval, accounts=self.config.allow
                    )
                except Exception:  # as in _expect  # noqa: BLE001
                    self._forecast_failed()
                    planned = floor
                if planned > floor:
                    self._planned_at, self._planned_floor = planned, floor
        elif floor < self._planned_floor - 1e-6:
            # the floor came closer since (invalidate(), here or in another fleet member):
            # news the forecast did not have
            self._planned_at = -math.inf
        return max(due, self._planned_at - now)

    def _observe(self, snapshot: Snapshot) -> None:
        """Learn from ``snapshot`` (once), and tell the store which accounts are faster."""
        forecast = self.forecast
        if snapshot is self._unlearnable:
            return
        try:
            if not (forecast.observe(snapshot) and forecast.ready):
                return
            typical, ends = forecast.typical(), forecast.expected_ends()
        except Exception:  # as in _expect: then no account is taken as faster  # noqa: BLE001
            self._forecast_failed()
            self._unlearnable = snapshot  # the new forecast does not retry it (nor log again)
            typical, ends = {}, {}
        self.store.prefer_faster(snapshot, typical, ends)

    def _forecast_failed(self) -> None:
        """The forecast raised (a bug, or an answer no check caught): log it, forget what
        it learnt and go on as a gate with no history does (polls at the floor, no probes,
        no placement plan), learning anew. Call it from an ``except`` block."""
        log.exception("capgate.forecast_failed", service=self.service)
        self.forecast = Forecast(self.config.poll_interval)
        self._planned_for = None
        self._planned_at = -math.inf

    def _room(self, snapshot: Snapshot, now: float) -> bool:
        """Whether ``snapshot`` leaves a slot free after the reservations it doesn't show."""
        view = self.store.view(now)
        return any(
            row_limit(snapshot, row, view.caps.get(row.account)) > view.pending.get(row.account, 0)
            for row in snapshot.accounts
        )

    def _room_freed(self) -> None:
        """A slot came free: hand it out; if waiters are left, a poll the forecast put
        off goes at the floor after all (news it did not foresee)."""
        self._dispatch()
        if self._waiting and self._planned_at > -math.inf:
            self._planned_at = -math.inf
            self._wake_driver()

    async def _exchange(self) -> None:
        """Bring the store up to date with the queue and hand out what it granted."""
        grants = await self.store.exchange(self._iter_waiters)
        self._hand_out(grants)
        self._check_waiters()

    def _hand_out(self, grants: list[tuple[Waiter, Lease]]) -> None:
        for waiter, lease in grants:
            if waiter.open:
                self._grant(waiter, lease)

    def _check_waiters(self) -> None:
        """Fail waiters on a refused token, or when every account they may use is out."""
        if not self._waiting:
            return
        now = self._now()
        store = self.store
        auth = store.auth_failure(now)
        if auth is not None and auth[2] != self._auth_seen:
            self._auth_seen = auth[2]
            failed_at = now - auth[1]
            for waiter in list(self._iter_waiters()):
                if waiter.arrived <= failed_at:
                    self._fail(waiter, copy.copy(auth[0]))
        out = store.quarantined(now)
        if not out and not self._model_waiters:
            return  # nothing is out for anyone (the usual case: no walk of the queue)
        for waiter in list(self._iter_waiters()):
            mine = out if waiter.model is None else self._out(now, waiter.model)
            if mine:
                error = self._quarantine_error(waiter.allowed, mine)
                if error is not None:
                    self._fail(waiter, error)

    def _enqueue(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.priority)
        if queue is None:
            queue = self._queues[waiter.priority] = {}
            self._queues = dict(sorted(self._queues.items(), reverse=True))
        queue[waiter] = None
        self._waiting += 1
        if waiter.model is not None:
            self._model_waiters += 1
        if waiter.model is not None or waiter.allowed is not None:
            self._restricted += 1

    def _dequeue(self, waiter: Waiter) -> bool:
        queue = self._queues.get(waiter.priority)
        if queue is None or waiter not in queue:
            return False
        del queue[waiter]
        if not queue:
            del self._queues[waiter.priority]
        self._waiting -= 1
        if waiter.model is not None:
            self._model_waiters -= 1
        if waiter.model is not None or waiter.allowed is not None:
            self._restricted -= 1
        return True

    def _iter_waiters(self) -> Iterator[Waiter]:
        """Waiters in service order: higher priority first, then first come first served."""
        for queue in self._queues.values():
            yield from queue

    def _wake_next(self) -> None:
        """Wake the last in line to take the driver role: it is usually served last, so the
        role moves seldom (the first in line would hand it on again at the next grant)."""
        for queue in reversed(self._queues.values()):
            for successor in reversed(queue):
                if not successor.woken:  # already, when several waiters leave in a row
                    successor.wake()  # it takes the driver role at its next step
                return

    def _leave(self, waiter: Waiter) -> None:
        """``waiter`` stops waiting; if it was the driver, hand the role on."""
        self._dequeue(waiter)
        if self._driver is waiter:
            self._driver = None
        if self._driver is None:
            # also while the role is vacant: the successor woken by the driver's exit may
            # leave (cancelled, timed out, granted) before it runs again to take the role
            self._wake_next()

    def _abandon(self, waiter: Waiter) -> None:
        """``waiter`` gave up (timeout, cancel, error): leave nothing behind."""
        waiter.left = True
        self._leave(waiter)
        lease, waiter.lease = waiter.lease, None
        if lease is not None:
            log.debug(
                "capgate.give_back", service=self.service, account=lease.account, reason="abandoned"
            )
        if self.store.abandon(waiter, lease):
            self._room_freed()

    def _fail(self, waiter: Waiter, error: BaseException) -> None:
        if waiter.lease is None and waiter.error is None:
            waiter.error = error
            self._leave(waiter)
            waiter.wake()

    def _wake_driver(self) -> None:
        if self._driver is not None:
            self._driver.wake()
        elif self._waiting:
            self._wake_next()

    def _quarantine_error(
        self, allowed: frozenset[str] | None, out: dict[str, tuple[float, str]]
    ) -> AccountQuarantined | None:
        scope: Collection[str]
        if allowed is not None:
            scope = allowed
        elif self.config.accounts is not None:
            scope = self.config.accounts
        elif self.store.snapshot() is None:
            # which accounts exist is unknown before the first snapshot: it decides
            # (the waiters are checked again after every poll)
            return None
        else:
            scope = self._known
        if not scope or any(a not in out for a in scope):
            return None
        return AccountQuarantined.every(self.service, {a: out[a][1] for a in scope})

    # --- granting ---------------------------------------------------------------------------

    def _count_grant(self, lease: Lease, waited: float, priority: int) -> None:
        self.grants += 1
        if log.debug_enabled():
            log.debug(
                "capgate.grant",
                service=self.service,
                account=lease.account,
                waited=waited,
                priority=priority,
                waiting=self._waiting,
            )

    def _grant(self, waiter: Waiter, lease: Lease) -> None:
        waiter.lease = lease
        self._dequeue(waiter)
        self._count_grant(lease, lease.granted_at - waiter.arrived, waiter.priority)
        waiter.wake()

    def _dispatch(self) -> None:
        """One pass over the queue: grant every waiter it can, in service order."""
        if not self._waiting or self.closed:
            return
        grants = self.store.dispatch(self._iter_waiters(), self._now())
        for waiter, lease in grants:
            self._grant(waiter, lease)

    # --- what holders report ----------------------------------------------------------------

    def settle(self, lease: Lease, job_id: str | None, error: BaseException | None) -> None:
        now = self._now()
        if log.debug_enabled():
            log.debug(
                "capgate.settle",
                service=self.service,
                account=lease.account,
                job_id=job_id,
                held_for=now - lease.granted_at,
                error=None if error is None else type(error).__name__,
            )
        if self.store.settle(lease, job_id, now):
            self._room_freed()

    def give_back(self, lease: Lease, why: str) -> None:
        if self.store.give_back(lease):
            log.debug("capgate.give_back", service=self.service, account=lease.account, reason=why)
            self._room_freed()

    def mark_busy(self, lease: Lease) -> None:
        log.info("capgate.busy", service=self.service, account=lease.account)
        if self.store.mark_busy(lease):
            self._dispatch()

    def quarantine(
        self, account: str, seconds: float, reason: str, model: str | None = None
    ) -> None:
        _need_clock()
        if model is None:
            self.store.quarantine(account, seconds, reason)
        else:
            self.store.quarantine(account, seconds, reason, model)
        self._known.add(account)
        log.warning(
            "capgate.quarantine",
            service=self.service,
            account=account,
            seconds=seconds,
            reason=reason,
            model=model,
        )
        now = self._now()
        out = self.store.quarantined(now)
        for waiter in list(self._iter_waiters()):
            mine = out if waiter.model is None else self._out(now, waiter.model)
            error = self._quarantine_error(waiter.allowed, mine)
            if error is not None:
                self._fail(waiter, error)
        self._wake_driver()

    def restore(self, account: str) -> None:
        _need_clock()
        if self.store.restore(account):
            log.info("capgate.restore", service=self.service, account=account)
            self._dispatch()
            self._planned_at = -math.inf
            self._wake_driver()

    def invalidate(self, job_id: str | None = None) -> None:
        if self.closed or now_or_none() is None:
            return
        log.debug("capgate.invalidate", service=self.service, waiting=self._waiting, job_id=job_id)
        if job_id is not None and self.store.job_ended(job_id):
            # exact news: that job's slot is free now, even where the counts still list it;
            # once it is handed out (or nobody waits for it) no extra poll is needed
            grants = self.grants
            self._room_freed()
            if self.grants > grants or not self._waiting:
                return
        self.store.invalidate()
        self._planned_at = -math.inf
        self._wake_driver()

    def flush(self) -> Awaitable[None]:
        return self.store.flush()  # awaited by the caller: one coroutine frame less

    # --- polling ----------------------------------------------------------------------------

    def _start_poll(self, ticket: PollTicket) -> _Inflight:
        """Start a poll in a task of its own: the driver that asked may leave any time."""
        inflight = self._inflight = _Inflight(ticket)
        _spawn(lambda: self._run_poll(inflight), self._tasks)
        return inflight

    async def _run_poll(self, inflight: _Inflight) -> None:
        crashed: Exception | None = None
        try:
            with inflight.scope:
                await self._poll(inflight)
        except Exception as exc:  # a bug must not take the event loop down with it
            log.exception("capgate.poll_crashed", service=self.service)
            crashed = exc
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if inflight.snapshot is None and inflight.error is None:
                    try:
                        await self.store.poll_aborted(inflight.ticket)
                    except Exception:  # as above: a trio system task must not raise
                        log.exception("capgate.poll_crashed", service=self.service)
                    if crashed is not None:
                        # refresh() raises this rather than taking the crash for an abort
                        # and polling again at once
                        inflight.error = PollError(
                            f"{self.service}: the poll failed ({type(crashed).__name__})"
                        )
                self._inflight = None
                if not self.closed:
                    try:  # collect what the answer granted (fleet mode: inside Redis)
                        await self._exchange()
                    except Exception:  # same as above: log, never crash the loop
                        log.exception("capgate.poll_crashed", service=self.service)
                inflight.done.set()
                self._wake_driver()

    async def _poll(self, inflight: _Inflight) -> None:
        """One request, its answer applied (or its failure recorded)."""
        config, store, ticket = self.config, self.store, inflight.ticket
        try:
            try:
                # the service's capacity source reads what is due (config.token is a
                # Secret: no traceback local shows it)
                snapshot, skipped = await fetch_capacity(
                    self._client, config, timeout=config.poll_timeout, clock=self._now
                )
            except CapacityGateError:
                raise
            except Exception as exc:  # e.g. a custom transport's own bug: still a failed poll
                raise PollError(  # str(exc) left out: it could echo what was sent
                    f"{self.service}: unexpected {type(exc).__name__} while polling"
                ) from exc
        except AuthenticationError as exc:
            inflight.error = exc
            await store.poll_failed(ticket, exc, 0.0)
            log.error(  # noqa: TRY400 - an expected answer, not a bug: no traceback
                "capgate.auth_failed",
                service=self.service,
                status_code=exc.status_code,
                waiting=self._waiting,
            )
            return
        except PollError as exc:
            inflight.error = exc
            delay = await store.poll_failed(ticket, exc, self.rng.random())
            log.warning(
                "capgate.poll_failed",
                service=self.service,
                error=str(exc),
                status_code=exc.status_code,
                retry_in=delay,
                waiting=self._waiting,
            )
            return
        spacing = poll_spacing(config.poll_interval, config.jitter, self.rng.random())
        await store.apply(ticket, snapshot, spacing)
        inflight.snapshot = snapshot
        self._observe(snapshot)  # before a pass plans with it
        self._known.update(row.account for row in snapshot.accounts)
        self._known.update(job.account for job in snapshot.executing if job.account)
        for row in skipped:
            log.warning(
                "capgate.row_skipped",
                service=self.service,
                section=row.section,
                index=row.index,
                reason=row.reason,
            )
        view = store.view(self._now())
        for account, cap in view.caps.items():
            if cap is not None:
                self._caps_seen[account] = cap
        log.info(
            "capgate.poll",
            service=self.service,
            accounts=len(snapshot.accounts),
            free=snapshot.total_free,
            executing=len(snapshot.executing),
            reserved=view.reserved,
            waiting=self._waiting,
            duration=snapshot.received_at - snapshot.requested_at,
        )

    async def refresh(self) -> Snapshot:
        """Poll now, or join the poll in flight (or, in a fleet, another member's)."""
        self._bind_loop()
        store = self.store
        while True:
            self.check_open()
            inflight = self._inflight
            if inflight is None:
                ticket = await store.begin_poll(force=True)
                if not isinstance(ticket, PollTicket):
                    return await self._await_fleet_snapshot()
                # in a task of its own, like a driver's: cancelling this caller leaves the
                # poll to serve the waiters
                inflight = self._start_poll(ticket)
            await inflight.done.wait()
            if inflight.snapshot is not None:
                return inflight.snapshot
            if inflight.error is not None:
                raise copy.copy(inflight.error) from inflight.error
            # the poll was aborted mid-request: make the poll ourselves

    async def _await_fleet_snapshot(self) -> Snapshot:
        """Another process holds the poll: wait for its answer (or its failure)."""
        store = self.store
        now = self._now()
        before = store.view(now)
        deadline = now + self.config.poll_timeout + LOCK_MARGIN
        listener = Waiter("refresh", 0, 0, None, now)
        while True:
            self.check_open()
            await store.wait(listener, 0.25)
            await self._exchange()
            view = store.view(self._now())
            if view.sent_tick > before.sent_tick and view.snapshot is not None:
                return view.snapshot
            if view.polls_failed > before.polls_failed and view.last_error:
                raise PollError(view.last_error)
            if self._now() > deadline:
                raise PollError(f"{self.service}: no snapshot from the fleet's poller")

    # --- the view ---------------------------------------------------------------------------

    @property
    def polling(self) -> bool:
        """Whether a poll is in flight."""
        return self._inflight is not None

    def _now_or_none(self) -> float | None:
        """The gate's time inside an event loop, else ``None`` (for reprs)."""
        return None if now_or_none() is None else self._now()

    def statistics(self) -> GateStatistics:
        now = self._now_or_none()
        view = self.store.view(now) if now is not None else self.store.view(math.nan)
        rows, capacity, free_total = account_statistics(
            view.snapshot,
            allow=self.config.allow,
            caps=view.caps,
            cap_unlisted=self._cap_unlisted,
            free=view.free,
            reserved=view.pending,
            busy=view.busy,
            quarantined=view.quarantined,
        )
        snapshot = view.snapshot
        if now is not None:
            try:
                outlooks = [self.forecast.outlook(row.account, now) for row in rows]
            except Exception:  # as in _expect: statistics() must answer  # noqa: BLE001
                self._forecast_failed()
            else:
                rows = tuple(
                    dataclasses.replace(row, **dataclasses.asdict(outlook))
                    for row, outlook in zip(rows, outlooks, strict=True)
                )
        next_poll_in = None
        if now is not None and self._waiting and self._inflight is None:
            due = self.store.poll_due_in(now)
            next_poll_in = max(0.0, due, self._planned_at - now)
        return GateStatistics(
            service=self.service,
            waiting=self._waiting if view.waiting is None else view.waiting,
            held=view.held,
            reserved=view.reserved,
            capacity=capacity,
            free=free_total,
            grants=self.grants,
            timeouts=self.timeouts,
            polls=view.polls,
            polls_failed=view.polls_failed,
            last_poll_error=view.last_error,
            snapshot_age=None if snapshot is None or now is None else now - snapshot.requested_at,
            accounts=rows,
            lag=view.lag,
            wait_buckets=self.waits.buckets(),
            wait_sum=self.waits.total,
            next_poll_in=next_poll_in,
        )

    def _cap_unlisted(self, account: str) -> int | None:
        """The cap of an account the snapshot has no row for: the last seen, or the local one."""
        seen = self._caps_seen.get(account)
        if seen is not None:
            return seen
        caps = self.config.max_jobs
        return caps if caps is None or isinstance(caps, int) else caps.get(account)

    def describe(self) -> str:
        """The body of the gate's repr. From a thread that is not the loop's it reads the
        state while the loop changes it, without waiting for the loop (a repr must not
        block): a read that meets a change in flight is tried again."""
        for _ in range(DESCRIBE_TRIES):
            try:
                return self._describe()
            except RuntimeError:  # "dictionary changed size during iteration"
                continue
        return f"{self._waiting} waiting, state changing"

    def _describe(self) -> str:
        stats = self.statistics()
        now = self._now_or_none()
        view = self.store.view(now if now is not None else math.nan)
        if stats.snapshot_age is None and view.snapshot is None:
            body = f"{stats.reserved} reserved, {stats.waiting} waiting, no snapshot"
        else:
            age = "" if stats.snapshot_age is None else f", snapshot {stats.snapshot_age:.1f} s old"
            body = f"{stats.reserved}/{stats.capacity} reserved, {stats.waiting} waiting{age}"
        out = sorted(
            (row.account, row.quarantine_reason)
            for row in stats.accounts
            if row.quarantined_for is not None
        )
        if out:
            body += ", quarantined: " + ", ".join(f"{a} ({r})" if r else a for a, r in out)
        return body + view.note

    # --- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self.closed:
            return
        self._bind_loop()  # closing on another loop than the last: that loop's client
        self.closed = True
        for waiter in list(self._iter_waiters()):
            self._fail(waiter, GateClosed(f"{self.service}: the gate is closed"))
        inflight = self._inflight
        if inflight is not None:
            inflight.scope.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            if inflight is not None:
                await inflight.done.wait()
            await self.store.aclose()
            if self._owns_client:
                await self._client.aclose()
