"""The gate's rules, each pinned by tests, on asyncio (real time) and trio (virtual time)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from capgate import (
    AuthenticationError,
    CapacityGate,
    CapacityGateError,
    GateStatistics,
    PollError,
    SlotTimeout,
)
from capgate.testing import FakeScheduler, Fault
from conftest import P

pytestmark = pytest.mark.anyio

A, B, C = "a@x.io", "b@x.io", "c@x.io"


class Holder:
    """A task that waits for a slot and holds it until told to leave."""

    def __init__(self, gate: CapacityGate, name: str = "", **slot_options: Any) -> None:
        self.gate = gate
        self.name = name
        self.options = slot_options
        self.release = anyio.Event()
        self.granted = anyio.Event()
        self.account: str | None = None
        self.error: BaseException | None = None
        self.slot: Any = None

    async def run(self, order: list[str] | None = None, job_id: str | None = None) -> None:
        try:
            async with self.gate.slot(**self.options) as slot:
                self.slot = slot
                self.account = slot.account
                if order is not None:
                    order.append(self.name)
                self.granted.set()
                await self.release.wait()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc


async def start_in_order(tg: anyio.abc.TaskGroup, holders: list[Holder], **run: Any) -> None:
    """Start holders one after another, each queued before the next arrives."""
    for holder in holders:
        tg.start_soon(lambda h=holder: h.run(**run))
        await anyio.wait_all_tasks_blocked()


# --- virtual time ---------------------------------------------------------------------------------


@pytest.mark.trio_only
async def test_virtual_time_canary():
    """On trio the autojump clock makes an hour pass at once (the suite relies on it)."""
    before, wall = anyio.current_time(), time.perf_counter()
    await anyio.sleep(3600)
    assert anyio.current_time() - before >= 3600
    assert time.perf_counter() - wall < 1


# --- construction ---------------------------------------------------------------------------------


async def test_token_from_environment(monkeypatch):
    """With no token argument, USEAPI_TOKEN is used."""
    monkeypatch.setenv("USEAPI_TOKEN", "env-token")
    fake = FakeScheduler({A: 1}, token="env-token")
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        gate = CapacityGate(client=client, service="ltxstudio", poll_interval=P)
        async with gate.slot() as slot:
            assert slot.account == A
        await gate.aclose()


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_token_is_a_clear_error(monkeypatch, value):
    """No token argument and no USEAPI_TOKEN is a CapacityGateError at construction."""
    monkeypatch.delenv("USEAPI_TOKEN", raising=False)
    if value is not None:
        monkeypatch.setenv("USEAPI_TOKEN", value)
    with pytest.raises(
        CapacityGateError,
        match=r"^no API token: pass token= or set the USEAPI_TOKEN environment variable$",
    ):
        CapacityGate()


def test_token_with_whitespace_inside_is_refused():
    """A token with whitespace inside is refused (it could not be a header value)."""
    with pytest.raises(ValueError, match=r"^the API token contains whitespace"):
        CapacityGate("abc def")


def test_non_ascii_token_is_refused():
    """Regression: a non-ASCII token failed every poll forever instead of failing at once."""
    with pytest.raises(ValueError, match=r"^the API token contains non-ASCII characters$"):
        CapacityGate("t\u00f6ken")


def test_unknown_service_lists_known_ones():
    """An unknown service is a ValueError listing the known ones."""
    with pytest.raises(
        ValueError, match=r"^unknown service 'runway'; known services: dreamina, flowmusic, "
    ):
        CapacityGate("t", service="runway")


def test_plain_http_refused_off_loopback():
    """A plain http:// URL is refused unless its host is loopback."""
    with pytest.raises(ValueError, match=r"^url uses plain http:// to proxy\.example; "):
        CapacityGate("t", url="http://proxy.example/v1/kling/scheduler/available")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"poll_interval": 0}, ValueError, r"^poll_interval must be a finite number > 0, got 0$"),
        (
            {"poll_interval": 1e300},
            ValueError,
            r"^poll_interval must be at most 86400 s, got 1e\+300$",
        ),
        ({"poll_interval": "5"}, TypeError, r"^poll_interval must be a number, not str$"),
        (
            {"poll_interval": 10**400},
            ValueError,
            r"^poll_interval must be a finite number > 0, got an int too large for a float$",
        ),
        ({"strategy": "random"}, ValueError, r"^unknown strategy 'random'; use one of "),
        ({"max_jobs": 0}, ValueError, r"^max_jobs must be >= 1, got 0$"),
        ({"max_jobs": {"a": -1}}, ValueError, r"^max_jobs\['a'\] must be >= 0, got -1$"),
        ({"max_jobs": 2.5}, TypeError, r"^max_jobs must be an int or a mapping"),
        ({"accounts": "a@x.io"}, TypeError, r"^accounts must be a collection of account names"),
        ({"accounts": []}, ValueError, r"^accounts must not be empty$"),
        ({"client": object()}, TypeError, r"^client must be an httpx\.AsyncClient, not object$"),
        ({"jitter": 2}, ValueError, r"^jitter must be between 0 and 1, got 2$"),
    ],
)
def test_bad_options_are_refused(options, error, message):
    """Configuration is validated in __init__ with exact messages."""
    with pytest.raises(error, match=message):
        CapacityGate("t", service="kling", **options)


async def test_url_replaces_only_the_url(make_gate):
    """url= changes where the gate polls, not the service's field names."""
    fake = FakeScheduler({"u1": 1}, service="tempolor")
    gate, _ = make_gate(fake, url="http://127.0.0.1:9/v1/tempolor/scheduler/available")
    assert gate.url == "http://127.0.0.1:9/v1/tempolor/scheduler/available"
    async with gate.slot() as slot:
        assert slot.account == "u1"


async def test_default_url_follows_service(make_gate):
    """The default URL is the service's (pixverse under /v2/)."""
    gate, _ = make_gate(FakeScheduler({A: 1}, service="pixverse"))
    assert gate.url == "https://api.useapi.net/v2/pixverse/scheduler/available"


async def test_slot_options_are_validated(make_gate):
    """slot() checks its arguments before waiting."""
    gate, _ = make_gate({A: 1}, accounts=[A])
    with pytest.raises(ValueError, match=r"^account 'b@x\.io' is not among the gate's accounts$"):
        gate.slot(B)
    with pytest.raises(TypeError, match=r"^priority must be an int, not bool$"):
        gate.slot(priority=True)
    with pytest.raises(ValueError, match=r"^timeout must be a finite number >= 0, got -1$"):
        gate.slot(timeout=-1)
    with pytest.raises(ValueError, match=r"^timeout must be a finite number >= 0, got an int t"):
        gate.slot(timeout=10**5000)  # beyond any float, and too long to print: no other error


