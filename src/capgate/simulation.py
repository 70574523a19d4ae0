"""Virtual-time scenarios: how well a dispatcher gets jobs through a set of accounts.

A :class:`Scenario` describes the accounts (their ``maxJobs``), the jobs (how many, how long,
when they arrive), the load from outside the gate, counts that lag, and whether completion
callbacks wake the gate. :func:`simulate` runs one dispatcher on it against a
:class:`~capgate.testing.FakeScheduler`, on trio's ``MockClock(autojump_threshold=0)``: hours
of scheduling take milliseconds and every figure is exact and reproducible for a seed::

    from capgate.simulation import Scenario, simulate

    result = simulate(Scenario(accounts=(5, 3, 2), jobs=200, duration=(30, 120)))
    print(result.makespan_ratio, result.utilisation, result.rejected_429)

Every dispatcher sees the same job list, the same arrival times and the same outside load
(all drawn from ``seed``), and speaks plain HTTP to the fake (every poll and every create is
one request), so their figures compare directly:

- ``capgate``: a :class:`~capgate.CapacityGate` with the scenario's ``poll_interval``, one
  task per worker, creating through ``gate.submit()`` (a 429 is retried on a fresh slot);
  with ``callbacks=True`` every job of ours that finishes calls ``gate.invalidate()``.
- ``retry-429``: submit to a random account; on 429 sleep 10 s and retry (useapi's scripts).
- ``poll-first``: poll before each submit, take the first listed account, sleep 20 s when
  none is free or the create answers 429; no local bookkeeping (useapi's MiniMax script).
- ``static-limiter``: an ``anyio.CapacityLimiter`` sized to the sum of ``maxJobs`` (a slot is
  held until the job ends), a random account, and 10 s of sleep on 429.
- ``oracle``: sees the service's true state and every completion the instant it happens, and
  starts the next job at once on the account with the most free slots. It is the bound the
  others are measured against (greedy in arrival order, so a bound on dispatch delay, not a
  proof of the optimal schedule).

A worker takes the next job, waits for a slot, creates the job and moves on: it does not wait
for the job to finish. ``workers=None`` gives one worker per job (every job waits at once).
trio is needed only here (``pip install trio``, or the ``test``/``bench`` extra) and is
imported when a simulation runs.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import anyio
import httpx

from ._errors import SubmissionFailed
from ._gate import CapacityGate
from .testing import FakeScheduler

__all__ = [
    "DISPATCHERS",
    "Losses",
    "Scenario",
    "SimulationResult",
    "Timeline",
    "clairvoyant_unseen",
    "run_scenario",
    "simulate",
    "slot_losses",
    "unseen_delay",
]

#: The dispatchers :func:`simulate` knows, in the order the benchmarks report them.
DISPATCHERS = ("capgate", "retry-429", "poll-first", "static-limiter", "oracle")

#: How long the naive dispatchers sleep: useapi's scripts sleep 10 s on 429 ...
RETRY_SLEEP = 10.0
#: ... and the MiniMax script 20 s when no account is listed as free.
POLL_FIRST_SLEEP = 20.0


@dataclass(frozen=True)
class Scenario:
    """A workload and the service it runs against.

    Attributes:
        name: A label for tables and plots.
        accounts: ``maxJobs`` of each account (accounts are named ``acct000@sim.test``…).
        jobs: How many jobs to get through.
        duration: ``(low, high)`` seconds a job runs.
        distribution: ``"uniform"`` over ``duration``; ``"pareto"``: ``low`` times a
            Pareto variate of shape ``pareto_alpha``, cut at ``high`` (heavy-tailed); or
            ``"lognormal"``: ``medians[account] * exp(sigma * z)``, cut to ``duration``,
            where ``z`` is a standard normal drawn per job, so a job's duration depends on
            the account it lands on (as different models on different accounts do).
        pareto_alpha: The Pareto shape (smaller is heavier; 1.5 has a mean of 3x ``low``).
        medians: With ``"lognormal"``: the median duration on each account, in the order of
            ``accounts``; ``None``: the geometric mean of ``duration`` on every account.
        sigma: With ``"lognormal"``: the spread of ``log(duration)``.
        seed: Seeds every random draw: durations, arrivals, outside load, choices, jitter.
        poll_interval: The gate's ``poll_interval``.
        workers: Concurrent submitting tasks; ``None`` for one per job.
        arrival_window: Jobs arrive over this many seconds (uniformly, or in ``bursts``);
            0: all at once.
        bursts: 0: arrivals spread uniformly over ``arrival_window``; N >= 1: jobs arrive in
            N bursts, the first at 0 and the others at seeded instants over the window, each
            job in a burst drawn at random (a person or a program submitting a batch).
        outside_jobs: Jobs started from outside the gate, on random accounts at random
            times, each only if its account has room then (a person on the provider's site).
        outside_window: Seconds over which outside jobs arrive; ``None``: the time the jobs
            would take at full use of every slot (total work / total ``maxJobs``).
        lag: The service's counts describe the state this many seconds ago.
        latency: Seconds every request takes; with outside load a slot can then be taken
            between a poll and the create that follows it.
        callbacks: Completion callbacks call ``gate.invalidate()`` (capgate only).
        callback_share: With ``callbacks``: the share of our jobs (chosen seeded) whose
            completion calls back; 1.0: every one.
        service: The useapi.net service whose field names the fake speaks.
    """

    name: str = "custom"
    accounts: tuple[int, ...] = (5, 3, 2)
    jobs: int = 200
    duration: tuple[float, float] = (30.0, 120.0)
    distribution: str = "uniform"
    pareto_alpha: float = 1.5
    medians: tuple[float, ...] | None = None
    sigma: float = 0.5
    seed: int = 0
    poll_interval: float = 5.0
    workers: int | None = None
    arrival_window: float = 0.0
    bursts: int = 0
    outside_jobs: int = 0
    outside_window: float | None = None
    lag: float = 0.0
    latency: float = 0.0
    callbacks: bool = False
    callback_share: float = 1.0
    service: str = "kling"

    def __post_init__(self) -> None:
        if not self.accounts or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.accounts
        ):
            raise ValueError("accounts must be a non-empty sequence of maxJobs >= 1")
        object.__setattr__(self, "accounts", tuple(self.accounts))
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        low, high = self.duration
        if not (0 < low <= high) or not math.isfinite(high):
            raise ValueError(
                f"duration must be (low, high) with 0 < low <= high, got {self.duration}"
            )
        object.__setattr__(self, "duration", (float(low), float(high)))
        if self.distribution not in ("uniform", "pareto", "lognormal"):
            raise ValueError(
                "distribution must be 'uniform', 'pareto' or 'lognormal', "
                f"got {self.distribution!r}"
            )
        if self.pareto_alpha <= 0:
            raise ValueError(f"pareto_alpha must be > 0, got {self.pareto_alpha}")
        if self.medians is not None:
            if self.distribution != "lognormal":
                raise ValueError("medians apply only to distribution='lognormal'")
            medians = tuple(float(m) for m in self.medians)
            if len(medians) != len(self.accounts) or not all(0 < m < math.inf for m in medians):
                raise ValueError(
                    f"medians must give one median > 0 per account ({len(self.accounts)}), "
                    f"got {self.medians}"
                )
            object.__setattr__(self, "medians", medians)
        if not (0 <= self.sigma < math.inf):
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {self.poll_interval}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1 or None, got {self.workers}")
        if min(self.arrival_window, self.outside_jobs, self.lag, self.latency) < 0:
            raise ValueError("arrival_window, outside_jobs, lag and latency must be >= 0")
        if isinstance(self.bursts, bool) or not isinstance(self.bursts, int) or self.bursts < 0:
            raise ValueError(f"bursts must be a whole number >= 0, got {self.bursts!r}")
        if self.bursts > 1 and self.arrival_window <= 0:
            raise ValueError("bursts > 1 need an arrival_window > 0 to spread them over")
        if not (0 <= self.callback_share <= 1):
            raise ValueError(f"callback_share must be within [0, 1], got {self.callback_share}")

    # --- what it draws (the same for every dispatcher) ----------------------------------

    @property
    def account_names(self) -> tuple[str, ...]:
        """The accounts' names, in order."""
        width = max(3, len(str(len(self.accounts) - 1)))
        return tuple(f"acct{i:0{width}d}@sim.test" for i in range(len(self.accounts)))

    @property
    def capacity(self) -> int:
        """The sum of ``maxJobs``."""
        return sum(self.accounts)

    @property
    def per_account(self) -> bool:
        """Whether a job's duration depends on the account it runs on (``"lognormal"``)."""
        return self.distribution == "lognormal"

    def median_on(self, account: int) -> float:
        """The median duration on account number ``account`` (``"lognormal"``)."""
        if self.medians is not None:
            return self.medians[account]
        low, high = self.duration
        return math.sqrt(low * high)

    def duration_on(self, account: int, z: float) -> float:
        """A ``"lognormal"`` duration: ``median_on(account) * exp(sigma * z)``, cut to
        ``duration``. ``z`` is the job's standard normal (:meth:`job_normals`)."""
        low, high = self.duration
        return min(high, max(low, self.median_on(account) * math.exp(self.sigma * z)))

    def _draw(self, rng: random.Random, account: int = 0) -> float:
        low, high = self.duration
        if self.distribution == "pareto":
            return min(high, low * rng.paretovariate(self.pareto_alpha))
        if self.distribution == "lognormal":
            return self.duration_on(account, rng.normalvariate(0.0, 1.0))
        return rng.uniform(low, high)

    def job_normals(self) -> list[float]:
        """Each job's standard normal ``z``, in arrival order (``"lognormal"``): the same for
        every dispatcher, so the job that runs on a slower account runs longer for all."""
        rng = random.Random(f"{self.seed}:durations")
        return [rng.normalvariate(0.0, 1.0) for _ in range(self.jobs)]

    def job_durations(self) -> list[float]:
        """Each job's duration in seconds, in arrival order.

        With ``"lognormal"`` durations depend on the account a job lands on, which is known
        only when it is created: this gives each job's duration on its fastest account,
        which keeps :meth:`ideal_makespan` a lower bound.
        """
        if self.per_account:
            fastest = min(range(len(self.accounts)), key=self.median_on)
            return [self.duration_on(fastest, z) for z in self.job_normals()]
        rng = random.Random(f"{self.seed}:durations")
        return [self._draw(rng) for _ in range(self.jobs)]

    def arrivals(self) -> list[float]:
        """Each job's arrival, in seconds from the start, ascending.

        In a burst the jobs arrive a microsecond apart, in job order: distinct instants keep
        the workers' wake-ups in one order from run to run (see ``_Nudge``).
        """
        if self.arrival_window <= 0:
            return [0.0] * self.jobs
        rng = random.Random(f"{self.seed}:arrivals")
        if self.bursts < 1:
            return sorted(rng.uniform(0, self.arrival_window) for _ in range(self.jobs))
        later = sorted(rng.uniform(0, self.arrival_window) for _ in range(self.bursts - 1))
        instants = [0.0, *later]
        sizes = [0] * self.bursts
        for _ in range(self.jobs):
            sizes[rng.randrange(self.bursts)] += 1
        return [
            at + k * 1e-6 for at, size in zip(instants, sizes, strict=True) for k in range(size)
        ]

    def callback_jobs(self) -> frozenset[int]:
        """The jobs (by index in arrival order) whose completion calls back, with
        ``callbacks``: ``round(callback_share * jobs)`` of them, chosen seeded."""
        if self.callback_share >= 1:
            return frozenset(range(self.jobs))
        rng = random.Random(f"{self.seed}:callbacks")
        return frozenset(rng.sample(range(self.jobs), round(self.callback_share * self.jobs)))

    def ideal_makespan(self) -> float:
        """A lower bound ignoring outside load: ``max(total work / capacity, longest job)``."""
        durations = self.job_durations()
        return max(sum(durations) / self.capacity, max(durations))

    def outside_load(self) -> list[tuple[float, str, float]]:
        """The outside jobs as ``(at, account, duration)``, ``at`` in seconds from the start."""
        if not self.outside_jobs:
            return []
        rng = random.Random(f"{self.seed}:outside")
        window = self.outside_window
        if window is None:
            window = sum(self.job_durations()) / self.capacity
        names = self.account_names
        load = []
        for _ in range(self.outside_jobs):
            at = rng.uniform(0, window)
            name = rng.choice(names)
            load.append((at, name, self._draw(rng, names.index(name))))
        return sorted(load)


@dataclass(frozen=True)
class Timeline:
    """Slots in use and workers waiting, sampled at regular instants.

    Attributes:
        times: Seconds from the start of the run.
        busy: Per account, jobs running at each instant (ours and outside ones).
        outside: Per account, outside jobs running at each instant.
        capacity: ``maxJobs`` per account.
        waiting: Jobs that had arrived but not started, at each instant.
    """

    times: tuple[float, ...]
    busy: Mapping[str, tuple[int, ...]]
    outside: Mapping[str, tuple[int, ...]]
    capacity: Mapping[str, int]
    waiting: tuple[int, ...]

    def utilisation(self) -> tuple[float, ...]:
        """The share of all slots busy (with any job) at each instant."""
        total = sum(self.capacity.values())
        columns = zip(*self.busy.values(), strict=True) if self.busy else iter(())
        return tuple(sum(col) / total for col in columns)


@dataclass(frozen=True)
class Losses:
    """Slot-seconds a run left idle while jobs of ours waited, split by why.

    At each instant, the free slots (by the service's true state) are sorted into three
    kinds, and as many of them as there are jobs of ours waiting (arrived, not yet started)
    count as lost, taking ``unused`` ones first, then ``unseen``, then ``lag`` (the slot the
    dispatcher could have used is the one to blame). A slot freed at ``f`` is, at ``t``:

    - ``lag`` while ``t < f + lag``: the service's counts do not show it free yet;
    - ``unseen`` from ``f + lag`` until the first poll answered at or after ``f + lag``
      ("freed but not yet seen": a poll then would have shown it);
    - ``unused`` from that poll on ("seen but no waiter could use it": the dispatcher had
      the news but had not started a job there, e.g. the create was still in flight).

    Slots free from the start count as freed long ago (no ``lag``); which free slot a start
    takes is the longest free on its account. See ``benchmarks/README.md``.

    Attributes:
        unseen: Slot-seconds freed but not yet seen.
        unused: Slot-seconds seen but no waiter could use them.
        lag: Slot-seconds free but not yet in the service's counts.
        shown: The instants the counts first showed free a slot that freed while a job
            of ours waited then, ascending (the input of :func:`clairvoyant_unseen`).
    """

    unseen: float = 0.0
    unused: float = 0.0
    lag: float = 0.0
    shown: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def total(self) -> float:
        """All three."""
        return self.unseen + self.unused + self.lag


def slot_losses(
    capacity: Mapping[str, int],
    runs: Iterable[tuple[str, float, float]],
    waits: Iterable[tuple[float, float]],
    polls: Sequence[float] | None,
    *,
    lag: float = 0.0,
    since: float = 0.0,
    until: float,
) -> Losses:
    """The slot-seconds lost between ``since`` and ``until``, split as :class:`Losses` says.

    Args:
        capacity: ``maxJobs`` per account.
        runs: Every job that ran, ours and outside ones, as ``(account, start, end)``.
        waits: Each job of ours as ``(arrival, start)``.
        polls: The instants capacity answers were given, ascending; ``None`` for a
            dispatcher that sees every change the instant it happens (the oracle: then every
            free slot counts as ``unused``).
        lag: How old the service's counts are.
        since: The start of the run.
        until: Its end (the makespan's instant).

    Returns:
        The three shares, in slot-seconds.
    """
    by_account: dict[str, list[tuple[float, int]]] = {a: [] for a in capacity}
    for account, start, end in runs:
        by_account[account] += [(start, 1), (end, 0)]  # an end frees before a start takes
    changes: dict[float, list[int]] = {}  # instant -> [unseen, unused, lag, waiting] deltas

    def add(kind: int, begin: float, end: float) -> None:
        begin, end = max(begin, since), min(end, until)
        if begin < end:
            changes.setdefault(begin, [0, 0, 0, 0])[kind] += 1
            changes.setdefault(end, [0, 0, 0, 0])[kind] -= 1

    shown_at: list[float] = []

    def free(freed: float, taken: float) -> None:
        if polls is None:
            add(1, freed, taken)
            return
        shown = freed + lag  # the first instant the counts show it free
        if since <= shown < min(taken, until):
            shown_at.append(shown)
        first = bisect.bisect_left(polls, shown)
        seen = polls[first] if first < len(polls) else math.inf
        # a slot taken before any poll showed it (a callback named the job that ended, or
        # a probe on counts that lag) stops counting when it is taken
        shown, seen = min(shown, taken), min(seen, taken)
        add(2, freed, shown)
        add(0, shown, seen)
        add(1, seen, taken)

    for account, events in by_account.items():
        idle: list[float] = [-math.inf] * capacity[account]  # freed instants, oldest first
        for at, kind in sorted(events):
            if at >= until:
                break
            if kind == 0:
                idle.append(at)
            elif idle:
                free(idle.pop(0), at)
        for freed in idle:
            free(freed, until)
    waits = list(waits)
    for arrival, start in waits:
        add(3, arrival, start)
    arrived = sorted(a for a, _ in waits)
    started = sorted(s for _, s in waits)
    shown_waiting = tuple(
        sorted(
            x for x in shown_at if bisect.bisect_right(arrived, x) > bisect.bisect_right(started, x)
        )
    )
    split = [0.0, 0.0, 0.0]
    counts = [0, 0, 0, 0]
    instants = sorted(changes)
    for at, after in itertools.pairwise(instants):
        for k, delta in enumerate(changes[at]):
            counts[k] += delta
        waiting = counts[3]
        for k in (1, 0, 2):  # the dispatcher is blamed first for what it had seen
            taken = min(waiting, counts[k])
            split[k] += taken * (after - at)
            waiting -= taken
    return Losses(unseen=split[0], unused=split[1], lag=split[2], shown=shown_waiting)


def unseen_delay(shown: Sequence[float], polls: Sequence[float]) -> float:
    """The sum, over ``shown`` instants, of the wait for the first poll at or after each.

    Args:
        shown: When slots became visible in the counts (:attr:`Losses.shown`).
        polls: Poll instants, ascending.

    Returns:
        Seconds in all (a shown instant with no poll after it counts nothing).
    """
    total = 0.0
    for x in shown:
        i = bisect.bisect_left(polls, x)
        if i < len(polls):
            total += polls[i] - x
    return total


def clairvoyant_unseen(shown: Sequence[float], interval: float) -> float:
    """The least :func:`unseen_delay` any poll schedule could reach, knowing ``shown``.

    Polls must be at least ``interval`` apart. A forward search over poll instants: the
    next poll after one at ``q`` is at ``r = max(q + interval, x)`` for an uncovered
    instant ``x`` no later than the first uncovered one plus ``interval`` (a later one is
    never better: a poll could be added in between), and it serves every instant in
    ``(q, r]``.

    Args:
        shown: The instants to serve, ascending.
        interval: The least spacing of polls.

    Returns:
        Slot-seconds: the sum of the waits from each instant to the poll that serves it.
    """
    xs = sorted(shown)
    if not xs:
        return 0.0
    prefix = [0.0, *itertools.accumulate(xs)]
    n = len(xs)
    best: dict[float, float] = {}
    frontier: list[tuple[float, float]] = []  # (poll instant, least cost so far)

    def serve(after: float, at: float) -> float:
        lo, hi = bisect.bisect_right(xs, after), bisect.bisect_right(xs, at)
        return max(0.0, (hi - lo) * at - (prefix[hi] - prefix[lo]))  # no -0.0 from rounding

    def push(at: float, cost: float) -> None:
        if cost < best.get(at, math.inf):
            best[at] = cost
            heapq.heappush(frontier, (at, cost))

    for k in range(n):
        if xs[k] > xs[0] + interval:
            break
        push(xs[k], serve(-math.inf, xs[k]))
    answer = math.inf
    while frontier:
        at, cost = heapq.heappop(frontier)
        if cost > best.get(at, math.inf):
            continue
        first = bisect.bisect_right(xs, at)
        if first == n:
            answer = min(answer, cost)
            continue
        earliest = max(at + interval, xs[first])
        push(earliest, cost + serve(at, earliest))
        for k in range(first, n):
            if xs[k] >= earliest + interval:
                break
            if xs[k] > earliest:
                push(xs[k], cost + serve(at, xs[k]))
    return answer


@dataclass(frozen=True)
class SimulationResult:
    """What one dispatcher did on one scenario. Times are seconds from the start.

    Attributes:
        scenario: The scenario run.
        dispatcher: Its label (``"capgate+callbacks"`` when callbacks woke the gate).
        jobs: Jobs created.
        makespan: When the last of our jobs finished.
        oracle_makespan: The oracle's makespan on the same scenario (``None`` if not run).
        ideal_makespan: :meth:`Scenario.ideal_makespan`, a bound ignoring outside load.
        utilisation: Our busy slot-seconds over the slot-seconds outside load left free,
            during the makespan (1.0: not one free slot-second went unused).
        wait_mean: Mean seconds from a job's arrival to its start.
        wait_p99: The 99th percentile of the same (nearest rank).
        wait_max: The longest wait.
        polls: ``scheduler/available`` requests.
        requests: Every HTTP request (polls, creates, including the refused ones).
        rejected_429: Create requests refused with 429.
        outside_started: Outside jobs that found room and ran.
        timeline: Slots and waiting workers over time, for plots.
        poll_times: When each capacity answer was given (seconds from the start).
        losses: Slot-seconds left idle while jobs of ours waited, by why (:class:`Losses`).
    """

    scenario: Scenario
    dispatcher: str
    jobs: int
    makespan: float
    oracle_makespan: float | None
    ideal_makespan: float
    utilisation: float
    wait_mean: float
    wait_p99: float
    wait_max: float
    polls: int
    requests: int
    rejected_429: int
    outside_started: int
    timeline: Timeline = field(repr=False, compare=False)
    poll_times: tuple[float, ...] = field(default=(), repr=False, compare=False)
    losses: Losses = field(default_factory=Losses)

    @property
    def makespan_ratio(self) -> float | None:
        """``makespan / oracle_makespan`` (1.0 is as good as the oracle)."""
        if self.oracle_makespan is None or self.oracle_makespan <= 0:
            return None
        return self.makespan / self.oracle_makespan

    @property
    def requests_per_job(self) -> float:
        """HTTP requests per job created."""
        return self.requests / self.jobs if self.jobs else math.nan

    def to_dict(self) -> dict[str, Any]:
        """One flat JSON-able row (no timeline)."""
        return {
            "scenario": self.scenario.name,
            "dispatcher": self.dispatcher,
            "jobs": self.jobs,
            "makespan": round(self.makespan, 3),
            "oracle_makespan": None
            if self.oracle_makespan is None
            else round(self.oracle_makespan, 3),
            "makespan_ratio": None
            if self.makespan_ratio is None
            else round(self.makespan_ratio, 4),
            "ideal_makespan": round(self.ideal_makespan, 3),
            "utilisation": round(self.utilisation, 4),
            "wait_mean": round(self.wait_mean, 3),
            "wait_p99": round(self.wait_p99, 3),
            "wait_max": round(self.wait_max, 3),
            "polls": self.polls,
            "requests": self.requests,
            "requests_per_job": round(self.requests_per_job, 3),
            "rejected_429": self.rejected_429,
            "outside_started": self.outside_started,
            "lost_unseen": round(self.losses.unseen, 3),
            "lost_unused": round(self.losses.unused, 3),
            "lost_lag": round(self.losses.lag, 3),
            "params": {k: v for k, v in asdict(self.scenario).items() if k != "name"},
        }


# --- running --------------------------------------------------------------------------


def _import_trio() -> Any:
    try:
        import trio
        import trio.testing
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            "capgate.simulation runs on trio's virtual clock; install trio "
            "(pip install trio, or capgate's 'test' or 'bench' extra)",
            name="trio",
        ) from exc
    return trio


