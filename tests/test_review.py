"""Regression tests from a fresh-eyes review: hangs, leaks and crashes on odd inputs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from capgate import CapacityGate
from capgate.testing import FakeScheduler
from conftest import P
from redis_support import REDIS_URL, delete_namespace, needs_redis

pytestmark = pytest.mark.anyio

A, B = "a@x.io", "b@x.io"


async def _until_waiting(gate: CapacityGate, n: int) -> None:
    while gate.statistics().waiting < n:
        await anyio.lowlevel.checkpoint()


def _answering(body: Any) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=body)

    return httpx.MockTransport(handler)


# --- hangs ----------------------------------------------------------------------------------------


async def test_driver_role_survives_driver_and_successor_leaving_together(make_gate):
    """The driver and the waiter it hands the role to leave at once: the rest still polls.

    Regression: _leave() woke only the first waiter when the *driver* left. If that
    successor was itself on its way out (cancelled, timed out or granted before it ran
    again) it left without taking the role, so nobody polled and the remaining waiters
    slept forever although a slot came free. Trio runs a batch in random order, so the
    race is repeated to meet the losing order.
    """

    async def leaver(gate: CapacityGate, scope: anyio.CancelScope) -> None:
        with scope:
            async with gate.slot():
                pytest.fail("granted while the account is full")

    async def stayer(gate: CapacityGate, got: list[str]) -> None:
        with anyio.move_on_after(100 * P):
            async with gate.slot() as slot:
                got.append(slot.account)

    for _ in range(12):
        fake = FakeScheduler({A: 1})
        fake.add_outside_job(A, 6 * P)
        gate, _ = make_gate(fake)
        got: list[str] = []
        scopes = [anyio.CancelScope(), anyio.CancelScope()]
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaver, gate, scopes[0])  # the driver
            await _until_waiting(gate, 1)
            tg.start_soon(leaver, gate, scopes[1])  # its successor
            await _until_waiting(gate, 2)
            tg.start_soon(stayer, gate, got)
            await _until_waiting(gate, 3)
            await anyio.sleep(P / 2)
            scopes[0].cancel()
            scopes[1].cancel()
        assert got == [A]


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"email": B, "maxJobs": 2, "executing": 0, "available": "\u00b2"},  # "²".isdigit()
        {"email": B, "maxJobs": 2, "executing": 0, "available": "9" * 5000},  # int() limit
        {"email": B, "maxJobs": 10**400, "executing": 0, "available": 2},  # inf as a double
        {"email": B, "maxJobs": 2, "executing": 0, "available": 1e300},
    ],
    ids=["superscript-digit", "over-int-digit-limit", "huge-int", "huge-float"],
)
async def test_malformed_count_skips_the_row_not_the_poll(make_gate, row):
    """A count that passes str.isdigit() but int() refuses is a skipped row, not a failed poll."""
    body = {"available": [{"email": A, "maxJobs": 2, "executing": 0, "available": 2}, row]}
    gate, _ = make_gate(FakeScheduler({A: 2}), transport=_answering(body))
    snapshot = await gate.refresh()
    assert [r.account for r in snapshot.accounts] == [A]
    assert snapshot.skipped == 1


async def test_huge_integer_started_is_ignored_not_a_failed_poll(make_gate):
    """An executing row whose ``started`` is an integer too big for a float still parses."""
    body = {
        "available": [{"email": A, "maxJobs": 2, "executing": 1, "available": 1}],
        "executing": [{"jobId": "j1", "email": A, "started": 10**400}],
    }
    gate, _ = make_gate(FakeScheduler({A: 2}), transport=_answering(body))
    snapshot = await gate.refresh()
    assert snapshot.lists_job("j1")
    assert snapshot.executing[0].started is None


# --- fleet mode -----------------------------------------------------------------------------------


async def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


@needs_redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fleet_driver_role_survives_driver_and_successor_leaving_together(anyio_backend):
    """Fleet mode: the same race as in-process; the third waiter must still get its slot.

    Regression: Fleet._leave() woke a successor only when the driver left, so a successor
    cancelled before it ran again left the role vacant and the other waiters asleep.
    """

    from capgate.redis import RedisStore
    from capgate.testing import serve

    namespace = f"capgate-review-{uuid.uuid4().hex[:12]}"
    fake = FakeScheduler({A: 1})
    got: list[str] = []

    async def leaver(gate: CapacityGate, scope: anyio.CancelScope) -> None:
        with scope:
            async with gate.slot():
                pytest.fail("granted while the account is full")

    async def stayer(gate: CapacityGate) -> None:
        with anyio.move_on_after(5):
            async with gate.slot() as slot:
                got.append(slot.account)

    try:
        with serve(fake) as url:
            fake.add_outside_job(A, 0.6)
            store = RedisStore(REDIS_URL, namespace=namespace, lease_ttl=2.0, socket_timeout=1.0)
            gate = CapacityGate(fake.token, url=url, store=store, poll_interval=0.1, jitter=0)
            try:
                scopes = [anyio.CancelScope(), anyio.CancelScope()]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(leaver, gate, scopes[0])
                    fleet = gate._fleet
                    assert fleet is not None
                    await _eventually(lambda: fleet._driver is not None)
                    tg.start_soon(leaver, gate, scopes[1])
                    tg.start_soon(stayer, gate)
                    await _eventually(lambda: len(fleet._waiters) == 3)
                    await anyio.sleep(0.2)
                    scopes[0].cancel()  # the driver first: its exit wakes the successor
                    scopes[1].cancel()
            finally:
                await gate.aclose()
    finally:
        delete_namespace(namespace)
    assert got == [A]


@needs_redis
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_fleet_waiter_cancelled_after_its_grant_never_enters_the_body(
    anyio_backend, monkeypatch
):
    """Fleet mode: a waiter cancelled between its grant and running again gives the slot back.

    Regression: Fleet.acquire() returned the slot without a cancellation check after the
    grant, so the body of a cancelled waiter started, and on leaving it the slot was settled
    (counted until a later poll) instead of going straight to the next waiter, as in-process.
    """

    from capgate import _fleet
    from capgate.redis import RedisStore
    from capgate.testing import serve

    namespace = f"capgate-review-{uuid.uuid4().hex[:12]}"
    fake = FakeScheduler({A: 1})
    scope = anyio.CancelScope()
    entered: list[str] = []
    wake = _fleet._Waiter.wake

    def wake_then_cancel(self: Any) -> None:
        wake(self)
        if self.grant is not None:
            scope.cancel()  # cancelled after the grant, before the waiter runs on

    monkeypatch.setattr(_fleet._Waiter, "wake", wake_then_cancel)
    try:
        with serve(fake) as url:
            store = RedisStore(REDIS_URL, namespace=namespace, lease_ttl=2.0, socket_timeout=1.0)
            gate = CapacityGate(fake.token, url=url, store=store, poll_interval=5.0, jitter=0)
            try:
                with anyio.fail_after(5):
                    with scope:
                        async with gate.slot() as slot:
                            entered.append(slot.account)
                    monkeypatch.setattr(_fleet._Waiter, "wake", wake)
                    # given back, not settled: the next waiter needs no new poll
                    polls = fake.polls
                    async with gate.slot() as slot:
                        assert slot.account == A
                    assert fake.polls == polls, entered
            finally:
                await gate.aclose()
    finally:
        delete_namespace(namespace)
    assert entered == []


@needs_redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fleet_survives_counts_too_big_for_a_double(anyio_backend):
    """Fleet mode: a row with a count past 1.8e308 (inf in Lua's doubles) is skipped.

    Regression: the limit reached Redis as inf, and cjson refuses to encode inf, so every
    script that returned the state failed: the fleet took Redis for down and granted
    nothing at all, on any account, while that snapshot lasted.
    """

    from capgate.redis import RedisStore

    huge = 10**400
    body = {
        "available": [
            {"email": A, "maxJobs": huge, "executing": 0, "available": huge},
            {"email": B, "maxJobs": 1, "executing": 0, "available": 1},
        ]
    }
    namespace = f"capgate-review-{uuid.uuid4().hex[:12]}"
    store = RedisStore(REDIS_URL, namespace=namespace, lease_ttl=2.0, socket_timeout=1.0)
    async with httpx.AsyncClient(transport=_answering(body)) as client:
        gate = CapacityGate("t", client=client, store=store, poll_interval=0.2, jitter=0)
        try:
            with anyio.fail_after(5):
                async with gate.slot() as slot:
                    assert slot.account == B
        finally:
            await gate.aclose()
            delete_namespace(namespace)


# --- secrets --------------------------------------------------------------------------------------


async def test_token_echoed_in_a_cross_origin_redirect_stays_out_of_errors_and_logs(
    make_gate, logs
):
    """A redirect whose target host echoes the token: refused, and the token is not shown.

    Regression: the refusal message quoted the target's host verbatim, unlike every other
    server-controlled text, which has the token replaced.
    """
    token = "Sekrit-Token-1234"  # hosts come back lowercased

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": f"https://{token}.evil.example/x"})

    gate, _ = make_gate(FakeScheduler({A: 1}), token=token, transport=httpx.MockTransport(handler))
    with pytest.raises(Exception, match=r"refused a redirect to another origin") as info:
        await gate.refresh()
    secret = token.lower()
    assert secret not in str(info.value).lower()
    assert secret not in repr(gate.statistics()).lower()
    assert all(secret not in repr(event).lower() for event in logs)


# --- leaks ----------------------------------------------------------------------------------------


async def test_one_slot_context_entered_by_two_tasks_at_once_is_refused(make_gate):
    """Entering one ``gate.slot()`` object from two tasks at once raises, and leaks nothing.

    Regression: the "already entered" guard looked at the slot, which is set only once the
    wait ends, so two tasks waiting on one context both got slots; the first slot was
    overwritten and never settled, and counted against its account forever.
    """
    gate, _ = make_gate({A: 2}, latency=P)  # both tasks are waiting when the answer lands
    ctx = gate.slot()
    errors: list[BaseException] = []

    async def enter() -> None:
        try:
            async with ctx:
                await anyio.sleep(P)
        except RuntimeError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        tg.start_soon(enter)
    assert len(errors) == 1
    assert str(errors[0]) == "this gate.slot() context is already entered; call gate.slot() again"
    await anyio.sleep(2 * P)
    await gate.refresh()
    assert gate.statistics().held == 0