# --- rule 1: accounting ---------------------------------------------------------------------------


async def test_grants_never_exceed_server_free(make_gate):
    """Concurrent callers get no more slots than the account has free."""
    gate, _ = make_gate({A: 2})
    holders = [Holder(gate) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(10 * P)
        assert sum(h.granted.is_set() for h in holders) == 2
        assert gate.statistics().waiting == 3
        tg.cancel_scope.cancel()


async def test_outside_load_counts(make_gate):
    """Jobs started outside the gate take room: only what the server reports free is granted."""
    gate, fake = make_gate({A: 3})
    fake.add_outside_job(A, duration=3600)
    fake.add_outside_job(A, duration=3600)
    holders = [Holder(gate) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(5 * P)
        assert sum(h.granted.is_set() for h in holders) == 1
        tg.cancel_scope.cancel()


async def test_missing_account_is_full_not_an_error(make_gate):
    """An account left out of available[] (full) gives no slot and no error."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(A, duration=3600)
    only_a = Holder(gate, account=A)
    async with anyio.create_task_group() as tg:
        tg.start_soon(only_a.run)
        await anyio.sleep(5 * P)
        assert gate.snapshot is not None
        assert gate.snapshot.account(A) is None
        assert not only_a.granted.is_set()
        assert only_a.error is None
        async with gate.slot() as slot:
            assert slot.account == B
        tg.cancel_scope.cancel()


async def test_clamped_available_is_trusted_less(make_gate):
    """An ``available`` above maxJobs - executing is clamped: no extra grants."""
    gate, fake = make_gate({A: 5})
    lying = {"available": [{"email": A, "maxJobs": 2, "executing": 1, "available": 9}]}
    fake.inject(Fault(count=100, body=lying))
    holders = [Holder(gate) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(5 * P)
        assert sum(h.granted.is_set() for h in holders) == 1
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("max_jobs", [2, {A: 2}], ids=["int", "mapping"])
async def test_local_cap(make_gate, max_jobs):
    """max_jobs caps an account at min(server maxJobs, cap)."""
    gate, _ = make_gate({A: 5}, max_jobs=max_jobs)
    holders = [Holder(gate) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(5 * P)
        assert sum(h.granted.is_set() for h in holders) == 2
        assert gate.statistics().capacity == 2
        tg.cancel_scope.cancel()


async def test_local_cap_mapping_leaves_others_alone(make_gate):
    """A mapping caps only the accounts it names."""
    gate, _ = make_gate({A: 3, B: 3}, max_jobs={A: 1})
    holders = [Holder(gate) for _ in range(6)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(5 * P)
        granted = sorted(h.account for h in holders if h.account)
        assert granted == [A, B, B, B]
        tg.cancel_scope.cancel()


async def test_statistics_count_reservations(make_gate):
    """statistics() shows held and reserved slots, capacity and free."""
    gate, _ = make_gate({A: 3})
    async with gate.slot():
        stats = gate.statistics()
        assert isinstance(stats, GateStatistics)
        assert (stats.held, stats.reserved, stats.capacity, stats.free) == (1, 1, 3, 2)
        assert (stats.grants, stats.polls, stats.waiting) == (1, 1, 0)
        assert stats.accounts[0].account == A
        assert stats.accounts[0].reserved == 1


async def test_statistics_and_repr_count_full_accounts(make_gate):
    """An account left out of available[] as full but listed in executing[] counts in capacity.

    Regression: the repr read ``2/8 reserved`` with 10 slots in all, as the full account
    (its 2 jobs running) was missing from both the rows and the capacity.
    """
    gate, fake = make_gate({A: 8, B: 2})  # the fake leaves full accounts out, as useapi does
    fake.add_outside_job(B, duration=600)
    fake.add_outside_job(B, duration=600)
    holders = [await gate.slot().__aenter__() for _ in range(2)]
    stats = gate.statistics()
    assert stats.capacity == 10
    assert [(r.account, r.max_jobs, r.executing, r.free) for r in stats.accounts] == [
        (A, 8, 0, 6),
        (B, 2, 2, 0),
    ]
    assert repr(gate).startswith("<CapacityGate ltxstudio: 2/10 reserved, 0 waiting")
    for holder in holders:
        holder._exit(None)


async def test_statistics_count_quarantined_accounts(make_gate):
    """A quarantined account left out of available[] still counts, with its last cap."""
    gate, fake = make_gate({A: 3, B: 2})
    await gate.refresh()
    gate.quarantine(B, seconds=600, reason="HTTP 596")
    fake.add_outside_job(B, duration=600)
    fake.add_outside_job(B, duration=600)
    await gate.refresh()  # B is full now: left out of available[]
    stats = gate.statistics()
    assert stats.capacity == 5
    row = next(r for r in stats.accounts if r.account == B)
    assert (row.max_jobs, row.quarantine_reason) == (2, "HTTP 596")


# --- rule 2: when a reservation stops counting ----------------------------------------------------


async def test_exit_settles_until_next_snapshot(make_gate):
    """A slot left without submitting counts until a snapshot requested after the exit."""
    gate, _ = make_gate({A: 1})
    async with gate.slot():
        pass
    assert gate.statistics().reserved == 1
    await gate.refresh()
    assert gate.statistics().reserved == 0


async def test_exit_by_exception_settles_not_gives_back(make_gate):
    """A body that raised may have created a job: the slot still counts until a new snapshot."""
    gate, _ = make_gate({A: 1})
    with pytest.raises(KeyError, match=r"^'boom'$"):
        async with gate.slot():
            raise KeyError("boom")
    assert gate.statistics().reserved == 1
    assert gate.statistics().held == 0


async def test_snapshot_sent_before_settle_keeps_counting(make_gate):
    """A snapshot whose request was sent before the settle does not release the slot."""
    gate, _ = make_gate({A: 1}, latency=P)
    async with anyio.create_task_group() as tg, gate.slot():
        tg.start_soon(gate.refresh)
        await anyio.wait_all_tasks_blocked()  # the request is on its way
    assert gate.statistics().polls == 2
    assert gate.statistics().reserved == 1


async def test_listed_job_id_releases_at_once(make_gate):
    """A job id listed among the executing jobs releases the slot, whatever the timing."""
    gate, fake = make_gate({A: 2}, latency=P)
    async with anyio.create_task_group() as tg, gate.slot() as slot:
        job = await fake.create(slot.account, duration=3600)
        tg.start_soon(gate.refresh)
        await anyio.wait_all_tasks_blocked()  # sent before the settle, lists the job
        slot.mark_submitted(job.job_id)
    assert gate.statistics().reserved == 0
    assert gate.statistics().free == 1


async def test_job_id_already_listed_releases_at_settle(make_gate):
    """Settling with an id the latest snapshot already lists releases at once."""
    gate, fake = make_gate({A: 2})
    async with gate.slot() as slot:
        job = await fake.create(slot.account, duration=3600)
        await gate.refresh()
        slot.mark_submitted(job.job_id)
        assert gate.statistics().reserved == 0


async def test_submitted_slot_counts_until_reflected(make_gate):
    """mark_submitted() without an id counts until a snapshot sent after it."""
    gate, fake = make_gate({A: 2})
    async with gate.slot() as slot:
        await fake.create(slot.account, duration=3600)
        slot.mark_submitted()
        assert gate.statistics().reserved == 1
        await gate.refresh()
        assert gate.statistics().reserved == 0
        assert gate.statistics().free == 1  # the job is counted by the server now


async def test_mark_submitted_twice_is_an_error(make_gate):
    """mark_submitted() on a settled slot is a RuntimeError."""
    gate, _ = make_gate({A: 1})
    async with gate.slot() as slot:
        slot.mark_submitted("j1")
        with pytest.raises(
            RuntimeError, match=r"^mark_submitted\(\): this slot is already submitted$"
        ):
            slot.mark_submitted("j2")


async def test_mark_submitted_checks_job_id_type(make_gate):
    """A job id that is not a str or int is a TypeError."""
    gate, _ = make_gate({A: 1})
    async with gate.slot() as slot:
        with pytest.raises(TypeError, match=r"^job_id must be a str or int, not float$"):
            slot.mark_submitted(1.5)  # type: ignore[arg-type]


async def test_numeric_job_id_matches_kling(make_gate):
    """Kling's numeric job ids match the listed ones."""
    gate, fake = make_gate(FakeScheduler({A: 2}, service="kling"))
    async with gate.slot() as slot:
        job = await fake.create(slot.account, duration=3600)
        await gate.refresh()
        slot.mark_submitted(int(job.job_id))
        assert slot.job_id == job.job_id
        assert gate.statistics().reserved == 0


async def test_held_slot_survives_snapshots(make_gate):
    """A slot still held counts through any number of snapshots."""
    gate, _ = make_gate({A: 1})
    async with gate.slot():
        for _ in range(3):
            await gate.refresh()
        assert gate.statistics().free == 0


# --- rule 3: polling ------------------------------------------------------------------------------


async def test_no_request_while_nobody_waits(make_gate):
    """A gate nobody waits on sends no request at all."""
    gate, fake = make_gate({A: 1})
    await anyio.sleep(10 * P)
    assert fake.requests == 0
    assert gate.snapshot is None


async def test_silent_once_everyone_is_served(make_gate):
    """After the last waiter is granted, polling stops, even while slots are held."""
    gate, fake = make_gate({A: 1})
    async with gate.slot():
        polls = fake.polls
        await anyio.sleep(10 * P)
        assert fake.polls == polls == 1


async def test_fresh_snapshot_grants_without_request(make_gate):
    """A snapshot younger than poll_interval with room grants at once, with no request."""
    gate, fake = make_gate({A: 3}, poll_interval=10 * P)
    async with gate.slot(), gate.slot(), gate.slot():
        assert fake.polls == 1


async def test_stale_snapshot_is_polled_again(make_gate):
    """A snapshot older than poll_interval is not trusted: the next caller polls first."""
    gate, fake = make_gate({A: 3}, jitter=0)
    async with gate.slot():
        pass
    await anyio.sleep(2 * P)
    async with gate.slot():
        assert fake.polls == 2


async def test_waiters_share_one_poll(make_gate):
    """Many callers arriving together are served by one answer."""
    gate, fake = make_gate({A: 10})
    granted = 0

    async def take():
        nonlocal granted
        async with gate.slot():
            granted += 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(take)
    assert granted == 10
    assert fake.polls == 1


async def test_one_request_in_flight(make_gate):
    """Never more than one request in flight per gate, whoever asks for it."""
    fake = FakeScheduler({A: 1}, latency=P)
    in_flight = peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await fake.handle(request)
        finally:
            in_flight -= 1

    gate, _ = make_gate(fake, transport=httpx.MockTransport(handler))
    fake.add_outside_job(A, duration=3600)  # nobody is ever served: everyone keeps waiting
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(Holder(gate).run)
        for _ in range(3):
            tg.start_soon(gate.refresh)
        await anyio.sleep(10 * P)
        tg.cancel_scope.cancel()
    assert fake.polls >= 3
    assert peak == 1


async def test_refresh_joins_poll_in_flight(make_gate):
    """Concurrent refresh() calls share one request and get the same snapshot."""
    gate, fake = make_gate({A: 1}, latency=P)
    results = []

    async def refresh():
        results.append(await gate.refresh())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(refresh)
    assert fake.polls == 1
    assert results[0] is results[1] is results[2] is gate.snapshot


async def test_refresh_polls_even_when_nobody_waits(make_gate):
    """refresh() is an explicit poll: it asks even with no waiter."""
    gate, fake = make_gate({A: 2})
    snapshot = await gate.refresh()
    assert snapshot.free(A) == 2
    assert fake.polls == 1


@pytest.mark.trio_only
async def test_polls_spaced_while_waiting(make_gate):
    """While someone waits, polls are at least poll_interval apart (plus up to 10 % jitter)."""
    gate, fake = make_gate({A: 1}, poll_interval=5.0)
    fake.add_outside_job(A, duration=3600)
    with anyio.move_on_after(100):
        await Holder(gate).run()
    gaps = [b - a for a, b in itertools.pairwise(fake.poll_times)]
    assert len(gaps) >= 15
    assert all(5.0 <= gap <= 5.5 for gap in gaps)


async def test_poll_spacing_real_time(make_gate):
    """Even in real time, a waiting gate polls about once per poll_interval, not in a loop."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3600)
    with anyio.move_on_after(10 * P):
        await Holder(gate).run()
    assert 5 <= fake.polls <= 11


async def test_freed_slot_found_by_next_poll(make_gate):
    """A waiter is granted once a poll sees the job that blocked it has ended."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3 * P)
    async with gate.slot() as slot:
        assert slot.account == A
        assert slot.waited >= 3 * P
    assert fake.polls >= 2


async def test_slow_answer_still_grants(make_gate):
    """Regression: an answer slower than poll_interval was stale on arrival and never granted."""
    gate, fake = make_gate({A: 1}, latency=2 * P)
    with anyio.fail_after(20 * P):
        async with gate.slot() as slot:
            assert slot.account == A
    assert fake.polls == 1


# --- rule 4: fair waiting -------------------------------------------------------------------------


async def test_first_come_first_served(make_gate):
    """Waiters of equal priority are granted in arrival order."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3 * P)
    order: list[str] = []
    holders = [Holder(gate, str(i)) for i in range(5)]
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, holders, order=order)
        for holder in holders:
            await holder.granted.wait()
            holder.release.set()
    assert order == ["0", "1", "2", "3", "4"]


async def test_higher_priority_first(make_gate):
    """A higher priority is served before earlier arrivals of lower priority."""
    # the slot frees only once all four wait, however slow the machine (asyncio runs on
    # the real clock: an outside job of a few P could end while they are still arriving)
    gate, fake = make_gate({A: 1}, poll_interval=3600)
    fake.add_outside_job(A, duration=3600)
    order: list[str] = []
    holders = [
        Holder(gate, "low", priority=0),
        Holder(gate, "mid", priority=1),
        Holder(gate, "high", priority=5),
        Holder(gate, "low2", priority=0),
    ]
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, holders, order=order)
        for job in fake.running():
            job.end = anyio.current_time()
        while len(order) < len(holders):
            await gate.refresh()  # shows the slot free (its holder left since the last)
            await anyio.wait_all_tasks_blocked()
            for holder in holders:
                holder.release.set()  # release whoever holds it
            await anyio.wait_all_tasks_blocked()
    assert order == ["high", "mid", "low", "low2"]


async def test_restricted_waiter_does_not_block_others(make_gate):
    """A waiter restricted to a full account does not hold up later waiters."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(A, duration=3600)
    stuck = Holder(gate, account=A)
    later = Holder(gate)
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [stuck, later])
        with anyio.fail_after(5 * P):
            await later.granted.wait()
        assert later.account == B
        assert not stuck.granted.is_set()
        tg.cancel_scope.cancel()


async def test_waiter_behind_a_restricted_one_takes_the_free_slot_at_once(make_gate):
    """A slot free on B while the only waiter ahead may use A alone: a newcomer gets it
    at once, from the snapshot in hand (no poll)."""
    gate, fake = make_gate({A: 1, B: 1}, poll_interval=3600)
    fake.add_outside_job(A, duration=3600)
    stuck = Holder(gate, account=A)
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [stuck])
        polls = gate.statistics().polls
        with anyio.fail_after(1):
            async with gate.slot() as slot:
                assert slot.account == B
        assert gate.statistics().polls == polls
        assert not stuck.granted.is_set()
        tg.cancel_scope.cancel()


