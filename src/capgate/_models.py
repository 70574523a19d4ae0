"""The gate's data: snapshots of the endpoint, and statistics.

Parsing is lenient about what may be missing (the docs say every field is optional) and
strict about what is there: a row with a negative or non-numeric count, or with no account,
is skipped and reported, and the rest of the answer is used.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ._errors import PollError

if TYPE_CHECKING:
    from ._services import Service

__all__ = [
    "WAIT_BUCKETS",
    "AccountCapacity",
    "AccountStatistics",
    "ExecutingJob",
    "GateStatistics",
    "Snapshot",
    "WaitHistogram",
    "account_statistics",
    "format_elapsed",
    "parse_elapsed",
    "parse_snapshot",
]


@dataclass(frozen=True)
class AccountCapacity:
    """One row of ``available[]``: an account's capacity as the server counts it.

    Attributes:
        account: The email, user id or account name.
        max_jobs: ``maxJobs``, or ``None`` when the server left it out.
        executing: ``executing``, or ``None`` when the server left it out.
        available: ``available``, or ``None`` when the server left it out.
    """

    account: str
    max_jobs: int | None
    executing: int | None
    available: int | None

    @property
    def free(self) -> int:
        """Free slots by the server's count: ``available`` clamped to ``[0, maxJobs - executing]``.

        ``available`` should equal ``maxJobs - executing`` but is never trusted blindly: when
        both are given the smaller wins.
        """
        candidates = []
        if self.available is not None:
            candidates.append(self.available)
        if self.max_jobs is not None and self.executing is not None:
            candidates.append(self.max_jobs - self.executing)
        if not candidates:
            return 0
        return max(0, min(candidates))

    @property
    def busy(self) -> int | None:
        """Jobs executing by the server's count, derived from the other fields if missing."""
        if self.executing is not None:
            return self.executing
        if self.max_jobs is not None and self.available is not None:
            return max(0, self.max_jobs - self.available)
        return None


