"""``capgate simulate --plot``: a simulation's timeline as a picture.

Needs matplotlib (the ``cli`` extra), imported when a plot is drawn; the Agg backend draws
to a file with no display.
"""

from __future__ import annotations

import os
from typing import Any

from .simulation import SimulationResult

__all__ = ["draw_timeline", "plot_timeline"]


def plot_timeline(result: SimulationResult, path: str) -> str:
    """Draw busy slots per account over time, and jobs waiting, into ``path`` (a PNG).

    Args:
        result: A run's figures and timeline.
        path: The file to write: its extension picks the format (``.png``, ``.svg``,
            ``.pdf``…); with none, ``.png`` is added; an existing folder gets
            ``simulate.png`` inside it.

    Returns:
        The path written, which is what to tell the user.
    """
    fig = draw_timeline(result)  # first: it picks the Agg backend
    import matplotlib.pyplot as plt

    if os.path.isdir(path):
        path = os.path.join(path, "simulate.png")
    elif not os.path.splitext(path)[1]:
        path += ".png"  # what matplotlib would do, said out loud
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def draw_timeline(result: SimulationResult) -> Any:
    """The figure :func:`plot_timeline` writes (a matplotlib ``Figure``; close it after).

    Besides busy slots and waiting jobs it marks every poll instant with a tick at the
    foot of the top panel: the gate's poll timing at work (bunched after completions it
    expects, spread out when nothing is due).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenario, timeline = result.scenario, result.timeline
    minutes = result.makespan >= 600
    unit, scale = ("min", 60.0) if minutes else ("s", 1.0)
    xs = [t / scale for t in timeline.times]
    capacity = sum(timeline.capacity.values())

    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(10, 6.2),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.2]},
        layout="constrained",
    )
    labels = []
    for account, series in timeline.busy.items():
        cap = timeline.capacity[account]
        share = sum(series) / (cap * len(series)) if series else 0.0
        labels.append(f"{account} (maxJobs {cap}): {share:.0%} busy")
    top.stackplot(xs, list(timeline.busy.values()), labels=labels, step="post", alpha=0.85)
    top.axhline(capacity, color="black", linestyle="--", linewidth=1)
    top.annotate(
        f"{capacity} slots (sum of maxJobs)",
        (xs[-1] if xs else 0, capacity),
        xytext=(0, 3),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=9,
    )
    if result.poll_times:
        polls = [t / scale for t in result.poll_times]
        # x in data, y in axes fraction: a rug of ticks along the bottom edge
        top.vlines(
            polls,
            0,
            0.05,
            transform=top.get_xaxis_transform(),
            color="black",
            linewidth=0.6,
            label=f"polls ({len(polls)})",
        )
    top.set_ylabel("slots busy")
    top.set_ylim(0, capacity * 1.3)
    top.legend(loc="upper left", fontsize=8, ncols=min(3, len(labels)), frameon=False)
    top.grid(alpha=0.3)
    low, high = scenario.duration
    lost = result.losses
    workers = scenario.workers or scenario.jobs
    oracle = (
        "" if result.oracle_makespan is None else f", oracle {result.oracle_makespan / scale:.1f}"
    )
    top.set_title(
        f"capgate simulate: {scenario.jobs} jobs of {low:g}-{high:g} s, {workers} workers, "
        f"poll every {scenario.poll_interval:g} s (virtual time)\n"
        f"makespan {result.makespan / scale:.1f} {unit} (ideal "
        f"{result.ideal_makespan / scale:.1f}{oracle}), utilisation {result.utilisation:.1%}, "
        f"{result.polls} polls, 429s: {result.rejected_429}\n"
        f"slot-seconds idle while jobs waited: {lost.unseen:,.0f} freed but not yet seen, "
        f"{lost.unused:,.0f} seen but unused, {lost.lag:,.0f} lag",
        fontsize=10,
    )
    bottom.step(xs, timeline.waiting, where="post", color="tab:gray")
    bottom.fill_between(xs, timeline.waiting, step="post", color="tab:gray", alpha=0.3)
    bottom.set_ylabel("jobs waiting\nfor a slot")
    bottom.set_xlabel(f"time ({unit})")
    bottom.set_xlim(0, xs[-1] if xs else 1)
    bottom.set_ylim(0, max(1, max(timeline.waiting, default=0)) * 1.1)
    bottom.grid(alpha=0.3)
    return fig