def simulate(
    scenario: Scenario, dispatcher: str = "capgate", *, oracle: bool = True
) -> SimulationResult:
    """Run ``dispatcher`` on ``scenario`` in virtual time and measure it.

    Args:
        scenario: The workload.
        dispatcher: One of :data:`DISPATCHERS`.
        oracle: Also run the oracle on the same scenario, for ``makespan_ratio``.

    Returns:
        The figures, with a timeline for plots.

    Raises:
        ValueError: ``dispatcher`` is not one of :data:`DISPATCHERS`.
        ModuleNotFoundError: trio is not installed.
        TimeoutError: The run did not finish (a dispatcher that never gets through).
    """
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {dispatcher!r}; use one of {', '.join(DISPATCHERS)}")
    trio = _import_trio()
    bound = None
    if oracle and dispatcher != "oracle":
        bound = simulate(replace(scenario, callbacks=False), "oracle", oracle=False).makespan
    _seed_trio(trio, scenario.seed)
    result: SimulationResult = trio.run(
        run_scenario, scenario, dispatcher, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    if dispatcher == "oracle":
        bound = result.makespan
    return replace(result, oracle_makespan=bound)


def _seed_trio(trio: Any, seed: int) -> None:
    # trio shuffles the order of runnable tasks with a private Random; seeding it makes a
    # run repeat exactly (Hypothesis registers the same object for the same reason)
    rng = getattr(getattr(trio, "_core", None), "_run", None)
    rng = getattr(rng, "_r", None)
    if isinstance(rng, random.Random):
        rng.seed(f"{seed}:trio")


async def run_scenario(
    scenario: Scenario,
    dispatcher: str = "capgate",
    *,
    fake: FakeScheduler | None = None,
    client: httpx.AsyncClient | None = None,
    url: str | None = None,
) -> SimulationResult:
    """Run ``dispatcher`` on ``scenario`` in the current event loop, with its clock.

    :func:`simulate` calls this under trio's virtual clock. Call it yourself to run on a
    real clock, e.g. against :func:`capgate.testing.serve` (pass the fake it serves, its
    ``url`` and a client; the scenario should then use short durations). ``oracle_makespan``
    is left ``None``.

    Args:
        scenario: The workload.
        dispatcher: One of :data:`DISPATCHERS` (``oracle`` needs the fake in-process and
            no ``url``).
        fake: The service; by default a new in-memory one built from the scenario.
        client: Sends every request; by default one over ``fake.transport()``.
        url: The ``scheduler/available`` URL (creates go to the same host); by default the
            fake's own URL, answered by its transport.

    Returns:
        The figures; ``oracle_makespan`` is ``None``.
    """
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"unknown dispatcher {dispatcher!r}; use one of {', '.join(DISPATCHERS)}")
    if dispatcher == "oracle" and url is not None:
        raise ValueError("the oracle reads the fake's state directly: run it without url=")
    names = scenario.account_names
    if fake is None:
        fake = FakeScheduler(
            dict(zip(names, scenario.accounts, strict=True)),
            service=scenario.service,
            lag=scenario.lag,
            seed=scenario.seed,
            job_duration=scenario.duration,
        )
    nudge = _Nudge()
    own_client = client is None
    if client is None:
        client = httpx.AsyncClient(transport=_transport(fake, scenario, nudge))
    env = _Env(scenario, fake, client, url or fake.url, nudge)
    try:
        with anyio.fail_after(_time_limit(scenario)):
            await _RUNNERS[dispatcher](env)
    except TimeoutError:
        raise TimeoutError(
            f"{dispatcher} did not get {scenario.jobs} jobs through scenario "
            f"{scenario.name!r} within {_time_limit(scenario):g} s"
        ) from None
    finally:
        if own_client:
            await client.aclose()
    label = dispatcher + ("+callbacks" if dispatcher == "capgate" and scenario.callbacks else "")
    return env.result(label)


