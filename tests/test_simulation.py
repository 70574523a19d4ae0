"""capgate.simulation: the virtual-time scenario runner the benchmarks and CLI share."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import trio
import trio.testing

from capgate.simulation import (
    DISPATCHERS,
    Losses,
    Scenario,
    SimulationResult,
    clairvoyant_unseen,
    run_scenario,
    simulate,
    slot_losses,
    unseen_delay,
)
from capgate.testing import FakeScheduler

SMALL = Scenario(name="small", accounts=(3, 2), jobs=30, duration=(30, 90), seed=7)


def test_capgate_small_scenario():
    """capgate on a small scenario: every job through, no 429, close to the oracle."""
    result = simulate(SMALL)
    assert result.dispatcher == "capgate"
    assert result.jobs == 30
    assert result.rejected_429 == 0
    assert result.oracle_makespan is not None
    assert result.makespan >= result.oracle_makespan >= result.ideal_makespan * 0.999
    assert result.makespan_ratio is not None
    assert result.makespan_ratio < 1.15
    assert 0.8 < result.utilisation <= 1.0
    # every poll is a request, and so is every create
    assert result.requests == result.polls + result.jobs


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_runs_repeat_exactly(dispatcher):
    """The same seed gives the same figures, timeline included, run after run."""
    first = simulate(SMALL, dispatcher, oracle=False)
    second = simulate(SMALL, dispatcher, oracle=False)
    assert first.to_dict() == second.to_dict()
    assert first.timeline == second.timeline


def test_every_dispatcher_sees_the_same_jobs():
    """All dispatchers run, get every job through, and the oracle bounds them."""
    results = {d: simulate(SMALL, d, oracle=False) for d in DISPATCHERS}
    oracle = results["oracle"]
    assert oracle.rejected_429 == 0
    assert oracle.requests == SMALL.jobs
    for name, result in results.items():
        assert result.jobs == SMALL.jobs, name
        assert result.makespan >= oracle.makespan - 1e-9, name
    assert results["retry-429"].rejected_429 > 0


def test_latency_with_outside_load_repeats():
    """Concurrent requests of equal latency still give the same figures run after run."""
    scenario = replace(SMALL, outside_jobs=40, latency=0.2)
    for dispatcher in ("capgate", "retry-429"):
        first = simulate(scenario, dispatcher, oracle=False)
        assert first.to_dict() == simulate(scenario, dispatcher, oracle=False).to_dict()


def test_callbacks_label_and_help():
    """Completion callbacks label the row and do not make capgate slower here."""
    plain = simulate(SMALL, oracle=False)
    woken = simulate(replace(SMALL, callbacks=True), oracle=False)
    assert woken.dispatcher == "capgate+callbacks"
    assert woken.makespan <= plain.makespan
    assert woken.rejected_429 == 0


def test_outside_load_and_lag_run():
    """Outside jobs start and are counted; lagging counts still get every job through."""
    loaded = simulate(replace(SMALL, outside_jobs=20), oracle=False)
    assert loaded.outside_started > 0
    lagging = simulate(replace(SMALL, lag=10.0), oracle=False)
    assert lagging.jobs == SMALL.jobs


def test_heavy_tail_and_arrivals():
    """Pareto durations stay within the cap; arrivals spread the waits out."""
    scenario = replace(SMALL, distribution="pareto", duration=(10, 600), arrival_window=300)
    durations = scenario.job_durations()
    assert min(durations) >= 10
    assert max(durations) <= 600
    arrivals = scenario.arrivals()
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] <= 300
    result = simulate(scenario, oracle=False)
    assert result.wait_mean >= 0


def test_result_row_and_timeline():
    """to_dict() is one flat JSON row; the timeline never exceeds any account's maxJobs."""
    result: SimulationResult = simulate(SMALL, oracle=False)
    row = json.loads(json.dumps(result.to_dict()))
    for key in (
        "scenario",
        "dispatcher",
        "makespan_ratio",
        "utilisation",
        "wait_p99",
        "rejected_429",
        "requests_per_job",
    ):
        assert key in row
    timeline = result.timeline
    assert len(timeline.times) == len(timeline.waiting)
    for account, counts in timeline.busy.items():
        assert max(counts) <= timeline.capacity[account]
    assert timeline.waiting[0] == SMALL.jobs - sum(b[0] for b in timeline.busy.values())
    assert all(0 <= u <= 1 for u in timeline.utilisation())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accounts": ()}, r"^accounts must be a non-empty sequence of maxJobs >= 1$"),
        ({"jobs": 0}, r"^jobs must be >= 1, got 0$"),
        (
            {"distribution": "normal"},
            r"^distribution must be 'uniform', 'pareto' or 'lognormal', got 'normal'$",
        ),
        ({"workers": 0}, r"^workers must be >= 1 or None, got 0$"),
        ({"medians": (60, 60, 60)}, r"^medians apply only to distribution='lognormal'$"),
        (
            {"distribution": "lognormal", "medians": (60, 60)},
            r"^medians must give one median > 0 per account \(3\), got \(60, 60\)$",
        ),
        (
            {"distribution": "lognormal", "medians": (60, 0, 60)},
            r"^medians must give one median > 0 per account \(3\), got \(60, 0, 60\)$",
        ),
        ({"sigma": -0.1}, r"^sigma must be >= 0, got -0.1$"),
        ({"bursts": -1}, r"^bursts must be a whole number >= 0, got -1$"),
        ({"bursts": 3}, r"^bursts > 1 need an arrival_window > 0 to spread them over$"),
        ({"callback_share": 1.5}, r"^callback_share must be within \[0, 1\], got 1.5$"),
    ],
)
def test_scenario_validation(kwargs, message):
    """A bad scenario is a ValueError with an exact message."""
    with pytest.raises(ValueError, match=message):
        Scenario(**kwargs)


