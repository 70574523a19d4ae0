"""capgate logs through the standard library's ``capgate`` logger, as every library should.

Each check runs a small program in a fresh interpreter, so that nothing configured by pytest
or another test (handlers, levels, structlog's global configuration) hides what a user sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# A program that uses the gate against the in-memory fake: polls, grants, settles, and one
# failed poll (a warning); SETUP is replaced by each test's logging configuration.
PROGRAM = """
import logging
import anyio, httpx, structlog
from capgate import CapacityGate
from capgate.testing import FakeScheduler, Fault

SETUP

async def main():
    fake = FakeScheduler({"a@x.io": 2}, token="s3cret-log-token", job_duration=0.05)
    fake.inject(Fault(status=503, body={"error": "down"}))
    async with httpx.AsyncClient(transport=fake.transport()) as client:
        gate = CapacityGate(fake.token, service="ltxstudio", client=client, poll_interval=0.01)
        for n in range(4):
            async with gate.slot() as slot:
                slot.mark_submitted(f"job-{n}")
        await gate.aclose()

anyio.run(main)
"""


def _run(setup: str) -> subprocess.CompletedProcess[str]:
    code = PROGRAM.replace("SETUP", textwrap.dedent(setup))
    return subprocess.run(  # noqa: S603 - our own interpreter, our own program
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _secret_free(done: subprocess.CompletedProcess[str]) -> None:
    assert "s3cret-log-token" not in done.stdout + done.stderr


def test_nothing_configured_prints_nothing_on_stdout():
    """With nothing configured: nothing on stdout, and only the warning (the failed poll)
    on stderr, through logging's last-resort handler; no info or debug event."""
    done = _run("")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "capgate.poll_failed" in done.stderr
    for quiet in ("capgate.poll ", "capgate.grant", "capgate.settle"):
        assert quiet not in done.stderr
    _secret_free(done)


def test_basic_config_info_shows_poll_with_fields_on_stderr():
    """logging.basicConfig(level=logging.INFO): capgate.poll with its fields on stderr."""
    done = _run("logging.basicConfig(level=logging.INFO)")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    polls = [line for line in done.stderr.splitlines() if "capgate.poll " in line]
    assert polls
    assert polls[0].startswith("INFO:capgate:capgate.poll ")
    assert "service='ltxstudio'" in polls[0]
    assert "capgate.grant" not in done.stderr  # a debug event
    _secret_free(done)


def test_logger_level_warning_silences_info():
    """logging.getLogger('capgate').setLevel(WARNING) keeps info events out, warnings in."""
    done = _run(
        """
        logging.basicConfig(level=logging.DEBUG)
        logging.getLogger("capgate").setLevel(logging.WARNING)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "capgate.poll_failed" in done.stderr
    assert "capgate.poll " not in done.stderr
    assert "capgate.grant" not in done.stderr


@pytest.mark.parametrize(
    "configure",
    [
        "",
        # structlog configured anew (a new processor list) before the capture: capgate's
        # per-grant check must still find the capture
        "structlog.configure(processors=[structlog.processors.JSONRenderer()])",
    ],
    ids=["as configured", "configured anew"],
)
def test_capture_logs_sees_debug_events(configure):
    """structlog.testing.capture_logs() sees every event, debug included, with no handler."""
    done = _run(
        f"""
        import atexit, json as _json
        {configure}
        _capture = structlog.testing.capture_logs()
        _events = _capture.__enter__()
        atexit.register(lambda: print(_json.dumps([e["event"] for e in _events])))
        """
    )
    assert done.returncode == 0, done.stderr
    events = json.loads(done.stdout)
    assert "capgate.grant" in events
    assert "capgate.settle" in events
    assert "capgate.poll" in events
    assert "capgate.poll_failed" in events


def test_processor_formatter_gives_json_lines():
    """A handler with ProcessorFormatter(JSONRenderer()) turns each event into a JSON line
    with its fields and level."""
    done = _run(
        """
        import sys
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.stdlib.add_log_level,
                structlog.processors.JSONRenderer(),
            ],
        ))
        logging.getLogger("capgate").addHandler(handler)
        logging.getLogger("capgate").setLevel(logging.INFO)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    polls = [line for line in lines if line["event"] == "capgate.poll"]
    assert polls
    assert polls[0]["service"] == "ltxstudio"
    assert polls[0]["level"] == "info"
    assert {"accounts", "free"} <= set(polls[0])
    failed = [line for line in lines if line["event"] == "capgate.poll_failed"]
    assert failed[0]["level"] == "warning"
    _secret_free(done)