async def test_the_driver_role_goes_to_the_last_in_line(make_gate):
    """When the driver is served, the role goes to the waiter served last, so it does not
    move again at the next grant."""
    gate, _ = make_gate({A: 1}, poll_interval=3600)
    holder = Holder(gate)
    waiters = [Holder(gate) for _ in range(3)]
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [holder, *waiters])
        engine = gate._engine
        assert engine._driver is next(iter(engine._iter_waiters()))  # the first to wait
        holder.slot._give_back_unused()  # the snapshot is fresh: the driver is served
        await anyio.wait_all_tasks_blocked()
        assert waiters[0].granted.is_set()
        assert engine._driver is list(engine._iter_waiters())[-1]
        tg.cancel_scope.cancel()


async def test_collection_of_accounts_restricts(make_gate):
    """slot(account=[...]) grants only one of the accounts named."""
    gate, _ = make_gate({A: 5, B: 1, C: 1})
    async with gate.slot(account=[B, C]) as first, gate.slot(account={B, C}) as second:
        assert {first.account, second.account} == {B, C}


async def test_no_barging(make_gate):
    """A slot freed while someone waits goes to that waiter, not to a newcomer."""
    gate, _ = make_gate({A: 1}, poll_interval=3600)
    holder, waiter, newcomer = Holder(gate, "h"), Holder(gate, "w"), Holder(gate, "n")
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [holder, waiter])
        holder.release.set()
        await anyio.wait_all_tasks_blocked()  # settled: counts until the next snapshot
        tg.start_soon(newcomer.run)
        await anyio.wait_all_tasks_blocked()
        await gate.refresh()
        await anyio.wait_all_tasks_blocked()
        assert waiter.granted.is_set()
        assert not newcomer.granted.is_set()
        tg.cancel_scope.cancel()


