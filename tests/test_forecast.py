"""The forecast: durations learnt from the snapshots, and when the next poll should go."""

from __future__ import annotations

import math

import pytest

from capgate import AccountCapacity, ExecutingJob, Snapshot
from capgate._engine.forecast import (
    DEFER_SAMPLES,
    MAX_DEFER,
    MIN_SAMPLES,
    PROBE_RECHECK,
    Durations,
    Forecast,
    _surely_at_least,
)
from capgate._engine.ledger import Ledger


def snap(at: float, *jobs: tuple[str, str, float], skipped: int = 0) -> Snapshot:
    """A snapshot requested at ``at`` listing ``(job id, account, elapsed seconds)``."""
    executing = tuple(
        ExecutingJob(job_id, account, None, f"{int(e) // 60:02d}:{int(e) % 60:02d}", e)
        for job_id, account, e in jobs
    )
    rows = (AccountCapacity("a", 5, len(executing), 5 - len(executing)),)
    return Snapshot("kling", rows, executing, at, at, skipped)


def learnt(durations: list[float], account: str = "a", gap: float = 5.0) -> Forecast:
    """A forecast that saw one job per duration start at 0 and end, polled every ``gap``."""
    forecast = Forecast()
    at = 0.0
    ends = sorted(durations)
    jobs = {f"old-{i}": d for i, d in enumerate(ends)}
    while jobs:
        listed = [(j, account, at) for j, d in jobs.items() if d > at]
        forecast.observe(snap(at, *listed))
        jobs = {j: d for j, d in jobs.items() if d > at}
        at += gap
    forecast.observe(snap(at))
    return forecast


# --- durations ------------------------------------------------------------------------------


def test_durations_cdf_runs_from_zero_to_one_over_the_ends_seen():
    """Ends at 10, 20 and 30 s: little below 10 (a few samples rarely hold the shortest
    jobs, so not nothing), everything by 30, about half by 20."""
    durations = Durations(10)
    for end in (10, 20, 30):
        durations.add(end, end)
    assert durations.cdf(0) == 0.0
    assert 0 < durations.cdf(5) < 1 / 3
    assert durations.cdf(30) == pytest.approx(1.0)
    assert 0.5 < durations.cdf(20) < 0.8


def test_running_jobs_keep_the_durations_from_looking_short():
    """Two short jobs ended, and eight still run older than them: Kaplan-Meier does not
    call the short ones typical."""
    naive = Durations(10)
    censored = Durations(10)
    for d in (naive, censored):
        d.add(10, 10)
        d.add(20, 20)
    censored.running([25.0] * 8)
    assert naive.cdf(20) == pytest.approx(1.0)
    assert censored.cdf(20) < 0.3


def test_durations_cover_only_ages_below_the_longest_end():
    """A job older than any job seen to end is beyond what the durations know."""
    durations = Durations(10)
    durations.add(40, 45)
    assert durations.covers(30)
    assert not durations.covers(50)


def test_surely_at_least_is_a_poisson_binomial_tail():
    """Two events of 0.95 each: both with 0.9025, at least one with 0.9975."""
    assert _surely_at_least([0.95, 0.95], 0.9) == 2
    assert _surely_at_least([0.95, 0.95], 0.95) == 1
    assert _surely_at_least([0.5], 0.9) == 0


# --- learning -----------------------------------------------------------------------------


def test_a_job_that_drops_off_teaches_its_duration_per_account():
    """Listed at 0 s old and at 50 s, gone at 55 s: it ran between 50 and 55 s."""
    forecast = Forecast()
    forecast.observe(snap(0, ("j1", "a", 0)))
    forecast.observe(snap(50, ("j1", "a", 50)))
    forecast.observe(snap(55))
    durations = forecast._by_account["a"]
    assert len(durations) == 1
    assert 50 <= durations.median() <= 56


def _taught(ends: dict[str, list[float]]) -> Forecast:
    forecast = Forecast()
    for account, durations in ends.items():
        for d in durations:
            forecast._learn(account, d, d)
    return forecast


