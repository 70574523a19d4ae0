"""Issue 3's rules, each pinned by tests: submit, busy and broken accounts, invalidate().

The behavioural tests run on trio (virtual time) and asyncio (short real intervals); the
long scenarios are ``trio_only``.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import httpx
import pytest

from capgate import (
    AccountQuarantined,
    AuthenticationError,
    CapacityGate,
    SlotTimeout,
    SubmissionFailed,
)
from capgate._policy import INVALIDATE_FLOOR
from capgate.testing import FakeJob, FakeScheduler, Fault
from conftest import P, invalidating

pytestmark = pytest.mark.anyio

A, B, C, D = "a@x.io", "b@x.io", "c@x.io", "d@x.io"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "webhook_receiver.py"

Create = Callable[[str], Awaitable[httpx.Response]]


def poster(
    fake: FakeScheduler,
    calls: list[str] | None = None,
    duration: float | None = 3600.0,
    **extra: Any,
) -> Create:
    """A create function that POSTs to the fake's create endpoint, noting each account."""

    async def create(account: str) -> httpx.Response:
        if calls is not None:
            calls.append(account)
        body = {fake.spec.account_key: account, "duration": duration, **extra}
        request = httpx.Request(
            "POST",
            fake.create_url,
            json=body,
            headers={"Authorization": f"Bearer {fake.token}"},
        )
        return await fake.handle(request)

    return create


def scripted(
    statuses: list[int], calls: list[str], responses: list[httpx.Response] | None = None
) -> Create:
    """A create function answering the given statuses in turn (the last one repeats)."""

    async def create(account: str) -> httpx.Response:
        calls.append(account)
        status = statuses[min(len(calls), len(statuses)) - 1]
        body: dict[str, Any] = {"error": f"status {status}"}
        if status == 200:
            body = {"jobId": f"job-{len(calls)}"}
        response = httpx.Response(
            status, json=body, request=httpx.Request("POST", "https://x.test/jobs")
        )
        if responses is not None:
            responses.append(response)
        return response

    return create


def account_stats(gate: CapacityGate, account: str) -> Any:
    """The statistics row of ``account``."""
    (row,) = [row for row in gate.statistics().accounts if row.account == account]
    return row


class Waiter:
    """A task that waits for a slot and holds it until told to leave."""

    def __init__(self, gate: CapacityGate, **slot_options: Any) -> None:
        self.gate = gate
        self.options = slot_options
        self.granted = anyio.Event()
        self.release = anyio.Event()
        self.account: str | None = None
        self.waited: float | None = None
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            async with self.gate.slot(**self.options) as slot:
                self.account, self.waited = slot.account, slot.waited
                self.granted.set()
                await self.release.wait()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc


# --- rule 1: submit's 2xx path and rule 5: every job id shape -------------------------------------


@pytest.mark.parametrize(
    ("service", "account"),
    [
        ("ltxstudio", "a@x.io"),  # jobId, a string
        ("kling", "a@x.io"),  # id, a number
        ("tempolor", "user-12"),  # job_id, account embedded in it
        ("riffusion", "user-12"),  # job_id
        ("minimax", "my-account"),  # videoId, account embedded in it
        ("pixverse", "a-b@x.io"),  # id, account embedded in it
    ],
)
async def test_submit_marks_the_job_id_from_the_body(make_gate, logs, service, account):
    """A 2xx marks the slot submitted with the body's job id, which a listing snapshot releases."""
    fake = FakeScheduler({account: 2}, service=service, latency=P)
    gate, _ = make_gate(fake)
    create = poster(fake)
    async with anyio.create_task_group() as tg:

        async def create_then_poll(name: str) -> httpx.Response:
            response = await create(name)
            tg.start_soon(gate.refresh)
            await anyio.wait_all_tasks_blocked()  # sent before the settle; it lists the job
            return response

        response = await gate.submit(create_then_poll)
    assert response.status_code == 200
    (job,) = fake.jobs.values()
    assert [e["job_id"] for e in logs if e["event"] == "capgate.settle"] == [job.job_id]
    assert gate.statistics().reserved == 0  # released by the id, not by the snapshot's age


@pytest.mark.parametrize(
    ("service", "body", "job_id"),
    [
        ("kling", {"task": {"id": 250411}}, "250411"),  # nested task.id (regression: bug 6)
        ("pixverse", {"video_id": "user:1-pixverse:a@x.io-video:7"}, None),
        ("tempolor", {"jobs": ["user:1-tempolor:a@x.io-job:9"]}, "user:1-tempolor:a@x.io-job:9"),
        ("minimax", {"videoId": "user:1-minimax:a@x.io-video:12"}, None),
    ],
)
async def test_submit_records_the_job_id_of_each_documented_create_answer(
    make_gate, logs, service, body, job_id
):
    """submit() settles the slot with the job id where the service's create answer holds it
    (before the fix, Kling's task.id, PixVerse's video_id and TemPolor's jobs[] gave None)."""
    gate, _ = make_gate({A: 2}, service=service)

    async def create(account: str) -> httpx.Response:
        return httpx.Response(200, json=body)

    await gate.submit(create)
    expected = job_id if job_id is not None else next(iter(body.values()))
    assert [e["job_id"] for e in logs if e["event"] == "capgate.settle"] == [expected]


