"""Fleet mode: the engine a gate delegates to when it is built with ``store=RedisStore(...)``.

The in-process gate keeps its ledger, its snapshot and its queue of waiters in memory. Here
they live in Redis, under ``<namespace>:{<sha256(token, service, url)[:16]>}:`` (never the
token), so that every process built with the same token, service, URL and namespace shares
them. The keys and scripts are listed in ``capgate._fleet_lua``.

How it works, in one place:

- **One queue for the fleet.** A waiter enters a Redis sorted set ordered by priority, then
  by an arrival number from ``HINCRBY``: the order in which waiters reached Redis. Every
  script that can make room (a snapshot lands, a slot is given back or settles on a listed
  job, an account is restored, an expired lease is reclaimed) ends with one *dispatch pass*,
  run atomically inside Redis by whichever process got there: it walks the queue in order
  and grants each waiter an account it may use with room, exactly like the in-process pass
  (same accounting rule, same strategies; a waiter restricted to full accounts does not hold
  up later ones, and a free slot goes to the earliest eligible waiter, whichever process it
  is in). A grant is written under the waiter's id; its owner picks it up on its next sync.
  So grants follow global arrival order exactly; the only delay between processes is the
  pick-up (a pub/sub message, or the fallback re-check).
- **One poll for the fleet.** The snapshot, the server ``TIME`` its request was sent, and
  the fresh-until and next-poll-at instants are shared. Each process with waiters has one
  *driver* task (as in-process): when the snapshot is stale and a poll is due, it tries the
  poll lock (``SET NX PX``); the winner polls and applies the answer in one script; the
  others wait for the pub/sub message that a snapshot landed. Requests per interval do not
  grow with the number of processes.
- **Times come from Redis.** Scripts read ``TIME``; clients only ever sleep for durations
  the scripts returned. "Sent after it settled" is decided by a logical tick (``HINCRBY``)
  as in the local ledger, so the rule stays exact across hosts with skewed clocks.
- **Leases.** A grant is a lease with an expiry. A *renewal thread* per gate renews the
  gate's leases and waiter heartbeats every ``min(lease_ttl / 4, 1)`` s with a synchronous
  client. This departs from the no-background-task rule on purpose: renewal must not starve
  when the event loop is busy (a CPU-bound holder, a blocked loop), and only a thread can
  promise that. The thread also flushes the operations that the synchronous APIs record
  (``mark_submitted``, ``mark_busy``, ``quarantine``, ``restore``, ``invalidate``), so they
  reach Redis within a round trip even while the holder's block goes on; the async exit of
  a slot flushes them too. An operation that fails (Redis down) stays queued and is retried
  until it lands: a settle or give-back is never lost.
- **Crashed holders.** An expired lease is *reclaimed*: it becomes settled at that instant,
  so it still counts until a snapshot requested after the reclaim (its holder may have
  created the job just before dying), and the next poll is brought forward to now. Its
  owner's queued waiters leave the queue with it. Waiters heart-beat with a shorter ttl
  (``min(lease_ttl, 5)`` s), so a dead process's waiters leave soon even if it held no
  slot, and a grant nobody picked up expires as fast.
- **Redis trouble fails closed.** While Redis cannot be reached nothing is granted (grants
  only come from scripts); waiters keep waiting, bounded by their own timeouts; the gate
  logs ``capgate.store_unavailable`` once and ``capgate.store_recovered`` when it is back.
  Every script is idempotent per lease id and waiter id, so a call retried after a lost
  reply does nothing twice, and a waiter that left is tombstoned so a late retry cannot
  enqueue it again. If Redis comes back *without its data* (a restart without persistence),
  a new epoch begins; if it comes back with a new ``run_id`` but reloaded data (which may
  predate the latest grants), the same caution applies. Either way nothing is granted for
  ``recovery_grace`` seconds while live holders re-assert their leases (the renewal script
  re-creates a lease it does not find, and runs at once when a process sees Redis return),
  waiters re-enqueue themselves, and the first snapshot is polled afresh. Quarantines and
  busy marks are lost with the data. A poller that dies mid-request holds the poll lock for
  at most ``min(poll_timeout + 1, max(3, 3 x poll_interval))`` s.

Where this differs from the in-process gate:

- A callable ``strategy=`` cannot run inside Redis: fleet mode takes the built-in names.
- Every process of one fleet should use the same ``max_jobs``, ``accounts`` and
  ``strategy``: the polling process applies its caps, the dispatching process its strategy.
- ``statistics()`` and the repr show the fleet's shared state as of this gate's latest
  exchange with Redis (``waiting``, ``held``, ``reserved``, ``free``, ``polls`` are fleet-wide;
  ``grants`` and ``timeouts`` are this gate's own).
- The very first use of a namespace also waits out ``recovery_grace``: an empty namespace
  cannot be told from one whose data Redis lost.
- Redis is called through redis-py's synchronous client in worker threads
  (``anyio.to_thread``), so fleet mode runs on asyncio and trio alike; a grant and its
  settle cost about two round trips (``benchmarks/FLEET.md``). Calls that change state are
  not abandoned on cancellation: a script in flight finishes before its task moves on, so
  the give-back that follows always runs after it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import redis as _redis

from ._errors import (
    AccountQuarantined,
    AuthenticationError,
    CapacityGateError,
    GateClosed,
    PollError,
    SlotTimeout,
)
from ._fleet_lua import SCRIPTS
from ._gate import Wakeup, now_or_none
from ._ledger import Reservation
from ._log import log
from ._models import (
    AccountCapacity,
    ExecutingJob,
    GateStatistics,
    Snapshot,
    account_statistics,
)
from ._poll import fetch_snapshot

if TYPE_CHECKING:
    from ._gate import CapacityGate, Slot
    from .redis import RedisStore

__all__ = ["Fleet"]


#: invalidate() never brings a poll closer than this to the previous one (seconds)
INVALIDATE_FLOOR = 0.5
#: seconds a poll lock outlives the poll timeout (a crashed poller's lock then expires)
LOCK_MARGIN = 5.0


class _Waiter(Wakeup):
    """One local task waiting for a fleet slot (internal)."""

    __slots__ = ("allowed", "arrived", "error", "grant", "priority", "wid")

    def __init__(self, priority: int, allowed: frozenset[str] | None, arrived: float) -> None:
        super().__init__()
        self.wid = uuid.uuid4().hex
        self.priority = priority
        self.allowed = allowed
        self.arrived = arrived
        self.grant: tuple[str, str] | None = None  # (lease id, account)
        self.error: BaseException | None = None


class _State:
    """The fleet's shared state as of the latest sync (internal)."""

    __slots__ = (
        "auth_age",
        "auth_at",
        "auth_msg",
        "auth_status",
        "busy",
        "epoch",
        "failures",
        "fresh_in",
        "grace_in",
        "held",
        "lag",
        "last_error",
        "limit",
        "pending",
        "poll_in",
        "polls",
        "polls_failed",
        "quar",
        "reserved",
        "sent_tick",
        "snap_age",
        "taken",
        "waiting",
    )

    def __init__(self, data: dict[str, Any] | None = None, taken: float = -math.inf) -> None:
        d = data or {}
        self.taken = taken
        self.fresh_in = float(d.get("fresh_in", -1.0))
        self.poll_in = float(d.get("poll_in", -1.0))
        self.grace_in = float(d.get("grace_in", 0.0))
        self.sent_tick = int(d.get("sent_tick", 0))
        self.snap_age = float(d.get("snap_age", 0.0))
        self.waiting = int(d.get("waiting", 0))
        self.held = int(d.get("held", 0))
        self.reserved = int(d.get("reserved", 0))
        self.pending: dict[str, int] = {k: int(v) for k, v in _mapping(d.get("pending")).items()}
        self.limit: dict[str, int] = {k: int(v) for k, v in _mapping(d.get("limit")).items()}
        busy = d.get("busy")
        self.busy: frozenset[str] = frozenset(busy) if isinstance(busy, list) else frozenset()
        self.quar: dict[str, tuple[float, str]] = {
            k: (float(v[0]), str(v[1])) for k, v in _mapping(d.get("quar")).items()
        }
        self.lag = float(d.get("lag", 0.0))
        self.polls = int(d.get("polls", 0))
        self.polls_failed = int(d.get("polls_failed", 0))
        self.failures = int(d.get("failures", 0))
        last_error = d.get("last_error")
        self.last_error: str | None = last_error if isinstance(last_error, str) else None
        auth_at = d.get("auth_at")
        self.auth_at: str | None = auth_at if isinstance(auth_at, str) else None
        self.auth_age = float(d.get("auth_age", math.inf))
        self.auth_msg = str(d.get("auth_msg", ""))
        self.auth_status = int(d.get("auth_status", 0)) or None
        epoch = d.get("epoch")
        self.epoch: str | None = epoch if isinstance(epoch, str) else None

    def since(self, now: float | None) -> float:
        """Seconds since this state was read."""
        return 0.0 if now is None else max(0.0, now - self.taken)


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _encode_snapshot(snapshot: Snapshot) -> str:
    return json.dumps(
        {
            "a": [[r.account, r.max_jobs, r.executing, r.available] for r in snapshot.accounts],
            "e": [
                [
                    j.job_id,
                    j.account,
                    None if j.started is None else j.started.isoformat(),
                    j.elapsed,
                ]
                for j in snapshot.executing
            ],
            "k": snapshot.skipped,
            "d": snapshot.received_at - snapshot.requested_at,
        },
        separators=(",", ":"),
    )


