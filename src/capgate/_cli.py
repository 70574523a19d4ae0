"""The ``capgate`` command line: ``demo``, ``status``, ``watch``, ``simulate``, ``serve-fake``.

Installed with the ``cli`` extra (``pip install 'capgate[cli]'``): rich draws the tables and
live displays, uvicorn serves the simulator, matplotlib draws plots, trio runs simulations
in virtual time. They are imported inside the commands that use them, so the library
itself never needs them.

Exit codes: 0 success (and Ctrl-C or SIGTERM in ``watch`` and ``serve-fake``, which run
until then); 1 the demo saw something wrong (a 429); 2 bad arguments, no token, a refused
token, or no answer from the server; 130 Ctrl-C in ``demo``, ``status`` or ``simulate``;
141 the reader of stdout left early (``capgate simulate --json | head -c 1``): the command
stops quietly, without a traceback, as ``git`` and ``ls`` do when a shell reports them
killed by SIGPIPE (128 + 13).

Output works in pipes and files as on a terminal: where stdout is not a terminal, ``watch``
prints one block per poll (one JSON line with ``--json``) and flushes it, and live displays
end on a line of their own.

An application may configure logging and this one does: library events go to stderr,
warnings only by default (``-v`` for info, ``-vv`` for debug), so they never garble a live
display. ``status`` and ``watch`` report failures themselves, so there the library is quiet
unless ``-v`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ._errors import AuthenticationError, CapacityGateError, PollError
from ._gate import CapacityGate
from ._services import SERVICES, active_services, get_service, service_for_url
from ._version import __version__

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ._models import Snapshot
    from .simulation import Scenario, SimulationResult

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `ls | head` when ls is cut off

_EXTRA_HINT = "the capgate command line needs its extra: pip install 'capgate[cli]'"


class _Failure(Exception):
    """A one-line error for stderr, and the exit code to leave with (internal)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --- argument types ----------------------------------------------------------------------


#: bounds that keep what the simulator and the fake are asked to run finite and in memory:
#: useapi documents caps of 1-50 jobs per account, and jobs of minutes
MAX_SLOTS = 1_000  # per account, and accounts per run
MAX_COUNT = 1_000_000  # jobs, workers
MAX_DURATION = 7 * 86_400.0  # a job's length (the gate reads no longer ``elapsed`` either)
MIN_POLL_INTERVAL = 0.05
MAX_SIMULATED_POLLS = 200_000  # about a millisecond of this machine's time each


def _positive_int(text: str, *, most: int = MAX_COUNT) -> int:
    if text.strip().isdigit() and len(text.strip()) > len(str(most)):  # too long for int()
        raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {_digits(text)}")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, got {_digits(text)!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > most:
        raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {_digits(text)}")
    return value


def _digits(text: str) -> str:
    """A number as typed, shortened when it is absurdly long."""
    text = text.strip()
    return text if len(text) <= 24 else f"{text[:12]}… ({len(text)} digits)"


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _job_seconds(text: str) -> float:
    """A job's length for the simulator or the fake: at most a week."""
    value = _seconds(text)
    if value > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"must be at most a week ({MAX_DURATION:g} s), got {text}")
    return value


def _poll_seconds(text: str) -> float:
    """A poll interval for the simulator or the demo: at least 0.05 s (useapi's own tools
    poll every 5 s or slower)."""
    value = _seconds(text)
    if value < MIN_POLL_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_POLL_INTERVAL:g} s, got {text}")
    return value


def _max_jobs(text: str) -> tuple[int, ...]:
    """``5,3,2``: maxJobs of each account."""
    named = _accounts(text)
    if any(not name.startswith("acct") or not name.endswith("@sim.test") for name in named):
        raise argparse.ArgumentTypeError(
            f"expected maxJobs per account like 5,3,2 (the accounts are named for you), "
            f"got {text!r}"
        )
    return tuple(named.values())


def _account_name(index: int) -> str:
    return f"acct{index:03d}@sim.test"  # as capgate.simulation names them