def test_unknown_dispatcher():
    """An unknown dispatcher names the known ones."""
    with pytest.raises(ValueError, match=r"^unknown dispatcher 'fifo'; use one of capgate, "):
        simulate(SMALL, "fifo")


@pytest.mark.parametrize(
    "service",
    [
        "kling",
        "minimax",
        "pixverse",
        "tempolor",
        "dreamina",
        "mureka",
        "minimax-agent",
        "luma",
        "flowmusic",
        "google-flow",
    ],
)
def test_the_gate_runs_every_service(service):
    """capgate simulate --service NAME: every job goes through, no 429, at or above the oracle.

    Regression: the runner posted creates to ``…/jobs`` (404 on the newer services), took
    only 200 as created (Mureka answers 201), and gave no max_jobs= to the services whose
    cap is not published, which then refused to build (or assumed Mureka's 10).
    """
    result = simulate(Scenario(jobs=30, workers=10, service=service), "capgate")
    assert result.jobs == 30
    assert result.rejected_429 == 0
    # the oracle is a bound: a sync create (flowmusic, google-flow) held its slot twice there
    assert result.makespan_ratio is not None
    assert result.makespan_ratio >= 0.999


# --- issue 16: per-account durations, bursts, a share of callbacks, the loss split ------------

MODELS = Scenario(
    name="models",
    accounts=(3, 2),
    jobs=40,
    distribution="lognormal",
    medians=(20.0, 80.0),
    sigma=0.4,
    duration=(1.0, 10_000.0),  # wide enough that no draw is cut
    arrival_window=400.0,
    bursts=4,
    callbacks=True,
    callback_share=1 / 3,
    seed=3,
)


def _run_with_fake(scenario: Scenario, dispatcher: str) -> FakeScheduler:
    names = scenario.account_names
    fake = FakeScheduler(dict(zip(names, scenario.accounts, strict=True)), service="kling")

    async def main() -> None:
        await run_scenario(scenario, dispatcher, fake=fake)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return fake