async def test_restricted_earliest_eligible_wins(make_gate):
    """When a slot frees on an account, the earliest waiter that may use it gets it."""
    gate, fake = make_gate({A: 1, B: 1}, poll_interval=3600)
    fake.add_outside_job(A, duration=3600)
    fake.add_outside_job(B, duration=3600)
    only_a, any_1, any_2 = Holder(gate, account=A), Holder(gate), Holder(gate)
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [only_a, any_1, any_2])
        for job in fake.running():
            if job.account == B:
                job.end = anyio.current_time()
        await gate.refresh()
        await anyio.wait_all_tasks_blocked()
        assert (only_a.account, any_1.account, any_2.account) == (None, B, None)
        tg.cancel_scope.cancel()


# --- rule 5: timeouts and cancellation ------------------------------------------------------------


async def test_timeout_raises_slot_timeout(make_gate):
    """timeout= raises SlotTimeout, a TimeoutError, and leaves nothing behind."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3600)
    with pytest.raises(TimeoutError, match=r"^ltxstudio: no free slot within 0\.2 s$") as info:
        async with gate.slot(timeout=4 * P):
            pass  # pragma: no cover
    assert isinstance(info.value, SlotTimeout)
    assert info.value.timeout == 4 * P
    stats = gate.statistics()
    assert (stats.timeouts, stats.waiting, stats.reserved) == (1, 0, 0)


async def test_zero_timeout_takes_a_fresh_free_slot(make_gate):
    """timeout=0 still takes a slot a fresh snapshot shows free."""
    gate, _ = make_gate({A: 2})
    async with gate.slot(), gate.slot(timeout=0) as slot:
        assert slot.account == A


async def test_outer_cancel_scope(make_gate):
    """An outer anyio cancel scope ends the wait cleanly, like a timeout."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3600)
    with anyio.move_on_after(4 * P) as scope:
        async with gate.slot():
            pass  # pragma: no cover
    assert scope.cancelled_caught
    stats = gate.statistics()
    assert (stats.waiting, stats.reserved, stats.timeouts) == (0, 0, 0)