def test_accounts_alike_but_for_chance_get_alike_medians():
    """Five jobs each from one spread of 30-120 s: raw medians of 50 and 100 s, which would
    make one account "twice as fast"; the samples do not show a difference beyond chance."""
    forecast = _taught({"a": [30, 40, 50, 100, 110], "b": [40, 90, 100, 110, 120]})
    typical = forecast.typical()
    assert typical["a"] / typical["b"] > 0.9


def test_accounts_running_models_apart_keep_their_difference():
    """Jobs of about 45 s on one account and about 180 s on the other: told apart, by
    their ratio, and each weighed above its middle (a long job is what sets the end)."""
    forecast = _taught({"a": [40, 44, 45, 47, 52], "b": [150, 170, 180, 190, 220]})
    typical = forecast.typical()
    assert typical["a"] / typical["b"] == pytest.approx(45 / 180, rel=0.1)
    assert 45 < typical["a"] < 60


def test_a_snapshot_with_skipped_rows_teaches_no_end():
    """A job missing from an answer that left rows out may still run."""
    forecast = Forecast()
    forecast.observe(snap(0, ("j1", "a", 0)))
    forecast.observe(snap(5, skipped=1))
    assert "a" not in forecast._by_account


def test_an_older_snapshot_is_ignored():
    """An answer older than the latest teaches nothing (its absences are stale)."""
    forecast = Forecast()
    forecast.observe(snap(10, ("j1", "a", 10)))
    forecast.observe(snap(5))
    assert "a" not in forecast._by_account


def test_residual_is_the_mean_time_left_within_the_ends_seen():
    """Ends spread evenly over 0-100 s: a job 50 s old has about 25 s left on average; one
    older than the longest end seen has no guess (inf)."""
    durations = Durations(200)
    for end in range(1, 101):
        durations.add(end, end)
    assert durations.residual(50) == pytest.approx(25, abs=1)
    assert durations.residual(0) == pytest.approx(50, abs=1.5)
    assert durations.residual(150) == math.inf


def test_expected_ends_place_each_listed_job_on_the_clock():
    """Jobs of 60 s: one listed 50 s old at t = 1000 is expected to end about t = 1010;
    an account with no durations to go by is left out."""
    forecast = learnt([60.0] * MIN_SAMPLES * 2, gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 50)))
    ends = forecast.expected_ends()
    assert list(ends) == ["a"]
    assert ends["a"] == [pytest.approx(1010, abs=2)]


def test_median_duration_and_next_completion_in_the_outlook():
    """Jobs of 60 s: one listed 50 s old is expected to end about 10 s on."""
    forecast = learnt([60.0] * MIN_SAMPLES * 2, gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 50)))
    outlook = forecast.outlook("a", 1000)
    assert outlook.median_duration == pytest.approx(60, abs=3)
    assert outlook.next_completion is not None
    assert 5 <= outlook.next_completion <= 15


# --- when to poll -------------------------------------------------------------------------


def test_no_history_polls_at_the_floor():
    """Fewer than MIN_SAMPLES durations: the gate polls as it always did."""
    forecast = learnt([60.0] * (MIN_SAMPLES - 1))
    forecast.observe(snap(1000, ("new", "a", 10)))
    assert forecast.next_poll(floor=1005, interval=5) == 1005


def test_too_few_durations_to_rule_an_end_out_keep_the_floor():
    """Putting a poll off claims nothing ends before: it takes DEFER_SAMPLES durations."""
    forecast = learnt([100.0 + i for i in range(DEFER_SAMPLES - 1)])
    forecast.observe(snap(1000, ("new", "a", 10)))
    assert forecast.next_poll(floor=1005, interval=5) == 1005


