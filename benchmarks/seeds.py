"""One scenario over many seeds: how much of a difference is the change, how much the seed.

    python benchmarks/seeds.py SCENARIO [--seeds N] [--json FILE]

Runs capgate (without and with callbacks), retry-429 and the oracle on seeds 0..N-1 of a
scenario of section 1 or 1b (virtual time, exact) and prints each seed's makespan x oracle,
then the mean, median and spread. On scenarios whose makespan hangs on where the last long
jobs land (``realistic``, ``8/1/1 models``) one seed says little: a change that helps on
average can lose on seed 1. To compare two versions seed by seed, run it once per checkout
(``PYTHONPATH=<other checkout>/src python benchmarks/seeds.py ...``) with ``--json`` and pair
the rows by seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dispatch
from capgate.simulation import simulate
from common import environment, format_environment, quiet_structlog, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = bench_dispatch.scenarios(False) + bench_dispatch.unseen_scenarios(False)
    names = {s.name: s for s in known}
    parser.add_argument("scenario", choices=sorted(names))
    parser.add_argument("--seeds", type=int, default=30, help="seeds 0..N-1 (default 30)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    quiet_structlog()
    print(format_environment(environment()))
    rows = []
    for seed in range(args.seeds):
        scenario = replace(names[args.scenario], seed=seed)
        oracle = simulate(replace(scenario, callbacks=False), "oracle", oracle=False).makespan
        row = {"scenario": scenario.name, "seed": seed}
        for label, dispatcher, callbacks in (
            ("capgate", "capgate", False),
            ("capgate+callbacks", "capgate", True),
            ("retry-429", "retry-429", False),
        ):
            result = simulate(replace(scenario, callbacks=callbacks), dispatcher, oracle=False)
            row[label] = round(result.makespan / oracle, 4)
            row[f"{label} 429s"] = result.rejected_429
        rows.append(row)
        print(
            f"seed {seed}: "
            + ", ".join(f"{k} {row[k]:.3f}" for k in ("capgate", "capgate+callbacks", "retry-429")),
            flush=True,
        )
    summary = []
    for label in ("capgate", "capgate+callbacks", "retry-429"):
        values = [r[label] for r in rows]
        summary.append(
            [
                label,
                f"{statistics.fmean(values):.3f}",
                f"{statistics.median(values):.3f}",
                f"{min(values):.3f}",
                f"{max(values):.3f}",
                sum(r[f"{label} 429s"] for r in rows),
            ]
        )
    ahead = sum(1 for r in rows if r["capgate"] < r["retry-429"])
    print(
        f"\n{args.scenario}, seeds 0-{args.seeds - 1}, makespan x oracle:\n"
        + table(("dispatcher", "mean", "median", "min", "max", "429s"), summary)
        + f"\ncapgate (no callbacks) ahead of retry-429 on {ahead} of {args.seeds} seeds"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