async def test_submit_without_job_id_counts_until_next_snapshot(make_gate):
    """A 2xx whose body names no job keeps the reservation until a newer snapshot."""
    gate, _ = make_gate({A: 2})

    async def create(account: str) -> httpx.Response:
        return httpx.Response(201, json={"status": "queued"})

    response = await gate.submit(create)
    assert response.status_code == 201
    assert gate.statistics().reserved == 1
    await gate.refresh()
    assert gate.statistics().reserved == 0


async def test_submit_honours_account(make_gate):
    """submit(account=...) creates only on the accounts allowed."""
    gate, fake = make_gate({A: 3, B: 1})
    calls: list[str] = []
    for _ in range(2):
        await gate.submit(poster(fake, calls, duration=2 * P), account=B)
    assert calls == [B, B]
    assert (fake.creates, fake.rejected_429) == (2, 0)  # the second waited for B to free


async def test_submit_validates_arguments(make_gate):
    """submit() checks its arguments before waiting."""
    gate, fake = make_gate({A: 1})
    with pytest.raises(TypeError, match=r"^create must be an async callable, not str$"):
        await gate.submit("https://x.test/jobs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^max_attempts must be >= 1, got 0$"):
        await gate.submit(poster(fake), max_attempts=0)
    with pytest.raises(TypeError, match=r"^max_attempts must be an int, not bool$"):
        await gate.submit(poster(fake), max_attempts=True)
    assert fake.requests == 0


async def test_create_must_return_a_response(make_gate):
    """create returning something else is a TypeError, and the slot is settled."""
    gate, _ = make_gate({A: 1})

    async def create(account: str) -> Any:
        return {"jobId": "j"}

    with pytest.raises(TypeError, match=r"^create must return an httpx\.Response, not dict$"):
        await gate.submit(create)
    assert gate.statistics().held == 0


# --- rule 1 and 2: busy accounts ------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 502, 504])
async def test_busy_answer_retries_elsewhere(make_gate, logs, status):
    """429, 502 and 504 mark the account busy, give the slot back and retry on another."""
    gate, _ = make_gate({A: 1, B: 1})
    calls: list[str] = []
    response = await gate.submit(scripted([status, 200], calls))
    assert response.status_code == 200
    assert calls == [A, B]
    assert account_stats(gate, A).busy
    assert account_stats(gate, A).reserved == 0  # given back at once, no job was created
    assert gate.statistics().reserved == 1  # B's job
    busy = [e for e in logs if e["event"] == "capgate.submit_busy"]
    assert [(e["account"], e["status_code"], e["attempt"]) for e in busy] == [(A, status, 1)]


async def test_stolen_slot_is_retried_on_another_account(make_gate):
    """A thief taking the slot before our create arrives costs one 429 and one retry."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.steal_next = 1
    calls: list[str] = []
    response = await gate.submit(poster(fake, calls))
    assert response.status_code == 200
    assert calls == [A, B]
    assert (fake.rejected_429, fake.creates, fake.polls) == (1, 1, 1)


async def test_busy_account_waits_for_a_snapshot_after_the_429(make_gate):
    """After a 429 the account is granted again only from a poll requested after it; here
    the fake still shows A as before (nothing changed there), so from the second."""
    gate, fake = make_gate({A: 2}, jitter=0)
    calls: list[str] = []
    polls_at_create: list[int] = []
    create = scripted([429, 200], calls)

    async def counting(account: str) -> httpx.Response:
        polls_at_create.append(fake.polls)
        return await create(account)

    await gate.submit(counting)
    assert calls == [A, A]
    assert polls_at_create == [1, 3]  # A still showed a free slot, but the gate polled first
    assert fake.poll_times[1] - fake.poll_times[0] >= P  # as soon as poll_interval allows


@pytest.mark.trio_only
async def test_busy_poll_comes_as_soon_as_interval_allows(make_gate):
    """The poll after a 429 comes when poll_interval allows, not later."""
    gate, fake = make_gate({A: 2}, poll_interval=5.0, jitter=0)
    await gate.submit(scripted([429, 200], []))
    assert fake.poll_times[1] - fake.poll_times[0] == pytest.approx(5.0)


async def test_snapshot_sent_before_the_429_keeps_the_account_busy(make_gate):
    """A snapshot whose request was sent before mark_busy() does not lift the busy mark,
    nor count as the unchanged answer it outlasts: that takes two polls after it."""
    gate, _ = make_gate({A: 2}, latency=P)
    async with anyio.create_task_group() as tg, gate.slot() as slot:
        tg.start_soon(gate.refresh)
        await anyio.wait_all_tasks_blocked()  # the request is on its way
        slot.mark_busy()
    assert gate.statistics().polls == 2
    assert account_stats(gate, A).busy
    await gate.refresh()
    assert account_stats(gate, A).busy  # A shows as before: no news against the 429
    await gate.refresh()
    assert not account_stats(gate, A).busy


async def test_a_snapshot_that_shows_the_account_otherwise_lifts_the_busy_mark(make_gate):
    """After a 429, the first poll that shows the account changed (an outside job took a
    slot there) lifts the mark."""
    gate, fake = make_gate({A: 2})
    async with gate.slot() as slot:
        slot.mark_busy()
    fake.add_outside_job(A, duration=3600)
    await gate.refresh()
    assert not account_stats(gate, A).busy


async def test_mark_busy_gives_the_slot_back_at_once(make_gate):
    """mark_busy() stops the reservation counting at once; the block's exit adds nothing."""
    gate, _ = make_gate({A: 2})
    async with gate.slot() as slot:
        slot.mark_busy()
        assert gate.statistics().reserved == 0
        assert repr(slot) == "<capgate.Slot 'a@x.io' given back>"
        with pytest.raises(RuntimeError, match=r"^mark_busy\(\): this slot is already given back$"):
            slot.mark_busy()
    assert gate.statistics().reserved == 0


