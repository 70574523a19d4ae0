from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio.testing

from capgate import CapacityGate
from capgate.testing import FakeScheduler


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


GateFactory = Callable[..., CapacityGate]


@pytest.fixture
async def make_gate() -> AsyncIterator[Callable[..., tuple[CapacityGate, FakeScheduler]]]:
    """Build gates wired to fakes through httpx.MockTransport; closes them afterwards."""
    made: list[tuple[CapacityGate, httpx.AsyncClient]] = []

    def factory(
        accounts: dict[str, int] | FakeScheduler | None = None, **kwargs: Any
    ) -> tuple[CapacityGate, FakeScheduler]:
        if isinstance(accounts, FakeScheduler):
            fake = accounts
        else:
            fake = FakeScheduler(
                accounts or {"a@x.io": 2},
                service=kwargs.get("service", "ltxstudio"),
                job_duration=kwargs.pop("job_duration", 60.0),
            )
        client = httpx.AsyncClient(transport=fake.transport())
        kwargs.setdefault("service", fake.spec.name)
        gate = CapacityGate(fake.token, client=client, **kwargs)
        made.append((gate, client))
        return gate, fake

    yield factory
    for gate, client in made:
        await gate.aclose()
        await client.aclose()
