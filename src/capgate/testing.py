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
from typing import Any

import anyio
import httpx

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
    create path and create status from its entry, so this class knows no service by name.

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
    """

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
    ) -> None:
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
        """Where to POST a create request: ``{"<account key>": account, "duration": s}``
        (and ``"model"``). The service's own create path for the newer services; ``jobs``
        for the ``scheduler/available`` family, whose real create paths vary by kind."""
        return f"{self.spec.api_root}/{self.spec.create_path}"

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

    def _advance(self, now: float) -> None:
        """Start the outside jobs due by ``now``, each only if its account has room then."""
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
        )
        self.jobs[job.job_id] = job
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

    def fail_account(self, account: str, status: int, error: str = "") -> None:
        """Make create requests for ``account`` answer ``status`` (596, 412, 402…)."""
        self.create_faults[account] = (status, error or f"account {account} unavailable")

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
        account: str,
        *,
        duration: float | None = None,
        reply_url: str | None = None,
        reply_ref: str | None = None,
        model: str | None = None,
    ) -> FakeJob:
        """Create a job directly, as the create endpoint would.

        Raises:
            httpx.HTTPStatusError: The account is full (429) or failed (596/412/402…).
        """
        response = await self._create_response(
            {
                self.spec.account_key: account,
                "duration": duration,
                "replyUrl": reply_url,
                "replyRef": reply_ref,
                "model": model,
            },
            request=httpx.Request("POST", self.create_url),
        )
        response.raise_for_status()
        return self.jobs[str(response.json()[self.spec.job_id_keys[0]])]

    async def _create_response(self, body: Any, *, request: httpx.Request) -> httpx.Response:
        now = anyio.current_time()
        self._advance(now)
        if not isinstance(body, dict):
            return httpx.Response(
                400, json={"error": "body must be a JSON object"}, request=request
            )
        account = body.get(self.spec.account_key)
        if not isinstance(account, str) or account not in self.max_jobs:
            self.rejected_other += 1
            return httpx.Response(
                400, json={"error": f"unknown account {account!r}"}, request=request
            )
        model = body.get("model") if isinstance(body.get("model"), str) else None
        fault = self.create_faults.get(account)
        if fault is None and model is not None:
            fault = self.model_faults.get((account, model))
        if fault is not None:
            status, error = fault
            self.rejected_other += 1
            return httpx.Response(status, json={"error": error, "code": status}, request=request)
        if self.steal_next > 0 and self.active(account, now) < self.max_jobs[account]:
            self.steal_next -= 1
            self._start(account, now, self._duration(), outside=True)
        if self.active(account, now) >= self.max_jobs[account]:
            self.rejected_429 += 1
            return httpx.Response(
                429,
                json={"error": f"Account {account} is busy executing maximum jobs"},
                request=request,
            )
        self.creates += 1
        duration = body.get("duration")
        reply_url = body.get("replyUrl")
        reply_ref = body.get("replyRef")
        job = self._start(
            account,
            now,
            float(duration) if isinstance(duration, (int, float)) else self._duration(),
            reply_url=reply_url if isinstance(reply_url, str) else None,
            reply_ref=reply_ref if isinstance(reply_ref, str) else None,
            model=model,
        )
        self.models[job.job_id] = model
        if self.spec.sync_create and body.get("mode") != "async":
            await anyio.sleep(max(0.0, job.end - now))  # a sync create answers when done
        return httpx.Response(
            self.spec.create_status,
            json={
                self.spec.job_id_keys[0]: job.wire_id,
                self.spec.account_key: account,
                "status": "started",
            },
            request=request,
        )

    def snapshot_body(self, now: float | None = None, path: str | None = None) -> Any:
        """The JSON the capacity endpoint ``path`` (the main one by default) answers at ``now``."""
        now = anyio.current_time() if now is None else now
        self._advance(now)
        body = self.spec.source.fake_get(self, self.spec.source.path if path is None else path, now)
        return {} if body is NO_ROUTE else body

    # --- HTTP ----------------------------------------------------------------------------

    async def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one HTTP request (the MockTransport handler)."""
        self.requests += 1
        if self.latency:
            await anyio.sleep(self.latency)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return httpx.Response(401, json={"error": "Unauthorized", "code": 401}, request=request)
        path = request.url.path
        if request.method == "GET":
            relative = self._relative(path)
            now = anyio.current_time()
            self._advance(now)
            if self.spec.source.fake_get(self, relative, now) is not NO_ROUTE:
                return await self._poll_response(request, relative)
        if request.method == "POST" and path == httpx.URL(self.create_url).path:
            try:
                body = json.loads(await request.aread() or b"null")
            except ValueError:
                return httpx.Response(400, json={"error": "body is not JSON"}, request=request)
            return await self._create_response(body, request=request)
        if request.method == "DELETE" and "/scheduler/" in path:
            job_id = path.rsplit("/", 1)[-1]
            job = self.jobs.get(job_id)
            if job is None or not job.active(anyio.current_time()):
                return httpx.Response(404, json={"error": "not found"}, request=request)
            job.end = anyio.current_time()
            return httpx.Response(204, request=request)
        return httpx.Response(
            404, json={"error": f"no route {request.method} {path}"}, request=request
        )

    def _relative(self, path: str) -> str:
        """``path`` relative to the API root (or by its known ending, behind a proxy)."""
        root = httpx.URL(self.spec.api_root).path.rstrip("/")
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        main = self.spec.source.path
        if main and path.endswith("/" + main):
            return main
        return path.lstrip("/")

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

    async def run_callbacks(self) -> None:
        """Call ``on_job_done`` as each job ends, forever (run it in your task group).

        This is the one piece of the fake that needs a task: useapi posts to ``replyUrl``
        when a job ends, and so does this, through the hook.
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
            upcoming = [j.end for j in self.jobs.values() if j.end > now]
            if self._outside:
                upcoming.append(self._outside[0][0])
            await anyio.sleep(max(0.0, min(upcoming) - now) if upcoming else 1.0)

    # --- ASGI, for a real server ---------------------------------------------------------

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The same simulation as an ASGI application."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
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
        url = f"http://fake{scope['path']}" + (f"?{query}" if query else "")
        request = httpx.Request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.handle(request)
        except httpx.ConnectError:
            response = httpx.Response(502, json={"error": "injected disconnect"})
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