async def test_busy_mark_holds_waiters_until_a_snapshot_lifts_it(make_gate):
    """A waiter for a busy account stays queued until a snapshot lifts the mark (the
    second here: the first shows A as before), then gets it."""
    gate, fake = make_gate({A: 2}, jitter=0)
    waiter = Waiter(gate)
    async with anyio.create_task_group() as tg:
        async with gate.slot() as slot:
            slot.mark_busy()
            tg.start_soon(waiter.run)
            await anyio.wait_all_tasks_blocked()
            assert not waiter.granted.is_set()
            assert fake.polls == 1
        with anyio.fail_after(10 * P):
            await waiter.granted.wait()
        waiter.release.set()
    assert waiter.account == A
    assert fake.polls == 3


async def test_attempts_exhausted_raise_submission_failed(make_gate):
    """When every attempt meets a busy account, SubmissionFailed carries the last answer."""
    gate, _ = make_gate({A: 1, B: 1})
    calls: list[str] = []
    responses: list[httpx.Response] = []
    with pytest.raises(
        SubmissionFailed,
        match=r"^ltxstudio: no account took the job in 3 attempts \(last: HTTP 429 from a@x\.io\)$",
    ) as caught:
        await gate.submit(scripted([429], calls, responses), max_attempts=3)
    assert calls == [A, B, A]
    assert caught.value.response is responses[-1]
    assert (caught.value.attempts, caught.value.account, caught.value.status_code) == (3, A, 429)
    assert gate.statistics().reserved == 0


async def test_timeout_bounds_the_whole_submission(make_gate):
    """timeout= bounds the waiting over all attempts: a busy loop ends in SlotTimeout."""
    gate, _ = make_gate({A: 1})
    calls: list[str] = []
    started = anyio.current_time()
    with pytest.raises(SlotTimeout, match=r"^ltxstudio: no free slot within "):
        await gate.submit(scripted([429], calls), timeout=3.5 * P, max_attempts=100)
    assert 2 <= len(calls) <= 5
    assert anyio.current_time() - started < 6 * P


# --- rule 1 and 3: broken accounts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [(596, "Account on hold"), (412, "Insufficient credits"), (402, "Subscription required")],
)
async def test_broken_account_is_quarantined_and_skipped(make_gate, logs, status, error):
    """596, 412 and 402 quarantine the account for quarantine_for, logged, and retry elsewhere."""
    gate, fake = make_gate({A: 1, B: 1}, quarantine_for=120.0)
    fake.fail_account(A, status, error)
    calls: list[str] = []
    response = await gate.submit(poster(fake, calls))
    assert response.status_code == 200
    assert calls == [A, B]
    row = account_stats(gate, A)
    assert row.quarantine_reason == f"HTTP {status}: {error}"
    assert row.quarantined_for == pytest.approx(120.0, abs=1)
    assert row.reserved == 0  # no job was created on A
    (event,) = [e for e in logs if e["event"] == "capgate.quarantine"]
    assert (event["account"], event["seconds"], event["reason"]) == (
        A,
        120.0,
        f"HTTP {status}: {error}",
    )


async def test_quarantined_account_is_not_granted(make_gate):
    """After a 596 the account gets no more create calls while quarantined."""
    gate, fake = make_gate({A: 5, B: 5})
    fake.fail_account(A, 596, "Account on hold")
    calls: list[str] = []
    for _ in range(4):
        await gate.submit(poster(fake, calls))
    assert calls == [A, B, B, B, B]
    assert fake.rejected_other == 1


