"""A few tests over real HTTP on 127.0.0.1: the fake under uvicorn, the gate's own client.

Real sockets rule out trio's autojump clock, so these run on the plain backends with short,
real intervals.
"""

from __future__ import annotations

from contextlib import aclosing

import anyio
import httpx
import pytest

from capgate import AuthenticationError, CapacityGate
from capgate.testing import FakeScheduler, Fault, serve

pytestmark = [pytest.mark.anyio, pytest.mark.loopback]

A, B = "a@x.io", "b@x.io"
P = 0.05


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Plain backends with the real clock: sockets and a virtual clock do not mix."""
    return str(request.param)


@pytest.fixture
def served():
    """Serve a fake on loopback; yields ``(fake, url)``."""
    fake = FakeScheduler({A: 2, B: 2}, job_duration=0.2)
    with serve(fake) as url:
        yield fake, url


async def create(client: httpx.AsyncClient, fake: FakeScheduler, url: str, account: str) -> str:
    """POST a create request to the served fake; returns the job id."""
    create_url = url.replace("/scheduler/available", "/jobs")
    response = await client.post(
        create_url,
        json={"email": account, "duration": 0.2},
        headers={"Authorization": f"Bearer {fake.token}"},
    )
    response.raise_for_status()
    return str(response.json()["jobId"])


async def test_serve_yields_loopback_scheduler_url(served):
    """serve() yields an http://127.0.0.1 URL ending in the service's path."""
    _, url = served
    assert url.startswith("http://127.0.0.1:")
    assert url.endswith("/v1/ltxstudio/scheduler/available")


async def test_grant_and_release_over_http(served):
    """A slot is granted from a real answer, and its listed job id releases it."""
    fake, url = served
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    async with aclosing(gate), httpx.AsyncClient() as client:
        async with gate.slot() as slot:
            job_id = await create(client, fake, url, slot.account)
            await gate.refresh()
            slot.mark_submitted(job_id)
        assert gate.statistics().reserved == 0
    assert fake.polls == 2


async def test_no_oversubscription_over_http(served):
    """Twelve workers over real HTTP never draw a 429."""
    fake, url = served
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    async with aclosing(gate), httpx.AsyncClient() as client:

        async def worker() -> None:
            async with gate.slot() as slot:
                slot.mark_submitted(await create(client, fake, url, slot.account))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(worker)
    assert fake.creates == 12
    assert fake.rejected_429 == 0


async def test_401_over_http(served):
    """A refused token over real HTTP raises AuthenticationError."""
    fake, url = served
    gate = CapacityGate("not-the-token", url=url, poll_interval=P)
    async with aclosing(gate):
        with pytest.raises(AuthenticationError, match=r"^ltxstudio: the API token was refused"):
            async with gate.slot():
                pass  # pragma: no cover
    assert fake.unauthorized == 1


async def test_faults_over_http_are_retried(served):
    """A 500 and a dropped connection over real HTTP are retried until a good answer."""
    fake, url = served
    fake.inject(Fault(status=500, body={"error": "oops"}), Fault(disconnect=True))
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    async with aclosing(gate):
        with anyio.fail_after(30):
            async with gate.slot() as slot:
                assert slot.account in (A, B)
        assert gate.statistics().polls_failed == 2


async def test_aclose_during_a_slow_poll(served):
    """Closing the gate while its poll is on the wire fails the waiter with GateClosed."""
    from capgate import GateClosed

    fake, url = served
    fake.latency = 0.5
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    errors: list[BaseException] = []

    async def wait() -> None:
        try:
            async with gate.slot():
                pass  # pragma: no cover
        except GateClosed as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # the request is on the wire
            await gate.aclose()
    assert len(errors) == 1


async def test_oversized_answer_is_a_failed_poll(served):
    """An answer over 1 MiB from a real server is refused as a failed poll, then retried."""
    fake, url = served
    fake.inject(Fault(body=b" " * (2 * 1024 * 1024) + b"{}"))
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    async with aclosing(gate):
        with anyio.fail_after(30):
            async with gate.slot():
                pass
        assert gate.statistics().polls_failed == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # real seconds: one backend is enough
async def test_the_gates_own_client_waits_out_poll_timeout_not_httpxs_5_s(served):
    """Regression: the gate's own client kept httpx's 5 s default timeout, so an answer
    taking 5-30 s failed every poll though ``poll_timeout`` (30 s) allowed it."""
    fake, url = served
    fake.latency = 5.5
    gate = CapacityGate(fake.token, url=url, poll_interval=P)
    async with aclosing(gate):
        snapshot = await gate.refresh()
    assert snapshot.accounts
