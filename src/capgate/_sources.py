"""Capacity sources: how each useapi.net service tells how full its accounts are.

A :class:`CapacitySource` is the one seam between a service's API and the engine. It says
which endpoints are read and how often (every poll, or *rarely*: at the first poll, after a
429 or 596, and every few minutes), and turns their answers into the one
:class:`~capgate._models.Snapshot` shape the engine knows: per account a cap and a running
count, and the executing jobs (id, account, elapsed). It never touches httpx: it is handed
``get(path)``, which :mod:`capgate._poll` implements (the one place httpx errors are mapped).

Each source also answers for :class:`capgate.testing.FakeScheduler` (``fake_get``), so the
fake's knowledge of a shape lives beside the parser of that shape.

The shapes (``shared/reference/useapi-services.md``):

- :class:`SchedulerAvailable`: ``GET scheduler/available`` (the six original services).
- :class:`JobsByAccount`: a map account -> jobs on every poll (Dreamina ``GET scheduler``,
  Mureka and MiniMax agent ``GET jobs``), caps from a rare accounts read, the local
  ``max_jobs=`` or a documented default.
- :class:`JobList`: a flat list of jobs naming their account (Luma ``GET jobs``), caps from
  a rare accounts read.
- :class:`AccountsOnly`: caps only (Flow Music ``GET accounts``); running jobs are the gate's
  own reservations.
- :class:`OwnJobsOnly`: nothing to read (Google Flow): the gate's own running jobs against
  ``max_jobs=`` on the configured accounts.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._errors import PollError
from ._models import (
    AccountCapacity,
    ExecutingJob,
    RowError,
    SkippedRow,
    count_of,
    format_elapsed,
    parse_elapsed,
    parse_snapshot,
    started_of,
    text_of,
)

if TYPE_CHECKING:
    from ._services import Service
    from .testing import FakeScheduler

__all__ = [
    "RARE_EVERY",
    "AccountsOnly",
    "CapacitySource",
    "Get",
    "JobList",
    "JobsByAccount",
    "OwnJobsOnly",
    "ReadContext",
    "Reading",
    "SchedulerAvailable",
    "SourceCache",
    "format_elapsed",
    "parse_elapsed",
]

#: seconds between reads of the endpoints that change rarely (accounts, caps)
RARE_EVERY = 300.0

#: ``get(path)``: GET ``<API root>/<path>``, decoded JSON (``None`` for an empty answer)
Get = Callable[[str], Awaitable[Any]]

NO_ROUTE: Any = object()


# --- what a source reads with ----------------------------------------------------------


class SourceCache:
    """What one gate keeps between polls: the answers of the rarely read endpoints."""

    __slots__ = ("data", "expired", "read_at")

    def __init__(self) -> None:
        self.data: Any = None
        self.read_at: float | None = None
        self.expired = False

    def due(self, now: float, every: float) -> bool:
        """Whether the rare endpoints should be read on this poll."""
        return self.read_at is None or self.expired or now - self.read_at >= every

    def expire(self) -> None:
        """Read them again on the next poll (after a 429 or a 596: caps may have changed)."""
        self.expired = True


@dataclass(frozen=True)
class ReadContext:
    """What a source needs from the gate's configuration."""

    service: Service
    max_jobs: int | Mapping[str, int] | None
    accounts: tuple[str, ...] | None
    cache: SourceCache = field(default_factory=SourceCache)
    rare_every: float = RARE_EVERY

    def local_cap(self, account: str) -> int | None:
        caps = self.max_jobs
        return caps if caps is None or isinstance(caps, int) else caps.get(account)

    async def rare(self, now: float, load: Callable[[], Awaitable[Any]]) -> Any:
        """The rarely read data: loaded now if due, else what the last load gave."""
        cache = self.cache
        if cache.due(now, self.rare_every):
            cache.data = await load()
            cache.read_at = now
            cache.expired = False
        return cache.data


@dataclass
class Reading:
    """What one read produced, before it becomes a Snapshot."""

    accounts: list[AccountCapacity] = field(default_factory=list)
    executing: list[ExecutingJob] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)