def _transport(fake: FakeScheduler, scenario: Scenario, nudge: _Nudge) -> httpx.MockTransport:
    """The fake's transport, every request taking ``scenario.latency`` seconds."""
    if not scenario.latency:
        return fake.transport()

    # not the fake's own latency=, whose equal sleeps would tie (see _Nudge)
    async def handle(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(scenario.latency + nudge())
        return await fake.handle(request)

    return httpx.MockTransport(handle)


class _Nudge:
    """Sub-microsecond offsets that make every fixed-length sleep end at its own instant.

    trio orders timers due at the same instant by their objects' addresses, which differ from
    run to run and process to process, so hundreds of tasks sleeping exactly 10 s (or
    requests of equal latency) would wake in a different order each time. Adding a strictly
    growing multiple of a nanosecond to each such sleep keeps deadlines apart (later sleeps
    end later, never at the same instant), so the order, and every figure, repeats.
    """

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = itertools.count(1)

    def __call__(self) -> float:
        return next(self._count) * 1e-9


def _time_limit(scenario: Scenario) -> float:
    return max(86_400.0, 100 * scenario.ideal_makespan() + scenario.arrival_window)


class _Job:
    __slots__ = ("account", "arrival", "duration", "end", "index", "start")

    def __init__(self, index: int, arrival: float, duration: float) -> None:
        self.index = index
        self.arrival = arrival
        self.duration = duration
        self.start = math.nan
        self.end = math.nan
        self.account = ""


class _Env:
    """One run: the jobs, the fake, and the HTTP both sides speak (internal)."""

    def __init__(
        self,
        scenario: Scenario,
        fake: FakeScheduler,
        client: httpx.AsyncClient,
        url: str,
        nudge: _Nudge,
    ) -> None:
        self.scenario = scenario
        self.nudge = nudge
        self.fake = fake
        self.client = client
        self.url = url
        # the fake's create path for this service, at the origin the gate polls
        origin = httpx.URL(url).copy_with(path="/", query=None, fragment=None)
        self.create_url = str(origin.join(httpx.URL(fake.create_url).path))
        self.headers = {"Authorization": f"Bearer {fake.token}"}
        self.spec = fake.spec
        self.t0 = anyio.current_time()
        self.jobs = [
            _Job(i, self.t0 + at, d)
            for i, (at, d) in enumerate(
                zip(scenario.arrivals(), scenario.job_durations(), strict=True)
            )
        ]
        # "lognormal": a job's duration is set by the account it lands on, at create time
        self.normals = scenario.job_normals() if scenario.per_account else None
        self.account_index = {n: i for i, n in enumerate(scenario.account_names)}
        self.by_id: dict[str, _Job] = {}  # the fake's job id -> our job
        self._next = 0
        self.requests0 = fake.requests
        self.polls0 = fake.polls
        self.poll_times0 = len(fake.poll_times)
        self.rejected0 = fake.rejected_429
        for at, account, duration in scenario.outside_load():
            fake.add_outside_job(account, duration, at=self.t0 + at)

    async def pause(self, seconds: float) -> None:
        """A baseline's fixed sleep, ending at an instant of its own (see :class:`_Nudge`)."""
        await anyio.sleep(seconds + self.nudge())

    def rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.scenario.seed}:{purpose}")

    def next_job(self) -> _Job | None:
        if self._next >= len(self.jobs):
            return None
        job = self.jobs[self._next]
        self._next += 1
        return job

    @property
    def worker_count(self) -> int:
        return self.scenario.workers or self.scenario.jobs

    async def arrive(self, job: _Job) -> None:
        delay = job.arrival - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)

    async def post(self, job: _Job, account: str) -> httpx.Response:
        """The create request; on success the job's start and end are recorded."""
        duration = job.duration
        if self.normals is not None:
            duration = self.scenario.duration_on(
                self.account_index[account], self.normals[job.index]
            )
        response = await self.client.post(
            self.create_url,
            json={self.spec.account_key: account},
            # the scenario's running time for this job (the fake's own control)
            headers={**self.headers, FakeScheduler.RUNTIME_HEADER: repr(duration)},
        )
        if response.is_success:  # 200, or 201 (mureka)
            job_id = self.spec.job_id_from(response.json())
            made = self.fake.jobs[str(job_id)]
            job.start, job.end, job.account = made.start, made.end, account
            job.duration = duration
            self.by_id[made.job_id] = job
        elif response.status_code != 429:
            raise RuntimeError(f"create answered HTTP {response.status_code}: {response.text}")
        return response

    async def available(self) -> list[str]:
        """Poll, as a naive script would: the accounts listed with a free slot, in order."""
        response = await self.client.get(self.url, headers=self.headers)
        response.raise_for_status()
        rows = response.json().get("available") or []
        key = self.spec.account_key
        return [r[key] for r in rows if isinstance(r, dict) and (r.get("available") or 0) > 0]

    # --- figures ------------------------------------------------------------------------

    def result(self, label: str) -> SimulationResult:
        scenario, fake, t0 = self.scenario, self.fake, self.t0
        jobs = self.jobs
        if any(math.isnan(j.start) for j in jobs):
            raise RuntimeError(f"{label}: some jobs were never created")
        makespan = max(j.end for j in jobs) - t0
        horizon = t0 + makespan
        outside = [j for j in fake.jobs.values() if j.outside and j.start < horizon]
        ours_busy = sum(j.duration for j in jobs)
        outside_busy = sum(max(0.0, min(j.end, horizon) - max(j.start, t0)) for j in outside)
        free_slot_seconds = scenario.capacity * makespan - outside_busy
        waits = sorted(j.start - j.arrival for j in jobs)
        rank = max(0, math.ceil(0.99 * len(waits)) - 1)
        polls = fake.poll_times[self.poll_times0 :]
        oracle = label == "oracle"  # sees every change at once, lag or not
        losses = slot_losses(
            fake.max_jobs,
            [(j.account, j.start, j.end) for j in jobs]
            + [(o.account, o.start, o.end) for o in outside],
            [(j.arrival, j.start) for j in jobs],
            None if oracle else polls,
            lag=0.0 if oracle else scenario.lag,
            since=t0,
            until=horizon,
        )
        return SimulationResult(
            scenario=scenario,
            dispatcher=label,
            jobs=len(jobs),
            makespan=makespan,
            oracle_makespan=None,
            ideal_makespan=scenario.ideal_makespan(),
            utilisation=ours_busy / free_slot_seconds if free_slot_seconds > 0 else math.nan,
            wait_mean=sum(waits) / len(waits),
            wait_p99=waits[rank],
            wait_max=waits[-1],
            polls=fake.polls - self.polls0,
            requests=fake.requests - self.requests0,
            rejected_429=fake.rejected_429 - self.rejected0,
            outside_started=len(outside),
            timeline=self._timeline(makespan, outside),
            poll_times=tuple(p - t0 for p in polls),
            losses=losses,
        )

    def _timeline(self, makespan: float, outside: Sequence[Any], samples: int = 240) -> Timeline:
        t0 = self.t0
        names = self.scenario.account_names
        step = makespan / samples if makespan > 0 else 1.0
        times = [k * step for k in range(samples + 1)]

        def running(intervals: list[tuple[float, float]]) -> tuple[int, ...]:
            starts = sorted(s - t0 for s, _ in intervals)
            ends = sorted(e - t0 for _, e in intervals)
            return tuple(
                bisect.bisect_right(starts, t) - bisect.bisect_right(ends, t) for t in times
            )

        ours: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        theirs: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for j in self.jobs:
            ours[j.account].append((j.start, j.end))
        for o in outside:
            theirs[o.account].append((o.start, o.end))
        outside_counts = {n: running(theirs[n]) for n in names}
        busy = {
            n: tuple(a + b for a, b in zip(running(ours[n]), outside_counts[n], strict=True))
            for n in names
        }
        arrived = sorted(j.arrival - t0 for j in self.jobs)
        started = sorted(j.start - t0 for j in self.jobs)
        waiting = tuple(
            bisect.bisect_right(arrived, t) - bisect.bisect_right(started, t) for t in times
        )
        return Timeline(
            times=tuple(times),
            busy=busy,
            outside=outside_counts,
            capacity=dict(zip(names, self.scenario.accounts, strict=True)),
            waiting=waiting,
        )


