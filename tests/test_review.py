"""Regression tests from a fresh-eyes review: hangs, leaks and crashes on odd inputs."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from capgate import CapacityGate
from capgate.testing import FakeScheduler
from conftest import P

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
    ],
    ids=["superscript-digit", "over-int-digit-limit"],
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
