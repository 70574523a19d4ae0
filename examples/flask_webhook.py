"""A Flask webhook handler wakes a SyncCapacityGate from its own thread.

useapi.net POSTs to a job's ``replyUrl`` when the job ends. That is the fastest signal that
a slot just freed, so the handler (a plain sync Flask view, run in one of the server's
threads) calls ``gate.invalidate()``: the gate polls at once (never more than every 0.5 s)
instead of waiting out ``poll_interval``. Here ``poll_interval`` is 30 s on purpose: without
the webhook each round of jobs would wait up to half a minute for the next poll.

Run it (needs the ``examples`` extra: ``pip install -e '.[examples]'``)::

    python examples/flask_webhook.py

No token or network needed: the service is capgate's simulator of Kling (``capgate.testing``)
on loopback, which POSTs each job's "get task" answer to its ``replyUrl`` when the job ends,
as useapi.net does. To use it for real, drop the simulator, point the create request at the
real ``videos/text2video`` endpoint, and serve the Flask app where useapi.net can reach it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import requests
from flask import Flask, request
from werkzeug.serving import make_server

from capgate import SERVICES, SyncCapacityGate
from capgate.testing import FakeScheduler, serve

TERMINAL = {"completed", "failed", "moderated", "cancelled", "canceled", "error", "done"}


def is_final(body: object) -> bool:
    """Whether a callback body reports a job that ended (Kling's ``status_final``, MiniMax's
    ``statusFinal``, or a terminal ``status`` word)."""
    if not isinstance(body, dict):
        return False
    if body.get("status_final") is True or body.get("statusFinal") is True:
        return True
    return str(body.get("status", "")).lower() in TERMINAL


def create_app(gate: SyncCapacityGate, seen: list[str]) -> Flask:
    """The webhook endpoint: any terminal status wakes the gate."""
    app = Flask(__name__)

    @app.post("/useapi-callback")
    def callback() -> tuple[str, int]:
        body = request.get_json(silent=True)
        if is_final(body):
            seen.append(str(body.get("replyRef")))  # type: ignore[union-attr]
            # safe from this handler thread: the next poll starts now; the job's id (the
            # callback is Kling's "get job" answer) frees a slot the counts still show taken
            gate.invalidate(SERVICES["kling"].job_id_from(body))
        return "", 204

    return app


def main(jobs: int = 12, workers: int = 6) -> int:
    fake = FakeScheduler({"ann@x.io": 2, "bob@x.io": 1}, service="kling", seed=7)
    seen: list[str] = []
    with serve(fake) as url:
        create_url = url.replace("/scheduler/available", "/videos/text2video")
        headers = {"Authorization": f"Bearer {fake.token}"}
        gate = SyncCapacityGate(fake.token, url=url, poll_interval=30.0)
        server = make_server("127.0.0.1", 0, create_app(gate, seen), threaded=True)
        receiver = f"http://127.0.0.1:{server.port}/useapi-callback"
        threading.Thread(target=server.serve_forever, name="webhooks", daemon=True).start()

        def create(account: str, n: int) -> requests.Response:
            runtime = 1.0 + (n % 3) * 0.5  # the simulator's own knob: how long this job runs
            return requests.post(
                create_url,
                json={
                    "email": account,
                    "prompt": f"scene {n}",
                    "replyUrl": receiver,
                    "replyRef": f"job-{n}",
                },
                headers={**headers, FakeScheduler.RUNTIME_HEADER: str(runtime)},
                timeout=30,
            )

        todo = list(range(jobs))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    n = todo.pop(0)
                gate.submit(lambda account, n=n: create(account, n), timeout=120)

        started = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        polls = fake.polls
        deadline = time.monotonic() + 10  # the last callbacks, before the receiver goes away
        while len(seen) < jobs and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.close()
        server.shutdown()

    print(f"{jobs} jobs through 3 slots in {elapsed:.1f} s (poll_interval 30 s)")
    print(f"polls: {polls}, callbacks received: {len(seen)}, 429s: {fake.rejected_429}")
    return 0 if fake.rejected_429 == 0 and fake.creates == jobs else 1


if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    sys.exit(main())