@pytest.mark.parametrize("dispatcher", ["capgate", "oracle"])
def test_lognormal_duration_follows_the_account_it_lands_on(dispatcher):
    """Each job runs median[account] * exp(sigma * z) with its own z, wherever it lands."""
    fake = _run_with_fake(MODELS, dispatcher)
    index = {n: i for i, n in enumerate(MODELS.account_names)}
    seen = sorted(
        round(math.log((j.end - j.start) / MODELS.medians[index[j.account]]) / MODELS.sigma, 6)
        for j in fake.jobs.values()
    )
    assert seen == sorted(round(z, 6) for z in MODELS.job_normals())
    assert {j.account for j in fake.jobs.values()} == set(MODELS.account_names)


def test_lognormal_with_no_spread_runs_each_account_at_its_median():
    """sigma=0: every job on an account runs exactly that account's median."""
    scenario = replace(MODELS, sigma=0.0)
    fake = _run_with_fake(scenario, "oracle")
    for job in fake.jobs.values():
        median = dict(zip(scenario.account_names, scenario.medians or (), strict=True))
        assert job.end - job.start == pytest.approx(median[job.account], abs=1e-9)


def test_lognormal_ideal_makespan_is_a_lower_bound():
    """With per-account durations the ideal makespan uses the fastest account: a bound."""
    oracle = simulate(replace(MODELS, arrival_window=0.0, bursts=0), "oracle", oracle=False)
    assert oracle.ideal_makespan <= oracle.makespan


def test_lognormal_runs_repeat_exactly():
    """A seed gives the same figures for per-account durations, bursts and callbacks."""
    for dispatcher in ("capgate", "retry-429", "oracle"):
        first = simulate(MODELS, dispatcher, oracle=False)
        assert first.to_dict() == simulate(MODELS, dispatcher, oracle=False).to_dict()


def test_bursts_arrive_together_at_seeded_instants():
    """N bursts: N arrival instants, the first at 0, all in the window, jobs a µs apart."""
    arrivals = MODELS.arrivals()
    assert arrivals == sorted(arrivals)
    assert len(set(arrivals)) == len(arrivals)  # distinct instants keep wake-ups ordered
    bursts = sorted({round(a, 3) for a in arrivals})
    assert len(bursts) == MODELS.bursts
    assert bursts[0] == 0.0
    assert bursts[-1] <= MODELS.arrival_window
    assert arrivals == replace(MODELS, callbacks=False).arrivals()


def test_callback_share_picks_a_seeded_share_of_jobs():
    """callback_share picks round(share * jobs) jobs, the same ones for a seed."""
    chosen = MODELS.callback_jobs()
    assert len(chosen) == round(MODELS.jobs / 3)
    assert chosen == replace(MODELS, sigma=0.1).callback_jobs()
    assert chosen != replace(MODELS, seed=4).callback_jobs()
    assert replace(MODELS, callback_share=1.0).callback_jobs() == frozenset(range(MODELS.jobs))


def test_callback_share_zero_is_no_callbacks():
    """Callbacks on no job give the figures of a run without callbacks."""
    silent = simulate(replace(SMALL, callbacks=True, callback_share=0.0), oracle=False)
    plain = simulate(SMALL, oracle=False)
    assert silent.makespan == plain.makespan
    assert silent.requests == plain.requests


def test_poll_instants_are_recorded():
    """Every capacity answer's instant is kept: one per poll, ascending, within the run."""
    result = simulate(SMALL, oracle=False)
    assert len(result.poll_times) == result.polls
    assert list(result.poll_times) == sorted(result.poll_times)
    assert 0 <= result.poll_times[0] <= result.poll_times[-1] <= result.makespan
    assert simulate(SMALL, "retry-429", oracle=False).poll_times == ()


def test_losses_by_hand():
    """A slot freed at 10 with 3 s of lag, polls at 12 and 16, a job waiting 5-17: 3/3/1."""
    losses = slot_losses(
        {"a": 1},
        [("a", 0.0, 10.0), ("a", 17.0, 20.0)],
        [(0.0, 0.0), (5.0, 17.0)],
        [0.0, 12.0, 16.0],
        lag=3.0,
        until=20.0,
    )
    assert losses == Losses(unseen=3.0, unused=1.0, lag=3.0)
    assert losses.total == 7.0


