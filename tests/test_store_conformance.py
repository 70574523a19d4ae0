"""Every store grants exactly what the in-memory store grants.

A Hypothesis state machine drives the stores under test through the same random sequence
(polls whose answers come after other changes, snapshots with partial rows, lagging
counts and missing accounts; waiters with priorities
and allow-lists; grants; settles with and without job ids; give-backs; busy marks;
quarantines and restores; time passing) and, after every step, compares the grants each
store made: same waiter, same account. The in-memory store also answers for the invariants
(no account granted past its room, no waiter outside its allow-list). It runs against
memory always, and against Redis (and a Redis Cluster, see test_redis_deployments) when one
answers. A new store is done when it passes here.

Time is trio's MockClock, moved by the machine; the Redis store takes the same clock (its
scripts use it instead of the server's TIME), with leases and heartbeats long enough never
to expire: the in-memory store has no such thing to compare.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.from_thread
import pytest
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from capgate._config import check_config
from capgate._engine.base import Lease, PollTicket, Store, Waiter
from capgate._engine.local import MemoryStore
from capgate._models import AccountCapacity, ExecutingJob, Snapshot
from redis_support import (
    REDIS_CLI,
    REDIS_URL,
    cluster_client,
    delete_namespace,
    needs_redis_server,
    reachable,
    servers,
    start_cluster,
)

ACCOUNTS = ("a@x.io", "b@x.io", "c@x.io")
MODELS = ("veo-3", "imagen-4")
SPACING = 5.0

StoreFactory = Callable[[Any, Callable[[], float]], tuple[Store, Callable[[], None]]]


def memory_store(config: Any, clock: Callable[[], float]) -> tuple[Store, Callable[[], None]]:
    return MemoryStore(config), lambda: None


def redis_store(url: str, client: Any = None) -> StoreFactory:
    """Redis stores at ``url``, or on a ready ``client`` (a RedisCluster)."""

    def factory(config: Any, clock: Callable[[], float]) -> tuple[Store, Callable[[], None]]:
        from capgate._engine.fleet import FleetStore
        from capgate.redis import RedisStore

        namespace = f"capgate-conf-{uuid.uuid4().hex[:12]}"
        where: dict[str, Any] = {"client": client} if client is not None else {"url": url}
        rs = RedisStore(**where, namespace=namespace, lease_ttl=1e6, recovery_grace=0, idle_ttl=1e6)
        rs.heartbeat_ttl = 1e6  # nothing expires: the in-memory store has no leases
        store = FleetStore(config, rs, clock=clock)

        def cleanup() -> None:
            rs._detach()
            if client is None:
                delete_namespace(namespace, url)
            else:
                keys = list(client.scan_iter(match=f"{namespace}:*"))
                if keys:
                    client.delete(*keys)  # one hash slot: one DEL

        return store, cleanup

    return factory


rows = st.fixed_dictionaries(
    {
        "max_jobs": st.none() | st.integers(0, 3),
        "executing": st.none() | st.integers(0, 3),
        "available": st.none() | st.integers(0, 3),
    }
)


class Conformance(RuleBasedStateMachine):
    """The same steps on every store; the grants must agree."""

    portal: anyio.from_thread.BlockingPortal
    clock: trio.testing.MockClock
    factories: dict[str, StoreFactory]

    def __init__(self) -> None:
        super().__init__()
        self.stores: dict[str, Store] = {}
        self.cleanups: list[Callable[[], None]] = []
        self.queues: dict[str, dict[str, Waiter]] = {}
        self.leases: dict[str, dict[str, Lease]] = {}  # store -> waiter id -> its lease
        self.granted: dict[str, dict[str, str]] = {}  # store -> waiter id -> account
        self.ids = itertools.count()
        self.jobs = itertools.count()
        self.settled_jobs: list[str] = []
        self.allowed: dict[str, frozenset[str] | None] = {}
        self.tickets: dict[str, PollTicket] = {}  # store -> the poll on the wire
        self.sent_at = 0.0

    # --- set-up ---------------------------------------------------------------------------

    @initialize(
        strategy=st.sampled_from(["most_available", "round_robin", "first_fit"]),
        accounts=st.none() | st.permutations(ACCOUNTS).map(lambda a: tuple(a[:2])),
        max_jobs=st.none() | st.integers(1, 3),
    )
    def setup(self, strategy: str, accounts: tuple[str, ...] | None, max_jobs: int | None) -> None:
        config = check_config(
            "t",
            service="ltxstudio",
            url=None,
            poll_interval=SPACING,
            accounts=accounts,
            max_jobs=max_jobs,
            strategy=strategy,
            quarantine_for=60.0,
            poll_timeout=30.0,
            max_backoff=None,
            jitter=0.0,
        )
        for name, factory in self.factories.items():
            store, cleanup = self.portal.call(_build, factory, config)
            self.stores[name] = store
            self.cleanups.append(cleanup)
            self.queues[name] = {}
            self.leases[name] = {}
            self.granted[name] = {}

    def teardown(self) -> None:
        for store in self.stores.values():
            self.portal.call(store.aclose)
        for cleanup in self.cleanups:
            cleanup()

    # --- driving ----------------------------------------------------------------------------

    def now(self) -> float:
        return float(self.portal.call(_now))

    def each(self, step: Callable[[str, Store], Any]) -> None:
        """Apply one step to every store (on the loop), then compare their grants."""

        async def run() -> None:
            for name, store in self.stores.items():
                result = step(name, store)
                if hasattr(result, "__await__"):
                    await result

        self.portal.call(run)
        self.collect()

    def collect(self) -> None:
        self.portal.call(self._collect)
        reference = self.granted["memory"]
        for name, granted in self.granted.items():
            assert granted == reference, f"{name} granted {granted}, memory {reference}"

    async def _collect(self) -> None:
        for name, store in self.stores.items():
            await store.flush()
            queue = self.queues[name]

            def order(queue: dict[str, Waiter] = queue) -> Iterator[Waiter]:
                return iter(sorted(queue.values(), key=lambda w: (-w.priority, w.seq)))

            room = dict(store.view(anyio.current_time()).free) if name == "memory" else {}
            for waiter, lease in await store.exchange(order):
                assert waiter.open
                if name == "memory":  # never past the room the accounting rule gives
                    room[lease.account] = room.get(lease.account, 0) - 1
                    assert room[lease.account] >= 0, f"{lease.account} granted past its room"
                waiter.lease = lease
                del queue[waiter.wid]
                self.leases[name][waiter.wid] = lease
                self.granted[name][waiter.wid] = lease.account

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: not self.tickets)
    @rule()
    def send_poll(self) -> None:
        """A poll's request leaves; changes may come before its answer (the tick rule)."""

        async def step(name: str, store: Store) -> None:
            ticket = await store.begin_poll(force=True)
            assert isinstance(ticket, PollTicket)
            self.tickets[name] = ticket

        self.sent_at = self.now()
        self.each(step)

    @precondition(lambda self: self.tickets)
    @rule(
        data=rows,
        which=st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=3),
        listed=st.lists(st.integers(0, 10), max_size=4),
        extra=st.lists(st.sampled_from(ACCOUNTS), max_size=3),
    )
    def answer_poll(
        self,
        data: dict[str, int | None],
        which: list[str],
        listed: list[int],
        extra: list[str],
    ) -> None:
        """Its answer: some accounts (maybe partial rows), some settled jobs listed (lag)."""
        accounts = []
        for account in which:
            row = AccountCapacity(account, data["max_jobs"], data["executing"], data["available"])
            if row.available is None and (row.max_jobs is None or row.executing is None):
                row = AccountCapacity(account, None, None, 1)
            accounts.append(row)
        jobs = [
            ExecutingJob(self.settled_jobs[i], None)
            for i in sorted(set(listed))
            if i < len(self.settled_jobs)
        ]
        jobs += [ExecutingJob(f"outside-{next(self.jobs)}", a) for a in extra]
        sent_at = self.sent_at

        async def step(name: str, store: Store) -> None:
            now = anyio.current_time()
            snapshot = Snapshot("ltxstudio", tuple(accounts), tuple(jobs), sent_at, now)
            await store.apply(self.tickets.pop(name), snapshot, SPACING)

        self.each(step)

    @rule(
        priority=st.integers(0, 2),
        allowed=st.none() | st.lists(st.sampled_from(ACCOUNTS), min_size=1, unique=True),
        model=st.none() | st.sampled_from(MODELS),
    )
    def arrive(self, priority: int, allowed: list[str] | None, model: str | None = None) -> None:
        """A waiter joins every store's queue (for a job of some model, maybe)."""
        wid = f"w{next(self.ids)}"
        seq = int(wid[1:])
        scope = None if allowed is None else frozenset(allowed)
        self.allowed[wid] = scope
        now = self.now()
        for name in self.stores:
            waiter = Waiter(wid, seq, priority, scope, now)
            waiter.model = model
            self.queues[name][wid] = waiter
        self.collect()

    def _held(self) -> list[str]:
        return sorted(self.leases["memory"])

    @precondition(lambda self: self.leases.get("memory"))
    @rule(pick=st.integers(0, 99), with_id=st.booleans())
    def settle(self, pick: int, with_id: bool) -> None:
        """A holder submits its job, with or without an id."""
        held = self._held()
        wid = held[pick % len(held)]
        job = f"job-{next(self.jobs)}" if with_id else None
        if job is not None:
            self.settled_jobs.append(job)
        now = self.now()
        self.each(lambda name, store: store.settle(self.leases[name].pop(wid), job, now))

    @precondition(lambda self: self.leases.get("memory"))
    @rule(pick=st.integers(0, 99), busy=st.booleans())
    def give_back(self, pick: int, busy: bool) -> None:
        """A holder gives its slot back unused (or met a 429)."""
        held = self._held()
        wid = held[pick % len(held)]

        def step(name: str, store: Store) -> None:
            lease = self.leases[name].pop(wid)
            if busy:
                store.mark_busy(lease)
            else:
                store.give_back(lease)

        self.each(step)

    @precondition(lambda self: any(self.queues.get("memory", {}).values()))
    @rule(pick=st.integers(0, 99))
    def leave(self, pick: int) -> None:
        """A waiter gives up."""
        queued = sorted(self.queues["memory"])
        wid = queued[pick % len(queued)]

        def step(name: str, store: Store) -> None:
            waiter = self.queues[name].pop(wid)
            waiter.left = True
            store.abandon(waiter, None)

        self.each(step)

    @rule(
        account=st.sampled_from(ACCOUNTS),
        seconds=st.sampled_from([1.0, 7.0, 1000.0]),
        model=st.none() | st.sampled_from(MODELS),
    )
    def quarantine(self, account: str, seconds: float, model: str | None = None) -> None:
        """An account goes out of rotation for a while (for one model only, maybe)."""
        self.each(lambda name, store: store.quarantine(account, seconds, "test", model))

    @rule(account=st.sampled_from(ACCOUNTS))
    def restore(self, account: str) -> None:
        """An account comes back."""
        self.each(lambda name, store: store.restore(account))

    @rule(seconds=st.sampled_from([0.5, 2.0, 6.0]))
    def wait(self, seconds: float) -> None:
        """Time passes (quarantines end, snapshots go stale)."""
        self.portal.call(lambda: _jump(self.clock, seconds))
        self.collect()

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def grants_respect_allow_lists(self) -> None:
        for wid, account in self.granted.get("memory", {}).items():
            scope = self.allowed[wid]
            assert scope is None or account in scope


