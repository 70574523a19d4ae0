"""Google Flow's 429 reasons, and quarantines scoped to one model (issue 14, item 4)."""

from __future__ import annotations

import anyio
import httpx
import pytest

from capgate import AccountQuarantined, CapacityGate
from capgate.testing import FakeScheduler

pytestmark = pytest.mark.anyio

A, B = "a@x.io", "b@x.io"
PER_MODEL = "PUBLIC_ERROR_PER_MODEL_DAILY_QUOTA_REACHED"


def flow(**options):
    """A Google Flow fake (1 slot per account) and a gate on it, A before B."""
    fake = FakeScheduler({A: 1, B: 1}, service="google-flow", job_duration=1.0)
    client = httpx.AsyncClient(transport=fake.transport())
    gate = CapacityGate(
        fake.token,
        service="google-flow",
        client=client,
        max_jobs={A: 1, B: 1},
        accounts=[A, B],
        strategy="first_fit",
        poll_interval=0.05,
        **options,
    )

    async def create(account: str, model: str = "veo-3") -> httpx.Response:
        return await client.post(
            fake.create_url,
            json={"email": account, "model": model, "duration": 1.0},
            headers={"Authorization": f"Bearer {fake.token}"},
        )

    return fake, gate, client, create


def quarantined(gate: CapacityGate) -> dict[str, float | None]:
    return {r.account: r.quarantined_for for r in gate.statistics().accounts}


@pytest.mark.parametrize(
    "reason", ["PUBLIC_ERROR_USER_QUOTA_REACHED", "PUBLIC_ERROR_USER_REQUESTS_THROTTLED"]
)
async def test_account_reasons_quarantine_the_account_as_configured(reason):
    """A 429 naming an account-wide reason takes the account out for its configured time."""
    fake, gate, client, create = flow(cooldowns={reason: 90})
    fake.fail_account(A, 429, f"Google says {reason}")
    async with client:
        response = await gate.submit(create)
        assert response.status_code == 200
        assert [job.account for job in fake.jobs.values()] == [B]
        left = quarantined(gate)[A]
        assert left is not None
        assert 85 <= left <= 90
        await gate.aclose()


async def test_account_reason_default_is_thirty_minutes():
    """Without cooldowns=, USER_QUOTA_REACHED keeps the account out ~30 min (Jun 2026 docs)."""
    fake, gate, client, create = flow()
    fake.fail_account(A, 429, "PUBLIC_ERROR_USER_QUOTA_REACHED")
    async with client:
        await gate.submit(create)
        left = quarantined(gate)[A]
        assert left is not None
        assert 1790 <= left <= 1800
        await gate.aclose()


@pytest.mark.trio_only
async def test_per_model_reason_takes_out_only_that_model():
    """PER_MODEL_DAILY_QUOTA_REACHED takes out that model on the account; other models
    still get it, and the model comes back after the configured cooldown."""
    fake, gate, client, create = flow(cooldowns={PER_MODEL: 120})
    fake.fail_model(A, "veo-3", 429, f"quota: {PER_MODEL}")
    async with client:
        response = await gate.submit(create, model="veo-3")
        assert response.status_code == 200  # on B, after A refused veo-3
        assert quarantined(gate)[A] is None  # the account itself stays in rotation
        with pytest.raises(AccountQuarantined):
            async with gate.slot(account=A, model="veo-3", timeout=5):
                pass
        async with gate.slot(account=A, model="imagen", timeout=5) as slot:
            assert slot.account == A
        await anyio.sleep(121)
        fake.heal_account(A)
        async with gate.slot(account=A, model="veo-3", timeout=5) as slot:
            assert slot.account == A
        await gate.aclose()


async def test_gate_quarantine_for_one_model():
    """gate.quarantine(account, model=m) spares waiters for other models."""
    _fake, gate, client, _ = flow()
    async with client:
        await gate.refresh()
        gate.quarantine(A, 60, "quota", model="m1")
        async with gate.slot(account=A, model="m2", timeout=1) as slot:
            assert slot.account == A
        async with gate.slot(model="m1", timeout=1) as slot:
            assert slot.account == B
        await gate.aclose()


def test_cooldowns_are_checked():
    """cooldowns= names only the service's reasons, with seconds or "utc-midnight"."""
    with pytest.raises(ValueError, match=r"^cooldowns names 'NOPE', not a 429 reason of"):
        CapacityGate("t", service="google-flow", max_jobs={A: 1}, cooldowns={"NOPE": 1})
    gate = CapacityGate(
        "t", service="google-flow", max_jobs={A: 1}, cooldowns={PER_MODEL: "utc-midnight"}
    )
    assert {c.reason for c in gate._engine.config.cooldowns} >= {PER_MODEL}


async def test_a_model_quarantine_running_out_does_not_spin_the_driver(make_gate, monkeypatch):
    """A quarantine for one model ends while only waiters for any model wait: the driver
    sleeps on (seen by a review: it woke at once, again and again, at full CPU)."""
    from capgate._engine import local

    wakes = 0
    sleep = local.MemoryStore.wait

    async def counted(self: local.MemoryStore, waiter: object, timeout: float) -> None:
        nonlocal wakes
        wakes += 1
        assert wakes < 100, "the driver spins"
        await sleep(self, waiter, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(local.MemoryStore, "wait", counted)
    gate, _ = make_gate({"a@x.io": 1}, poll_interval=3600)
    async with gate.slot():  # holds the only slot
        gate.quarantine("a@x.io", 0.2, "per-model quota", model="m1")
        with anyio.move_on_after(1.2):
            async with gate.slot():
                pass
    assert wakes < 10
