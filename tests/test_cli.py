"""The ``capgate`` command line: each command, its errors, and its exit codes.

``status`` and ``watch`` run against :func:`capgate.testing.serve` on loopback; ``demo``
runs a short scenario over real loopback HTTP; ``simulate`` runs in virtual time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import structlog

from capgate._cli import main
from capgate.testing import FakeScheduler, Fault, serve

TOKEN = "s3cret-test-token-7f1d"  # must never show up in any output

SHORT_DEMO = [
    "demo",
    "--jobs",
    "12",
    "--workers",
    "6",
    "--min-duration",
    "0.2",
    "--max-duration",
    "0.4",
    "--poll-interval",
    "0.05",
]


@pytest.fixture
def served() -> Iterator[tuple[FakeScheduler, str]]:
    """A fake on loopback with two accounts: a@x.io full (2 of 2), b@x.io 1 of 3 busy."""
    fake = FakeScheduler({"a@x.io": 2, "b@x.io": 3}, token=TOKEN, job_duration=600)
    with serve(fake) as url:
        create = httpx.URL(url).copy_with(path=httpx.URL(fake.create_url).path)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for account in ("a@x.io", "a@x.io", "b@x.io"):
            httpx.post(create, json={"email": account}, headers=headers).raise_for_status()
        yield fake, url


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/ltxstudio/scheduler/available"


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text


def _capgate(*args: str, token: str | None = TOKEN) -> subprocess.Popen[str]:
    """``python -m capgate ARGS`` in a child process, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if k != "USEAPI_TOKEN"}
    if token is not None:
        env["USEAPI_TOKEN"] = token
    env["COLUMNS"] = "120"
    return subprocess.Popen(  # noqa: S603 - our own interpreter, our own arguments
        [sys.executable, "-m", "capgate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _interrupt(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Ctrl-C, as a terminal would send it; returns the exit code, stdout and stderr."""
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=20)
    # read through the text wrappers: communicate() would skip what they already buffered
    assert process.stdout is not None
    assert process.stderr is not None
    with process.stdout, process.stderr:
        return code, process.stdout.read(), process.stderr.read()


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--accounts", "5,x"], "argument --accounts: maxJobs must be a whole number"),
        (["demo", "--accounts", "5,0"], "argument --accounts: maxJobs must be at least 1"),
        (["simulate", "--jobs", "0"], "argument --jobs: must be at least 1"),
        (["simulate", "--workers", "many"], "argument --workers: expected a whole number"),
        (["simulate", "--poll-interval", "-1"], "argument --poll-interval: must be a positive"),
        (
            ["simulate", "--min-duration", "9", "--max-duration", "3"],
            "--min-duration (9) is larger than --max-duration (3)",
        ),
        (["simulate", "--accounts", "a@x.io=5"], "argument --accounts: expected maxJobs"),
        (["status", "--service", "nope"], "argument --service: invalid choice: 'nope'"),
        (["watch", "--interval", "0"], "argument --interval: must be a positive"),
        (["serve-fake", "--port", "70000"], "argument --port: must be between 0 and 65535"),
        (["serve-fake", "--accounts", "=3"], "argument --accounts: an account name is missing"),
        (
            ["serve-fake", "--fail", "a@x.io=500"],
            "argument --fail: STATUS must be one of 596, 412, 402, 502, 504, got 500",
        ),
        (["serve-fake", "--fail", "596"], "argument --fail: expected ACCOUNT=STATUS, got '596'"),
        (["serve-fake", "--outside", "a@x.io=0"], "argument --outside: SLOTS must be from 1"),
        # absurd sizes: before, a traceback (simulate), a hang (demo) or hours of polls
        (["simulate", "--accounts", "9" * 23], "maxJobs must be at most 1,000, got 9999"),
        (["demo", "--accounts", "1000000000000"], "maxJobs must be at most 1,000"),
        (["serve-fake", "--accounts", "a@x.io=5000"], "maxJobs must be at most 1,000"),
        (["serve-fake", "--outside", "a@x.io=5000"], "SLOTS must be from 1 to 1,000"),
        (["simulate", "--jobs", "9" * 5000], "must be at most 1,000,000, got 999999999999…"),
        (["simulate", "--poll-interval", "1e-300"], "must be at least 0.05 s, got 1e-300"),
        (["simulate", "--max-duration", "1e9"], "must be at most a week (604800 s)"),
        (["simulate", "--jobs", "100000"], "would poll about 240,000 times"),
        (["serve-fake", "--fail-rate", "2"], "argument --fail-rate: must be from 0 to 1, got 2"),
        (
            ["serve-fake", "--accounts", "a@x.io=2", "--fail", "b@x.io=596"],
            "b@x.io is not one of --accounts (a@x.io)",
        ),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    """Bad arguments give an argparse error on stderr and exit code 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert message in err


def test_python_dash_m(tmp_path):
    """``python -m capgate`` is the same command."""
    done = subprocess.run(
        [sys.executable, "-m", "capgate", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("capgate ")


def test_main_restores_logging_config(capsys):
    """main() configures structlog for itself and puts the previous configuration back."""
    before = structlog.get_config()
    with pytest.raises(SystemExit):
        main(["simulate", "--jobs", "0"])
    assert main(["simulate", "--jobs", "3", "--workers", "2", "--json"]) == 0
    assert structlog.get_config() == before


# --- demo --------------------------------------------------------------------------------


def test_demo_runs_over_loopback_without_a_token(monkeypatch, capsys):
    """A short demo serves the simulator, gets every job through with no 429, exits 0."""
    monkeypatch.delenv("USEAPI_TOKEN", raising=False)
    assert main(SHORT_DEMO) == 0
    out = capsys.readouterr().out
    assert "simulator at http://127.0.0.1:" in out
    assert "12/12" in out  # jobs done
    assert "makespan" in out
    assert "vs ideal" in out
    assert "429s              0" in out
    assert "per job" in out
    assert "Every job ran" in out


# --- status ------------------------------------------------------------------------------


def test_status_table(served, monkeypatch, capsys):
    """status shows every account, the full one from its jobs, and the executing jobs."""
    _, url = served
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", url]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "b@x.io" in out
    assert "a@x.io" in out
    assert "0*" in out  # a@x.io is full, so the service left it out of available[]
    assert "executing jobs (3)" in out
    _no_secret(captured.out, captured.err)


def test_status_json(served, monkeypatch, capsys):
    """status --json prints the accounts and jobs as JSON."""
    _, url = served
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    accounts = {row["account"]: row for row in data["accounts"]}
    assert accounts["b@x.io"] == {
        "account": "b@x.io",
        "maxJobs": 3,
        "executing": 1,
        "available": 2,
        "listed": True,
    }
    assert accounts["a@x.io"]["listed"] is False
    assert accounts["a@x.io"]["executing"] == 2
    assert len(data["executing"]) == 3
    assert {job["account"] for job in data["executing"]} == {"a@x.io", "b@x.io"}


def test_status_without_token(monkeypatch, capsys, served):
    """No USEAPI_TOKEN: one line on stderr, exit 2, and no request made."""
    fake, url = served
    monkeypatch.delenv("USEAPI_TOKEN", raising=False)
    polls = fake.polls
    assert main(["status", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err == (
        "capgate: error: no API token: set the USEAPI_TOKEN environment variable "
        "to your useapi.net token\n"
    )
    assert fake.polls == polls


def test_status_refused_token(served, monkeypatch, capsys):
    """A refused token (401): one line on stderr, exit 2, the token not shown."""
    fake, url = served
    wrong = "wrong-token-0b9e"
    monkeypatch.setenv("USEAPI_TOKEN", wrong)
    assert main(["status", "--url", url]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("capgate: error: ltxstudio: the API token was refused (HTTP 401")
    assert captured.err.count("\n") == 1
    assert wrong not in captured.err
    assert fake.unauthorized == 1


def test_status_dead_server(dead_url, monkeypatch, capsys):
    """Nothing listening: one line on stderr naming the URL, exit 2."""
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", dead_url, "--timeout", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"capgate: error: cannot reach {dead_url}: ")
    assert captured.err.count("\n") == 1
    _no_secret(captured.out, captured.err)


def test_status_refuses_plain_http_off_loopback(monkeypatch, capsys):
    """An http:// URL off loopback is refused before the token travels; exit 2."""
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", "http://example.com/v1/kling/scheduler/available"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capgate: error: url uses plain http:// to example.com")


# --- watch -------------------------------------------------------------------------------


def test_watch_refreshes_until_ctrl_c(served):
    """watch polls every interval, keeps the last tables when a poll fails, and exits 0
    quietly on Ctrl-C."""
    fake, url = served
    process = _capgate("watch", "--url", url, "--interval", "0.2")
    try:
        _wait_for(lambda: fake.polls >= 3)
        fake.inject(Fault(status=503, body={"error": "maintenance"}, count=1000))
        polls = fake.polls
        _wait_for(lambda: fake.polls >= polls + 2)
    finally:
        code, out, err = _interrupt(process)
    assert code == 0
    assert "b@x.io" in out
    assert "Ctrl-C to stop" in out
    assert "poll failed at" in out
    assert "HTTP 503: maintenance; retrying" in out
    assert "Traceback" not in err
    _no_secret(out, err)


def test_watch_refused_token(served, monkeypatch, capsys):
    """watch with a refused token says so in one line and exits 2."""
    _, url = served
    monkeypatch.setenv("USEAPI_TOKEN", "nope-nope")
    assert main(["watch", "--url", url, "--interval", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capgate: error: ltxstudio: the API token was refused (HTTP 401")


def test_watch_dead_server(dead_url, monkeypatch, capsys):
    """watch with nothing listening says so in one line and exits 2."""
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["watch", "--url", dead_url, "--interval", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"capgate: error: cannot reach {dead_url}: ")
    assert err.count("\n") == 1


def test_watch_without_token(monkeypatch, capsys):
    """watch with no USEAPI_TOKEN says so in one line and exits 2."""
    monkeypatch.delenv("USEAPI_TOKEN", raising=False)
    assert main(["watch"]) == 2
    assert capsys.readouterr().err.startswith("capgate: error: no API token")


# --- serve-fake --------------------------------------------------------------------------


@pytest.mark.parametrize("grouped", [False, True])
def test_ctrl_c_inside_a_task_group_is_an_interrupt_too(monkeypatch, capsys, grouped):
    """Ctrl-C during simulate comes out of trio's nursery as an exception group: exit 130
    and one line, as a bare KeyboardInterrupt (found by a review: exit 1 and a traceback)."""
    import capgate._cli as cli

    if sys.version_info >= (3, 11):
        group = BaseExceptionGroup  # noqa: F821 - a builtin since 3.11
    else:  # pragma: no cover - anyio's backport
        import exceptiongroup

        group = exceptiongroup.BaseExceptionGroup

    def interrupted(args: object, parser: object) -> int:
        if grouped:
            raise group("nursery", [KeyboardInterrupt()])
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_simulate", interrupted)
    assert main(["simulate", "--jobs", "10"]) == 130
    err = capsys.readouterr().err
    assert err == "capgate: interrupted\n"


def test_serve_fake_serves_until_ctrl_c():
    """serve-fake prints its URL and token, answers polls and creates (429 when full),
    and exits 0 on Ctrl-C."""
    process = _capgate(
        "serve-fake", "--accounts", "a@x.io=1", "--token", "tok-123", "--max-duration", "60"
    )
    try:
        assert process.stdout is not None
        lines = []
        while not any("scheduler  GET" in line for line in lines):
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            lines.append(line)
        url = lines[-1].split("GET", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:")
        create = httpx.URL(url.replace("/scheduler/available", "/videos/text2video"))
        headers = {"Authorization": "Bearer tok-123"}
        assert httpx.post(create, json={"email": "a@x.io"}, headers=headers).status_code == 200
        assert httpx.post(create, json={"email": "a@x.io"}, headers=headers).status_code == 429
        assert httpx.get(url, headers=headers).json()["available"] == []
        assert httpx.get(url, headers={"Authorization": "Bearer x"}).status_code == 401
    finally:
        code, out, err = _interrupt(process)
    assert code == 0
    banner = "".join(lines) + out
    assert "token      tok-123" in banner
    assert "capgate status --url http://127.0.0.1:" in banner
    assert "Traceback" not in err


def test_serve_fake_fails_accounts_and_adds_outside_load():
    """serve-fake --fail ACCOUNT=596 answers 596 to that account's creates (useapi's error
    body), --outside ACCOUNT=1 keeps one of its slots busy, and a create without an account
    goes to the account with room."""
    process = _capgate(
        "serve-fake",
        *("--service", "minimax", "--accounts", "111=2,222=2", "--token", "tok-9"),
        *("--fail", "111=596", "--outside", "222=1", "--min-duration", "600"),
        *("--max-duration", "600"),
    )
    try:
        assert process.stdout is not None
        lines = []
        while not any(line.startswith("Try it") for line in lines):
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else ""
            lines.append(line)
        url = next(line for line in lines if "scheduler  GET" in line).split("GET", 1)[1].strip()
        create = url.replace("/scheduler/available", "/videos/create")
        headers = {"Authorization": "Bearer tok-9"}
        failed = httpx.post(create, json={"account": "111", "duration": 6}, headers=headers)
        picked = httpx.post(create, json={"prompt": "x"}, headers=headers)
        full = httpx.post(create, json={"prompt": "y"}, headers=headers)
        available = httpx.get(url, headers=headers).json()["available"]
    finally:
        code, _, err = _interrupt(process)
    assert code == 0
    assert "Traceback" not in err
    assert failed.status_code == 596
    assert failed.json()["code"] == 596
    assert "on hold" in failed.json()["error"]
    assert picked.json()["videoId"].startswith("user:4242-minimax:222-video:")
    assert full.status_code == 429
    assert [row["account"] for row in available] == ["111"]  # 222: outside job + ours
    banner = "".join(lines)
    assert "failing    111 (596)" in banner
    assert "outside    222 (1 slots) busy" in banner


def test_serve_fake_port_in_use(capsys):
    """A port already taken gives one clear line and exit 2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["serve-fake", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"capgate: error: cannot listen on 127.0.0.1:{port}: ")


# --- simulate ----------------------------------------------------------------------------


def test_simulate_summary_and_plot(tmp_path, capsys):
    """simulate runs in virtual time, prints the summary, and draws a PNG."""
    picture = tmp_path / "sim.png"
    started = time.perf_counter()
    assert main(["simulate", "--jobs", "60", "--workers", "20", "--plot", str(picture)]) == 0
    assert time.perf_counter() - started < 20  # about an hour of virtual time
    out = capsys.readouterr().out
    assert "of virtual time in" in out
    assert "vs ideal" in out
    assert "vs oracle" in out
    assert "429s              0" in out
    assert f"plot written to {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_json(capsys):
    """simulate --json prints the figures of capgate.simulation as JSON."""
    argv = ["simulate", "--json", "--jobs", "50", "--accounts", "4,2", "--seed", "3"]
    argv += ["--min-duration", "10", "--max-duration", "20", "--poll-interval", "2"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jobs"] == 50
    assert data["rejected_429"] == 0
    assert data["params"]["accounts"] == [4, 2]
    assert data["params"]["duration"] == [10.0, 20.0]
    assert data["params"]["poll_interval"] == 2.0
    assert data["makespan"] >= data["oracle_makespan"] >= data["ideal_makespan"] * 0.999
    assert data["utilisation"] > 0.8
    assert "wall_seconds" in data


def test_simulate_plot_marks_every_poll_instant():
    """The plot's top panel carries one tick per poll, at the instants the polls were made."""
    from capgate._plot import draw_timeline
    from capgate.simulation import Scenario, simulate

    result = simulate(Scenario(jobs=40, workers=20, seed=2))
    fig = draw_timeline(result)
    try:
        top = fig.axes[0]
        (ticks,) = [c for c in top.collections if c.get_label().startswith("polls")]
        assert ticks.get_label() == f"polls ({result.polls})"
        xs = [segment[0][0] for segment in ticks.get_segments()]
        assert xs == pytest.approx(list(result.poll_times))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_simulate_summary_splits_the_idle_time(capsys):
    """simulate's summary says how much slot-time sat idle while jobs waited, and why."""
    assert main(["simulate", "--jobs", "30", "--workers", "10"]) == 0
    assert "slot-s while jobs waited" in capsys.readouterr().out


def test_simulate_plot_folder_missing(tmp_path, capsys):
    """--plot into a folder that does not exist is an argument error."""
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--plot", str(tmp_path / "nope" / "x.png")])
    assert info.value.code == 2
    assert "--plot: folder" in capsys.readouterr().err


# --- logging -----------------------------------------------------------------------------


def test_verbose_shows_library_events_on_stderr(served, monkeypatch, capsys):
    """-v shows the library's info events (capgate.poll with its fields) on stderr only."""
    _, url = served
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["-v", "status", "--url", url, "--json"]) == 0
    captured = capsys.readouterr()
    assert "capgate.poll" in captured.err
    assert "service=ltxstudio" in captured.err or "service='ltxstudio'" in captured.err
    assert "capgate.poll" not in captured.out
    _no_secret(captured.out, captured.err)


def test_main_restores_the_capgate_logger(served, monkeypatch, capsys):
    """main() attaches its handler to the 'capgate' logger and puts level, handlers and
    propagation back afterwards."""
    _, url = served
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    logger = logging.getLogger("capgate")
    before = (logger.level, list(logger.handlers), logger.propagate)
    assert main(["-vv", "status", "--url", url]) == 0
    assert (logger.level, list(logger.handlers), logger.propagate) == before


# --- pipes, files and signals ------------------------------------------------------------


def _reader_gone(*args: str) -> tuple[int, str]:
    """Run ``capgate ARGS`` with a stdout whose reader left before the first byte."""
    read, write = os.pipe()
    os.close(read)  # `capgate … | true`: nobody will read
    env = {**os.environ, "USEAPI_TOKEN": TOKEN}
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter, our own arguments
            [sys.executable, "-m", "capgate", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    return done.returncode, done.stderr


def test_status_json_to_a_reader_that_left(served):
    """`capgate status --json | true`: no traceback, nothing on stderr, exit 141."""
    _, url = served
    code, err = _reader_gone("status", "--url", url, "--json")
    assert err == ""
    assert code == 141


def test_simulate_json_to_a_reader_that_left():
    """`capgate simulate --json | true`: no traceback, nothing on stderr, exit 141."""
    code, err = _reader_gone("simulate", "--json", "--jobs", "10")
    assert err == ""
    assert code == 141


def test_simulate_table_to_a_reader_that_left():
    """The rich summary to a closed pipe ends as quietly as JSON does."""
    code, err = _reader_gone("simulate", "--jobs", "10")
    assert err == ""
    assert code == 141


def test_simulate_piped_to_head_c_1():
    """`capgate simulate --json | head -c 1` through a real pipe: one byte, no traceback."""
    producer = subprocess.Popen(
        [sys.executable, "-m", "capgate", "simulate", "--json", "--jobs", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert producer.stdout is not None
    head = subprocess.run(
        ["head", "-c", "1"],  # noqa: S607 - coreutils' head, as a user's shell finds it
        stdin=producer.stdout,
        capture_output=True,
        timeout=60,
        check=True,
    )
    producer.stdout.close()  # only head holds the read end now
    _, err = producer.communicate(timeout=60)
    assert head.stdout == b"{"
    assert b"Traceback" not in err
    assert err == b""
    assert producer.returncode in (0, 141)  # 0 if it all fit in the pipe before head left


def test_demo_summary_on_lines_of_its_own():
    """Piped, the demo's last frame and its summary are on separate lines."""
    process = _capgate(*SHORT_DEMO)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "╯╭" not in out
    assert any(line.startswith("╭─ capgate demo: done in") for line in out.splitlines())


def test_watch_json_prints_and_flushes_a_line_per_poll(served):
    """watch --json into a pipe: a JSON line per poll, readable while it runs; SIGTERM
    ends it with exit 0 and no traceback."""
    fake, url = served
    process = _capgate("watch", "--url", url, "--interval", "0.2", "--json")
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(3)]  # would block if not flushed
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=20)
    assert process.stderr is not None
    with process.stdout, process.stderr:
        err = process.stderr.read()
    assert code == 0
    assert err == ""
    for line in lines:
        data = json.loads(line)
        assert data["service"] == "ltxstudio"
        assert {row["account"] for row in data["accounts"]} == {"a@x.io", "b@x.io"}
        assert len(data["executing"]) == 3
    assert fake.polls >= 3


def test_watch_into_a_file_keeps_every_poll_on_sigterm(served, tmp_path):
    """`capgate watch > file` stopped by SIGTERM leaves one block per poll in the file."""
    _, url = served
    log = tmp_path / "watch.txt"
    env = {**os.environ, "USEAPI_TOKEN": TOKEN, "COLUMNS": "120"}
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter, our own arguments
            [sys.executable, "-m", "capgate", "watch", "--url", url, "--interval", "0.2"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        _wait_for(lambda: log.read_text().count("ltxstudio accounts") >= 2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
    assert process.stderr is not None
    with process.stderr:
        assert process.stderr.read() == ""
    assert code == 0
    text = log.read_text()
    assert text.count("ltxstudio accounts") >= 2
    assert text.count("executing jobs (3)") == text.count("ltxstudio accounts")


def test_serve_fake_stops_on_sigterm():
    """serve-fake ends on SIGTERM as on Ctrl-C: exit 0, no traceback."""
    process = _capgate("serve-fake")
    assert process.stdout is not None
    while "scheduler  GET" not in process.stdout.readline():
        pass
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=20)
    assert process.stderr is not None
    with process.stdout, process.stderr:
        err = process.stderr.read()
    assert code == 0
    assert "Traceback" not in err
    assert "stopped" in err


def _serve_fake_url(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    while True:
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        if "scheduler  GET" in line:
            return line.split("GET", 1)[1].strip()


def test_serve_fake_restarts_at_once_on_the_same_port():
    """Regression: serve-fake --port N stopped with a client connected could not listen on
    N again for a minute (TIME_WAIT, no SO_REUSEADDR in the pre-bind check)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    first = _capgate("serve-fake", "--port", str(port))
    url = _serve_fake_url(first)
    with httpx.Client() as client:  # a kept-alive connection: the server closes it first
        assert client.get(url, headers={"Authorization": "Bearer fake-token"}).is_success
        code, _, err = _interrupt(first)
    assert code == 0, err
    second = _capgate("serve-fake", "--port", str(port))
    try:
        assert _serve_fake_url(second) == url
    finally:
        code, _, err = _interrupt(second)
    assert code == 0, err


# --- what the commands say ---------------------------------------------------------------


def test_plot_without_extension_names_the_file_written(tmp_path, capsys):
    """--plot PATH with no extension writes PATH.png and says so."""
    target = tmp_path / "timeline"
    assert main(["simulate", "--jobs", "10", "--plot", str(target)]) == 0
    assert f"plot written to {target}.png\n" in capsys.readouterr().out
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_into_a_folder_names_the_file_written(tmp_path, capsys):
    """--plot FOLDER writes FOLDER/simulate.png and says so."""
    assert main(["simulate", "--jobs", "10", "--plot", str(tmp_path)]) == 0
    assert f"plot written to {tmp_path / 'simulate.png'}\n" in capsys.readouterr().out
    assert (tmp_path / "simulate.png").is_file()


@pytest.fixture
def minimax() -> Iterator[str]:
    """A minimax fake on loopback (rows name the account in 'account', not 'email')."""
    fake = FakeScheduler({"a@x.io": 2, "b@x.io": 1}, token=TOKEN, service="minimax")
    with serve(fake) as url:
        yield url


def test_service_follows_the_url(minimax, monkeypatch, capsys):
    """status --url …/v1/minimax/scheduler/available reads the answer as minimax's."""
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", minimax, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["service"] == "minimax"
    assert [row["account"] for row in data["accounts"]] == ["a@x.io", "b@x.io"]


def test_rows_of_another_service_are_an_error_not_an_empty_table(minimax, monkeypatch, capsys):
    """Regression: --service ltxstudio on a minimax answer showed an empty table and exit 0;
    now every row skipped is one line on stderr and exit 2."""
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--service", "ltxstudio", "--url", minimax]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "capgate: error: ltxstudio: skipped 2 rows of the answer that could not be read "
        "(ltxstudio names the account in 'email'); is --service right?\n"
    )


def test_some_rows_skipped_is_a_warning(served, monkeypatch, capsys):
    """A malformed row among good ones: the table, and a warning on stderr."""
    fake, url = served
    good = {"email": "b@x.io", "maxJobs": 3, "executing": 0, "available": 3}
    fake.inject(Fault(body={"executing": [], "available": [good, {"maxJobs": 1}]}))
    monkeypatch.setenv("USEAPI_TOKEN", TOKEN)
    assert main(["status", "--url", url, "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["account"] for row in json.loads(captured.out)["accounts"]] == ["b@x.io"]
    assert captured.err.startswith("capgate: warning: ltxstudio: skipped 1 row of the answer")