async def test_cancelled_waiter_leaves_no_trace(make_gate):
    """A waiter cancelled before its grant is gone; the next in line is served as usual."""
    gate, _ = make_gate({A: 1}, poll_interval=3600)
    holder, cancelled, nxt = Holder(gate), Holder(gate), Holder(gate)
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [holder])
        scope = anyio.CancelScope()
        tg.start_soon(cancelled_run, scope, cancelled)
        await anyio.wait_all_tasks_blocked()
        await start_in_order(tg, [nxt])
        scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert gate.statistics().waiting == 1
        holder.release.set()
        await anyio.wait_all_tasks_blocked()
        await gate.refresh()
        await anyio.wait_all_tasks_blocked()
        assert nxt.granted.is_set()
        assert not cancelled.granted.is_set()
        tg.cancel_scope.cancel()


async def cancelled_run(scope: anyio.CancelScope, holder: Holder) -> None:
    with scope:
        await holder.run()


async def test_a_cancelled_task_is_cancelled_before_anything_else(make_gate):
    """A task already cancelled gets its cancellation, not the gate's errors (a closed
    gate at shutdown), and takes no turn of the round-robin."""
    gate, _ = make_gate({A: 5, B: 5, C: 5}, poll_interval=3600, strategy="round_robin")
    async with gate.slot() as first:
        pass
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with gate.slot():
            pytest.fail("granted to a cancelled task")
    async with gate.slot() as second:
        pass
    assert (first.account, second.account) == (A, B)
    await gate.aclose()
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with gate.slot():  # GateClosed would escape the cancelled scope
            pytest.fail("granted by a closed gate")


async def test_cancel_after_grant_passes_slot_on(make_gate):
    """Regression (trio memleak_548): a waiter cancelled after its grant, before it ran,
    gives the slot straight to the next waiter, with no new poll."""
    gate, _ = make_gate({A: 1}, poll_interval=3600)
    holder, first, second = Holder(gate), Holder(gate), Holder(gate)
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [holder])
        tg.start_soon(cancelled_run, scope, first)
        await anyio.wait_all_tasks_blocked()
        await start_in_order(tg, [second])
        holder.slot._give_back_unused()  # grants `first` (the snapshot is fresh for an hour)
        scope.cancel()  # before `first` runs again
        await anyio.wait_all_tasks_blocked()
        assert not first.granted.is_set()
        assert second.granted.is_set()
        assert gate.statistics().polls == 1
        assert gate.statistics().reserved == 1
        tg.cancel_scope.cancel()


async def test_cancelled_at_a_free_slot_takes_nothing(make_gate):
    """A task cancelled when it reaches a free slot (the path with nobody queued) never
    runs the body, and the slot is free again at once, with no new poll."""
    gate, _ = make_gate({A: 2}, poll_interval=3600)
    async with gate.slot():  # the one poll; this settle counts until the next: 1 slot left
        pass
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with gate.slot():
            reached = True
    assert not reached
    assert gate.statistics().reserved == 1
    with anyio.fail_after(1):
        async with gate.slot(timeout=0) as slot:  # the slot it had for an instant
            assert slot.account == A
    assert gate.statistics().polls == 1


# --- nesting and many tasks -----------------------------------------------------------------------


async def test_async_with_gate_yields_account(make_gate):
    """``async with gate`` yields the account name."""
    gate, _ = make_gate({A: 1})
    async with gate as account:
        assert account == A
        assert gate.statistics().held == 1
    assert gate.statistics().held == 0


async def test_nesting_in_one_task_is_an_error(make_gate):
    """Nesting ``async with gate`` in one task is a RuntimeError naming gate.slot()."""
    gate, _ = make_gate({A: 2})
    async with gate:
        with pytest.raises(
            RuntimeError,
            match=r"^async with gate is already active in this task; "
            r"use gate\.slot\(\) to hold several slots at once$",
        ):
            async with gate:
                pass  # pragma: no cover
        assert gate.statistics().held == 1


async def test_many_tasks_each_get_a_slot(make_gate):
    """``async with gate`` in many tasks at once gives each task its own slot."""
    gate, _ = make_gate({A: 2, B: 2})
    accounts: list[str] = []
    ready = anyio.Event()

    async def use():
        async with gate as account:
            accounts.append(account)
            await ready.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(use)
        await anyio.wait_all_tasks_blocked()
        assert sorted(accounts) == [A, A, B, B]
        assert gate.statistics().held == 4
        ready.set()
    assert gate.statistics().held == 0


async def test_gate_reusable_after_exit_in_same_task(make_gate):
    """After ``async with gate`` ends, the same task may enter it again."""
    gate, _ = make_gate({A: 2})
    async with gate:
        pass
    async with gate as account:
        assert account == A


async def test_slot_context_cannot_be_entered_twice(make_gate):
    """One gate.slot() context object is entered once."""
    gate, _ = make_gate({A: 2})
    ctx = gate.slot()
    async with ctx:
        with pytest.raises(RuntimeError, match=r"^this gate\.slot\(\) context is already entered"):
            async with ctx:
                pass  # pragma: no cover


# --- rule 6: errors -------------------------------------------------------------------------------


async def test_401_fails_every_waiter_at_once(make_gate):
    """A refused token raises AuthenticationError in every waiter, after one request."""
    gate, fake = make_gate({A: 1}, token="wrong-token")
    holders = [Holder(gate) for _ in range(4)]
    with anyio.fail_after(5 * P):
        async with anyio.create_task_group() as tg:
            for h in holders:
                tg.start_soon(h.run)
    assert all(isinstance(h.error, AuthenticationError) for h in holders)
    assert str(holders[0].error) == "ltxstudio: the API token was refused (HTTP 401: Unauthorized)"
    assert fake.requests == fake.unauthorized == 1
    assert gate.statistics().waiting == 0


