"""When slots are likely to free: job durations learnt from the snapshots, and poll timing.

Pure and synchronous, like the ledger: it is fed snapshots and clock readings and never
awaits, so it is tested without an event loop.

What it learns. Every snapshot lists the jobs executing, most with an ``elapsed``. A job's
start is placed on the gate's own clock as ``requested_at - elapsed`` (the service writes
whole seconds, so half a second is added). A job listed in one snapshot and missing from the
next ended between the two requests: its duration lies in that interval, kept per account
(the last :data:`SAMPLES_KEPT`) and over every account. Counts that lag shift a job's start
and its end alike, so what is learnt is when a job *drops off the counts*: the instant a
poll can see its slot free.

What it predicts. For a job of age ``a`` on an account whose durations are known, the
chance that it drops off within ``[a + x, a + y)`` is ``(F(a + y) - F(a + x)) / (1 - F(a))``,
where ``F`` is the durations' distribution (Kaplan-Meier, drawn as straight lines between
the ends seen). Summed over the executing jobs this is how many slots are expected to free,
per short step of time ahead.

When to poll (:meth:`Forecast.next_poll`). While every slot is taken, the next poll is put
off past its floor (``poll_interval`` after the last) for as long as fewer than
:data:`UNLIKELY` slots are expected to have freed since the snapshot (at most
:data:`MAX_DEFER` intervals), and from there, by less than one interval, to the phase that
sees the ends that follow the soonest: just after a likely end rather than just before it.
It never goes earlier than the floor, and while an end is not unlikely it stays at the
floor: measured on the benchmarks, moving polls that could already catch an end cost more
than it caught (how much poll timing can gain at all is in benchmarks/README.md). Putting a
poll off takes the durations of :data:`DEFER_SAMPLES` jobs; with fewer, or with a job older
than any seen to end, the answer is the floor: the gate polls as it always did.

Counts that lag (:meth:`Forecast.probably_freed`): a job listed by a snapshot that shows
the account ``lag`` seconds late may have ended since; the listed jobs that have, with
:data:`PROBE_CONFIDENCE`, are granted as probes (see the ledger's ``expect_freed``).

Placement (:meth:`Forecast.typical`, :meth:`Forecast.expected_ends`): with
``most_available``, the in-memory store sends a grant to an account with room whose jobs end
markedly sooner (:data:`FASTER`), and plans each pass by expected earliest finish
(``placement.py``).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .._models import Snapshot

__all__ = ["FASTER", "Durations", "Forecast", "Outlook"]

#: durations needed (per account for its own, over all accounts for the pooled) before use
MIN_SAMPLES = 5
#: durations kept per account (the newest), and over all accounts
SAMPLES_KEPT = 64
POOLED_KEPT = 256
#: a job seen to end between snapshots further apart than this teaches nothing (seconds)
MAX_CENSOR = 30.0
#: the poll is put off at most this many poll intervals past its floor
MAX_DEFER = 5
#: the time step of the forecast, as a share of the poll interval
STEP_SHARE = 0.05
#: a poll is put off only while fewer slots than this are expected to have freed ...
UNLIKELY = 0.03
#: ... by durations of at least this many jobs (per account, or over all accounts)
DEFER_SAMPLES = 20
#: with most_available, a grant goes to an account with room whose median duration is
#: under this share of the pick's (jobs there end markedly sooner)
FASTER = 2 / 3
#: placement weighs a job at this many (log-space) standard deviations above its account's
#: typical duration: about its 90th percentile, as the job that sets a batch's end is a long one
RISK = 1.28
#: jobs followed at most (the oldest are forgotten first)
MAX_FOLLOWED = 100_000
#: with counts that lag, a listed job is taken as ended (a probe) once it is this likely
PROBE_CONFIDENCE = 0.95
#: at most this many listed jobs per account are weighed for probes (the likeliest)
TAIL_EVENTS = 64
#: how often (seconds) the chances are weighed again between snapshots
PROBE_RECHECK = 1.0


class Durations:
    """Durations of one account's jobs (or every account's): Kaplan-Meier over what was seen.

    A job seen to end gives an interval (taken at its middle); a job still running gives a
    lower bound, its age (right-censored). Leaving the running ones out would teach mostly
    the short jobs, the first to end, and make every job look nearer its end than it is.
    Between the ends seen the distribution is drawn as straight lines, so it has no steps
    finer than the evidence. Past the longest duration seen it knows nothing: ``covers``.
    """

    __slots__ = ("_censored", "_fs", "_samples", "_xs")

    def __init__(self, kept: int) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=kept)
        self._censored: list[float] = []
        self._xs: list[float] = []
        self._fs: list[float] = []

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, lo: float, hi: float) -> None:
        """A job ended when it was between ``lo`` and ``hi`` seconds old."""
        lo = max(0.0, lo)
        self._samples.append((lo, max(lo, hi)))
        self._xs = []  # rebuilt on the next question

    def running(self, ages: list[float]) -> None:
        """The ages of the jobs running now (replaces the previous ones)."""
        self._censored = sorted(ages)
        self._xs = []

    def _build(self) -> None:
        ends = sorted((lo + hi) / 2 for lo, hi in self._samples)
        censored = self._censored
        i, n = 0, len(ends)
        # a sample rarely holds the shortest jobs there are: below the shortest end seen
        # lies the share of a next job that would be shorter than every job seen (ended
        # or running), 1 / (jobs + 1), spread from 0: "nothing ends before" is never sure
        unseen = 1.0 / (n + len(censored) + 1)
        first = min(lo for lo, _ in self._samples)
        xs = [0.0, first] if first > 0 else [0.0]
        fs = [0.0, unseen] if first > 0 else [unseen]
        surviving = 1.0
        while i < n:
            at = ends[i]
            died = 1
            while i + died < n and ends[i + died] == at:
                died += 1
            at_risk = (n - i) + (len(censored) - bisect.bisect_left(censored, at))
            surviving *= 1.0 - died / at_risk
            value = unseen + (1.0 - unseen) * (1.0 - surviving)
            if at > xs[-1]:
                xs.append(at)
                fs.append(value)
            else:
                fs[-1] = value
            i += died
        self._xs, self._fs = xs, fs

    def _curve(self) -> tuple[list[float], list[float]]:
        if not self._xs:
            self._build()
        return self._xs, self._fs

    def covers(self, age: float) -> bool:
        """Whether a job this old is within what was seen (younger than the longest end)."""
        if not self._samples:
            return False
        return age < self._curve()[0][-1]

    def cdf(self, x: float) -> float:
        """``P(duration <= x)``; flat past the longest end seen."""
        if not self._samples:
            return math.nan
        xs, fs = self._curve()
        if x <= xs[0]:
            return 0.0
        if x >= xs[-1]:
            return fs[-1]
        i = bisect.bisect_right(xs, x)
        x0, x1 = xs[i - 1], xs[i]
        return fs[i - 1] + (fs[i] - fs[i - 1]) * (x - x0) / (x1 - x0)

    def residual(self, age: float) -> float:
        """Expected seconds left for a job of ``age`` still running (its mean residual
        life), with every job taken to end by the longest end seen; ``inf`` past it."""
        if not self.covers(age):
            return math.inf
        xs, fs = self._curve()
        alive = 1.0 - self.cdf(age)
        if alive <= 1e-9:
            return 0.0
        # the area under the survival curve from age to the last end seen, piecewise linear
        area, x0, f0 = 0.0, age, self.cdf(age)
        after = bisect.bisect_right(xs, age)
        for x1, f1 in zip(xs[after:], fs[after:], strict=True):
            area += (x1 - x0) * (1.0 - (f0 + f1) / 2)
            x0, f0 = x1, f1
        return area / alive

    def ends(self) -> list[float]:
        """The durations of the jobs seen to end (each at its interval's middle)."""
        return [(lo + hi) / 2 for lo, hi in self._samples]

    def median(self) -> float:
        """The median duration of the jobs seen to end (each at its interval's middle)."""
        return statistics.median(self.ends())


@dataclass(frozen=True)
class Outlook:
    """What the forecast expects of one account, for ``statistics()``.

    Attributes:
        median_duration: The median duration of its jobs seen to end (seconds), if known.
        next_completion: Seconds from now until one of its executing jobs has more likely
            than not dropped off the counts (0: already so); ``None`` when nothing runs
            or the forecast does not cover it.
    """

    median_duration: float | None
    next_completion: float | None


class _Job:
    __slots__ = ("account", "last_seen", "start")

    def __init__(self, account: str | None, start: float, last_seen: float) -> None:
        self.account = account
        self.start = start
        self.last_seen = last_seen


class Forecast:
    """Durations per account, learnt from the snapshots; when the next poll should go."""

    def __init__(self, interval: float = 5.0) -> None:
        self._jobs: dict[str, _Job] = {}
        self._ageless: set[str] = set()  # listed from the first snapshot on, with no elapsed
        self._by_account: dict[str, Durations] = {}
        self._pooled = Durations(POOLED_KEPT)
        self._latest: Snapshot | None = None
        # the latest snapshot's followed jobs, per account (what outlook() looks at)
        self._listed: dict[str | None, list[_Job]] = {}
        # an end seen between snapshots further apart than this teaches nothing; a poll
        # put off MAX_DEFER intervals leaves such gaps, so it scales with the interval
        self._max_censor = max(MAX_CENSOR, (MAX_DEFER + 2) * interval)

    # --- learning --------------------------------------------------------------------------

    def observe(self, snapshot: Snapshot) -> bool:
        """Take a snapshot; ``False`` when it is the latest again, or older (ignored)."""
        latest = self._latest
        if latest is not None and snapshot.requested_at <= latest.requested_at:
            return False
        at = snapshot.requested_at
        previous = None if latest is None else latest.requested_at
        listed = set()
        by_account: dict[str | None, list[_Job]] = {}
        for job in snapshot.executing:
            if job.job_id in listed:
                continue  # listed twice: one job, one slot (as the ledger counts it)
            listed.add(job.job_id)
            known = self._jobs.get(job.job_id)
            if known is not None:
                known.last_seen = at
                known.account = job.account  # where it is listed now (an id may move)
            elif job.job_id in self._ageless:
                continue
            elif job.elapsed_seconds is not None:
                start = at - job.elapsed_seconds - 0.5  # whole seconds, rounded down
                known = self._jobs[job.job_id] = _Job(job.account, start, at)
            elif previous is not None:
                start = (previous + at) / 2  # first listed now, not before
                known = self._jobs[job.job_id] = _Job(job.account, start, at)
            else:
                self._ageless.add(job.job_id)  # running since before we looked: no age
                continue
            by_account.setdefault(job.account, []).append(known)
        self._ageless &= listed
        for job_id in [j for j in self._jobs if j not in listed]:
            gone = self._jobs[job_id]
            lo, hi = gone.last_seen - gone.start, at - gone.start
            if not snapshot.skipped:  # a row left out may be a job that still runs
                del self._jobs[job_id]
                if hi - lo <= self._max_censor:
                    self._learn(gone.account, lo, hi)
            elif at - gone.last_seen > self._max_censor:
                del self._jobs[job_id]  # missing too long to be a skipped row: let it go
        while len(self._jobs) > MAX_FOLLOWED:
            del self._jobs[next(iter(self._jobs))]
        self._latest = snapshot
        self._listed = by_account
        # what still runs is evidence too: durations at least this long
        ages: dict[str | None, list[float]] = {}
        for followed in self._jobs.values():
            ages.setdefault(followed.account, []).append(at - followed.start)
        self._pooled.running([age for group in ages.values() for age in group])
        for account, durations in self._by_account.items():
            durations.running(ages.get(account, []))
        return True

    def _learn(self, account: str | None, lo: float, hi: float) -> None:
        self._pooled.add(lo, hi)
        if account is not None:
            durations = self._by_account.get(account)
            if durations is None:
                durations = self._by_account[account] = Durations(SAMPLES_KEPT)
            durations.add(lo, hi)

    def typical(self) -> dict[str, float]:
        """Per account with enough durations of its own, how long a job started there is
        taken to run when placing it: the 90th percentile of its durations (:data:`RISK`,
        the spread pooled over accounts), the accounts told apart only as far as their
        samples show they differ beyond chance.

        Each account's mean log duration is shrunk toward the mean over accounts by how
        much of its spread its own sampling error explains (an empirical Bayes estimate):
        fifty accounts running the same model, a handful of samples each, come out alike
        rather than some "twice as fast" by luck; accounts that run models four times apart
        keep their difference. A high percentile rather than the median, because at the
        end of a batch the job that sets the makespan is a long one, and a long job costs
        the most on the slowest account.
        """
        logs = {
            a: [math.log(max(x, 1e-3)) for x in d.ends()]
            for a, d in self._by_account.items()
            if len(d) >= MIN_SAMPLES
        }
        if len(logs) < 2:
            return {a: _exp(statistics.fmean(xs) + RISK * _spread(xs)) for a, xs in logs.items()}
        means = {a: statistics.fmean(xs) for a, xs in logs.items()}
        # within-account variance, pooled; between-account variance beyond sampling error
        within = sum((x - means[a]) ** 2 for a, xs in logs.items() for x in xs) / max(
            1, sum(len(xs) for xs in logs.values()) - len(logs)
        )
        centre = statistics.fmean(means.values())
        spread = statistics.pvariance(means.values(), centre)
        noise = statistics.fmean(within / len(xs) for xs in logs.values())
        between = max(0.0, spread - noise)
        out = {}
        for a, xs in logs.items():
            error = within / len(xs)
            keep = between / (between + error) if between + error > 0 else 0.0
            out[a] = _exp(centre + keep * (means[a] - centre) + RISK * math.sqrt(within))
        return out

    @property
    def ready(self) -> bool:
        """Whether enough durations are known to forecast anything."""
        return len(self._pooled) >= MIN_SAMPLES

    def durations(self, account: str | None, least: int = MIN_SAMPLES) -> Durations | None:
        """The durations that forecast ``account``'s jobs: its own, else everyone's
        (``None`` with fewer than ``least`` either way)."""
        own = None if account is None else self._by_account.get(account)
        if own is not None and len(own) >= least:
            return own
        if len(self._pooled) >= least:
            return self._pooled
        return None

    # --- predicting ------------------------------------------------------------------------

    def _running(
        self, accounts: Collection[str] | None, least: int
    ) -> list[tuple[_Job, Durations]] | None:
        """The latest snapshot's jobs on ``accounts`` (all if ``None``) with the durations
        that forecast them; ``None`` if any of them has none (then nothing is predicted)."""
        latest = self._latest
        if latest is None:
            return None
        jobs = []
        seen = set()
        for listed in latest.executing:
            if listed.job_id in seen:
                continue  # listed twice: one job
            seen.add(listed.job_id)
            job = self._jobs.get(listed.job_id)
            account = listed.account
            if accounts is not None and account is not None and account not in accounts:
                continue
            if job is None:
                return None
            durations = self.durations(job.account, least)
            if durations is None or not durations.covers(latest.requested_at - job.start):
                return None  # older than any job seen to end: when it ends is anyone's guess
            jobs.append((job, durations))
        return jobs

    @staticmethod
    def _expected(
        jobs: Iterable[tuple[_Job, Durations]], origin: float, step: float, first: int, n: int
    ) -> tuple[float, list[float]]:
        """Slots expected to free from ``origin`` until step ``first``, and in each step
        from ``first`` to ``n`` (a floor far off costs one step, not thousands)."""
        early = 0.0
        freed = [0.0] * (n - first)
        for job, durations in jobs:
            age = origin - job.start
            at_origin = durations.cdf(age)
            alive = 1.0 - at_origin
            if alive <= 1e-9:
                continue
            before = durations.cdf(age + first * step)
            early += (before - at_origin) / alive
            for k in range(n - first):
                after = durations.cdf(age + (first + k + 1) * step)
                freed[k] += (after - before) / alive
                before = after
        return early, freed

    def next_poll(
        self, *, floor: float, interval: float, accounts: Collection[str] | None = None
    ) -> float:
        """When the next poll should go: ``floor`` (the earliest allowed), or later while
        it is unlikely that any slot has freed.

        The poll is put off to the last instant (at most :data:`MAX_DEFER` intervals past
        the floor) before which the executing jobs are expected to have freed fewer than
        :data:`UNLIKELY` slots, counted from the snapshot's request.

        Args:
            floor: The earliest instant the next poll may go (``poll_interval`` after the
                last one).
            interval: The poll interval.
            accounts: The accounts whose slots matter (``None``: every account).
        """
        latest = self._latest
        if latest is None or interval <= 0 or not math.isfinite(floor):
            return floor
        jobs = self._running(accounts, DEFER_SAMPLES)
        if not jobs:
            return floor  # too little history, or nothing listed to forecast: as without
        origin = latest.requested_at
        step = interval * STEP_SHARE
        width = round(interval / step)  # an interval, in steps
        start = max(0, math.ceil((floor - origin) / step))  # the floor, in steps
        last = start + MAX_DEFER * width
        horizon = last + 4 * width  # the phase is judged over a few intervals past it
        early, freed = self._expected(jobs, origin, step, start, horizon)
        if early >= UNLIKELY:
            return floor  # a slot may well have freed by the floor already
        # sums of h(s) and of h(s) * s up to each step (s in steps from the origin), those
        # before the floor taken at the floor: every candidate below sees them alike
        mass = [0.0] * start + [early]
        moment = [0.0] * start + [early * start]
        for k, h in enumerate(freed, start):
            mass.append(mass[-1] + h)
            moment.append(moment[-1] + h * (k + 0.5))
        likely = next((k for k in range(start + 1, last) if mass[k] >= UNLIKELY), last)
        # put off to `likely`, then on (by less than an interval) to the phase that sees
        # what frees next the soonest: polls at t, t + interval, ... until the horizon;
        # a slot freed in [since, seen) waits seen - s to be seen
        best, best_cost = likely, math.inf
        for t in range(likely, min(likely + width, last) + 1):
            cost, since = t * mass[t] - moment[t], t  # freed before t, seen at t
            while since < horizon:
                seen = since + width
                cost += seen * (mass[min(seen, horizon)] - mass[since]) - (
                    moment[min(seen, horizon)] - moment[since]
                )
                since = seen
            if cost < best_cost - 1e-9:
                best, best_cost = t, cost
        return max(floor, origin + best * step)

    def probably_freed(self, now: float, lag: float) -> tuple[dict[str, int], float]:
        """Counts that lag: per account, the listed jobs that have ended by now with a
        chance of at least :data:`PROBE_CONFIDENCE`; and when the next one will have.

        The latest snapshot shows each account as it was ``lag`` seconds before its
        request: a job listed there may have ended since, and its slot is free though no
        count says so yet.

        Returns:
            ``({account: jobs}, instant the next listed job crosses the line)`` (``inf``
            when none will, or nothing is known).
        """
        latest = self._latest
        if latest is None or lag <= 0:
            return {}, math.inf
        origin = latest.requested_at
        chances: dict[str, list[float]] = {}
        for account, jobs in self._listed.items():  # each job once, where it is listed
            durations = None if account is None else self.durations(account)
            if account is None or durations is None:
                continue
            for job in jobs:
                age = origin - job.start  # its age as the counts saw it
                if not durations.covers(age):
                    continue  # older than any job seen to end: no guess
                alive = 1.0 - durations.cdf(age)
                if alive <= 1e-9:
                    continue  # at the very end of what was seen: no guess either
                # the counts saw it `lag` before the origin: since then, lag + (now - origin)
                ended = (durations.cdf(age + lag + now - origin) - durations.cdf(age)) / alive
                chances.setdefault(account, []).append(ended)
        freed = {}
        for account, ps in chances.items():
            n = _surely_at_least(ps, PROBE_CONFIDENCE)
            if n:
                freed[account] = n
        soonest = now + PROBE_RECHECK if chances else math.inf
        return freed, soonest

    def expected_ends(self) -> dict[str, list[float]]:
        """Per account, when the latest snapshot's listed jobs are expected to end: the
        snapshot's request plus each job's expected time left (:meth:`Durations.residual`).
        A job older than any seen to end, or with no durations to go by, is left out."""
        latest = self._latest
        if latest is None:
            return {}
        origin = latest.requested_at
        ends: dict[str, list[float]] = {}
        for account, jobs in self._listed.items():
            if account is None:
                continue
            durations = self.durations(account)
            if durations is None:
                continue
            for job in jobs:
                left = durations.residual(origin - job.start)
                if left < math.inf:
                    ends.setdefault(account, []).append(origin + left)
        return ends

    def outlook(self, account: str, now: float) -> Outlook:
        """What is known and expected of ``account`` at ``now`` (see :class:`Outlook`)."""
        own = self._by_account.get(account)
        median = None if own is None or not own else own.median()
        latest = self._latest
        durations = self.durations(account)
        if latest is None or durations is None:
            return Outlook(median, None)
        origin = latest.requested_at
        alive: list[tuple[float, float]] = []  # (age, chance it runs at the origin)
        for job in self._listed.get(account, ()):
            age = origin - job.start
            if not durations.covers(age):
                return Outlook(median, None)
            alive.append((age, 1.0 - durations.cdf(age)))
        if not alive:
            return Outlook(median, None)

        def none_ended(x: float) -> float:
            chance = 1.0
            for age, surviving in alive:
                if surviving <= 1e-9:
                    return 0.0
                chance *= (1.0 - durations.cdf(age + x)) / surviving
            return chance

        lo, hi = 0.0, 1.0
        while none_ended(hi) > 0.5:
            if hi > 1e6:  # the jobs are older than what was seen: no guess
                return Outlook(median, None)
            lo, hi = hi, hi * 2
        for _ in range(40):  # bisection to well under a step
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if none_ended(mid) > 0.5 else (lo, mid)
        return Outlook(median, max(0.0, origin + hi - now))


def _exp(x: float) -> float:
    """``math.exp``, at most about 10^304 (a week is 10^5.8 s: anything near is garbage
    in, and must not raise)."""
    return math.exp(min(x, 700.0))


def _spread(logs: list[float]) -> float:
    """The standard deviation of one account's log durations (0 for fewer than two)."""
    return statistics.stdev(logs) if len(logs) > 1 else 0.0


def _surely_at_least(chances: list[float], confidence: float) -> int:
    """The largest ``k`` with ``P(at least k of the events happened) >= confidence``, the
    events independent with the given ``chances`` (a Poisson-binomial tail).

    Only the :data:`TAIL_EVENTS` likeliest events are counted: quadratic in what it counts,
    and leaving events out only makes the answer smaller (never a probe too many).
    """
    dist = [1.0]  # dist[k] = P(exactly k so far)
    for p in sorted(chances, reverse=True)[:TAIL_EVENTS]:
        nxt = [0.0] * (len(dist) + 1)
        for k, q in enumerate(dist):
            nxt[k] += q * (1 - p)
            nxt[k + 1] += q * p
        dist = nxt
    tail = 0.0
    for k in range(len(dist) - 1, 0, -1):
        tail += dist[k]
        if tail >= confidence:
            return k
    return 0