def _accounts(text: str) -> dict[str, int]:
    """``5,3,2`` (named acct000@sim.test, …) or ``a@x.io=5,b@x.io=3``: maxJobs per account."""
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected maxJobs per account like 5,3,2, got {text!r}")
    if len(items) > MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_SLOTS:,} accounts, got {len(items):,}")
    accounts: dict[str, int] = {}
    for i, item in enumerate(items):
        name, sep, number = item.rpartition("=")
        name = name.strip() if sep else _account_name(i)
        if sep and not name:
            raise argparse.ArgumentTypeError(f"an account name is missing in {item!r}")
        too_many = f"maxJobs must be at most {MAX_SLOTS:,}, got {_digits(number)}"
        if number.strip().isdigit() and len(number.strip()) > len(str(MAX_SLOTS)):
            raise argparse.ArgumentTypeError(too_many)  # int() refuses 4,301 digits or more
        try:
            max_jobs = int(number)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"maxJobs must be a whole number, got {_digits(number)!r} in {_digits(text)!r}"
            ) from None
        if max_jobs < 1:
            raise argparse.ArgumentTypeError(f"maxJobs must be at least 1, got {max_jobs}")
        if max_jobs > MAX_SLOTS:
            raise argparse.ArgumentTypeError(too_many)
        if name in accounts:
            raise argparse.ArgumentTypeError(f"account {name!r} is given twice")
        accounts[name] = max_jobs
    return accounts


#: the account-level failures ``serve-fake --fail`` can simulate (useapi-scheduler.md)
FAKE_FAILURES = (596, 412, 402, 502, 504)


def _pair(text: str, what: str) -> tuple[str, int]:
    name, sep, number = text.rpartition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected ACCOUNT={what}, got {text!r}")
    try:
        return name.strip(), int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{what} must be a whole number, got {number.strip()!r} in {text!r}"
        ) from None


def _failure(text: str) -> tuple[str, int]:
    """``a@x.io=596``: every create for that account answers that status."""
    account, status = _pair(text, "STATUS")
    if status not in FAKE_FAILURES:
        known = ", ".join(map(str, FAKE_FAILURES))
        raise argparse.ArgumentTypeError(f"STATUS must be one of {known}, got {status}")
    return account, status


def _outside(text: str) -> tuple[str, int]:
    """``a@x.io=2``: two of that account's slots run jobs started outside the gate."""
    account, slots = _pair(text, "SLOTS")
    if not 1 <= slots <= MAX_SLOTS:
        raise argparse.ArgumentTypeError(
            f"SLOTS must be from 1 to {MAX_SLOTS:,}, got {_digits(text.rpartition('=')[2])}"
        )
    return account, slots


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


# --- logging -----------------------------------------------------------------------------


class _StderrHandler(logging.Handler):
    """Writes each record to whatever ``sys.stderr`` is *now*: rich's live display swaps it
    for a proxy that prints above the display, and a handler holding the original stream
    would draw through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)


@contextlib.contextmanager
def _library_log(level: int) -> Iterator[None]:
    """Show the library's events of ``level`` and above on stderr, as structlog's console
    lines; put the ``capgate`` logger back as it was afterwards (main() may run inside
    another program, or a test)."""
    logger = logging.getLogger("capgate")
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.TimeStamper(fmt="%H:%M:%S"),
                structlog.dev.ConsoleRenderer(colors=False),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            ],
        )
    )
    previous = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # the application's own handlers would show each line twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous[0])
        logger.propagate = previous[1]


# --- pipes and signals -------------------------------------------------------------------


def _made_of(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is a ``kind``, alone or as every leaf of the exception groups of task
    groups (a Ctrl-C inside trio's nursery comes out as a group)."""
    if isinstance(exc, kind):
        return True
    inner: Sequence[BaseException] = getattr(exc, "exceptions", ())
    return bool(inner) and all(_made_of(e, kind) for e in inner)


