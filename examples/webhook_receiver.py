"""Workers submit through the gate; a webhook receiver wakes it when jobs finish.

useapi.net POSTs a job's progress and result to the ``replyUrl`` given at creation. A
terminal callback is the fastest signal that a slot just freed, so the receiver calls
``gate.invalidate()``: the gate polls at once (never more than every 0.5 s) instead of
waiting out ``poll_interval``.

Run it (needs the ``examples`` extra: ``pip install -e '.[examples]'``)::

    python examples/webhook_receiver.py

No token or network needed: the service is capgate's simulator (``capgate.testing``),
which posts completion callbacks to the receiver over real loopback HTTP, like useapi would.
To use it for real, drop the simulator, point ``create()`` at the service's create
endpoint, and make ``RECEIVER`` an address useapi.net can reach.
"""

from __future__ import annotations

import socket
import sys
import time

import anyio
import anyio.abc
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from capgate import SERVICES, CapacityGate
from capgate.testing import FakeJob, FakeScheduler

TERMINAL = {"completed", "failed", "moderated", "cancelled", "canceled", "error", "done"}


def receiver_app(gate: CapacityGate, seen: list[str]) -> Starlette:
    """The webhook endpoint: any terminal status wakes the gate."""

    async def callback(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return Response(status_code=400)
        status = str(body.get("status", "")).lower() if isinstance(body, dict) else ""
        if status in TERMINAL:
            seen.append(str(body.get("replyRef")))
            # sync and cheap: the next poll starts now; with the job's id (the callback is
            # the service's "get job" answer), a slot the counts still show taken frees now
            gate.invalidate(SERVICES["kling"].job_id_from(body))
        return Response(status_code=204)

    return Starlette(routes=[Route("/useapi-callback", callback, methods=["POST"])])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main(jobs: int = 30, workers: int = 12) -> int:
    fake = FakeScheduler(
        {"ann@x.io": 3, "bob@x.io": 2}, service="kling", job_duration=(1.0, 3.0), seed=7
    )
    port = free_port()
    receiver = f"http://127.0.0.1:{port}/useapi-callback"
    seen: list[str] = []

    async with (
        httpx.AsyncClient(transport=fake.transport()) as api,  # the (simulated) useapi.net
        httpx.AsyncClient() as webhooks,  # what useapi uses to call us back
    ):
        gate = CapacityGate(fake.token, service="kling", client=api, poll_interval=5.0)

        async def post_callback(job: FakeJob) -> None:
            if job.reply_url:
                await webhooks.post(
                    job.reply_url,
                    json={"id": job.wire_id, "status": "COMPLETED", "replyRef": job.reply_ref},
                )

        fake.on_job_done = post_callback

        async def create(account: str, n: int) -> httpx.Response:
            return await api.post(
                fake.create_url,
                json={
                    "email": account,
                    "prompt": f"job {n}",
                    "replyUrl": receiver,
                    "replyRef": f"job-{n}",
                },
                headers={"Authorization": f"Bearer {fake.token}"},
            )

        queue_send, queue_recv = anyio.create_memory_object_stream[int](jobs)
        for n in range(jobs):
            queue_send.send_nowait(n)
        queue_send.close()

        async def worker(jobs_in: anyio.abc.ObjectReceiveStream[int]) -> None:
            async with jobs_in:
                async for n in jobs_in:
                    await gate.submit(lambda account, n=n: create(account, n))

        server = uvicorn.Server(
            uvicorn.Config(
                receiver_app(gate, seen),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="off",
            )
        )
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve)
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                await anyio.sleep(0.01)
            async with anyio.create_task_group() as pool:
                pool.start_soon(fake.run_callbacks)  # useapi's side: posts as jobs end
                async with anyio.create_task_group() as work:
                    for _ in range(workers):
                        work.start_soon(worker, queue_recv.clone())
                    queue_recv.close()
                pool.cancel_scope.cancel()
            elapsed = time.perf_counter() - started
            server.should_exit = True  # the receiver shuts down cleanly, closing its socket
        await gate.aclose()

    print(f"{jobs} jobs through 5 slots in {elapsed:.1f} s")
    print(f"polls: {fake.polls}, callbacks received: {len(seen)}, 429s: {fake.rejected_429}")
    return 0 if fake.rejected_429 == 0 and fake.creates == jobs else 1


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    sys.exit(anyio.run(main))