# --- the dispatchers --------------------------------------------------------------------


async def _workers(env: _Env, work: Any) -> None:
    """Run ``work(job)`` for every job, ``env.worker_count`` at a time, in arrival order."""

    async def worker() -> None:
        while (job := env.next_job()) is not None:
            await env.arrive(job)
            await work(job)

    async with anyio.create_task_group() as tg:
        for _ in range(min(env.worker_count, len(env.jobs))):
            tg.start_soon(worker)


async def _run_capgate(env: _Env) -> None:
    scenario = env.scenario
    spec = env.fake.spec
    # a service that publishes no cap (or only in prose) is told the simulated ones
    caps = dict(zip(scenario.account_names, scenario.accounts, strict=True))
    gate = CapacityGate(
        env.fake.token,
        service=scenario.service,
        url=env.url,
        client=env.client,
        poll_interval=scenario.poll_interval,
        max_jobs=caps if spec.needs_max_jobs or spec.default_max_jobs is not None else None,
        accounts=scenario.account_names if spec.needs_accounts else None,
    )
    # the gate's jitter is random; seed it so a run repeats exactly
    gate._engine.rng.seed(f"{scenario.seed}:jitter")
    submit = getattr(gate, "submit", None)

    async def through_slots(job: _Job) -> None:
        while True:
            async with gate.slot() as slot:
                response = await env.post(job, slot.account)
                if response.status_code == 429:
                    slot.mark_busy()
                    continue
                slot.mark_submitted(env.spec.job_id_from(response.json()))
                return

    async def through_submit(job: _Job) -> None:
        assert submit is not None  # noqa: S101 - chosen below only when present

        async def create(account: str) -> httpx.Response:
            return await env.post(job, account)

        while True:
            try:
                await submit(create)
            except SubmissionFailed:
                continue  # every attempt met 429: wait for a slot again
            return

    calling_back = scenario.callback_jobs()

    async def on_done(job: Any) -> None:
        # useapi calls back only for the jobs we created, and only those given a replyUrl
        ours = env.by_id.get(job.job_id)
        if ours is not None and ours.index in calling_back:
            gate.invalidate(job.job_id)  # the callback names the job that ended

    try:
        async with anyio.create_task_group() as tg:
            if scenario.callbacks:
                env.fake.on_job_done = on_done
                tg.start_soon(env.fake.run_callbacks)
            await _workers(env, through_submit if submit is not None else through_slots)
            tg.cancel_scope.cancel()
    finally:
        env.fake.on_job_done = None
        await gate.aclose()


