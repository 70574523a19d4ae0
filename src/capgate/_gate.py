"""The gate: waiters, grants, polling, and the public context managers.

How it works, in one place:

- Callers wait in a queue ordered by priority, then arrival. Whenever what is known changes
  (a snapshot lands, a slot is given back, an account returns to rotation) one *dispatch
  pass* walks the queue in order and grants each waiter an account it may use that has room
  by the ledger's accounting rule. A later waiter is served before an earlier one only when
  the earlier one cannot use any account with room.
- Grants come only from a *fresh* snapshot: one requested less than ``poll_interval`` (plus
  jitter) ago. Otherwise the gate polls first.
- There is no background task. One waiting task at a time is the *driver*: it sleeps until
  the next poll is due and makes the poll; every waiter shares the answer. When the driver
  leaves (granted, timed out, cancelled) the role passes to another waiter. With nobody
  waiting, nothing polls.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import random
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx

from ._errors import (
    AccountQuarantined,
    AuthenticationError,
    CapacityGateError,
    GateClosed,
    PollError,
    SlotTimeout,
    SubmissionFailed,
)
from ._ledger import Ledger, Reservation
from ._log import log
from ._models import GateStatistics, Snapshot, WaitHistogram, account_statistics
from ._poll import Secret, check_url, fetch_snapshot
from ._services import get_service
from ._strategy import STRATEGIES, Candidate, Picker, Strategy

if TYPE_CHECKING:
    from ._fleet import Fleet
    from .redis import RedisStore

__all__ = ["CapacityGate", "Slot"]


#: invalidate() never brings a poll closer than this to the previous one (seconds)
INVALIDATE_FLOOR = 0.5
#: the longest poll_interval accepted (a day): past it, waiters would never see a poll
MAX_POLL_INTERVAL = 86400.0
#: a Retry-After longer than this is taken as this (seconds)
MAX_RETRY_AFTER = 3600.0
#: create answers meaning "busy after all": 429, and MiniMax's 502/504 (provider busy)
BUSY_STATUSES = frozenset({429, 502, 504})
#: create answers no retry on the same account will fix: on hold (596), no credits (412),
#: no useapi subscription (402)
BROKEN_STATUSES = frozenset({596, 412, 402})


async def _json(response: httpx.Response) -> Any:
    """A response's JSON body, or ``None`` when it has none (never raises)."""
    try:
        await response.aread()
        return response.json()
    except Exception:  # noqa: BLE001 - any unreadable body simply has no job id
        return None


def _error_excerpt(body: Any, limit: int = 200) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    text = " ".join(str(error).split()) if error is not None else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def now_or_none() -> float | None:
    """``anyio.current_time()`` inside an event loop, else ``None`` (for reprs)."""
    try:
        return anyio.current_time()
    except Exception:  # noqa: BLE001 - no running loop: sniffio's error type varies
        return None


