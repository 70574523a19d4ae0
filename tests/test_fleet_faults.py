"""Fleet mode under faults, with real OS processes and a real Redis (issue 12).

A paused holder (SIGSTOP) must not oversubscribe when it resumes; a killed process's grants
come back within its heartbeat; a paused poller's late answer never replaces a newer one;
every key expires; ``aclose()`` cleans up at once; a fleet has one configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis

from capgate import CapacityGate, GateClosed
from capgate.redis import RedisStore
from capgate.testing import FakeScheduler, serve
from redis_support import (
    REDIS_URL,
    Server,
    needs_redis,
    needs_redis_server,
    servers,
)

WORKER = Path(__file__).with_name("fleet_worker.py")

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.loopback, needs_redis]


@pytest.fixture
def anyio_backend() -> str:
    """Real time on asyncio: these tests need real sockets and real processes."""
    return "asyncio"


@pytest.fixture
async def make_gate(namespace: str) -> AsyncIterator[Callable[..., CapacityGate]]:
    """Build fleet gates on the test's namespace; closes them afterwards."""
    made: list[CapacityGate] = []

    def factory(url: str, *, redis_url: str = REDIS_URL, **kwargs: Any) -> CapacityGate:
        store = RedisStore(
            redis_url,
            namespace=namespace,
            lease_ttl=kwargs.pop("lease_ttl", 1.0),
            recovery_grace=kwargs.pop("recovery_grace", 0.3),
            idle_ttl=kwargs.pop("idle_ttl", 86400.0),
            socket_timeout=1.0,
        )
        kwargs.setdefault("poll_interval", 0.15)
        kwargs.setdefault("jitter", 0.0)
        gate = CapacityGate("fake-token", url=url, store=store, **kwargs)
        made.append(gate)
        return gate

    yield factory
    for gate in made:
        await gate.aclose()


