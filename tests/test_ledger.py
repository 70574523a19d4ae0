"""The ledger: local reservations and the accounting rule, tested without an event loop."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from capgate import AccountCapacity, ExecutingJob, Snapshot
from capgate._engine.ledger import Ledger
from capgate._policy import WATCH_MAX


@pytest.fixture(autouse=True)
def _no_collection_mid_draw() -> Iterator[None]:
    """Earlier tests' garbage (event loops, clients) collected in the middle of one of
    Hypothesis's draws can touch the global ``random`` state, which Hypothesis reports as a
    flaky strategy (seen once in a run of several test files): collect first, then not."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def snap(*rows: tuple[str, int, int], jobs: tuple[tuple[str, str], ...] = ()) -> Snapshot:
    """A snapshot from ``(account, maxJobs, executing)`` rows and ``(job_id, account)`` jobs."""
    return Snapshot(
        service="ltxstudio",
        accounts=tuple(AccountCapacity(a, m, e, max(0, m - e)) for a, m, e in rows),
        executing=tuple(ExecutingJob(j, a) for j, a in jobs),
        requested_at=0.0,
        received_at=0.0,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> Ledger:
    return Ledger(clock)


def snap_at(
    t: float, *rows: tuple[str, int, int], jobs: tuple[tuple[str, str], ...] = ()
) -> Snapshot:
    """Like :func:`snap`, requested at ``t``."""
    base = snap(*rows, jobs=jobs)
    return Snapshot(base.service, base.accounts, base.executing, t, t)


def _lagging_start(ledger: Ledger, clock: Clock) -> None:
    """job-1 is settled at t=0, missed by a snapshot at t=5, listed by one at t=16."""
    ledger.apply_snapshot(snap_at(0, ("a", 2, 0)), ledger.tick())
    first = ledger.reserve("a")
    ledger.settle(first, "job-1")
    clock.now = 5
    ledger.apply_snapshot(snap_at(5, ("a", 2, 0)), ledger.tick())
    clock.now = 16
    ledger.apply_snapshot(snap_at(16, ("a", 2, 1), jobs=(("job-1", "a"),)), ledger.tick())


def test_counts_that_do_not_lag_teach_no_lag(ledger, clock):
    """A job listed by the first snapshot after its settle shows no lag: rule 2 holds as is."""
    ledger.apply_snapshot(snap_at(0, ("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    ledger.settle(res, "job-1")
    clock.now = 5
    ledger.apply_snapshot(snap_at(5, ("a", 2, 1), jobs=(("job-1", "a"),)), ledger.tick())
    ended = ledger.reserve("a")
    ledger.settle(ended, "job-2")  # it ends before the next poll sees it
    clock.now = 10
    ledger.apply_snapshot(snap_at(10, ("a", 2, 0)), ledger.tick())
    assert ledger.lag == 0
    assert ledger.pending("a") == 0


def test_a_job_listed_late_teaches_the_lag(ledger, clock):
    """A job dropped by rule 2 and listed later shows how far the counts lag."""
    _lagging_start(ledger, clock)
    assert ledger.lag == 16


def test_once_lag_is_known_a_job_counts_until_listed(ledger, clock):
    """With a known lag, a reservation with a job id outlives a snapshot that misses it."""
    _lagging_start(ledger, clock)
    clock.now = 20
    res = ledger.reserve("a")
    ledger.settle(res, "job-2")
    clock.now = 25
    ledger.apply_snapshot(snap_at(25, ("a", 2, 0)), ledger.tick())
    assert ledger.pending("a") == 1
    assert ledger.free("a") == 1


def test_a_lagging_reservation_stops_counting_past_the_lag(ledger, clock):
    """A reservation still missed more than the known lag after its settle stops counting."""
    _lagging_start(ledger, clock)
    clock.now = 20
    res = ledger.reserve("a")
    ledger.settle(res, "job-2")
    clock.now = 37
    ledger.apply_snapshot(snap_at(clock.now, ("a", 2, 0)), ledger.tick())
    assert ledger.pending("a") == 0


def test_the_lag_floor_is_the_longest_surely_seen(ledger, clock):
    """job-1 was missed 5 s after its settle and listed 16 s after: the counts lag by more
    than 5 s (the floor) and at most 16 s (the lag)."""
    _lagging_start(ledger, clock)
    assert ledger.lag_floor == 5
    assert ledger.lag == 16


def test_no_snapshot_no_room(ledger):
    """Before any snapshot no account has room."""
    assert ledger.free("a") == 0
    assert ledger.free_accounts() == {}


def test_free_is_server_free_minus_pending(ledger):
    """free(a) is the server's free count minus reservations not yet reflected."""
    ledger.apply_snapshot(snap(("a", 5, 2)), ledger.tick())
    ledger.reserve("a")
    ledger.reserve("a")
    assert ledger.free("a") == 1
    assert ledger.pending("a") == 2


def test_free_never_negative(ledger):
    """Over-reserving (never done by the gate) clamps at zero rather than going negative."""
    ledger.apply_snapshot(snap(("a", 1, 0)), ledger.tick())
    ledger.reserve("a")
    ledger.reserve("a")
    assert ledger.free("a") == 0


def test_missing_account_has_no_room(ledger):
    """An account the snapshot leaves out is full."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    assert ledger.free("b") == 0
    assert ledger.free_accounts() == {"a": 2}


def test_local_cap_int(clock):
    """An int max_jobs caps every account at min(server maxJobs, cap) - executing."""
    ledger = Ledger(clock, max_jobs=3)
    ledger.apply_snapshot(snap(("a", 10, 1), ("b", 2, 0)), ledger.tick())
    assert ledger.free_accounts() == {"a": 2, "b": 2}


def test_local_cap_mapping(clock):
    """A mapping caps only the accounts it names."""
    ledger = Ledger(clock, max_jobs={"a": 1})
    ledger.apply_snapshot(snap(("a", 10, 0), ("b", 4, 0)), ledger.tick())
    assert ledger.free_accounts() == {"a": 1, "b": 4}


def test_local_cap_below_executing(clock):
    """A cap below what already runs leaves no room (never a negative count)."""
    ledger = Ledger(clock, max_jobs=2)
    ledger.apply_snapshot(snap(("a", 10, 5)), ledger.tick())
    assert ledger.free("a") == 0


def test_local_cap_counts_pending(clock):
    """Pending reservations count against the local cap too."""
    ledger = Ledger(clock, max_jobs=2)
    ledger.apply_snapshot(snap(("a", 10, 1)), ledger.tick())
    ledger.reserve("a")
    assert ledger.free("a") == 0


def test_open_reservation_survives_snapshots(ledger):
    """A slot still held counts however many snapshots arrive."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    ledger.reserve("a")
    for _ in range(3):
        ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    assert ledger.free("a") == 1


def test_settled_counts_until_snapshot_sent_after(ledger):
    """A settled reservation counts through a snapshot sent before the settle."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    sent_before = ledger.tick()
    ledger.settle(res)
    ledger.apply_snapshot(snap(("a", 2, 0)), sent_before)
    assert ledger.pending("a") == 1


def test_settled_drops_on_snapshot_sent_after(ledger):
    """A snapshot requested after the settle reflects the job: the reservation drops."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    ledger.settle(res)
    ledger.apply_snapshot(snap(("a", 2, 1)), ledger.tick())
    assert ledger.pending("a") == 0
    assert ledger.free("a") == 1


def test_job_id_listed_drops_even_if_sent_before(ledger):
    """A reservation settled with a job id drops once a snapshot lists that job."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    sent_before = ledger.tick()
    ledger.settle(res, "job-1")
    ledger.apply_snapshot(snap(("a", 2, 1), jobs=(("job-1", "a"),)), sent_before)
    assert ledger.pending("a") == 0


def test_job_id_not_listed_keeps_counting(ledger):
    """A snapshot sent before the settle that does not list the job keeps the reservation."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    sent_before = ledger.tick()
    ledger.settle(res, "job-1")
    ledger.apply_snapshot(snap(("a", 2, 0), jobs=(("job-2", "a"),)), sent_before)
    assert ledger.pending("a") == 1


def test_job_already_listed_drops_at_settle(ledger):
    """Settling with a job id the current snapshot lists drops the reservation at once."""
    ledger.apply_snapshot(snap(("a", 2, 1), jobs=(("job-1", "a"),)), ledger.tick())
    res = ledger.reserve("a")
    ledger.settle(res, "job-1")
    assert ledger.pending("a") == 0


def test_give_back_drops_at_once(ledger):
    """A slot given back stops counting at once, without a new snapshot."""
    ledger.apply_snapshot(snap(("a", 1, 0)), ledger.tick())
    res = ledger.reserve("a")
    assert ledger.give_back(res) is True
    assert ledger.free("a") == 1
    assert ledger.give_back(res) is False


def test_settle_twice_is_harmless(ledger):
    """Settling an already settled (or dropped) reservation changes nothing."""
    ledger.apply_snapshot(snap(("a", 2, 0)), ledger.tick())
    res = ledger.reserve("a")
    ledger.settle(res)
    tick = res.settled_tick
    ledger.settle(res, "late-id")
    assert (res.settled_tick, res.job_id) == (tick, None)


def test_older_snapshot_is_ignored(ledger):
    """A snapshot sent before the one in hand does not replace it."""
    old = ledger.tick()
    new = ledger.tick()
    ledger.apply_snapshot(snap(("a", 3, 0)), new)
    ledger.apply_snapshot(snap(("a", 3, 3)), old)
    assert ledger.free("a") == 3


def test_counters(ledger):
    """``reserved`` counts all that count, ``open_count`` only those not settled."""
    ledger.apply_snapshot(snap(("a", 5, 0)), ledger.tick())
    first, _ = ledger.reserve("a"), ledger.reserve("a")
    ledger.settle(first)
    assert (ledger.reserved, ledger.open_count) == (2, 1)


def test_busy_blocks_until_snapshot_sent_after(ledger):
    """After a 429, no room on the account until a snapshot requested after it."""
    ledger.apply_snapshot(snap(("a", 3, 0)), ledger.tick())
    sent_before = ledger.tick()
    ledger.mark_busy("a")
    assert ledger.free("a") == 0
    assert ledger.room("a") == 3
    ledger.apply_snapshot(snap(("a", 3, 0)), sent_before)
    assert ledger.is_busy("a")
    ledger.apply_snapshot(snap(("a", 3, 1)), ledger.tick())
    assert not ledger.is_busy("a")
    assert ledger.free("a") == 2


def test_quarantine_expires(ledger, clock):
    """A quarantined account has no room until its time runs out."""
    ledger.apply_snapshot(snap(("a", 3, 0)), ledger.tick())
    ledger.quarantine("a", 10.0, "596")
    assert ledger.free("a") == 0
    assert ledger.quarantined("a") == (10.0, "596")
    assert ledger.next_quarantine_expiry() == 10.0
    clock.now = 10.0
    assert ledger.free("a") == 3
    assert ledger.quarantine_items() == {}


def test_restore_ends_quarantine(ledger):
    """restore() puts an account back at once."""
    ledger.quarantine("a", None, "")
    assert ledger.all_quarantined(["a"])
    assert ledger.restore("a") is True
    assert ledger.restore("a") is False
    assert not ledger.all_quarantined(["a"])
    assert not ledger.all_quarantined([])


# --- the accounting invariant, as a state machine -------------------------------------------


@dataclass
class Res:
    """The model's view of one reservation."""

    handle: object
    account: str
    job: str | None = None  # the job created on the server for it, if any
    settled_tick: int | None = None
    settled_with: str | None = None
    counting: bool = True


@dataclass
class Poll:
    tick: int
    executing: dict[str, int]
    jobs: frozenset[str]
    omit_full: bool


@dataclass
class Server:
    max_jobs: dict[str, int]
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> account

    def executing(self, account: str) -> int:
        return sum(1 for a in self.jobs.values() if a == account)


ACCOUNTS = ("a", "b", "c")


class LedgerMachine(RuleBasedStateMachine):
    """Grants never exceed room; reservations drop exactly as rule 2 says."""

    reservations = Bundle("reservations")

    @initialize(
        max_jobs=st.fixed_dictionaries({a: st.integers(0, 4) for a in ACCOUNTS}),
        caps=st.one_of(
            st.none(),
            st.integers(1, 4),
            st.dictionaries(st.sampled_from(ACCOUNTS), st.integers(0, 4)),
        ),
    )
    def setup(self, max_jobs, caps):
        self.clock = Clock()
        self.ledger = Ledger(self.clock, max_jobs=caps)
        self.caps = caps
        self.server = Server(max_jobs)
        self.polls: list[Poll] = []
        self.applied_tick = 0
        self.applied: Poll | None = None
        self.model: list[Res] = []
        self.ids = 0

    def cap(self, account: str) -> int:
        limit = self.server.max_jobs[account]
        if isinstance(self.caps, int):
            limit = min(limit, self.caps)
        elif isinstance(self.caps, dict) and account in self.caps:
            limit = min(limit, self.caps[account])
        return limit

    # --- the outside world ------------------------------------------------------------

    @rule(omit_full=st.booleans())
    def send_poll(self, omit_full):
        """A poll is sent: the server's counts are read now."""
        self.polls.append(
            Poll(
                self.ledger.tick(),
                {a: self.server.executing(a) for a in ACCOUNTS},
                frozenset(self.server.jobs),
                omit_full,
            )
        )

    @precondition(lambda self: self.polls)
    @rule(data=st.data())
    def answer_poll(self, data):
        """Some poll in flight is answered (answers may arrive out of order)."""
        poll = self.polls.pop(data.draw(st.integers(0, len(self.polls) - 1)))
        rows = tuple(
            AccountCapacity(a, m, poll.executing[a], max(0, m - poll.executing[a]))
            for a, m in self.server.max_jobs.items()
            if not (poll.omit_full and poll.executing[a] >= m)
        )
        jobs = tuple(ExecutingJob(j, None) for j in sorted(poll.jobs))
        snapshot = Snapshot("ltxstudio", rows, jobs, self.clock.now, self.clock.now)
        self.ledger.apply_snapshot(snapshot, poll.tick)
        if poll.tick < self.applied_tick:
            return  # older than the snapshot in hand: ignored
        self.applied_tick = poll.tick
        self.applied = poll
        for res in self.model:
            if res.counting and res.settled_tick is not None:
                reflected = res.settled_tick < poll.tick
                listed = res.settled_with is not None and res.settled_with in poll.jobs
                if reflected or listed:
                    res.counting = False

    @precondition(lambda self: self.server.jobs)
    @rule(data=st.data())
    def job_ends(self, data):
        """A job finishes on the server."""
        job = data.draw(st.sampled_from(sorted(self.server.jobs)))
        del self.server.jobs[job]

    @rule(dt=st.floats(0, 10))
    def time_passes(self, dt):
        self.clock.now += dt

    # --- the gate's side --------------------------------------------------------------

    @rule(target=reservations, account=st.sampled_from(ACCOUNTS))
    def grant(self, account):
        """The gate grants only where the ledger says there is room."""
        if self.ledger.free(account) <= 0:
            return multiple()  # nothing granted, nothing added to the bundle
        res = Res(self.ledger.reserve(account), account)
        self.model.append(res)
        return res

    @rule(res=reservations)
    def create_job(self, res):
        """The holder creates its job on the server (not yet marked submitted)."""
        if res.job is not None or res.settled_tick is not None or not res.counting:
            return  # a slot given back is never used for a job
        self.ids += 1
        res.job = f"job-{self.ids}"
        self.server.jobs[res.job] = res.account

    @rule(res=reservations, with_id=st.booleans())
    def settle(self, res, with_id):
        """mark_submitted (with or without the id) or the block's exit."""
        if res.settled_tick is not None or not res.counting:
            return
        self.ledger.settle(res.handle, res.job if with_id else None)
        res.settled_tick = res.handle.settled_tick
        res.settled_with = res.job if with_id else None
        snapshot = self.ledger.snapshot
        listed = snapshot is not None and res.settled_with is not None
        if listed and snapshot.lists_job(res.settled_with):
            res.counting = False

    @rule(res=reservations)
    def give_back(self, res):
        """A holder that never used its slot gives it back: it drops at once."""
        if res.job is not None or res.settled_tick is not None:
            return
        if res.counting:
            self.ledger.give_back(res.handle)
            res.counting = False

    # --- what must always hold --------------------------------------------------------

    @invariant()
    def grants_never_exceed_room(self):
        """Jobs on the server plus slots held without a job never pass the cap."""
        if not hasattr(self, "ledger"):
            return
        for account in ACCOUNTS:
            held = sum(
                1
                for r in self.model
                if r.account == account and r.job is None and r.settled_tick is None and r.counting
            )
            assert self.server.executing(account) + held <= self.cap(account)

    @invariant()
    def free_follows_rule_1(self):
        """free(a) = min(server free, cap - executing) - pending, clamped; 0 if left out."""
        if not hasattr(self, "ledger"):
            return
        for account in ACCOUNTS:
            poll = self.applied
            if poll is None or (
                poll.omit_full and poll.executing[account] >= self.server.max_jobs[account]
            ):
                expected = 0
            else:
                pending = sum(1 for r in self.model if r.account == account and r.counting)
                room = self.cap(account) - poll.executing[account]
                expected = max(0, room - pending)
            assert self.ledger.free(account) == expected

    @invariant()
    def reservations_drop_per_rule_2(self):
        """The ledger counts exactly the reservations rule 2 says still count."""
        if not hasattr(self, "ledger"):
            return
        for account in ACCOUNTS:
            expected = sum(1 for r in self.model if r.account == account and r.counting)
            assert self.ledger.pending(account) == expected
        assert self.ledger.reserved == sum(r.counting for r in self.model)


LedgerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerMachine = LedgerMachine.TestCase


# --- regressions of the one-engine issue ------------------------------------------------------


def test_listed_jobs_count_against_the_local_cap_when_the_row_has_only_available(clock):
    """Regression (bug 1): a row with only ``available`` and two listed jobs, cap 2: no room.

    The cap was applied as ``cap - (row.busy or 0)``, and ``busy`` is unknown for such a row,
    so the jobs the answer lists under the account were not counted: 2 slots were granted.
    """
    ledger = Ledger(clock, max_jobs=2)
    snapshot = Snapshot(
        service="ltxstudio",
        accounts=(AccountCapacity("a", None, None, 3),),
        executing=(ExecutingJob("j1", "a"), ExecutingJob("j2", "a")),
        requested_at=0.0,
        received_at=0.0,
    )
    ledger.apply_snapshot(snapshot, ledger.tick())
    assert ledger.free("a") == 0


def test_once_a_lag_is_known_a_settle_without_job_id_counts_for_that_long(ledger, clock):
    """Regression (bug 5): with a lag known, a slot settled without a job id keeps counting.

    It used to stop counting at the first snapshot sent after its settle, as if the counts
    did not lag: the gate's own jobs then exceeded the local cap for the length of the lag.
    """
    _lagging_start(ledger, clock)  # a lag of 16 s is known
    assert ledger.lag == pytest.approx(16)
    clock.now = 20
    anonymous = ledger.reserve("a")
    ledger.settle(anonymous, None)  # a create that timed out, a body that raised
    clock.now = 25
    ledger.apply_snapshot(snap_at(25, ("a", 2, 0)), ledger.tick())
    assert ledger.pending("a") == 1  # 5 s after its settle, inside the 16 s lag
    clock.now = 37
    ledger.apply_snapshot(snap_at(37, ("a", 2, 1)), ledger.tick())
    assert ledger.pending("a") == 0  # 17 s after: the counts have caught up


def test_the_snapshot_that_shows_the_lag_keeps_the_other_reservations(ledger, clock):
    """Regression (bug 5): the snapshot a lag is learnt from judges the others by that lag.

    It used to drop the other settled reservations with the allowance from before (none),
    so right when the lag became known the gate's jobs could exceed the local cap.
    """
    ledger.apply_snapshot(snap_at(0, ("a", 3, 0)), ledger.tick())
    first = ledger.reserve("a")
    ledger.settle(first, "job-1")
    clock.now = 1
    ledger.apply_snapshot(snap_at(1, ("a", 3, 0)), ledger.tick())  # misses job-1: dropped
    clock.now = 2
    second = ledger.reserve("a")
    ledger.settle(second, "job-2")
    clock.now = 3
    # lists job-1 (3 s late) and misses job-2, settled 1 s ago: job-2 may be running unseen
    ledger.apply_snapshot(snap_at(3, ("a", 3, 1), jobs=(("job-1", "a"),)), ledger.tick())
    assert ledger.lag == pytest.approx(3)
    assert ledger.pending("a") == 1


# --- probes on counts that lag (issue 16) ------------------------------------------------------


def _running(n: int) -> tuple[ExecutingJob, ...]:
    return tuple(ExecutingJob(f"j{i}", "a", None, None, 10.0) for i in range(n))


def test_a_probe_frees_a_slot_on_a_full_account():
    """Five of five run and one has probably ended: one probe."""
    ledger = Ledger(lambda: 0.0)
    ledger.apply_snapshot(
        Snapshot("kling", (AccountCapacity("a", 5, 5, 0),), _running(5), 0.0, 0.0),
        ledger.tick(),
    )
    ledger.expect_freed({"a": 1})
    assert ledger.free("a") == 1


def test_a_probe_never_lets_an_account_above_its_local_cap():
    """max_jobs=3 and five run: one probably ended leaves four, still above the cap."""
    ledger = Ledger(lambda: 0.0, max_jobs=3)
    ledger.apply_snapshot(
        Snapshot("kling", (AccountCapacity("a", 10, 5, 5),), _running(5), 0.0, 0.0),
        ledger.tick(),
    )
    ledger.expect_freed({"a": 1})
    assert ledger.free("a") == 0


def test_a_probe_never_lets_an_account_above_the_servers_max_jobs():
    """maxJobs 3 and the server counts five: one ended leaves four, a sure 429."""
    ledger = Ledger(lambda: 0.0)
    ledger.apply_snapshot(
        Snapshot("kling", (AccountCapacity("a", 3, 5, 0),), _running(5), 0.0, 0.0),
        ledger.tick(),
    )
    ledger.expect_freed({"a": 1})
    assert ledger.free("a") == 0


def test_the_lag_floor_is_never_above_the_lag():
    """Both come from the same recent observations: an old, long lag leaves them together."""
    from capgate._policy import LAG_SAMPLES

    ledger = Ledger(lambda: 0.0)
    ledger._learn_lag(25.0, 20.0)
    for _ in range(LAG_SAMPLES):
        ledger._learn_lag(3.0, 2.0)
    assert ledger.lag == 3.0
    assert ledger.lag_floor == 2.0


# --- jobs a callback said ended ---------------------------------------------------------------


@pytest.fixture
def lagging(ledger: Ledger, clock: Clock) -> Ledger:
    """A ledger that has seen the counts lag (job-1 listed 16 s after its settle), at t=20."""
    _lagging_start(ledger, clock)
    clock.now = 20
    return ledger


def at(t: float, *rows: tuple[str, int, int], jobs: tuple[tuple[str, str], ...] = ()) -> Snapshot:
    return snap_at(t, *rows, jobs=jobs)


def test_an_ended_job_still_listed_frees_its_slot(lagging):
    """Counts that lag list a job after it ended: the callback's news frees its slot."""
    lagging.apply_snapshot(at(20, ("a", 1, 1), jobs=(("job-2", "a"),)), lagging.tick())
    assert lagging.free("a") == 0
    assert lagging.job_ended("job-2")
    assert lagging.free("a") == 1
    lagging.reserve("a")
    assert lagging.free("a") == 0


def test_an_ended_job_frees_its_slot_in_later_lagging_snapshots(lagging, clock):
    lagging.apply_snapshot(at(20, ("a", 1, 1), jobs=(("job-2", "a"),)), lagging.tick())
    lagging.job_ended("job-2")
    clock.now = 30
    lagging.apply_snapshot(at(30, ("a", 1, 1), jobs=(("job-2", "a"),)), lagging.tick())
    assert lagging.free("a") == 1


def test_an_ended_job_not_listed_yet_drops_its_reservation(lagging):
    """A job that ended before any snapshot listed it stops counting at once."""
    lagging.apply_snapshot(at(20, ("a", 1, 0)), lagging.tick())
    res = lagging.reserve("a")
    lagging.settle(res, "job-2")
    assert lagging.free("a") == 0
    assert lagging.job_ended("job-2")
    assert (lagging.free("a"), lagging.pending("a")) == (1, 0)


def test_an_unknown_job_ended_frees_nothing(lagging):
    lagging.apply_snapshot(at(20, ("a", 1, 1), jobs=(("job-2", "a"),)), lagging.tick())
    assert not lagging.job_ended("job-3")
    assert lagging.free("a") == 0


def test_news_of_an_end_counts_once(lagging):
    lagging.apply_snapshot(
        at(20, ("a", 2, 2), jobs=(("job-2", "a"), ("job-3", "a"))), lagging.tick()
    )
    assert lagging.job_ended("job-2")
    assert not lagging.job_ended("job-2")
    assert lagging.free("a") == 1


def test_an_ended_job_and_a_probe_on_it_are_not_counted_twice(lagging):
    """The forecast may already expect the same job to have ended: the larger of the two."""
    lagging.apply_snapshot(
        at(20, ("a", 2, 2), jobs=(("job-2", "a"), ("job-3", "a"))), lagging.tick()
    )
    lagging.expect_freed({"a": 1})
    lagging.job_ended("job-2")
    assert lagging.free("a") == 1


def test_an_ended_job_on_a_full_account_left_out_of_the_answer(clock):
    """useapi leaves full accounts out of ``available[]``; the listing names the account."""
    ledger = Ledger(clock, max_jobs=2)
    _lagging_start(ledger, clock)
    clock.now = 20
    ledger.apply_snapshot(at(20, jobs=(("job-2", "a"), ("job-3", "a"))), ledger.tick())
    assert ledger.free_accounts() == {}
    ledger.job_ended("job-2")
    assert ledger.free_accounts() == {"a": 1}


def test_before_any_lag_an_end_waits_for_the_poll(ledger):
    """With counts not seen to lag, the poll invalidate() asks for brings the news."""
    ledger.apply_snapshot(snap(("a", 1, 1), jobs=(("job-1", "a"),)), ledger.tick())
    assert not ledger.job_ended("job-1")
    assert ledger.free("a") == 0


def test_an_ended_job_no_longer_listed_frees_nothing_more(lagging, clock):
    """Once a snapshot stops listing the ended job, its slot is the snapshot's own again."""
    lagging.apply_snapshot(at(20, ("a", 1, 1), jobs=(("job-2", "a"),)), lagging.tick())
    assert lagging.job_ended("job-2")
    clock.now = 30
    lagging.apply_snapshot(at(30, ("a", 1, 1), jobs=(("job-3", "a"),)), lagging.tick())
    assert lagging.free("a") == 0


def test_a_callback_before_the_settle_drops_the_reservation_at_settle(lagging):
    """A job that failed at once may call back before its holder marks it submitted."""
    lagging.apply_snapshot(at(20, ("a", 1, 0)), lagging.tick())
    res = lagging.reserve("a")
    assert not lagging.job_ended("job-2")  # nothing counted it yet
    lagging.settle(res, "job-2")
    assert (lagging.free("a"), lagging.pending("a")) == (1, 0)


def test_a_job_listed_twice_frees_one_slot(lagging):
    jobs = (("job-2", "a"), ("job-2", "a"), ("job-3", "a"))
    lagging.apply_snapshot(at(20, ("a", 3, 3), jobs=jobs), lagging.tick())
    lagging.job_ended("job-2")
    lagging.apply_snapshot(at(25, ("a", 3, 3), jobs=jobs), lagging.tick())
    assert lagging.free("a") == 1


def test_news_of_ended_jobs_is_bounded(lagging):
    """The ledger keeps at most WATCH_MAX ended ids: the oldest news is forgotten first."""
    listed = tuple((f"job-{n}", "a") for n in range(2, 4))
    lagging.apply_snapshot(at(20, ("a", 2, 2), jobs=listed), lagging.tick())
    lagging.job_ended("job-2")
    for n in range(WATCH_MAX):
        lagging.job_ended(f"other-{n}")
    lagging.apply_snapshot(at(21, ("a", 2, 2), jobs=listed), lagging.tick())
    assert lagging.free("a") == 0  # job-2's news is gone
    lagging.job_ended("job-3")
    assert lagging.free("a") == 1


def test_expecting_more_says_so(lagging, clock):
    """expect_freed() is True when some account expects more than before (the core then
    runs a pass); a snapshot clears the expectation."""
    lagging.apply_snapshot(
        at(20, ("a", 2, 2), jobs=(("job-2", "a"), ("job-3", "a"))), lagging.tick()
    )
    assert lagging.expect_freed({"a": 1})
    assert not lagging.expect_freed({"a": 1})
    assert lagging.expect_freed({"a": 2})
    clock.now = 25
    lagging.apply_snapshot(
        at(25, ("a", 2, 2), jobs=(("job-2", "a"), ("job-3", "a"))), lagging.tick()
    )
    assert lagging.expect_freed({"a": 1})
