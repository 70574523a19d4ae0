"""The Redis store: one gate shared by many processes and hosts (fleet mode).

The in-memory store keeps its ledger, snapshot and queue in one process. This one keeps them
in Redis, under ``<namespace>:{<sha256(token, service, url)[:16]>}:`` (never the token), so
every process built with the same token, service, URL and namespace shares them. Each state
change is one Lua script in ``lua/``, with its keys, arguments and reply written above it.

How it works, in one place:

- **One queue for the fleet.** A waiter enters a Redis sorted set ordered by priority, then
  by an arrival number from ``HINCRBY``. Every script that can make room ends with one
  *dispatch pass*, run atomically inside Redis by whichever process got there: the same
  accounting rule and strategies as in-process (the conformance suite holds them equal). A
  grant is written under the waiter's id; its owner collects it at its next ``exchange``
  (woken by a pub/sub message, or the fallback re-check).
- **One poll for the fleet.** Snapshot, poll timing and failures are shared. The driver of
  each process asks for the poll lock (``SET NX PX``) when a poll is due; the winner polls
  and applies the answer in one script; the others wait for the message that it landed.
- **Times come from Redis.** Scripts read ``TIME``; clients only sleep for durations the
  scripts returned. "Sent after it settled" is a logical tick, as in the local ledger.
- **Leases.** A grant is a lease with an expiry. A *renewal thread* per gate renews the
  gate's leases and waiter heartbeats every ``min(lease_ttl / 4, 1)`` s with the synchronous
  client. This departs from the no-background-task habit on purpose: renewal must not starve
  when the event loop is busy (a CPU-bound holder, a blocked loop), and only a thread can
  promise that. It also sends, in order, the changes the synchronous APIs record
  (``mark_submitted``, ``mark_busy``, ``quarantine``, ``restore``, ``invalidate``); a change
  that fails (Redis down) stays queued until it lands: a settle or give-back is never lost.
- **Paused and crashed holders.** An expired lease is *reclaimed*: it becomes settled at that
  instant (its holder may have created the job before it stopped), counts until a snapshot
  requested after the reclaim, and brings the next poll forward. Renewal never re-creates a
  reclaimed lease: a holder that was paused past its lease learns that its slot is *lost*
  (``Slot.lost``, ``capgate.lease_lost``). It need not wait for that answer: a lease that no
  renewal confirmed for ``lease_ttl`` less one renewal period (by this host's clock, which
  counts a SIGSTOP and, on Linux, a suspend) reports ``lost`` at once, so a process resuming
  from a long pause learns it before its next create. Only a lease Redis lost is re-asserted
  (an older epoch, or one missing during a recovery grace after a failover). A grant not
  yet picked up lives as long as its waiter's heartbeat (``min(lease_ttl, 5)`` s without
  renewal), so a dead process's grants come back that soon.
- **A paused poller** holds the fleet up no longer than its lock (``SET PX``); its late
  answer, or late failure, never replaces a newer snapshot (``apply`` compares logical
  ticks) and is counted in ``meta.polls_late``.
- **One configuration per fleet.** The first member stores its ``max_jobs``, ``accounts``
  and ``strategy``; a gate built with other ones fails at construction (or, when Redis was
  unreachable then, at its first exchange) with an error naming the difference.
- **Redis trouble fails closed.** While Redis cannot be reached nothing is granted; waiters
  keep waiting, bounded by their own timeouts; ``capgate.store_unavailable`` is logged once
  and ``capgate.store_recovered`` when it is back. Every script is idempotent per lease and
  waiter id. After a data loss (a new epoch) or a restart that reloaded older data (a new
  ``run_id``), nothing is granted for ``recovery_grace`` seconds while live holders
  re-assert their leases.
- **Keys expire.** Every script refreshes the fleet's keys to live ``idle_ttl`` seconds, so
  an idle fleet leaves nothing behind; ``aclose()`` takes this gate's waiters and unclaimed
  grants out at once (the leases of slots still inside their blocks stay until they end).

Redis is called through redis-py's synchronous client in worker threads
(``anyio.to_thread``), so fleet mode runs on asyncio and trio alike. A script in flight is
not abandoned on cancellation: it finishes before its task moves on, so a give-back that
follows always runs after it on the server.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from importlib import resources
from typing import Any, Protocol

import anyio
import anyio.to_thread
import redis as _redis

from .._config import GateConfig
from .._errors import AuthenticationError, PollError
from .._log import log
from .._models import AccountCapacity, ExecutingJob, Snapshot
from .._policy import (
    INVALIDATE_FLOOR,
    LAG_MARGIN,
    LAG_SAMPLES,
    WATCH_FOR,
    WATCH_MAX,
    backoff_delay,
)
from .base import Lease, PollTicket, StoreView, Waiter
from .ledger import cap_for, row_limit


class RedisSettings(Protocol):
    """What the Redis store reads of ``capgate.redis.RedisStore`` (its public settings and
    connection); named here so that this module and ``capgate.redis`` do not import each
    other, even for type checking."""

    lease_ttl: float
    heartbeat_ttl: float
    renew_interval: float
    recheck_interval: float
    recovery_grace: float
    socket_timeout: float
    idle_ttl: float

    def key_prefix(self, token: str, service: str, url: str) -> str: ...
    def client(self) -> Any: ...
    def _attach(self) -> None: ...
    def _detach(self) -> None: ...


__all__ = ["SCRIPTS", "FleetStore", "config_mismatch", "fleet_config"]

#: what counts as "the store is unreachable": redis-py's errors, and its cluster client's
#: own (``RedisClusterUnreachableError``, ``SlotNotCoveredError`` are no ``RedisError``)
STORE_ERRORS: tuple[type[Exception], ...] = (
    _redis.RedisError,
    _redis.exceptions.RedisClusterException,
)

#: the operations, one Lua file each; common.lua is prepended to every one
OPERATIONS = (
    "sync",
    "begin_poll",
    "apply",
    "poll_failed",
    "unlock",
    "settle",
    "give_back",
    "abandon",
    "quarantine",
    "restore",
    "invalidate",
    "renew",
    "close",
    "join",
)


def _load_scripts() -> dict[str, str]:
    lua = resources.files(__package__).joinpath("lua")
    common = lua.joinpath("common.lua").read_text(encoding="utf-8")
    return {op: common + lua.joinpath(f"{op}.lua").read_text(encoding="utf-8") for op in OPERATIONS}


SCRIPTS = _load_scripts()

#: like monotonic, but on Linux it also counts a suspend (a laptop lid, a paused VM)
_steady: Callable[[], float] = (
    functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
    if hasattr(time, "CLOCK_BOOTTIME")
    else time.monotonic
)


class _FleetLease(Lease):
    """A lease in Redis: ``lost`` also once no renewal confirmed it for too long.

    ``confirmed_until`` is this host's steady time until which the lease is surely still
    ours in Redis (the send time of the latest call that extended it, plus its length, less
    one renewal period). Past it the fleet may have reclaimed it (the process was paused), so
    ``lost`` turns true and stays true: a caller must not create on it.
    """

    __slots__ = ("_lost", "confirmed_until")

    def __init__(self, account: str, granted_at: float, handle: Any, confirmed_until: float):
        self._lost = False
        self.confirmed_until = confirmed_until
        super().__init__(account, granted_at, handle)

    @property
    def lost(self) -> bool:
        if not self._lost and _steady() >= self.confirmed_until:
            self._lost = True
        return self._lost

    @lost.setter
    def lost(self, value: bool) -> None:
        self._lost = self._lost or value


def fleet_config(config: GateConfig) -> str:
    """The part of a gate's configuration every member of a fleet must share, as JSON."""
    caps = config.max_jobs
    if caps is not None and not isinstance(caps, int):
        caps = dict(sorted(caps.items()))
    return json.dumps(
        {
            "accounts": None if config.accounts is None else list(config.accounts),
            "max_jobs": caps,
            "strategy": str(config.strategy),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def config_mismatch(mine: str, fleet: str) -> ValueError | None:
    """The error for a gate whose shared configuration differs from its fleet's, if it does."""
    if mine == fleet:
        return None
    ours, theirs = json.loads(mine), json.loads(fleet)
    parts = [
        f"{name}={ours.get(name)!r} here, {theirs.get(name)!r} in the fleet"
        for name in ("max_jobs", "accounts", "strategy")
        if ours.get(name) != theirs.get(name)
    ]
    return ValueError(
        "every gate of a fleet needs the same max_jobs, accounts and strategy; this one has "
        + "; ".join(parts or ["another configuration"])
    )


class _State:
    """The fleet's shared state as of the latest exchange (times relative to ``taken``)."""

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
        "mquar",
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
        # what the scripts return, read leniently: a field someone else wrote into the
        # fleet's keys reads as its default (the scripts decide grants, not this view)
        d = data or {}
        self.taken = taken
        self.fresh_in = _number(d, "fresh_in", -1.0)
        self.poll_in = _number(d, "poll_in", -1.0)
        self.grace_in = _number(d, "grace_in", 0.0)
        self.sent_tick = _count(d, "sent_tick")
        self.snap_age = _number(d, "snap_age", 0.0)
        self.waiting = _count(d, "waiting")
        self.held = _count(d, "held")
        self.reserved = _count(d, "reserved")
        self.pending: dict[str, int] = _counts(d.get("pending"))
        self.limit: dict[str, int] = _counts(d.get("limit"))
        busy = d.get("busy")
        self.busy: frozenset[str] = frozenset(
            str(a) for a in (busy if isinstance(busy, list) else ()) if isinstance(a, str)
        )
        self.quar: dict[str, tuple[float, str]] = {}
        for account, entry in _mapping(d.get("quar")).items():
            left, reason = _pair(entry)
            self.quar[account] = (left, reason)  # in force, with or without its reason
        mquar = d.get("mquar")
        self.mquar: list[tuple[str, str, float, str]] = []
        for row in mquar if isinstance(mquar, list) else ():
            if isinstance(row, list) and len(row) == 4:
                left, reason = _pair(row[2:])
                self.mquar.append((str(row[0]), str(row[1]), left, reason))
        self.lag = _number(d, "lag", 0.0)
        self.polls = _count(d, "polls")
        self.polls_failed = _count(d, "polls_failed")
        self.failures = _count(d, "failures")
        last_error = d.get("last_error")
        self.last_error: str | None = last_error if isinstance(last_error, str) else None
        auth_at = d.get("auth_at")
        self.auth_at: str | None = auth_at if isinstance(auth_at, str) else None
        self.auth_age = _number(d, "auth_age", math.inf)
        self.auth_msg = str(d.get("auth_msg", ""))
        self.auth_status = _count(d, "auth_status") or None
        epoch = d.get("epoch")
        self.epoch: str | None = epoch if isinstance(epoch, str) else None

    def since(self, now: float) -> float:
        """Seconds since this state was read (0 outside the event loop)."""
        return 0.0 if math.isnan(now) else max(0.0, now - self.taken)


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _as_number(value: object, default: float) -> float:
    """``value`` as a float; ``default`` where it is none (NaN, text, an object)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return default
    return default if math.isnan(number) else number


def _as_count(value: object) -> int:
    number = _as_number(value, 0.0)
    return int(number) if math.isfinite(number) else 0


def _number(d: dict[str, Any], key: str, default: float) -> float:
    return _as_number(d.get(key, default), default)


def _count(d: dict[str, Any], key: str) -> int:
    return _as_count(d.get(key, 0))


def _counts(value: object) -> dict[str, int]:
    return {str(k): _as_count(v) for k, v in _mapping(value).items()}


def _pair(entry: object) -> tuple[float, str]:
    """A quarantine's (seconds left, reason): for ever, and no reason, where unreadable."""
    left, reason = math.inf, ""
    if isinstance(entry, list | tuple):
        if entry:
            left = _as_number(entry[0], math.inf)
        if len(entry) > 1 and isinstance(entry[1], str):
            reason = entry[1]
    return left, reason


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
            # each job's age in seconds, apart from "e" so that a reader that knows only
            # "e" (an older member, mid-upgrade) still reads the snapshot
            "es": [j.elapsed_seconds for j in snapshot.executing],
            "k": snapshot.skipped,
            "d": snapshot.received_at - snapshot.requested_at,
        },
        separators=(",", ":"),
    )