async def test_broken_slot_is_not_passed_to_the_next_waiter(make_gate):
    """Regression: slot.quarantine() gave the slot back before quarantining, so the next
    waiter was granted the broken account and met the same 596."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(B, duration=3600)
    fake.fail_account(A, 596, "Account on hold")
    waiter = Waiter(gate)
    calls: list[str] = []
    create = poster(fake, calls)
    async with anyio.create_task_group() as tg:

        async def create_with_waiter_queued(account: str) -> httpx.Response:
            tg.start_soon(waiter.run)
            await anyio.wait_all_tasks_blocked()  # queued: A is reserved, B is full
            return await create(account)

        with pytest.raises(AccountQuarantined, match=r"\(HTTP 596: Account on hold\)$"):
            await gate.submit(create_with_waiter_queued, account=A)
        await anyio.wait_all_tasks_blocked()
        assert not waiter.granted.is_set()
        assert waiter.error is None  # it may use B: it waits for B
        tg.cancel_scope.cancel()
    assert calls == [A]


async def test_every_allowed_account_broken_raises_quarantined(make_gate):
    """When each allowed account fails with 596/412, submit raises AccountQuarantined."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.fail_account(A, 596, "Account on hold")
    fake.fail_account(B, 412, "Insufficient credits")
    calls: list[str] = []
    with pytest.raises(
        AccountQuarantined,
        match=(
            r"^ltxstudio: every account this caller may use is quarantined: "
            r"a@x\.io \(HTTP 596: Account on hold\), b@x\.io \(HTTP 412: Insufficient credits\)$"
        ),
    ) as caught:
        await gate.submit(poster(fake, calls))
    assert calls == [A, B]
    assert caught.value.accounts == (A, B)
    assert caught.value.reasons == {
        A: "HTTP 596: Account on hold",
        B: "HTTP 412: Insufficient credits",
    }


async def test_401_from_create_is_authentication_error(make_gate):
    """A 401 from create raises AuthenticationError and gives the slot back."""
    gate, _ = make_gate({A: 1, B: 1})
    calls: list[str] = []
    with pytest.raises(
        AuthenticationError, match=r"^ltxstudio: the create request was refused \(HTTP 401\)$"
    ) as caught:
        await gate.submit(scripted([401], calls))
    assert calls == [A]
    assert caught.value.status_code == 401
    assert gate.statistics().reserved == 0


async def test_401_from_the_fake_create_endpoint(make_gate):
    """A create request with a wrong token (the fake answers 401) is an AuthenticationError."""
    gate, fake = make_gate({A: 1})

    async def wrong_token(account: str) -> httpx.Response:
        request = httpx.Request("POST", fake.create_url, json={"email": account})
        return await fake.handle(request)

    with pytest.raises(AuthenticationError, match=r"^ltxstudio: the create request was refused"):
        await gate.submit(wrong_token)
    assert fake.unauthorized == 1


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_other_status_is_returned_untouched(make_gate, status):
    """Any other status is returned as it came, after a single create call."""
    gate, _ = make_gate({A: 1, B: 1})
    calls: list[str] = []
    responses: list[httpx.Response] = []
    response = await gate.submit(scripted([status, 200], calls, responses))
    assert response is responses[0]
    assert calls == [A]
    assert not account_stats(gate, A).busy
    assert account_stats(gate, A).quarantined_for is None


async def test_exception_from_create_propagates_and_settles(make_gate):
    """An exception from create propagates; the slot counts until the next snapshot."""
    gate, _ = make_gate({A: 1})

    async def create(account: str) -> httpx.Response:
        raise httpx.ReadTimeout("no answer")  # the job may or may not exist

    with pytest.raises(httpx.ReadTimeout, match=r"^no answer$"):
        await gate.submit(create)
    stats = gate.statistics()
    assert (stats.held, stats.reserved) == (0, 1)
    await gate.refresh()
    assert gate.statistics().reserved == 0


# --- rule 3: quarantine ---------------------------------------------------------------------------


async def test_restricted_waiter_fails_at_once_when_quarantined(make_gate):
    """A caller allowed only quarantined accounts gets AccountQuarantined with no wait."""
    gate, fake = make_gate({A: 1, B: 1})
    gate.quarantine(A, reason="CAPTCHA pending")
    started = anyio.current_time()
    with pytest.raises(
        AccountQuarantined,
        match=r"^ltxstudio: every account this caller may use is quarantined: "
        r"a@x\.io \(CAPTCHA pending\)$",
    ) as caught:
        async with gate.slot(A):
            pass
    assert anyio.current_time() - started < P / 2
    assert caught.value.reasons == {A: "CAPTCHA pending"}
    assert fake.requests == 0