def test_nothing_likely_to_free_puts_the_poll_off_at_most_max_defer():
    """Every job ran 100-110 s and the one running is 10 s old: nothing frees soon."""
    forecast = learnt([100 + i % 10 for i in range(DEFER_SAMPLES + 4)])
    forecast.observe(snap(1000, ("new", "a", 10)))
    planned = forecast.next_poll(floor=1005, interval=5)
    assert planned > 1005
    assert planned <= 1005 + MAX_DEFER * 5


def test_a_poll_put_off_lands_just_past_the_likely_end():
    """Jobs of 60 s, one 35 s old at 1000: it ends at about 1025. The poll is put off from
    the floor (1005), and lands just after that end, not just before it."""
    forecast = learnt([60.0] * (DEFER_SAMPLES + 4), gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 35)))
    planned = forecast.next_poll(floor=1005, interval=5)
    assert 1024 <= planned <= 1028


def test_completions_spread_evenly_keep_the_floor():
    """Many jobs of every age: something frees all the time, so polls stay an interval
    apart."""
    forecast = learnt([float(d) for d in range(30, 121, 3)])
    ages = [(f"n{i}", "a", float(a)) for i, a in enumerate(range(0, 120, 4))]
    forecast.observe(snap(1000, *ages))
    assert forecast.next_poll(floor=1005, interval=5) == 1005


def test_a_job_older_than_any_seen_to_end_keeps_the_floor():
    """Beyond what was seen the forecast has no guess: the gate polls as it always did."""
    forecast = learnt([60.0] * 10)
    forecast.observe(snap(1000, ("old", "a", 200)))
    assert forecast.next_poll(floor=1005, interval=5) == 1005


# --- counts that lag ----------------------------------------------------------------------


def test_with_counts_that_lag_a_job_past_its_end_is_probably_freed():
    """Jobs of 60 s; the counts lag 15 s and show one 55 s old: it has ended by now."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 55)))
    freed, _ = forecast.probably_freed(1000, lag=15)
    assert freed == {"a": 1}


def test_without_lag_nothing_is_probed():
    """Counts that do not lag need no guess: what they show is what is."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 59)))
    assert forecast.probably_freed(1000, lag=0) == ({}, math.inf)