def _decode_snapshot(service: str, text: str, requested_at: float) -> Snapshot:
    data = json.loads(text)
    ages = data.get("es") or [None] * len(data["e"])
    return Snapshot(
        service=service,
        accounts=tuple(AccountCapacity(a, m, e, v) for a, m, e, v in data["a"]),
        executing=tuple(
            ExecutingJob(
                j,
                a,
                None if s is None else datetime.fromisoformat(s),
                el,
                None if age is None else float(age),
            )
            for (j, a, s, el), age in zip(data["e"], ages, strict=False)
        ),
        requested_at=requested_at,
        received_at=requested_at + float(data.get("d", 0.0)),
        skipped=int(data.get("k", 0)),
    )


class FleetStore:
    """A :class:`~capgate._engine.base.Store` in Redis (opened by ``RedisStore``)."""

    in_process = False  # a waiter joins the fleet's queue by an exchange

    def __init__(
        self,
        config: GateConfig,
        redis_store: RedisSettings,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if callable(config.strategy):
            raise TypeError(
                "a callable strategy cannot run inside Redis; with store= use one of "
                "most_available, round_robin, first_fit"
            )
        self._config = config
        self._rs = redis_store
        self._service = config.service.name
        self._prefix = redis_store.key_prefix(
            config.token.reveal(), config.service.name, str(config.url)
        )
        self._owner = uuid.uuid4().hex
        self._clock = clock  # conformance tests only: a virtual time for the scripts
        self._now: Callable[[], float] = anyio.current_time  # the core's (bind)
        self._fixed = {
            "grace": redis_store.recovery_grace,
            "idle": redis_store.idle_ttl,
        }
        self._dispatching = {
            "owner": self._owner,
            "ttl": redis_store.heartbeat_ttl,
            "strategy": str(config.strategy),
            "pref": list(config.accounts or ()),
        }
        redis_store._attach()
        self._client = redis_store.client()
        self._scripts = {op: self._client.register_script(src) for op, src in SCRIPTS.items()}
        #: waiter id -> steady time its heartbeat was last sent (a sync or a renewal listing it)
        self._beaten: dict[str, float] = {}
        self._config_json = fleet_config(config)
        self._joined: str | None = None  # the epoch in which the fleet's configuration was checked
        self._lock_ids = itertools.count(1)
        self._wids = itertools.count(1)
        self._exchange_lock: anyio.Lock | None = None
        self._exchanges_begun = 0

        # shared with the renewal thread
        self._held: dict[str, Lease] = {}  # lease id -> the lease, while held
        self._outbox: deque[tuple[str, dict[str, Any]]] = deque()
        self._exec_lock = threading.Lock()
        self._held_lock = threading.Lock()
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._renew_now = False
        self._waiter_ids: list[str] = []
        self._ps_lock = threading.Lock()
        self._pubsub: Any = None
        self._message = False
        self._listen_gen = 0
        self._closed = False
        self._detached = False
        # scripts running in worker threads: detaching disconnects the pool, which would
        # cut a call in flight mid-read (redis-py then fails with an AttributeError)
        self._calls = 0
        self._calls_done = threading.Condition()
        self._down_since: float | None = None
        self._down_lock = threading.Lock()

        self._state = _State()
        self._snapshot: Snapshot | None = None
        try:
            self._join()
        except STORE_ERRORS as exc:
            # checked at the first exchange instead; a gate may be built before Redis is up
            log.warning(
                "capgate.store_unavailable",
                service=self._service,
                error=f"{type(exc).__name__}: {exc}",
                held=0,
            )
        except BaseException:
            redis_store._detach()
            raise

    def bind(self, clock: Callable[[], float]) -> None:
        self._now = clock
        self._exchange_lock = None  # made again on this loop, by the next exchange

    def _join(self, named: dict[str, Any] | None = None) -> None:
        """Check this gate's configuration against its fleet's (blocking; raises on a mismatch)."""
        reply = self._call("join", **(named or self._stamp({"config": self._config_json})))
        error = config_mismatch(self._config_json, str(reply["config"]))
        if error is not None:
            raise error
        self._joined = str(reply["epoch"])

    # --- Redis calls ------------------------------------------------------------------------

    def _call(self, op: str, **named: Any) -> Any:
        """Run one script (blocking; in a worker or the renewal thread)."""
        named.update(self._fixed)
        with self._calls_done:
            self._calls += 1
        try:
            raw = self._scripts[op](keys=[self._prefix], args=[json.dumps(named)])
        finally:
            with self._calls_done:
                self._calls -= 1
                self._calls_done.notify_all()
        return json.loads(raw)

    def _stamp(self, named: dict[str, Any]) -> dict[str, Any]:
        """With a test clock, the script's time is the clock's when the call was made."""
        if self._clock is not None:
            named["now"] = self._clock()
        return named

    async def _run(self, op: str, **named: Any) -> Any:
        # not abandoned on cancel: a script in flight finishes before the task moves on, so
        # a later give-back always runs after it on the server
        self._stamp(named)
        result = await anyio.to_thread.run_sync(lambda: self._call(op, **named))
        self._store_up()
        return result

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

    # --- the view ---------------------------------------------------------------------------

    def _fresh(self, now: float) -> bool:
        state = self._state
        return self._snapshot is not None and state.fresh_in - state.since(now) > 0

    def view(self, now: float) -> StoreView:
        state = self._state
        snapshot = self._snapshot
        out = self.quarantined(now)
        free: dict[str, int] = {}
        if self._fresh(now) and snapshot is not None:
            for row in snapshot.accounts:
                account = row.account
                if account not in state.busy and account not in out:
                    free[account] = max(
                        0, state.limit.get(account, 0) - state.pending.get(account, 0)
                    )
        caps = {}
        if snapshot is not None:
            caps = {row.account: cap_for(row, self._config.max_jobs) for row in snapshot.accounts}
        note = ", fleet" + (" (store unreachable)" if self._down_since is not None else "")
        return StoreView(
            snapshot=snapshot,
            sent_tick=state.sent_tick,
            fresh=self._fresh(now),
            free=free,
            pending=state.pending,
            caps=caps,
            busy=state.busy,
            quarantined=out,
            reserved=state.reserved,
            held=state.held,
            waiting=state.waiting,
            polls=state.polls,
            polls_failed=state.polls_failed,
            last_error=state.last_error,
            lag=state.lag,
            note=note,
        )

    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def quarantined(self, now: float, model: str | None = None) -> dict[str, tuple[float, str]]:
        spent = self._state.since(now)
        out: dict[str, tuple[float, str]] = {}
        if model is not None:  # out for this model only, unless the whole account is out
            for account, which, left, reason in self._state.mquar:
                if which == model and left > spent:
                    out[account] = (left - spent, reason)
        out.update(
            (a, (left - spent, r)) for a, (left, r) in self._state.quar.items() if left > spent
        )
        return out

    def auth_failure(self, now: float) -> tuple[AuthenticationError, float, object] | None:
        state = self._state
        if state.auth_at is None:
            return None
        error = AuthenticationError(state.auth_msg, status_code=state.auth_status)
        return error, state.auth_age + state.since(now), state.auth_at

    def _apply_state(self, data: dict[str, Any]) -> None:
        now = self._now()
        state = _State(data, now)
        snap = data.get("snap")
        if isinstance(snap, str):
            try:
                self._snapshot = _decode_snapshot(self._service, snap, now - state.snap_age)
            except Exception:  # noqa: BLE001 - whatever was written there, no snapshot
                log.warning("capgate.store_bad_snapshot", service=self._service)
                self._snapshot = None
        elif state.sent_tick == 0:
            self._snapshot = None
        self._state = state

    # --- granting ---------------------------------------------------------------------------

    holding = False  # every free slot is granted in Redis: none is left for a faster one

    def grant_nowait(
        self, allowed: frozenset[str] | None, now: float, deadline: float = math.inf
    ) -> Lease | None:
        return None  # the fleet's queue is in Redis: only a script may grant

    def dispatch(self, queue: Iterable[Waiter], now: float) -> list[tuple[Waiter, Lease]]:
        return []  # every script that makes room dispatches inside Redis

    async def exchange(self, queue: Callable[[], Iterable[Waiter]]) -> list[tuple[Waiter, Lease]]:
        """Enqueue new waiters, run a dispatch pass, collect grants (coalesced)."""
        if self._exchange_lock is None:
            self._exchange_lock = anyio.Lock()
        self._ensure_keeper()
        mark = self._exchanges_begun
        async with self._exchange_lock:
            if self._exchanges_begun > mark:
                return []  # one that began after we arrived covered us, and handed out grants
            self._exchanges_begun += 1
            allow = self._config.allow
            waiters = [w for w in queue() if w.open]
            for w in waiters:
                if not w.wid:  # named on its first trip to Redis: unique across the fleet
                    w.wid = f"{self._owner}-{next(self._wids)}"
            listed = []
            for w in waiters:
                allowed = w.allowed if allow is None else allow & (w.allowed or allow)
                listed.append(
                    [
                        w.wid,
                        w.priority,
                        sorted(allowed) if allowed is not None else False,
                        w.model or False,
                    ]
                )
            self._waiter_ids = [w.wid for w in waiters]
            sent = _steady()
            try:
                if self._joined is None:
                    named = self._stamp({"config": self._config_json})
                    await anyio.to_thread.run_sync(self._join, named)
                data = await self._run(
                    "sync",
                    **self._dispatching,
                    known_tick=self._state.sent_tick,
                    waiters=listed,
                )
            except STORE_ERRORS as exc:
                self._store_down(exc)
                return []
            beaten = self._beaten
            # a grant lives until its waiter's heartbeat ends: at least a heartbeat from the
            # latest one sent for it (this call's, for a waiter it enqueued)
            starts = {w.wid: beaten.get(w.wid, sent) for w in waiters}
            self._beaten = {w.wid: sent for w in waiters}
            if data.get("epoch") != self._joined:
                self._joined = None  # Redis lost its data: store our configuration again
            self._apply_state(data)
            now = self._now()
            grants: list[tuple[Waiter, Lease]] = []
            by_id = {w.wid: w for w in waiters}
            length = self._rs.heartbeat_ttl - self._rs.renew_interval
            for wid, grant in _mapping(data.get("granted")).items():
                waiter = by_id.get(wid)
                if waiter is None or not waiter.open:
                    continue  # it left, or is leaving: its abandon gives the lease back
                lease = _FleetLease(
                    str(grant[1]), now, (str(grant[0]), wid), starts.get(wid, sent) + length
                )
                with self._held_lock:
                    self._held[str(grant[0])] = lease
                grants.append((waiter, lease))
            picked = set(_mapping(data.get("granted")))
            self._waiter_ids = [wid for wid in self._waiter_ids if wid not in picked]
            return grants

    async def wait(self, waiter: Waiter, timeout: float) -> None:
        """Wait for a wake-up message for us (or ``waiter`` woken), ``timeout`` at most."""
        if self._down_since is not None:
            await waiter.sleep(min(timeout, 0.25))
            return
        if self._message:
            self._message = False
            return
        self._listen_gen += 1
        gen = self._listen_gen
        with anyio.CancelScope() as scope:
            waiter.scope = scope
            try:
                if waiter.woken:
                    # woken while awake: this wait is that wake-up's, and uses it up (left
                    # set, every later wait returned at once: an exchange per turn, a core)
                    waiter.woken = False
                    self._message = False
                    return
                await anyio.to_thread.run_sync(
                    self._listen_sync, max(timeout, 0.005), gen, abandon_on_cancel=True
                )
            except STORE_ERRORS as exc:
                self._store_down(exc)
                await anyio.sleep(min(timeout, 0.25))
            finally:
                waiter.scope = None
                if self._listen_gen == gen:
                    # an abandoned listening thread sees this and returns within a slice
                    self._listen_gen += 1
        waiter.woken = False
        self._message = False

    def _listen_sync(self, timeout: float, gen: int) -> None:
        deadline = time.monotonic() + timeout
        with self._ps_lock:
            if self._closed or gen != self._listen_gen:
                return
            try:
                if self._pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
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
            except STORE_ERRORS:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                self._pubsub = None
                raise

    def abandon(self, waiter: Waiter, lease: Lease | None) -> bool:
        if lease is not None:
            with self._held_lock:
                self._held.pop(lease.handle[0], None)
        if waiter.wid:  # else it never reached Redis
            self._record("abandon", waiter=waiter.wid, **self._dispatching)
        return False

    # --- polling ----------------------------------------------------------------------------

    def poll_due_in(self, now: float) -> float:
        if self._down_since is not None:
            return math.inf  # fails closed: the re-check in next_change_in tries Redis again
        state = self._state
        return state.poll_in - state.since(now)

    def next_change_in(self, now: float) -> float:
        state = self._state
        spent = state.since(now)
        delay = self._rs.recheck_interval
        if self._down_since is not None:
            delay = min(delay, 0.25)
        if state.grace_in - spent > 0:
            delay = min(delay, state.grace_in - spent)
        for left in (
            *(left for left, _ in self.quarantined(now).values()),
            *(m[2] - spent for m in self._state.mquar if m[2] > spent),
        ):
            delay = min(delay, left)
        return max(delay, 0.005)

    async def begin_poll(self, *, force: bool) -> PollTicket | float:
        config = self._config
        token = f"{self._owner}:{next(self._lock_ids)}"
        # the lock outlives any poll that is not unusually slow; a poller paused or killed
        # mid-request holds the fleet up no longer than this
        lock_s = min(config.poll_timeout + 1.0, max(3.0, 3 * config.poll_interval))
        try:
            begin = await self._run(
                "begin_poll", token=token, lock_ms=int(lock_s * 1000), force=force
            )
        except STORE_ERRORS as exc:
            self._store_down(exc)
            if force:
                raise PollError(
                    f"{self._service}: the fleet's Redis store is unreachable"
                ) from None
            return self._rs.recheck_interval
        if not begin.get("ok"):
            return max(float(begin.get("wait", 0.0)), 0.005)
        return PollTicket(
            int(begin["tick"]),
            self._now(),
            token=token,
            server_sent=str(begin["sent"]),
            generation=str(begin["gen"]),
            failures=int(begin.get("failures", 0)),
        )

    async def apply(self, ticket: PollTicket, snapshot: Snapshot, spacing: float) -> None:
        caps = self._config.max_jobs
        limits = [
            [row.account, row_limit(snapshot, row, cap_for(row, caps))] for row in snapshot.accounts
        ]
        try:
            with anyio.CancelScope(shield=True):
                await self._run(
                    "apply",
                    token=ticket.token,
                    tick=ticket.tick,
                    gen=ticket.generation,
                    sent=ticket.server_sent,
                    spacing=spacing,
                    snap=_encode_snapshot(snapshot),
                    limits=limits,
                    jobs=[j.job_id for j in snapshot.executing],
                    floor=INVALIDATE_FLOOR,
                    lag_margin=LAG_MARGIN,
                    lag_samples=LAG_SAMPLES,
                    watch_for=WATCH_FOR,
                    watch_max=WATCH_MAX,
                    **self._dispatching,
                )
        except STORE_ERRORS as exc:
            self._store_down(exc)
            await self.poll_aborted(ticket)

    async def poll_failed(
        self, ticket: PollTicket, error: PollError | AuthenticationError, u: float
    ) -> float:
        config = self._config
        auth = isinstance(error, AuthenticationError)
        if auth:
            delay = config.poll_interval
        else:
            retry_after = error.retry_after if isinstance(error, PollError) else None
            delay = backoff_delay(
                config.poll_interval, config.max_backoff, ticket.failures + 1, u, retry_after
            )
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._run(
                    "poll_failed",
                    token=ticket.token,
                    tick=ticket.tick,
                    gen=ticket.generation,
                    auth=auth,
                    message=str(error),
                    status=error.status_code or 0,
                    delay=delay,
                )
        except STORE_ERRORS as exc:
            self._store_down(exc)
            self._record("unlock", token=ticket.token)
        return delay

    async def poll_aborted(self, ticket: PollTicket) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await self._run("unlock", token=ticket.token)
            except STORE_ERRORS:
                self._record("unlock", token=ticket.token)

    # --- changes ----------------------------------------------------------------------------

    def _record(self, op: str, **named: Any) -> None:
        self._outbox.append((op, self._stamp(named)))
        self._ensure_keeper()
        self._kick.set()

    def _release(self, lease: Lease) -> tuple[str, str]:
        lease_id, wid = lease.handle
        with self._held_lock:
            self._held.pop(lease_id, None)
        return lease_id, wid

    def settle(self, lease: Lease, job_id: str | None, now: float) -> bool:
        lease_id, wid = self._release(lease)
        self._record(
            "settle",
            lease=lease_id,
            account=lease.account,
            job=job_id or "",
            waiter=wid,
            **self._dispatching,
        )
        return False

    def give_back(self, lease: Lease) -> bool:
        lease_id, _ = self._release(lease)
        self._record(
            "give_back", lease=lease_id, account=lease.account, busy=False, **self._dispatching
        )
        return True

    def mark_busy(self, lease: Lease) -> bool:
        lease_id, _ = self._release(lease)
        self._record(
            "give_back", lease=lease_id, account=lease.account, busy=True, **self._dispatching
        )
        return False

    def quarantine(
        self, account: str, seconds: float, reason: str, model: str | None = None
    ) -> None:
        named: dict[str, Any] = {"account": account, "seconds": seconds, "reason": reason}
        if model is not None:
            named["model"] = model
        self._record("quarantine", **named)
        # in force here at once; the next exchange brings the fleet's view
        spent = self._state.since(self._now())
        if model is None:
            self._state.quar[account] = (seconds + spent, reason)
        else:
            self._state.mquar.append((account, model, seconds + spent, reason))

    def restore(self, account: str) -> bool:
        self._record("restore", account=account, **self._dispatching)
        models = [m for m in self._state.mquar if m[0] == account]
        self._state.mquar = [m for m in self._state.mquar if m[0] != account]
        return self._state.quar.pop(account, None) is not None or bool(models)

    def invalidate(self) -> None:
        self._record("invalidate", floor=INVALIDATE_FLOOR)

    def job_ended(self, job_id: str) -> bool:
        # not in the scripts yet: the fleet learns of the end from the poll invalidate() asks
        return False

    def expect_freed(self, expected: Mapping[str, int]) -> bool:
        # probes on counts that lag are not in the scripts yet: a fleet waits for the counts
        return False

    def prefer_faster(
        self, snapshot: Snapshot, typical: Mapping[str, float], ends: Mapping[str, list[float]]
    ) -> None:
        # the dispatch pass runs in Redis with the fleet's strategy as configured
        return None

    async def flush(self) -> None:
        """Send the recorded changes now (shielded, bounded); the renewal thread retries."""
        if not self._outbox:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._rs.socket_timeout + 3):
            try:
                await anyio.to_thread.run_sync(self._drain)
            except STORE_ERRORS as exc:
                self._store_down(exc)
                self._kick.set()
            else:
                self._store_up()

    def _drain(self) -> None:
        """Run queued changes in order; stop at the first failure (blocking)."""
        with self._exec_lock:
            while self._outbox:
                op, named = self._outbox[0]
                self._call(op, **named)
                self._outbox.popleft()

    # --- the renewal thread -----------------------------------------------------------------

    def _ensure_keeper(self) -> None:
        if self._keeper is not None and self._keeper.is_alive():
            return
        keeper = threading.Thread(
            target=self._keep, name=f"capgate-lease-renewal-{self._service}", daemon=True
        )
        keeper.start()
        # published only once started: aclose() in a worker thread may join it at any time
        self._keeper = keeper

    def _keep(self) -> None:
        every = self._rs.renew_interval
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
            except STORE_ERRORS as exc:
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
                held = [
                    [lease_id, lease.account, lease.handle[1]]
                    for lease_id, lease in self._held.items()
                ]
            wids = list(self._waiter_ids)
            if not held and not wids:
                return
            sent = _steady()
            reply = self._call(
                "renew",
                owner=self._owner,
                lease_ttl=self._rs.lease_ttl,
                ttl=self._rs.heartbeat_ttl,
                held=held,
                waiters=wids,
            )
        beaten = self._beaten
        for wid in wids:
            if wid in beaten:
                beaten[wid] = max(beaten[wid], sent)
        lost_ids = set(reply.get("lost") or ())
        until = sent + self._rs.lease_ttl - self._rs.renew_interval
        with self._held_lock:
            for lease_id, _, _ in held:
                lease = self._held.get(lease_id)
                if lease_id not in lost_ids and isinstance(lease, _FleetLease):
                    lease.confirmed_until = max(lease.confirmed_until, until)
        if reply.get("reasserted"):
            log.warning(
                "capgate.lease_reasserted", service=self._service, leases=reply["reasserted"]
            )
        for lease_id in reply.get("lost") or ():
            with self._held_lock:
                lease = self._held.pop(lease_id, None)
            if lease is not None:
                lease.lost = True
                log.warning(
                    "capgate.lease_lost",
                    service=self._service,
                    account=lease.account,
                    lease_ttl=self._rs.lease_ttl,
                )

    # --- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self.flush()
        with self._held_lock:
            held = list(self._held)
        try:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(self._rs.socket_timeout + 1),
            ):
                try:
                    data = await self._run(
                        "close",
                        **self._dispatching,
                        held=held,
                        known_tick=self._state.sent_tick,
                    )
                except STORE_ERRORS as exc:
                    self._store_down(exc)  # its waiters leave with their heartbeats
                else:
                    self._apply_state(data)
        finally:  # whatever went wrong above, the renewal thread and the listener stop
            self._waiter_ids = []
            self._stop.set()
            self._kick.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await anyio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        with self._ps_lock:
            self._closed = True
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    self._pubsub.close()
                self._pubsub = None
        keeper = self._keeper
        if keeper is not None:
            # slots still held keep renewing until their blocks end; the keeper detaches then
            keeper.join(timeout=0.5 if self._held else self._rs.socket_timeout + 1)
        if keeper is None or (not keeper.is_alive() and not self._held):
            self._detach()

    def _detach(self) -> None:
        with self._held_lock:
            if self._detached:
                return
            self._detached = True
        with self._calls_done:  # a script in flight ends within the socket timeout
            self._calls_done.wait_for(lambda: self._calls == 0, self._rs.socket_timeout + 1)
        self._rs._detach()