def _stdout_to_devnull() -> None:
    """The reader of stdout left: send what is still buffered, and anything Python flushes
    on exit, to /dev/null, so the interpreter's own last flush cannot fail with a traceback
    (the recipe of the ``signal`` module's documentation)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (``kill``, a service manager stopping us) ends the command as Ctrl-C does.

    SIGINT gets the same plain handler: with it, asyncio's runner leaves SIGINT alone, and
    Ctrl-C is a KeyboardInterrupt on every Python (on 3.10 the runner's own handler ends the
    run with a CancelledError instead).
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, interrupt)
    except ValueError:  # not the main thread (main() inside another program): leave them
        pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# --- shared output -----------------------------------------------------------------------


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich would exit 1 itself; let main() end it as for any other output (141)
            self.quiet = True
            raise BrokenPipeError

    return _Console(stderr=stderr, highlight=False)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _summary(
    result: SimulationResult,
    title: str,
    *,
    peak: dict[str, int] | None = None,
    busy_share: dict[str, float] | None = None,
) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    s = result.scenario
    low, high = s.duration
    timeline = result.timeline
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    table.add_row(
        "scenario",
        f"{_count(s.jobs, 'job')} of {low:g}-{high:g} s, {_count(s.workers or s.jobs, 'worker')}, "
        f"seed {s.seed}",
    )
    table.add_row(
        "accounts",
        f"maxJobs {'+'.join(map(str, s.accounts))} = {_count(s.capacity, 'slot')}, "
        f"poll every {s.poll_interval:g} s",
    )
    table.add_row("makespan", Text(_duration(result.makespan), style="bold"))
    bounds = [("vs ideal", result.ideal_makespan), ("vs oracle", result.oracle_makespan)]
    for label, bound in bounds:
        if bound is not None and bound > 0:
            table.add_row(
                label, f"{_duration(bound)}, so +{result.makespan / bound - 1:.1%} longer"
            )
    if busy_share is None:  # from the timeline's samples
        busy_share = {
            account: sum(series) / (timeline.capacity[account] * len(series))
            for account, series in timeline.busy.items()
            if series
        }
    shares = [f"{a.split('@')[0]} {share:.0%}" for a, share in busy_share.items()]
    table.add_row(
        "slot utilisation",
        f"{result.utilisation:.1%}" + (f"  ({', '.join(shares)})" if shares else ""),
    )
    if peak is not None:
        table.add_row(
            "peak busy",
            ", ".join(
                f"{a.split('@')[0]} {peak.get(a, 0)}/{n}"
                for a, n in zip(s.account_names, s.accounts, strict=True)
            ),
        )
    spacing = result.makespan / result.polls if result.polls else 0.0
    table.add_row(
        "polls", f"{result.polls}  (one every {spacing:.2f} s; poll_interval {s.poll_interval:g})"
    )
    table.add_row(
        "HTTP requests",
        f"{result.requests}  = {result.requests_per_job:.2f} per job (polls + creates)",
    )
    if result.poll_times:  # a simulation (the demo records no poll instants)
        lost = result.losses
        table.add_row(
            "idle slot-time",
            f"{lost.total:,.0f} slot-s while jobs waited: {lost.unseen:,.0f} freed but not yet "
            "seen, "
            f"{lost.unused:,.0f} seen but unused, {lost.lag:,.0f} lag (counts behind)",
        )
    table.add_row(
        "429s",
        Text(f"{result.rejected_429}", style="bold red" if result.rejected_429 else "bold green"),
    )
    table.add_row(
        "wait for a slot",
        f"mean {_duration(result.wait_mean)}, p99 {_duration(result.wait_p99)}, "
        f"max {_duration(result.wait_max)}",
    )
    note = "ideal: total work / slots, or the longest job if longer"
    if result.oracle_makespan is not None:
        note += "\noracle: a dispatcher that sees each slot free up the instant it does"
    return Group(
        Panel(table, title=title, title_align="left", expand=False), Text(note, style="dim")
    )


def _scenario(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Scenario:
    from .simulation import Scenario

    if args.min_duration > args.max_duration:
        parser.error(
            f"--min-duration ({args.min_duration:g}) is larger than "
            f"--max-duration ({args.max_duration:g})"
        )
    if args.command == "simulate":  # virtual time: what a run costs is its polls
        rounds = -(-args.jobs // sum(args.accounts))
        polls = rounds * args.max_duration / args.poll_interval
        if polls > MAX_SIMULATED_POLLS:
            parser.error(
                f"this run would poll about {polls:,.0f} times (more than "
                f"{MAX_SIMULATED_POLLS:,}): raise --poll-interval, or run fewer or shorter jobs"
            )
    return Scenario(
        name=args.command,
        accounts=args.accounts,
        jobs=args.jobs,
        workers=args.workers,
        duration=(args.min_duration, args.max_duration),
        poll_interval=args.poll_interval,
        seed=args.seed,
        service=args.service,
    )


# --- demo --------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._demo import run_demo

    scenario = _scenario(args, parser)
    console = _console()
    console.print(
        "[bold]capgate demo[/]: the simulator runs as a real HTTP server on loopback and a "
        "real CapacityGate polls it; no token and no network needed."
    )
    wall = time.perf_counter()
    outcome = anyio.run(
        lambda: run_demo(
            scenario, console, on_url=lambda url: console.print(f"simulator at [cyan]{url}[/]")
        )
    )
    wall = time.perf_counter() - wall
    if not console.is_terminal:
        console.line()  # in a file or pipe, the live display's last frame ends mid-line
    result = outcome.result
    title = f"capgate demo: done in {wall:.1f} s"
    console.print(_summary(result, title, peak=outcome.peak, busy_share=outcome.busy_share))
    if result.rejected_429:
        console.print(
            f"[bold red]{result.rejected_429} create requests met a 429: "
            "the gate let an account be oversubscribed[/]"
        )
        return EXIT_FAILED
    console.print(
        "Every job ran, no account went over its maxJobs, and no create request met a 429."
    )
    return EXIT_OK


# --- simulate ----------------------------------------------------------------------------


def _cmd_simulate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ._plot import plot_timeline
    from .simulation import simulate

    scenario = _scenario(args, parser)
    if args.plot is not None:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            parser.error(f"--plot: folder {folder} does not exist")
    wall = time.perf_counter()
    result = simulate(scenario, "capgate", oracle=True)
    wall = time.perf_counter() - wall
    if args.json:
        print(json.dumps({**result.to_dict(), "wall_seconds": round(wall, 3)}, indent=2))
    else:
        console = _console()
        console.print(
            _summary(
                result,
                f"capgate simulate: {_duration(result.makespan)} of virtual time in {wall:.2f} s",
            )
        )
    if args.plot is not None:
        try:
            written = plot_timeline(result, args.plot)
        except (ValueError, OSError) as exc:  # an unknown image format, a file we may not write
            raise _Failure(f"--plot: {exc}") from None
        print(f"plot written to {written}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


# --- status and watch --------------------------------------------------------------------


def _token() -> str:
    token = os.environ.get("USEAPI_TOKEN", "").strip()
    if not token:
        raise _Failure(
            "no API token: set the USEAPI_TOKEN environment variable to your useapi.net token"
        )
    return token


def _service_of(args: argparse.Namespace) -> str | None:
    """``--service`` if given, else the service ``--url`` names, else ``None``.

    useapi's URLs are ``/<version>/<service>/…``; ``capgate serve-fake`` serves the same
    paths, so its URL says which service it simulates. With neither, the gate's own
    ``TypeError`` (listing the active services) is the error shown.
    """
    if args.service is not None:
        return str(args.service)
    if args.url:
        import httpx

        try:
            spec = service_for_url(httpx.URL(args.url).path)
        except httpx.InvalidURL:
            spec = None  # CapacityGate says what is wrong with it
        if spec is not None:
            return spec.name
    return None


def _open_gate(args: argparse.Namespace) -> CapacityGate:
    try:
        return CapacityGate(
            _token(), service=_service_of(args), url=args.url, poll_timeout=args.timeout
        )
    except (CapacityGateError, ValueError, TypeError) as exc:
        text = str(exc)
        if text.startswith("service= is required"):  # the CLI's words for the library's
            text = "--service is required" + text.removeprefix("service= is required")
            text = text.replace("a base_url= or url=", "a --url")
        raise _Failure(text) from None


def _poll_failure(gate: CapacityGate, exc: CapacityGateError) -> _Failure:
    if isinstance(exc, AuthenticationError):
        return _Failure(f"{exc}; check USEAPI_TOKEN")
    if isinstance(exc, PollError) and exc.status_code is None:
        return _Failure(f"cannot reach {gate.url}: {exc}")
    return _Failure(f"poll of {gate.url} failed: {exc}")


def _snapshot_rows(snapshot: Snapshot) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Accounts and executing jobs as plain rows; accounts the server left out of
    ``available[]`` (full ones) but that run jobs are added with ``listed: False``."""
    accounts = [
        {
            "account": row.account,
            "maxJobs": row.max_jobs,
            "executing": row.busy,
            "available": row.free,
            "listed": True,
        }
        for row in snapshot.accounts
    ]
    listed = {row.account for row in snapshot.accounts}
    running: dict[str, int] = {}
    for job in snapshot.executing:
        if job.account is not None and job.account not in listed:
            running[job.account] = running.get(job.account, 0) + 1
    accounts.extend(
        {"account": a, "maxJobs": None, "executing": n, "available": 0, "listed": False}
        for a, n in sorted(running.items())
    )
    now = datetime.now(timezone.utc)
    jobs = []
    for job in snapshot.executing:
        elapsed = job.elapsed
        if elapsed is None and job.started is not None:
            seconds = max(0, int((now - job.started).total_seconds()))
            elapsed = f"{seconds // 60:02d}:{seconds % 60:02d}"
        jobs.append(
            {
                "id": job.job_id,
                "account": job.account,
                "started": None if job.started is None else job.started.isoformat(),
                "elapsed": elapsed,
            }
        )
    return accounts, jobs