def _mapping(data: Any, service: str, what: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PollError(f"{service}: {what} is a JSON {type(data).__name__}, not an object")
    return data


def _answer(data: Any, service: str, path: str, key: str) -> Mapping[str, Any]:
    """The polled endpoint's answer, which must hold ``key`` even when nothing runs (the
    documented idle answers do): an empty body, an empty 404 or a foreign object is a failed
    poll, not "nothing running", which would free every slot."""
    if not isinstance(data, Mapping) or key not in data:
        got = "an empty answer" if data is None else f"no {key!r} in the answer"
        raise PollError(f"{service}: GET {path}: {got}")
    return data


def _total_floor(data: Mapping[str, Any], counted: int) -> int:
    """Jobs a readable top-level count (Dreamina's and Mureka's ``total``, Luma's
    ``executing``) has beyond those counted on an account: each may be on any account."""
    for key in ("total", "executing"):
        value = data.get(key)
        if isinstance(value, Mapping | list):
            continue
        try:
            total = count_of(data, key)
        except RowError:
            continue
        if total is not None:
            return max(0, total - counted)
    return 0


def _row(account: str, cap: int | None, running: int) -> AccountCapacity:
    """A row for the accounting rule: ``available`` is what the cap leaves."""
    return AccountCapacity(account, cap, running, None if cap is None else max(0, cap - running))


def _job(row: Any, service: Service, account: str | None, id_keys: Sequence[str]) -> ExecutingJob:
    if not isinstance(row, Mapping):
        raise RowError("row is not an object")
    job_id = None
    for key in id_keys:
        job_id = text_of(row.get(key))
        if job_id is not None:
            break
    if job_id is None:
        raise RowError(f"no {' or '.join(id_keys)}")
    account = account or text_of(row.get("account")) or service.account_from_job_id(job_id)
    raw = NO_ROUTE
    for key in ("elapsedSeconds", "elapsed"):
        if key in row:
            raw = row[key]
            break
    elapsed = None if raw is NO_ROUTE else parse_elapsed(raw)
    text = raw if isinstance(raw, str) else (None if elapsed is None else f"{elapsed:g}s")
    return ExecutingJob(
        job_id=job_id,
        account=account,
        started=started_of(row.get("started", row.get("created"))),
        elapsed=text,
        elapsed_seconds=elapsed,
    )


# --- the sources --------------------------------------------------------------------------


class CapacitySource:
    """How one shape of answer is read (base class; see the module docstring).

    Attributes:
        polled: Endpoints read on every poll, relative to the API root.
        rare: Endpoints read rarely (at start, after a 429/596, every few minutes).
        capacity: How the cap and the running count are read, in words (``ServiceInfo``).
        error_unless: An answer of the main endpoint with an ``error`` and without this
            key failed (``"available"``: an error page is not "all busy").
    """

    polled: tuple[str, ...] = ()
    error_unless: str = ""
    rare: tuple[str, ...] = ()
    capacity: str = ""

    @property
    def path(self) -> str:
        """The main capacity endpoint (``""`` when nothing is read on each poll)."""
        return self.polled[0] if self.polled else ""

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        """Read the endpoints due and return the rows and jobs."""
        raise NotImplementedError

    def fake_get(self, fake: FakeScheduler, path: str, now: float) -> Any:
        """The body ``fake`` answers to ``GET <root>/<path>``; ``NO_ROUTE`` for no route."""
        return NO_ROUTE


@dataclass(frozen=True)
class SchedulerAvailable(CapacitySource):
    """``GET scheduler/available``: rows with ``maxJobs/executing/available``, and jobs."""

    polled: tuple[str, ...] = ("scheduler/available",)
    error_unless: str = "available"
    capacity: str = "GET scheduler/available: maxJobs, executing, available per account"

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        data = await get(self.polled[0])
        snapshot, skipped = parse_snapshot(data, ctx.service, requested_at=now, received_at=now)
        return Reading(list(snapshot.accounts), list(snapshot.executing), skipped)

    def fake_get(self, fake: FakeScheduler, path: str, now: float) -> Any:
        if path != self.polled[0]:
            return NO_ROUTE
        spec, seen = fake.spec, now - fake.lag
        available = []
        for account, max_jobs in fake.max_jobs.items():
            executing = fake.active(account, seen)
            free = max(0, max_jobs - executing)
            if free > 0 or fake.list_full_accounts:
                available.append(
                    {
                        spec.account_key: account,
                        "maxJobs": max_jobs,
                        "executing": executing,
                        "available": free,
                    }
                )
        rows = []
        for job in fake.running(seen):
            row: dict[str, Any] = {spec.job_id_keys[0]: job.wire_id}
            if spec.executing_account_key is not None:
                row[spec.executing_account_key] = job.account
            started = fake.wall_time(job.start)  # wall-clock, as useapi writes it
            if spec.fake_started == "epoch_ms":
                row["started"] = int(started.timestamp() * 1000)
            else:
                row["started"] = started.isoformat().replace("+00:00", "Z")
            row["elapsed"] = format_elapsed(seen - job.start, "mm:ss")
            row.update(spec.fake_extra)
            if job.reply_url:
                row["replyUrl"] = job.reply_url
            if job.reply_ref:
                row["replyRef"] = job.reply_ref
            rows.append(row)
        return {"executing": rows, "available": available}


@dataclass(frozen=True)
class JobsByAccount(CapacitySource):
    """Jobs grouped by account on every poll; caps from accounts read rarely, or local.

    Args:
        polled: The jobs endpoint (``("scheduler",)``, ``("jobs",)``, ``("agent/jobs",)``).
        jobs_key: Where the map account -> jobs is (``"executing"``, ``"accounts"``).
        job_list_key: Inside each account's value, the key of its job list (``"jobs"`` for
            Mureka), or ``""`` when the value is the list itself.
        count_key: Where a running count per account is, if any: ``"total"`` read inside
            each account's value, or ``"summary.executing"`` (MiniMax agent).
        accounts_key: A list of the configured accounts in the same answer, if any.
        job_id_keys: The job id's keys in a job row.
        caps_from: ``"accounts"``: each account's ``maxJobs`` from ``GET accounts/<a>``
            (Dreamina); ``""``: the local ``max_jobs=`` or the service's default cap.
        elapsed_style: How the fake writes ``elapsed``.
    """

    polled: tuple[str, ...] = ("jobs",)
    jobs_key: str = "accounts"
    job_list_key: str = "jobs"
    count_key: str = ""
    accounts_key: str = ""
    job_id_keys: tuple[str, ...] = ("jobid",)
    caps_from: str = ""
    elapsed_style: str = "mm:ss"
    capacity: str = ""

    @property
    def rare(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("accounts", "accounts/<account>") if self.caps_from == "accounts" else ()

    async def _caps(self, get: Get, ctx: ReadContext, now: float) -> dict[str, int | None]:
        async def load() -> dict[str, int | None]:
            names = ctx.accounts
            if names is None:
                listed = _mapping(await get("accounts"), ctx.service.name, "GET accounts")
                names = tuple(listed)
            caps: dict[str, int | None] = {}
            for name in names:
                try:
                    one = _mapping(
                        await get(f"accounts/{name}"),
                        ctx.service.name,
                        f"GET accounts/{name}",
                    )
                except PollError as exc:
                    if exc.status_code != 404:
                        raise  # the next poll loads them all again
                    # gone (deleted on useapi): a cap of 0, which a local max_jobs= cannot
                    # raise, so it is never granted (None would read as "unknown": local cap)
                    caps[name] = 0
                    continue
                try:
                    caps[name] = count_of(one, "maxJobs")
                except RowError:
                    caps[name] = None
            return caps

        caps: dict[str, int | None] = await ctx.rare(now, load)
        return caps

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        service = ctx.service
        caps = await self._caps(get, ctx, now) if self.caps_from == "accounts" else None
        data = _answer(await get(self.polled[0]), service.name, self.polled[0], self.jobs_key)
        groups = _mapping(data.get(self.jobs_key), service.name, repr(self.jobs_key))
        counts: Mapping[str, Any] = {}
        if self.count_key.startswith("summary."):
            counts = _mapping(data.get("summary"), service.name, "'summary'")
        names: dict[str, None] = dict.fromkeys(caps or ())
        listed = data.get(self.accounts_key) if self.accounts_key else None
        if isinstance(listed, list):
            names.update(dict.fromkeys(t for t in map(text_of, listed) if t))
        names.update(dict.fromkeys(str(k) for k in groups))
        names.update(dict.fromkeys(str(k) for k in counts))
        out = Reading()
        # every job listed counts on its account, an unreadable row too (it still runs)
        rows: list[tuple[str, int, list[ExecutingJob]]] = []
        for account in names:
            group = groups.get(account)
            jobs_raw: Any = group
            if self.job_list_key and isinstance(group, Mapping):
                jobs_raw = group.get(self.job_list_key)
            jobs: list[ExecutingJob] = []
            running = 0
            try:
                if group is not None and not isinstance(jobs_raw, list):
                    if not (self.count_key == "total" and isinstance(group, Mapping)):
                        raise RowError("its jobs are not a list")  # noqa: TRY301
                    jobs_raw = ()  # Mureka's total per account still counts them
                for index, row in enumerate(jobs_raw or ()):
                    try:
                        jobs.append(_job(row, service, account, self.job_id_keys))
                    except RowError as exc:
                        out.skipped.append(SkippedRow(self.jobs_key, index, str(exc)))
                    running += 1
                if self.count_key == "total" and isinstance(group, Mapping):
                    running = max(running, count_of(group, "total") or 0)
                elif self.count_key.startswith("summary."):
                    entry = counts.get(account)
                    if entry is not None and not isinstance(entry, Mapping):
                        raise RowError("its summary is not an object")  # noqa: TRY301
                    if entry is not None:
                        running = max(running, count_of(entry, "executing") or 0)
            except RowError as exc:  # left out: with no row, the account is never granted
                out.skipped.append(SkippedRow(self.jobs_key, 0, f"{account}: {exc}"))
                continue
            rows.append((account, running, jobs))
        unplaced = _total_floor(data, sum(running for _, running, _ in rows))
        for account, running, jobs in rows:
            running += unplaced
            cap = ctx.local_cap(account)
            if caps is not None and caps.get(account) is not None:
                server = caps[account]
                cap = server if cap is None or server is None else min(cap, server)
            elif cap is None:
                cap = service.default_max_jobs
            if cap is None:
                out.skipped.append(SkippedRow("accounts", 0, f"{account}: no cap known"))
                continue
            out.accounts.append(_row(account, cap, running))
            out.executing.extend(jobs)
        return out

    def fake_get(self, fake: FakeScheduler, path: str, now: float) -> Any:
        seen = now - fake.lag
        if self.caps_from == "accounts":
            if path == "accounts":
                return {a: {"account": a, "maxJobs": n} for a, n in fake.max_jobs.items()}
            for account, cap in fake.max_jobs.items():
                if path == f"accounts/{account}":
                    return {"account": account, "maxJobs": cap}
        if path != self.polled[0]:
            return NO_ROUTE
        groups: dict[str, Any] = {}
        for job in fake.running(seen):
            row = {
                self.job_id_keys[0]: job.job_id,
                ("elapsedSeconds" if self.elapsed_style == "int" else "elapsed"): format_elapsed(
                    seen - job.start, self.elapsed_style
                ),
            }
            if job.model:
                row["model"] = job.model
            groups.setdefault(job.account, []).append(row)
        body: dict[str, Any] = {}
        if self.job_list_key:
            body[self.jobs_key] = {
                a: {"total": len(js), self.job_list_key: js} for a, js in groups.items()
            }
            body["total"] = sum(len(js) for js in groups.values())
        else:
            body[self.jobs_key] = groups
            body["total"] = sum(len(js) for js in groups.values())
        if self.count_key.startswith("summary."):
            body["summary"] = {a: {"executing": len(js)} for a, js in groups.items()}
        if self.accounts_key:
            body[self.accounts_key] = list(fake.max_jobs)
        return body


@dataclass(frozen=True)
class JobList(CapacitySource):
    """A flat job list naming each job's account (Luma ``GET jobs``); caps read rarely
    from ``GET accounts`` (``{email: {concurrency}}``; a 404 there means none configured)."""

    polled: tuple[str, ...] = ("jobs",)
    rare: tuple[str, ...] = ("accounts",)
    cap_key: str = "concurrency"
    capacity: str = (
        "GET jobs (running jobs, each naming its account) every poll; "
        "GET accounts (concurrency) rarely"
    )

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        service = ctx.service

        async def load() -> Mapping[str, Any]:
            return _mapping(await get("accounts"), service.name, "GET accounts")

        accounts = await ctx.rare(now, load)
        data = _answer(await get(self.polled[0]), service.name, self.polled[0], "jobs")
        rows = data["jobs"]
        if not isinstance(rows, list):
            raise PollError(f"{service.name}: 'jobs' is not a list")
        out = Reading()
        running: dict[str, int] = {}
        unplaced = 0  # jobs whose account cannot be read: each may be on any account
        for index, row in enumerate(rows):
            account: str | None = None
            try:
                job = _job(row, service, None, ("jobid",))
            except RowError as exc:  # unreadable, but it still runs where it names
                out.skipped.append(SkippedRow("jobs", index, str(exc)))
                if isinstance(row, Mapping):
                    account = text_of(row.get("account"))
            else:
                out.executing.append(job)
                account = job.account
            if account is None:
                unplaced += 1
            else:
                running[account] = running.get(account, 0) + 1
        unplaced = max(unplaced, _total_floor(data, sum(running.values())))
        for index, (account, entry) in enumerate(accounts.items()):
            try:
                if not isinstance(entry, Mapping):
                    raise RowError("row is not an object")  # noqa: TRY301
                server = count_of(entry, self.cap_key)
            except RowError as exc:
                out.skipped.append(SkippedRow("accounts", index, str(exc)))
                continue
            local = ctx.local_cap(account)
            cap = local if server is None else server if local is None else min(server, local)
            if cap is None:
                out.skipped.append(SkippedRow("accounts", index, f"no {self.cap_key}"))
                continue
            out.accounts.append(_row(account, cap, running.get(account, 0) + unplaced))
        return out

    def fake_get(self, fake: FakeScheduler, path: str, now: float) -> Any:
        seen = now - fake.lag
        running = fake.running(seen)
        if path == "accounts":
            if not fake.max_jobs:
                return None  # documented: 404 with an empty body when none is configured
            return {
                a: {"account": a, "email": a, self.cap_key: n, "executing": fake.active(a, seen)}
                for a, n in fake.max_jobs.items()
            }
        if path == self.polled[0]:
            jobs = [
                {
                    "jobid": j.job_id,
                    "type": "video",
                    "account": j.account,
                    "model": j.model or "ray-v3-flash",
                    "created": fake.wall_time(j.start)
                    .isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
                }
                for j in running
            ]
            return {"executing": len(jobs), "jobs": jobs}
        return NO_ROUTE


@dataclass(frozen=True)
class AccountsOnly(CapacitySource):
    """Caps from ``GET accounts`` (``{email: {maxJobs}}``), read rarely; the running jobs
    are the gate's own reservations (the service's jobs list is not documented)."""

    rare: tuple[str, ...] = ("accounts",)
    capacity: str = "GET accounts (maxJobs) rarely; running jobs: the gate's own"

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        service = ctx.service

        async def load() -> Mapping[str, Any]:
            return _mapping(await get("accounts"), service.name, "GET accounts")

        accounts = await ctx.rare(now, load)
        if not accounts:
            # the full list of the token's accounts, not those with room: none is a setup
            # to fix (add one on useapi.net), not "all busy" to wait out
            raise PollError(f"{service.name}: GET accounts lists no account")
        out = Reading()
        for index, (account, entry) in enumerate(accounts.items()):
            try:
                if not isinstance(entry, Mapping):
                    raise RowError("row is not an object")  # noqa: TRY301
                server = count_of(entry, "maxJobs")
            except RowError as exc:
                out.skipped.append(SkippedRow("accounts", index, str(exc)))
                continue
            local = ctx.local_cap(account)
            cap = local if server is None else server if local is None else min(server, local)
            if cap is None:
                out.skipped.append(SkippedRow("accounts", index, "no maxJobs"))
                continue
            out.accounts.append(_row(account, cap, 0))
        return out

    def fake_get(self, fake: FakeScheduler, path: str, now: float) -> Any:
        if path == "accounts":
            return {
                a: {"email": a, "tier": "plus", "user_id": str(1000 + i), "maxJobs": n}
                for i, (a, n) in enumerate(fake.max_jobs.items())
            }
        return NO_ROUTE


@dataclass(frozen=True)
class OwnJobsOnly(CapacitySource):
    """Nothing to read: the configured accounts, each capped by ``max_jobs=``, running only
    the gate's own jobs (Google Flow publishes no cap and no documented jobs model)."""

    capacity: str = "nothing read: the gate's own running jobs against max_jobs="

    async def read(self, get: Get, ctx: ReadContext, now: float) -> Reading:
        out = Reading()
        for account in ctx.accounts or ():
            cap = ctx.local_cap(account)
            if cap is not None:
                out.accounts.append(_row(account, cap, 0))
        return out


def fake_job_id(service: Service, fake_n: int, account: str, rng_bits: int) -> str:
    """A job id in the service's own format (see ``Service.job_id_format``)."""
    return service.job_id_format.format(
        n=fake_n, account=account, uuid=uuid.UUID(int=rng_bits), name=service.name
    )