async def _jump(clock: trio.testing.MockClock, seconds: float) -> None:
    clock.jump(seconds)


async def _now() -> float:
    return anyio.current_time()


async def _build(factory: StoreFactory, config: Any) -> tuple[Store, Callable[[], None]]:
    """Stores are built on the loop; they read its (virtual) clock there."""
    return factory(config, anyio.current_time)


@pytest.fixture(scope="module")
def portal() -> Iterator[tuple[anyio.from_thread.BlockingPortal, trio.testing.MockClock]]:
    clock = trio.testing.MockClock()
    with anyio.from_thread.start_blocking_portal("trio", {"clock": clock}) as portal:
        yield portal, clock


def _run(portal: Any, factories: dict[str, StoreFactory], examples: int) -> None:
    machine = type(
        "Run",
        (Conformance,),
        {"portal": portal[0], "clock": portal[1], "factories": factories},
    )
    machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    machine.TestCase().runTest()


def test_memory_store_keeps_its_invariants(portal) -> None:
    """The in-memory store alone: grants stay within allow-lists, and each pass agrees."""
    _run(portal, {"memory": memory_store}, examples=150)


@contextlib.contextmanager
def _stepped(
    portal: Any, factories: dict[str, StoreFactory], strategy: str
) -> Iterator[Conformance]:
    """The state machine, set up over ``factories``, for a case driven step by step."""
    machine = type(
        "Stepped",
        (Conformance,),
        {"portal": portal[0], "clock": portal[1], "factories": factories},
    )()
    try:
        machine.setup(strategy=strategy, accounts=None, max_jobs=None)
        yield machine
    finally:
        machine.teardown()


