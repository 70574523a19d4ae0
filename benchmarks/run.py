"""capgate's benchmarks: one entry point.

    python benchmarks/run.py [--quick] [--json FILE] [--out DIR] [--only SECTION ...]

Sections (see benchmarks/README.md for what each measures and why):

1. dispatch  virtual time: every dispatcher on the issue's scenarios (exact, seeded)
2. overhead  wall clock: acquire+release and 1,000-task churn beside anyio.CapacityLimiter
3. scale     10,000 waiters over 1,000 accounts: dispatch pass, memory, requests, parsing
4. loopback  real HTTP on 127.0.0.1 with 200 workers: requests per job, CPU per poll

Every result is printed with the machine and the versions, as a table and (with --json or
--out) as JSON rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dispatch
import bench_loopback
import bench_overhead
import bench_scale
from common import environment, format_environment, quiet_structlog, table

SECTIONS = ("dispatch", "overhead", "scale", "loopback")


def _dispatch_text(rows: list[dict[str, Any]], seeds: list[dict[str, Any]]) -> str:
    text = table(bench_dispatch.HEADERS, bench_dispatch.table_rows(rows))
    if seeds:
        by: dict[str, list[float]] = {}
        for r in seeds:
            by.setdefault(r["dispatcher"], []).append(r["makespan_ratio"])
        lines = [
            f"  {name}: x oracle over {len(v)} seeds: min {min(v):.3f}, "
            f"median {sorted(v)[len(v) // 2]:.3f}, max {max(v):.3f}; "
            f"429s {sum(r['rejected_429'] for r in seeds if r['dispatcher'] == name)}"
            for name, v in by.items()
        ]
        text += f"\n\nscenario {seeds[0]['scenario']} over seeds:\n" + "\n".join(lines)
    return text


def _overhead_text(rows: list[dict[str, Any]]) -> str:
    micro = [r for r in rows if r["case"] == "acquire+release"]
    churn = [r for r in rows if r["case"] == "churn"]
    a = table(
        ("backend", "gate us/op", "CapacityLimiter us/op", "ratio", "ops x rounds", "polls"),
        [
            [
                r["backend"],
                r["gate_us"],
                r["limiter_us"],
                r["ratio"],
                f"{r['ops_per_round']}x{r['rounds']}",
                r["polls"],
            ]
            for r in micro
        ],
    )
    b = table(
        (
            "backend",
            "gate s",
            "CapacityLimiter s",
            "ratio",
            "us/acq gate",
            "us/acq limiter",
            "peak",
        ),
        [
            [
                r["backend"],
                r["gate_s"],
                r["limiter_s"],
                r["ratio"],
                r["gate_us_per_acquisition"],
                r["limiter_us_per_acquisition"],
                r["peak_held"],
            ]
            for r in churn
        ],
    )
    n = churn[0]["acquisitions"] if churn else 0
    return (
        "acquire+release, one task, fresh snapshot with room (median round):\n"
        + a
        + f"\n\n1,000 tasks churning through 10 slots ({n:,} acquisitions, median round):\n"
        + b
    )


def _scale_text(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        case = r["case"]
        if case.startswith("dispatch pass"):
            lines.append(
                f"{case}: {r['pass_ms']:.2f} ms for {r['queued']:,} waiters over "
                f"{r['accounts']:,} accounts, {r['grants']:,} granted (runs: {r['pass_ms_all']})"
            )
        elif case == "memory per waiter":
            lines.append(
                f"memory per waiter ({r['waiters']:,}): {r['bytes_per_waiter']:,} B per waiting "
                f"task, of which the gate's share is {r['gate_bytes_per_waiter']:,} B "
                f"(a bare task waiting on an anyio.Event: {r['bare_task_bytes']:,} B)"
            )
        elif case.startswith("requests"):
            by = ", ".join(f"{k} waiters: {v}" for k, v in r["requests_by_waiters"].items())
            lines.append(f"polls in 60 virtual s with nothing free: {by}")
        else:
            lines.append(
                f"parse a {r['accounts']:,}-account answer ({r['executing_rows']:,} executing "
                f"rows, {r['bytes']:,} bytes): {r['parse_ms']:.2f} ms (json.loads + parse)"
            )
    return "\n".join(lines)


def _loopback_text(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    return (
        f"{r['jobs']} jobs of 1-4 s, {r['accounts']} accounts x 5, {r['workers']} workers, "
        f"poll_interval {r['poll_interval']} s, uvicorn on 127.0.0.1:\n"
        f"  requests/job {r['requests_per_job']:.3f} ({r['polls']} polls + creates), "
        f"429s {r['rejected_429']}, makespan {r['makespan']:.2f} s = "
        f"{r['makespan_ratio']:.3f}x the virtual-time oracle ({r['oracle_makespan']:.2f} s), "
        f"utilisation {r['utilisation']:.1%}\n"
        f"  client CPU {r['client_cpu_s']:.2f} s in all = {r['client_cpu_ms_per_job']:.2f} ms "
        f"per job (gate, 200 workers, httpx)\n"
        f"  gate.refresh() alone: {r['poll_cpu_ms']:.2f} ms CPU, {r['poll_wall_ms']:.2f} ms wall "
        f"per poll ({r['poll_samples']} polls)"
    )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against what was measured in this run."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"benchmark": "target", "target": target, "measured": measured, "met": met})

    dispatch = [r for r in rows if r["benchmark"] == "dispatch"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in dispatch))
    pick = {(r["scenario"], r["dispatcher"]): r for r in dispatch}
    for name in scenarios:
        gate = pick[(name, "capgate")]
        woken = pick[(name, "capgate+callbacks")]
        naive = pick[(name, "retry-429")]
        limiter = pick[(name, "static-limiter")]
        params = gate["params"]
        if not params["outside_jobs"]:
            add(
                f"{name}: capgate 0 x 429 (no outside load)",
                f"{gate['rejected_429']} (+callbacks: {woken['rejected_429']})",
                gate["rejected_429"] == 0 and woken["rejected_429"] == 0,
            )
        add(
            f"{name}: capgate makespan <= 1.05x oracle",
            f"{gate['makespan_ratio']:.3f}x (+callbacks: {woken['makespan_ratio']:.3f}x)",
            gate["makespan_ratio"] <= 1.05,
        )
        fewer = naive["requests_per_job"] / gate["requests_per_job"]
        add(
            f"{name}: >= 20x fewer requests/job than retry-429",
            f"{fewer:.1f}x ({gate['requests_per_job']:.2f} vs {naive['requests_per_job']:.1f})",
            fewer >= 20,
        )
        if params["outside_jobs"]:
            add(
                f"{name}: utilisation above static-limiter",
                f"{gate['utilisation']:.1%} vs {limiter['utilisation']:.1%}",
                gate["utilisation"] > limiter["utilisation"],
            )
    for r in rows:
        if r["benchmark"] == "overhead" and r["case"] == "acquire+release":
            add(
                f"overhead within 3x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x ({r['gate_us']:.1f} vs {r['limiter_us']:.1f} us)",
                r["ratio"] <= 3,
            )
        if r["benchmark"] == "overhead" and r["case"] == "churn":
            add(
                f"churn within 3x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x",
                r["ratio"] <= 3,
            )
        if r["benchmark"] == "scale" and r["case"].startswith("dispatch pass"):
            add(
                f"{r['case']} < 20 ms",
                f"{r['pass_ms']:.2f} ms ({r['queued']:,} waiters)",
                r["pass_ms"] < 20,
            )
        if r["benchmark"] == "scale" and r["case"] == "memory per waiter":
            add(
                "< 2 KiB per waiter (the gate's share)",
                f"{r['gate_bytes_per_waiter']:,} B (whole task {r['bytes_per_waiter']:,} B)",
                r["gate_bytes_per_waiter"] < 2048,
            )
        if r["benchmark"] == "scale" and r["case"].startswith("requests"):
            counts = r["requests_by_waiters"]
            add(
                "requests independent of waiters",
                ", ".join(f"{k}: {v}" for k, v in counts.items()),
                len(set(counts.values())) == 1,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, well under a minute")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the JSON rows here")
    parser.add_argument(
        "--out", metavar="DIR", type=Path, help="write results.json, results.txt, utilisation.png"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    quiet_structlog()
    sections = args.only or list(SECTIONS)
    env = environment()
    mode = "quick" if args.quick else "full"
    text: list[str] = [f"capgate benchmarks ({mode} run)", format_environment(env)]
    print("\n".join(text), flush=True)

    def emit(title: str, body: str, took: float) -> None:
        block = f"\n== {title} ({took:.1f} s) ==\n{body}"
        text.append(block)
        print(block, flush=True)

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    plot_results = None
    if "dispatch" in sections:
        t = time.perf_counter()
        dispatch_rows, kept = bench_dispatch.run(args.quick)
        seed_rows = bench_dispatch.seeds(args.quick)
        rows += dispatch_rows + seed_rows
        plot_results = next(iter(kept.values()))
        emit(
            "1. dispatch efficiency, virtual time (exact; seed 1)",
            _dispatch_text(dispatch_rows, seed_rows),
            time.perf_counter() - t,
        )
    if "overhead" in sections:
        t = time.perf_counter()
        overhead = bench_overhead.run(args.quick)
        rows += overhead
        emit("2. local overhead, wall clock", _overhead_text(overhead), time.perf_counter() - t)
    if "scale" in sections:
        t = time.perf_counter()
        scale = bench_scale.run(args.quick)
        rows += scale
        emit(
            "3. scale, wall clock on a frozen virtual clock",
            _scale_text(scale),
            time.perf_counter() - t,
        )
    if "loopback" in sections:
        t = time.perf_counter()
        loop = bench_loopback.run(args.quick)
        rows += loop
        emit("4. real loopback HTTP", _loopback_text(loop), time.perf_counter() - t)

    checks = targets(rows)
    rows += checks
    emit(
        "targets (issue 5)",
        table(
            ("target", "measured", "met"), [[c["target"], c["measured"], c["met"]] for c in checks]
        ),
        0.0,
    )
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s")
    text.append(f"\ntotal {total:.1f} s")

    document = {"mode": mode, "environment": env, "seconds": round(total, 1), "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
        (args.out / "results.txt").write_text("\n".join(text) + "\n")
        if plot_results is not None and bench_dispatch.plot(
            plot_results, args.out / "utilisation.png"
        ):
            print(f"wrote {args.out / 'utilisation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
