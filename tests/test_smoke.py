from __future__ import annotations

import anyio
import pytest

pytestmark = pytest.mark.anyio


async def test_smoke(make_gate):
    gate, fake = make_gate({"a@x.io": 2, "b@x.io": 1}, poll_interval=5.0)
    done = 0

    async def worker():
        nonlocal done
        async with gate.slot() as slot:
            job = await fake.create(slot.account, duration=30)
            slot.mark_submitted(job.job_id)
        done += 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(worker)
    assert done == 10
    assert fake.rejected_429 == 0
    print(fake.polls, anyio.current_time(), gate)
