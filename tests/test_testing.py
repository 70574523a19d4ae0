"""The FakeScheduler itself: its simulation, its HTTP answers and its faults."""

from __future__ import annotations

import anyio
import httpx
import pytest

from capgate.testing import FakeScheduler, Fault

pytestmark = pytest.mark.anyio

A, B = "a@x.io", "b@x.io"


async def get(fake: FakeScheduler, token: str | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        headers = {"Authorization": f"Bearer {token or fake.token}"}
        return await client.get(fake.url, headers=headers)


async def test_full_accounts_left_out_by_default():
    """Like useapi's examples, available[] lists only accounts with a free slot."""
    fake = FakeScheduler({A: 1, B: 2})
    await fake.create(A)
    body = fake.snapshot_body()
    assert [row["email"] for row in body["available"]] == [B]
    assert [row["email"] for row in body["executing"]] == [A]


async def test_list_full_accounts():
    """list_full_accounts=True lists every account, with available 0 when full."""
    fake = FakeScheduler({A: 1}, list_full_accounts=True)
    await fake.create(A)
    assert fake.snapshot_body()["available"] == [
        {"email": A, "maxJobs": 1, "executing": 1, "available": 0}
    ]


async def test_create_answers_429_when_full_and_counts_it():
    """Creating on a full account is a 429, counted in rejected_429."""
    fake = FakeScheduler({A: 1})
    await fake.create(A)
    with pytest.raises(httpx.HTTPStatusError, match=r"^Client error '429 Too Many Requests'"):
        await fake.create(A)
    assert (fake.creates, fake.rejected_429, fake.peak[A]) == (1, 1, 1)


async def test_jobs_end_after_their_duration():
    """A job runs for its duration in (virtual) time, then frees its slot."""
    fake = FakeScheduler({A: 1}, job_duration=0.1)
    job = await fake.create(A)
    assert fake.active(A) == 1
    assert job.end - job.start == pytest.approx(0.1)
    await anyio.sleep(0.1)
    assert fake.active(A) == 0
    await fake.create(A)  # room again


async def test_duration_range_and_seed():
    """A (low, high) duration is drawn from the seeded generator: repeatable."""

    async def durations(seed: int) -> list[float]:
        fake = FakeScheduler({A: 10}, job_duration=(30, 120), seed=seed)
        return [(j.end - j.start) for j in [await fake.create(A) for _ in range(5)]]

    first = await durations(7)
    # end - start is computed on a clock that moves between runs: equal up to rounding
    assert await durations(7) == pytest.approx(first)
    assert all(30 <= d <= 120 for d in first)


async def test_wrong_token_is_401():
    """Any other token gets the documented 401 body."""
    fake = FakeScheduler({A: 1})
    response = await get(fake, token="nope")
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized", "code": 401}
    assert (fake.unauthorized, fake.polls) == (1, 0)


async def test_poll_over_http_counts_and_times():
    """GET scheduler/available answers 200 and records when it was polled."""
    fake = FakeScheduler({A: 2})
    response = await get(fake)
    assert response.json()["available"][0] == {
        "email": A,
        "maxJobs": 2,
        "executing": 0,
        "available": 2,
    }
    assert fake.polls == 1
    assert len(fake.poll_times) == 1


async def test_lagging_counts():
    """With lag, the counts describe the state lag seconds ago."""
    fake = FakeScheduler({A: 2}, lag=0.2)
    await fake.create(A, duration=10)
    assert fake.snapshot_body()["available"][0]["executing"] == 0
    await anyio.sleep(0.2)
    assert fake.snapshot_body()["available"][0]["executing"] == 1


async def test_outside_job_needs_room():
    """Load from outside starts only on an account with room."""
    fake = FakeScheduler({A: 1})
    fake.add_outside_job(A, duration=10)
    fake.add_outside_job(A, duration=10)
    assert fake.active(A) == 1
    assert fake.running()[0].outside


async def test_outside_job_later():
    """An outside job can be scheduled to start later."""
    fake = FakeScheduler({A: 1})
    fake.add_outside_job(A, duration=10, at=anyio.current_time() + 0.1)
    assert fake.active(A) == 0
    await anyio.sleep(0.1)
    assert fake.snapshot_body()["available"] == []


async def test_steal_next_takes_the_slot_first():
    """steal_next makes an outside job take the slot just before a create: a 429."""
    fake = FakeScheduler({A: 1})
    fake.steal_next = 1
    with pytest.raises(httpx.HTTPStatusError, match=r"^Client error '429"):
        await fake.create(A)
    assert fake.rejected_429 == 1
    assert fake.steal_next == 0


async def test_failed_account():
    """fail_account makes creates answer the given status until healed."""
    fake = FakeScheduler({A: 1})
    fake.fail_account(A, 596, "session expired")
    with pytest.raises(httpx.HTTPStatusError, match=r"^Server error '596"):
        await fake.create(A)
    fake.heal_account(A)
    await fake.create(A)
    assert fake.rejected_other == 1


async def test_fault_applies_count_times():
    """A fault covers ``count`` polls, then the real answer comes back."""
    fake = FakeScheduler({A: 1})
    fake.inject(Fault(count=2, status=503, body={"error": "down"}, headers={"Retry-After": "3"}))
    first, second, third = [await get(fake) for _ in range(3)]
    assert (first.status_code, second.status_code, third.status_code) == (503, 503, 200)
    assert first.headers["retry-after"] == "3"
    assert first.json() == {"error": "down"}


async def test_fault_bytes_body():
    """A bytes body is sent as it is (garbage)."""
    fake = FakeScheduler({A: 1})
    fake.inject(Fault(body=b"\x00garbage"))
    response = await get(fake)
    assert (response.status_code, response.content) == (200, b"\x00garbage")


async def test_fault_disconnect():
    """A disconnect fault fails the request like a dead server."""
    fake = FakeScheduler({A: 1})
    fake.inject(Fault(disconnect=True))
    with pytest.raises(httpx.ConnectError, match=r"^connection refused \(injected\)$"):
        await get(fake)


async def test_fault_delay():
    """A delay fault answers late (virtual time on trio)."""
    fake = FakeScheduler({A: 1})
    fake.inject(Fault(delay=0.2))
    before = anyio.current_time()
    response = await get(fake)
    assert response.status_code == 200
    assert anyio.current_time() - before >= 0.2


async def test_create_and_delete_over_http():
    """POST creates a job named by the service's account key; DELETE stops it."""
    fake = FakeScheduler({"u1": 1}, service="tempolor")
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        headers = {"Authorization": f"Bearer {fake.token}"}
        created = await client.post(fake.create_url, json={"user_id": "u1"}, headers=headers)
        job_id = created.json()["jobs"][0]
        assert job_id.startswith("user:4242-tempolor:u1-job:")
        assert fake.active("u1") == 1
        base = fake.url.rsplit("/", 1)[0]
        deleted = await client.delete(f"{base}/{job_id}", headers=headers)
        assert deleted.status_code == 204
        assert fake.active("u1") == 0
        again = await client.delete(f"{base}/{job_id}", headers=headers)
        assert again.status_code == 404
        unknown = await client.post(fake.create_url, json={"user_id": "zz"}, headers=headers)
        assert unknown.status_code == 400


@pytest.mark.parametrize(
    ("service", "key", "account_key"),
    [
        ("ltxstudio", "jobId", "email"),
        ("kling", "id", "email"),
        ("tempolor", "job_id", None),
        ("riffusion", "job_id", "user_id"),
        ("minimax", "videoId", None),
        ("pixverse", "id", None),
    ],
)
async def test_executing_rows_follow_the_service(service, key, account_key):
    """Executing rows use the service's job id key, and name the account where it does."""
    fake = FakeScheduler({"acct-1": 2}, service=service)
    job = await fake.create("acct-1")
    row = fake.snapshot_body()["executing"][0]
    assert row[key] == job.wire_id
    if account_key is None:
        assert "acct-1" in str(row[key])  # embedded in the id
    else:
        assert row[account_key] == "acct-1"


async def test_callbacks_when_jobs_end():
    """run_callbacks calls on_job_done as each job ends."""
    fake = FakeScheduler({A: 2})
    done: list[str] = []

    async def on_done(job):
        done.append(job.job_id)

    fake.on_job_done = on_done
    first = await fake.create(A, duration=0.1)
    second = await fake.create(A, duration=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.run_callbacks)
        await anyio.sleep(0.3)
        tg.cancel_scope.cancel()
    assert done == [first.job_id, second.job_id]
    assert fake.completed == 2


async def test_injected_fault_is_copied():
    """Regression: inject() counted down the caller's Fault, so reusing it did nothing."""
    fault = Fault(status=500, body={"error": "x"})
    for _ in range(2):
        fake = FakeScheduler({A: 1})
        fake.inject(fault)
        assert (await get(fake)).status_code == 500
    assert fault.count == 1