@dataclass(frozen=True)
class ExecutingJob:
    """One row of ``executing[]``: a job the server counts against an account.

    Attributes:
        job_id: The job's id as a string (Kling's numeric ids are turned into strings).
        account: The account running it, from the row or embedded in the id; ``None`` if
            neither names it.
        started: When it started, if the server said (ISO string or epoch number).
        elapsed: The server's ``elapsed`` text (``"03:45"``, ``"1m 23s"``), if any.
        elapsed_seconds: ``elapsed`` in seconds (``MM:SS``, Dreamina's ``elapsedSeconds``,
            ``"45s"`` / ``"1m 23s"``), when readable.
    """

    job_id: str
    account: str | None
    started: datetime | None = None
    elapsed: str | None = None
    # derived from elapsed (or elapsedSeconds), so it takes no part in equality
    elapsed_seconds: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Snapshot:
    """One answer of ``scheduler/available``, parsed.

    Attributes:
        service: The service name.
        accounts: The rows of ``available[]`` that parsed, in the server's order. Accounts
            with no free slot are usually left out by the server; capgate treats a missing
            account as full.
        executing: The rows of ``executing[]`` that parsed.
        requested_at: ``anyio.current_time()`` when the request was sent. A reservation
            settled before this instant is reflected in the snapshot's counts.
        received_at: ``anyio.current_time()`` when the answer was parsed.
        skipped: How many rows were malformed and left out.
    """

    service: str
    accounts: tuple[AccountCapacity, ...]
    executing: tuple[ExecutingJob, ...]
    requested_at: float
    received_at: float
    skipped: int = 0
    _by_account: Mapping[str, AccountCapacity] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _job_accounts: Mapping[str, str | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _listed: Mapping[str, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_account", {a.account: a for a in self.accounts})
        accounts: dict[str, str | None] = {}
        for job in self.executing:
            accounts.setdefault(job.job_id, job.account)
        object.__setattr__(self, "_job_accounts", accounts)
        listed: dict[str, int] = {}
        for job in self.executing:
            if job.account is not None:
                listed[job.account] = listed.get(job.account, 0) + 1
        object.__setattr__(self, "_listed", listed)

    def account(self, name: str) -> AccountCapacity | None:
        """The row for ``name``, or ``None`` when the server left it out (full)."""
        return self._by_account.get(name)

    def free(self, name: str) -> int:
        """Free slots on ``name`` by the server's count; 0 for a missing account."""
        row = self._by_account.get(name)
        return 0 if row is None else row.free

    def running(self, name: str) -> int | None:
        """Jobs running on ``name``: the row's count, else the jobs ``executing[]`` lists for it.

        A row with only ``available`` says nothing of what runs; the jobs listed under the
        account still do (``None`` when there is neither a row count nor a listed job).
        """
        row = self._by_account.get(name)
        busy = None if row is None else row.busy
        if busy is not None:
            return busy
        return self._listed.get(name)

    def lists_job(self, job_id: str) -> bool:
        """Whether ``job_id`` is among the executing jobs."""
        return job_id in self._job_accounts

    def job_account(self, job_id: str) -> str | None:
        """The account ``executing[]`` lists ``job_id`` under (``None``: not listed, or
        listed with no account)."""
        return self._job_accounts.get(job_id)

    @property
    def total_free(self) -> int:
        """Free slots over all accounts by the server's count."""
        return sum(a.free for a in self.accounts)


@dataclass(frozen=True)
class AccountStatistics:
    """One account as the gate sees it now.

    Attributes:
        account: The account.
        max_jobs: The cap in force: ``min(server maxJobs, local max_jobs)``; ``None`` if unknown.
        executing: Jobs executing by the latest snapshot (``None`` if unknown or not listed).
        reserved: Local reservations the latest snapshot does not reflect yet.
        free: Slots the gate would grant now on this account.
        busy: The account answered 429 and no snapshot since has lifted the mark: no grants
            until a newer snapshot shows it otherwise, or the second newer one.
        quarantined_for: Seconds of quarantine left, or ``None`` when in rotation.
        quarantine_reason: Why it was quarantined (``""`` when in rotation).
        median_duration: The median duration (seconds) of its jobs the gate saw end
            (they drop off ``executing[]``); ``None`` until one has.
        next_completion: Seconds from now until one of its executing jobs has more likely
            than not ended (0 when that is already so), by the durations learnt; ``None``
            when nothing runs there or the jobs are older than any seen to end.
    """

    account: str
    max_jobs: int | None
    executing: int | None
    reserved: int
    free: int
    busy: bool = False
    quarantined_for: float | None = None
    quarantine_reason: str = ""
    median_duration: float | None = None
    next_completion: float | None = None


@dataclass(frozen=True)
class GateStatistics:
    """What a gate is doing, at one instant. Never contains the token.

    Attributes:
        service: The service name.
        waiting: Tasks waiting for a slot.
        held: Slots handed out and not yet released.
        reserved: Reservations counted against the accounts (held ones, plus released ones
            the latest snapshot does not reflect yet).
        capacity: Sum of the caps over the accounts in the latest snapshot.
        free: Slots the gate would grant now.
        grants: Slots granted since the gate was made.
        timeouts: Waiters that gave up with ``SlotTimeout``.
        polls: Polls that succeeded.
        polls_failed: Polls that failed (and were retried).
        last_poll_error: The latest failure's message, until a poll succeeds.
        snapshot_age: Seconds since the latest snapshot was requested; ``None`` if none yet.
        accounts: Per-account detail, in the latest snapshot's order, then quarantined ones.
        lag: How far behind the service's counts have been seen to run, in seconds (``0.0``
            until a lag is seen).
        wait_buckets: How long granted callers waited: ``(upper bound in seconds, grants
            that waited at most that long)`` per bound of :data:`WAIT_BUCKETS`, cumulative,
            the last bound ``inf`` (a Prometheus histogram's shape). This gate's own grants.
        wait_sum: Seconds waited, summed over this gate's grants.
        next_poll_in: Seconds until the next poll while tasks wait (``poll_interval`` after
            the last, or later when no slot is likely to free before); ``None`` while
            nobody waits (nothing polls) or a poll is in flight.
    """

    service: str
    waiting: int
    held: int
    reserved: int
    capacity: int
    free: int
    grants: int
    timeouts: int
    polls: int
    polls_failed: int
    last_poll_error: str | None
    snapshot_age: float | None
    accounts: tuple[AccountStatistics, ...] = ()
    lag: float = 0.0
    wait_buckets: tuple[tuple[float, int], ...] = ()
    wait_sum: float = 0.0
    next_poll_in: float | None = None


#: the upper bounds (seconds) of GateStatistics.wait_buckets
WAIT_BUCKETS: tuple[float, ...] = (
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    math.inf,
)


class WaitHistogram:
    """How long grants waited, counted per bound of :data:`WAIT_BUCKETS` (internal)."""

    __slots__ = ("_counts", "total")

    def __init__(self) -> None:
        self._counts = [0] * len(WAIT_BUCKETS)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> tuple[tuple[float, int], ...]:
        """Cumulative counts per upper bound."""
        out, running = [], 0
        for bound, n in zip(WAIT_BUCKETS, self._counts, strict=True):
            running += n
            out.append((bound, running))
        return tuple(out)


def account_statistics(
    snapshot: Snapshot | None,
    *,
    allow: frozenset[str] | None,
    caps: Mapping[str, int | None],
    cap_unlisted: Callable[[str], int | None],
    free: Mapping[str, int],
    reserved: Mapping[str, int],
    busy: Collection[str],
    quarantined: Mapping[str, tuple[float, str]],
) -> tuple[tuple[AccountStatistics, ...], int, int]:
    """Per-account statistics, as any store's view shows its accounts.

    Every account counts: the rows of ``available[]``, then (sorted) the accounts the service
    left out of it as full but lists in ``executing[]``, and the quarantined ones.

    Args:
        snapshot: The latest snapshot, if any.
        allow: The gate's allow-list.
        caps: The cap in force per row of the snapshot.
        cap_unlisted: The cap of an account without a row (the last one seen, the local
            cap), or ``None`` when unknown: a full account then counts its running jobs.
        free: Slots grantable now per account (empty when the snapshot is stale).
        reserved: Reservations per account the snapshot does not reflect yet.
        busy: Accounts marked busy.
        quarantined: Account -> (seconds of quarantine left, reason).

    Returns:
        The rows, the sum of the caps and the sum of the free slots.
    """
    rows: list[AccountStatistics] = []
    capacity = free_total = 0

    def one(account: str, max_jobs: int | None, executing: int | None, n: int) -> None:
        entry = quarantined.get(account)
        rows.append(
            AccountStatistics(
                account=account,
                max_jobs=max_jobs,
                executing=executing,
                reserved=reserved.get(account, 0),
                free=n,
                busy=account in busy,
                quarantined_for=None if entry is None else max(0.0, entry[0]),
                quarantine_reason="" if entry is None else entry[1],
            )
        )

    listed: set[str] = set()
    for row in snapshot.accounts if snapshot is not None else ():
        if allow is not None and row.account not in allow:
            continue
        listed.add(row.account)
        limit = caps.get(row.account)
        capacity += limit or 0
        n = free.get(row.account, 0)
        free_total += n
        one(row.account, limit, snapshot.running(row.account) if snapshot else row.busy, n)
    full = {j.account for j in snapshot.executing if j.account} if snapshot is not None else set()
    for account in sorted((full | set(quarantined)) - listed):
        if allow is not None and account not in allow:
            continue
        running = None if snapshot is None else snapshot.running(account)
        cap = cap_unlisted(account)
        if cap is None:
            cap = running  # left out as full: it runs as many as it may
        capacity += cap or 0
        one(account, cap, running, 0)
    return tuple(rows), capacity, free_total


for _cls in (AccountCapacity, ExecutingJob, Snapshot, AccountStatistics, GateStatistics):
    _cls.__module__ = "capgate"
del _cls


# --- parsing ---------------------------------------------------------------------------


#: a count above this is no count anyone means; fleet mode's Lua holds counts in doubles,
#: where past 1.8e308 they become inf, which its JSON encoder refuses
MAX_COUNT = 2**53


class RowError(ValueError):
    """A row of the answer is malformed (internal: the row is skipped and logged)."""


def count_of(row: Mapping[str, Any], key: str) -> int | None:
    """A non-negative integer count, ``None`` when absent; ``RowError`` when malformed."""
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise RowError(f"{key} is a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise RowError(f"{key} is not a whole number")
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        try:
            number = int(value.strip())
        except ValueError:  # "²" is a digit to isdigit(); or more digits than int() takes
            raise RowError(f"{key} is not a number") from None
    else:
        raise RowError(f"{key} is not a number")
    if number < 0:
        raise RowError(f"{key} is negative")
    if number > MAX_COUNT:
        raise RowError(f"{key} is too large")
    return number


def text_of(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def started_of(value: Any) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:  # an int too big for a float overflows already in isfinite() and the division
            if not math.isfinite(value):
                return None
            seconds = value / 1000 if value > 1e11 else value  # epoch milliseconds or seconds
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


_CLOCK = re.compile(r"^(?:(\d{1,6}):)?(\d{1,3}):(\d{1,2})$")
_UNITS = re.compile(r"^(?:(\d{1,6})\s*h)?\s*(?:(\d{1,6})\s*m)?\s*(?:(\d{1,9}(?:\.\d{1,9})?)\s*s)?$")
#: an ``elapsed`` above this many seconds (a week) is taken as unreadable: no job of these
#: services runs that long, and the durations learnt from it would be garbage (or overflow)
MAX_ELAPSED = 7 * 86_400.0


def parse_elapsed(value: object) -> float | None:
    """Seconds from an ``elapsed`` as useapi writes it, or ``None`` when unreadable.

    ``"03:45"`` (``MM:SS``, also ``H:MM:SS``), a number of seconds (Dreamina's
    ``elapsedSeconds``), or ``"45s"`` / ``"1m 23s"`` (Mureka's model). Negative, not finite
    or above :data:`MAX_ELAPSED`: unreadable.
    """
    if isinstance(value, bool):
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            return None
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        clock = _CLOCK.match(text)
        units = None if clock else _UNITS.match(text)
        if clock:
            hours, minutes, secs = clock.groups()
            seconds = int(hours or 0) * 3600.0 + int(minutes) * 60.0 + int(secs)
        elif units and any(units.groups()):
            hours, minutes, secs = units.groups()
            seconds = int(hours or 0) * 3600.0 + int(minutes or 0) * 60.0 + float(secs or 0)
    if seconds is None or not 0 <= seconds <= MAX_ELAPSED:  # NaN fails the test too
        return None
    return seconds


def format_elapsed(seconds: float, style: str) -> str | int:
    """``seconds`` as a service writes it: ``"mm:ss"``, ``"int"`` or ``"units"``."""
    whole = max(0, int(seconds))
    if style == "int":
        return whole
    if style == "units":
        return f"{whole // 60}m {whole % 60}s" if whole >= 60 else f"{whole}s"
    return f"{whole // 60:02d}:{whole % 60:02d}"


def _account_row(row: Any, service: Service) -> AccountCapacity:
    if not isinstance(row, Mapping):
        raise RowError("row is not an object")
    account = text_of(row.get(service.account_key))
    if account is None:
        raise RowError(f"no {service.account_key}")
    max_jobs = count_of(row, "maxJobs")
    executing = count_of(row, "executing")
    available = count_of(row, "available")
    if available is None and (max_jobs is None or executing is None):
        raise RowError("no counts")
    return AccountCapacity(account, max_jobs, executing, available)


def _job_row(row: Any, service: Service) -> ExecutingJob:
    if not isinstance(row, Mapping):
        raise RowError("row is not an object")
    job_id = None
    for key in service.job_id_keys:
        job_id = text_of(row.get(key))
        if job_id is not None:
            break
    if job_id is None:
        raise RowError(f"no {' or '.join(service.job_id_keys)}")
    account = None
    if service.executing_account_key is not None:
        account = text_of(row.get(service.executing_account_key))
    if account is None:
        account = service.account_from_job_id(job_id)
    elapsed = row.get("elapsed")
    return ExecutingJob(
        job_id=job_id,
        account=account,
        started=started_of(row.get("started")),
        elapsed=elapsed if isinstance(elapsed, str) else None,
        elapsed_seconds=parse_elapsed(elapsed),
    )


@dataclass(frozen=True)
class SkippedRow:
    """A malformed row left out of a snapshot (internal, for logging)."""

    section: str
    index: int
    reason: str


def one_row_per_account(
    rows: Iterable[tuple[int, AccountCapacity]], section: str, skipped: list[SkippedRow]
) -> list[AccountCapacity]:
    """The rows in order, one per account: of an account listed twice, the row with the
    fewest free slots (the other may be stale; trusting it could oversubscribe), the
    other skipped as a duplicate."""
    kept: dict[str, AccountCapacity] = {}
    for index, row in rows:
        first = kept.get(row.account)
        if first is None:
            kept[row.account] = row
            continue
        skipped.append(SkippedRow(section, index, "duplicate account"))
        if row.free < first.free:
            kept[row.account] = row
    return list(kept.values())


def parse_snapshot(
    data: Any, service: Service, *, requested_at: float, received_at: float
) -> tuple[Snapshot, list[SkippedRow]]:
    """Parse a decoded JSON answer into a :class:`Snapshot`.

    Returns:
        The snapshot, and the rows that were skipped as malformed.

    Raises:
        PollError: The answer as a whole is not the documented shape.
    """
    if not isinstance(data, Mapping):
        raise PollError(f"{service.name}: answer is a JSON {type(data).__name__}, not an object")
    skipped: list[SkippedRow] = []
    for section in ("available", "executing"):
        rows = data.get(section)
        if rows is None:
            continue
        if not isinstance(rows, list):
            raise PollError(f"{service.name}: {section!r} is not a list")
    # every field is documented as optional, but an object with neither list is some other
    # answer (an error page, a proxy's JSON): taking it as "all busy" would hide the fault
    if "available" not in data and "executing" not in data:
        raise PollError(f"{service.name}: answer has neither 'available' nor 'executing'")
    read: list[tuple[int, AccountCapacity]] = []
    for index, row in enumerate(data.get("available") or ()):
        try:
            read.append((index, _account_row(row, service)))
        except RowError as exc:
            skipped.append(SkippedRow("available", index, str(exc)))
    accounts = one_row_per_account(read, "available", skipped)
    jobs: list[ExecutingJob] = []
    for index, row in enumerate(data.get("executing") or ()):
        try:
            jobs.append(_job_row(row, service))
        except RowError as exc:
            skipped.append(SkippedRow("executing", index, str(exc)))
    snapshot = Snapshot(
        service=service.name,
        accounts=tuple(accounts),
        executing=tuple(jobs),
        requested_at=requested_at,
        received_at=received_at,
        skipped=len(skipped),
    )
    return snapshot, skipped