def _spawn(*args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own worker script
        [sys.executable, str(WORKER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=10)


def _stopped(pid: int) -> bool:
    """Whether the process is stopped (SIGSTOP): state T in /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


async def _eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    # Redis and /proc have no event to wait on: poll them
    with anyio.fail_after(timeout):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


def _redis() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def _keys(namespace: str) -> list[bytes]:
    client = _redis()
    try:
        return list(client.scan_iter(match=f"{namespace}:*"))
    finally:
        client.close()


def _hlen(namespace: str, name: str) -> int:
    client = _redis()
    try:
        return sum(int(client.hlen(k)) for k in client.scan_iter(match=f"{namespace}:*:{name}"))
    finally:
        client.close()


def _meta(namespace: str, field: str) -> float:
    client = _redis()
    try:
        (meta,) = list(client.scan_iter(match=f"{namespace}:*:meta"))
        return float(client.hget(meta, field) or 0)
    finally:
        client.close()


async def _create(client: httpx.AsyncClient, url: str, account: str, duration: float) -> str:
    response = await client.post(
        url.replace("/scheduler/available", "/jobs"),
        json={"email": account, "duration": duration},
        headers={"Authorization": "Bearer fake-token"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["jobId"])


# --- a paused holder ---------------------------------------------------------------------


@pytest.mark.slow
async def test_paused_holder_resumes_without_a_single_429(make_gate, namespace) -> None:
    """A process SIGSTOPped for 2 x lease_ttl holding every slot: its slots report lost, and
    gate.submit() there meets 0 x 429 after it resumes (its slots were re-granted meanwhile).

    Regression: renewal re-created the reclaimed leases, slot.held stayed true, and each
    resumed create met a 429.
    """
    fake = FakeScheduler({"a@x.io": 2, "b@x.io": 1}, job_duration=0.3)
    ttl = 1.0
    with (
        serve(fake) as url,
        _reaped(_spawn("pause", url, REDIS_URL, namespace, 3, 0.3, 0.15, ttl)) as proc,
    ):
        line = await anyio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "HELD", proc.communicate(timeout=10)[1][-2000:]
        await _eventually(lambda: _stopped(proc.pid))
        stopped = time.monotonic()
        gate = make_gate(url, lease_ttl=ttl)
        async with httpx.AsyncClient() as client:
            # the paused slots come back to the fleet, and this gate fills every account
            for _ in range(3):
                slot = await gate.slot(timeout=10).__aenter__()
                slot.mark_submitted(await _create(client, url, slot.account, 2.0))
                slot._exit(None)
        await gate._engine.flush()
        assert fake.creates == 3
        await anyio.sleep(max(0.0, stopped + 2 * ttl - time.monotonic()))
        os.kill(proc.pid, signal.SIGCONT)
        out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=30))
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["lost"] == 3
    assert result["statuses"] == {"200": 3}
    assert fake.rejected_429 == 0
    assert fake.creates == 6


@pytest.mark.slow
@needs_redis_server
async def test_holder_paused_past_the_recovery_grace_of_a_data_loss_learns_it_lost(
    make_gate, namespace
) -> None:
    """Redis loses its data while a holder is paused (well within its lease, past the
    recovery grace): the fleet grants its slot again after the grace, so when the holder
    resumes, its next renewal tells it the lease is lost and the slot counts once.

    Regression: its renewal re-asserted the older epoch's lease whenever it came back,
    next to the new grant: the slot counted twice, and the holder was never told.
    """
    fake = FakeScheduler({"a@x.io": 1})
    ttl, grace = 10.0, 0.3
    with serve(fake) as url, servers() as (tmp, started):
        server = Server(tmp)
        started.append(server.start())
        worker = _spawn("hold", url, server.url, namespace, 1, 0.15, ttl)
        with _reaped(worker) as proc, server.client() as admin:
            line = await anyio.to_thread.run_sync(proc.stdout.readline)  # type: ignore[union-attr]
            assert line.strip() == "HELD", proc.communicate(timeout=10)[1][-2000:]
            os.kill(proc.pid, signal.SIGSTOP)
            await _eventually(lambda: _stopped(proc.pid))
            admin.flushall()  # as a restart without persistence loses it
            gate = make_gate(url, redis_url=server.url, lease_ttl=ttl, recovery_grace=grace)
            async with gate.slot(timeout=10):  # after the grace, the slot is this gate's
                os.kill(proc.pid, signal.SIGCONT)
                with anyio.fail_after(5):  # its next renewal (every second) tells it
                    line = await anyio.to_thread.run_sync(
                        proc.stdout.readline,  # type: ignore[union-attr]
                        abandon_on_cancel=True,
                    )
                assert line.strip() == "LOST"
                for pending in admin.scan_iter(match=f"{namespace}:*:pending"):
                    assert admin.hget(pending, "a@x.io") == b"1"  # this gate's slot only


# --- a killed process's grants -----------------------------------------------------------


@pytest.mark.slow
async def test_killed_process_unclaimed_grants_return_within_heartbeat(make_gate, namespace):
    """Grants made to a process's waiters that it never picked up (it was stopped, then
    SIGKILLed) come back within min(lease_ttl, 5) + 1 s of its last heartbeat.

    Regression: a grant's expiry was set at the grant instant, so slots came back a full
    heartbeat after the grant, not after the process's last sign of life.
    """
    fake = FakeScheduler({"a@x.io": 2}, job_duration=0.3)
    # heartbeats every second, each good for min(lease_ttl, 5) = 5 s; before the fix a
    # grant made 2 s into the silence lived 5 s from then: 7 s in all
    ttl = 5.0
    with serve(fake) as url:
        gate = make_gate(url, lease_ttl=ttl)
        held = [await gate.slot(timeout=5).__aenter__() for _ in range(2)]
        with _reaped(_spawn("wait", url, REDIS_URL, namespace, 2, 0.15, ttl)) as proc:
            client = _redis()
            try:

                def queued() -> int:
                    keys = client.scan_iter(match=f"{namespace}:*:queue")
                    return sum(int(client.zcard(k)) for k in keys)

                await _eventually(lambda: queued() == 2)
                await anyio.sleep(0.3)  # a renewal of their heartbeats, then silence
                os.kill(proc.pid, signal.SIGSTOP)
                silent = time.monotonic()
                await anyio.sleep(2.0)
                for slot in held:  # the slots go to the stopped process's waiters, first in line
                    slot._give_back_unused()
                await gate._engine.flush()
                back: list[float] = []

                async def waiter() -> None:
                    async with gate.slot(timeout=10):
                        back.append(time.monotonic() - silent)
                        await anyio.sleep(0.5)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    tg.start_soon(waiter)
                    await _eventually(lambda: _hlen(namespace, "granted") == 2)
                    assert back == []
                    os.kill(proc.pid, signal.SIGKILL)
            finally:
                client.close()
    assert len(back) == 2
    assert max(back) <= min(ttl, 5.0) + 1.0, back


# --- keys expire ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_key_has_a_ttl_after_a_run(namespace) -> None:
    """After two processes ran jobs, every key of the fleet has a TTL within idle_ttl."""
    fake = FakeScheduler({"a@x.io": 2, "b@x.io": 1}, job_duration=0.2)
    with serve(fake) as url:
        procs = [
            _spawn(
                "run",
                url,
                REDIS_URL,
                namespace,
                6,
                3,
                0.2,
                0.15,
                2.0,
                env={"FLEET_IDLE_TTL": "600"},
            )
            for _ in range(2)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err[-2000:]
    keys = _keys(namespace)
    assert len(keys) >= 5
    client = _redis()
    try:
        ttls = {key.decode(): client.pttl(key) for key in keys}
    finally:
        client.close()
    assert all(0 < ttl <= 600_000 for ttl in ttls.values()), ttls


async def test_an_idle_fleet_leaves_nothing_in_redis(make_gate, namespace) -> None:
    """idle_ttl after its last activity, an idle fleet's keys are gone from Redis."""
    fake = FakeScheduler({"a@x.io": 1}, job_duration=0.2)
    with serve(fake) as url:
        gate = make_gate(url, lease_ttl=0.5, idle_ttl=1.0)
        async with gate.slot(timeout=5) as slot:
            slot.mark_submitted("job-1")
        await gate.aclose()
    assert _keys(namespace)
    await anyio.sleep(1.3)
    assert _keys(namespace) == []


# --- aclose ------------------------------------------------------------------------------


async def test_aclose_takes_the_gates_waiters_out_at_once(make_gate, namespace) -> None:
    """After aclose() no waiter of the gate is left in Redis and statistics() shows none
    waiting; the slot still inside its block stays held until the block ends."""
    fake = FakeScheduler({"a@x.io": 1}, job_duration=0.2)
    with serve(fake) as url:
        gate = make_gate(url)
        holder = await gate.slot(timeout=5).__aenter__()
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                async with gate.slot(timeout=30):
                    pytest.fail("granted while the only slot is held")
            except GateClosed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            await _eventually(lambda: gate.statistics().waiting == 3)
            await gate.aclose()
        stats = gate.statistics()
        assert len(errors) == 3
        assert (stats.waiting, stats.held) == (0, 1)
        assert _hlen(namespace, "wait") == 0
        holder._exit(None)


# --- a paused poller -----------------------------------------------------------------------


class _StoppingScheduler(FakeScheduler):
    """Stops the process ``stop_pid`` (SIGSTOP) as its first poll arrives, then answers."""

    stop_pid = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.stop_pid and request.url.path.endswith("/scheduler/available"):
            pid, self.stop_pid = self.stop_pid, 0
            os.kill(pid, signal.SIGSTOP)
        return await super().handle(request)


@pytest.mark.slow
async def test_paused_poller_is_replaced_and_its_late_answer_dropped(make_gate, namespace):
    """A process stopped mid-poll: the fleet polls again within the poll lock's bound, and
    the paused poller's answer, arriving after a newer one, is dropped, not applied."""
    fake = _StoppingScheduler({"a@x.io": 2}, job_duration=0.3, list_full_accounts=True)
    with (
        serve(fake) as url,
        _reaped(_spawn("wait", url, REDIS_URL, namespace, 1, 0.15, 2.0)) as proc,
    ):
        fake.stop_pid = proc.pid
        await _eventually(lambda: _stopped(proc.pid), timeout=10)
        stopped = time.monotonic()
        assert fake.polls == 1  # its answer says: 2 free on a@x.io
        fake.add_outside_job("a@x.io", 30.0)
        fake.add_outside_job("a@x.io", 30.0)
        gate = make_gate(url)
        got: list[str] = []

        async def waiter() -> None:
            async with gate.slot(timeout=30) as slot:
                got.append(slot.account)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await _eventually(lambda: fake.polls >= 2, timeout=10)
            # the lock is min(poll_timeout + 1, max(3, 3 x poll_interval)) = 3 s
            assert time.monotonic() - stopped <= 3.0 + 1.0
            # the newer answer must be the fleet's before the paused one can come late
            # (a request reaching the fake is not yet its answer applied in Redis)
            await _eventually(lambda: _meta(namespace, "polls") >= 1, timeout=10)
            os.kill(proc.pid, signal.SIGCONT)
            await _eventually(lambda: _meta(namespace, "polls_late") >= 1, timeout=10)
            await anyio.sleep(0.5)
            assert got == []  # the late answer's free slots were never granted
            tg.cancel_scope.cancel()
    assert fake.rejected_429 == 0


# --- one configuration per fleet -------------------------------------------------------------


async def test_a_member_with_another_configuration_fails_at_construction(make_gate) -> None:
    """A gate whose max_jobs, accounts or strategy differ from its fleet's first member's
    fails at construction, naming the difference."""
    fake = FakeScheduler({"a@x.io": 2, "b@x.io": 1})
    with serve(fake) as url:
        make_gate(url, max_jobs=2, strategy="first_fit", accounts=["a@x.io", "b@x.io"])
        make_gate(url, max_jobs=2, strategy="first_fit", accounts=["a@x.io", "b@x.io"])
        with pytest.raises(ValueError, match=r"; this one has max_jobs=3 here, 2 in the fleet$"):
            make_gate(url, max_jobs=3, strategy="first_fit", accounts=["a@x.io", "b@x.io"])
        with pytest.raises(
            ValueError,
            match=r"accounts=\['b@x.io', 'a@x.io'\] here, \['a@x.io', 'b@x.io'\] in the fleet; "
            r"strategy='round_robin' here, 'first_fit' in the fleet$",
        ):
            make_gate(url, max_jobs=2, strategy="round_robin", accounts=["b@x.io", "a@x.io"])


@needs_redis_server
async def test_a_member_built_while_redis_was_down_fails_at_first_use(make_gate) -> None:
    """Built while Redis was unreachable, a gate with another configuration fails its
    first waiter with the same error once Redis answers."""
    fake = FakeScheduler({"a@x.io": 2})
    with serve(fake) as url, servers() as (tmp, started):
        server = Server(tmp)
        late = make_gate(url, redis_url=server.url, max_jobs=1)
        started.append(server.start())
        make_gate(url, redis_url=server.url, max_jobs=2)  # the fleet's first member
        with pytest.raises(ValueError, match=r"max_jobs=1 here, 2 in the fleet$"):
            async with late.slot(timeout=5):
                pass


async def test_first_slot_of_a_gate_idle_since_construction_is_not_lost(make_gate) -> None:
    """A gate built well over a heartbeat before its first wait grants a slot not lost.

    Regression: a grant's local deadline counted from the gate's latest heartbeat of any
    waiter (its construction, here), so the first slot reported lost and submit() gave it back.
    """
    fake = FakeScheduler({"a@x.io": 1}, job_duration=0.2)
    with serve(fake) as url:
        idle = make_gate(url, lease_ttl=1.0, poll_interval=5.0)  # heartbeat 1 s
        await anyio.sleep(1.5)
        await make_gate(url, lease_ttl=1.0, poll_interval=5.0).refresh()  # a fresh snapshot
        async with idle.slot(timeout=5) as slot:  # granted in its very first exchange
            assert not slot.lost
