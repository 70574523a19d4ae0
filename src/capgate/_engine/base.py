"""The seam between the waiting core and a store, and what crosses it.

A *store* keeps what must be shared by everyone who grants slots on the same accounts: the
latest snapshot, the reservations, busy marks and quarantines, the poll timing, and the
dispatch pass that grants waiters in order. :class:`Store` is the few operations a backend
must do atomically; the in-memory store (:mod:`.local`) does them in Python, the Redis store
(:mod:`.fleet`) in one Lua script each. Everything else (waiting, the driver role, polling
over HTTP, timeouts, cancellation, errors, statistics) is the waiting core's
(:mod:`.waiting`), written once for every store, in the spirit of httpx's two-method
transport: the core calls, the store answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from .._errors import AuthenticationError, PollError
from .._models import Snapshot
from .loop import Event, checkpoint
from .loop import event as new_event

__all__ = ["Lease", "PollTicket", "Store", "StoreView", "Waiter", "Wakeup"]


class Wakeup:
    """A re-armable wake-up for one waiting task.

    A wake-up that comes while the task is awake is kept (``woken``) for its next sleep.
    The event a sleep waits on is made by that sleep, not in advance: most waiters are
    woken once, granted, and never sleep again, so none is made for nothing.

    ``wake()`` also cancels ``scope`` when one is set, so a task blocked in something other
    than :meth:`sleep` (a Redis listen in a worker thread) returns at once too.
    """

    __slots__ = ("_event", "scope", "woken")

    def __init__(self) -> None:
        self.woken = False
        self._event: Event | None = None  # only while a sleep waits on it
        self.scope: anyio.CancelScope | None = None

    def wake(self) -> None:
        self.woken = True
        if self._event is not None:
            self._event.set()
        if self.scope is not None:
            self.scope.cancel()

    async def sleep(self, timeout: float = math.inf) -> None:
        """Wait until woken or ``timeout``; a wake-up that came while awake returns at once."""
        if self.woken:
            await checkpoint()  # still a checkpoint, as waiting on a set event is
        else:
            event = self._event = new_event()  # not set: nothing runs before the wait
            try:
                if timeout == math.inf:
                    await event.wait()  # no cancel scope: most waiters wait like this
                else:
                    with anyio.move_on_after(timeout):
                        await event.wait()
            finally:
                self._event = None
        self.woken = False


@dataclass(eq=False, slots=True)
class Lease:
    """One slot granted on one account, as the store knows it.

    ``handle`` is the store's own record of it (a ledger reservation, a Redis lease id).
    ``lost`` becomes true when the store took the slot back from a holder that stopped
    renewing it (fleet mode: a paused process).
    """

    account: str
    granted_at: float
    handle: Any
    lost: bool = False


class Waiter(Wakeup):
    """One task waiting for a slot.

    Args:
        wid: An id unique across every process of a fleet, or ``""`` until a store that
            needs one names it.
        seq: Arrival order within this process.
        priority: Higher goes first.
        allowed: The accounts it may use; ``None`` for any.
        arrived: ``anyio.current_time()`` when it arrived.
    """

    __slots__ = (
        "allowed",
        "arrived",
        "deadline",
        "error",
        "lease",
        "left",
        "model",
        "priority",
        "seq",
        "wid",
    )

    def __init__(
        self, wid: str, seq: int, priority: int, allowed: frozenset[str] | None, arrived: float
    ) -> None:
        super().__init__()
        self.wid = wid
        self.seq = seq
        self.priority = priority
        self.allowed = allowed
        self.arrived = arrived
        self.lease: Lease | None = None
        self.error: BaseException | None = None
        self.left = False  # gave up: a grant that comes now must go back
        self.model: str | None = None  # an account quarantined for this model is not for it
        self.deadline = math.inf  # when it stops waiting (its timeout), if it has one

    @property
    def open(self) -> bool:
        """Still waiting: neither granted, failed nor gone."""
        return self.lease is None and self.error is None and not self.left


@dataclass(frozen=True, slots=True)
class PollTicket:
    """The right to make one poll: when its request left, in the store's logical order."""

    tick: int
    sent: float
    token: str = ""  # fleet mode: the poll lock's value
    server_sent: str = ""  # fleet mode: the server's time of sending, as the script said
    generation: str = ""  # fleet mode: the Redis data and server run its tick counts in
    failures: int = 0  # failed polls in a row before this one (for the backoff)