def test_a_slot_taken_before_any_poll_showed_it_stops_counting():
    """A callback's news (or a probe) lets a job take a slot freed at 10 at 12, before the
    poll at 15: only 10-12 is lost, though a third job waits on to 20."""
    losses = slot_losses(
        {"a": 1},
        [("a", 0.0, 10.0), ("a", 12.0, 20.0)],
        [(0.0, 0.0), (5.0, 12.0), (5.0, 20.0)],
        [0.0, 15.0],
        until=20.0,
    )
    assert losses == Losses(unseen=2.0)


def test_losses_count_only_while_a_job_waits():
    """Free slot-time with nobody waiting is no loss; one waiter is one slot's worth."""
    runs = [("a", 0.0, 4.0), ("a", 0.0, 8.0)]
    # two slots free from 4 and 8; one job waits from 2 to 10, the first poll after is at 6
    losses = slot_losses({"a": 2}, runs, [(2.0, 10.0)], [0.0, 6.0, 12.0], until=10.0)
    assert losses == Losses(unseen=2.0, unused=4.0, lag=0.0)
    assert slot_losses({"a": 2}, runs, [], [0.0], until=10.0) == Losses()


def test_losses_of_a_dispatcher_that_sees_at_once_are_all_unused():
    """polls=None (the oracle): a free slot is seen the instant it frees."""
    losses = slot_losses({"a": 1}, [("a", 0.0, 5.0)], [(3.0, 6.0)], None, lag=9.0, until=6.0)
    assert losses == Losses(unused=1.0)


def test_capgate_losses_explain_its_gap():
    """On SMALL, capgate's lost slot-seconds are freed-but-unseen, and callbacks cut them."""
    plain = simulate(SMALL)
    woken = simulate(replace(SMALL, callbacks=True))
    assert plain.losses.lag == 0.0
    assert plain.losses.unseen > 0
    assert woken.losses.unseen < plain.losses.unseen
    assert simulate(SMALL, "oracle", oracle=False).losses == Losses()


def test_oracle_waits_for_a_faster_account_when_it_ends_sooner():
    """Per-account durations: the oracle's second job waits 10 s for the 10 s account."""
    scenario = Scenario(
        accounts=(1, 1),
        jobs=2,
        distribution="lognormal",
        medians=(10.0, 1000.0),
        sigma=0.0,
        duration=(1.0, 2000.0),
    )
    assert simulate(scenario, "oracle", oracle=False).makespan == pytest.approx(20.0)


def test_clairvoyant_polls_by_hand():
    """Slots shown at 0, 1 and 10, polls 5 s apart: poll at 1 and 10, 1 s lost in all."""
    assert clairvoyant_unseen([0.0, 1.0, 10.0], 5.0) == 1.0
    assert unseen_delay([0.0, 1.0, 10.0], [1.0, 10.0]) == 1.0
    assert unseen_delay([0.0, 1.0, 10.0], [0.0, 5.0, 10.0]) == 4.0


def test_clairvoyant_bound_beats_regular_polls():
    """On a real run's instants, the clairvoyant schedule beats polls every poll_interval."""
    result = simulate(SMALL, oracle=False)
    shown = result.losses.shown
    assert shown
    bound = clairvoyant_unseen(shown, SMALL.poll_interval)
    for offset in (0.0, 1.0, 2.5, 4.0):
        regular = [offset + k * SMALL.poll_interval for k in range(int(result.makespan / 5) + 2)]
        assert 0 <= bound <= unseen_delay(shown, regular)


def test_callbacks_naming_their_jobs_beat_counts_that_lag():
    """With counts 15 s behind, callbacks that name the ended job (``invalidate(job_id)``)
    hand the slot on before useapi stops listing the job: sooner, with fewer polls."""
    lagging = replace(SMALL, lag=15.0)
    without = simulate(lagging, oracle=False)
    with_callbacks = simulate(replace(lagging, callbacks=True), oracle=False)
    assert with_callbacks.makespan < without.makespan - 15.0
    assert with_callbacks.polls < without.polls
    # the same order of 429s (those before the lag is learnt, and probes'): a slot freed
    # twice by the news would bring them by the hundred
    assert with_callbacks.rejected_429 <= 2 * without.rejected_429