def _number(name: str, value: object, *, minimum: float, inclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def _account_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def _account_set(value: object, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
        raise TypeError(f"{what} must be a collection of account names, not {type(value).__name__}")
    names = tuple(dict.fromkeys(_account_name(v, f"each of {what}") for v in value))
    if not names:
        raise ValueError(f"{what} must not be empty")
    return names


def _make_fleet(gate: CapacityGate, store: object) -> Fleet:
    """The fleet engine for ``store=`` (imports redis only when fleet mode is used)."""
    try:
        from ._fleet import Fleet
        from .redis import RedisStore
    except ImportError as exc:
        raise TypeError(
            f"store must be a capgate.redis.RedisStore, not {type(store).__name__} "
            "(fleet mode needs the redis extra: pip install 'capgate[redis]')"
        ) from exc
    if not isinstance(store, RedisStore):
        raise TypeError(f"store must be a capgate.redis.RedisStore, not {type(store).__name__}")
    return Fleet(gate, store)


class Wakeup:
    """A re-armable wake-up for one waiting task (internal; the fleet engine uses it too)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()

    def wake(self) -> None:
        self.event.set()

    async def sleep(self) -> None:
        """Wait until woken; a wake-up that came while not sleeping returns at once."""
        await self.event.wait()
        self.event = anyio.Event()


class _Waiter(Wakeup):
    """One task waiting for a slot (internal)."""

    __slots__ = ("allowed", "arrived", "error", "priority", "reservation", "seq")

    def __init__(
        self, seq: int, priority: int, allowed: frozenset[str] | None, arrived: float
    ) -> None:
        super().__init__()
        self.seq = seq
        self.priority = priority
        self.allowed = allowed
        self.arrived = arrived
        self.reservation: Reservation | None = None
        self.error: BaseException | None = None


class _Inflight:
    """The poll in flight, which every caller of refresh() joins (internal)."""

    __slots__ = ("done", "error", "snapshot")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.snapshot: Snapshot | None = None
        self.error: CapacityGateError | None = None


class Slot:
    """A slot reserved on one account, handed out by :meth:`CapacityGate.slot`.

    Use :attr:`account` in your create request. Call :meth:`mark_submitted` as soon as the
    server has accepted the job, with its id when you have one: the gate then stops counting
    the reservation as soon as a snapshot lists that job. Leaving the ``async with`` block
    settles the slot too, whether the body succeeded or raised.
    """

    __slots__ = ("_account", "_gate", "_job_id", "_res", "_state", "_waited")

    def __init__(self, gate: CapacityGate, res: Reservation, waited: float) -> None:
        self._gate = gate
        self._res = res
        self._account = res.account
        self._waited = waited
        gate._waits.observe(waited)
        self._state = "held"  # -> "submitted" | "released" | "given back"
        self._job_id: str | None = None

    @property
    def account(self) -> str:
        """The account to submit to (email, user id or account name)."""
        return self._account

    @property
    def job_id(self) -> str | None:
        """The job id given to :meth:`mark_submitted`, if any."""
        return self._job_id

    @property
    def submitted(self) -> bool:
        """Whether :meth:`mark_submitted` was called."""
        return self._state == "submitted" or self._job_id is not None

    @property
    def waited(self) -> float:
        """Seconds the holder waited for this slot."""
        return self._waited

    @property
    def held(self) -> bool:
        """True until the slot is settled or given back."""
        return self._state == "held"

    def _check_held(self, what: str) -> None:
        if self._state != "held":
            raise RuntimeError(f"{what}: this slot is already {self._state}")

    def mark_submitted(self, job_id: str | int | None = None) -> None:
        """Record that the job now exists on the server.

        Args:
            job_id: The job's id from the create response (a string, or Kling's number).

        Raises:
            RuntimeError: The slot was already submitted, released or given back.
            TypeError: ``job_id`` is neither a string nor an integer.
        """
        self._check_held("mark_submitted()")
        if job_id is not None:
            if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
                raise TypeError(f"job_id must be a str or int, not {type(job_id).__name__}")
            job_id = str(job_id)
        self._job_id = job_id
        self._state = "submitted"
        self._gate._settle(self._res, job_id)

    def mark_busy(self) -> None:
        """The account answered 429 after all: no job was created.

        The reservation is given back at once, and the gate grants nothing more on this
        account until a snapshot requested after now arrives.
        """
        self._check_held("mark_busy()")
        self._state = "given back"
        self._gate._mark_busy(self._res)

    def quarantine(self, seconds: float | None = None, reason: str = "") -> None:
        """Take this slot's account out of rotation (a 596, 412 or 402 answer).

        If the job was not marked submitted the create failed, so the slot is given back.

        Args:
            seconds: How long; the gate's ``quarantine_for`` when ``None``.
            reason: Shown in statistics, the repr, logs and :class:`AccountQuarantined`.
        """
        # quarantine first: giving the slot back dispatches, and must not re-grant this account
        self._gate.quarantine(self._account, seconds=seconds, reason=reason)
        if self._state == "held":
            self._state = "given back"
            self._gate._give_back(self._res, why="quarantined")

    def _give_back_unused(self) -> None:
        """No job was created on this slot: give it back at once (internal)."""
        if self._state == "held":
            self._state = "given back"
            self._gate._give_back(self._res, why="unused")

    def _exit(self, exc: BaseException | None) -> None:
        if self._state == "held":
            self._state = "released"
            self._gate._settle(self._res, None, error=exc)
        elif self._state == "submitted":
            self._state = "released"

    def __repr__(self) -> str:
        return f"<capgate.Slot {self._account!r} {self._state}>"


Slot.__module__ = "capgate"


class _SlotContext:
    """What ``gate.slot(...)`` returns: ``async with`` it to hold a :class:`Slot`."""

    __slots__ = ("_allowed", "_entering", "_gate", "_priority", "_slot", "_timeout")

    def __init__(
        self,
        gate: CapacityGate,
        allowed: frozenset[str] | None,
        timeout: float | None,
        priority: int,
    ) -> None:
        self._gate = gate
        self._allowed = allowed
        self._timeout = timeout
        self._priority = priority
        self._slot: Slot | None = None
        self._entering = False  # a task waits in __aenter__: _slot is not set yet

    async def __aenter__(self) -> Slot:
        if self._slot is not None or self._entering:
            raise RuntimeError(
                "this gate.slot() context is already entered; call gate.slot() again"
            )
        self._entering = True
        try:
            self._slot = await self._gate._acquire(self._allowed, self._timeout, self._priority)
        finally:
            self._entering = False
        return self._slot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._slot is not None:
            self._slot._exit(exc)
            if self._gate._fleet is not None:
                await self._gate._fleet.flush()


class CapacityGate:
    """Wait for a free slot on a useapi.net account, reserve it, and hand out the account.

    The gate polls ``GET …/<service>/scheduler/available`` only while somebody waits,
    shares each answer among all waiters, and keeps local reservations so that concurrent
    callers never oversubscribe an account between two polls::

        gate = CapacityGate(token, service="kling")
        async with gate as email:                 # waits for a free slot, reserves it
            await submit_job(email, prompt)       # your own create request

        async with gate.slot(account={"a@x.io", "b@x.io"}, timeout=60) as slot:
            job = await create(slot.account)
            slot.mark_submitted(job["id"])        # lets the next poll release it sooner

    One gate serves any number of tasks, on asyncio or trio. Close it with :meth:`aclose`.

    Args:
        token: The useapi.net API token; ``USEAPI_TOKEN`` from the environment when ``None``.
        service: ``ltxstudio``, ``kling``, ``tempolor``, ``riffusion``, ``minimax`` or
            ``pixverse``: picks the URL and the field names.
        url: Replaces the URL only (a proxy, a simulator). ``http://`` only on loopback.
        client: Your ``httpx.AsyncClient``; the gate does not close it. By default the gate
            makes one and closes it in :meth:`aclose`.
        poll_interval: Seconds between polls while anyone waits (plus up to ``jitter``).
        accounts: Only ever grant these accounts; for ``first_fit`` also their order.
        max_jobs: A local cap per account (an int for all, or a mapping), applied as
            ``min(server maxJobs, cap)``.
        strategy: ``"most_available"``, ``"round_robin"``, ``"first_fit"`` or a callable
            picking one account name from a sequence of :class:`Candidate`.
        quarantine_for: Default seconds an account stays out of rotation when quarantined.
        poll_timeout: Seconds one poll may take before it counts as failed.
        max_backoff: Ceiling of the backoff between failed polls, in seconds.
        jitter: Fraction of ``poll_interval`` added at random to each spacing (0 to 1).
        store: A :class:`capgate.redis.RedisStore` to share one gate among processes and
            hosts (fleet mode, see ``capgate._fleet``); ``None`` keeps the in-process ledger.

    Raises:
        CapacityGateError: No token was given and ``USEAPI_TOKEN`` is not set.
        ValueError, TypeError: An argument is out of range or of the wrong type.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        service: str = "ltxstudio",
        url: str | None = None,
        client: httpx.AsyncClient | None = None,
        poll_interval: float = 5.0,
        accounts: Collection[str] | None = None,
        max_jobs: int | Mapping[str, int] | None = None,
        strategy: Strategy = "most_available",
        quarantine_for: float = 600.0,
        poll_timeout: float = 30.0,
        max_backoff: float | None = None,
        jitter: float = 0.1,
        store: RedisStore | None = None,
    ) -> None:
        if token is None:
            token = os.environ.get("USEAPI_TOKEN")
            if not token or not token.strip():
                raise CapacityGateError(
                    "no API token: pass token= or set the USEAPI_TOKEN environment variable"
                )
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, not {type(token).__name__}")
        token = token.strip()
        if not token:
            raise CapacityGateError("the API token is empty")
        if any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError("the API token contains whitespace or control characters")
        if not token.isascii():  # it could never be sent in a header: every poll would fail
            raise ValueError("the API token contains non-ASCII characters")
        self._service = get_service(service)
        self._url = check_url(self._service.url if url is None else url)
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"client must be an httpx.AsyncClient, not {type(client).__name__}")
        self._poll_interval = _number("poll_interval", poll_interval, minimum=0)
        if self._poll_interval > MAX_POLL_INTERVAL:
            raise ValueError(
                f"poll_interval must be at most {MAX_POLL_INTERVAL:g} s, got {poll_interval!r}"
            )
        self._accounts = None if accounts is None else _account_set(accounts, "accounts")
        self._allow = None if self._accounts is None else frozenset(self._accounts)
        if max_jobs is not None:
            if isinstance(max_jobs, Mapping):
                for name, cap in max_jobs.items():
                    _account_name(name, "each account in max_jobs")
                    if isinstance(cap, bool) or not isinstance(cap, int):
                        raise TypeError(
                            f"max_jobs[{name!r}] must be an int, not {type(cap).__name__}"
                        )
                    if cap < 0:
                        raise ValueError(f"max_jobs[{name!r}] must be >= 0, got {cap}")
                max_jobs = dict(max_jobs)
            elif isinstance(max_jobs, bool) or not isinstance(max_jobs, int):
                raise TypeError(
                    f"max_jobs must be an int or a mapping of account to int, "
                    f"not {type(max_jobs).__name__}"
                )
            elif max_jobs < 1:
                raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
        if not callable(strategy) and strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)} or a callable"
            )
        self._strategy: Strategy = strategy
        self._quarantine_for = _number("quarantine_for", quarantine_for, minimum=0)
        self._poll_timeout = _number("poll_timeout", poll_timeout, minimum=0)
        self._max_backoff = (
            max(60.0, self._poll_interval)
            if max_backoff is None
            else _number("max_backoff", max_backoff, minimum=0)
        )
        self._jitter = _number("jitter", jitter, minimum=0, inclusive=True)
        if self._jitter > 1:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")

        self._token = Secret(token)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient(follow_redirects=False)
        self._rng = random.Random()
        self._ledger = Ledger(anyio.current_time, max_jobs=max_jobs)
        self._closed = False

        self._seq = itertools.count()
        self._queues: dict[int, dict[_Waiter, None]] = {}
        self._waiting = 0
        self._driver: _Waiter | None = None
        self._task_slots: dict[int, Slot] = {}
        self._known: set[str] = set()
        self._rr_last: str | None = None

        self._inflight: _Inflight | None = None
        self._invalidated_in_flight = False
        self._fresh_until = -math.inf
        self._next_poll_at = -math.inf
        self._failures = 0
        self._last_error: str | None = None
        self._auth_failure: tuple[AuthenticationError, float] | None = None

        self._grants = 0
        self._timeouts = 0
        self._waits = WaitHistogram()
        self._polls = 0
        self._polls_failed = 0

        self._fleet: Fleet | None = None
        if store is not None:
            self._fleet = _make_fleet(self, store)

    # --- public surface ------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service name."""
        return self._service.name

    @property
    def url(self) -> str:
        """The ``scheduler/available`` URL polled."""
        return str(self._url)

    @property
    def poll_interval(self) -> float:
        """Seconds between polls while anyone waits."""
        return self._poll_interval

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot, or ``None`` before the first successful poll."""
        if self._fleet is not None:
            return self._fleet.snapshot
        return self._ledger.snapshot

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def slot(
        self,
        account: str | Collection[str] | None = None,
        *,
        timeout: float | None = None,
        priority: int = 0,
    ) -> _SlotContext:
        """Wait for a slot and hold it for the ``async with`` block.

        Args:
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds to wait at most; ``None`` waits as long as it takes.
            priority: Higher goes first; equal priorities are served in arrival order.

        Returns:
            An async context manager yielding a :class:`Slot`.

        Raises:
            SlotTimeout: No slot within ``timeout`` (on entering the block).
            AccountQuarantined: Every account allowed is out of rotation (on entering).
            AuthenticationError: The token was refused (on entering).
            GateClosed: The gate is or gets closed (on entering).
        """
        allowed: frozenset[str] | None
        if account is None:
            allowed = None
        elif isinstance(account, str):
            allowed = frozenset((_account_name(account, "account"),))
        else:
            allowed = frozenset(_account_set(account, "account"))
        if allowed is not None and self._allow is not None:
            outside = sorted(allowed - self._allow)
            if outside:
                raise ValueError(f"account {outside[0]!r} is not among the gate's accounts")
        if timeout is not None:
            timeout = _number("timeout", timeout, minimum=0, inclusive=True)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        return _SlotContext(self, allowed, timeout, priority)

    async def __aenter__(self) -> str:
        task = anyio.get_current_task().id
        if task in self._task_slots:
            raise RuntimeError(
                "async with gate is already active in this task; "
                "use gate.slot() to hold several slots at once"
            )
        slot = await self._acquire(None, None, 0)
        self._task_slots[task] = slot
        return slot.account

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        slot = self._task_slots.pop(anyio.get_current_task().id, None)
        if slot is not None:
            slot._exit(exc)
            if self._fleet is not None:
                await self._fleet.flush()

    async def refresh(self) -> Snapshot:
        """Poll now (or join the poll in flight) and wake the waiters it can serve.

        Returns:
            The new snapshot.

        Raises:
            PollError: The poll failed.
            AuthenticationError: The token was refused.
            GateClosed: The gate is closed.
        """
        if self._fleet is not None:
            return await self._fleet.refresh()
        while True:
            self._check_open()
            inflight = self._inflight
            if inflight is None:
                return await self._poll()
            await inflight.done.wait()
            if inflight.snapshot is not None:
                return inflight.snapshot
            if inflight.error is not None:
                raise copy.copy(inflight.error) from inflight.error
            # the poller was cancelled mid-request: make the poll ourselves

    async def submit(
        self,
        create: Callable[[str], Awaitable[httpx.Response]],
        *,
        account: str | Collection[str] | None = None,
        timeout: float | None = None,
        max_attempts: int = 6,
    ) -> httpx.Response:
        """Submit a job through the gate, retrying on busy and broken accounts.

        Each attempt waits for a slot, awaits ``create(account)`` (your own create request)
        and reads the response:

        - 2xx: the slot is marked submitted with the job id found in the body; returned.
        - 429, 502, 504: the account was busy after all (``mark_busy``); try again, perhaps
          on another account.
        - 596, 412, 402: the account is quarantined for ``quarantine_for`` seconds; try
          again on another account.
        - 401: :class:`AuthenticationError`. Anything else is returned untouched.

        Args:
            create: ``async (account) -> httpx.Response``.
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds in all to wait for slots (the create calls are not timed).
            max_attempts: Create calls at most.

        Returns:
            The response that ended the attempts.

        Raises:
            SubmissionFailed: Every attempt met a busy or broken account.
            AccountQuarantined: Every account allowed was quarantined along the way.
            SlotTimeout: No slot within ``timeout``.
            AuthenticationError: ``create`` answered 401.
            TypeError: ``create`` returned something other than an ``httpx.Response``.
        """
        if not callable(create):
            raise TypeError(f"create must be an async callable, not {type(create).__name__}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout is not None:
            timeout = _number("timeout", timeout, minimum=0, inclusive=True)
        deadline = None if timeout is None else anyio.current_time() + timeout
        last: httpx.Response | None = None
        last_account: str | None = None
        for attempt in range(1, max_attempts + 1):
            left = None if deadline is None else max(0.0, deadline - anyio.current_time())
            async with self.slot(account, timeout=left) as slot:
                response = await create(slot.account)
                if not isinstance(response, httpx.Response):
                    raise TypeError(
                        f"create must return an httpx.Response, not {type(response).__name__}"
                    )
                status = response.status_code
                last, last_account = response, slot.account
                if 200 <= status < 300:
                    slot.mark_submitted(self._service.job_id_from(await _json(response)))
                    return response
                if status in BUSY_STATUSES:
                    log.info(
                        "capgate.submit_busy",
                        service=self.service,
                        account=slot.account,
                        status_code=status,
                        attempt=attempt,
                    )
                    slot.mark_busy()
                    continue
                if status in BROKEN_STATUSES:
                    error = _error_excerpt(await _json(response))
                    reason = f"HTTP {status}" + (f": {error}" if error else "")
                    slot.quarantine(reason=reason)
                    continue
                if status == 401:
                    slot._give_back_unused()
                    raise AuthenticationError(
                        f"{self.service}: the create request was refused (HTTP 401)",
                        status_code=401,
                    )
                return response
        assert last is not None  # noqa: S101 - max_attempts >= 1
        raise SubmissionFailed(
            f"{self.service}: no account took the job in {max_attempts} attempts "
            f"(last: HTTP {last.status_code} from {last_account})",
            response=last,
            attempts=max_attempts,
            account=last_account,
        )

    def invalidate(self) -> None:
        """Something changed (a job finished): poll as soon as allowed.

        Synchronous and cheap, safe from any task or a webhook handler on the same event
        loop. The current snapshot stops serving grants; if anyone waits, the next poll
        starts now, but never sooner than 0.5 s after the previous one (and never inside
        a backoff after a failed poll).

        Call it from the gate's own event loop thread; from another thread (a sync web
        framework) use ``anyio.from_thread.run_sync(gate.invalidate)``.
        """
        if self._fleet is not None:
            self._fleet.invalidate()
            return
        now = now_or_none()
        if now is None or self._closed:
            return
        if self._failures == 0:
            last = self._fresh_until if self._last_sent is None else self._last_sent
            soonest = max(now, last + INVALIDATE_FLOOR)
            self._next_poll_at = min(self._next_poll_at, soonest)
            self._fresh_until = min(self._fresh_until, soonest)
            # the answer of a poll already on the wire may predate this news: its arrival
            # must not push the next poll back to a full poll_interval
            self._invalidated_in_flight = self._inflight is not None
        log.debug("capgate.invalidate", service=self.service, waiting=self._waiting)
        self._wake_driver()

    def quarantine(self, account: str, seconds: float | None = None, reason: str = "") -> None:
        """Take ``account`` out of rotation for ``seconds`` (``quarantine_for`` by default).

        Waiters that may use only quarantined accounts get :class:`AccountQuarantined` at once.
        """
        account = _account_name(account, "account")
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, not {type(reason).__name__}")
        length = self._quarantine_for if seconds is None else _number("seconds", seconds, minimum=0)
        if self._fleet is not None:
            self._fleet.quarantine(account, length, reason)
            return
        now = anyio.current_time()
        self._ledger.quarantine(account, now + length, reason)
        self._known.add(account)
        log.warning(
            "capgate.quarantine",
            service=self.service,
            account=account,
            seconds=length,
            reason=reason,
        )
        for waiter in list(self._iter_waiters()):
            error = self._quarantine_error(waiter.allowed, now)
            if error is not None:
                self._fail(waiter, error)
        self._wake_driver()

    def restore(self, account: str) -> None:
        """Put a quarantined ``account`` back into rotation now."""
        account = _account_name(account, "account")
        if self._fleet is not None:
            self._fleet.restore(account)
            return
        if self._ledger.restore(account):
            log.info("capgate.restore", service=self.service, account=account)
            self._dispatch()

    def statistics(self) -> GateStatistics:
        """What the gate is doing now, as a frozen :class:`GateStatistics`."""
        if self._fleet is not None:
            return self._fleet.statistics()
        now = now_or_none()
        snapshot = self._ledger.snapshot
        fresh = self._fresh(now)
        rows, capacity, free_total = account_statistics(
            snapshot,
            allow=self._allow,
            cap=self._ledger.cap,
            free=lambda a: self._ledger.free(a, now=now) if fresh else 0,
            reserved=self._ledger.pending,
            busy=self._ledger.is_busy,
            quarantined={
                a: (math.inf if until is None or now is None else until - now, reason)
                for a, (until, reason) in (
                    self._ledger.quarantine_items(now) if now is not None else {}
                ).items()
            },
        )
        return GateStatistics(
            service=self.service,
            waiting=self._waiting,
            held=self._ledger.open_count,
            reserved=self._ledger.reserved,
            capacity=capacity,
            free=free_total,
            grants=self._grants,
            timeouts=self._timeouts,
            polls=self._polls,
            polls_failed=self._polls_failed,
            last_poll_error=self._last_error,
            snapshot_age=None if snapshot is None or now is None else now - snapshot.requested_at,
            accounts=rows,
            lag=self._ledger.lag,
            wait_buckets=self._waits.buckets(),
            wait_sum=self._waits.total,
        )

    async def aclose(self) -> None:
        """Close the gate: current and future waiters get :class:`GateClosed`.

        Closes the httpx client if the gate made it. Slots already held stay valid until
        their blocks end. Calling it twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        if self._fleet is not None:
            await self._fleet.aclose()
        for waiter in list(self._iter_waiters()):
            self._fail(waiter, GateClosed(f"{self.service}: the gate is closed"))
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._client.aclose()

    def __repr__(self) -> str:
        if self._fleet is not None:
            closed = ", closed" if self._closed else ""
            return f"<CapacityGate {self.service}: {self._fleet.describe()}{closed}>"
        now = now_or_none()
        snapshot = self._ledger.snapshot
        head = f"<CapacityGate {self.service}: "
        if snapshot is None:
            body = f"{self._ledger.reserved} reserved, {self._waiting} waiting, no snapshot"
        else:
            capacity = sum(
                self._ledger.cap(row) or 0
                for row in snapshot.accounts
                if self._allow is None or row.account in self._allow
            )
            age = "" if now is None else f", snapshot {now - snapshot.requested_at:.1f} s old"
            body = f"{self._ledger.reserved}/{capacity} reserved, {self._waiting} waiting{age}"
        if now is not None:
            out = self._ledger.quarantine_items(now)
            if out:
                body += ", quarantined: " + ", ".join(
                    f"{a} ({r})" if r else a for a, (_, r) in sorted(out.items())
                )
        if self._closed:
            body += ", closed"
        return head + body + ">"

    # --- waiting -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise GateClosed(f"{self.service}: the gate is closed")

    async def _acquire(
        self, allowed: frozenset[str] | None, timeout: float | None, priority: int
    ) -> Slot:
        if self._fleet is not None:
            return await self._fleet.acquire(allowed, timeout, priority)
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled task gets no slot
        self._check_open()
        now = anyio.current_time()
        error = self._quarantine_error(allowed, now)
        if error is not None:
            raise error
        if self._auth_failure is not None:
            failure, when = self._auth_failure
            if now - when < self._poll_interval:
                raise copy.copy(failure)
        if not self._waiting:
            # nobody queued ahead: a fresh snapshot with room grants at once (the hot path)
            picker = self._picker(now)
            account = None if picker is None else self._pick(picker, allowed)
            if account is not None:
                self._grants += 1
                log.debug(
                    "capgate.grant",
                    service=self.service,
                    account=account,
                    waited=0.0,
                    priority=priority,
                    waiting=0,
                )
                slot = Slot(self, self._ledger.reserve(account, now), 0.0)
                # like trio's CapacityLimiter: a grant still yields to the scheduler once,
                # shielded, so a loop of grants cannot starve other tasks
                await anyio.lowlevel.cancel_shielded_checkpoint()
                return slot
        waiter = _Waiter(next(self._seq), priority, allowed, now)
        self._enqueue(waiter)
        try:
            # no scope at all without a timeout: it is a waiter's largest piece of memory
            scope = contextlib.nullcontext() if timeout is None else anyio.move_on_after(timeout)
            with scope:
                self._dispatch()
                while waiter.reservation is None and waiter.error is None:
                    await self._wait_turn(waiter)
            if waiter.reservation is not None:
                # granted, but cancelled before this task ran again: the holder never
                # reaches the body, so the slot goes straight to the next waiter
                await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.error is not None:
            self._abandon(waiter)
            raise waiter.error
        if waiter.reservation is None:
            self._abandon(waiter)
            self._timeouts += 1
            log.info(
                "capgate.timeout", service=self.service, timeout=timeout, waiting=self._waiting
            )
            raise SlotTimeout(f"{self.service}: no free slot within {timeout:g} s", timeout=timeout)
        self._leave(waiter)
        return Slot(self, waiter.reservation, anyio.current_time() - waiter.arrived)

    async def _wait_turn(self, waiter: _Waiter) -> None:
        """One step of waiting: sleep until woken, or drive the polling."""
        if self._driver is None:
            self._driver = waiter
        if self._driver is not waiter or self._inflight is not None:
            await waiter.sleep()
            return
        now = anyio.current_time()
        wake_at = self._next_poll_at
        # drop expired quarantines first: one left behind (its account absent from the
        # snapshot, so no grant pass looked at it) would be "due" forever and poll in a loop
        self._ledger.quarantine_items(now)
        expiry = self._ledger.next_quarantine_expiry()
        if expiry is not None and expiry < wake_at:
            wake_at = expiry
        if wake_at > now:
            with anyio.move_on_after(wake_at - now):
                await waiter.sleep()
            if expiry is not None and anyio.current_time() >= expiry:
                self._dispatch()  # an account came back from quarantine
            return
        # a failure is logged by _poll; waiters keep waiting (or were failed, for a 401)
        with contextlib.suppress(CapacityGateError):
            await self._poll()

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.priority)
        if queue is None:
            queue = self._queues[waiter.priority] = {}
            self._queues = dict(sorted(self._queues.items(), reverse=True))
        queue[waiter] = None
        self._waiting += 1

    def _dequeue(self, waiter: _Waiter) -> bool:
        queue = self._queues.get(waiter.priority)
        if queue is None or waiter not in queue:
            return False
        del queue[waiter]
        if not queue:
            del self._queues[waiter.priority]
        self._waiting -= 1
        return True

    def _iter_waiters(self) -> Iterator[_Waiter]:
        """Waiters in service order: higher priority first, then first come first served."""
        for queue in list(self._queues.values()):
            yield from list(queue)

    def _leave(self, waiter: _Waiter) -> None:
        """``waiter`` stops waiting; if it was the driver, hand the role on."""
        self._dequeue(waiter)
        if self._driver is waiter:
            self._driver = None
        if self._driver is None:
            # also while the role is vacant: the successor woken by the driver's exit may
            # leave (cancelled, timed out, granted) before it runs again to take the role
            for queue in self._queues.values():
                for successor in queue:
                    successor.wake()  # it takes the role at its next step
                    return

    def _abandon(self, waiter: _Waiter) -> None:
        """``waiter`` gave up (timeout, cancel, error): leave nothing behind."""
        self._leave(waiter)
        res = waiter.reservation
        if res is not None:
            waiter.reservation = None
            self._give_back(res, why="abandoned")

    def _fail(self, waiter: _Waiter, error: BaseException) -> None:
        waiter.error = error
        self._leave(waiter)
        waiter.wake()

    def _wake_driver(self) -> None:
        if self._driver is not None:
            self._driver.wake()
        elif self._waiting:
            for queue in self._queues.values():
                for waiter in queue:
                    waiter.wake()
                    return

    def _quarantine_error(
        self, allowed: frozenset[str] | None, now: float
    ) -> AccountQuarantined | None:
        scope: Collection[str]
        if allowed is not None:
            scope = allowed
        elif self._allow is not None:
            scope = self._allow
        elif self._ledger.snapshot is None:
            # which accounts exist is unknown before the first snapshot: it decides
            # (_on_snapshot checks the waiters again)
            return None
        else:
            scope = self._known
        if not self._ledger.all_quarantined(scope, now):
            return None
        return AccountQuarantined.every(
            self.service,
            {a: (self._ledger.quarantined(a, now=now) or (None, ""))[1] for a in scope},
        )

    # --- granting ------------------------------------------------------------------------

    def _fresh(self, now: float | None) -> bool:
        return self._ledger.snapshot is not None and now is not None and now < self._fresh_until

    def _picker(self, now: float) -> Picker | None:
        """This instant's free slots, ready to hand out; ``None`` when there are none."""
        if not self._fresh(now):
            return None
        free = self._ledger.free_accounts(now)
        if self._allow is not None:
            free = {a: n for a, n in free.items() if a in self._allow}
        if not free:
            return None
        # free_accounts() keeps the server's order, which is the default preference order
        return Picker(
            self._strategy, free, self._accounts, last=self._rr_last, describe=self._candidate
        )

    def _pick(self, picker: Picker, allowed: frozenset[str] | None) -> str | None:
        """The account ``picker`` grants a waiter allowed ``allowed``, counted as taken."""
        try:
            account = picker.pick(allowed)
        except Exception as exc:
            log.exception(
                "capgate.strategy_failed",
                service=self.service,
                error=f"{type(exc).__name__}: {exc}",
            )
            account = Picker("most_available", dict(picker.free), ()).pick(allowed)
        if account is not None:
            picker.take(account)
            self._rr_last = account
        return account

    def _dispatch(self) -> None:
        """One pass over the queue: grant every waiter it can, in service order."""
        if not self._waiting or self._closed:
            return
        now = anyio.current_time()
        picker = self._picker(now)
        if picker is None:
            return
        # walk the queues in place and grant afterwards: the pass stops as soon as the free
        # slots run out, so its cost follows the grants, not the length of the queue
        grants: list[tuple[_Waiter, str]] = []
        for queue in self._queues.values():
            for waiter in queue:
                account = self._pick(picker, waiter.allowed)
                if account is not None:
                    grants.append((waiter, account))
                    if not picker:
                        break
            if not picker:
                break
        for waiter, account in grants:
            self._grant(waiter, account, now)

    def _candidate(self, account: str, free: int) -> Candidate:
        snapshot = self._ledger.snapshot
        row = None if snapshot is None else snapshot.account(account)
        return Candidate(
            account=account,
            free=free,
            max_jobs=None if row is None else self._ledger.cap(row),
            executing=None if row is None else row.busy,
            reserved=self._ledger.pending(account),
        )

    def _grant(self, waiter: _Waiter, account: str, now: float) -> None:
        waiter.reservation = self._ledger.reserve(account, now)
        self._dequeue(waiter)
        self._grants += 1
        log.debug(
            "capgate.grant",
            service=self.service,
            account=account,
            waited=now - waiter.arrived,
            priority=waiter.priority,
            waiting=self._waiting,
        )
        waiter.wake()

    def _settle(
        self, res: Reservation, job_id: str | None, *, error: BaseException | None = None
    ) -> None:
        if self._fleet is not None:
            self._fleet.settle(res, job_id, error)
            return
        counted = self._ledger.reserved
        self._ledger.settle(res, job_id)
        log.debug(
            "capgate.settle",
            service=self.service,
            account=res.account,
            job_id=job_id,
            held_for=anyio.current_time() - res.granted_at,
            error=None if error is None else type(error).__name__,
        )
        if self._ledger.reserved < counted:  # its job is already listed: room now
            self._dispatch()

    def _give_back(self, res: Reservation, *, why: str) -> None:
        if self._fleet is not None:
            self._fleet.give_back(res, why)
            return
        if self._ledger.give_back(res):
            log.debug("capgate.give_back", service=self.service, account=res.account, reason=why)
            self._dispatch()

    def _mark_busy(self, res: Reservation) -> None:
        if self._fleet is not None:
            self._fleet.mark_busy(res)
            return
        self._ledger.give_back(res)
        self._ledger.mark_busy(res.account)
        log.info("capgate.busy", service=self.service, account=res.account)
        self._dispatch()

    # --- polling -------------------------------------------------------------------------

    _last_sent: float | None = None

    async def _poll(self) -> Snapshot:
        """Make one poll (the caller checked none is in flight) and apply its answer."""
        inflight = self._inflight = _Inflight()
        self._invalidated_in_flight = False
        sent_tick = self._ledger.tick()
        self._last_sent = sent = anyio.current_time()
        try:
            try:
                snapshot, skipped = await fetch_snapshot(
                    self._client,
                    self._url,
                    self._token,
                    self._service,
                    timeout=self._poll_timeout,
                )
            except CapacityGateError:
                raise
            except Exception as exc:  # e.g. a custom transport's own bug: still a failed poll
                raise PollError(  # str(exc) left out: it could echo what was sent
                    f"{self.service}: unexpected {type(exc).__name__} while polling"
                ) from exc
        except AuthenticationError as exc:
            inflight.error = exc
            self._on_auth_failed(exc)
            raise
        except PollError as exc:
            inflight.error = exc
            self._on_poll_failed(exc)
            raise
        else:
            inflight.snapshot = snapshot
            self._on_snapshot(snapshot, skipped, sent_tick, sent)
            return snapshot
        finally:
            if inflight.snapshot is None and inflight.error is None:
                # aborted (the polling waiter was cancelled): the request still reached the
                # server, so the spacing rule holds; the next driver polls after it
                self._next_poll_at = max(self._next_poll_at, sent + self._poll_interval)
            self._inflight = None
            inflight.done.set()
            self._wake_driver()

    def _on_snapshot(
        self, snapshot: Snapshot, skipped: Sequence[Any], sent_tick: int, sent: float
    ) -> None:
        self._ledger.apply_snapshot(snapshot, sent_tick)
        spacing = self._poll_interval * (1 + self._rng.uniform(0, self._jitter))
        self._next_poll_at = sent + spacing
        # freshness runs from the answer's arrival: an answer slower than poll_interval is
        # still the newest there is, and must serve the waiters (else they starve, polling)
        self._fresh_until = snapshot.received_at + spacing
        if self._invalidated_in_flight:
            self._invalidated_in_flight = False
            soonest = max(snapshot.received_at, sent + INVALIDATE_FLOOR)
            self._next_poll_at = min(self._next_poll_at, soonest)
            self._fresh_until = min(self._fresh_until, soonest)
        self._polls += 1
        self._failures = 0
        self._last_error = None
        self._auth_failure = None
        self._known.update(row.account for row in snapshot.accounts)
        self._known.update(job.account for job in snapshot.executing if job.account)
        now = anyio.current_time()
        if self._ledger.quarantine_items(now):
            # the first snapshot may show that every account a waiter may use is out
            for waiter in list(self._iter_waiters()):
                error = self._quarantine_error(waiter.allowed, now)
                if error is not None:
                    self._fail(waiter, error)
        for row in skipped:
            log.warning(
                "capgate.row_skipped",
                service=self.service,
                section=row.section,
                index=row.index,
                reason=row.reason,
            )
        log.info(
            "capgate.poll",
            service=self.service,
            accounts=len(snapshot.accounts),
            free=snapshot.total_free,
            executing=len(snapshot.executing),
            reserved=self._ledger.reserved,
            waiting=self._waiting,
            duration=snapshot.received_at - sent,
        )
        self._dispatch()

    def _on_poll_failed(self, exc: PollError) -> None:
        self._polls_failed += 1
        self._failures += 1
        self._last_error = str(exc)
        ceiling = min(self._max_backoff, self._poll_interval * 2 ** min(self._failures, 30))
        delay = self._rng.uniform(self._poll_interval, max(self._poll_interval, ceiling))
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER))
        self._next_poll_at = anyio.current_time() + delay
        log.warning(
            "capgate.poll_failed",
            service=self.service,
            error=str(exc),
            status_code=exc.status_code,
            failures=self._failures,
            retry_in=delay,
            waiting=self._waiting,
        )

    def _on_auth_failed(self, exc: AuthenticationError) -> None:
        self._polls_failed += 1
        now = anyio.current_time()
        self._last_error = str(exc)
        self._auth_failure = (exc, now)
        self._next_poll_at = now + self._poll_interval
        log.error(
            "capgate.auth_failed",
            service=self.service,
            status_code=exc.status_code,
            waiting=self._waiting,
        )
        for waiter in list(self._iter_waiters()):
            self._fail(waiter, copy.copy(exc))


CapacityGate.__module__ = "capgate"