async def test_waiting_restricted_waiter_fails_when_quarantined(make_gate):
    """A waiter already queued for an account fails the moment that account is quarantined."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(A, duration=3600)
    only_a, any_account = Waiter(gate, account=A), Waiter(gate, account=[A, B])
    async with anyio.create_task_group() as tg:
        tg.start_soon(only_a.run)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(any_account.run)
        await anyio.wait_all_tasks_blocked()
        any_account.release.set()
        gate.quarantine(A, seconds=60, reason="on hold")
        await anyio.wait_all_tasks_blocked()
        assert isinstance(only_a.error, AccountQuarantined)
        assert only_a.error.accounts == (A,)
    assert any_account.account == B
    assert gate.statistics().waiting == 0


async def test_waiter_with_other_accounts_waits_for_them(make_gate):
    """A waiter that may use other accounts is not failed: it waits for one of those."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(B, duration=5 * P)
    await gate.refresh()
    gate.quarantine(A, seconds=3600, reason="on hold")
    waiter = Waiter(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await anyio.wait_all_tasks_blocked()
        assert waiter.error is None
        assert not waiter.granted.is_set()
        with anyio.fail_after(20 * P):
            await waiter.granted.wait()
        waiter.release.set()
    assert waiter.account == B
    assert waiter.waited is not None
    assert waiter.waited >= 4 * P


async def test_quarantine_before_the_first_poll_lets_others_serve(make_gate):
    """Regression: quarantining one account before any poll failed callers allowed any account."""
    gate, fake = make_gate({A: 1, B: 1})
    gate.quarantine(A, reason="known bad")
    async with gate.slot() as slot:
        assert slot.account == B
    assert fake.polls == 1


async def test_only_account_quarantined_before_the_first_poll(make_gate):
    """Once the first snapshot shows every account is quarantined, the waiter fails."""
    gate, fake = make_gate({A: 1})
    gate.quarantine(A, reason="known bad")
    with anyio.fail_after(10 * P), pytest.raises(AccountQuarantined, match=r"\(known bad\)$"):
        async with gate.slot():
            pass
    assert fake.polls <= 1


async def test_quarantine_expires(make_gate):
    """A quarantined account is back in rotation when its time runs out."""
    gate, _ = make_gate({A: 1})
    gate.quarantine(A, seconds=3 * P, reason="on hold")
    with pytest.raises(AccountQuarantined, match=r"^ltxstudio: every account "):
        async with gate.slot(A):
            pass
    await anyio.sleep(3 * P)
    async with gate.slot(A) as slot:
        assert slot.account == A
    assert account_stats(gate, A).quarantined_for is None


async def test_waiter_gets_account_when_quarantine_runs_out(make_gate):
    """A waiter allowed a quarantined and a full account is served when the quarantine ends."""
    gate, fake = make_gate({A: 1, B: 1})
    fake.add_outside_job(B, duration=3600)
    await gate.refresh()
    gate.quarantine(A, seconds=4 * P, reason="on hold")
    with anyio.fail_after(20 * P):
        async with gate.slot() as slot:
            assert slot.account == A
            assert slot.waited >= 3.9 * P


@pytest.mark.trio_only
async def test_expired_quarantine_of_a_full_account_does_not_poll_in_a_loop(make_gate):
    """Regression: an expired quarantine on an account absent from available[] made the
    waiter poll back to back, ignoring poll_interval."""
    fake = FakeScheduler({A: 1, B: 1})
    stop = anyio.CancelScope()

    async def guarded(request: httpx.Request) -> httpx.Response:
        if fake.polls >= 40:  # a hot loop never lets virtual time move: end it here
            stop.cancel()
            await anyio.lowlevel.checkpoint()
        return await fake.handle(request)

    gate, _ = make_gate(fake, poll_interval=5.0, jitter=0, transport=httpx.MockTransport(guarded))
    fake.add_outside_job(A, duration=3600)
    fake.add_outside_job(B, duration=3600)
    await gate.refresh()  # lists neither account in available[]: both are full
    gate.quarantine(A, seconds=7.0, reason="on hold")
    with stop, anyio.move_on_after(60):
        await Waiter(gate).run()
    gaps = [b - a for a, b in itertools.pairwise(fake.poll_times)]
    assert len(gaps) >= 10
    assert min(gaps) >= 5.0


async def test_restore_brings_the_account_back_and_wakes_waiters(make_gate):
    """restore() puts the account back into rotation now; a waiting caller gets it."""
    gate, fake = make_gate({A: 1, B: 1}, jitter=0)
    fake.add_outside_job(B, duration=3600)
    await gate.refresh()
    gate.quarantine(A, reason="on hold")
    waiter = Waiter(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await anyio.wait_all_tasks_blocked()
        assert not waiter.granted.is_set()
        restored_at = anyio.current_time()
        gate.restore(A)
        with anyio.fail_after(3 * P):
            await waiter.granted.wait()
        waiter.release.set()
    assert waiter.account == A
    assert anyio.current_time() - restored_at < 2 * P


async def test_restore_with_fresh_snapshot_grants_at_once(make_gate):
    """restore() with a fresh snapshot grants the waiting caller with no new poll."""
    gate, fake = make_gate({A: 1}, poll_interval=3600.0)
    await gate.refresh()
    gate.quarantine(A, reason="on hold")
    waiter = Waiter(gate, account=[A])
    gate.restore(A)
    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter.run)
        await anyio.wait_all_tasks_blocked()
        assert waiter.granted.is_set()
        waiter.release.set()
    assert fake.polls == 1


async def test_restore_of_an_account_in_rotation_is_harmless(make_gate, logs):
    """restore() on an account that is not quarantined changes nothing and logs nothing."""
    gate, _ = make_gate({A: 1})
    gate.restore(A)
    async with gate.slot() as slot:
        assert slot.account == A
    assert not [e for e in logs if e["event"] == "capgate.restore"]


async def test_statistics_and_repr_show_quarantine(make_gate):
    """statistics() and the repr show each quarantined account, time left and why."""
    gate, _ = make_gate({A: 2, B: 2})
    async with gate.slot():
        gate.quarantine(B, seconds=30, reason="HTTP 412: Insufficient credits")
        gate.quarantine(C, seconds=60, reason="")  # never seen in a snapshot
        row = account_stats(gate, B)
        assert row.quarantine_reason == "HTTP 412: Insufficient credits"
        assert row.quarantined_for == pytest.approx(30, abs=1)
        assert row.free == 0
        assert account_stats(gate, C).quarantined_for == pytest.approx(60, abs=1)
        assert repr(gate).endswith(
            ", quarantined: b@x.io (HTTP 412: Insufficient credits), c@x.io>"
        )
    gate.restore(B)
    assert account_stats(gate, B).quarantined_for is None
    assert "b@x.io" not in repr(gate)


async def test_slot_quarantine_gives_back_an_unsubmitted_slot(make_gate):
    """slot.quarantine() before mark_submitted() gives the slot back and quarantines."""
    gate, _ = make_gate({A: 2}, quarantine_for=90.0)
    async with gate.slot() as slot:
        slot.quarantine(reason="HTTP 596: on hold")
        assert gate.statistics().reserved == 0
        assert repr(slot) == "<capgate.Slot 'a@x.io' given back>"
    assert account_stats(gate, A).quarantined_for == pytest.approx(90.0, abs=1)


async def test_slot_quarantine_after_submit_keeps_the_job_counted(make_gate):
    """slot.quarantine() after mark_submitted() quarantines but the job still counts."""
    gate, _ = make_gate({A: 2})
    async with gate.slot() as slot:
        slot.mark_submitted("job-1")
        slot.quarantine(seconds=10, reason="moderation")
    assert gate.statistics().reserved == 1
    assert account_stats(gate, A).quarantine_reason == "moderation"


async def test_quarantine_validates_arguments(make_gate):
    """quarantine() checks its arguments with exact messages."""
    gate, _ = make_gate({A: 1})
    with pytest.raises(ValueError, match=r"^seconds must be a finite number > 0, got -1$"):
        gate.quarantine(A, seconds=-1)
    with pytest.raises(TypeError, match=r"^reason must be a str, not int$"):
        gate.quarantine(A, reason=412)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^account must not be empty$"):
        gate.quarantine(" ")
    assert gate.statistics().accounts == ()


# --- rule 4: invalidate() -------------------------------------------------------------------------


def test_invalidate_outside_an_event_loop_is_harmless():
    """invalidate() with no running event loop (sync code) does nothing and raises nothing."""
    gate = CapacityGate("t", service="kling")
    gate.invalidate()
    assert gate.statistics().polls == 0


async def test_invalidate_with_nobody_waiting_sends_nothing(make_gate):
    """invalidate() when nobody waits makes no request."""
    gate, fake = make_gate({A: 1})
    async with gate.slot():
        pass
    for _ in range(100):
        gate.invalidate()
    await anyio.sleep(10 * P)
    assert fake.polls == 1


async def test_invalidate_after_close_is_harmless(make_gate):
    """invalidate() on a closed gate does nothing."""
    gate, fake = make_gate({A: 1})
    await gate.aclose()
    gate.invalidate()
    await anyio.wait_all_tasks_blocked()
    assert fake.requests == 0


@pytest.mark.parametrize("named", [False, True], ids=["invalidate()", "invalidate(job_id)"])
async def test_callback_invalidate_polls_before_poll_interval(make_gate, named):
    """A terminal callback calling invalidate() gets the waiter its slot long before
    poll_interval. With counts that have never lagged, naming the job changes nothing:
    the poll within 0.5 s brings the news."""
    gate, fake = make_gate({A: 1}, poll_interval=60.0)
    fake.add_outside_job(A, duration=12 * P)

    async def done(job: FakeJob) -> None:
        gate.invalidate(job.job_id if named else None)

    fake.on_job_done = done
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.run_callbacks)
        with anyio.fail_after(40 * P):
            async with gate.slot() as slot:
                assert slot.account == A
        tg.cancel_scope.cancel()
    assert fake.polls == 2
    assert fake.poll_times[1] - fake.poll_times[0] >= 12 * P


