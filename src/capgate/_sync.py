"""The sync twin: :class:`SyncCapacityGate`, for threads, ``requests``, Flask and Celery.

How it works, in one place:

- The async :class:`~capgate.CapacityGate` does all the work. The twin builds one in
  ``__init__`` (so bad arguments fail there, with the same messages) and, on first use,
  starts an event loop thread for it (an anyio blocking portal on asyncio, a daemon
  thread). Every method is a call through that portal: it runs on the loop, and its result
  or exception comes back in the calling thread. One twin serves any number of threads; the
  portal is what makes it thread-safe. Only the async gate's public API is used.
- A held slot counts as a user of the loop: ``close()`` closes the async gate at once
  (waiters get :class:`GateClosed`) and stops the loop thread when the last block ends.
- Everything it runs belongs to one process. After ``os.fork()`` (Celery's prefork pool,
  multiprocessing's fork start method) the child drops the parent's loop and gate without
  touching them (they are kept referenced, so no finalizer closes a socket the parent still
  uses) and builds its own on first use. With ``store=RedisStore(...)`` the children so form
  one fleet with the parent and each other.
- A program that never calls ``close()`` still exits once its own threads have ended: the
  loop thread is a daemon, and an ``atexit`` hook closes every twin still open in the
  exiting process. Python runs that hook only after joining every non-daemon thread, so a
  non-daemon thread waiting for a slot with no ``timeout`` keeps the program alive, as any
  blocked thread does (deliberately not closed earlier: a thread pool may still be
  finishing work the program handed it).
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._errors import GateClosed, SubmissionFailed
from ._gate import CapacityGate, Slot
from ._submit import answer, needs_body, skip_lost

if TYPE_CHECKING:
    from ._models import GateStatistics, Snapshot

__all__ = ["SyncCapacityGate", "SyncSlot"]

T = TypeVar("T")
P = ParamSpec("P")

#: seconds the atexit hook waits for each gate to close
_EXIT_WAIT = 10.0


class _Response(Protocol):
    """What ``submit()``'s ``create`` returns: an ``httpx.Response``, a ``requests.Response``."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


R = TypeVar("R", bound=_Response)


def _same_keywords(
    source: Callable[Concatenate[Any, P], None],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, P], None]]:
    """Give ``__init__`` the signature of ``source``, for type checkers and ``inspect``.

    The twin accepts whatever ``CapacityGate`` accepts (it passes the arguments on), so a
    keyword added to ``CapacityGate`` later is a keyword of the twin at once.
    """

    def apply(target: Callable[..., None]) -> Callable[Concatenate[Any, P], None]:
        target.__signature__ = inspect.signature(source)  # type: ignore[attr-defined]
        return target

    return apply


def _wait(future: Future[T]) -> T:
    """The future's result; a caller interrupted while waiting (Ctrl-C) cancels its task."""
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


#: seconds a call on a stopping twin waits for its loop thread to end
STOP_JOIN = 5.0


