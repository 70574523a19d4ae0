"""Fakes for testing code that uses capgate (and for capgate's own tests).

:class:`FakeScheduler` simulates one useapi.net service in memory: accounts with
``maxJobs``, jobs with durations, ``GET …/scheduler/available`` answering in that service's
field names, and a create endpoint that refuses a full account with 429 and counts every such
refusal. Time is read only through ``anyio.current_time()`` and jobs end lazily when a request
looks at them, so on trio's ``MockClock(autojump_threshold=0)`` a scenario of hours runs in
milliseconds::

    fake = FakeScheduler({"a@x.io": 5, "b@x.io": 3}, service="ltxstudio")
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        gate = CapacityGate(fake.token, service="ltxstudio", client=client)
        async with gate.slot() as slot:
            job = await fake.create(slot.account)       # or POST to fake.create_url
            slot.mark_submitted(job.job_id)

For a real server on loopback (for tools that are not Python, or for load tests), use
:func:`serve`, which runs the same simulation under uvicorn in a thread.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import socket
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import httpx

from ._fakeapi import Answer, Call, not_found
from ._services import Service, get_service
from ._sources import NO_ROUTE

__all__ = ["FakeJob", "FakeScheduler", "Fault", "serve"]


@dataclass
class FakeJob:
    """A job the fake runs: from ``start`` to ``end`` on ``account`` (virtual seconds)."""

    job_id: str
    account: str
    start: float
    end: float
    outside: bool = False
    reply_url: str | None = None
    reply_ref: str | None = None
    model: str | None = None
    failed: bool = False

    def active(self, t: float) -> bool:
        return self.start <= t < self.end

    @property
    def wire_id(self) -> str | int:
        """The id as the service writes it (Kling's ids are numbers)."""
        return int(self.job_id) if self.job_id.isdigit() else self.job_id


@dataclass
class Fault:
    """How the next poll(s) go wrong.

    Attributes:
        count: How many polls this fault applies to.
        status: Answer with this status (and ``body``) instead of the real answer.
        body: The body to send: bytes as they are, anything else as JSON. With no
            ``status`` it replaces the body of a 200 answer.
        headers: Extra response headers (``{"Retry-After": "3"}``).
        delay: Seconds to wait before answering (a slow server).
        disconnect: Fail the request with a connection error, as a dead server would.
    """

    count: int = 1
    status: int | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    disconnect: bool = False


class FakeScheduler:
    """An in-memory useapi.net service: its capacity endpoints, create, and running jobs.

    Every shape of :func:`capgate.services` is modelled: what each capacity endpoint
    answers comes from the service's source (``Service.source.fake_get``), the job ids,
    create path and create status from its entry, and its create answer, job status,
    ``GET accounts``, uploads and ``replyUrl`` body from its ``Service.fake_api``, so this
    class knows no service by name.

    How long a job runs is the fake's own setting (``job_duration``), never the
    ``duration`` of a create body: real clients put the video's length there. A test
    harness that needs one job to run a given time sends the :attr:`RUNTIME_HEADER`
    header (no real client sends it). A create that names no account goes to the account
    with the most free slots, as useapi picks one with room.

    Args:
        accounts: The cap per account (``maxJobs``, Luma's ``concurrency``; for services
            that publish none, the real limit the fake enforces with 429).
        service: Which service's URLs, shapes and field names to speak.
        token: The API token it accepts; anything else gets 401.
        job_duration: Seconds a created job runs: a number, a ``(low, high)`` range drawn
            uniformly, or a callable taking a ``random.Random``.
        list_full_accounts: Also list accounts with no free slot in ``available[]``.
            useapi's documented examples leave them out, so the default is ``False``.
        lag: The counts describe the state ``lag`` seconds ago (bookkeeping that lags).
        latency: Seconds every request takes.
        seed: Seeds the fake's random numbers (durations, job ids).
        reply_url: The account-level ``replyUrl`` (useapi's ``POST /v2/account``): where a
            job created without its own ``replyUrl`` is reported when it ends.
        fail_rate: The share of jobs that end failed instead of completed.
        wall_clock: Reads the wall-clock time once, to write ``started`` as useapi does
            (ISO time); ``datetime.now(timezone.utc)`` by default.
    """

    #: a request header giving the simulated running time of the job it creates, in
    #: seconds: the fake's own control for test harnesses (useapi has no such header)
    RUNTIME_HEADER = "X-Capgate-Fake-Runtime"

    def __init__(
        self,
        accounts: Mapping[str, int],
        *,
        service: str = "ltxstudio",
        token: str = "fake-token",  # noqa: S107 - a fake server's made-up token
        job_duration: float | tuple[float, float] | Callable[[random.Random], float] = 60.0,
        list_full_accounts: bool = False,
        lag: float = 0.0,
        latency: float = 0.0,
        seed: int = 0,
        reply_url: str | None = None,
        fail_rate: float = 0.0,
        wall_clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be between 0 and 1, got {fail_rate}")
        self.spec: Service = get_service(service)
        self.token = token
        self.max_jobs: dict[str, int] = dict(accounts)
        self.job_duration = job_duration
        self.list_full_accounts = list_full_accounts
        self.lag = lag
        self.latency = latency
        self.rng = random.Random(seed)
        self.jobs: dict[str, FakeJob] = {}
        self._live: dict[str, FakeJob] = {}
        self.faults: deque[Fault] = deque()
        self.create_faults: dict[str, tuple[int, str]] = {}
        self.model_faults: dict[tuple[str, str], tuple[int, str]] = {}
        self.models: dict[str, str | None] = {}  # job id -> model, for assertions
        self.steal_next = 0
        self.on_job_done: Callable[[FakeJob], Awaitable[None]] | None = None
        self.reply_url = reply_url
        self.fail_rate = fail_rate
        self.callbacks_sent: list[tuple[str, Any]] = []  # (url, body) POSTed to replyUrl
        self._wall_clock = wall_clock or (lambda: datetime.now(timezone.utc))
        self._wall0: tuple[datetime, float] | None = None
        self._wake: anyio.Event | None = None
        self._busy: list[tuple[str, int, float]] = []  # keep_busy() until the first request
        self._ids = itertools.count(1001)
        self._outside: list[tuple[float, str, float]] = []  # (start, account, duration)
        # what happened, for assertions
        self.polls = 0
        self.poll_times: list[float] = []
        self.creates = 0
        self.rejected_429 = 0
        self.rejected_other = 0
        self.unauthorized = 0
        self.requests = 0
        self.peak: dict[str, int] = dict.fromkeys(self.max_jobs, 0)
        self.completed = 0

    # --- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The main capacity URL (the service's real one: only the transport answers it);
        the API root for a service with no capacity endpoint."""
        return self.spec.url

    @property
    def base_url(self) -> str:
        """The API root (``https://api.useapi.net/v1/<service>``)."""
        return self.spec.api_root

    @property
    def create_url(self) -> str:
        """Where to POST a create request (``{"<account key>": account, ...}``): the
        service's documented create path (Kling ``videos/text2video``, MiniMax and PixVerse
        ``videos/create``, TemPolor ``music/song``…)."""
        return f"{self.spec.api_root}/{self.spec.create_path}"

    @property
    def create_paths(self) -> tuple[str, ...]:
        """Every create path the fake answers, relative to the API root."""
        return (self.spec.create_path, *self.spec.fake_api.more_create_paths)

    def transport(self) -> httpx.MockTransport:
        """An httpx transport answering every request from this simulation."""
        return httpx.MockTransport(self.handle)

    # --- the simulation ----------------------------------------------------------------

    def _duration(self) -> float:
        d = self.job_duration
        if callable(d):
            return float(d(self.rng))
        if isinstance(d, tuple):
            return self.rng.uniform(*d)
        return float(d)

    def _new_id(self, account: str) -> str:
        n = next(self._ids)
        form = self.spec.job_id_format
        # every service draws the same bits per job, shown or not: one seed gives the same
        # durations whichever service the fake speaks
        bits = self.rng.getrandbits(128)
        return form.format(n=n, account=account, uuid=uuid.UUID(int=bits), name=self.spec.name)

    def next_number(self) -> int:
        """The next of the fake's running numbers (job and file ids)."""
        return next(self._ids)

    def wall_time(self, t: float) -> datetime:
        """The wall-clock time of the fake's time ``t`` (``started`` as useapi writes it).

        The wall clock is read once, at the first call; from then on the fake's own clock
        (``anyio.current_time()``, virtual in tests) moves it.
        """
        if self._wall0 is None:
            self._wall0 = (self._wall_clock(), anyio.current_time())
        wall, t0 = self._wall0
        return wall + timedelta(seconds=t - t0)

    def _advance(self, now: float) -> None:
        """Start the outside jobs due by ``now``, each only if its account has room then."""
        if self._busy:
            self._start_busy(now)
        while self._outside and self._outside[0][0] <= now:
            start, account, duration = self._outside.pop(0)
            if self.active(account, start) < self.max_jobs.get(account, 0):
                self._start(account, start, duration, outside=True)
        # forget finished jobs no count can look at any more (they stay in self.jobs)
        horizon = now - self.lag
        if self._outside:
            horizon = min(horizon, self._outside[0][0])
        for job_id in [k for k, j in self._live.items() if j.end <= horizon]:
            del self._live[job_id]

    def _start(
        self,
        account: str,
        start: float,
        duration: float,
        *,
        outside: bool = False,
        reply_url: str | None = None,
        reply_ref: str | None = None,
        model: str | None = None,
    ) -> FakeJob:
        job = FakeJob(
            self._new_id(account),
            account,
            start,
            start + duration,
            outside,
            reply_url,
            reply_ref,
            model,
            # draw only when asked: a seed gives the same durations with or without failures
            failed=not outside and self.fail_rate > 0 and self.rng.random() < self.fail_rate,
        )
        self.jobs[job.job_id] = job
        if self._wake is not None:
            self._wake.set()  # run_callbacks sleeps until the next end: this one may be sooner
        self._live[job.job_id] = job
        running = self.active(account, start)
        if running > self.peak.get(account, 0):
            self.peak[account] = running
        return job

    def active(self, account: str, t: float | None = None) -> int:
        """Jobs running on ``account`` at ``t`` (now by default), by the true state."""
        t = anyio.current_time() if t is None else t
        return sum(1 for j in self._live.values() if j.account == account and j.active(t))

    def running(self, t: float | None = None) -> list[FakeJob]:
        """Every job running at ``t`` (now by default)."""
        t = anyio.current_time() if t is None else t
        return [j for j in self._live.values() if j.active(t)]

    def add_outside_job(self, account: str, duration: float, *, at: float | None = None) -> None:
        """Load from outside the gate: a job starts on ``account`` at ``at`` (now by default)
        if the account has room then (a person on the provider's site, another program)."""
        at = anyio.current_time() if at is None else at
        self._outside.append((at, account, duration))
        self._outside.sort()
        self._advance(anyio.current_time())

    def keep_busy(self, account: str, slots: int, *, hours: float = 24.0) -> None:
        """Outside load: ``slots`` of ``account``'s slots run jobs started outside the gate,
        back to back for ``hours`` (each of the fake's ``job_duration``), from the first
        request on (so it can be set up before the server's event loop runs)."""
        self._busy.append((account, slots, hours))

    def _start_busy(self, now: float) -> None:
        while self._busy:
            account, slots, hours = self._busy.pop(0)
            for _ in range(slots):
                at = now
                while at < now + hours * 3600.0:
                    duration = self._duration()
                    self._outside.append((at, account, duration))
                    at += duration
            self._outside.sort()

    def fail_account(self, account: str, status: int, error: str = "") -> None:
        """Make create requests for ``account`` answer ``status`` (596, 412, 402, 502, 504),
        with ``error`` as the body's text (by default, what the status means at useapi)."""
        self.create_faults[account] = (status, error or _fault_text(status, account))

    def heal_account(self, account: str) -> None:
        """Undo :meth:`fail_account` (and :meth:`fail_model` on that account)."""
        self.create_faults.pop(account, None)
        for key in [k for k in self.model_faults if k[0] == account]:
            del self.model_faults[key]

    def fail_model(self, account: str, model: str, status: int, error: str) -> None:
        """Make create requests for ``model`` on ``account`` answer ``status`` (a per-model
        quota: Google Flow's ``PUBLIC_ERROR_PER_MODEL_DAILY_QUOTA_REACHED``)."""
        self.model_faults[(account, model)] = (status, error)

    def inject(self, *faults: Fault) -> None:
        """Queue faults for the next polls, in order.

        Each fault is copied: the fake counts its uses down on the copy, so one ``Fault``
        can be reused (in another fake, or a parametrized test).
        """
        self.faults.extend(replace(f) for f in faults)

    async def create(
        self,
        account: str | None = None,
        *,
        duration: float | None = None,
        reply_url: str | None = None,
        reply_ref: str | None = None,
        model: str | None = None,
    ) -> FakeJob:
        """Create a job directly, as the create endpoint would.

        Args:
            account: The account, or ``None`` to let the fake pick one with room.
            duration: How long this job runs (by default, the fake's ``job_duration``).
            reply_url: Where to report the job when it ends.
            reply_ref: Echoed in that report.
            model: The job's model (for per-model faults).

        Raises:
            httpx.HTTPStatusError: The account is full (429) or failed (596/412/402…).
        """
        body: dict[str, Any] = {"replyUrl": reply_url, "replyRef": reply_ref, "model": model}
        if account is not None:
            body[self.spec.account_key] = account
        response = await self._create_response(
            body, request=httpx.Request("POST", self.create_url), runtime=duration
        )
        response.raise_for_status()
        return self.jobs[str(self.spec.job_id_from(response.json()))]

    def _pick_account(self, now: float) -> str | None:
        """useapi's choice for a create that names no account: one with room (the most
        free slots, the first configured on a tie), leaving out the failing accounts."""
        best: tuple[int, str] | None = None
        for account, cap in self.max_jobs.items():
            if account in self.create_faults:
                continue
            free = cap - self.active(account, now)
            if free > 0 and (best is None or free > best[0]):
                best = (free, account)
        return None if best is None else best[1]

    async def _create_response(
        self, body: Any, *, request: httpx.Request, runtime: float | None = None
    ) -> httpx.Response:
        now = anyio.current_time()
        self._advance(now)
        if not isinstance(body, dict):
            self.rejected_other += 1
            return _json_response(400, _error("Request body must be a JSON object", 400), request)
        named = body.get(self.spec.account_key)
        if named is None:
            account = self._pick_account(now)
            if account is None:
                self.rejected_429 += 1
                text = "All configured accounts are busy executing maximum jobs"
                return _json_response(429, {"error": text}, request)
        elif isinstance(named, str) and named in self.max_jobs:
            account = named
        else:
            self.rejected_other += 1
            text = f"Account {named} not found; configured: {', '.join(self.max_jobs)}"
            return _json_response(400, _error(text, 400), request)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        fault = self.create_faults.get(account)
        if fault is None and model is not None:
            fault = self.model_faults.get((account, model))
        if fault is not None:
            status, error = fault
            self.rejected_other += 1
            return _json_response(status, _error(error, status), request)
        if self.steal_next > 0 and self.active(account, now) < self.max_jobs[account]:
            self.steal_next -= 1
            self._start(account, now, self._duration(), outside=True)
        if self.active(account, now) >= self.max_jobs[account]:
            self.rejected_429 += 1
            return _json_response(
                429, {"error": f"Account {account} is busy executing maximum jobs"}, request
            )
        self.creates += 1
        # a body's `duration` is the length of the video asked for, never the running time
        reply_url = body.get("replyUrl")
        reply_ref = body.get("replyRef")
        job = self._start(
            account,
            now,
            self._duration() if runtime is None else runtime,
            reply_url=reply_url if isinstance(reply_url, str) else None,
            reply_ref=reply_ref if isinstance(reply_ref, str) else None,
            model=model,
        )
        self.models[job.job_id] = model
        asynchronous = self.spec.sync_create and body.get("mode") == "async"
        if self.spec.sync_create and not asynchronous:
            await anyio.sleep(max(0.0, job.end - now))  # a sync create answers when done
        call = Call(self, now, _origin(request), {}, asynchronous=asynchronous)
        status = 201 if asynchronous else self.spec.create_status  # documented: async 201
        return _json_response(status, self.spec.fake_api.create_answer(call, job), request)

    def snapshot_body(self, now: float | None = None, path: str | None = None) -> Any:
        """The JSON the capacity endpoint ``path`` (the main one by default) answers at ``now``."""
        now = anyio.current_time() if now is None else now
        self._advance(now)
        body = self.spec.source.fake_get(self, self.spec.source.path if path is None else path, now)
        return {} if body is NO_ROUTE else body

    # --- HTTP ----------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one HTTP request (the MockTransport handler).

        Only the service's documented paths answer, under its own API root (``/v2/pixverse``
        for PixVerse); a path ending in one ``/`` is the same path. Anything else is useapi's
        JSON 404.
        """
        self.requests += 1
        if self.latency:
            await anyio.sleep(self.latency)
        path = request.url.path
        if request.method == "GET" and path.startswith(_MEDIA_PREFIX):
            # the provider's CDN links need no token; the fake serves a few stand-in bytes
            return httpx.Response(
                200, content=_MEDIA, headers={"content-type": "video/mp4"}, request=request
            )
        if request.headers.get("authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return _json_response(401, {"error": "Unauthorized", "code": 401}, request)
        if request.method == "POST" and path.rstrip("/") == "/v2/account":
            return await self._account_settings(request)
        relative = self._relative(path)
        if relative is None:
            return _json_response(404, _error(f"Path {path} not found", 404), request)
        now = anyio.current_time()
        self._advance(now)
        api = self.spec.fake_api
        call = Call(
            self,
            now,
            _origin(request),
            dict(request.url.params),
            request.headers.get("content-type", ""),
        )
        answer: Answer | None = None
        if request.method == "GET":
            if self.spec.source.fake_get(self, relative, now) is not NO_ROUTE:
                return await self._poll_response(request, relative)
            accounts = api.accounts(call) if relative == "accounts" else None
            if accounts is not None:
                return _json_response(200, accounts, request)
            job_id = api.status_job_id(relative)
            if job_id is not None:
                job = self.jobs.get(job_id)
                known = job is not None and not job.outside
                answer = api.status(call, job) if job is not None and known else None
                answer = answer or not_found(f"Job {job_id}")
            else:
                answer = api.get(call, relative)
        elif request.method == "POST":
            if relative in self.create_paths:
                try:
                    body = json.loads(await request.aread() or b"null")
                except ValueError:
                    self.rejected_other += 1
                    return _json_response(400, _error("Request body is not JSON", 400), request)
                return await self._create_response(body, request=request, runtime=_runtime(request))
            answer = api.post(call, relative, await request.aread())
        elif request.method == "DELETE" and relative.startswith("scheduler/"):
            job = self.jobs.get(relative.removeprefix("scheduler/"))
            if job is None or not job.active(now):
                return _json_response(404, _error("Job not found", 404), request)
            job.end = now
            return httpx.Response(204, request=request)
        if answer is None:
            return _json_response(404, _error(f"{request.method} {path} not found", 404), request)
        return _json_response(answer.status, answer.body, request)

    async def _account_settings(self, request: httpx.Request) -> httpx.Response:
        """``POST /v2/account`` with ``{"replyUrl": …}``: the account-level callback URL."""
        try:
            body = json.loads(await request.aread() or b"null")
        except ValueError:
            body = None
        reply_url = body.get("replyUrl") if isinstance(body, dict) else None
        if not isinstance(reply_url, str) or len(reply_url) > 1024:
            text = "replyUrl must be a string of at most 1024 characters"
            return _json_response(400, _error(text, 400), request)
        self.reply_url = reply_url or None
        return _json_response(200, {"replyUrl": reply_url}, request)

    def _relative(self, path: str) -> str | None:
        """``path`` relative to the API root, without one trailing ``/``; ``None`` when it
        is not under the root (``/v1/pixverse/…`` for the ``v2`` PixVerse)."""
        root = httpx.URL(self.spec.api_root).path.rstrip("/")
        if path in (root, root + "/"):
            return ""
        if not path.startswith(root + "/"):
            return None
        relative = path[len(root) + 1 :]
        return relative[:-1] if relative.endswith("/") else relative

    async def _poll_response(self, request: httpx.Request, relative: str) -> httpx.Response:
        now = anyio.current_time()
        main = self.spec.source.path
        if relative == main or not main:  # the per-poll endpoint (or the only one) is a poll
            self.polls += 1
            self.poll_times.append(now)
        fault = None
        if self.faults:
            fault = self.faults[0]
            fault.count -= 1
            if fault.count <= 0:
                self.faults.popleft()
        if fault is not None:
            if fault.delay:
                await anyio.sleep(fault.delay)
            if fault.disconnect:
                raise httpx.ConnectError("connection refused (injected)", request=request)
            if fault.status is not None or fault.body is not None:
                body = fault.body
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                return httpx.Response(
                    fault.status or 200,
                    content=content,
                    headers={"content-type": "application/json", **dict(fault.headers)},
                    request=request,
                )
        body = self.snapshot_body(anyio.current_time(), relative)
        if body is None:  # documented as a 404 with an empty body (Luma, no accounts)
            return httpx.Response(404, request=request)
        return httpx.Response(200, json=body, request=request)

    # --- completion callbacks ------------------------------------------------------------

    async def run_callbacks(self, client: httpx.AsyncClient | None = None) -> None:
        """Report each job as it ends, forever (run it in your task group).

        This is the one piece of the fake that needs a task: useapi POSTs to ``replyUrl``
        when a job completes or fails, and so does this: with ``client``, each job we
        created that has a ``replyUrl`` (its own, or the account-level :attr:`reply_url`)
        gets the service's "get job" answer POSTed there (recorded in
        :attr:`callbacks_sent`); ``on_job_done`` is called for every job that ends.
        :func:`serve` runs it with a client of its own.
        """
        done: set[str] = set()
        while True:
            now = anyio.current_time()
            self._advance(now)
            ending = [j for j in self.jobs.values() if j.end <= now and j.job_id not in done]
            for job in sorted(ending, key=lambda j: j.end):
                done.add(job.job_id)
                self.completed += 1
                if self.on_job_done is not None:
                    await self.on_job_done(job)
                if client is not None and not job.outside:
                    await self._post_callback(client, job, now)
            upcoming = [j.end for j in self.jobs.values() if j.end > now]
            if self._outside:
                upcoming.append(self._outside[0][0])
            self._wake = anyio.Event()
            with anyio.move_on_after(max(0.0, min(upcoming) - now) if upcoming else 1.0):
                await self._wake.wait()

    async def _post_callback(self, client: httpx.AsyncClient, job: FakeJob, now: float) -> None:
        url = job.reply_url or self.reply_url
        if not url:
            return
        body = self.spec.fake_api.callback_body(Call(self, now, _origin_of(url), {}), job)
        self.callbacks_sent.append((url, body))
        # the receiver's trouble is its own: useapi documents no retry
        with contextlib.suppress(httpx.HTTPError):
            await client.post(url, json=body, timeout=10.0)

    # --- ASGI, for a real server ---------------------------------------------------------

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The same simulation as an ASGI application."""
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] != "lifespan.startup":
                return
            await send({"type": "lifespan.startup.complete"})
            # the server's lifetime: the replyUrl callbacks run beside the requests
            async with anyio.create_task_group() as tg, httpx.AsyncClient() as client:
                tg.start_soon(self.run_callbacks, client)
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
                tg.cancel_scope.cancel()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        host = dict(headers).get("host", "fake")
        url = f"http://{host}{scope['path']}" + (f"?{query}" if query else "")
        request = httpx.Request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.handle(request)
        except httpx.ConnectError:
            response = _json_response(502, _error("Bad Gateway", 502), request)
        content = await response.aread()
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in response.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding")
                ]
                + [(b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})