async def _run_retry_429(env: _Env) -> None:
    rng = env.rng("retry-429")
    names = env.scenario.account_names

    async def work(job: _Job) -> None:
        # sleeping in a loop is the point: this is the baseline capgate replaces
        while (await env.post(job, rng.choice(names))).status_code == 429:
            await env.pause(RETRY_SLEEP)

    await _workers(env, work)


async def _run_poll_first(env: _Env) -> None:
    async def work(job: _Job) -> None:
        while True:
            listed = await env.available()
            if listed and (await env.post(job, listed[0])).status_code != 429:
                return
            await env.pause(POLL_FIRST_SLEEP)

    await _workers(env, work)


async def _run_static_limiter(env: _Env) -> None:
    rng = env.rng("static-limiter")
    names = env.scenario.account_names
    limiter = anyio.CapacityLimiter(env.scenario.capacity)

    async def hold(borrower: object, until: float) -> None:
        await anyio.sleep(max(0.0, until - anyio.current_time()))
        limiter.release_on_behalf_of(borrower)

    async with anyio.create_task_group() as holders:

        async def work(job: _Job) -> None:
            borrower = object()
            await limiter.acquire_on_behalf_of(borrower)
            while (await env.post(job, rng.choice(names))).status_code == 429:
                await env.pause(RETRY_SLEEP)
            # the script learns of the job's end (it polls the job) and frees the slot
            holders.start_soon(hold, borrower, job.end)

        await _workers(env, work)


