"""The public face of capgate: :class:`CapacityGate` and the :class:`Slot` it hands out.

The gate checks its configuration, owns the public API and delegates every decision to one
engine, chosen once at construction (as anyio's ``CapacityLimiter.__new__`` picks its
implementation): the waiting core over the in-memory store, or over a Redis store in fleet
mode. Nothing here asks which store is behind it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import httpx

from ._config import account_name, account_set, check_config, number
from ._engine import make_engine
from ._engine.base import Lease
from ._models import GateStatistics, Snapshot
from ._strategy import Strategy
from ._submit import submit

if TYPE_CHECKING:
    from ._engine.waiting import Engine
    from .redis import RedisStore

__all__ = ["CapacityGate", "Slot"]


class Slot:
    """A slot reserved on one account, handed out by :meth:`CapacityGate.slot`.

    Use :attr:`account` in your create request. Call :meth:`mark_submitted` as soon as the
    server has accepted the job, with its id when you have one: the gate then stops counting
    the reservation as soon as a snapshot lists that job. Leaving the ``async with`` block
    settles the slot too, whether the body succeeded or raised.

    Its methods may be called from any thread (a webhook handler in a worker thread): they
    take effect on the gate's event loop.
    """

    __slots__ = ("_engine", "_job_id", "_lease", "_model", "_state", "_waited")

    def __init__(
        self, engine: Engine, lease: Lease, waited: float, model: str | None = None
    ) -> None:
        self._engine = engine
        self._model = model
        self._lease = lease
        self._waited = waited
        self._state = "held"  # -> "submitted" | "released" | "given back"
        self._job_id: str | None = None

    @property
    def account(self) -> str:
        """The account to submit to (email, user id or account name)."""
        return self._lease.account

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

    @property
    def lost(self) -> bool:
        """True when the store took this slot back from a holder that stopped renewing it.

        Only in fleet mode: a process paused longer than the lease (a GC pause, SIGSTOP, a
        VM migration) finds its slots re-granted elsewhere. Do not create a job on a lost
        slot; :meth:`CapacityGate.submit` checks this right before each create.
        """
        return self._lease.lost

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
        self._engine.on_loop(self._engine.settle, self._lease, job_id, None)

    def mark_busy(self) -> None:
        """The account answered 429 after all: no job was created.

        The reservation is given back at once, and the gate grants nothing more on this
        account until a snapshot requested after now shows it otherwise than the latest
        does, or until the second such snapshot (an unchanged answer is no news against
        the 429: counts that lag).
        """
        self._check_held("mark_busy()")
        self._state = "given back"
        _expire_rare(self._engine)
        self._engine.on_loop(self._engine.mark_busy, self._lease)

    def quarantine(
        self, seconds: float | None = None, reason: str = "", *, model: str | None = None
    ) -> None:
        """Take this slot's account out of rotation (a 596, 412 or 402 answer).

        If the job was not marked submitted the create failed, so the slot is given back.

        Args:
            seconds: How long; the gate's ``quarantine_for`` when ``None``.
            reason: Shown in statistics, the repr, logs and :class:`AccountQuarantined`.
            model: Only for this model (a per-model quota): waiters for other models may
                still use the account.
        """
        engine = self._engine
        length = _quarantine_length(engine, seconds, reason)
        if model is not None:
            model = account_name(model, "model")
        _expire_rare(engine)
        give_back = self._state == "held"
        if give_back:
            self._state = "given back"

        def both() -> None:
            # quarantine first: giving the slot back dispatches, and must not re-grant it
            engine.quarantine(self.account, length, reason, model)
            if give_back:
                engine.give_back(self._lease, "quarantined")

        engine.on_loop(both)

    def _give_back_unused(self) -> None:
        """No job was created on this slot: give it back at once (internal)."""
        if self._state == "held":
            self._state = "given back"
            self._engine.give_back(self._lease, "unused")

    def _exit(self, exc: BaseException | None) -> None:
        if self._state == "held":
            self._state = "released"
            self._engine.settle(self._lease, None, exc)
        elif self._state == "submitted":
            self._state = "released"

    def __repr__(self) -> str:
        lost = ", lost" if self._lease.lost else ""
        return f"<capgate.Slot {self.account!r} {self._state}{lost}>"


Slot.__module__ = "capgate"


def _expire_rare(engine: Engine) -> None:
    """A 429 or a 596: the rarely read endpoints (caps, accounts) are read at the next poll."""
    reading = engine.config.reading
    if reading is not None:
        reading.cache.expire()


def _quarantine_length(engine: Engine, seconds: float | None, reason: object) -> float:
    if not isinstance(reason, str):
        raise TypeError(f"reason must be a str, not {type(reason).__name__}")
    if seconds is None:
        return engine.config.quarantine_for
    return number("seconds", seconds, minimum=0)


class _SlotContext:
    """What ``gate.slot(...)`` returns: ``async with`` it to hold a :class:`Slot`."""

    __slots__ = ("_allowed", "_entering", "_gate", "_model", "_priority", "_slot", "_timeout")

    def __init__(
        self,
        gate: CapacityGate,
        allowed: frozenset[str] | None,
        timeout: float | None,
        priority: int,
        model: str | None = None,
    ) -> None:
        self._gate = gate
        self._model = model
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
        engine = self._gate._engine
        try:  # the engine awaited directly: one coroutine frame less for every waiter
            lease, waited = await engine.acquire(
                self._allowed, self._timeout, self._priority, self._model
            )
        finally:
            self._entering = False
        self._slot = Slot(engine, lease, waited, self._model)
        return self._slot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._slot is not None:
            self._slot._exit(exc)
            await self._gate._engine.flush()


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
        service: Which service (see :func:`capgate.services`): picks the API root, how
            capacity is read and the field names. Required, unless ``base_url`` or ``url``
            names a known service path.
        base_url: The service's API root (default ``https://api.useapi.net/v1/<service>``;
            a proxy, a simulator); the gate appends each endpoint's path. ``http://`` only
            on loopback.
        url: The capacity endpoint itself (``…/scheduler/available``), for a proxy that
            serves it under another path.
        client: Your ``httpx.AsyncClient``; the gate does not close it, and its timeouts
            apply within ``poll_timeout``. By default the gate makes one (with no timeout
            of its own: ``poll_timeout`` bounds each poll) and closes it in :meth:`aclose`.
        poll_interval: Seconds between polls while anyone waits (plus up to ``jitter``).
        accounts: Only ever grant these accounts; for ``first_fit`` also their order.
        max_jobs: A local cap per account (an int for all, or a mapping), applied as
            ``min(server maxJobs, cap)``. Required for services that publish no cap
            (``minimax-agent``, ``google-flow``); replaces Mureka's default of 10.
        strategy: ``"most_available"``, ``"round_robin"``, ``"first_fit"`` or a callable
            picking one account name from a sequence of :class:`Candidate`.
        quarantine_for: Default seconds an account stays out of rotation when quarantined.
        poll_timeout: Seconds one poll may take before it counts as failed.
        max_backoff: Ceiling of the backoff between failed polls, in seconds.
        jitter: Fraction of ``poll_interval`` added at random to each spacing (0 to 1).
        store: A :class:`capgate.redis.RedisStore` to share one gate among processes and
            hosts (fleet mode, see ``capgate._engine.fleet``); ``None`` keeps the in-process
            store.
        cooldowns: Seconds (or ``"utc-midnight"``) an account, or a model, stays out of
            rotation per 429 reason :meth:`submit` recognises (Google Flow's), replacing
            the documented defaults.

    Raises:
        CapacityGateError: No token was given and ``USEAPI_TOKEN`` is not set.
        TypeError: No ``service`` and no URL naming one (the message lists the services).
        ValueError, TypeError: An argument is out of range or of the wrong type, or
            ``max_jobs`` is missing where the service publishes no cap.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        service: str | None = None,
        base_url: str | None = None,
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
        cooldowns: Mapping[str, float | str] | None = None,
    ) -> None:
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise TypeError(f"client must be an httpx.AsyncClient, not {type(client).__name__}")
        config = check_config(
            token,
            service=service,
            base_url=base_url,
            url=url,
            cooldowns=cooldowns,
            poll_interval=poll_interval,
            accounts=accounts,
            max_jobs=max_jobs,
            strategy=strategy,
            quarantine_for=quarantine_for,
            poll_timeout=poll_timeout,
            max_backoff=max_backoff,
            jitter=jitter,
        )
        self._engine = make_engine(config, store, client)
        self._task_slots: dict[int, Slot] = {}

    # --- what it is -----------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service name."""
        return self._engine.service

    @property
    def url(self) -> str:
        """The main capacity endpoint polled (the API root if the service has none)."""
        return str(self._engine.config.url)

    @property
    def poll_interval(self) -> float:
        """Seconds between polls while anyone waits."""
        return self._engine.config.poll_interval

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot, or ``None`` before the first successful poll."""
        return self._engine.store.snapshot()

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._engine.closed

    # --- waiting for a slot ---------------------------------------------------------------

    def slot(
        self,
        account: str | Collection[str] | None = None,
        *,
        timeout: float | None = None,
        priority: int = 0,
        model: str | None = None,
    ) -> _SlotContext:
        """Wait for a slot and hold it for the ``async with`` block.

        Args:
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds to wait at most; ``None`` waits as long as it takes; ``0``
                takes a slot only if one is free at once, without polling.
            priority: Higher goes first; equal priorities are served in arrival order.
            model: The model the job will use: an account quarantined for this model only
                is not granted (one quarantined for another model still is).

        Returns:
            An async context manager yielding a :class:`Slot`.

        Raises:
            SlotTimeout: No slot within ``timeout`` (on entering the block).
            AccountQuarantined: Every account allowed is out of rotation (on entering).
            AuthenticationError: The token was refused (on entering).
            GateClosed: The gate is or gets closed (on entering).
            ValueError: ``account`` names an account outside the gate's ``accounts=``.
        """
        allowed: frozenset[str] | None
        if account is None:
            allowed = None
        elif isinstance(account, str):
            allowed = frozenset((account_name(account, "account"),))
        else:
            allowed = frozenset(account_set(account, "account"))
        allow = self._engine.config.allow
        if allowed is not None and allow is not None:
            outside = sorted(allowed - allow)
            if outside:
                raise ValueError(f"account {outside[0]!r} is not among the gate's accounts")
        if timeout is not None:
            timeout = number("timeout", timeout, minimum=0, inclusive=True)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise TypeError(f"priority must be an int, not {type(priority).__name__}")
        if model is not None:
            model = account_name(model, "model")
        return _SlotContext(self, allowed, timeout, priority, model)

    async def __aenter__(self) -> str:
        task = anyio.get_current_task().id
        if task in self._task_slots:
            raise RuntimeError(
                "async with gate is already active in this task; "
                "use gate.slot() to hold several slots at once"
            )
        lease, waited = await self._engine.acquire(None, None, 0)
        slot = self._task_slots[task] = Slot(self._engine, lease, waited)
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
            await self._engine.flush()

    async def submit(
        self,
        create: Callable[[str], Awaitable[httpx.Response]],
        *,
        account: str | Collection[str] | None = None,
        timeout: float | None = None,
        max_attempts: int = 6,
        model: str | None = None,
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
        - A 429 whose body carries one of the service's quarantine reasons (Google Flow's
          ``PUBLIC_ERROR_…``) takes the account, or for a per-model reason only ``model``
          on it, out of rotation for that reason's cooldown (``cooldowns=``).

        In fleet mode a slot the fleet took back while this process was paused (``lost``)
        is not used: the attempt waits for another slot instead of creating.

        Args:
            create: ``async (account) -> httpx.Response``.
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds in all to wait for slots (the create calls are not timed).
            max_attempts: Create calls at most.
            model: The model the job uses (for model-scoped quarantines).

        Returns:
            The response that ended the attempts.

        Raises:
            SubmissionFailed: Every attempt met a busy or broken account.
            AccountQuarantined: Every account allowed was quarantined along the way.
            SlotTimeout: No slot within ``timeout``.
            AuthenticationError: ``create`` answered 401.
            TypeError: ``create`` returned something other than an ``httpx.Response``.
        """
        return await submit(
            self,
            self._engine.config,
            create,
            account=account,
            timeout=timeout,
            max_attempts=max_attempts,
            model=model,
        )

    # --- telling the gate what happened -----------------------------------------------------

    async def refresh(self) -> Snapshot:
        """Poll now (or join the poll in flight) and wake the waiters it can serve.

        Returns:
            The new snapshot.

        Raises:
            PollError: The poll failed.
            AuthenticationError: The token was refused.
            GateClosed: The gate is closed.
        """
        return await self._engine.refresh()

    def invalidate(self, job_id: str | int | None = None) -> None:
        """Something changed (a job finished): poll as soon as allowed.

        Synchronous and cheap, safe from any task, and from any thread (a webhook handler
        in a sync web framework): from a thread other than the gate's event loop it runs on
        that loop. The current snapshot stops serving grants; if anyone waits, the next poll
        starts now, but never sooner than 0.5 s after the previous one (and never inside a
        backoff after a failed poll). The answer of a poll already on its way still serves
        when it lands (an ended job only frees room) and the next poll follows it within
        the 0.5 s.

        Args:
            job_id: The job that ended, from its ``replyUrl`` callback, when known. Once
                the gate has seen useapi's counts lag (a job of its own listed late), a job
                the snapshot still lists, or that the gate still counts as one of its own
                submissions, frees its slot at once: the slot goes to the next waiter with
                no extra poll (a poll the forecast put off comes at its floor). Before any
                lag is seen, and in fleet mode (not shared through Redis yet), the call is
                as without it: the poll within 0.5 s brings the same news.

        Raises:
            TypeError: ``job_id`` is neither a string nor an integer.
        """
        if job_id is not None:
            if isinstance(job_id, bool) or not isinstance(job_id, (str, int)):
                raise TypeError(f"job_id must be a str or int, not {type(job_id).__name__}")
            job_id = str(job_id)
        self._engine.on_loop(self._engine.invalidate, job_id)

    def quarantine(
        self,
        account: str,
        seconds: float | None = None,
        reason: str = "",
        model: str | None = None,
    ) -> None:
        """Take ``account`` out of rotation for ``seconds`` (``quarantine_for`` by default).

        With ``model``, only for waiters for that model (``slot(model=…)``); others may
        still use the account. In fleet mode a model's quarantine takes the whole account
        out for now. Waiters that may use only quarantined accounts get
        :class:`AccountQuarantined` at once. Safe from any thread.
        """
        account = account_name(account, "account")
        length = _quarantine_length(self._engine, seconds, reason)
        if model is not None:
            model = account_name(model, "model")
        self._engine.on_loop(self._engine.quarantine, account, length, reason, model)

    def restore(self, account: str) -> None:
        """Put a quarantined ``account`` back into rotation now. Safe from any thread."""
        account = account_name(account, "account")
        self._engine.on_loop(self._engine.restore, account)

    # --- what it is doing -----------------------------------------------------------------

    def statistics(self) -> GateStatistics:
        """What the gate is doing now, as a frozen :class:`GateStatistics`.

        Safe from any thread (a metrics scrape): it is read on the gate's event loop.
        """
        stats = self._engine.on_loop(self._engine.statistics)
        return self._engine.statistics() if stats is None else stats

    async def aclose(self) -> None:
        """Close the gate: current and future waiters get :class:`GateClosed`.

        Cancels a poll in flight and closes the httpx client if the gate made it. Slots
        already held stay valid until their blocks end. Calling it twice is harmless.
        """
        await self._engine.aclose()

    def __repr__(self) -> str:
        closed = ", closed" if self._engine.closed else ""
        return f"<CapacityGate {self.service}: {self._engine.describe()}{closed}>"


CapacityGate.__module__ = "capgate"