def _directed(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """The heart of the accounting rule, step by step (random runs may miss it): a slot
    settled after a poll's request left still counts when that poll's answer lands."""
    with _stepped(portal, factories, "most_available") as machine:
        one = {"max_jobs": 1, "executing": 0, "available": 1}
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None)  # granted the only slot
        machine.send_poll()
        machine.settle(pick=0, with_id=False)  # after the request left
        machine.arrive(priority=0, allowed=None)  # queued: no room
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0]}  # the settle still counts


def _directed_models(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """An account out for one model serves waiters for another, and no others (step by step)."""
    with _stepped(portal, factories, "first_fit") as machine:
        two = {"max_jobs": 2, "executing": 0, "available": 2}
        machine.quarantine(account=ACCOUNTS[0], seconds=1000.0, model=MODELS[0])
        machine.send_poll()
        machine.answer_poll(data=two, which=[ACCOUNTS[0]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None, model=MODELS[0])  # a is out for it
        machine.arrive(priority=0, allowed=None, model=MODELS[1])  # a is fine for it
        assert machine.granted["memory"] == {"w1": ACCOUNTS[0]}
        machine.restore(account=ACCOUNTS[0])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0], "w1": ACCOUNTS[0]}


def _busy_views(machine: Any) -> dict[str, frozenset[str]]:
    """Each store's busy accounts now (the grants alone do not show a mark on a full one)."""
    seen: dict[str, frozenset[str]] = {}

    def step(name: str, store: Store) -> None:
        seen[name] = frozenset(store.view(anyio.current_time()).busy)

    machine.each(step)
    return seen