@dataclass(frozen=True)
class StoreView:
    """What a store holds now, for grants, errors, statistics and the repr.

    Attributes:
        snapshot: The latest snapshot, if any.
        sent_tick: The logical instant of that snapshot's request (0 before the first).
        fresh: Whether it may still serve grants.
        free: Slots grantable now per account (empty when not fresh).
        pending: Reservations per account the snapshot does not reflect yet.
        caps: The cap in force per account, where known.
        busy: Accounts marked busy by a 429 that no snapshot has lifted yet.
        quarantined: Account -> (seconds left, reason); ``math.inf`` while until restored.
        reserved: Reservations that count, over every account.
        held: Slots handed out and not yet settled.
        waiting: Waiters in the store's queue, or ``None`` when the store keeps none (the
            core counts its own).
        polls, polls_failed, last_error: Poll counts and the latest failure's message.
        lag: How far behind the service's counts were seen to run (seconds), at most.
        lag_floor: How far behind they surely ran (seconds; 0 where the store doesn't say).
        note: Appended to the repr (", fleet", ", fleet (store unreachable)").
    """

    snapshot: Snapshot | None
    sent_tick: int
    fresh: bool
    free: Mapping[str, int]
    pending: Mapping[str, int]
    caps: Mapping[str, int | None]
    busy: frozenset[str]
    quarantined: Mapping[str, tuple[float, str]]
    reserved: int
    held: int
    waiting: int | None
    polls: int
    polls_failed: int
    last_error: str | None
    lag: float
    note: str = ""
    lag_floor: float = 0.0