def test_a_young_job_is_not_probed_and_is_looked_at_again_soon():
    """A job 10 s old of 60 s ones has not ended 15 s on: no probe, but a recheck."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(1000, ("new", "a", 10)))
    freed, recheck = forecast.probably_freed(1000, lag=15)
    assert freed == {}
    assert 1000 < recheck < math.inf


def test_jobs_still_running_count_as_evidence_of_long_durations():
    """Six jobs ended at about 10 s, while twenty started with them still run at 60 s:
    a job 3 s old is not taken as ended 15 s on (the short ones were the first to end,
    not the typical ones)."""
    forecast = Forecast()
    short = [(f"s{i}", "a", 0.0) for i in range(6)]
    long = [(f"l{i}", "a", 0.0) for i in range(20)]
    forecast.observe(snap(0, *short, *long))
    forecast.observe(snap(10, *[(j, a, 10.0) for j, a, _ in short + long]))
    forecast.observe(snap(11, *[(j, a, 11.0) for j, a, _ in long]))
    forecast.observe(snap(60, *[(j, a, 60.0) for j, a, _ in long], ("new", "a", 3)))
    freed, _ = forecast.probably_freed(60, lag=15)
    assert freed == {}


# --- in the gate ----------------------------------------------------------------------------


def test_predictable_jobs_are_polled_for_when_they_end_not_all_along():
    """One slot, jobs of 60 s: once their length is learnt, a waiting gate polls around
    each end instead of every poll_interval, and finishes as soon."""
    from capgate.simulation import Scenario, simulate

    scenario = Scenario(accounts=(1,), jobs=80, duration=(60.0, 61.0), seed=3)
    result = simulate(scenario, "capgate")
    every_interval = result.makespan / scenario.poll_interval  # polls without a forecast
    assert result.polls < 0.6 * every_interval
    assert result.makespan_ratio is not None
    assert result.makespan_ratio <= 1.1


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_invalidate_calls_off_a_poll_put_off_by_the_forecast(make_gate):
    """A waiter's next poll is put off while the running job is young; invalidate() (a
    job ended, says a webhook) brings it back to the floor at once."""
    import anyio
    import httpx

    gate, fake = make_gate({"a@x.io": 1}, job_duration=60.0, poll_interval=5.0)
    headers = {"Authorization": f"Bearer {fake.token}"}
    async with httpx.AsyncClient(transport=fake.transport()) as client:

        async def create(account: str) -> httpx.Response:
            return await client.post(
                fake.create_url, json={fake.spec.account_key: account}, headers=headers
            )

        for _ in range(DEFER_SAMPLES + 2):  # one at a time: each waits for the last to end
            assert (await gate.submit(create)).status_code == 200
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.submit, create)
            await anyio.sleep(6)  # the waiter polled once and saw a young job
            put_off = gate.statistics().next_poll_in
            gate.invalidate()
            called_off = gate.statistics().next_poll_in
    assert put_off is not None
    assert put_off > 10
    assert called_off is not None
    assert called_off <= 0.5


# --- odd inputs ---------------------------------------------------------------------------


def test_an_infinite_floor_is_answered_as_is():
    """A fleet whose store is down has no poll due (inf): nothing to plan, no error."""
    forecast = learnt([100 + i % 10 for i in range(DEFER_SAMPLES + 4)])
    forecast.observe(snap(1000, ("new", "a", 0)))
    assert forecast.next_poll(floor=math.inf, interval=5) == math.inf


def test_a_job_running_before_the_first_snapshot_with_no_elapsed_has_no_age():
    """Listed by the first snapshot with no elapsed, it was running for who knows how
    long: it is not given the midpoint of the next two polls as its start."""
    forecast = Forecast()
    job = ExecutingJob("j", "a", None, None, None)
    rows = (AccountCapacity("a", 5, 1, 4),)
    forecast.observe(Snapshot("kling", rows, (job,), 0.0, 0.0))
    forecast.observe(Snapshot("kling", rows, (job,), 10.0, 10.0))
    assert "j" not in forecast._jobs


def test_jobs_gone_behind_skipped_rows_are_let_go_in_time():
    """A service that always sends one malformed row: a job missing for longer than any
    poll gap is not followed forever (it teaches nothing either)."""
    forecast = Forecast()
    for k in range(200):  # every poll lists five new jobs; the old ones are gone
        jobs = [(f"j{k}-{i}", "a", 1.0) for i in range(5)]
        forecast.observe(snap(10.0 * k, *jobs, skipped=1))
    assert len(forecast._jobs) < 100
    assert "a" not in forecast._by_account


def test_a_slow_poll_interval_still_teaches_durations():
    """With polls a minute apart every end lies in a 60 s gap: still learnt."""
    forecast = Forecast(interval=60.0)
    at = 0.0
    jobs = {f"old-{i}": 300.0 + 7 * i for i in range(MIN_SAMPLES + 2)}
    while jobs:
        forecast.observe(snap(at, *[(j, "a", at) for j in jobs]))
        jobs = {j: d for j, d in jobs.items() if d > at}
        at += 60.0
    forecast.observe(snap(at))
    assert forecast.ready


def test_a_probe_is_on_the_account_the_latest_snapshot_lists_the_job_under():
    """A job id listed under b, then under c: the probe frees a slot on c."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(2000, ("x", "b", 50)))
    forecast.observe(snap(2005, ("x", "c", 55)))
    freed, _ = forecast.probably_freed(2005, lag=15)
    assert freed == {"c": 1}