async def test_401_mid_wait_fails_current_waiters(make_gate):
    """A 401 after good polls fails the waiters then waiting, with no retry loop."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3600)
    fake.inject(Fault(), Fault(status=401, body={"error": "Unauthorized", "code": 401}))
    with pytest.raises(AuthenticationError, match=r"^ltxstudio: the API token was refused"):
        async with gate.slot():
            pass  # pragma: no cover
    assert fake.polls == 2


async def test_403_is_authentication_error(make_gate):
    """403 counts as a refused token too."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(status=403, body={"error": "Forbidden"}))
    with pytest.raises(AuthenticationError, match=r"^ltxstudio: the API token was refused") as info:
        await gate.refresh()
    assert info.value.status_code == 403


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 500, "body": {"error": "oops"}},
        {"status": 503, "body": b"<html>down</html>"},
        {"status": 429, "body": {"error": "slow down"}},
        {"status": 200, "body": b"this is not json"},
        {"body": [1, 2, 3]},
        {"body": {"available": "nope"}},
        {"body": {"unexpected": True}},
        {"disconnect": True},
    ],
    ids=["500", "503-html", "429", "garbage", "list", "wrong-field", "no-lists", "disconnect"],
)
async def test_failed_polls_are_logged_and_retried(make_gate, logs, fault):
    """5xx, 429, garbage, wrong shapes and disconnects are logged, retried, then served."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(count=2, **fault))
    with anyio.fail_after(100 * P):
        async with gate.slot() as slot:
            assert slot.account == A
    assert fake.polls == 3
    failed = [e for e in logs if e["event"] == "capgate.poll_failed"]
    assert len(failed) == 2
    assert failed[0]["log_level"] == "warning"
    assert gate.statistics().polls_failed == 2
    assert gate.statistics().last_poll_error is None


async def test_slow_poll_times_out_and_is_retried(make_gate, logs):
    """A poll slower than poll_timeout is a failed poll, retried."""
    gate, fake = make_gate({A: 1}, poll_timeout=2 * P)
    fake.inject(Fault(delay=20 * P))
    with anyio.fail_after(100 * P):
        async with gate.slot():
            pass
    errors = [e["error"] for e in logs if e["event"] == "capgate.poll_failed"]
    assert errors == ["ltxstudio: no answer within 0.1 s"]


@pytest.mark.trio_only
async def test_backoff_is_exponential_with_full_jitter(make_gate):
    """Failed polls back off from poll_interval, doubling up to max_backoff, jittered."""
    gate, fake = make_gate({A: 1}, poll_interval=1.0, max_backoff=30.0)
    fake.inject(Fault(count=8, status=502, body={"error": "bad gateway"}))
    async with gate.slot():
        pass
    gaps = [b - a for a, b in itertools.pairwise(fake.poll_times)]
    assert len(gaps) == 8
    for failures, gap in enumerate(gaps, start=1):
        assert 1.0 <= gap <= min(30.0, 2.0**failures) + 1e-9
    assert max(gaps) > 4.0  # the ceiling grows: not stuck at poll_interval


async def test_retry_after_is_honoured(make_gate):
    """A Retry-After longer than the backoff sets the next poll."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(status=429, body={"error": "busy"}, headers={"Retry-After": "0.5"}))
    async with gate.slot():
        pass
    assert fake.poll_times[1] - fake.poll_times[0] >= 0.5


async def test_failing_server_bounded_by_timeout(make_gate):
    """While every poll fails, waiters keep waiting until their own timeout, which then
    names the failure (not only "no free slot")."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(count=1000, status=500, body={"error": "down"}))
    with pytest.raises(
        SlotTimeout,
        match=r"^ltxstudio: no free slot within 0\.5 s \(the latest poll failed: "
        r"ltxstudio: HTTP 500: down\)$",
    ):
        async with gate.slot(timeout=10 * P):
            pass  # pragma: no cover
    stats = gate.statistics()
    assert stats.polls_failed >= 2
    assert stats.last_poll_error == "ltxstudio: HTTP 500: down"


async def test_refresh_raises_poll_error(make_gate):
    """refresh() raises the PollError of its poll (waiters never see it)."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(status=500, body={"error": "boom"}))
    with pytest.raises(PollError, match=r"^ltxstudio: HTTP 500: boom$") as info:
        await gate.refresh()
    assert info.value.status_code == 500


async def test_malformed_rows_skipped_and_logged(make_gate, logs):
    """A malformed row is skipped and logged; the rest of the answer is used."""
    gate, fake = make_gate({A: 1, B: 1})
    body = {
        "available": [
            {"email": A, "maxJobs": 1, "executing": -1, "available": 1},
            {"maxJobs": 1, "executing": 0, "available": 1},
            {"email": B, "maxJobs": 1, "executing": "x", "available": 1},
            {"email": C, "maxJobs": 2, "executing": 0, "available": 2},
        ],
        "executing": [],
    }
    fake.inject(Fault(count=100, body=body))
    async with gate.slot() as slot:
        assert slot.account == C
    skipped = [(e["index"], e["reason"]) for e in logs if e["event"] == "capgate.row_skipped"]
    assert skipped == [
        (0, "executing is negative"),
        (1, "no email"),
        (2, "executing is not a number"),
    ]


# --- rule 7: logging, and secrets -----------------------------------------------------------------


async def test_stable_event_names(make_gate, logs):
    """A grant and its settle are logged as capgate.poll, capgate.grant, capgate.settle."""
    gate, _ = make_gate({A: 1})
    async with gate.slot() as slot:
        slot.mark_submitted("j1")
    events = [e["event"] for e in logs]
    assert events == ["capgate.poll", "capgate.grant", "capgate.settle"]
    grant = logs[1]
    assert (grant["account"], grant["service"]) == (A, "ltxstudio")
    assert logs[2]["job_id"] == "j1"


async def test_log_keys_are_flat(make_gate, logs):
    """Every logged value is a scalar: flat keys, no nested structures."""
    gate, fake = make_gate({A: 1})
    fake.inject(Fault(status=500, body={"error": "x"}))
    async with gate.slot():
        pass
    assert logs
    for entry in logs:
        assert entry["event"].startswith("capgate.")
        for value in entry.values():
            assert value is None or isinstance(value, (str, int, float, bool))


SECRET = "tok-Sup3rSecret-0123456789"


async def test_token_never_leaks(make_gate, logs):
    """The token is in no log line, repr, exception message or statistics."""
    fake = FakeScheduler({A: 1}, token=SECRET)
    gate, _ = make_gate(fake)
    seen: list[str] = []
    fake.inject(
        Fault(status=500, body={"error": f"echo Bearer {SECRET}"}),
        Fault(status=200, body=f"not json {SECRET}".encode()),
        Fault(disconnect=True),
    )
    async with gate.slot() as slot:
        seen += [repr(gate), repr(slot), str(gate.statistics()), repr(vars(gate))]
    fake.inject(Fault(status=500, body={"error": f"Bearer {SECRET}"}))
    with pytest.raises(PollError) as info:
        await gate.refresh()
    seen += [str(info.value), repr(info.value)]
    fake.token = "rotated"
    with pytest.raises(AuthenticationError) as auth:
        await gate.refresh()
    seen += [str(auth.value), repr(auth.value), repr(gate), str(gate.statistics())]
    seen += [repr(entry) for entry in logs]
    assert len(logs) > 5
    for text in seen:
        assert SECRET not in text


async def test_token_cannot_be_pickled():
    """The token holder refuses pickling, so the token cannot leak through it."""
    import pickle

    gate = CapacityGate(SECRET, service="kling")
    with pytest.raises(TypeError, match=r"^the API token cannot be pickled$"):
        pickle.dumps(gate._engine.config.token)
    await gate.aclose()