async def _run_oracle(env: _Env) -> None:
    fake = env.fake
    names = env.scenario.account_names
    queue = list(reversed(env.jobs))  # pop() takes the earliest arrival
    inflight = dict.fromkeys(names, 0)  # creates sent and not answered, per account
    changed = anyio.Event()

    async def create(job: _Job, account: str) -> None:
        nonlocal changed
        try:
            if (await env.post(job, account)).status_code == 429:
                # outside load took the slot while the request travelled: next free one
                queue.append(job)
                queue.sort(key=lambda j: (-j.arrival, -j.index))
        finally:
            inflight[account] -= 1
            changed.set()
            changed = anyio.Event()

    async with anyio.create_task_group() as tg:
        while queue or any(inflight.values()):
            now = anyio.current_time()
            fake._advance(now)  # start the outside jobs due by now, as a request would
            if env.spec.sync_create:
                # a sync create is answered when its job ends: in flight and running at once
                free = {n: fake.max_jobs[n] - max(fake.active(n, now), inflight[n]) for n in names}
            else:
                free = {n: fake.max_jobs[n] - fake.active(n, now) - inflight[n] for n in names}
            if env.normals is not None:
                plan = _earliest_finish(env, queue, free, now)
                if plan:
                    placed = {id(job) for job, _ in plan}
                    queue[:] = [j for j in queue if id(j) not in placed]
                for job, best in plan:
                    inflight[best] += 1
                    tg.start_soon(create, job, best)
            while env.normals is None and queue and queue[-1].arrival <= now:
                best = max(names, key=lambda n: free[n])
                if free[best] <= 0:
                    break
                free[best] -= 1
                inflight[best] += 1
                tg.start_soon(create, queue.pop(), best)
            upcoming = [j.end for j in fake.running(now)]
            if queue and queue[-1].arrival > now:
                upcoming.append(queue[-1].arrival)
            wake = changed
            with anyio.move_on_after(max(0.0, min(upcoming, default=now + 1.0) - now)):
                await wake.wait()


