"""capgate's benchmarks: one entry point.

    python benchmarks/run.py [--quick] [--json FILE] [--out DIR] [--only SECTION ...]

Sections (see benchmarks/README.md for what each measures and why):

1. dispatch  virtual time: every dispatcher on the issues' scenarios (exact, seeded), and
             the slot-seconds each loses against the oracle, split by why
1b. unseen   virtual time: the same on shapes no target names (a single slot, a trickle,
             slow answers, many accounts of 1, short bursts, a lopsided model mix)
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

SECTIONS = ("dispatch", "unseen", "overhead", "scale", "loopback")


def _losses_text(rows: list[dict[str, Any]]) -> str:
    return (
        "slot-seconds lost against the oracle while jobs of ours waited, by why "
        "(benchmarks/README.md, 'The loss split'):\n"
        + table(bench_dispatch.LOSS_HEADERS, bench_dispatch.loss_table_rows(rows))
    )


def _dispatch_text(
    rows: list[dict[str, Any]], seeds: list[dict[str, Any]], losses: list[dict[str, Any]]
) -> str:
    text = table(bench_dispatch.HEADERS, bench_dispatch.table_rows(rows))
    text += "\n\n" + _losses_text(losses)
    for scenario in dict.fromkeys(r["scenario"] for r in seeds):
        by: dict[str, list[dict[str, Any]]] = {}
        for r in seeds:
            if r["scenario"] == scenario:
                by.setdefault(r["dispatcher"], []).append(r)
        lines = []
        for name, runs in by.items():
            v = sorted(r["makespan_ratio"] for r in runs)
            lines.append(
                f"  {name}: x oracle over {len(v)} seeds: min {v[0]:.3f}, "
                f"median {v[len(v) // 2]:.3f}, max {v[-1]:.3f}; "
                f"429s {sum(r['rejected_429'] for r in runs)}"
            )
        text += f"\n\nscenario {scenario} over seeds:\n" + "\n".join(lines)
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


#: issue 16's baseline: capgate's x oracle and requests/job in the full run of seed 1 before
#: the poll-timing work (results at commit ebe9005)
TODAY = {
    "5/3/2": (1.033, 2.44),
    "50x2": (1.026, 1.14),
    "heavy tail": (1.038, 2.00),
    "outside load": (1.240, 2.75),
    "lagging counts": (1.222, 2.83),
}


def _issue16(pick: dict[tuple[str, str], dict[str, Any]], add: Any, names: list[str]) -> None:
    """Issue 16's table: makespan x oracle (no callbacks), 429s, requests/job against TODAY."""
    # (x oracle at most, 429s at most, requests/job at most this times today's)
    limits = {
        "5/3/2": (1.015, 0, 1.0),
        "50x2": (1.015, 0, 1.0),
        "heavy tail": (1.015, 0, 1.0),
        "outside load": (1.12, 5, 1.1),
        "lagging counts": (1.10, 20, 1.1),
    }
    for name in names:
        if name not in limits and name != "realistic":
            continue
        gate = pick[(name, "capgate")]
        ratio, refused, per_job = (
            gate["makespan_ratio"],
            gate["rejected_429"],
            gate["requests_per_job"],
        )
        if name == "realistic":
            # the scenario as the issue states it has a third of its jobs calling back
            woken = pick[(name, "capgate+callbacks")]
            add(
                "[16] realistic: x oracle <= 1.02 (a third with callbacks), 0 x 429",
                f"{woken['makespan_ratio']:.3f}x, {woken['rejected_429']} x 429, "
                f"{woken['requests_per_job']:.2f} req/job (no callbacks: {ratio:.3f}x, "
                f"{refused} x 429, {per_job:.2f} req/job)",
                woken["makespan_ratio"] <= 1.02 and woken["rejected_429"] == 0,
            )
            continue
        most, most_429, factor = limits[name]
        today_ratio, today_per_job = TODAY[name]
        add(
            f"[16] {name}: x oracle <= {most:g} (today {today_ratio:.3f})",
            f"{ratio:.3f}x",
            ratio <= most,
        )
        if name == "lagging counts":
            naive = pick[(name, "retry-429")]
            add(
                f"[16] {name}: x oracle below retry-429's",
                f"{ratio:.3f}x vs {naive['makespan_ratio']:.3f}x",
                ratio < naive["makespan_ratio"],
            )
        add(f"[16] {name}: <= {most_429} x 429", str(refused), refused <= most_429)
        bound = today_per_job * factor
        # at the issue's precision: today's figures are given to two decimals
        add(
            f"[16] {name}: requests/job <= {bound:.2f} (today {today_per_job:.2f}"
            + (f" x {factor:g})" if factor != 1 else ")"),
            f"{per_job:.2f}",
            round(per_job, 2) <= round(bound, 2),
        )


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues' targets against what was measured in this run.

    ``[5]``: issue 5's, on its five scenarios; ``[16]``: issue 16's table (full run, seed 1;
    a --quick run is not comparable with its requests/job baselines); ``[unseen]``: the
    gate against retry-429 on the shapes no target names.
    """
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"benchmark": "target", "target": target, "measured": measured, "met": met})

    dispatch = [r for r in rows if r["benchmark"] == "dispatch"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in dispatch))
    pick = {(r["scenario"], r["dispatcher"]): r for r in dispatch}
    _issue16(pick, add, scenarios)
    for name in scenarios:
        if name not in TODAY:
            continue  # issue 5's targets are for issue 5's scenarios
        gate = pick[(name, "capgate")]
        woken = pick[(name, "capgate+callbacks")]
        naive = pick[(name, "retry-429")]
        limiter = pick[(name, "static-limiter")]
        params = gate["params"]
        if not params["outside_jobs"]:
            add(
                f"[5] {name}: capgate 0 x 429 (no outside load)",
                f"{gate['rejected_429']} (+callbacks: {woken['rejected_429']})",
                gate["rejected_429"] == 0 and woken["rejected_429"] == 0,
            )
        add(
            f"[5] {name}: capgate makespan <= 1.05x oracle",
            f"{gate['makespan_ratio']:.3f}x (+callbacks: {woken['makespan_ratio']:.3f}x)",
            gate["makespan_ratio"] <= 1.05,
        )
        fewer = naive["requests_per_job"] / gate["requests_per_job"]
        add(
            f"[5] {name}: >= 20x fewer requests/job than retry-429",
            f"{fewer:.1f}x ({gate['requests_per_job']:.2f} vs {naive['requests_per_job']:.1f})",
            fewer >= 20,
        )
        if params["outside_jobs"]:
            add(
                f"[5] {name}: utilisation above static-limiter",
                f"{gate['utilisation']:.1%} vs {limiter['utilisation']:.1%}",
                gate["utilisation"] > limiter["utilisation"],
            )
    unseen = [r for r in rows if r["benchmark"] == "dispatch-unseen"]
    other = {(r["scenario"], r["dispatcher"]): r for r in unseen}
    for name in dict.fromkeys(r["scenario"] for r in unseen):
        gate, naive = other[(name, "capgate")], other[(name, "retry-429")]
        add(
            f"[unseen] {name}: capgate's makespan and mean wait <= retry-429's, 0 x 429",
            f"{gate['makespan_ratio']:.3f}x vs {naive['makespan_ratio']:.3f}x, wait "
            f"{gate['wait_mean']:.1f} vs {naive['wait_mean']:.1f} s, {gate['rejected_429']} x "
            f"429, {gate['requests_per_job']:.2f} vs {naive['requests_per_job']:.1f} req/job",
            gate["makespan"] <= naive["makespan"]
            and gate["wait_mean"] <= naive["wait_mean"]
            and gate["rejected_429"] == 0,
        )
    for r in rows:
        if r["benchmark"] == "overhead" and r["case"] == "acquire+release":
            add(
                f"[5] overhead within 3x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x ({r['gate_us']:.1f} vs {r['limiter_us']:.1f} us)",
                r["ratio"] <= 3,
            )
            add(
                f"[16] acquire+release within 2x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x",
                r["ratio"] <= 2,
            )
        if r["benchmark"] == "overhead" and r["case"] == "churn":
            add(
                f"[5] churn within 3x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x",
                r["ratio"] <= 3,
            )
            add(
                f"[16] churn within 2.5x CapacityLimiter ({r['backend']})",
                f"{r['ratio']:.2f}x",
                r["ratio"] <= 2.5,
            )
        if r["benchmark"] == "scale" and r["case"].startswith("dispatch pass"):
            add(
                f"[5] {r['case']} < 20 ms",
                f"{r['pass_ms']:.2f} ms ({r['queued']:,} waiters)",
                r["pass_ms"] < 20,
            )
        if r["benchmark"] == "scale" and r["case"] == "memory per waiter":
            add(
                "[5] < 2 KiB per waiter (the gate's share)",
                f"{r['gate_bytes_per_waiter']:,} B (whole task {r['bytes_per_waiter']:,} B)",
                r["gate_bytes_per_waiter"] < 2048,
            )
        if r["benchmark"] == "scale" and r["case"].startswith("requests"):
            counts = r["requests_by_waiters"]
            add(
                "[5] requests independent of waiters",
                ", ".join(f"{k}: {v}" for k, v in counts.items()),
                len(set(counts.values())) == 1,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, well under a minute")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write the JSON rows here")
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="write results.json, results.txt, utilisation.png, losses.png",
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
    all_losses: list[dict[str, Any]] = []
    if "dispatch" in sections:
        t = time.perf_counter()
        dispatch_rows, kept = bench_dispatch.run(args.quick)
        seed_rows = bench_dispatch.seeds(args.quick)
        losses = bench_dispatch.loss_rows(kept)
        all_losses += losses
        rows += dispatch_rows + seed_rows + losses
        plot_results = next(iter(kept.values()))
        emit(
            "1. dispatch efficiency, virtual time (exact; seed 1)",
            _dispatch_text(dispatch_rows, seed_rows, losses),
            time.perf_counter() - t,
        )
    if "unseen" in sections:
        t = time.perf_counter()
        unseen_rows, unseen_kept = bench_dispatch.run(
            args.quick,
            bench_dispatch.unseen_scenarios(args.quick),
            benchmark="dispatch-unseen",
        )
        losses = bench_dispatch.loss_rows(unseen_kept, benchmark="unseen-losses")
        all_losses += losses
        rows += unseen_rows + losses
        emit(
            "1b. unseen-style scenarios, virtual time (exact; seed 1)",
            table(bench_dispatch.HEADERS, bench_dispatch.table_rows(unseen_rows))
            + "\n\n"
            + _losses_text(losses),
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
        "targets ([5] issue 5, [16] issue 16: full run, seed 1; [unseen] against retry-429)",
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
        if all_losses and bench_dispatch.plot_losses(all_losses, args.out / "losses.png"):
            print(f"wrote {args.out / 'losses.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