class _Runtime:
    """What one process runs for one twin: the loop thread (a portal) and the async gate.

    The loop runs in a daemon thread of its own, stopped only by :meth:`stop`: no generator
    or finalizer is left to stop it during interpreter shutdown, when it can no longer run.
    """

    __slots__ = ("gate", "pid", "portal", "stopped", "stopping", "thread", "users")

    def __init__(self, gate: CapacityGate, name: str) -> None:
        self.pid = os.getpid()
        self.gate = gate
        started: Future[BlockingPortal] = Future()

        async def serve() -> None:
            async with BlockingPortal() as portal:
                started.set_result(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(serve, backend="asyncio")
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                if not started.done():
                    started.set_exception(exc)

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        self.portal = started.result()
        self.users = 0  # calls in flight and slots held: the loop stays up while any
        self.stopping = False  # close() was called: stop when users drops to 0
        self.stopped = False

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` on the loop; its result or exception here."""
        return _wait(self.portal.start_task_soon(fn))

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on the loop thread; its result or exception here. Once the
        loop has stopped (the twin closed), here: nothing runs on it any more, and a slot
        used after its block then gives its own error, not the portal's. On the loop thread
        itself (a ``strategy=`` callable reading the twin), here too."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        if self.stopped:
            self.thread.join(STOP_JOIN)
            if not self.thread.is_alive():
                return fn(*args)
        return self.portal.call(fn, *args)

    def stop(self, timeout: float | None) -> None:
        """Stop the portal (letting its tasks finish) and join the loop thread."""
        self.portal.start_task_soon(self.portal.stop).result(timeout=timeout)
        self.thread.join(timeout)


#: every twin alive, for the fork and atexit hooks
_LIVE: weakref.WeakSet[SyncCapacityGate] = weakref.WeakSet()
#: what forked children inherited from their parent: kept, never used or finalized
_ORPHANS: list[object] = []


class SyncSlot:
    """A slot held through a :class:`SyncCapacityGate`: the sync twin of :class:`Slot`.

    Use :attr:`account` in your create request, and call :meth:`mark_submitted` with the
    job's id once the server accepted it. Leaving the ``with`` block settles the slot.
    """

    __slots__ = ("_rt", "_slot")

    def __init__(self, rt: _Runtime, slot: Slot) -> None:
        self._rt = rt
        self._slot = slot

    @property
    def account(self) -> str:
        """The account to submit to (email, user id or account name)."""
        return self._slot.account

    @property
    def job_id(self) -> str | None:
        """The job id given to :meth:`mark_submitted`, if any."""
        return self._slot.job_id

    @property
    def submitted(self) -> bool:
        """Whether :meth:`mark_submitted` was called."""
        return self._slot.submitted

    @property
    def held(self) -> bool:
        """True until the slot is settled or given back."""
        return self._slot.held

    @property
    def waited(self) -> float:
        """Seconds the holder waited for this slot."""
        return self._slot.waited

    @property
    def lost(self) -> bool:
        """True when fleet mode lost this slot's lease (the slot may be given to another)."""
        return bool(getattr(self._slot, "lost", False))

    def mark_submitted(self, job_id: str | int | None = None) -> None:
        """Record that the job now exists on the server (see :meth:`Slot.mark_submitted`).

        Raises:
            RuntimeError: The slot was already submitted, released or given back.
            TypeError: ``job_id`` is neither a string nor an integer.
        """
        self._rt.run_sync(self._slot.mark_submitted, job_id)

    def mark_busy(self) -> None:
        """The account answered 429 after all: give the slot back (see :meth:`Slot.mark_busy`)."""
        self._rt.run_sync(self._slot.mark_busy)

    def quarantine(
        self, seconds: float | None = None, reason: str = "", *, model: str | None = None
    ) -> None:
        """Take this slot's account, or only ``model`` on it, out of rotation.

        See :meth:`Slot.quarantine`.
        """
        self._rt.run_sync(lambda: self._slot.quarantine(seconds, reason, model=model))

    def _give_back_unused(self) -> None:
        """No job was created on this slot: give it back at once (internal)."""
        self._rt.run_sync(self._slot._give_back_unused)

    def __repr__(self) -> str:
        inner = repr(self._slot)
        return "<capgate.SyncSlot" + inner[len("<capgate.Slot") :]


class _Handoff:
    """Who owns a slot granted to a thread: the thread once the loop delivered it, the
    loop if the thread left first (Ctrl-C while it waited). Decided under a lock, so
    exactly one of the two hands it back and a slot is never left held by nobody."""

    __slots__ = ("_lock", "_state", "scope")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"  # "delivered" or "abandoned" once decided
        self.scope: anyio.CancelScope | None = None  # the loop-side wait, to cancel it

    def start(self, scope: anyio.CancelScope) -> bool:
        """On the loop: the wait begins; ``False`` if the thread has left already."""
        with self._lock:
            self.scope = scope
            return self._state != "abandoned"

    def deliver(self) -> bool:
        """On the loop: the slot goes to the thread; ``False`` if it has left."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "delivered"
            return True

    def abandon(self) -> bool:
        """In the thread: it leaves; ``True`` if the slot was delivered (the thread hands
        it back), ``False`` if the loop will, once granted."""
        with self._lock:
            delivered = self._state == "delivered"
            self._state = "abandoned"
            return delivered

    @staticmethod
    def granted(ctx: AbstractAsyncContextManager[Slot]) -> bool:
        """Whether the ``gate.slot()`` context was entered (holds a slot)."""
        return getattr(ctx, "_slot", None) is not None


class _SyncSlotContext:
    """What ``gate.slot(...)`` returns: ``with`` it to hold a :class:`SyncSlot`."""

    __slots__ = ("_ctx", "_gate", "_rt", "_slot")

    def __init__(
        self, gate: SyncCapacityGate, rt: _Runtime, ctx: AbstractAsyncContextManager[Slot]
    ) -> None:
        self._gate = gate
        self._rt = rt
        self._ctx = ctx
        self._slot: SyncSlot | None = None

    def __enter__(self) -> SyncSlot:
        rt = self._gate._enter(self._rt)
        handoff = _Handoff()
        future: Future[Slot | None] | None = None
        got: SyncSlot | None = None
        try:
            future = rt.portal.start_task_soon(self._enter_on_loop, handoff)
            slot = future.result()
            assert slot is not None  # noqa: S101 - only an abandoned entry returns None
            got = self._slot = SyncSlot(rt, slot)
            return got  # noqa: TRY300 - inside: an interrupt before it is handled
        except BaseException:
            # interrupted (Ctrl-C) anywhere in here, or the wait failed: whoever comes
            # second, this thread or the loop, hands back a slot the other took
            try:
                if got is not None and self._slot is got:
                    self._slot = None  # only this entry's: a refused re-entry keeps the first
                if handoff.abandon():  # granted and delivered: ours to hand back
                    with contextlib.suppress(Exception):
                        rt.run(self._exit_on_loop)
                elif future is not None:
                    future.cancel()  # a wait still pending stops waiting
                elif handoff.scope is not None:  # interrupted while the task was started
                    with contextlib.suppress(Exception):
                        rt.run_sync(handoff.scope.cancel)
            finally:
                self._gate._leave(rt)
            raise

    async def _enter_on_loop(self, handoff: _Handoff) -> Slot | None:
        """Wait for the slot on the loop; hand it back here if the caller left first."""
        with anyio.CancelScope() as scope:
            if not handoff.start(scope):
                return None  # the caller left before this task ran
            slot = await self._ctx.__aenter__()
            if handoff.deliver():
                return slot
        if handoff.granted(self._ctx):
            await self._exit_on_loop()
        return None

    async def _exit_on_loop(self) -> None:
        """Give back a slot the caller never got to use (no job was created on it), at
        once, whatever cancels the caller meanwhile."""
        with anyio.CancelScope(shield=True):
            slot: Slot | None = getattr(self._ctx, "_slot", None)
            if slot is not None:
                slot._give_back_unused()
            await self._ctx.__aexit__(None, None, None)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._slot is None:
            return
        try:
            # not rt.run(): Ctrl-C while this waits must not cancel the settle itself
            self._rt.portal.start_task_soon(self._settle_on_loop, exc_type, exc, tb).result()
        finally:
            self._gate._leave(self._rt)

    async def _settle_on_loop(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leave the block on the loop, to the end even if the thread is interrupted."""
        with anyio.CancelScope(shield=True):
            await self._ctx.__aexit__(exc_type, exc, tb)


class SyncCapacityGate:
    """The sync twin of :class:`CapacityGate`: the same gate, for threads instead of tasks.

    It takes the same keywords, raises the same errors and has the same methods without
    ``await``; one instance serves any number of threads::

        gate = SyncCapacityGate(os.environ["USEAPI_TOKEN"], service="kling")

        with gate as account:                        # blocks this thread until a slot
            requests.post(create_url, json={"email": account, ...}, headers=auth)

        with gate.slot(timeout=30) as slot:
            r = requests.post(...)
            slot.mark_submitted(r.json()["id"])

        response = gate.submit(lambda account: requests.post(...), timeout=60)

    Nothing runs before first use; then an event loop thread runs the async gate, one per
    twin and process. After a fork the child starts its own (Celery's prefork pool, a gate
    made at import time), and with ``store=`` the children form one fleet. ``close()``
    stops it all; a program that never calls it still exits once its own threads have
    ended (README, "Close at exit").

    ``client=``, if given, is an ``httpx.AsyncClient`` used on the gate's own event loop
    thread (so by this gate only), and never closed by it. It belongs to the process that
    made it: a forked child refuses to use it (RuntimeError); build such a gate in the child.

    Args:
        token: The useapi.net API token; ``USEAPI_TOKEN`` from the environment when ``None``.
        **options: Every keyword of :class:`CapacityGate` (``service``, ``url``,
            ``poll_interval``, ``accounts``, ``max_jobs``, ``strategy``, ``store``, …).

    Raises:
        CapacityGateError: No token was given and ``USEAPI_TOKEN`` is not set.
        ValueError, TypeError: An argument is out of range or of the wrong type.
    """

    @_same_keywords(CapacityGate.__init__)
    def __init__(self, token: str | None = None, **options: Any) -> None:
        gate = CapacityGate(token, **options)  # validates, with the async gate's messages
        if token is None:
            token = os.environ.get("USEAPI_TOKEN")

        # the recipe for this process's gate after a fork; a closure keeps the token out
        # of every repr
        def make() -> CapacityGate:
            if options.get("client") is not None:
                raise RuntimeError(
                    "this SyncCapacityGate was given client=, an httpx.AsyncClient that "
                    "belongs to the process that made the gate; after a fork, build the "
                    "gate in the child (or leave client= out)"
                )
            return CapacityGate(token, **options)

        self._make = make
        self._pid = os.getpid()
        self._gate = gate
        self._service = gate.service
        self._rt: _Runtime | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._local = threading.local()  # the `with gate` slot of each thread
        _LIVE.add(self)

    # --- the runtime, per process ----------------------------------------------------------

    def _own(self) -> None:
        """Drop what another process (the parent, before a fork) made (lock held)."""
        if self._pid == os.getpid():
            return
        _ORPHANS.append((self._rt, self._gate))
        self._rt = None
        self._gate = self._make()
        self._pid = os.getpid()
        self._local = threading.local()

    def _after_fork(self) -> None:
        # only this thread exists in the child: a lock another parent thread held at the
        # fork would stay held forever. The rest waits for first use (see _own).
        self._lock = threading.Lock()

    def _runtime(self) -> _Runtime:
        """This process's runtime, started on first use, with one more user (lock held)."""
        self._own()
        rt = self._rt
        if rt is None or rt.stopped:
            if self._closed:
                raise GateClosed(f"{self._service}: the gate is closed")
            rt = self._rt = _Runtime(self._gate, name=f"capgate-{self._service}-loop")
        rt.users += 1
        return rt

    def _enter(self, rt: _Runtime) -> _Runtime:
        """One more user of ``rt`` (a slot being entered), if it is still this process's."""
        with self._lock:
            self._own()
            if rt is not self._rt:
                raise RuntimeError(
                    "this gate.slot() context was made in another process; call gate.slot() again"
                )
            if rt.stopped:
                raise GateClosed(f"{self._service}: the gate is closed")
            rt.users += 1
            return rt

    def _leave(self, rt: _Runtime, *, stop: bool = False, timeout: float | None = None) -> None:
        """One user fewer; the loop stops once closed and unused."""
        with self._lock:
            rt.users -= 1
            rt.stopping = rt.stopping or stop
            if not rt.stopping or rt.users > 0 or rt.stopped or rt.pid != os.getpid():
                return
            rt.stopped = True
        rt.stop(timeout)

    @contextlib.contextmanager
    def _use(self) -> Iterator[_Runtime]:
        with self._lock:
            rt = self._runtime()
        try:
            yield rt
        finally:
            self._leave(rt)

    def _running(self) -> _Runtime | None:
        """This process's runtime if it is up, without starting one."""
        with self._lock:
            self._own()
            rt = self._rt
            return None if rt is None or rt.stopped else rt

    # --- the API ---------------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service's name (``"kling"``)."""
        return self._service

    @property
    def url(self) -> str:
        """The ``scheduler/available`` URL polled."""
        return self._gate.url

    @property
    def poll_interval(self) -> float:
        """Seconds between polls while anyone waits."""
        return self._gate.poll_interval

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot, or ``None`` before the first poll."""
        return self._read(lambda gate: gate.snapshot)

    def slot(
        self,
        account: str | Collection[str] | None = None,
        *,
        timeout: float | None = None,
        priority: int = 0,
        model: str | None = None,
    ) -> _SyncSlotContext:
        """Wait for a slot and hold it for the ``with`` block (see :meth:`CapacityGate.slot`).

        Args:
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds to wait at most; ``None`` waits as long as it takes.
            priority: Higher goes first; equal priorities are served in arrival order.
            model: The model the job will use: an account quarantined for this model only
                is not granted (one quarantined for another model still is).

        Returns:
            A context manager yielding a :class:`SyncSlot`.

        Raises:
            SlotTimeout: No slot within ``timeout`` (on entering the block).
            AccountQuarantined: Every account allowed is out of rotation (on entering).
            AuthenticationError: The token was refused (on entering).
            GateClosed: The gate is or gets closed (on entering).
        """
        with self._use() as rt:
            ctx = rt.run_sync(
                lambda: rt.gate.slot(account, timeout=timeout, priority=priority, model=model)
            )
            return _SyncSlotContext(self, rt, ctx)

    def __enter__(self) -> str:
        if getattr(self._local, "ctx", None) is not None:
            raise RuntimeError(
                "with gate is already active in this thread; "
                "use gate.slot() to hold several slots at once"
            )
        ctx = self.slot()
        self._local.ctx = ctx  # before the grant: an interrupt right after still finds it
        try:
            return ctx.__enter__().account
        except BaseException:
            self._local.ctx = None
            if ctx._slot is not None:  # entered, and interrupted before returning
                ctx._slot._give_back_unused()
                ctx.__exit__(None, None, None)
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ctx: _SyncSlotContext | None = getattr(self._local, "ctx", None)
        self._local.ctx = None
        if ctx is not None:
            ctx.__exit__(exc_type, exc, tb)

    def submit(
        self,
        create: Callable[[str], R],
        *,
        account: str | Collection[str] | None = None,
        timeout: float | None = None,
        max_attempts: int = 6,
        model: str | None = None,
    ) -> R:
        """Submit a job through the gate, retrying on busy and broken accounts.

        The rules of :meth:`CapacityGate.submit` (the same code decides), with ``create`` a
        plain function called in this thread: 2xx marks the slot submitted with the job id
        from the body and is returned; 429/502/504 mark the account busy and retry;
        596/412/402 quarantine it and retry; a 429 naming one of the service's reasons
        (Google Flow's ``PUBLIC_ERROR_…``) quarantines the account, or only ``model`` on
        it, for that reason's cooldown and retries; 401 raises; anything else is returned
        untouched. A slot fleet mode lost while this process was paused is not used.

        Args:
            create: ``(account) -> response``: an ``httpx.Response``, a ``requests.Response``
                or anything with ``status_code`` and ``json()``.
            account: One account, a collection of allowed accounts, or ``None`` for any.
            timeout: Seconds in all to wait for slots (the create calls are not timed).
            max_attempts: Create calls at most.
            model: The model the job uses (for model-scoped quarantines).

        Returns:
            ``create``'s own response object that ended the attempts.

        Raises:
            SubmissionFailed: Every attempt met a busy or broken account.
            AccountQuarantined: Every account allowed was quarantined along the way.
            SlotTimeout: No slot within ``timeout``.
            AuthenticationError: ``create`` answered 401.
            TypeError: ``create`` returned something without a ``status_code``.
        """
        if not callable(create):
            raise TypeError(f"create must be a callable, not {type(create).__name__}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        config = self._gate._engine.config  # the same in a forked child's gate
        # the first slot() checks account, timeout and model before any wait
        ctx: _SyncSlotContext | None = self.slot(account, timeout=timeout, model=model)
        deadline = None if timeout is None else self._now() + timeout
        last: R | None = None
        last_account: str | None = None
        attempt = 0
        while attempt < max_attempts:
            if ctx is None:
                left = None if deadline is None else max(0.0, deadline - self._now())
                ctx = self.slot(account, timeout=left, model=model)
            with ctx as slot:
                ctx = None
                if skip_lost(slot, self._service):
                    continue
                attempt += 1
                response = create(slot.account)
                status = getattr(response, "status_code", None)
                if isinstance(status, bool) or not isinstance(status, int):
                    raise TypeError(
                        "create must return a response with a status_code "
                        f"(httpx or requests), not {type(response).__name__}"
                    )
                last, last_account = response, slot.account
                body = _json(response) if needs_body(status, config) else None
                if answer(slot, status, body, config=config, model=model, attempt=attempt):
                    continue
                return response
        assert last is not None  # noqa: S101 - max_attempts >= 1
        raise SubmissionFailed(
            f"{self._service}: no account took the job in {max_attempts} attempts "
            f"(last: HTTP {last.status_code} from {last_account})",
            response=last,  # type: ignore[arg-type] # create's own response, as promised
            attempts=max_attempts,
            account=last_account,
        )

    def _now(self) -> float:
        """The gate's clock (its event loop's)."""
        with self._use() as rt:
            return rt.run_sync(anyio.current_time)

    def invalidate(self, job_id: str | int | None = None) -> None:
        """Something changed (a job finished): poll as soon as allowed.

        Safe from any thread (a Flask or Django webhook handler). Before first use, or after
        :meth:`close`, there is nothing to wake and it does nothing.

        Args:
            job_id: The job that ended, when known: with counts seen to lag, its slot is
                free at once (as :meth:`CapacityGate.invalidate` says).

        Raises:
            TypeError: ``job_id`` is neither a string nor an integer.
        """
        if job_id is not None and (isinstance(job_id, bool) or not isinstance(job_id, (str, int))):
            raise TypeError(f"job_id must be a str or int, not {type(job_id).__name__}")
        with self._lock:
            self._own()
            rt = self._rt
            if rt is None or rt.stopped:
                return
            rt.users += 1
        try:
            rt.run_sync(rt.gate.invalidate, job_id)
        finally:
            self._leave(rt)

    def quarantine(
        self,
        account: str,
        seconds: float | None = None,
        reason: str = "",
        model: str | None = None,
    ) -> None:
        """Take ``account``, or only ``model`` on it, out of rotation.

        See :meth:`CapacityGate.quarantine` (in fleet mode a model's quarantine takes the
        whole account out).
        """
        with self._use() as rt:
            rt.run_sync(rt.gate.quarantine, account, seconds, reason, model)

    def restore(self, account: str) -> None:
        """Put a quarantined ``account`` back into rotation now."""
        with self._use() as rt:
            rt.run_sync(rt.gate.restore, account)

    def refresh(self) -> Snapshot:
        """Poll now (or join the poll in flight) and wake the waiters it can serve.

        Returns:
            The new snapshot.

        Raises:
            PollError: The poll failed.
            AuthenticationError: The token was refused.
            GateClosed: The gate is closed.
        """
        with self._use() as rt:
            return rt.run(rt.gate.refresh)

    def statistics(self) -> GateStatistics:
        """What the gate is doing now, as a frozen :class:`GateStatistics`."""
        return self._read(CapacityGate.statistics)

    def _read(self, read: Callable[[CapacityGate], T]) -> T:
        """``read(gate)`` on the loop thread while it runs; here before it starts, or once
        it has stopped (a scrape during close() waits for the loop thread to end, not for a
        loop that will never run the call)."""
        with self._lock:
            self._own()
            rt = self._rt
        if rt is None:
            return read(self._gate)
        return rt.run_sync(read, rt.gate)

    def close(self) -> None:
        """Close the gate: waiting threads get :class:`GateClosed`, and so do later calls.

        Threads inside a ``with`` block finish it; the event loop thread stops when the
        last of them leaves. Calling it twice is harmless.
        """
        self._close(None)

    def _close(self, wait: float | None) -> None:
        """Close; with ``wait`` (at exit), wait that long and leave the daemon loop be."""
        with self._lock:
            self._own()
            if self._closed:
                return
            self._closed = True
            rt = self._rt
            if rt is None or rt.stopped:
                return
            rt.users += 1
        future = rt.portal.start_task_soon(rt.gate.aclose)
        if wait is not None:  # at exit: bounded, and the daemon loop is left be on a timeout
            future.result(timeout=wait)
            self._leave(rt, stop=True, timeout=wait)
            return
        try:
            _wait(future)
        finally:
            self._leave(rt, stop=True)

    def __repr__(self) -> str:
        rt = self._running()
        text = repr(self._gate)
        if rt is not None:
            with contextlib.suppress(RuntimeError):  # called on the loop thread itself
                text = rt.run_sync(repr, rt.gate)
        return text.replace("<CapacityGate ", "<SyncCapacityGate ", 1)


def _json(response: _Response) -> Any:
    """A response's JSON body, or ``None`` when it has none (never raises)."""
    try:
        return response.json()
    except Exception:  # noqa: BLE001 - any unreadable body simply has no job id
        return None


def _after_fork_in_child() -> None:
    for gate in list(_LIVE):
        gate._after_fork()


def _close_at_exit() -> None:
    for gate in list(_LIVE):
        if gate._pid == os.getpid():
            with contextlib.suppress(Exception):
                gate._close(_EXIT_WAIT)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)

SyncCapacityGate.__module__ = "capgate"
SyncSlot.__module__ = "capgate"
