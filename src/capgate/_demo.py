"""``capgate demo``: a scenario through a real gate, over real loopback HTTP, shown live.

The simulator runs as a real HTTP server (uvicorn, in a thread, on a random free port of
127.0.0.1: :func:`capgate.testing.serve`). A real :class:`~capgate.CapacityGate` polls it
over HTTP, and workers push a :class:`capgate.simulation.Scenario`'s jobs through the gate
the way user code does::

    async with gate.slot() as slot:
        response = await client.post(create_url, json={"email": slot.account, ...})
        slot.mark_submitted(response.json()["jobId"])

The bars show each account's busy slots from the simulator's *true* state, not from what
the gate believes, so an oversubscription would show as a bar past its ``maxJobs``. The
figures at the end follow :class:`capgate.simulation.SimulationResult`'s definitions, so
the demo and ``capgate simulate`` read alike.

The loop is written out here rather than taken from :func:`capgate.simulation.run_scenario`
because the display needs the gate itself (its waiting count) and because showing the
``gate.slot()`` pattern is the point. Needs the ``cli`` extra (rich, uvicorn).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import httpx

from ._gate import CapacityGate
from .simulation import Scenario, SimulationResult, Timeline
from .testing import FakeJob, FakeScheduler, serve

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["DEMO_SCENARIO", "DemoOutcome", "run_demo"]

#: The default ``capgate simulate`` scenario played 50 times faster: 30-120 s jobs become
#: 0.6-2.4 s and the 5 s poll interval becomes 0.1 s, so 120 jobs end in about 20 s.
DEMO_SCENARIO = Scenario(
    name="demo",
    accounts=(5, 3, 2),
    jobs=120,
    workers=40,
    duration=(0.6, 2.4),
    poll_interval=0.1,
)

#: How often the display redraws, and samples the timeline (seconds).
REFRESH = 0.1


def _read_jobs(fake: FakeScheduler) -> list[FakeJob]:
    """The fake's jobs, read from another thread than the server's.

    ``list()`` of a dict's values runs in C without giving up the GIL, so it sees a whole
    dict; the retry covers interpreters where that does not hold.
    """
    for _ in range(100):
        try:
            return list(fake.jobs.values())
        except RuntimeError:  # pragma: no cover - the dict changed size while copying
            continue
    return []  # pragma: no cover


@dataclass(frozen=True)
class DemoOutcome:
    """What :func:`run_demo` measured.

    Attributes:
        result: The figures, as :class:`~capgate.simulation.SimulationResult` defines them
            (``oracle_makespan`` is ``None``; the timeline holds the display's samples).
        peak: The most jobs that ever ran at once on each account (the simulator's exact
            count, not a sample).
        busy_share: Each account's busy slot-seconds over ``maxJobs * makespan``, exact.
    """

    result: SimulationResult
    peak: dict[str, int]
    busy_share: dict[str, float]


@dataclass
class _Run:
    """What the display and the summary read while the demo runs (internal)."""

    scenario: Scenario
    fake: FakeScheduler
    gate: CapacityGate
    t0: float
    ours: set[str] = field(default_factory=set)
    waits: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    busy: dict[str, list[int]] = field(default_factory=dict)
    waiting: list[int] = field(default_factory=list)

    def sample(self) -> tuple[dict[str, int], int, int]:
        """Busy slots per account (true state), jobs done, workers waiting; recorded."""
        # the server thread's clock and ours are both time.monotonic() (asyncio's loop.time)
        now = anyio.current_time()
        busy = dict.fromkeys(self.scenario.account_names, 0)
        done = 0
        for job in _read_jobs(self.fake):
            if job.start <= now < job.end:
                busy[job.account] = busy.get(job.account, 0) + 1
            elif job.end <= now and job.job_id in self.ours:
                done += 1
        waiting = self.gate.statistics().waiting
        self.times.append(now - self.t0)
        for account, n in busy.items():
            self.busy.setdefault(account, []).append(n)
        self.waiting.append(waiting)
        return busy, done, waiting

    def busy_share(self, makespan: float) -> dict[str, float]:
        busy = dict.fromkeys(self.scenario.account_names, 0.0)
        for job in _read_jobs(self.fake):
            if job.job_id in self.ours:
                busy[job.account] += job.end - job.start
        caps = dict(zip(self.scenario.account_names, self.scenario.accounts, strict=True))
        return {a: b / (caps[a] * makespan) if makespan > 0 else 0.0 for a, b in busy.items()}

    def result(self) -> SimulationResult:
        scenario = self.scenario
        jobs = [j for j in _read_jobs(self.fake) if j.job_id in self.ours]
        makespan = max((j.end for j in jobs), default=self.t0) - self.t0
        work = sum(j.end - j.start for j in jobs)
        waits = sorted(self.waits) or [0.0]
        rank = max(0, math.ceil(0.99 * len(waits)) - 1)
        names = scenario.account_names
        return SimulationResult(
            scenario=scenario,
            dispatcher="capgate",
            jobs=len(jobs),
            makespan=makespan,
            oracle_makespan=None,
            ideal_makespan=scenario.ideal_makespan(),
            utilisation=work / (scenario.capacity * makespan) if makespan > 0 else math.nan,
            wait_mean=sum(waits) / len(waits),
            wait_p99=waits[rank],
            wait_max=waits[-1],
            polls=self.fake.polls,
            requests=self.fake.requests,
            rejected_429=self.fake.rejected_429,
            outside_started=0,
            timeline=Timeline(
                times=tuple(self.times),
                busy={a: tuple(self.busy.get(a, ())) for a in names},
                outside={a: (0,) * len(self.times) for a in names},
                capacity=dict(zip(names, scenario.accounts, strict=True)),
                waiting=tuple(self.waiting),
            ),
        )


def _render(run: _Run) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    scenario, fake = run.scenario, run.fake
    busy, done, waiting = run.sample()
    bars = Table.grid(padding=(0, 2))
    bars.add_column(no_wrap=True)
    bars.add_column(width=30)
    bars.add_column(no_wrap=True)
    for account, max_jobs in zip(scenario.account_names, scenario.accounts, strict=True):
        n = busy.get(account, 0)
        over = n > max_jobs
        bars.add_row(
            account,
            ProgressBar(
                total=max_jobs,
                completed=min(n, max_jobs),
                width=30,
                complete_style="red" if over else "green",
            ),
            Text(f"{n}/{max_jobs} slots busy", style="bold red" if over else ""),
        )
    bars.add_row("")
    bars.add_row(
        Text("jobs done", style="bold"),
        ProgressBar(total=scenario.jobs, completed=done, width=30),
        f"{done}/{scenario.jobs}",
    )
    rejected = fake.rejected_429
    line = Text.assemble(
        ("waiting workers ", "dim"),
        (f"{waiting:<4}", "bold"),
        ("  polls ", "dim"),
        (f"{fake.polls:<5}", "bold"),
        ("  429s ", "dim"),
        (f"{rejected:<3}", "bold red" if rejected else "bold green"),
        ("  elapsed ", "dim"),
        (f"{anyio.current_time() - run.t0:.1f} s", "bold"),
    )
    low, high = scenario.duration
    about = Text(
        f"{scenario.jobs} jobs of {low:g}-{high:g} s, {scenario.workers or scenario.jobs} "
        f"workers, {scenario.capacity} slots on {len(scenario.accounts)} accounts, "
        f"poll every {scenario.poll_interval:g} s",
        style="dim",
    )
    return Panel(
        Group(about, Text(""), bars, Text(""), line),
        title="capgate demo",
        title_align="left",
        expand=False,
    )


async def run_demo(
    scenario: Scenario,
    console: Console,
    *,
    on_url: Callable[[str], None] | None = None,
) -> DemoOutcome:
    """Serve a fake on loopback, run ``scenario`` through a gate over HTTP, show it live.

    Args:
        scenario: What to run, in real seconds (keep the durations short).
        console: Where the live display goes.
        on_url: Called with the simulator's scheduler URL once it listens.

    Returns:
        The figures, measured on the simulator's true state.
    """
    from rich.live import Live

    names = scenario.account_names
    fake = FakeScheduler(
        dict(zip(names, scenario.accounts, strict=True)),
        service=scenario.service,
        job_duration=scenario.duration,
        seed=scenario.seed,
    )
    durations = iter(scenario.job_durations())
    workers = scenario.workers or scenario.jobs
    with serve(fake) as url:
        if on_url is not None:
            on_url(url)
        create_url = httpx.URL(url).copy_with(path=httpx.URL(fake.create_url).path)
        headers = {"Authorization": f"Bearer {fake.token}"}
        key = fake.spec.account_key
        limits = httpx.Limits(max_connections=workers + 4)
        async with httpx.AsyncClient(limits=limits, timeout=10.0) as client:
            gate = CapacityGate(
                fake.token,
                service=scenario.service,
                url=url,
                client=client,
                poll_interval=scenario.poll_interval,
            )
            run = _Run(scenario, fake, gate, anyio.current_time())

            async def worker() -> None:
                for duration in durations:  # one shared iterator: each job goes to one worker
                    while True:
                        async with gate.slot() as slot:
                            run.waits.append(slot.waited)
                            # the scenario's running time: the fake's own control header
                            timed = {**headers, fake.RUNTIME_HEADER: repr(duration)}
                            body = {key: slot.account}
                            response = await client.post(create_url, json=body, headers=timed)
                            if response.status_code == 429:  # the gate should prevent this
                                slot.mark_busy()
                                continue
                            response.raise_for_status()
                            job_id = fake.spec.job_id_from(response.json())
                            if job_id is None:
                                raise RuntimeError(f"no job id in {response.text}")
                            slot.mark_submitted(job_id)
                            run.ours.add(str(job_id))
                            break

            with Live(_render(run), console=console, auto_refresh=False) as live:

                async def refresh() -> None:
                    while True:
                        await anyio.sleep(REFRESH)
                        live.update(_render(run), refresh=True)

                try:
                    async with anyio.create_task_group() as display:
                        display.start_soon(refresh)
                        async with anyio.create_task_group() as tg:
                            for _ in range(workers):
                                tg.start_soon(worker)
                        # every job is created; show them running out
                        await anyio.sleep(max(0.0, _last_end(run) - anyio.current_time()))
                        display.cancel_scope.cancel()
                finally:
                    live.update(_render(run), refresh=True)
                    await gate.aclose()
    result = run.result()
    return DemoOutcome(result, dict(fake.peak), run.busy_share(result.makespan))


def _last_end(run: _Run) -> float:
    """When the last of the demo's jobs ends, on the shared monotonic clock."""
    return max((j.end for j in _read_jobs(run.fake) if j.job_id in run.ours), default=0.0)