_MEDIA_PREFIX = "/fake-cdn/"
_MEDIA = b"\x00\x00\x00\x18ftypmp42capgate fake media"

#: what useapi's account-level errors mean (``useapi-scheduler.md``), as the fake says them
_FAULT_TEXT = {
    596: "Account {account} is on hold: session expired, CAPTCHA or moderation pending",
    412: "Account {account} has insufficient credits",
    402: "Account has no subscription or subscription expired",
    502: "Bad Gateway: the provider is too busy, try again later",
    504: "Gateway Timeout: the provider is too busy, try again later",
}


def _fault_text(status: int, account: str) -> str:
    return _FAULT_TEXT.get(status, "Account {account} is unavailable").format(account=account)


def _error(text: str, code: int) -> dict[str, Any]:
    """useapi's error body: ``{"error": text, "code": status}``."""
    return {"error": text, "code": code}


def _json_response(status: int, body: Any, request: httpx.Request) -> httpx.Response:
    if body is None:
        return httpx.Response(status, request=request)
    return httpx.Response(status, json=body, request=request)


def _origin(request: httpx.Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"


def _origin_of(url: str) -> str:
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}"


def _runtime(request: httpx.Request) -> float | None:
    """The :attr:`FakeScheduler.RUNTIME_HEADER` seconds, if the request sends them."""
    raw = request.headers.get(FakeScheduler.RUNTIME_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(fake: FakeScheduler, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``fake`` over real HTTP on loopback (uvicorn, in a thread); yields its URL.

    The yielded URL is the scheduler endpoint (``http://127.0.0.1:PORT/v1/<svc>/scheduler/
    available``); ``fake.create_url``'s path on the same host creates jobs. Needs uvicorn
    (the ``cli`` or ``test`` extra).
    """
    import uvicorn

    port = port or _free_port(host)
    config = uvicorn.Config(
        fake.asgi,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        access_log=False,
        # a bound method is not a coroutine *function* to uvicorn's sniffing, which would
        # take it for ASGI2 and fail at startup
        interface="asgi3",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="capgate-fake-server", daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            if not thread.is_alive():
                raise RuntimeError(f"the fake server did not start on {host}:{port}")
            threading.Event().wait(0.01)
        else:
            raise RuntimeError(f"the fake server did not start on {host}:{port} within 5 s")
        path = httpx.URL(fake.url).path
        yield f"http://{host}:{port}{path}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
