"""Placement by expected earliest finish: when a slow account's free slot is left idle."""

from __future__ import annotations

import math

import pytest

from capgate import AccountCapacity, ExecutingJob, Snapshot
from capgate._engine.placement import MAX_HELD, FinishFirst

FAST, SLOW = {"fast": 10.0}, {"slow": 100.0}
MEDIANS = {**FAST, **SLOW}


def test_a_plan_applies_only_when_an_account_is_markedly_faster():
    """Medians of 10 and 100 s: a plan; 10 and 12 s: none; a free account with no median:
    none (nothing to compare it with)."""
    assert FinishFirst.applies({"slow": 1}, MEDIANS)
    assert not FinishFirst.applies({"slow": 1}, {"fast": 10.0, "slow": 12.0})
    assert not FinishFirst.applies({"other": 1}, MEDIANS)


def test_a_lone_waiter_waits_for_a_faster_slot_that_frees_soon():
    """The slow slot is free; the fast one frees in 5 s: 5 + 10 beats 100, so it waits."""
    plan = FinishFirst(0.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    assert plan.usable(None, math.inf) == frozenset()


def test_the_slow_slot_goes_to_the_first_waiter_that_finishes_sooner_there():
    """One fast slot frees at 5 s and takes 10 s a job: the waiters planned onto it finish
    at 15, 25, ..., 95, 105 s, so the tenth is the first to finish sooner (100 s) on the
    slow slot that is free now."""
    plan = FinishFirst(0.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    answers = [plan.usable(None, math.inf) for _ in range(10)]
    assert answers[:9] == [frozenset()] * 9
    assert answers[9] == frozenset({"slow"})


def test_a_waiter_is_never_held_past_its_deadline():
    """The fast slot frees at 5 s; a waiter that gives up at 3 s takes the slow one now,
    and so does one that cannot wait at all while the fast job is overdue."""
    plan = FinishFirst(0.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    assert plan.usable(None, 3.0) == frozenset({"slow"})
    overdue = FinishFirst(10.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    assert overdue.usable(None, 10.0) == frozenset({"slow"})


def test_a_waiter_only_allowed_the_slow_account_is_not_held():
    """accounts=["slow"]: the fast slot is none of its business."""
    plan = FinishFirst(0.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    assert plan.usable(frozenset({"slow"}), math.inf) == frozenset({"slow"})


def test_a_slot_expected_to_have_freed_already_is_not_free():
    """A fast job overdue by the forecast is expected to end any moment, not granted on."""
    plan = FinishFirst(10.0, {"slow": 1}, MEDIANS, {"fast": [5.0]})
    assert plan.usable(None, math.inf) == frozenset()


def test_a_granted_slot_is_busy_for_the_waiters_behind():
    """Both accounts free, nothing busy: the first waiter may take either; once it took the
    fast slot, the second is planned behind it (10 + 10 s beats 100 s) and waits."""
    plan = FinishFirst(0.0, {"fast": 1, "slow": 1}, MEDIANS, {})
    assert plan.usable(None, math.inf) == frozenset({"fast", "slow"})
    plan.took("fast")
    assert plan.usable(None, math.inf) == frozenset()


def test_a_waiter_is_held_only_for_a_slot_freeing_a_margin_before_its_deadline():
    """Margin 2 s: the fast slot frees at 5 s; a waiter giving up at 7 s or earlier is not
    held, one giving up at 8 s is."""

    def plan():
        return FinishFirst(0.0, {"slow": 1}, MEDIANS, {"fast": [5.0]}, margin=2.0)

    assert plan().usable(None, 7.0) == frozenset({"slow"})
    assert plan().usable(None, 8.0) == frozenset()


def test_after_max_held_waiters_the_rest_are_granted_as_without_a_plan():
    """A queue too long to plan gets the strategy's picks (None: no restriction)."""
    plan = FinishFirst(0.0, {"slow": 1}, {"fast": 1.0, "slow": 1e9}, {"fast": [1.0] * 4})
    for _ in range(MAX_HELD):
        assert plan.usable(None, math.inf) == frozenset()
    assert plan.usable(None, math.inf) is None


# --- in the in-memory store ---------------------------------------------------------------


async def _store_with(rows: tuple[AccountCapacity, ...], executing: tuple[ExecutingJob, ...]):
    from capgate._config import check_config
    from capgate._engine.local import MemoryStore

    config = check_config(
        "t",
        service="kling",
        url=None,
        poll_interval=5.0,
        accounts=None,
        max_jobs=None,
        strategy="most_available",
        quarantine_for=60.0,
        poll_timeout=30.0,
        max_backoff=None,
        jitter=0.0,
    )
    store = MemoryStore(config)
    ticket = await store.begin_poll(force=True)
    assert not isinstance(ticket, float)
    await store.apply(ticket, Snapshot("kling", rows, executing, ticket.sent, ticket.sent), 5.0)
    return store, ticket.sent


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("typical", "granted"), [({"a": 90, "b": 45}, "b"), ({"a": 60, "b": 45}, "a")]
)
async def test_most_available_prefers_an_account_whose_jobs_end_markedly_sooner(typical, granted):
    """a has the most free slots; b's jobs end in half the time (granted there), or in
    three quarters of it (not markedly sooner: a, as most_available says)."""
    rows = (AccountCapacity("a", 5, 0, 5), AccountCapacity("b", 2, 0, 2))
    store, now = await _store_with(rows, ())
    store.prefer_faster(store.snapshot(), typical, {})
    lease = store.grant_nowait(None, now)
    assert lease is not None
    assert lease.account == granted


@pytest.mark.anyio
async def test_the_store_holds_the_slow_slot_for_a_newcomer_but_not_for_timeout_zero():
    """fast (1 slot) is busy with a job expected to end in 5 s, slow is free: a newcomer
    with time to wait is left for the fast slot; one that cannot wait gets the slow one."""
    rows = (AccountCapacity("fast", 1, 1, 0), AccountCapacity("slow", 1, 0, 1))
    job = ExecutingJob("j1", "fast", None, "00:05", 5.0)
    store, now = await _store_with(rows, (job,))
    store.prefer_faster(store.snapshot(), MEDIANS, {"fast": [now + 5.0]})
    assert store.grant_nowait(None, now) is None
    lease = store.grant_nowait(None, now, deadline=now)
    assert lease is not None
    assert lease.account == "slow"


@pytest.mark.anyio
async def test_a_long_held_reservation_is_not_expected_to_free():
    """fast's only slot was granted 50 s ago and its job not listed yet: older than fast's
    typical 10 s, it says nothing of when the slot frees; slow's free slot is granted."""
    rows = (AccountCapacity("fast", 1, 0, 1), AccountCapacity("slow", 1, 0, 1))
    store, now = await _store_with(rows, ())
    store.prefer_faster(store.snapshot(), MEDIANS, {})
    held = store.grant_nowait(frozenset({"fast"}), now - 50)
    assert held is not None
    lease = store.grant_nowait(None, now)
    assert lease is not None
    assert lease.account == "slow"


@pytest.mark.anyio
async def test_a_slow_account_out_of_rotation_does_not_turn_planning_on():
    """a (10 s) and b (14 s) are alike; c (100 s) is quarantined: no plan, b is granted
    though a frees in a second."""
    rows = (
        AccountCapacity("a", 1, 1, 0),
        AccountCapacity("b", 1, 0, 1),
        AccountCapacity("c", 1, 0, 1),
    )
    store, now = await _store_with(rows, ())
    store.quarantine("c", 60.0, "test")
    store.prefer_faster(store.snapshot(), {"a": 10.0, "b": 14.0, "c": 100.0}, {"a": [now + 1]})
    lease = store.grant_nowait(None, now)
    assert lease is not None
    assert lease.account == "b"


@pytest.mark.anyio
async def test_the_store_plans_only_with_ends_of_its_own_snapshot():
    """Ends learnt from an older snapshot say nothing of this one: no plan, granted."""
    rows = (AccountCapacity("fast", 1, 1, 0), AccountCapacity("slow", 1, 0, 1))
    store, now = await _store_with(rows, ())
    older = Snapshot("kling", rows, (), now - 5, now - 5)
    store.prefer_faster(older, MEDIANS, {"fast": [now + 5.0]})
    lease = store.grant_nowait(None, now)
    assert lease is not None
    assert lease.account == "slow"


# --- in a gate ----------------------------------------------------------------------------


@pytest.fixture
def fast_busy(make_gate, monkeypatch):
    """A gate over f@x.io (1 slot, jobs of 10 s) and s@x.io (1 slot, jobs of 100 s), f's
    slot taken by a job that runs ``runs`` seconds while the forecast expects it to end at
    t = 2 s; polled once. ``await fast_busy(runs, poll_interval)`` gives the gate."""
    from capgate._engine.forecast import Forecast

    monkeypatch.setattr(Forecast, "ready", property(lambda self: True))
    monkeypatch.setattr(Forecast, "typical", lambda self: {"f@x.io": 10.0, "s@x.io": 100.0})
    monkeypatch.setattr(Forecast, "expected_ends", lambda self: {"f@x.io": [2.0]})

    async def build(runs: float, poll_interval: float, latency: float = 0.0):
        gate, fake = make_gate(
            {"f@x.io": 1, "s@x.io": 1}, poll_interval=poll_interval, latency=latency
        )
        fake.add_outside_job("f@x.io", duration=runs)
        await gate.refresh()
        return gate

    return build


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_a_held_waiter_gets_the_faster_slot_when_it_frees(fast_busy):
    """f's only slot runs a job ending at t = 2 s, s's is free: the waiter is granted f's
    slot at the first poll that shows it free, not s's at once."""
    import anyio

    gate = await fast_busy(runs=2.0, poll_interval=0.5)
    async with gate.slot() as slot:
        assert slot.account == "f@x.io"
        assert 2.0 <= anyio.current_time() <= 2.5 + 0.5


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_a_waiter_with_no_time_to_wait_takes_the_slow_slot(fast_busy):
    """The same, with timeout=0 (try once): granted s's slot at once."""
    gate = await fast_busy(runs=2.0, poll_interval=0.5)
    async with gate.slot(timeout=0) as slot:
        assert slot.account == "s@x.io"


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_a_waiter_held_for_an_overrunning_job_takes_the_slow_slot_before_its_timeout(
    fast_busy,
):
    """f's job is expected to end at t = 2 s but runs 30 s; a waiter with timeout=5 is not
    left to time out while s's slot is free: it gets s's slot in time."""
    gate = await fast_busy(runs=30.0, poll_interval=0.5)
    async with gate.slot(timeout=5) as slot:
        assert slot.account == "s@x.io"


@pytest.mark.anyio
@pytest.mark.trio_only
@pytest.mark.parametrize(("poll_interval", "latency", "timeout"), [(1, 5, 8), (5, 20, 40)])
async def test_slow_answers_do_not_hold_a_waiter_past_its_timeout(
    fast_busy, poll_interval, latency, timeout
):
    """The same, with answers slower than the poll interval (found by a review: held for
    two poll intervals' margin while passes came a round trip apart, it timed out with s's
    slot free all along): the margin counts the round trip, and it gets s's slot."""
    gate = await fast_busy(runs=600.0, poll_interval=poll_interval, latency=latency)
    async with gate.slot(timeout=timeout) as slot:
        assert slot.account == "s@x.io"


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_a_newcomer_behind_a_held_waiter_gets_a_pass_at_once(fast_busy):
    """W1 (no timeout) is held for f's slot, which frees at t = 2 s; W2 arrives at 0.1 s
    and cannot wait that long (timeout=1): it gets s's free slot at once, not at the next
    poll (5 s on)."""
    import anyio

    gate = await fast_busy(runs=2.0, poll_interval=5)
    got: dict[str, tuple[str, float]] = {}

    async def first() -> None:
        async with gate.slot() as slot:
            got["w1"] = (slot.account, anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.sleep(0.1)
        async with gate.slot(timeout=1) as slot:
            got["w2"] = (slot.account, anyio.current_time())
    assert got["w2"] == ("s@x.io", pytest.approx(0.1))
    assert got["w1"][0] == "f@x.io"
