"""The in-memory store: one process's ledger, its poll timing and its dispatch pass.

Every operation is synchronous and takes effect at once, so the waiting core can grant on
the hot path without awaiting anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

from .._config import GateConfig
from .._errors import AuthenticationError, PollError
from .._log import log
from .._models import Snapshot
from .._policy import INVALIDATE_FLOOR, backoff_delay
from .._strategy import SCAN_LIMIT, Candidate, Picker, Scan
from .base import Lease, PollTicket, StoreView, Waiter
from .forecast import FASTER
from .ledger import Ledger, Reservation
from .loop import current_time
from .placement import FinishFirst

__all__ = ["MemoryStore"]


class MemoryStore:
    """A :class:`~capgate._engine.base.Store` in memory (the default)."""

    in_process = True

    def __init__(self, config: GateConfig) -> None:
        self._config = config
        self._service = config.service.name
        self._allow = config.allow
        self._clock: Callable[[], float] = current_time
        self._ledger = Ledger(lambda: self._clock(), max_jobs=config.max_jobs)
        self._rr_last: str | None = None
        self._fresh_until = -math.inf
        self._next_poll_at = -math.inf
        self._last_sent: float | None = None
        self._in_flight = False
        self._invalidated_in_flight = False
        self._failures = 0
        self._last_error: str | None = None
        self._auth_failure: tuple[AuthenticationError, float] | None = None
        self._polls = 0
        self._polls_failed = 0
        self._typical: dict[str, float] = {}  # learnt typical duration per account
        # when the listed jobs are expected to end, per account, and the snapshot they are of
        self._ends: Mapping[str, list[float]] = {}
        self._ends_of: Snapshot | None = None
        self.holding = False  # the last pass left a free slot for a faster one

    def bind(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    # --- the view -----------------------------------------------------------------------

    def _fresh(self, now: float) -> bool:
        return self._ledger.snapshot is not None and now < self._fresh_until

    def view(self, now: float) -> StoreView:
        ledger = self._ledger
        snapshot = ledger.snapshot
        fresh = self._fresh(now)
        quarantined = self.quarantined(now)
        rows = snapshot.accounts if snapshot is not None else ()
        return StoreView(
            snapshot=snapshot,
            sent_tick=ledger.snapshot_tick,
            fresh=fresh,
            free={r.account: ledger.free(r.account, now=now) for r in rows} if fresh else {},
            pending=ledger.pending_counts(),
            caps={r.account: ledger.cap(r) for r in rows},
            busy=ledger.busy_accounts(),
            quarantined=quarantined,
            reserved=ledger.reserved,
            held=ledger.open_count,
            waiting=None,
            polls=self._polls,
            polls_failed=self._polls_failed,
            last_error=self._last_error,
            lag=ledger.lag,
            lag_floor=ledger.lag_floor,
        )

    def snapshot(self) -> Snapshot | None:
        return self._ledger.snapshot

    def quarantined(self, now: float, model: str | None = None) -> dict[str, tuple[float, str]]:
        out: dict[str, tuple[float, str]] = {}
        if model is not None:  # out for this model only, unless the whole account is out
            for a, (until, reason) in self._ledger.model_quarantine_items(model, now).items():
                out[a] = (math.inf if until is None else until - now, reason)
        if not self._ledger.any_quarantined:
            return out  # the hot path: nothing is out
        out.update(
            (a, (math.inf if until is None else until - now, reason))
            for a, (until, reason) in self._ledger.quarantine_items(now).items()
        )
        return out

    def auth_failure(self, now: float) -> tuple[AuthenticationError, float, object] | None:
        if self._auth_failure is None:
            return None
        error, when = self._auth_failure
        return error, now - when, error

    # --- granting -----------------------------------------------------------------------

    def _picker(self, now: float) -> Picker | Scan | None:
        """This instant's free slots, ready to hand out; ``None`` when there are none."""
        if not self._fresh(now):
            return None
        free = self._ledger.free_accounts(now)
        config = self._config
        if (
            config.strategy == "most_available"
            and config.accounts is None
            and not self._typical
            and len(free) <= SCAN_LIMIT
        ):
            return Scan(free) if free else None  # the common case, on the hot path
        if self._allow is not None:
            free = {a: n for a, n in free.items() if a in self._allow}
        if not free:
            return None
        # free_accounts() keeps the server's order, which is the default preference order
        order: Sequence[str] | None = self._config.accounts
        if self._config.strategy == "round_robin":
            # "after the one granted last" counts full accounts too: they keep their place
            snapshot = self._ledger.snapshot
            assert snapshot is not None  # noqa: S101 - fresh
            order = [*(order or ()), *(row.account for row in snapshot.accounts)]
        return Picker(
            self._config.strategy, free, order, last=self._rr_last, describe=self._candidate
        )

    def _plan(self, picker: Picker | Scan, now: float) -> FinishFirst | None:
        """This pass's plan by expected earliest finish, when the learnt durations call for
        one (see placement.py); ``None``: grant every free slot, as the strategy picks."""
        self.holding = False
        typical = self._typical
        if (
            not typical
            or self._config.strategy != "most_available"
            or self._ends_of is not self._ledger.snapshot
        ):
            return None
        out = self.quarantined(now)
        allow = self._allow
        usable = {
            a: m for a, m in typical.items() if a not in out and (allow is None or a in allow)
        }
        if not FinishFirst.applies(picker.free, usable):
            return None
        busy = {a: list(self._ends.get(a, ())) for a in usable}
        for account, granted_at in self._ledger.pending_since():
            # a reservation the counts do not show yet: its job started about when it was
            # granted; one older than its account's typical duration is not expected to free
            if account in usable and granted_at + usable[account] > now:
                busy[account].append(granted_at + usable[account])
        # a held waiter is let go only by a pass on a fresh answer: they come a poll
        # spacing (jitter included) plus a round trip apart, so it is held only for a slot
        # expected to free two such cycles before its deadline
        snapshot = self._ledger.snapshot
        round_trip = 0.0 if snapshot is None else snapshot.received_at - snapshot.requested_at
        config = self._config
        cycle = config.poll_interval * (1 + config.jitter) + max(0.0, round_trip)
        return FinishFirst(now, picker.free, usable, busy, 2 * cycle)

    def _pick(
        self,
        picker: Picker | Scan,
        allowed: frozenset[str] | None,
        model: str | None = None,
        plan: FinishFirst | None = None,
        deadline: float = math.inf,
    ) -> str | None:
        """The account ``picker`` grants a waiter allowed ``allowed``, counted as taken;
        ``None`` also when ``plan`` leaves the waiter for a slot that frees later."""
        if model is not None:
            blocked = self._ledger.model_quarantine_items(model)
            if blocked:
                base = allowed if allowed is not None else frozenset(picker.free)
                allowed = frozenset(a for a in base if a not in blocked)
        if plan is not None:
            usable = plan.usable(allowed, deadline)
            if usable is not None:
                if not usable:
                    return None  # it finishes sooner on a slot that frees later
                allowed = usable
        try:
            account = picker.pick(allowed)
        except Exception as exc:
            log.exception(
                "capgate.strategy_failed",
                service=self._service,
                error=f"{type(exc).__name__}: {exc}",
            )
            account = Picker("most_available", dict(picker.free), ()).pick(allowed)
        if account is not None and self._typical and self._config.strategy == "most_available":
            account = self._faster(picker, allowed, account)
        if account is not None:
            picker.take(account)
            self._rr_last = account
            if plan is not None:
                plan.took(account)
        return account

    def _faster(self, picker: Picker | Scan, allowed: frozenset[str] | None, account: str) -> str:
        """``account``, or an account with room whose jobs end markedly sooner (learnt)."""
        typical = self._typical
        own = typical.get(account)
        if own is None:
            return account
        best, best_median = account, own * FASTER
        for other in picker.free:
            median = typical.get(other)
            usable = allowed is None or other in allowed
            if median is not None and median < best_median and usable:
                best, best_median = other, median
        return best

    def _candidate(self, account: str, free: int) -> Candidate:
        snapshot = self._ledger.snapshot
        row = None if snapshot is None else snapshot.account(account)
        return Candidate(
            account=account,
            free=free,
            max_jobs=None if row is None else self._ledger.cap(row),
            executing=None if row is None or snapshot is None else snapshot.running(account),
            reserved=self._ledger.pending(account),
        )

    def _lease(self, account: str, now: float) -> Lease:
        return Lease(account, now, self._ledger.reserve(account, now))

    def grant_nowait(
        self, allowed: frozenset[str] | None, now: float, deadline: float = math.inf
    ) -> Lease | None:
        picker = self._picker(now)
        if picker is None:
            return None
        if allowed is None and isinstance(picker, Scan):
            # the hot path: one pick and no more (a Scan is never made empty)
            return self._lease(cast(str, picker.pick(None)), now)
        plan = self._plan(picker, now)
        account = self._pick(picker, allowed, None, plan, deadline)
        if plan is not None and plan.held:
            self.holding = True
        return None if account is None else self._lease(account, now)

    def dispatch(self, queue: Iterable[Waiter], now: float) -> list[tuple[Waiter, Lease]]:
        picker = self._picker(now)
        if picker is None:
            return []
        # the pass stops as soon as the free slots run out, so its cost follows the grants,
        # not the length of the queue
        grants: list[tuple[Waiter, Lease]] = []
        plan = self._plan(picker, now)
        for waiter in queue:
            account = self._pick(picker, waiter.allowed, waiter.model, plan, waiter.deadline)
            if account is not None:
                grants.append((waiter, self._lease(account, now)))
                if not picker:
                    break
        # free slots left for faster ones: a newcomer must get a pass of its own (it may be
        # planned onto one of them), not wait in line for the next poll
        self.holding = plan is not None and plan.held > 0 and bool(picker)
        return grants

    async def exchange(self, queue: Callable[[], Iterable[Waiter]]) -> list[tuple[Waiter, Lease]]:
        return self.dispatch(queue(), self._clock())

    async def wait(self, waiter: Waiter, timeout: float) -> None:
        await waiter.sleep(timeout)

    def abandon(self, waiter: Waiter, lease: Lease | None) -> bool:
        return lease is not None and self.give_back(lease)

    # --- polling ------------------------------------------------------------------------

    def poll_due_in(self, now: float) -> float:
        return self._next_poll_at - now

    def next_change_in(self, now: float) -> float:
        # drop expired quarantines first, whole-account and per-model alike: one left behind
        # (its account absent from the snapshot, or no waiter for that model asking) would
        # be "due" forever and spin the driver
        self._ledger.quarantine_items(now)
        self._ledger.model_quarantine_items("", now)  # drops every expired one
        expiry = self._ledger.next_quarantine_expiry()
        return math.inf if expiry is None else expiry - now

    async def begin_poll(self, *, force: bool) -> PollTicket | float:
        now = self._clock()
        self._in_flight = True
        self._invalidated_in_flight = False
        self._last_sent = now
        return PollTicket(self._ledger.tick(), now)

    async def apply(self, ticket: PollTicket, snapshot: Snapshot, spacing: float) -> None:
        self._in_flight = False
        self._ledger.apply_snapshot(snapshot, ticket.tick)
        self._next_poll_at = ticket.sent + spacing
        # freshness runs from the answer's arrival: an answer slower than poll_interval is
        # still the newest there is, and must serve the waiters (else they starve, polling)
        self._fresh_until = snapshot.received_at + spacing
        if self._invalidated_in_flight:
            # the news came after this request went: poll again soon, but let the answer
            # serve meanwhile. A job that ended only frees room, so it counts too few free
            # slots, never too many; and with an answer slower than the floor, ending its
            # service at once left every answer stale on arrival while callbacks kept coming
            # (the waiters starved, the gate polled without pause)
            self._invalidated_in_flight = False
            soonest = max(snapshot.received_at, ticket.sent + INVALIDATE_FLOOR)
            self._next_poll_at = min(self._next_poll_at, soonest)
        self._polls += 1
        self._failures = 0
        self._last_error = None
        self._auth_failure = None

    async def poll_failed(
        self, ticket: PollTicket, error: PollError | AuthenticationError, u: float
    ) -> float:
        self._in_flight = False
        now = self._clock()
        self._polls_failed += 1
        self._last_error = str(error)
        interval = self._config.poll_interval
        if isinstance(error, AuthenticationError):
            self._auth_failure = (error, now)
            delay = interval
        else:
            self._failures += 1
            delay = backoff_delay(
                interval, self._config.max_backoff, self._failures, u, error.retry_after
            )
        self._next_poll_at = now + delay
        return delay

    async def poll_aborted(self, ticket: PollTicket) -> None:
        # the request still reached the server, so the spacing rule holds
        self._in_flight = False
        self._next_poll_at = max(self._next_poll_at, ticket.sent + self._config.poll_interval)

    # --- changes ------------------------------------------------------------------------

    @staticmethod
    def _res(lease: Lease) -> Reservation:
        res: Reservation = lease.handle
        return res

    def settle(self, lease: Lease, job_id: str | None, now: float) -> bool:
        counted = self._ledger.reserved
        self._ledger.settle(self._res(lease), job_id, now)
        return self._ledger.reserved < counted  # its job is already listed: room now

    def give_back(self, lease: Lease) -> bool:
        return self._ledger.give_back(self._res(lease))

    def mark_busy(self, lease: Lease) -> bool:
        self._ledger.give_back(self._res(lease))
        self._ledger.mark_busy(lease.account)
        return True

    def quarantine(
        self, account: str, seconds: float, reason: str, model: str | None = None
    ) -> None:
        until = self._clock() + seconds
        if model is None:
            self._ledger.quarantine(account, until, reason)
        else:
            self._ledger.quarantine_model(account, model, until, reason)

    def restore(self, account: str) -> bool:
        return self._ledger.restore(account)

    def invalidate(self) -> None:
        if self._failures:
            return  # never inside a backoff after a failed poll
        now = self._clock()
        last = self._fresh_until if self._last_sent is None else self._last_sent
        soonest = max(now, last + INVALIDATE_FLOOR)
        self._next_poll_at = min(self._next_poll_at, soonest)
        self._fresh_until = min(self._fresh_until, soonest)
        # the answer of a poll already on the wire may predate this news: its arrival
        # must not push the next poll back to a full poll_interval
        self._invalidated_in_flight = self._in_flight

    def job_ended(self, job_id: str) -> bool:
        return self._ledger.job_ended(job_id)

    def expect_freed(self, expected: Mapping[str, int]) -> bool:
        return self._ledger.expect_freed(expected)

    def prefer_faster(
        self, snapshot: Snapshot, typical: Mapping[str, float], ends: Mapping[str, list[float]]
    ) -> None:
        self._typical = dict(typical)
        self._ends, self._ends_of = ends, snapshot

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