class Store(Protocol):
    """What a backend does atomically. One store per gate.

    Synchronous methods change the store's state at once (in memory) or record the change
    for the store to apply in order (Redis); ``flush()`` waits until recorded changes landed.
    A method returning ``True`` made room: the core then runs a dispatch pass.
    """

    #: Everything the store knows is in this process: an exchange brings no news. The core
    #: runs a dispatch pass after every change it makes, and the driver's next step catches
    #: the ones time makes (a quarantine running out, a probe). So a new waiter that may use
    #: any account, behind only such waiters, cannot be granted on arrival: the core does
    #: not exchange for it at all.
    in_process: bool

    def bind(self, clock: Callable[[], float]) -> None:
        """The core runs on an event loop: its first, or a new one after the last stopped.

        From now on read the time from ``clock``: the loop's, carried on from the old
        loop's present (:func:`~capgate._engine.loop.continued`), so every instant the store
        keeps stays valid. Leave behind what belonged to the old loop (a lock).
        """

    def view(self, now: float) -> StoreView:
        """What the store holds now (``now`` is NaN outside the event loop, for reprs)."""

    def snapshot(self) -> Snapshot | None:
        """The latest snapshot, if any."""

    def quarantined(self, now: float, model: str | None = None) -> dict[str, tuple[float, str]]:
        """Accounts out of rotation now: account -> (seconds left, reason). Cheap. With
        ``model``, also those out for that model only."""

    def auth_failure(self, now: float) -> tuple[AuthenticationError, float, object] | None:
        """The latest refused token: the error, seconds since, and a key that tells
        one refusal from the next; ``None`` after a poll succeeded."""

    # --- granting -----------------------------------------------------------------------

    #: the last grant or pass left a free slot for a faster account's (placement): a
    #: newcomer then needs a pass of its own
    holding: bool

    def grant_nowait(
        self, allowed: frozenset[str] | None, now: float, deadline: float = math.inf
    ) -> Lease | None:
        """A slot at once for a caller with nobody queued ahead (who waits at most until
        ``deadline``), or ``None``."""

    def dispatch(self, queue: Iterable[Waiter], now: float) -> list[tuple[Waiter, Lease]]:
        """One pass over ``queue`` (in service order): grant every waiter it can."""

    async def exchange(self, queue: Callable[[], Iterable[Waiter]]) -> list[tuple[Waiter, Lease]]:
        """Bring the store up to date with the queue and collect the grants it made.

        ``queue()`` gives the waiters in service order *when the store reads them*: an
        exchange may wait for another one in flight, and must see who arrived meanwhile.
        """

    async def wait(self, waiter: Waiter, timeout: float) -> None:
        """Block the driver until news may have come (or ``waiter`` is woken, or timeout)."""

    def abandon(self, waiter: Waiter, lease: Lease | None) -> bool:
        """``waiter`` left; give back ``lease`` if it was granted one."""

    # --- polling ------------------------------------------------------------------------

    def poll_due_in(self, now: float) -> float:
        """Seconds until the next poll is due (``<= 0``: due; ``inf``: not while stuck)."""

    def next_change_in(self, now: float) -> float:
        """Seconds until something changes by itself (a quarantine ends, a re-check)."""

    async def begin_poll(self, *, force: bool) -> PollTicket | float:
        """The right to poll now, or seconds until asking again makes sense."""

    async def apply(self, ticket: PollTicket, snapshot: Snapshot, spacing: float) -> None:
        """Take the answer of ``ticket``'s poll; the next poll is ``spacing`` after it."""

    async def poll_failed(
        self, ticket: PollTicket, error: PollError | AuthenticationError, u: float
    ) -> float:
        """``ticket``'s poll failed; seconds until the next poll (``u`` draws the backoff)."""

    async def poll_aborted(self, ticket: PollTicket) -> None:
        """``ticket``'s poll was cancelled mid-request (it still reached the server)."""

    # --- changes ------------------------------------------------------------------------

    def settle(self, lease: Lease, job_id: str | None, now: float) -> bool:
        """The holder submitted (or left) at ``now``: count the lease until reflected."""

    def give_back(self, lease: Lease) -> bool:
        """The holder never used the slot: it stops counting now."""

    def mark_busy(self, lease: Lease) -> bool:
        """The account answered 429: give the slot back, no grants there until a newer poll
        shows the account otherwise, or the second newer one (the ledger's busy marks)."""

    def quarantine(
        self, account: str, seconds: float, reason: str, model: str | None = None
    ) -> None:
        """Take ``account`` out of rotation for ``seconds`` (for ``model`` only, if given;
        a store may take the whole account out instead, which never oversubscribes)."""

    def restore(self, account: str) -> bool:
        """Put ``account`` back into rotation."""

    def invalidate(self) -> None:
        """The snapshot stops serving; poll as soon as the floor allows."""

    def job_ended(self, job_id: str) -> bool:
        """A completion callback said ``job_id`` ended: its slot counts as free from now,
        even while the snapshot still lists it. True if that made room now. A store may
        ignore it (the poll ``invalidate()`` asks for brings the news, later)."""

    def expect_freed(self, expected: Mapping[str, int]) -> bool:
        """Per account, listed jobs that have probably ended since the snapshot (counts
        that lag): grant that many more slots there until the next snapshot. True if some
        account expects more than before. A store may ignore it (never oversubscribing,
        only slower)."""

    def prefer_faster(
        self, snapshot: Snapshot, typical: Mapping[str, float], ends: Mapping[str, list[float]]
    ) -> None:
        """What the forecast learnt as of ``snapshot``: the typical job duration per account,
        and when each account's listed jobs are expected to end. With ``most_available``, a
        grant goes to an account with room whose jobs end markedly sooner than the pick's
        (:data:`~capgate._engine.forecast.FASTER`), and a waiter may be left for a slot
        that frees later where its job would finish sooner (:mod:`.placement`). A store may
        ignore it."""

    async def flush(self) -> None:
        """Wait (bounded) until the recorded changes reached the store."""

    async def aclose(self) -> None:
        """Let go of every resource; the store is not used again."""