def _earliest_finish(
    env: _Env, queue: list[_Job], free: dict[str, int], now: float
) -> list[tuple[_Job, str]]:
    """The oracle's placement when durations depend on the account: the jobs to start now.

    List scheduling by earliest finish: in arrival order, each job that has arrived goes
    where it would end first, knowing its duration on every account and when each running
    job ends; it waits for a faster account's slot when that ends sooner than a free slow
    one. Planning stops once no slot is free now.
    """
    assert env.normals is not None  # noqa: S101 - only called for per-account durations
    scenario, fake = env.scenario, env.fake
    slots: dict[str, list[float]] = {n: [now] * max(0, free[n]) for n in free}
    for running in fake.running(now):
        if len(slots.get(running.account, ())) < fake.max_jobs.get(running.account, 0):
            slots[running.account].append(running.end)
    for ends in slots.values():
        heapq.heapify(ends)
    plan: list[tuple[_Job, str]] = []
    for job in reversed(queue):
        if job.arrival > now or not any(ends and ends[0] <= now for ends in slots.values()):
            break
        z = env.normals[job.index]
        best, finish = "", math.inf
        for name, ends in slots.items():
            if ends:
                end = ends[0] + scenario.duration_on(env.account_index[name], z)
                if end < finish:
                    best, finish = name, end
        if slots[best][0] <= now:
            plan.append((job, best))
        heapq.heapreplace(slots[best], finish)
    return plan


_RUNNERS = {
    "capgate": _run_capgate,
    "retry-429": _run_retry_429,
    "poll-first": _run_poll_first,
    "static-limiter": _run_static_limiter,
    "oracle": _run_oracle,
}