@pytest.mark.parametrize("job_id", [1.5, True, b"id", ["id"]])
def test_invalidate_refuses_a_job_id_of_the_wrong_type(job_id):
    gate = CapacityGate("t", service="kling")
    with pytest.raises(TypeError, match="job_id must be a str or int"):
        gate.invalidate(job_id)


async def test_invalidate_never_polls_within_the_floor(make_gate):
    """invalidate() right after a poll waits until INVALIDATE_FLOOR after it."""
    gate, fake = make_gate({A: 1}, poll_interval=60.0)
    fake.add_outside_job(A, duration=P)

    async def done(job: FakeJob) -> None:
        gate.invalidate()

    fake.on_job_done = done
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.run_callbacks)
        with anyio.fail_after(4 * INVALIDATE_FLOOR):
            async with gate.slot():
                pass
        tg.cancel_scope.cancel()
    assert fake.polls == 2
    gap = fake.poll_times[1] - fake.poll_times[0]
    assert INVALIDATE_FLOOR <= gap < 2 * INVALIDATE_FLOOR


@pytest.mark.trio_only
async def test_invalidate_floor_is_exact(make_gate):
    """On the virtual clock, an early invalidate() polls exactly 0.5 s after the last poll."""
    gate, fake = make_gate({A: 1}, poll_interval=60.0)
    fake.add_outside_job(A, duration=0.1)

    async def done(job: FakeJob) -> None:
        gate.invalidate()

    fake.on_job_done = done
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.run_callbacks)
        async with gate.slot():
            pass
        tg.cancel_scope.cancel()
    assert fake.poll_times[1] - fake.poll_times[0] == pytest.approx(INVALIDATE_FLOOR)