def _directed_busy_in_flight(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """An answer to a poll sent before the 429 neither lifts the mark nor uses up the one
    unchanged answer it outlasts; every store reports the same busy accounts throughout."""
    with _stepped(portal, factories, "most_available") as machine:
        one = {"max_jobs": 1, "executing": 0, "available": 1}
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None)  # granted the only slot
        machine.send_poll()  # on its way before the 429
        machine.give_back(pick=0, busy=True)
        machine.arrive(priority=0, allowed=None)
        for _ in range(2):  # the answer sent before, then one unchanged answer after
            machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
            assert machine.granted["memory"] == {"w0": ACCOUNTS[0]}
            assert set(_busy_views(machine).values()) == {frozenset({ACCOUNTS[0]})}
            machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0], "w1": ACCOUNTS[0]}


def _directed_busy_left_out(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """A 429 on an account the latest answer left out (full): the next answer that leaves it
    out too is no news, the second lifts the mark, in every store alike."""
    with _stepped(portal, factories, "most_available") as machine:
        one = {"max_jobs": 1, "executing": 0, "available": 1}
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[1]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None)  # granted b's slot
        machine.send_poll()
        machine.answer_poll(data=one, which=[], listed=[], extra=[])  # b left out now
        machine.give_back(pick=0, busy=True)  # its create met a 429
        for busy in (frozenset({ACCOUNTS[1]}), frozenset()):
            machine.send_poll()
            machine.answer_poll(data=one, which=[], listed=[], extra=[])
            views = _busy_views(machine)
            assert set(views.values()) == {busy}, views


