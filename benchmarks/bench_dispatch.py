"""1. Dispatch efficiency, in virtual time: every dispatcher on the same seeded job lists.

Exact and reproducible: trio's MockClock(autojump_threshold=0) drives capgate and the
baselines against capgate.testing.FakeScheduler; nothing here reads the wall clock except the
"took" column (how long the simulation itself ran).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from capgate.simulation import Scenario, SimulationResult, simulate

#: the rows of each scenario, in order; capgate+callbacks is capgate with callbacks=True
DISPATCHERS = (
    "capgate",
    "capgate+callbacks",
    "retry-429",
    "poll-first",
    "static-limiter",
    "oracle",
)


def scenarios(quick: bool) -> list[Scenario]:
    """The issue's scenarios (smaller job counts with --quick)."""
    n = 100 if quick else 200
    base = Scenario(name="5/3/2", accounts=(5, 3, 2), jobs=n, duration=(30.0, 120.0), seed=1)
    return [
        base,
        replace(base, name="50x2", accounts=(2,) * 50, jobs=300 if quick else 1000),
        replace(base, name="outside load", outside_jobs=150 if quick else 300, latency=0.2),
        replace(base, name="lagging counts", lag=15.0),
        replace(base, name="heavy tail", distribution="pareto", duration=(20.0, 600.0)),
    ]


def _run(scenario: Scenario, dispatcher: str) -> SimulationResult:
    if dispatcher == "capgate+callbacks":
        return simulate(replace(scenario, callbacks=True), "capgate", oracle=False)
    return simulate(scenario, dispatcher, oracle=False)


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, list[SimulationResult]]]:
    """Every dispatcher on every scenario; the oracle's makespan is each row's denominator."""
    rows: list[dict[str, Any]] = []
    kept: dict[str, list[SimulationResult]] = {}
    for scenario in scenarios(quick):
        started = time.perf_counter()
        oracle = simulate(scenario, "oracle", oracle=False)
        results = []
        for dispatcher in DISPATCHERS:
            result = oracle if dispatcher == "oracle" else _run(scenario, dispatcher)
            results.append(replace(result, oracle_makespan=oracle.makespan))
        kept[scenario.name] = results
        took = time.perf_counter() - started
        for result in results:
            row = {"benchmark": "dispatch", **result.to_dict()}
            row["simulated_in_s"] = round(took / len(results), 3)
            rows.append(row)
    return rows, kept


def seeds(quick: bool) -> list[dict[str, Any]]:
    """capgate's makespan ratio on the first scenario over several seeds (how stable it is)."""
    rows = []
    base = scenarios(quick)[0]
    for seed in range(3 if quick else 10):
        scenario = replace(base, seed=seed)
        oracle = simulate(scenario, "oracle", oracle=False).makespan
        for callbacks in (False, True):
            result = simulate(replace(scenario, callbacks=callbacks), "capgate", oracle=False)
            rows.append(
                {
                    "benchmark": "dispatch-seeds",
                    "scenario": base.name,
                    "dispatcher": result.dispatcher,
                    "seed": seed,
                    "makespan_ratio": round(result.makespan / oracle, 4),
                    "rejected_429": result.rejected_429,
                    "requests_per_job": round(result.requests_per_job, 3),
                }
            )
    return rows


HEADERS = (
    "scenario",
    "dispatcher",
    "makespan s",
    "x oracle",
    "util",
    "wait mean s",
    "wait p99 s",
    "429s",
    "req/job",
    "polls",
)


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["scenario"],
            r["dispatcher"],
            r["makespan"],
            f"{r['makespan_ratio']:.3f}",
            f"{r['utilisation']:.1%}",
            r["wait_mean"],
            r["wait_p99"],
            r["rejected_429"],
            r["requests_per_job"],
            r["polls"],
        ]
        for r in rows
    ]


def plot(results: list[SimulationResult], path: Path) -> bool:
    """Utilisation over time per dispatcher (one panel each), waiting jobs on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(
        len(results), 1, figsize=(10, 2.1 * len(results)), sharex=True, constrained_layout=True
    )
    scenario = results[0].scenario
    for ax, result in zip(axes, results, strict=True):
        tl = result.timeline
        capacity = sum(tl.capacity.values())
        layers = [[b / capacity for b in tl.busy[a]] for a in tl.capacity]
        labels = [f"{a.split('@')[0]} (maxJobs {n})" for a, n in tl.capacity.items()]
        ax.stackplot(tl.times, layers, labels=labels, alpha=0.8, step="post")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("slots busy")
        ratio = result.makespan_ratio
        ax.set_title(
            f"{result.dispatcher}: makespan {result.makespan:,.0f} s"
            + (f" ({ratio:.3f}x oracle)" if ratio else "")
            + f", utilisation {result.utilisation:.1%}, {result.rejected_429} x 429",
            fontsize=9,
            loc="left",
        )
        twin = ax.twinx()
        twin.plot(tl.times, tl.waiting, color="black", linewidth=0.8, label="jobs waiting")
        twin.set_ylabel("waiting", fontsize=8)
        twin.set_ylim(0, max(1, scenario.jobs) * 1.05)
    axes[0].legend(loc="lower left", fontsize=7, ncol=len(labels))
    axes[-1].set_xlabel("virtual seconds")
    fig.suptitle(
        f"Slot utilisation over time, scenario {scenario.name}: accounts "
        f"{'/'.join(map(str, scenario.accounts))}, {scenario.jobs} jobs of "
        f"{scenario.duration[0]:g}-{scenario.duration[1]:g} s, poll_interval "
        f"{scenario.poll_interval:g} s, seed {scenario.seed}",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
