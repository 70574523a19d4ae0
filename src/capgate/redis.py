"""Fleet mode: share one gate among many processes and hosts through Redis.

Turn it on with one argument::

    from capgate import CapacityGate
    from capgate.redis import RedisStore

    gate = CapacityGate(token, service="kling",
                        store=RedisStore("redis://127.0.0.1:6379/0", namespace="capgate"))

Every process that builds a gate with the same token, service, URL and store namespace
joins one fleet: one shared ledger, one shared snapshot, one poll at a time for all of them,
one queue of waiters served in arrival order across processes. How it works is described in
``capgate._engine.fleet``; this module holds only the configuration and the connection.

Needs the ``redis`` extra (``pip install 'capgate[redis]'``): redis-py's *synchronous*
client, called through ``anyio.to_thread`` so that fleet mode runs on asyncio and trio
alike (``redis.asyncio`` is asyncio-only), and from one renewal thread per gate.

Deployments: a single server (``redis://``, ``rediss://``, ``unix://``), Sentinel
(``redis+sentinel://``, or a client from ``Sentinel.master_for``), Redis Cluster (pass a
``redis.cluster.RedisCluster`` as ``client=``: a fleet's keys share one hash slot), an ACL
user limited to the fleet's keys and the commands its scripts run, and Valkey.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

try:
    import redis as _redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a venv without redis
    if exc.name != "redis":
        raise
    raise ModuleNotFoundError(
        "capgate.redis needs the redis extra: pip install 'capgate[redis]'", name=exc.name
    ) from exc

from ._engine.fleet import FleetStore

if TYPE_CHECKING:
    from ._config import GateConfig

__all__ = ["RedisStore"]

_SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SCHEMES = ("redis://", "rediss://", "unix://", *_SENTINEL_SCHEMES)

_Sentinel = tuple[list[tuple[str, int]], str, int, dict[str, str], bool]


def _parse_sentinel(url: str) -> _Sentinel:
    """``redis+sentinel://[user:password@]h1:p1,h2:p2/master[/db]``: nodes, master, db, auth."""
    parts = urlsplit(url)
    where = parts.netloc.rsplit("@", 1)
    auth: dict[str, str] = {}
    if len(where) == 2:
        user, _, password = where[0].partition(":")
        if user:
            auth["username"] = unquote(user)
        if password:
            auth["password"] = unquote(password)
    nodes = []
    for node in where[-1].split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("a sentinel URL lists host:port pairs, comma-separated")
        nodes.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a sentinel URL ends with /<master name>[/<db>]")
    db = int(path[1]) if len(path) == 2 else 0
    return nodes, unquote(path[0]), db, auth, parts.scheme.startswith("rediss")


def _positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