# --- every service shape --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "account"),
    [
        ("ltxstudio", "a@x.io"),
        ("kling", "a@x.io"),
        ("tempolor", "user-12"),
        ("riffusion", "user-12"),
        ("minimax", "my-account"),
        ("pixverse", "a-b@x.io"),
    ],
)
async def test_every_service_shape(make_gate, service, account):
    """Each service's names parse, its jobs map to their account, and its ids release slots."""
    fake = FakeScheduler({account: 2, "other": 1}, service=service, latency=P)
    gate, _ = make_gate(fake, accounts=[account])
    async with anyio.create_task_group() as tg, gate.slot() as slot:
        assert slot.account == account
        job = await fake.create(slot.account, duration=3600)
        tg.start_soon(gate.refresh)
        await anyio.wait_all_tasks_blocked()
        slot.mark_submitted(job.wire_id)
    assert gate.snapshot is not None
    assert [(j.job_id, j.account) for j in gate.snapshot.executing] == [(job.job_id, account)]
    assert gate.statistics().reserved == 0
    assert gate.snapshot.free(account) == 1


# --- strategies and the allow-list ----------------------------------------------------------------


async def grant_sequence(gate: CapacityGate, n: int) -> list[str]:
    """Take ``n`` slots one after another (all held), and return their accounts."""
    accounts = []
    async with anyio.create_task_group() as tg:
        holders = [Holder(gate) for _ in range(n)]
        await start_in_order(tg, holders)
        accounts = [h.account for h in holders]
        tg.cancel_scope.cancel()
    return accounts


async def test_most_available_is_default(make_gate):
    """The default strategy picks the account with the most free slots, ties in server order."""
    gate, _ = make_gate({A: 1, B: 3, C: 2})
    assert await grant_sequence(gate, 4) == [B, B, C, A]


async def test_first_fit_follows_accounts_order(make_gate):
    """first_fit fills accounts in the accounts= order."""
    gate, _ = make_gate({A: 2, B: 2, C: 2}, strategy="first_fit", accounts=[C, A, B])
    assert await grant_sequence(gate, 5) == [C, C, A, A, B]


async def test_round_robin_rotates(make_gate):
    """round_robin moves to the next account with room after each grant."""
    gate, _ = make_gate({A: 2, B: 2, C: 1}, strategy="round_robin")
    assert await grant_sequence(gate, 5) == [A, B, C, A, B]


async def test_callable_strategy(make_gate):
    """A callable picks among Candidates that carry free, max_jobs, executing, reserved."""
    seen = []

    def last(candidates):
        seen.append([(c.account, c.free, c.max_jobs, c.executing, c.reserved) for c in candidates])
        return candidates[-1].account

    gate, _ = make_gate({A: 2, B: 1}, strategy=last)
    assert await grant_sequence(gate, 2) == [B, A]
    assert seen[0] == [(A, 2, 2, 0, 0), (B, 1, 1, 0, 0)]


async def test_broken_strategy_falls_back(make_gate, logs):
    """A callable that fails (or names no candidate) is logged; the default picks instead."""
    gate, _ = make_gate({A: 1, B: 2}, strategy=lambda candidates: "nobody")
    async with gate.slot() as slot:
        assert slot.account == B
    failed = [e for e in logs if e["event"] == "capgate.strategy_failed"]
    assert failed[0]["error"] == (
        "ValueError: strategy returned 'nobody', which is not one of the candidates"
    )


async def test_allow_list_limits_accounts(make_gate):
    """accounts= is an allow-list: other accounts are never granted nor counted."""
    gate, _ = make_gate({A: 3, B: 1}, accounts=[B])
    holders = [Holder(gate) for _ in range(2)]
    async with anyio.create_task_group() as tg:
        for h in holders:
            tg.start_soon(h.run)
        await anyio.sleep(5 * P)
        assert [h.account for h in holders].count(B) == 1
        assert not all(h.granted.is_set() for h in holders)
        stats = gate.statistics()
        assert [a.account for a in stats.accounts] == [B]
        assert stats.capacity == 1
        tg.cancel_scope.cancel()


# --- closing, repr --------------------------------------------------------------------------------


async def test_aclose_fails_waiters(make_gate):
    """aclose() wakes every waiter with GateClosed; later calls fail at once."""
    from capgate import GateClosed

    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=3600)
    holder = Holder(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run)
        await anyio.wait_all_tasks_blocked()
        await gate.aclose()
    assert isinstance(holder.error, GateClosed)
    with pytest.raises(GateClosed, match=r"^ltxstudio: the gate is closed$"):
        async with gate.slot():
            pass  # pragma: no cover
    await gate.aclose()  # twice is harmless


async def test_aclose_closes_own_client_only():
    """The gate closes the client it made, and leaves a caller's client open."""
    mine = httpx.AsyncClient()
    gate = CapacityGate("t", service="kling", client=mine)
    own = CapacityGate("t", service="kling")
    await gate.aclose()
    await own.aclose()
    assert not mine.is_closed
    assert own._engine._client.is_closed
    await mine.aclose()


async def test_repr_shows_live_state(make_gate):
    """The repr shows service, reserved/capacity, waiters and the snapshot's age."""
    gate, _ = make_gate({A: 3})
    assert repr(gate) == "<CapacityGate ltxstudio: 0 reserved, 0 waiting, no snapshot>"
    async with gate.slot() as slot:
        assert repr(gate).startswith("<CapacityGate ltxstudio: 1/3 reserved, 0 waiting, snapshot ")
        assert repr(slot) == "<capgate.Slot 'a@x.io' held>"


async def test_repr_from_a_thread_survives_a_change_in_flight(make_gate, monkeypatch):
    """A repr from another thread reads the state while the loop changes it: a read that
    meets a change ("dictionary changed size during iteration") is tried again, and a repr
    never raises (it says the state is changing)."""
    from capgate._engine.waiting import DESCRIBE_TRIES, Engine

    gate, _ = make_gate({A: 3})
    real = Engine._describe
    failures = iter(range(DESCRIBE_TRIES - 1))

    def changing(self: Engine) -> str:
        if next(failures, None) is not None:
            raise RuntimeError("dictionary changed size during iteration")
        return real(self)

    monkeypatch.setattr(Engine, "_describe", changing)
    assert repr(gate) == "<CapacityGate ltxstudio: 0 reserved, 0 waiting, no snapshot>"
    failures = iter(range(DESCRIBE_TRIES))
    assert repr(gate) == "<CapacityGate ltxstudio: 0 waiting, state changing>"


async def test_polling_continues_after_first_waiter_times_out(make_gate):
    """When the waiter that was polling gives up, another waiter takes polling over."""
    gate, fake = make_gate({A: 1})
    fake.add_outside_job(A, duration=10 * P)
    early, late = Holder(gate, timeout=3 * P), Holder(gate)
    async with anyio.create_task_group() as tg:
        await start_in_order(tg, [early, late])
        with anyio.fail_after(40 * P):
            await late.granted.wait()
        late.release.set()
    assert isinstance(early.error, SlotTimeout)
    assert late.account == A