def test_a_job_listed_twice_is_one_probe():
    """The same id twice in ``executing`` is one job holding one slot (as the ledger
    counts it): never two probes on a one-slot account."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(2000, ("x", "a", 55), ("x", "a", 55)))
    freed, _ = forecast.probably_freed(2000, lag=15)
    assert freed == {"a": 1}


def test_a_job_at_the_very_end_of_what_was_seen_is_no_probe_and_no_error():
    """A listed job whose age is where the durations reach 1 (but still within them)
    leaves no chance to divide by: it is passed over."""
    forecast = learnt([60.0] * 12, gap=1.0)
    forecast.observe(snap(100, ("x", "a", 55)))
    durations = forecast.durations("a")
    assert durations is not None
    longest = durations._curve()[0][-1]
    forecast._jobs["x"].start = 100 - (longest - 1e-12)  # a hair below it
    age = 100 - forecast._jobs["x"].start
    assert durations.covers(age)
    assert 1 - durations.cdf(age) <= 1e-9
    assert forecast.probably_freed(110, lag=15)[0] == {}  # and no ZeroDivisionError


def test_durations_near_the_float_limit_still_give_a_finite_typical():
    """No elapsed above a week gets in (parse_elapsed), but typical() must not overflow
    whatever it is fed."""
    forecast = _taught({"a": [1e300] * 5 + [1.0]})
    typical = forecast.typical()
    assert all(math.isfinite(v) for v in typical.values())


# --- counts that lag, in a gate -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.trio_only
async def test_a_probe_slot_goes_to_the_driver_at_once(make_gate, monkeypatch):
    """Counts that lag: when the forecast says a listed job has probably ended, the driver
    takes that slot in the same step, not a recheck later (seen by a review: 1 s late)."""
    import anyio

    free_from = 5.0
    monkeypatch.setattr(Forecast, "ready", property(lambda self: True))
    monkeypatch.setattr(Ledger, "lag_floor", property(lambda self: 2.0))

    def probably_freed(self: Forecast, now: float, lag: float) -> tuple[dict[str, int], float]:
        return ({"a@x.io": 1} if now >= free_from else {}), now + PROBE_RECHECK

    monkeypatch.setattr(Forecast, "probably_freed", probably_freed)
    gate, fake = make_gate({"a@x.io": 1}, poll_interval=3600)
    fake.add_outside_job("a@x.io", duration=3600)  # listed: full by the counts
    await gate.refresh()
    await anyio.sleep(free_from + 0.5 - anyio.current_time())
    arrived = anyio.current_time()
    async with gate.slot() as slot:
        assert slot.account == "a@x.io"
        assert anyio.current_time() == arrived
    assert gate.statistics().polls == 1


# --- a forecast that fails, in a gate --------------------------------------------------------


@pytest.mark.anyio
async def test_a_forecast_that_raises_costs_the_forecast_not_the_gate(make_gate, logs, monkeypatch):
    """A bug in the forecast (or an answer no check caught) is logged once per failure;
    the gate forgets what it learnt and grants, polls and answers statistics() as a gate
    with no history does."""

    def boom(self: Forecast, snapshot: Snapshot) -> bool:
        raise RuntimeError("forecast bug")

    monkeypatch.setattr(Forecast, "observe", boom)
    gate, _ = make_gate({"a@x.io": 2})
    async with gate.slot() as slot:
        assert slot.account == "a@x.io"
    stats = gate.statistics()
    assert stats.polls == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["capgate.forecast_failed"]


@pytest.mark.anyio
async def test_a_poll_that_crashes_is_an_error_for_refresh_not_a_new_poll(
    make_gate, logs, monkeypatch
):
    """A bug while an answer is applied: refresh() raises PollError after that one
    request, instead of taking it for an aborted poll and polling again at once."""
    from capgate import PollError
    from capgate._engine.local import MemoryStore

    async def broken(self: MemoryStore, *args: object) -> None:
        raise RuntimeError("store bug")

    monkeypatch.setattr(MemoryStore, "apply", broken)
    gate, fake = make_gate({"a@x.io": 2})
    with pytest.raises(PollError, match="RuntimeError"):
        await gate.refresh()
    assert fake.polls == 1
    assert "capgate.poll_crashed" in [e["event"] for e in logs]
