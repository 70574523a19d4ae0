"""The sync twin's examples, run for real: a Flask webhook, and a Celery prefork worker."""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from capgate.testing import FakeScheduler, serve
from redis_support import REDIS_URL, delete_namespace, needs_redis

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = [pytest.mark.loopback, pytest.mark.slow]


def test_flask_webhook_example():
    """examples/flask_webhook.py: webhook-driven invalidate() beats a 30 s poll_interval."""
    done = subprocess.run(  # noqa: S603 - our own interpreter, our own example
        [sys.executable, str(EXAMPLES / "flask_webhook.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seconds = float(re.search(r"in ([0-9.]+) s", done.stdout).group(1))  # type: ignore[union-attr]
    assert seconds < 30.0  # without the webhook, one poll_interval alone is 30 s
    assert "callbacks received: 12, 429s: 0" in done.stdout


ACCOUNTS = {"a@x.io": 3, "b@x.io": 2, "c@x.io": 1}
POLL_INTERVAL = 0.5
TASKS = 40


def _load_example(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_redis
@pytest.mark.redis
@pytest.mark.timeout(240)
def test_celery_prefork_worker_shares_one_fleet(tmp_path, monkeypatch):
    """A real `celery worker --pool=prefork --concurrency=4` runs 40 tasks through the
    example's import-time gate: each job created once, no 429, never over maxJobs, and about
    one poll per interval for the whole worker."""
    namespace = f"capgate-test-celery-{uuid.uuid4().hex[:12]}"
    fake = FakeScheduler(ACCOUNTS, service="kling", job_duration=(1.0, 2.0), seed=3)
    log = tmp_path / "worker.log"
    worker: subprocess.Popen[bytes] | None = None
    app = None
    try:
        with serve(fake) as url:
            env = {
                "USEAPI_TOKEN": fake.token,
                "CAPGATE_URL": url,
                "CAPGATE_POLL_INTERVAL": str(POLL_INTERVAL),
                "CAPGATE_REDIS_URL": REDIS_URL,
                "CAPGATE_NAMESPACE": namespace,
                "CELERY_BROKER_URL": REDIS_URL,
            }
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            with log.open("wb") as out:
                worker = subprocess.Popen(  # noqa: S603 - our own interpreter and example
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "--app",
                        "celery_app",
                        "--workdir",
                        str(EXAMPLES),
                        "worker",
                        "--pool=prefork",
                        "--concurrency=4",
                        "--loglevel=WARNING",
                        "--without-heartbeat",
                        "--without-gossip",
                        "--without-mingle",
                        "--hostname",
                        f"{namespace}@localhost",
                    ],
                    cwd=EXAMPLES,
                    env={**os.environ, **env},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            example = _load_example(f"celery_app_{namespace}", EXAMPLES / "celery_app.py")
            app = example.app
            results = [example.create_job.delay(f"prompt {n}", ref=str(n)) for n in range(TASKS)]
            answers = [r.get(timeout=180) for r in results]
            example.gate.close()  # never used in this process: starts and stops nothing
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: children close their gates
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        if app is not None:
            app.close()
        delete_namespace(namespace)
        delete_namespace(f"{namespace}-celery")
    output = log.read_text(errors="replace")

    assert all(a["status"] == 200 for a in answers), output
    refs = collections.Counter(job.reply_ref for job in fake.jobs.values())
    assert refs == collections.Counter(str(n) for n in range(TASKS))  # each job created once
    assert fake.creates == TASKS
    assert fake.rejected_429 == 0
    for account, max_jobs in ACCOUNTS.items():
        assert fake.peak[account] <= max_jobs
    assert len({a["pid"] for a in answers}) > 1, "the tasks ran in one worker process only"
    # one poll per interval for the whole worker, not one per process
    span = fake.poll_times[-1] - fake.poll_times[0]
    intervals = span / POLL_INTERVAL
    assert fake.polls <= 1.3 * intervals + 3, (fake.polls, span)
    print(
        f"celery: {TASKS} tasks in {span:.1f} s of polling, {fake.polls} polls "
        f"({fake.polls / max(intervals, 1):.2f} per interval), peak {fake.peak}, "
        f"{len({a['pid'] for a in answers})} worker processes"
    )
