"""The virtual-time scenario of issue 2: three accounts, 200 jobs, nothing oversubscribed.

Accounts with maxJobs 5, 3 and 2; 200 jobs of 30 to 120 s all queued at once; a gate polling
every 5 s. On trio's autojump clock the ~25 virtual minutes take well under a second.
"""

from __future__ import annotations

import random

import anyio
import pytest

from capgate.testing import FakeJob, FakeScheduler

pytestmark = [pytest.mark.anyio, pytest.mark.trio_only]

ACCOUNTS = {"a@x.io": 5, "b@x.io": 3, "c@x.io": 2}
CAPACITY = sum(ACCOUNTS.values())
POLL_INTERVAL = 5.0


@pytest.fixture
async def scenario(make_gate):
    """Run the scenario once; return the fake, the gate and the jobs it created."""
    fake = FakeScheduler(ACCOUNTS)
    gate, _ = make_gate(fake, poll_interval=POLL_INTERVAL)
    rng = random.Random(2)
    durations = [rng.uniform(30, 120) for _ in range(200)]
    jobs: list[FakeJob] = []
    start = anyio.current_time()

    async def worker(duration: float) -> None:
        async with gate.slot() as slot:
            job = await fake.create(slot.account, duration=duration)
            slot.mark_submitted(job.job_id)
            jobs.append(job)

    async with anyio.create_task_group() as tg:
        for duration in durations:
            tg.start_soon(worker, duration)
    makespan = max(j.end for j in jobs) - start
    return fake, gate, jobs, makespan, sum(durations)


async def test_every_job_runs(scenario):
    """All 200 jobs were created."""
    fake, _, jobs, _, _ = scenario
    assert len(jobs) == 200
    assert fake.creates == 200


async def test_zero_429s(scenario):
    """No create was refused: the gate never oversubscribed an account."""
    fake, *_ = scenario
    assert fake.rejected_429 == 0
    assert all(fake.peak[a] <= m for a, m in ACCOUNTS.items())


async def test_utilisation_at_least_90_percent(scenario):
    """Busy slot-seconds over capacity x makespan is at least 90 %."""
    _, _, _, makespan, work = scenario
    assert work / (CAPACITY * makespan) >= 0.90


async def test_polls_close_to_makespan_over_interval(scenario):
    """One poll per poll_interval (plus its 0-10 % jitter) while jobs wait; none after."""
    fake, gate, jobs, makespan, _ = scenario
    waiting_until = max(j.start for j in jobs)  # the last grant: nobody waits after it
    assert fake.polls <= makespan / POLL_INTERVAL
    assert (
        waiting_until / (POLL_INTERVAL * 1.1) - 3 <= fake.polls <= waiting_until / POLL_INTERVAL + 3
    )
    assert max(fake.poll_times) <= waiting_until
    assert gate.statistics().polls_failed == 0