def _status_view(
    gate: CapacityGate, snapshot: Snapshot, *, footer: str = "", max_jobs_shown: int = 0
) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    accounts, jobs = _snapshot_rows(snapshot)
    table = Table(title=f"{gate.service} accounts", title_justify="left", expand=False)
    table.add_column("account", no_wrap=True)
    table.add_column("maxJobs", justify="right")
    table.add_column("executing", justify="right")
    table.add_column("available", justify="right")
    for row in accounts:
        table.add_row(
            row["account"],
            "?" if row["maxJobs"] is None else str(row["maxJobs"]),
            "?" if row["executing"] is None else str(row["executing"]),
            Text(str(row["available"]), style="green" if row["available"] else "red")
            if row["listed"]
            else Text("0*", style="red"),
        )
    parts: list[RenderableType] = [table]
    if any(not row["listed"] for row in accounts):
        parts.append(
            Text(
                "* full: the service leaves full accounts out of available[]; "
                "shown here from their executing jobs",
                style="dim",
            )
        )
    if not accounts:
        parts.append(
            Text(
                "No account listed: every account is busy (the service lists only accounts "
                "with a free slot), or none is configured.",
                style="yellow",
            )
        )
    jobs_table = Table(title=f"executing jobs ({len(jobs)})", title_justify="left", expand=False)
    jobs_table.add_column("id", overflow="fold")
    jobs_table.add_column("account", no_wrap=True)
    jobs_table.add_column("elapsed", justify="right")
    shown = jobs if not max_jobs_shown else jobs[:max_jobs_shown]
    for job in shown:
        jobs_table.add_row(job["id"], job["account"] or "?", job["elapsed"] or "?")
    if len(shown) < len(jobs):
        jobs_table.add_row(f"… and {len(jobs) - len(shown)} more", "", "")
    if jobs:
        parts.append(jobs_table)
    else:
        parts.append(Text("No jobs executing.", style="dim"))
    status = _service_status(gate.service)
    if status != "active":
        parts.append(Text(f"{gate.service} is {status}; a gate on it still works", style="yellow"))
    if footer:
        parts.append(Text(footer, style="dim"))
    return Group(*parts)