#: every store of this process, so that a forked child starts them afresh
_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # the parent's connections and users are the parent's: a child opens its own pool
    # (and a lock held by a parent thread at the fork would never be released here); a
    # client= of the caller's reconnects by itself (redis-py pools check the process id)
    for store in list(_STORES):
        store._lock = threading.Lock()
        store._pool = None
        store._sentinel_client = None
        store._users = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisStore:
    """Where a fleet of gates keeps its shared state: a Redis server and a key namespace.

    Pass it as ``CapacityGate(..., store=RedisStore(url))``. One store may serve several
    gates (different tokens or services get different keys); it owns a connection pool that
    is closed when the last gate using it is closed.

    Args:
        url: A redis-py URL: ``redis://[[user]:password@]host:port/db``, ``rediss://`` for
            TLS, ``unix:///path.sock``; or a Sentinel URL,
            ``redis+sentinel://[[user]:password@]host:port[,host:port...]/master[/db]``
            (the password is the data nodes'; ``rediss+sentinel://`` for TLS to them).
        client: A ready redis-py client instead of ``url``: a ``redis.Redis`` (for
            example from ``Sentinel.master_for``) or a ``redis.cluster.RedisCluster``. It
            stays the caller's: capgate never closes it. Give it a ``socket_timeout``, and
            no retries of its own (``retry=Retry(NoBackoff(), 0)``): the fleet retries.
        namespace: The first part of every key; keys are
            ``<namespace>:{<hash of token, service and url>}:<name>``, never the token itself.
        lease_ttl: Seconds a slot stays reserved for a holder that stopped renewing it (a
            crashed process); live holders renew every ``min(lease_ttl / 4, 1)`` seconds.
            A crashed process's waiters leave the queue sooner, after
            ``min(lease_ttl, 5)`` seconds without renewal.
        recheck_interval: Seconds between fallback re-checks while waiting, for wake-up
            messages that were missed.
        recovery_grace: Seconds after Redis lost its data (a restart without persistence)
            during which nothing is granted, so that live holders can re-assert their
            leases first. Default: one renewal period plus 0.5 s. A holder that has not
            re-asserted within it (paused longer) is told at its next renewal that its
            slot is lost, since the fleet may have granted it again; with 0, every slot
            held when Redis lost its data is lost.
        socket_timeout: Seconds one Redis call may take before it counts as a failure.
        idle_ttl: Seconds a fleet's keys outlive its last activity (default: a day); every
            operation refreshes them, so an idle fleet leaves nothing behind in Redis.

    Raises:
        TypeError, ValueError: An argument is of the wrong type or out of range.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        namespace: str = "capgate",
        lease_ttl: float = 120.0,
        recheck_interval: float = 1.0,
        recovery_grace: float | None = None,
        socket_timeout: float = 2.0,
        idle_ttl: float = 86400.0,
    ) -> None:
        if client is not None:
            if url is not None:
                raise TypeError("pass url or client, not both")
            if not callable(getattr(client, "register_script", None)) or not callable(
                getattr(client, "pubsub", None)
            ):
                raise TypeError(
                    "client must be a redis-py client (redis.Redis or "
                    f"redis.cluster.RedisCluster), not {type(client).__name__}"
                )
            url = ""
        elif url is None:
            url = "redis://127.0.0.1:6379/0"
        elif not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        elif not url.startswith(_SCHEMES):
            raise ValueError(
                "url must start with redis://, rediss://, unix://, redis+sentinel:// "
                "or rediss+sentinel://"
            )
        sentinel = _parse_sentinel(url) if url.startswith(_SENTINEL_SCHEMES) else None
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
        if not namespace or any(ch.isspace() or ch in "{}" for ch in namespace):
            raise ValueError("namespace must be non-empty, without whitespace or braces")
        self._url = url
        self._given_client = client
        self._sentinel = sentinel
        self._sentinel_client: _redis.Redis | None = None
        self.namespace = namespace
        self.lease_ttl = _positive("lease_ttl", lease_ttl)
        self.recheck_interval = _positive("recheck_interval", recheck_interval)
        self.renew_interval = min(self.lease_ttl / 4, 1.0)
        #: seconds a waiter (or a grant not yet picked up) outlives its process's last renewal
        self.heartbeat_ttl = min(self.lease_ttl, max(5.0, 4 * self.renew_interval))
        self.recovery_grace = (
            self.renew_interval + 0.5
            if recovery_grace is None
            else _positive("recovery_grace", recovery_grace, allow_zero=True)
        )
        self.socket_timeout = _positive("socket_timeout", socket_timeout)
        self.idle_ttl = _positive("idle_ttl", idle_ttl)
        if self.idle_ttl < self.lease_ttl:
            # a crashed holder's lease must be reclaimed before its fleet's keys expire
            raise ValueError(
                f"idle_ttl must be at least lease_ttl ({self.lease_ttl:g} s), got {idle_ttl!r}"
            )
        self._lock = threading.Lock()
        self._pool: _redis.ConnectionPool | None = None
        self._users = 0
        _STORES.add(self)

    def key_prefix(self, token: str, service: str, url: str) -> str:
        """The prefix of one gate's keys: the namespace and a hash, never the token.

        The hash sits in braces so that every key of one gate maps to one Redis Cluster slot.
        """
        digest = hashlib.sha256(f"{token}\0{service}\0{url}".encode()).hexdigest()[:16]
        return f"{self.namespace}:{{{digest}}}:"

    def client(self) -> Any:
        """A synchronous client on the store's pool (internal; thread-safe)."""
        if self._given_client is not None:
            return self._given_client
        with self._lock:
            if self._sentinel is not None:
                if self._sentinel_client is None:
                    self._sentinel_client = self._sentinel_master()
                return self._sentinel_client
            if self._pool is None:
                self._pool = _redis.ConnectionPool.from_url(
                    self._url,
                    socket_timeout=self.socket_timeout,
                    socket_connect_timeout=min(self.socket_timeout, 1.0),
                    # retries are the fleet's job: a script must not run twice unseen
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                )
            return _redis.Redis(connection_pool=self._pool, retry=Retry(NoBackoff(), 0))

    def _sentinel_master(self) -> _redis.Redis:
        assert self._sentinel is not None  # noqa: S101 - called only for sentinel URLs
        nodes, master, db, auth, tls = self._sentinel
        connect = min(self.socket_timeout, 1.0)
        sentinel = Sentinel(
            nodes,
            sentinel_kwargs={
                "socket_timeout": self.socket_timeout,
                "socket_connect_timeout": connect,
            },
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=connect,
        )
        client: _redis.Redis = sentinel.master_for(
            master,
            db=db,
            ssl=tls,
            username=auth.get("username"),
            password=auth.get("password"),
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return client

    def _open_store(self, config: GateConfig) -> FleetStore:
        """The fleet backend of one gate (internal; called once, at the gate's construction)."""
        return FleetStore(config, self)

    def _attach(self) -> None:
        with self._lock:
            self._users += 1

    def _detach(self) -> None:
        with self._lock:
            self._users -= 1
            pool = self._pool if self._users <= 0 else None
            if pool is not None:
                self._pool = None
            master = self._sentinel_client if self._users <= 0 else None
            if master is not None:
                self._sentinel_client = None
        if pool is not None:
            pool.disconnect()
        if master is not None:
            master.close()
            master.connection_pool.disconnect()

    def __repr__(self) -> str:
        # the URL may carry a password: show only where it points
        if self._given_client is not None:
            where = f"client={type(self._given_client).__name__}"
        else:
            where = self._url.split("@")[-1].split("://")[-1]
        return (
            f"<capgate.redis.RedisStore {where} namespace={self.namespace!r} "
            f"lease_ttl={self.lease_ttl:g}>"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a RedisStore cannot be pickled; build one per process")