def _directed_busy(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """A 429's busy mark outlasts one answer that shows the account as before (counts that
    lag: no news against the 429), and is lifted by the second (step by step)."""
    with _stepped(portal, factories, "most_available") as machine:
        one = {"max_jobs": 1, "executing": 0, "available": 1}
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None)  # granted the only slot
        machine.give_back(pick=0, busy=True)  # its create met a 429
        machine.arrive(priority=0, allowed=None)  # queued: the account is busy
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0]}  # unchanged: still busy
        machine.send_poll()
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0], "w1": ACCOUNTS[0]}


def _directed_busy_changed(portal: Any, factories: dict[str, StoreFactory]) -> None:
    """An answer that shows the account otherwise than the one the 429 contradicted lifts
    the busy mark at once."""
    with _stepped(portal, factories, "most_available") as machine:
        machine.send_poll()
        two = {"max_jobs": 2, "executing": 0, "available": 2}
        machine.answer_poll(data=two, which=[ACCOUNTS[0]], listed=[], extra=[])
        machine.arrive(priority=0, allowed=None)
        machine.give_back(pick=0, busy=True)
        machine.arrive(priority=0, allowed=None)
        machine.send_poll()
        one = {"max_jobs": 2, "executing": 1, "available": 1}
        machine.answer_poll(data=one, which=[ACCOUNTS[0]], listed=[], extra=[])
        assert machine.granted["memory"] == {"w0": ACCOUNTS[0], "w1": ACCOUNTS[0]}


BUSY_CASES = [
    _directed_busy,
    _directed_busy_changed,
    _directed_busy_in_flight,
    _directed_busy_left_out,
]


@pytest.mark.parametrize("directed", BUSY_CASES)
def test_memory_store_keeps_a_busy_mark_through_one_unchanged_answer(portal, directed) -> None:
    """The in-memory store: a busy mark and the answers after it."""
    directed(portal, {"memory": memory_store})


@pytest.mark.redis
@pytest.mark.skipif(not reachable(REDIS_URL), reason=f"no Redis at {REDIS_URL}")
@pytest.mark.parametrize("directed", BUSY_CASES)
def test_redis_store_keeps_a_busy_mark_through_one_unchanged_answer(portal, directed) -> None:
    """The Redis store agrees step by step on a busy mark and the answers after it."""
    directed(portal, {"memory": memory_store, "redis": redis_store(REDIS_URL)})


def test_memory_store_quarantines_per_model(portal) -> None:
    """The in-memory store keeps an account out for one model only."""
    _directed_models(portal, {"memory": memory_store})


@pytest.mark.redis
@pytest.mark.skipif(not reachable(REDIS_URL), reason=f"no Redis at {REDIS_URL}")
def test_redis_store_quarantines_per_model(portal) -> None:
    """The Redis store agrees step by step on a model's quarantine and its restore."""
    _directed_models(portal, {"memory": memory_store, "redis": redis_store(REDIS_URL)})


def test_memory_store_counts_a_settle_made_while_a_poll_was_out(portal) -> None:
    """The in-memory store keeps counting a slot settled after the request of a poll."""
    _directed(portal, {"memory": memory_store})


@pytest.mark.redis
@pytest.mark.skipif(not reachable(REDIS_URL), reason=f"no Redis at {REDIS_URL}")
def test_redis_store_counts_a_settle_made_while_a_poll_was_out(portal) -> None:
    """The Redis store agrees step by step on the interleaving above."""
    _directed(portal, {"memory": memory_store, "redis": redis_store(REDIS_URL)})


@pytest.mark.redis
@pytest.mark.skipif(not reachable(REDIS_URL), reason=f"no Redis at {REDIS_URL}")
def test_redis_store_grants_what_memory_grants(portal) -> None:
    """The Redis store makes exactly the in-memory store's grants, step by step."""
    _run(portal, {"memory": memory_store, "redis": redis_store(REDIS_URL)}, examples=120)


@pytest.mark.redis
@needs_redis_server
@pytest.mark.skipif(REDIS_CLI is None, reason="needs redis-cli to form a cluster")
def test_redis_cluster_store_grants_what_memory_grants(portal) -> None:
    """On a 3-master Redis Cluster, the Redis store makes the in-memory store's grants."""
    with servers() as (tmp, started):
        client = cluster_client(start_cluster(tmp, started))
        try:
            _run(portal, {"memory": memory_store, "cluster": redis_store("", client)}, examples=60)
        finally:
            client.close()