@pytest.mark.trio_only  # the answer lands within asyncio's wait_all_tasks_blocked (real time)
async def test_waiter_cancelled_mid_poll_hands_polling_on(make_gate):
    """A waiter cancelled while its poll is in flight leaves the others polling."""
    gate, _ = make_gate({A: 1}, latency=2 * P)
    first, second = Holder(gate), Holder(gate)
    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_run, scope, first)
        await anyio.wait_all_tasks_blocked()  # first is polling (the answer is slow)
        tg.start_soon(second.run)
        await anyio.wait_all_tasks_blocked()
        scope.cancel()
        with anyio.fail_after(40 * P):
            await second.granted.wait()
        second.release.set()
    assert not first.granted.is_set()
    assert gate.statistics().waiting == 0


async def test_nesting_two_gates_is_fine(make_gate):
    """Only nesting the same gate is refused: one task may hold slots of two gates."""
    first, _ = make_gate({A: 1})
    second, _ = make_gate({B: 1})
    async with first as a, second as b:
        assert (a, b) == (A, B)


@pytest.mark.trio_only
async def test_retry_after_is_capped_at_an_hour(make_gate):
    """An absurd Retry-After (a day) delays the next poll by an hour at most."""
    gate, fake = make_gate({A: 1}, poll_interval=5.0)
    fake.inject(Fault(status=503, body={"error": "later"}, headers={"Retry-After": "86400"}))
    async with gate.slot():
        pass
    assert fake.poll_times[1] - fake.poll_times[0] == pytest.approx(3600)


async def _until_waiting(gate: CapacityGate, n: int) -> None:
    while gate.statistics().waiting < n:
        await anyio.lowlevel.checkpoint()


def _answering(body: Any) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


# --- the driver role, odd answers, a context entered twice (from a fresh-eyes review) --------


async def test_driver_role_survives_driver_and_successor_leaving_together(make_gate):
    """The driver and the waiter it hands the role to leave at once: the rest still polls.

    Regression: _leave() woke only the first waiter when the *driver* left. If that
    successor was itself on its way out (cancelled, timed out or granted before it ran
    again) it left without taking the role, so nobody polled and the remaining waiters
    slept forever although a slot came free. Trio runs a batch in random order, so the
    race is repeated to meet the losing order.
    """

    async def leaver(gate: CapacityGate, scope: anyio.CancelScope) -> None:
        with scope:
            async with gate.slot():
                pytest.fail("granted while the account is full")

    async def stayer(gate: CapacityGate, got: list[str]) -> None:
        with anyio.move_on_after(100 * P):
            async with gate.slot() as slot:
                got.append(slot.account)

    for _ in range(12):
        fake = FakeScheduler({A: 1})
        fake.add_outside_job(A, 6 * P)
        gate, _ = make_gate(fake)
        got: list[str] = []
        scopes = [anyio.CancelScope(), anyio.CancelScope()]
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaver, gate, scopes[0])  # the driver
            await _until_waiting(gate, 1)
            tg.start_soon(leaver, gate, scopes[1])  # its successor
            await _until_waiting(gate, 2)
            tg.start_soon(stayer, gate, got)
            await _until_waiting(gate, 3)
            await anyio.sleep(P / 2)
            scopes[0].cancel()
            scopes[1].cancel()
        assert got == [A]


@pytest.mark.parametrize(
    "row",
    [
        {"email": B, "maxJobs": 2, "executing": 0, "available": "\u00b2"},  # "²".isdigit()
        {"email": B, "maxJobs": 2, "executing": 0, "available": "9" * 5000},  # int() limit
        {"email": B, "maxJobs": 10**400, "executing": 0, "available": 2},  # inf as a double
        {"email": B, "maxJobs": 2, "executing": 0, "available": 1e300},
    ],
    ids=["superscript-digit", "over-int-digit-limit", "huge-int", "huge-float"],
)
async def test_malformed_count_skips_the_row_not_the_poll(make_gate, row):
    """A count that passes str.isdigit() but int() refuses is a skipped row, not a failed poll."""
    body = {"available": [{"email": A, "maxJobs": 2, "executing": 0, "available": 2}, row]}
    gate, _ = make_gate(FakeScheduler({A: 2}), transport=_answering(body))
    snapshot = await gate.refresh()
    assert [r.account for r in snapshot.accounts] == [A]
    assert snapshot.skipped == 1


async def test_huge_integer_started_is_ignored_not_a_failed_poll(make_gate):
    """An executing row whose ``started`` is an integer too big for a float still parses."""
    body = {
        "available": [{"email": A, "maxJobs": 2, "executing": 1, "available": 1}],
        "executing": [{"jobId": "j1", "email": A, "started": 10**400}],
    }
    gate, _ = make_gate(FakeScheduler({A: 2}), transport=_answering(body))
    snapshot = await gate.refresh()
    assert snapshot.lists_job("j1")
    assert snapshot.executing[0].started is None


async def test_one_slot_context_entered_by_two_tasks_at_once_is_refused(make_gate):
    """Entering one ``gate.slot()`` object from two tasks at once raises, and leaks nothing.

    Regression: the "already entered" guard looked at the slot, which is set only once the
    wait ends, so two tasks waiting on one context both got slots; the first slot was
    overwritten and never settled, and counted against its account forever.
    """
    gate, _ = make_gate({A: 2}, latency=P)  # both tasks are waiting when the answer lands
    ctx = gate.slot()
    errors: list[BaseException] = []

    async def enter() -> None:
        try:
            async with ctx:
                await anyio.sleep(P)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        tg.start_soon(enter)
    assert len(errors) == 1
    assert str(errors[0]) == "this gate.slot() context is already entered; call gate.slot() again"
    await anyio.sleep(2 * P)
    await gate.refresh()
    assert gate.statistics().held == 0


# --- clear errors for clear mistakes ----------------------------------------------------------


def test_max_jobs_naming_an_account_outside_accounts_is_refused():
    """A cap for an account the allow-list lacks is a typo: refused, naming it."""
    with pytest.raises(ValueError, match=r"^max_jobs names 'typo@x\.io', which is not among"):
        CapacityGate("t", service="kling", accounts=[A, B], max_jobs={"typo@x.io": 2})


def test_capgate_redis_without_the_extra_names_the_install():
    """Importing capgate.redis with no redis installed says which extra to install."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['redis'] = None\n"
        "try:\n    import capgate.redis\n"
        "except ModuleNotFoundError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
    assert "pip install 'capgate[redis]'" in done.stdout