def _service_status(name: str) -> str:
    """``"active"``, or ``"retired on <date>"``."""
    spec = get_service(name)
    if spec.status == "active":
        return "active"
    return f"retired on {spec.retired_on}" if spec.retired_on else spec.status


def _skipped(gate: CapacityGate, snapshot: Snapshot) -> str:
    """What to say about rows of the answer the gate could not read, or ``""``.

    Rows in another service's shape (``--service`` not matching the URL) all fail this way:
    saying so beats an empty table that reads as "every account is busy".
    """
    if not snapshot.skipped:
        return ""
    key = SERVICES[gate.service].account_key
    rows = _count(snapshot.skipped, "row")
    return (
        f"{gate.service}: skipped {rows} of the answer that could not be read "
        f"({gate.service} names the account in {key!r}); is --service right?"
    )


def _unreadable(gate: CapacityGate, snapshot: Snapshot) -> None:
    """Fail when rows were skipped and nothing else was readable."""
    if snapshot.skipped and not snapshot.accounts and not snapshot.executing:
        raise _Failure(_skipped(gate, snapshot))


def _status_json(gate: CapacityGate, snapshot: Snapshot) -> dict[str, Any]:
    accounts, jobs = _snapshot_rows(snapshot)
    spec = get_service(gate.service)
    return {
        "service": gate.service,
        "status": spec.status,
        "retired_on": spec.retired_on,
        "url": gate.url,
        "accounts": accounts,
        "executing": jobs,
        "skipped": snapshot.skipped,
    }


async def _status(args: argparse.Namespace) -> int:
    gate = _open_gate(args)
    try:
        try:
            snapshot = await gate.refresh()
        except CapacityGateError as exc:
            raise _poll_failure(gate, exc) from None
    finally:
        await gate.aclose()
    _unreadable(gate, snapshot)
    if snapshot.skipped:
        print(f"capgate: warning: {_skipped(gate, snapshot)}", file=sys.stderr)
    if args.json:
        print(json.dumps(_status_json(gate, snapshot), indent=2))
    else:
        _console().print(_status_view(gate, snapshot))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return anyio.run(_status, args)


