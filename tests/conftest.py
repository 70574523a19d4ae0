from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import structlog
import trio.testing
from structlog.typing import EventDict

from capgate import CapacityGate
from capgate.testing import FakeScheduler

#: the poll interval of behavioural tests: short, so that asyncio (real time) stays fast
P = 0.05

_FAKE_OPTIONS = ("job_duration", "list_full_accounts", "lag", "latency", "seed")


@contextlib.asynccontextmanager
async def invalidating(gate: Any, every: float) -> AsyncIterator[None]:
    """``gate.invalidate()`` every ``every`` seconds while the block runs, as completion
    callbacks would."""

    async def callbacks() -> None:
        while True:
            await anyio.sleep(every)
            gate.invalidate()

    async with anyio.create_task_group() as tg:
        tg.start_soon(callbacks)
        yield
        tg.cancel_scope.cancel()


@pytest.fixture(
    params=[
        pytest.param(("trio", {"clock": None}), id="trio"),
        pytest.param(("asyncio", {}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Both backends; trio runs on an autojump clock so virtual time is free.

    asyncio has no virtual clock, so tests marked ``trio_only`` (long scenarios) skip it.
    """
    name, options = request.param
    if name == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    if request.node.get_closest_marker("trio_only") is not None:
        pytest.skip("needs trio's virtual clock")
    return (name, options)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trio_only: runs only on trio's virtual clock")


GateFactory = Callable[..., tuple[CapacityGate, FakeScheduler]]


@pytest.fixture
async def make_gate() -> AsyncIterator[GateFactory]:
    """Build gates wired to fakes through httpx.MockTransport; closes them afterwards.

    ``make_gate(accounts_or_fake, job_duration=…, latency=…, …, **gate_options)``: the
    FakeScheduler options are taken out, the rest go to CapacityGate (``poll_interval``
    defaults to :data:`P`).
    """
    made: list[tuple[CapacityGate, httpx.AsyncClient]] = []

    def factory(
        accounts: dict[str, int] | FakeScheduler | None = None, /, **kwargs: Any
    ) -> tuple[CapacityGate, FakeScheduler]:
        fake_options = {k: kwargs.pop(k) for k in _FAKE_OPTIONS if k in kwargs}
        if isinstance(accounts, FakeScheduler):
            fake = accounts
        else:
            fake = FakeScheduler(
                accounts or {"a@x.io": 2},
                service=kwargs.get("service", "ltxstudio"),
                **fake_options,
            )
        client = httpx.AsyncClient(transport=kwargs.pop("transport", None) or fake.transport())
        kwargs.setdefault("service", fake.spec.name)
        kwargs.setdefault("poll_interval", P)
        token = kwargs.pop("token", fake.token)
        gate = CapacityGate(token, client=client, **kwargs)
        made.append((gate, client))
        return gate, fake

    yield factory
    for gate, client in made:
        await gate.aclose()
        await client.aclose()


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """Every structlog event capgate logs during the test."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def namespace() -> Iterator[str]:
    """A Redis namespace of its own for each fleet test; its keys are deleted afterwards."""
    import uuid

    from redis_support import delete_namespace

    name = f"capgate-test-{uuid.uuid4().hex[:12]}"
    yield name
    delete_namespace(name)