@pytest.mark.trio_only
async def test_invalidate_storm_is_held_to_the_floor(make_gate):
    """invalidate() called in a tight loop while someone waits polls at most every 0.5 s."""
    gate, fake = make_gate({A: 1}, poll_interval=60.0)
    fake.add_outside_job(A, duration=10.0)

    async def storm() -> None:
        while True:
            gate.invalidate()
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(storm)
        async with gate.slot() as slot:
            assert slot.waited == pytest.approx(10.0, abs=INVALIDATE_FLOOR)
        tg.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(fake.poll_times)]
    assert len(gaps) >= 15
    assert min(gaps) >= INVALIDATE_FLOOR - 1e-9


@pytest.mark.trio_only
async def test_invalidate_respects_failure_backoff(make_gate):
    """invalidate() during the backoff after a failed poll does not bring the poll forward."""
    gate, fake = make_gate({A: 1}, poll_interval=5.0)
    fake.inject(Fault(status=503, body={"error": "later"}, headers={"Retry-After": "30"}))
    async with invalidating(gate, every=1.0), gate.slot():
        pass
    assert fake.polls == 2
    assert fake.poll_times[1] - fake.poll_times[0] >= 30.0


@pytest.mark.trio_only
async def test_invalidate_wakes_the_poll_of_a_busy_account(make_gate):
    """After a 429, invalidate() makes the next poll come at the floor, not at poll_interval."""
    gate, fake = make_gate({A: 2}, poll_interval=60.0)
    create = scripted([429, 200], [])

    async def create_then_invalidate(account: str) -> httpx.Response:
        response = await create(account)
        gate.invalidate()
        return response

    await gate.submit(create_then_invalidate)
    assert fake.poll_times[1] - fake.poll_times[0] == pytest.approx(INVALIDATE_FLOOR)


# --- the judging scenario -------------------------------------------------------------------------


class Scenario:
    """Workers submitting through the gate while thieves, broken accounts and callbacks act."""

    def __init__(self, make_gate: Any, *, callbacks: bool, jobs: int = 40) -> None:
        self.fake = FakeScheduler({A: 3, B: 2, C: 2, D: 2}, job_duration=(20.0, 60.0), seed=3)
        self.gate, _ = make_gate(self.fake, poll_interval=30.0)
        self.fake.fail_account(C, 596, "Account on hold")
        self.fake.fail_account(D, 412, "Insufficient credits")
        self.callbacks = callbacks
        self.jobs = jobs
        self.thefts_offered = 0
        self.responses: dict[int, httpx.Response] = {}
        self.attempts: list[tuple[float, str]] = []
        self.elapsed = 0.0

    @property
    def thefts(self) -> int:
        return self.thefts_offered - self.fake.steal_next

    @property
    def ours(self) -> list[FakeJob]:
        return [job for job in self.fake.jobs.values() if not job.outside]

    async def thief(self) -> None:
        """Every 25 s, the next create finds its slot just taken (8 times in all)."""
        for _ in range(8):
            await anyio.sleep(25.0)
            self.fake.steal_next += 1
            self.thefts_offered += 1

    async def done(self, job: FakeJob) -> None:
        self.gate.invalidate()  # what a webhook receiver does on a terminal callback

    async def worker(self, queue: anyio.abc.ObjectReceiveStream[int]) -> None:
        async with queue:
            async for n in queue:
                post = poster(self.fake, duration=None, replyRef=f"job-{n}")

                async def create(account: str, post: Create = post) -> httpx.Response:
                    self.attempts.append((anyio.current_time(), account))
                    return await post(account)

                self.responses[n] = await self.gate.submit(create)

    async def run(self) -> None:
        if self.callbacks:
            self.fake.on_job_done = self.done
        started = anyio.current_time()
        send, receive = anyio.create_memory_object_stream[int](self.jobs)
        for n in range(self.jobs):
            send.send_nowait(n)
        send.close()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.fake.run_callbacks)
            tg.start_soon(self.thief)
            async with anyio.create_task_group() as pool, receive:
                for _ in range(10):
                    pool.start_soon(self.worker, receive.clone())
            tg.cancel_scope.cancel()
        self.elapsed = anyio.current_time() - started