async def _watch(args: argparse.Namespace) -> int:
    """Poll every interval until Ctrl-C: live tables on a terminal; elsewhere (a file, a
    pipe) or with ``--json``, one block or one JSON line per poll, flushed as it is written,
    so ``capgate watch > log`` holds every poll so far whenever it is stopped."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def clock() -> str:
        return datetime.now().strftime("%H:%M:%S")

    gate = _open_gate(args)
    console = _console()
    live_display = console.is_terminal and not args.json
    try:
        try:
            snapshot = await gate.refresh()  # a first failure is a setup error: say so, exit 2
        except CapacityGateError as exc:
            raise _poll_failure(gate, exc) from None
        _unreadable(gate, snapshot)
        answered, error = clock(), ""
        with contextlib.ExitStack() as stack:
            live = (
                stack.enter_context(Live(console=console, auto_refresh=False))
                if live_display
                else None
            )
            while True:
                if args.json:
                    line: dict[str, Any] = {"time": datetime.now(timezone.utc).isoformat()}
                    if error:
                        line.update(service=gate.service, url=gate.url, error=error)
                    else:
                        line.update(_status_json(gate, snapshot))
                    print(json.dumps(line), flush=True)
                else:
                    footer = (
                        f"{gate.url} · every {args.interval:g} s · last answer {answered} · "
                        "Ctrl-C to stop"
                    )
                    view: RenderableType = _status_view(
                        gate,
                        snapshot,
                        footer=footer,
                        max_jobs_shown=max(3, console.height - 18) if live else 0,
                    )
                    notes = [note for note in (_skipped(gate, snapshot), error) if note]
                    if notes:  # keep the last good tables, and say they are old
                        view = Group(view, *(Text(note, style="yellow") for note in notes))
                    if live is not None:
                        live.update(view, refresh=True)
                    else:
                        console.print(view)
                        console.print()  # a blank line between polls
                        sys.stdout.flush()
                await anyio.sleep(args.interval)
                try:
                    snapshot = await gate.refresh()
                    answered, error = clock(), ""
                except AuthenticationError as exc:  # retrying a refused token is pointless
                    raise _poll_failure(gate, exc) from None
                except PollError as exc:  # transient: say so and try again next interval
                    error = f"poll failed at {clock()}: {exc}; retrying"
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await gate.aclose()


def _cmd_watch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        with _sigterm_as_ctrl_c():
            return anyio.run(_watch, args)
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C (or SIGTERM) is how a watch ends


# --- serve-fake --------------------------------------------------------------------------


def _cmd_serve_fake(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .testing import FakeScheduler, serve

    if args.min_duration > args.max_duration:
        parser.error(
            f"--min-duration ({args.min_duration:g}) is larger than "
            f"--max-duration ({args.max_duration:g})"
        )
    if not args.token.strip() or any(ch.isspace() for ch in args.token):
        parser.error("--token must be non-empty and contain no whitespace")
    if args.port:
        import socket

        with socket.socket() as probe:  # say it plainly, before uvicorn logs a traceback
            # as uvicorn does: a port left in TIME_WAIT by our own last run is free to reuse
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", args.port))
            except OSError as exc:
                raise _Failure(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    for account, _ in [*args.fail, *args.outside]:
        if account not in args.accounts:
            parser.error(f"{account} is not one of --accounts ({', '.join(args.accounts)})")
    fake = FakeScheduler(
        args.accounts,
        service=args.service,
        token=args.token,
        job_duration=(args.min_duration, args.max_duration),
        seed=args.seed,
        reply_url=args.reply_url,
        fail_rate=args.fail_rate,
    )
    for account, status in args.fail:
        fake.fail_account(account, status)
    for account, slots in args.outside:
        fake.keep_busy(account, slots)
    try:
        with _sigterm_as_ctrl_c(), serve(fake, port=args.port) as url:
            import httpx

            create = str(httpx.URL(url).copy_with(path=httpx.URL(fake.create_url).path))
            root = str(httpx.URL(url).copy_with(path=httpx.URL(fake.base_url).path))
            key = fake.spec.account_key
            first = next(iter(args.accounts))
            accounts = ", ".join(f"{a} (maxJobs {n})" for a, n in args.accounts.items())
            service = ""  # the URL names the service
            example = json.dumps({key: first, "prompt": "a red robot"})
            # a service that publishes no cap needs max_jobs= (and one that lists no
            # accounts, accounts=): the line to paste says them
            caps = ""
            if fake.spec.needs_max_jobs:
                caps = f", max_jobs={dict(args.accounts)!r}"
            extra = ""
            if args.fail:
                extra += "  failing    " + ", ".join(f"{a} ({n})" for a, n in args.fail) + "\n"
            if args.outside:
                busy = ", ".join(f"{a} ({n} slots)" for a, n in args.outside)
                extra += f"  outside    {busy} busy with jobs started outside the gate\n"
            if args.reply_url:
                extra += f"  replyUrl   {args.reply_url} (account default)\n"
            print(
                f"capgate serve-fake: a simulated {args.service} service on loopback "
                "(Ctrl-C to stop)\n"
                "\n"
                f"  scheduler  GET  {url}\n"
                f"  create     POST {create}\n"
                f"             body {example}; without {key!r} the fake picks an account "
                "with room; 429 when full\n"
                f"  API root   {root}\n"
                f"  token      {fake.token} (the fake's own; it accepts no other)\n"
                f"  accounts   {accounts}\n"
                f"  jobs run   {args.min_duration:g}-{args.max_duration:g} s (a body's "
                '"duration" is the video\'s length, not this)\n'
                f"{extra}"
                "\n"
                "Try it:\n"
                f"  USEAPI_TOKEN={fake.token} capgate status{service} --url {url}\n"
                f"  USEAPI_TOKEN={fake.token} capgate watch{service} --url {url}\n"
                f"  curl -H 'Authorization: Bearer {fake.token}' -d '{example}' {create}\n"
                "\n"
                "In Python:\n"
                f'  gate = CapacityGate("{fake.token}", service="{args.service}", '
                f'base_url="{root}"{caps})',
                flush=True,
            )
            while True:
                time.sleep(3600)
    except RuntimeError as exc:  # uvicorn could not bind (port in use)
        raise _Failure(str(exc)) from None
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_OK


# --- the parser --------------------------------------------------------------------------


def _add_scenario_options(
    p: argparse.ArgumentParser, *, min_duration: float, max_duration: float, poll: float
) -> None:
    p.add_argument(
        "--accounts",
        type=_max_jobs,
        default="5,3,2",
        metavar="N,N,…",
        help="maxJobs of each account (default: 5,3,2)",
    )
    p.add_argument("--jobs", type=_positive_int, default=120, help="jobs to run (default: 120)")
    p.add_argument(
        "--workers", type=_positive_int, default=40, help="concurrent workers (default: 40)"
    )
    p.add_argument(
        "--min-duration",
        type=_job_seconds,
        default=min_duration,
        metavar="S",
        help=f"shortest job in seconds (default: {min_duration:g})",
    )
    p.add_argument(
        "--max-duration",
        type=_job_seconds,
        default=max_duration,
        metavar="S",
        help=f"longest job in seconds (default: {max_duration:g})",
    )
    p.add_argument(
        "--poll-interval",
        type=_poll_seconds,
        default=poll,
        metavar="S",
        help=f"the gate's poll_interval in seconds (default: {poll:g})",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the job durations (default: 0)")
    _add_service(p)


def _add_service(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--service",
        choices=sorted(SERVICES),
        default="kling",
        help="which useapi.net service (default: kling)",
    )


def _add_poll_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--service",
        choices=sorted(SERVICES),
        default=None,
        help="which useapi.net service (required unless --url names it): "
        + ", ".join(active_services())
        + " (retired ones still work)",
    )
    p.add_argument(
        "--url",
        help="poll this URL instead of the service's (a proxy, or `capgate serve-fake`)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="seconds one poll may take (default: 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``capgate`` argument parser."""
    from ._demo import DEMO_SCENARIO

    parser = argparse.ArgumentParser(
        prog="capgate",
        description="See capgate work, and see your useapi.net accounts at a glance.",
        epilog="status and watch read your token from USEAPI_TOKEN. "
        "Run `capgate COMMAND -h` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"capgate {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show the library's log: -v info, -vv debug (on stderr)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="watch the gate feed jobs to a simulator over loopback HTTP (about 20 s)",
        description="Run a realistic scenario through a real CapacityGate against the "
        "simulator served over loopback HTTP, with a live display and a summary. "
        "Needs no token and no network.",
    )
    _add_scenario_options(
        demo,
        min_duration=DEMO_SCENARIO.duration[0],
        max_duration=DEMO_SCENARIO.duration[1],
        poll=DEMO_SCENARIO.poll_interval,
    )
    demo.set_defaults(func=_cmd_demo, quiet=False)

    status = commands.add_parser(
        "status",
        help="one poll of the service's capacity: accounts and executing jobs",
        description="Poll the service's capacity once with USEAPI_TOKEN (scheduler/available, "
        "or the jobs and accounts endpoints of the newer services) and show each "
        "account's maxJobs, executing and available, and the executing jobs.",
    )
    _add_poll_options(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(func=_cmd_status, quiet=True)

    watch = commands.add_parser(
        "watch",
        help="the status tables, refreshed live until Ctrl-C",
        description="Poll the service's capacity every --interval seconds with USEAPI_TOKEN "
        "and keep the status tables on screen until Ctrl-C.",
    )
    _add_poll_options(watch)
    watch.add_argument(
        "--interval",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="seconds between polls (default: 5, the spacing useapi's own tools use)",
    )
    watch.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per poll instead of tables (for scripts and log files)",
    )
    watch.set_defaults(func=_cmd_watch, quiet=True)

    simulate = commands.add_parser(
        "simulate",
        help="a scenario in virtual time (no sleeping): summary, and a plot",
        description="Run a scenario through a real CapacityGate against the in-memory "
        "simulator in virtual time (trio's MockClock): hours of jobs take a second.",
    )
    _add_scenario_options(simulate, min_duration=30.0, max_duration=120.0, poll=5.0)
    simulate.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw busy slots per account and waiting workers over time into FILE.png",
    )
    simulate.add_argument(
        "--json", action="store_true", help="print the figures as JSON instead of a table"
    )
    simulate.set_defaults(func=_cmd_simulate, quiet=False)

    fake = commands.add_parser(
        "serve-fake",
        help="serve the simulator alone on loopback, to try your own code against",
        description="Serve the simulator on 127.0.0.1 until Ctrl-C: the service's capacity "
        "endpoint, its documented create path(s) and answer, job status, GET accounts and "
        "replyUrl callbacks; creates answer 429 when an account is full.",
    )
    fake.add_argument(
        "--port", type=_port, default=0, help="port on 127.0.0.1 (default: a free one)"
    )
    fake.add_argument(
        "--accounts",
        type=_accounts,
        default="5,3,2",
        metavar="N,N,…",
        help="maxJobs per account, e.g. 5,3,2 or a@x.io=5,b@x.io=3 (default: 5,3,2)",
    )
    _add_service(fake)
    fake.add_argument(
        "--token", default="fake-token", help="the token it accepts (default: fake-token)"
    )
    fake.add_argument(
        "--min-duration", type=_job_seconds, default=30.0, metavar="S", help="(default: 30)"
    )
    fake.add_argument(
        "--max-duration", type=_job_seconds, default=120.0, metavar="S", help="(default: 120)"
    )
    fake.add_argument("--seed", type=int, default=0, help="seeds durations and ids (default: 0)")
    fake.add_argument(
        "--fail",
        type=_failure,
        action="append",
        default=[],
        metavar="ACCOUNT=STATUS",
        help="every create for ACCOUNT answers STATUS: "
        + ", ".join(map(str, FAKE_FAILURES))
        + " (repeatable)",
    )
    fake.add_argument(
        "--outside",
        type=_outside,
        action="append",
        default=[],
        metavar="ACCOUNT=SLOTS",
        help="SLOTS of ACCOUNT's slots stay busy with jobs started outside the gate (repeatable)",
    )
    fake.add_argument(
        "--fail-rate",
        type=_rate,
        default=0.0,
        metavar="P",
        help="the share of jobs that end failed instead of completed (default: 0)",
    )
    fake.add_argument(
        "--reply-url",
        default=None,
        metavar="URL",
        help="the account-level replyUrl: jobs created without their own are reported there",
    )
    fake.set_defaults(func=_cmd_serve_fake, quiet=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``capgate`` command line; returns the exit code.

    Args:
        argv: The arguments (``sys.argv[1:]`` when ``None``).
    """
    try:
        import rich  # noqa: F401 - only to fail early with a hint
    except ImportError:
        print(f"capgate: {_EXTRA_HINT}", file=sys.stderr)
        return EXIT_ERROR
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    else:
        level = logging.CRITICAL if args.quiet else logging.WARNING  # capgate logs no criticals
    func: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.func
    try:
        with _library_log(level):
            code = func(args, parser)
            sys.stdout.flush()  # here, where a reader that left can still be handled
    except _Failure as exc:
        print(f"capgate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.code
    except ImportError as exc:
        print(f"capgate: {_EXTRA_HINT} ({exc})", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as exc:
        if _made_of(exc, KeyboardInterrupt):
            print("capgate: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not _made_of(exc, BrokenPipeError):
            raise
        # the reader of stdout left (`capgate status --json | head -c 1`): end quietly, as
        # git and ls do, with the code a shell shows for them
        with contextlib.suppress(OSError, ValueError):
            _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    else:
        return code
