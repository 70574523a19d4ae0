"""Local reservations and the accounting rule.

Pure and synchronous: it takes a clock and never awaits, so it is tested without an event
loop, and a shared backend can replace it later.

The rule. For an account ``a`` in the latest snapshot::

    free(a) = min(server_free(a), cap(a) - executing(a)) - pending(a)      (clamped at 0)

where ``server_free`` is ``available`` clamped to ``[0, maxJobs - executing]``, ``cap`` is
``min(server maxJobs, local max_jobs)`` and ``pending`` counts the reservations the snapshot
does not reflect yet. An account missing from the snapshot has no free slot.

A reservation is *open* from its grant until it is *settled* (``mark_submitted`` or the
slot's exit). It counts until a snapshot arrives whose request was sent after it settled,
or, once settled with a job id, until a snapshot lists that job as executing. A reservation
whose holder never used it is *given back*: it stops counting at once.

Counts that lag. useapi's numbers are its own bookkeeping and may run behind. When a job id
the ledger stopped counting (by the rule above) shows up as executing in a later snapshot,
the counts lagged by at most the time from its settle to the snapshot that listed it (and
by more than the time to the last snapshot that missed it). From then on every settled
reservation keeps counting until a snapshot requested more than that lag after its settle
(or, with a job id, until a snapshot lists the job): one settled without a job id cannot be
matched, so only time releases it. A snapshot's own evidence of lag is learnt before it
releases anything. With counts that do not lag, nothing is ever learnt and the rule above
holds exactly. Before the first lag is seen the gate cannot know, and its own jobs may
exceed the local cap by those settled in that window.

Jobs known to have ended. Once the counts have been seen to lag, a completion callback that
names the job that ended is used as it comes: its reservation
stops counting at once, and while a snapshot still lists it (counts that lag, or a snapshot
taken before it ended) its slot counts as free on the account the listing names.

Busy marks. A 429 marks its account busy: no grants there until a snapshot whose request
left after the 429 shows the account's room otherwise than the snapshot the 429
contradicted, or until the second such snapshot. An unchanged answer is no news against the
429: with counts that lag, before the lag is known, the answers right after the first grants
still show every slot free, and lifting the mark at once cost ten 429s more on the
lagging-counts benchmark.

"After" is decided by a logical sequence number, not by the clock: every settle, busy mark
and poll start takes the next tick, so two events at the same (virtual) instant still have an
order and the rule stays exact.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .._models import AccountCapacity, Snapshot
from .._policy import LAG_MARGIN, LAG_SAMPLES, WATCH_FOR, WATCH_MAX

__all__ = ["Ledger", "Reservation", "cap_for", "row_limit", "row_room"]


def cap_for(row: AccountCapacity, caps: int | Mapping[str, int] | None) -> int | None:
    """``min(server maxJobs, local cap)`` for one row; ``None`` when neither is known."""
    local = caps if caps is None or isinstance(caps, int) else caps.get(row.account)
    if row.max_jobs is None:
        return local
    return row.max_jobs if local is None else min(row.max_jobs, local)


def row_limit(snapshot: Snapshot, row: AccountCapacity, cap: int | None) -> int:
    """``min(server_free, cap - running)``: an account's room before reservations.

    ``running`` is the row's count, or the jobs ``executing[]`` lists for the account when
    the row does not say (a row with only ``available``): those jobs hold slots of the cap.
    """
    return max(0, row_room(snapshot, row, cap))


def row_room(snapshot: Snapshot, row: AccountCapacity, cap: int | None) -> int:
    """:func:`row_limit` before it is clamped at 0: negative while the account runs more
    jobs than its cap (or the server's ``maxJobs``) allows."""
    limit = row.free
    if row.max_jobs is not None and row.executing is not None:
        limit = min(limit, row.max_jobs - row.executing)
    if cap is not None:
        limit = min(limit, cap - (snapshot.running(row.account) or 0))
    return limit


@dataclass(slots=True)  # one per grant: quicker to build, and smaller while it counts
class Reservation:
    """One slot reserved on one account (internal bookkeeping)."""

    id: int
    account: str
    granted_at: float
    settled_tick: int | None = None
    job_id: str | None = None
    settled_at: float = 0.0
    missed_at: float | None = None  # a snapshot after settling did not list it yet

    @property
    def settled(self) -> bool:
        return self.settled_tick is not None


class Ledger:
    """Reservations, busy marks and quarantines for one gate.

    Args:
        clock: Returns the current time in seconds (``anyio.current_time`` in the gate).
        max_jobs: A local cap: one int for every account, or a mapping per account.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_jobs: int | Mapping[str, int] | None = None,
    ) -> None:
        self._clock = clock
        self._caps = max_jobs
        self._ticks = itertools.count(1)
        self._ids = itertools.count(1)
        self._reservations: dict[int, Reservation] = {}
        self._pending: Counter[str] = Counter()
        self._snapshot: Snapshot | None = None
        self._limits: dict[str, int] = {}  # per account: room before reservations
        self._rooms: dict[str, int] = {}  # the same, not clamped at 0 (over its cap: < 0)
        # per account: listed jobs that have probably ended since (counts that lag; see
        # forecast.py), granted as probes until the next snapshot
        self._expected: dict[str, int] = {}
        self._snapshot_tick = 0
        self._busy: dict[str, int] = {}  # account -> tick of the 429
        # account -> the room the snapshot showed when the 429 contradicted it (until a
        # snapshot showing the same room was let pass once)
        self._busy_room: dict[str, int | None] = {}
        self._quarantine: dict[str, tuple[float | None, str]] = {}  # account -> (until, reason)
        # (account, model) -> (until, reason): out of rotation for that model only
        self._model_quarantine: dict[tuple[str, str], tuple[float | None, str]] = {}
        self._lag = 0.0
        # (at most, at least) per late listing: the lag is the largest "at most" of the
        # recent ones, the floor the largest "at least" (never above the lag)
        self._lag_samples: deque[tuple[float, float]] = deque(maxlen=LAG_SAMPLES)
        self._lag_floor = 0.0
        # dropped job id -> (when it was settled, when a snapshot first missed it)
        self._watch: dict[str, tuple[float, float]] = {}
        # job id -> when a callback said it ended; per account, how many of them the
        # snapshot still lists (their slots are free whatever the counts say)
        self._ended: dict[str, float] = {}
        self._ended_listed: Counter[str] = Counter()

    # --- time and ticks ---------------------------------------------------------------

    def tick(self) -> int:
        """The next logical instant; a poll takes one just before its request is sent."""
        return next(self._ticks)

    # --- the snapshot -----------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def snapshot_tick(self) -> int:
        """The logical instant the latest snapshot's request was sent (0 before any)."""
        return self._snapshot_tick

    def apply_snapshot(self, snapshot: Snapshot, sent_tick: int) -> None:
        """Take a new snapshot whose request was sent at logical instant ``sent_tick``.

        Reservations it reflects stop counting; busy marks older than it are lifted. A
        snapshot older than the one in hand (by ``sent_tick``) is ignored.
        """
        if sent_tick < self._snapshot_tick:
            return
        self._snapshot = snapshot
        self._snapshot_tick = sent_tick
        self._rooms = {r.account: row_room(snapshot, r, self.cap(r)) for r in snapshot.accounts}
        self._limits = {account: max(0, room) for account, room in self._rooms.items()}
        self._expected = {}
        seen_at = snapshot.requested_at
        # this snapshot's own evidence of lag counts for what it releases
        for res in self._reservations.values():
            listed = res.job_id is not None and snapshot.lists_job(res.job_id)
            if listed and res.missed_at is not None:
                self._learn_lag(seen_at - res.settled_at, res.missed_at - res.settled_at)
        self._watch_for_lag(snapshot)
        allowance = self._lag * LAG_MARGIN
        for res in list(self._reservations.values()):
            if res.settled_tick is None:
                continue
            if res.job_id is not None and snapshot.lists_job(res.job_id):
                self._drop(res)
            elif res.settled_tick < sent_tick:
                if allowance > 0 and seen_at - res.settled_at <= allowance:
                    res.missed_at = seen_at  # the counts lag: keep counting it for now
                    continue
                if res.job_id is not None:
                    self._watch[res.job_id] = (res.settled_at, seen_at)
                self._drop(res)
        for account, busy_tick in list(self._busy.items()):
            if busy_tick < sent_tick:
                # an answer that shows the account as the one the 429 contradicted is no
                # news against it (counts that lag, before the lag is known): the mark
                # outlasts one such answer, and no more
                shown = self._busy_room.pop(account, -1)
                if shown != -1 and shown == self._limits.get(account):
                    continue
                del self._busy[account]
        self._count_ended(snapshot)

    # --- counts that lag ---------------------------------------------------------------

    @property
    def lag(self) -> float:
        """How far behind the server's counts have been seen to run (seconds; 0 if never)."""
        return self._lag

    @property
    def lag_floor(self) -> float:
        """The least the counts have surely lagged by (seconds; 0 if never seen): a job
        listed late was missing from a snapshot this long after its settle."""
        return self._lag_floor

    def _learn_lag(self, evidence: float, floor: float = 0.0) -> None:
        if evidence > 0:
            self._lag_samples.append((evidence, min(floor, evidence)))
            self._lag = max(most for most, _ in self._lag_samples)
            self._lag_floor = min(self._lag, max(least for _, least in self._lag_samples))

    def _watch_for_lag(self, snapshot: Snapshot) -> None:
        """A job dropped by rule 2 that a later snapshot lists shows the counts lag."""
        seen_at = snapshot.requested_at
        for job_id, (settled_at, missed_at) in list(self._watch.items()):
            if snapshot.lists_job(job_id):
                self._learn_lag(seen_at - settled_at, missed_at - settled_at)
                del self._watch[job_id]
            elif seen_at - settled_at > WATCH_FOR:
                del self._watch[job_id]
            else:
                self._watch[job_id] = (settled_at, seen_at)  # missed once more: a surer floor
        while len(self._watch) > WATCH_MAX:
            del self._watch[next(iter(self._watch))]

    # --- jobs known to have ended -----------------------------------------------------

    def job_ended(self, job_id: str, now: float | None = None) -> bool:
        """A callback said ``job_id`` ended. True if that freed a slot the rule counted
        as taken (its reservation, or its row in the snapshot).

        Only once the counts have been seen to lag: before that, the poll ``invalidate()``
        asks for (within 0.5 s) brings the same news with a fresh view of every account,
        which measured better where durations differ by account (``benchmarks/README.md``).
        """
        if self._lag <= 0:
            return False
        now = self._clock() if now is None else now
        if job_id in self._ended:
            return False
        self._ended[job_id] = now
        while len(self._ended) > WATCH_MAX:
            del self._ended[next(iter(self._ended))]
        freed = False
        for res in self._reservations.values():
            if res.job_id == job_id:
                self._drop(res)
                freed = True
                break
        snapshot = self._snapshot
        if snapshot is not None and snapshot.lists_job(job_id):
            account = snapshot.job_account(job_id)
            if account is not None:
                self._ended_listed[account] += 1
                freed = True
        return freed

    def _count_ended(self, snapshot: Snapshot) -> None:
        """Count the ended jobs ``snapshot`` still lists; forget the old ones it does not."""
        self._ended_listed = Counter()
        ended = self._ended
        if not ended:
            return
        counted: set[str] = set()  # a job listed twice still holds one slot
        for job in snapshot.executing:
            if job.account is not None and job.job_id in ended and job.job_id not in counted:
                counted.add(job.job_id)
                self._ended_listed[job.account] += 1
        horizon = snapshot.requested_at - max(WATCH_FOR, self._lag * LAG_MARGIN)
        for job_id, ended_at in list(ended.items()):
            if ended_at < horizon and not snapshot.lists_job(job_id):
                del ended[job_id]

    # --- reservations -----------------------------------------------------------------

    def reserve(self, account: str, now: float | None = None) -> Reservation:
        """Record a grant on ``account`` (the caller checked :meth:`free` first)."""
        res = Reservation(next(self._ids), account, self._clock() if now is None else now)
        self._reservations[res.id] = res
        self._pending[account] += 1
        return res

    def settle(self, res: Reservation, job_id: str | None = None, now: float | None = None) -> None:
        """The holder submitted its job (or left the slot): count it until reflected."""
        if res.id not in self._reservations or res.settled:
            return
        res.settled_tick = self.tick()
        res.settled_at = self._clock() if now is None else now
        res.job_id = job_id
        if job_id is not None and (
            job_id in self._ended  # its callback came first: it ended already
            or (self._snapshot is not None and self._snapshot.lists_job(job_id))
        ):
            self._drop(res)

    def give_back(self, res: Reservation) -> bool:
        """The holder never used the slot: it stops counting at once. True if it counted."""
        if res.id not in self._reservations:
            return False
        self._drop(res)
        return True

    def _drop(self, res: Reservation) -> None:
        del self._reservations[res.id]
        self._pending[res.account] -= 1
        if self._pending[res.account] <= 0:
            del self._pending[res.account]

    def pending(self, account: str) -> int:
        """Reservations on ``account`` the snapshot does not reflect yet."""
        return self._pending.get(account, 0)

    def pending_since(self) -> list[tuple[str, float]]:
        """``(account, granted at)`` of every reservation the snapshot does not reflect yet."""
        return [(r.account, r.granted_at) for r in self._reservations.values()]

    def pending_counts(self) -> dict[str, int]:
        """Reservations per account the snapshot does not reflect yet."""
        return dict(self._pending)

    @property
    def reserved(self) -> int:
        """All reservations that count, over every account."""
        return len(self._reservations)

    @property
    def open_count(self) -> int:
        """Reservations not yet settled (slots held right now)."""
        return sum(1 for r in self._reservations.values() if not r.settled)

    # --- the accounting rule ----------------------------------------------------------

    def cap(self, row: AccountCapacity) -> int | None:
        """``min(server maxJobs, local cap)``; ``None`` when neither is known."""
        return cap_for(row, self._caps)

    def free(self, account: str, *, now: float | None = None) -> int:
        """Slots the gate may grant on ``account`` now (0 if busy or quarantined)."""
        if account in self._busy or self.quarantined(account, now=now) is not None:
            return 0
        return self.room(account)

    def room(self, account: str) -> int:
        """The accounting rule alone, ignoring busy marks and quarantine."""
        expected = self._expected.get(account, 0) if self._expected else 0
        if self._ended_listed:
            # a probe may be on a job known ended: the larger of the two, never the sum
            expected = max(expected, self._ended_listed.get(account, 0))
        if not expected:
            return max(0, self._limits.get(account, 0) - self._pending.get(account, 0))
        # a probe frees a slot only if the account is then below its cap: the room before
        # clamping (an account left out of the answer is full, or over its local cap)
        room = self._rooms.get(account)
        if room is None:
            room = self._unlisted_room(account)
        return max(0, room + expected - self._pending.get(account, 0))

    def _unlisted_room(self, account: str) -> int:
        """Room on an account the answer left out (full): 0, or less when it lists more
        jobs under it than the local cap allows."""
        caps = self._caps
        cap = caps if caps is None or isinstance(caps, int) else caps.get(account)
        if cap is None or self._snapshot is None:
            return 0
        return min(0, cap - (self._snapshot.running(account) or 0))

    def expect_freed(self, expected: Mapping[str, int]) -> bool:
        """Count ``expected[a]`` more slots on ``a``: listed jobs that have probably ended
        since the snapshot (replaces the previous expectation; a snapshot clears it).
        True if some account expects more than before.

        A grant on such a slot is a probe: a 429 marks the account busy (:meth:`mark_busy`),
        so each account costs at most one 429 per snapshot.
        """
        before = self._expected
        self._expected = {a: n for a, n in expected.items() if n > 0}
        return any(n > before.get(a, 0) for a, n in self._expected.items())

    def _limit(self, snapshot: Snapshot, row: AccountCapacity) -> int:
        return row_limit(snapshot, row, self.cap(row))

    def free_accounts(self, now: float | None = None) -> dict[str, int]:
        """Every account with room now, in the snapshot's order."""
        if self._snapshot is None:
            return {}
        result = {}
        busy, quarantine = self._busy, self._quarantine
        for row in self._snapshot.accounts:
            account = row.account
            if account in busy or (
                account in quarantine and self.quarantined(account, now=now) is not None
            ):
                continue
            n = self.room(account)
            if n > 0:
                result[account] = n
        # full accounts are often left out of the snapshot
        for account in (
            (*self._expected, *self._ended_listed) if self._expected or self._ended_listed else ()
        ):
            if account not in result and account not in busy and self._limits.get(account) is None:
                if account in quarantine and self.quarantined(account, now=now) is not None:
                    continue
                n = self.room(account)
                if n > 0:
                    result[account] = n
        return result

    # --- busy marks -------------------------------------------------------------------

    def mark_busy(self, account: str) -> None:
        """The account answered 429: no grants on it until a snapshot sent after now that
        shows it otherwise than the latest does, or the second such snapshot."""
        self._busy[account] = self.tick()
        self._busy_room[account] = self._limits.get(account)

    def is_busy(self, account: str) -> bool:
        return account in self._busy

    def busy_accounts(self) -> frozenset[str]:
        return frozenset(self._busy)

    # --- quarantine -------------------------------------------------------------------

    def quarantine(self, account: str, until: float | None, reason: str) -> None:
        """Take ``account`` out of rotation until ``until`` (``None``: until restored)."""
        self._quarantine[account] = (until, reason)

    @property
    def any_quarantined(self) -> bool:
        """Whether any account is (or was until now) out of rotation."""
        return bool(self._quarantine)

    def restore(self, account: str) -> bool:
        """Put ``account`` back into rotation, for every model too; True if it was out."""
        models = [key for key in self._model_quarantine if key[0] == account]
        for key in models:
            del self._model_quarantine[key]
        return self._quarantine.pop(account, None) is not None or bool(models)

    def quarantine_model(self, account: str, model: str, until: float | None, reason: str) -> None:
        """Take ``account`` out of rotation for ``model`` only, until ``until``."""
        self._model_quarantine[(account, model)] = (until, reason)

    def model_quarantine_items(
        self, model: str, now: float | None = None
    ) -> dict[str, tuple[float | None, str]]:
        """Accounts out of rotation for ``model`` now (expired entries are dropped)."""
        if not self._model_quarantine:
            return {}
        now = self._clock() if now is None else now
        out = {}
        for (account, which), (until, reason) in list(self._model_quarantine.items()):
            if until is not None and now >= until:
                del self._model_quarantine[(account, which)]
            elif which == model:
                out[account] = (until, reason)
        return out

    def quarantined(
        self, account: str, *, now: float | None = None
    ) -> tuple[float | None, str] | None:
        """``(until, reason)`` while ``account`` is out of rotation, else ``None``."""
        entry = self._quarantine.get(account)
        if entry is None:
            return None
        until = entry[0]
        if until is not None and (self._clock() if now is None else now) >= until:
            del self._quarantine[account]
            return None
        return entry

    def quarantine_items(self, now: float | None = None) -> dict[str, tuple[float | None, str]]:
        """Every account out of rotation now, with ``(until, reason)``."""
        now = self._clock() if now is None else now
        for account in list(self._quarantine):
            self.quarantined(account, now=now)
        return dict(self._quarantine)

    def next_quarantine_expiry(self) -> float | None:
        """The earliest instant a quarantine runs out, if any does."""
        entries = (*self._quarantine.values(), *self._model_quarantine.values())
        times = [until for until, _ in entries if until is not None]
        return min(times) if times else None

    def all_quarantined(self, accounts: Iterable[str], now: float | None = None) -> bool:
        """True when ``accounts`` is not empty and every one of them is out of rotation."""
        seen = False
        for account in accounts:
            seen = True
            if self.quarantined(account, now=now) is None:
                return False
        return seen