def _decode_snapshot(service: str, text: str, requested_at: float) -> Snapshot:
    from datetime import datetime

    data = json.loads(text)
    return Snapshot(
        service=service,
        accounts=tuple(AccountCapacity(a, m, e, v) for a, m, e, v in data["a"]),
        executing=tuple(
            ExecutingJob(j, a, None if s is None else datetime.fromisoformat(s), el)
            for j, a, s, el in data["e"]
        ),
        requested_at=requested_at,
        received_at=requested_at + float(data.get("d", 0.0)),
        skipped=int(data.get("k", 0)),
    )


class _Op:
    """A state change recorded by a synchronous API, flushed to Redis (internal)."""

    __slots__ = ("account", "job_id", "kind", "lease", "reason", "seconds", "wid")

    def __init__(
        self,
        kind: str,
        *,
        lease: str = "",
        account: str = "",
        job_id: str | None = None,
        wid: str = "",
        seconds: float = 0.0,
        reason: str = "",
    ) -> None:
        self.kind = kind
        self.lease = lease
        self.account = account
        self.job_id = job_id
        self.wid = wid
        self.seconds = seconds
        self.reason = reason


class Fleet:
    """The shared-state engine behind a gate built with ``store=`` (internal)."""

    def __init__(self, gate: CapacityGate, store: RedisStore) -> None:
        if callable(gate._strategy):
            raise TypeError(
                "a callable strategy cannot run inside Redis; with store= use one of "
                "most_available, round_robin, first_fit"
            )
        self._gate = gate
        self._store = store
        self._service = gate.service
        self._prefix = store.key_prefix(gate._token.reveal(), gate.service, gate.url)
        self._owner = uuid.uuid4().hex
        self._ttl = store.lease_ttl
        self._hb = store.heartbeat_ttl
        self._grace = store.recovery_grace
        self._strategy = str(gate._strategy)
        self._pref = json.dumps(list(gate._accounts or ()))
        store._attach()
        self._client = store.client()
        self._scripts = {name: self._client.register_script(src) for name, src in SCRIPTS.items()}
        self._rng = random.Random()

        self._waiters: dict[str, _Waiter] = {}
        self._driver: _Waiter | None = None
        self._driver_scope: anyio.CancelScope | None = None
        self._sync_lock: anyio.Lock | None = None
        self._syncs_begun = 0
        self._res_ids = itertools.count(1)
        self._leases: dict[int, tuple[str, str]] = {}  # reservation id -> (lease id, wid)
        self._lock_ids = itertools.count(1)
        self._renew_now = False
        self._retry_in: float | None = None
        self._listen_gen = 0

        # shared with the renewal thread
        self._held: dict[str, tuple[str, str]] = {}  # lease id -> (account, wid)
        self._outbox: deque[_Op] = deque()
        self._exec_lock = threading.Lock()
        self._held_lock = threading.Lock()
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._ps_lock = threading.Lock()
        self._pubsub: Any = None
        self._message = False
        self._closed_store = False
        self._detached = False

        self._state = _State()
        self._snapshot: Snapshot | None = None
        self._known: set[str] = set()
        self._auth_seen: str | None = None
        self._down_since: float | None = None
        self._down_lock = threading.Lock()
        self._grants = 0
        self._timeouts = 0

    # --- Redis calls ---------------------------------------------------------------------

    def _call(self, name: str, *args: str | int | float) -> Any:
        """Run one script (blocking; in a worker or the renewal thread)."""
        raw = self._scripts[name](keys=[self._prefix], args=list(args))
        return json.loads(raw)

    async def _run(self, name: str, *args: str | int | float) -> Any:
        # not abandoned on cancel: a script in flight finishes before the task moves on, so
        # a later give-back always runs after it on the server
        result = await anyio.to_thread.run_sync(self._call, name, *args)
        self._store_up()
        return result

    def _dispatch_args(self) -> tuple[str | float, ...]:
        return (
            self._owner,
            self._hb,
            self._grace,
            INVALIDATE_FLOOR,
            self._strategy,
            self._pref,
        )

    def _store_down(self, exc: BaseException) -> None:
        with self._down_lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
        if first:
            log.warning(
                "capgate.store_unavailable",
                service=self._service,
                error=f"{type(exc).__name__}: {exc}",
                waiting=len(self._waiters),
                held=len(self._held),
            )

    def _store_up(self) -> None:
        if self._down_since is None:
            return
        with self._down_lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info(
                "capgate.store_recovered",
                service=self._service,
                down_for=round(time.monotonic() - since, 3),
            )
            self._renew_now = True  # re-assert leases at once: Redis may have lost them
            self._kick.set()

    # --- local view ----------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def _apply_state(self, data: dict[str, Any]) -> None:
        now = anyio.current_time()
        state = _State(data, now)
        snap = data.get("snap")
        if isinstance(snap, str):
            try:
                self._snapshot = _decode_snapshot(self._service, snap, now - state.snap_age)
            except (ValueError, KeyError, TypeError):
                log.warning("capgate.store_bad_snapshot", service=self._service)
                self._snapshot = None
            if self._snapshot is not None:
                self._known.update(r.account for r in self._snapshot.accounts)
                self._known.update(j.account for j in self._snapshot.executing if j.account)
        elif state.sent_tick == 0:
            self._snapshot = None
        self._known.update(state.quar)
        self._state = state
        self._check_waiters(now)

    def _check_waiters(self, now: float) -> None:
        """Fail local waiters on a new auth failure or when all their accounts are out."""
        state = self._state
        if state.auth_at is not None and state.auth_at != self._auth_seen:
            self._auth_seen = state.auth_at
            # as in-process: a 401 fails every waiter that was waiting when it came
            failed_at = now - state.auth_age
            error = AuthenticationError(state.auth_msg, status_code=state.auth_status)
            for waiter in list(self._waiters.values()):
                if waiter.arrived <= failed_at:
                    self._fail(waiter, error)
        if state.quar:
            for waiter in list(self._waiters.values()):
                qerror = self._quarantine_error(waiter.allowed)
                if qerror is not None:
                    self._fail(waiter, qerror)

    def _quarantined(self) -> dict[str, tuple[float, str]]:
        """Quarantined account -> (seconds left, reason), as of now."""
        now = now_or_none()
        spent = self._state.since(now)
        return {a: (left - spent, r) for a, (left, r) in self._state.quar.items() if left > spent}

    def _quarantine_error(self, allowed: frozenset[str] | None) -> AccountQuarantined | None:
        out = self._quarantined()
        if not out:
            return None
        scope: Collection[str]
        if allowed is not None:
            scope = allowed
        elif self._gate._allow is not None:
            scope = self._gate._allow
        elif self._snapshot is None:
            # which accounts exist is unknown before the first snapshot: it decides (every
            # sync checks the waiters again), as in-process
            return None
        else:
            scope = self._known
        if not scope or any(a not in out for a in scope):
            return None
        return AccountQuarantined.every(self._service, {a: out[a][1] for a in scope})

    def _fail(self, waiter: _Waiter, error: BaseException) -> None:
        if waiter.grant is None and waiter.error is None:
            waiter.error = copy.copy(error)
            waiter.wake()

    # --- waiting -------------------------------------------------------------------------

    async def acquire(
        self, allowed: frozenset[str] | None, timeout: float | None, priority: int
    ) -> Slot:
        from ._gate import Slot

        gate = self._gate
        gate._check_open()
        error = self._quarantine_error(allowed)
        if error is not None:
            raise error
        state = self._state
        if state.auth_at is not None and state.auth_age + state.since(now_or_none()) < (
            gate._poll_interval
        ):
            raise AuthenticationError(state.auth_msg, status_code=state.auth_status)
        if self._sync_lock is None:
            self._sync_lock = anyio.Lock()
        effective = allowed if allowed is not None else gate._allow
        waiter = _Waiter(priority, effective, anyio.current_time())
        self._waiters[waiter.wid] = waiter
        self._ensure_keeper()
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await self._sync()
                while waiter.grant is None and waiter.error is None:
                    await self._wait_turn(waiter)
            if waiter.grant is not None:
                # granted, but cancelled before this task ran again: the holder never
                # reaches the body, so the slot goes straight back (as in-process)
                await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            await self._abandon(waiter)
            raise
        if waiter.grant is None:
            await self._abandon(waiter)
            if waiter.error is not None:
                raise waiter.error
            self._timeouts += 1
            log.info("capgate.timeout", service=self._service, timeout=timeout, fleet=True)
            assert timeout is not None  # noqa: S101 - no timeout, no way out but a grant
            raise SlotTimeout(
                f"{self._service}: no free slot within {timeout:g} s", timeout=timeout
            )
        self._leave(waiter)
        lease, account = waiter.grant
        res = Reservation(next(self._res_ids), account, anyio.current_time())
        self._leases[res.id] = (lease, waiter.wid)
        self._grants += 1
        waited = anyio.current_time() - waiter.arrived
        log.debug(
            "capgate.grant",
            service=self._service,
            account=account,
            waited=waited,
            priority=priority,
            fleet=True,
        )
        return Slot(gate, res, waited)

    def _leave(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter.wid, None)
        if self._driver is waiter:
            self._driver = None
            if self._driver_scope is not None:
                self._driver_scope.cancel()
        if self._driver is None:
            # also while the role is vacant: the successor woken by the driver's exit may
            # leave (cancelled, timed out) before it runs again to take the role
            for successor in self._waiters.values():
                if successor.grant is None and successor.error is None:
                    successor.wake()  # it takes the role at its next step
                    break

    async def _abandon(self, waiter: _Waiter) -> None:
        """``waiter`` gave up: take it out of the queue, give back any grant."""
        self._leave(waiter)
        op = _Op("abandon", wid=waiter.wid)
        if waiter.grant is not None:
            op.lease = waiter.grant[0]
            op.account = waiter.grant[1]
            waiter.grant = None
            log.debug(
                "capgate.give_back", service=self._service, account=op.account, reason="abandoned"
            )
        self._outbox.append(op)
        await self.flush()

    async def _wait_turn(self, waiter: _Waiter) -> None:
        if self._driver is None:
            self._driver = waiter
        if self._driver is not waiter:
            await waiter.sleep()
            return
        if self._down_since is not None:
            with anyio.move_on_after(min(self._store.recheck_interval, 0.25)):
                await waiter.sleep()
            await self._sync(force=True)
            return
        state = self._state
        spent = state.since(anyio.current_time())
        poll_in = state.poll_in - spent
        if poll_in <= 0:  # as in-process: poll when due, fresh or not
            self._retry_in = None
            if await self._try_poll(force=False):
                return
            state = self._state
            spent = state.since(anyio.current_time())
            # another process holds the lock, or polled meanwhile: its answer wakes us
            poll_in = self._retry_in if self._retry_in is not None else state.poll_in - spent
        delay = self._store.recheck_interval
        if poll_in > 0:
            delay = min(delay, poll_in)
        if state.grace_in - spent > 0:
            delay = min(delay, state.grace_in - spent)
        for left, _ in self._quarantined().values():
            delay = min(delay, left)
        await self._listen(max(delay, 0.005))
        await self._sync(force=True)

    async def _listen(self, timeout: float, *, driver: bool = True) -> None:
        """Wait for a wake-up message for us, at most ``timeout`` seconds."""
        if self._message:
            self._message = False
            return
        self._listen_gen += 1
        gen = self._listen_gen
        with anyio.CancelScope() as scope:
            if driver:
                self._driver_scope = scope
            try:
                await anyio.to_thread.run_sync(
                    self._listen_sync, timeout, gen, abandon_on_cancel=True
                )
            except _redis.RedisError as exc:
                self._store_down(exc)
                await anyio.sleep(min(timeout, 0.25))
            finally:
                if driver and self._driver_scope is scope:
                    self._driver_scope = None
                if self._listen_gen == gen:
                    # an abandoned listening thread sees this and returns within a slice
                    self._listen_gen += 1
        self._message = False

    def _listen_sync(self, timeout: float, gen: int) -> None:
        deadline = time.monotonic() + timeout
        with self._ps_lock:
            if self._closed_store or gen != self._listen_gen:
                return
            try:
                if self._pubsub is None:
                    pubsub = self._client.pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True
                    )
                    pubsub.subscribe(self._prefix + "ev")
                    self._pubsub = pubsub
                mine = self._owner.encode()
                while not self._message and gen == self._listen_gen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    # short slices: a superseded listen gives the socket up quickly
                    message = self._pubsub.get_message(timeout=min(left, 0.05))
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data", b"")
                    if data == b"*" or mine in data.split(b","):
                        self._message = True
            except _redis.RedisError:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                self._pubsub = None
                raise

    async def _sync(self, *, force: bool = False) -> bool:
        """Enqueue new local waiters, run a dispatch pass, pick up grants (coalesced)."""
        assert self._sync_lock is not None  # noqa: S101 - made in acquire()
        mark = self._syncs_begun
        async with self._sync_lock:
            if not force and self._syncs_begun > mark:
                return True  # a sync that began after we arrived covered us
            self._syncs_begun += 1
            waiters = [
                [w.wid, w.priority, sorted(w.allowed) if w.allowed is not None else False]
                for w in self._waiters.values()
            ]
            try:
                data = await self._run(
                    "sync", *self._dispatch_args(), self._state.sent_tick, json.dumps(waiters)
                )
            except _redis.RedisError as exc:
                self._store_down(exc)
                return False
            self._apply_state(data)
            granted = []
            for wid, grant in _mapping(data.get("granted")).items():
                waiter = self._waiters.get(wid)
                if waiter is None or waiter.grant is not None or waiter.error is not None:
                    continue  # it left, or is leaving: its abandon gives the lease back
                lease, account = str(grant[0]), str(grant[1])
                waiter.grant = (lease, account)
                with self._held_lock:
                    self._held[lease] = (account, wid)
                granted.append(waiter)
            for waiter in granted:  # all marked first, so the driver role goes to a waiter
                self._leave(waiter)
                waiter.wake()
            return True

    # --- polling -------------------------------------------------------------------------

    async def _try_poll(self, *, force: bool) -> Snapshot | None:
        """Poll if the fleet's lock is ours; ``None`` when another process polls (or none due)."""
        gate = self._gate
        token = f"{self._owner}:{next(self._lock_ids)}"
        # the lock outlives any poll that is not unusually slow; a poller killed mid-request
        # holds the fleet up no longer than this
        lock_s = min(gate._poll_timeout + 1.0, max(3.0, 3 * gate._poll_interval))
        lock_ms = int(lock_s * 1000)
        try:
            begin = await self._run("begin_poll", token, lock_ms, int(force), self._grace)
        except _redis.RedisError as exc:
            self._store_down(exc)
            return None
        if not begin.get("ok"):
            self._retry_in = float(begin.get("wait", 0.0))
            return None
        sent_tick, sent = int(begin["tick"]), str(begin["sent"])
        t0 = anyio.current_time()
        done = False
        try:
            try:
                snapshot, skipped = await fetch_snapshot(
                    gate._client,
                    gate._url,
                    gate._token,  # a Secret: no traceback local shows the token
                    gate._service,
                    timeout=gate._poll_timeout,
                )
            except CapacityGateError:
                raise
            except Exception as exc:  # a transport's own bug is a failed poll too
                raise PollError(  # str(exc) left out: it could echo what was sent
                    f"{self._service}: unexpected {type(exc).__name__} while polling"
                ) from exc
        except AuthenticationError as exc:
            done = await self._poll_failed(token, exc, auth=True)
            log.error(  # noqa: TRY400 - an expected answer, not a bug: no traceback
                "capgate.auth_failed",
                service=self._service,
                status_code=exc.status_code,
                fleet=True,
            )
            for waiter in list(self._waiters.values()):
                self._fail(waiter, exc)
            if force:
                raise
            return None
        except PollError as exc:
            done = await self._poll_failed(token, exc, auth=False)
            if force:
                raise
            return None
        else:
            done = True  # the apply script releases the lock
        finally:
            if not done:
                await self._unlock(token)
        for bad in skipped:
            log.warning(
                "capgate.row_skipped",
                service=self._service,
                section=bad.section,
                index=bad.index,
                reason=bad.reason,
            )
        limits = []
        for row in snapshot.accounts:
            limit = row.free
            cap = gate._ledger.cap(row)
            if cap is not None:
                limit = min(limit, cap - (row.busy or 0))
            limits.append([row.account, max(0, limit)])
        spacing = gate._poll_interval * (1 + self._rng.uniform(0, gate._jitter))
        try:
            with anyio.CancelScope(shield=True):
                await self._run(
                    "apply",
                    token,
                    sent_tick,
                    sent,
                    spacing,
                    _encode_snapshot(snapshot),
                    json.dumps(limits),
                    json.dumps([j.job_id for j in snapshot.executing]),
                    self._owner,
                    self._hb,
                    self._grace,
                    INVALIDATE_FLOOR,
                    self._strategy,
                    self._pref,
                )
        except _redis.RedisError as exc:
            self._store_down(exc)
            await self._unlock(token)
            return None
        log.info(
            "capgate.poll",
            service=self._service,
            accounts=len(snapshot.accounts),
            free=snapshot.total_free,
            executing=len(snapshot.executing),
            duration=anyio.current_time() - t0,
            fleet=True,
        )
        await self._sync(force=True)
        return snapshot

    async def _unlock(self, token: str) -> None:
        """Release the poll lock; if Redis is unreachable, the renewal thread retries."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._run("unlock", token)
            except _redis.RedisError:
                self._record(_Op("unlock", reason=token))

    async def _poll_failed(
        self, token: str, exc: PollError | AuthenticationError, *, auth: bool
    ) -> bool:
        gate = self._gate
        retry_after = getattr(exc, "retry_after", None)
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                reply = await self._run(
                    "poll_failed",
                    token,
                    int(auth),
                    str(exc),
                    exc.status_code or 0,
                    gate._poll_interval,
                    gate._max_backoff,
                    self._rng.random(),
                    "" if retry_after is None else retry_after,
                    self._grace,
                )
                if not auth:
                    log.warning(
                        "capgate.poll_failed",
                        service=self._service,
                        error=str(exc),
                        status_code=exc.status_code,
                        retry_in=reply.get("delay"),
                        fleet=True,
                    )
                return True
        except _redis.RedisError as store_exc:
            self._store_down(store_exc)
        return False

    async def refresh(self) -> Snapshot:
        gate = self._gate
        gate._check_open()
        if self._sync_lock is None:
            self._sync_lock = anyio.Lock()
        self._ensure_keeper()
        before = self._state.sent_tick
        failed_before = self._state.polls_failed
        deadline = anyio.current_time() + gate._poll_timeout + LOCK_MARGIN
        while True:
            gate._check_open()
            snapshot = await self._try_poll(force=True)
            if snapshot is not None:
                return snapshot
            if self._down_since is not None:
                raise PollError(f"{self._service}: the fleet's Redis store is unreachable")
            # another process polls: share its answer
            await self._listen(min(0.25, self._store.recheck_interval), driver=False)
            await self._sync(force=True)
            state = self._state
            if state.sent_tick > before and self._snapshot is not None:
                return self._snapshot
            if state.polls_failed > failed_before and state.last_error:
                raise PollError(state.last_error)
            if anyio.current_time() > deadline:
                raise PollError(f"{self._service}: no snapshot from the fleet's poller")

    # --- operations recorded by synchronous APIs -------------------------------------------

    def _record(self, op: _Op) -> None:
        self._outbox.append(op)
        self._ensure_keeper()
        self._kick.set()

    def settle(self, res: Reservation, job_id: str | None, error: BaseException | None) -> None:
        lease, wid = self._leases.pop(res.id, ("", ""))
        if not lease:
            return
        self._record(_Op("settle", lease=lease, account=res.account, job_id=job_id, wid=wid))
        log.debug(
            "capgate.settle",
            service=self._service,
            account=res.account,
            job_id=job_id,
            error=None if error is None else type(error).__name__,
            fleet=True,
        )

    def give_back(self, res: Reservation, why: str) -> None:
        lease, wid = self._leases.pop(res.id, ("", ""))
        if lease:
            self._record(_Op("give_back", lease=lease, account=res.account, wid=wid))
            log.debug("capgate.give_back", service=self._service, account=res.account, reason=why)

    def mark_busy(self, res: Reservation) -> None:
        lease, wid = self._leases.pop(res.id, ("", ""))
        self._record(_Op("busy", lease=lease, account=res.account, wid=wid))
        log.info("capgate.busy", service=self._service, account=res.account, fleet=True)

    def quarantine(self, account: str, seconds: float, reason: str) -> None:
        self._record(_Op("quarantine", account=account, seconds=seconds, reason=reason))
        self._known.add(account)
        # in force locally at once; the next sync brings the fleet's view
        spent = self._state.since(now_or_none())
        self._state.quar[account] = (seconds + spent, reason)
        log.warning(
            "capgate.quarantine",
            service=self._service,
            account=account,
            seconds=seconds,
            reason=reason,
            fleet=True,
        )
        for waiter in list(self._waiters.values()):
            error = self._quarantine_error(waiter.allowed)
            if error is not None:
                self._fail(waiter, error)

    def restore(self, account: str) -> None:
        self._record(_Op("restore", account=account))
        if self._state.quar.pop(account, None) is not None:
            log.info("capgate.restore", service=self._service, account=account, fleet=True)

    def invalidate(self) -> None:
        if self._gate._closed:
            return
        self._record(_Op("invalidate"))
        log.debug("capgate.invalidate", service=self._service, fleet=True)

    async def flush(self) -> None:
        """Send the recorded operations now (shielded, bounded); the renewal thread retries."""
        if not self._outbox:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._store.socket_timeout + 3):
            try:
                await anyio.to_thread.run_sync(self._drain)
            except _redis.RedisError as exc:
                self._store_down(exc)
                self._kick.set()
            else:
                self._store_up()

    def _drain(self) -> None:
        """Run queued operations in order; stop at the first failure (blocking)."""
        with self._exec_lock:
            while self._outbox:
                op = self._outbox[0]
                if op.kind in ("settle", "give_back") and not op.lease:
                    self._outbox.popleft()
                    continue
                self._call(
                    "op",
                    op.kind,
                    op.lease,
                    op.account,
                    op.job_id or "",
                    op.wid,
                    op.seconds,
                    op.reason,
                    *self._dispatch_args()[:4],
                    self._strategy,
                    self._pref,
                )
                self._outbox.popleft()
                if op.lease:
                    with self._held_lock:
                        self._held.pop(op.lease, None)

    # --- the renewal thread ----------------------------------------------------------------

    def _ensure_keeper(self) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        self._keeper = threading.Thread(
            target=self._keep, name=f"capgate-lease-renewal-{self._service}", daemon=True
        )
        self._keeper.start()

    def _keep(self) -> None:
        every = self._store.renew_interval
        next_renew = 0.0
        failing = False
        while True:
            if self._stop.is_set() and not self._outbox and not self._held:
                self._detach()
                return
            now = time.monotonic()
            wait = 0.2 if failing else max(0.0, next_renew - now)
            if self._outbox and not failing:
                wait = 0.0
            self._kick.wait(wait)
            self._kick.clear()
            try:
                self._drain()
                now = time.monotonic()
                if now >= next_renew or failing or self._renew_now:
                    self._renew_now = False
                    self._renew()
                    next_renew = now + every
                failing = False
                self._store_up()
            except _redis.RedisError as exc:
                if not failing:
                    log.warning(
                        "capgate.lease_renew_failed",
                        service=self._service,
                        error=f"{type(exc).__name__}: {exc}",
                        held=len(self._held),
                    )
                failing = True
                self._store_down(exc)
            except Exception:  # the thread must outlive a bug in one round
                log.exception("capgate.lease_renew_failed", service=self._service)
                failing = True

    def _renew(self) -> None:
        with self._exec_lock:
            with self._held_lock:
                held = [[lease, account, wid] for lease, (account, wid) in self._held.items()]
            wids = list(self._waiters)
            if not held and not wids:
                return
            reply = self._call(
                "renew",
                self._owner,
                self._ttl,
                self._grace,
                json.dumps(held),
                json.dumps(wids),
                self._hb,
            )
        if reply.get("reasserted"):
            log.warning(
                "capgate.lease_reasserted",
                service=self._service,
                leases=reply["reasserted"],
            )

    # --- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        error = GateClosed(f"{self._service}: the gate is closed")
        for waiter in list(self._waiters.values()):
            self._fail(waiter, error)
        if self._driver_scope is not None:
            self._driver_scope.cancel()
        await self.flush()
        self._stop.set()
        self._kick.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await anyio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        with self._ps_lock:
            self._closed_store = True
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                self._pubsub = None
        keeper = self._keeper
        if keeper is not None:
            # slots still held keep renewing until their blocks end; the keeper detaches then
            keeper.join(timeout=0.5 if self._held else self._store.socket_timeout + 1)
        if keeper is None or (not keeper.is_alive() and not self._held):
            self._detach()

    def _detach(self) -> None:
        with self._held_lock:
            if self._detached:
                return
            self._detached = True
        self._store._detach()

    # --- statistics ------------------------------------------------------------------------

    def statistics(self) -> GateStatistics:
        gate = self._gate
        now = now_or_none()
        state = self._state
        spent = state.since(now)
        fresh = self._snapshot is not None and state.fresh_in - spent > 0
        rows, capacity, free_total = account_statistics(
            self._snapshot,
            allow=gate._allow,
            cap=gate._ledger.cap,
            free=lambda a: self._free(a) if fresh else 0,
            reserved=lambda a: state.pending.get(a, 0),
            busy=state.busy.__contains__,
            quarantined=self._quarantined(),
        )
        snapshot = self._snapshot
        return GateStatistics(
            service=self._service,
            waiting=state.waiting,
            held=state.held,
            reserved=state.reserved,
            capacity=capacity,
            free=free_total,
            grants=self._grants,
            timeouts=self._timeouts,
            polls=state.polls,
            polls_failed=state.polls_failed,
            last_poll_error=state.last_error,
            snapshot_age=None if snapshot is None or now is None else now - snapshot.requested_at,
            accounts=rows,
            lag=state.lag,
            wait_buckets=gate._waits.buckets(),
            wait_sum=gate._waits.total,
        )

    def _free(self, account: str) -> int:
        state = self._state
        if account in state.busy or account in self._quarantined():
            return 0
        return max(0, state.limit.get(account, 0) - state.pending.get(account, 0))

    def describe(self) -> str:
        """The body of the gate's repr."""
        state = self._state
        now = now_or_none()
        snapshot = self._snapshot
        if snapshot is None:
            body = f"{state.reserved} reserved, {state.waiting} waiting, no snapshot"
        else:
            capacity = sum(
                self._gate._ledger.cap(row) or 0
                for row in snapshot.accounts
                if self._gate._allow is None or row.account in self._gate._allow
            )
            age = "" if now is None else f", snapshot {now - snapshot.requested_at:.1f} s old"
            body = f"{state.reserved}/{capacity} reserved, {state.waiting} waiting{age}"
        out = self._quarantined()
        if out:
            body += ", quarantined: " + ", ".join(
                f"{a} ({r})" if r else a for a, (_, r) in sorted(out.items())
            )
        body += ", fleet"
        if self._down_since is not None:
            body += " (store unreachable)"
        return body