@pytest.mark.trio_only
async def test_judging_scenario_gets_every_job_through(make_gate):
    """Thieves, a 596 and a 412 account, callbacks: every job through once, no 429 loop."""
    run = Scenario(make_gate, callbacks=True)
    await run.run()
    assert sorted(run.responses) == list(range(run.jobs))
    assert all(r.status_code == 200 for r in run.responses.values())
    refs = sorted(job.reply_ref or "" for job in run.ours)
    assert refs == sorted(f"job-{n}" for n in range(run.jobs))  # none lost, none twice
    assert run.fake.creates == run.jobs
    assert run.thefts >= 5
    assert run.fake.rejected_429 <= run.thefts  # at most one refusal per theft
    broken = [(t, a) for t, a in run.attempts if a in (C, D)]
    # only the grants already in flight when the first refusal came: at the start, at once
    assert {a for _, a in broken} == {C, D}
    assert len(broken) <= 4
    assert {t for t, _ in broken} == {0.0}
    assert run.elapsed < 600  # no quarantine ran out (quarantine_for is 600 s)


@pytest.mark.trio_only
async def test_judging_scenario_callbacks_keep_slots_busy(make_gate):
    """With callbacks calling invalidate(), freed slots are reused long before poll_interval."""
    with_callbacks = Scenario(make_gate, callbacks=True)
    await with_callbacks.run()
    polling_only = Scenario(make_gate, callbacks=False)
    await polling_only.run()
    assert with_callbacks.elapsed < 0.85 * polling_only.elapsed
    work = sum(job.end - job.start for job in with_callbacks.ours)
    assert with_callbacks.elapsed < 1.3 * work / 5  # 5 working slots, kept nearly full


# --- the example ----------------------------------------------------------------------------------


def test_webhook_receiver_example():
    """examples/webhook_receiver.py gets every job through with no 429, over real loopback."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    program = (
        "import importlib.util, sys, anyio\n"
        f"spec = importlib.util.spec_from_file_location('webhook_receiver', {str(EXAMPLE)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "sys.exit(anyio.run(module.main, 8, 4))\n"
    )
    done = subprocess.run(  # noqa: S603 - our own interpreter and example
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 jobs through 5 slots in " in done.stdout
    assert "429s: 0" in done.stdout


@pytest.mark.trio_only
async def test_invalidate_during_a_poll_in_flight_is_not_lost(make_gate):
    """Regression: a callback arriving while a poll was on the wire was forgotten when its
    (older) answer landed, so the freed slot waited out poll_interval."""
    fake = FakeScheduler({A: 1})

    async def answer_then_travel(request: httpx.Request) -> httpx.Response:
        response = await fake.handle(request)  # the server counts now, the answer is slow
        await anyio.sleep(1.0)
        return response

    gate, _ = make_gate(fake, poll_interval=60.0, transport=httpx.MockTransport(answer_then_travel))
    fake.add_outside_job(A, duration=0.5)  # ends while the first answer travels

    async def done(job: FakeJob) -> None:
        gate.invalidate()

    fake.on_job_done = done
    async with anyio.create_task_group() as tg:
        tg.start_soon(fake.run_callbacks)
        async with gate.slot() as slot:
            assert slot.waited < 5.0
        tg.cancel_scope.cancel()
    assert fake.polls == 2


@pytest.mark.trio_only
async def test_invalidate_storm_during_slow_answers_still_grants(make_gate):
    """Regression: with answers slower than the 0.5 s floor, an answer whose poll a callback
    invalidated in flight was stale on arrival; callbacks every 0.4 s starved every waiter
    while the gate polled without pause."""
    gate, fake = make_gate({A: 5}, poll_interval=5.0, latency=0.6)
    async with invalidating(gate, every=0.4), gate.slot(timeout=30) as slot:
        assert slot.waited < 1.0  # the first answer serves
    assert fake.polls == 1
