"""Metrics for Prometheus and OpenTelemetry, read from :meth:`CapacityGate.statistics`.

Nothing here counts anything: every figure is read from the gate's own
:class:`~capgate.GateStatistics` at collection time, so the gate costs the same with or
without metrics, and the two exporters always agree.

Prometheus (``pip install 'capgate[prometheus]'``)::

    from prometheus_client import REGISTRY, start_http_server
    from capgate.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(kling_gate, minimax_gate))
    start_http_server(9464, addr="127.0.0.1")

OpenTelemetry (``pip install 'capgate[otel]'``, the API only; bring your own SDK)::

    from capgate.metrics import instrument

    instrument(gate)                       # the global MeterProvider, or meter_provider=…

The figures, each labelled with the gate's ``service`` (and ``account`` per account):

========================================  =========  ==========================================
name                                      type       what
========================================  =========  ==========================================
``capgate_waiting``                       gauge      tasks waiting for a slot
``capgate_held``                          gauge      slots handed out, not yet released
``capgate_reserved``                      gauge      reservations counted against the accounts
``capgate_capacity``                      gauge      sum of the caps in force
``capgate_free``                          gauge      slots the gate would grant now
``capgate_lag_seconds``                   gauge      how far behind the service's counts run
``capgate_grants_total``                  counter    slots granted
``capgate_timeouts_total``                counter    waiters that gave up (``SlotTimeout``)
``capgate_polls_total``                   counter    polls that succeeded
``capgate_poll_failures_total``           counter    polls that failed (and were retried)
``capgate_wait_seconds``                  histogram  how long granted callers waited
``capgate_account_free_slots``            gauge      slots the gate would grant now
``capgate_account_max_jobs``              gauge      the cap in force (absent while unknown)
``capgate_account_executing``             gauge      jobs executing (absent while unknown)
``capgate_account_reserved``              gauge      reservations the snapshot does not reflect
``capgate_account_quarantined``           gauge      1 while out of rotation, else 0
========================================  =========  ==========================================

In fleet mode (``store=RedisStore(...)``) ``waiting``, ``held``, ``reserved``, ``capacity``,
``free``, the per-account figures, ``polls`` and ``poll_failures`` are the fleet's, as of
the gate's latest exchange with Redis; ``grants``, ``timeouts`` and the wait histogram are
this process's. Sum the latter over processes; take one process's value (``max``) of the
former.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._models import AccountStatistics, GateStatistics

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from prometheus_client.metrics_core import Metric

    from ._gate import CapacityGate
    from ._sync import SyncCapacityGate

    #: either gate: the sync twin's figures are its gate's, read on its loop thread
    Gate = CapacityGate | SyncCapacityGate

__all__ = ["PrometheusCollector", "instrument"]

_PROMETHEUS_HINT = "capgate.metrics.PrometheusCollector needs pip install 'capgate[prometheus]'"
_OTEL_HINT = "capgate.metrics.instrument needs pip install 'capgate[otel]'"


@dataclass(frozen=True)
class _Figure:
    """One gate-wide figure: its name, kind, help text, unit and how to read it."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    unit: str
    read: Callable[[GateStatistics], float]


@dataclass(frozen=True)
class _AccountFigure:
    """One per-account figure; ``read`` returns ``None`` for a value not known yet."""

    name: str
    help: str
    read: Callable[[AccountStatistics], float | None]


_FIGURES = (
    _Figure("capgate_waiting", "gauge", "Tasks waiting for a slot.", "", lambda s: s.waiting),
    _Figure(
        "capgate_held", "gauge", "Slots handed out and not yet released.", "", lambda s: s.held
    ),
    _Figure(
        "capgate_reserved",
        "gauge",
        "Reservations counted against the accounts.",
        "",
        lambda s: s.reserved,
    ),
    _Figure("capgate_capacity", "gauge", "Sum of the caps in force.", "", lambda s: s.capacity),
    _Figure("capgate_free", "gauge", "Slots the gate would grant now.", "", lambda s: s.free),
    _Figure(
        "capgate_lag_seconds",
        "gauge",
        "How far behind the service's counts have been seen to run.",
        "s",
        lambda s: s.lag,
    ),
    _Figure("capgate_grants_total", "counter", "Slots granted.", "", lambda s: s.grants),
    _Figure(
        "capgate_timeouts_total",
        "counter",
        "Waiters that gave up with SlotTimeout.",
        "",
        lambda s: s.timeouts,
    ),
    _Figure("capgate_polls_total", "counter", "Polls that succeeded.", "", lambda s: s.polls),
    _Figure(
        "capgate_poll_failures_total",
        "counter",
        "Polls that failed (and were retried).",
        "",
        lambda s: s.polls_failed,
    ),
)

_ACCOUNT_FIGURES = (
    _AccountFigure(
        "capgate_account_free_slots",
        "Slots the gate would grant now on the account.",
        lambda a: a.free,
    ),
    _AccountFigure(
        "capgate_account_max_jobs", "The account's cap in force (maxJobs).", lambda a: a.max_jobs
    ),
    _AccountFigure(
        "capgate_account_executing", "Jobs executing on the account.", lambda a: a.executing
    ),
    _AccountFigure(
        "capgate_account_reserved",
        "Reservations on the account the latest snapshot does not reflect yet.",
        lambda a: a.reserved,
    ),
    _AccountFigure(
        "capgate_account_quarantined",
        "1 while the account is out of rotation, else 0.",
        lambda a: 0 if a.quarantined_for is None else 1,
    ),
    _AccountFigure(
        "capgate_account_median_duration_seconds",
        "Median duration of the account's jobs seen to end.",
        lambda a: a.median_duration,
    ),
    _AccountFigure(
        "capgate_account_next_completion_seconds",
        "Seconds until one of the account's running jobs has more likely than not ended.",
        lambda a: a.next_completion,
    ),
)

_WAIT = "capgate_wait_seconds"
_WAIT_HELP = "How long granted callers waited for a slot."


def _statistics(gate: Gate) -> GateStatistics:
    """``gate.statistics()``, also from a scrape thread while the event loop changes it."""
    for _ in range(100):
        try:
            return gate.statistics()
        except RuntimeError:  # pragma: no cover - a dict changed size while being read
            continue
    return gate.statistics()  # pragma: no cover


def _checked(gates: Iterable[Gate]) -> tuple[Gate, ...]:
    from ._gate import CapacityGate
    from ._sync import SyncCapacityGate

    gates = tuple(gates)
    services: set[str] = set()
    for gate in gates:
        if not isinstance(gate, CapacityGate | SyncCapacityGate):
            raise TypeError(
                f"expected CapacityGate or SyncCapacityGate objects, got {type(gate).__name__}"
            )
        if gate.service in services:
            raise ValueError(
                f"two gates for service {gate.service!r}: their series would carry the same "
                "labels; give each service one gate"
            )
        services.add(gate.service)
    return gates


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# --- Prometheus ------------------------------------------------------------------------


class PrometheusCollector:
    """A ``prometheus_client`` collector for one or more gates (extra ``prometheus``).

    Register it once, with every gate of the process; each series is labelled with its
    gate's ``service`` (and ``account``), so gates of different services share one
    registry::

        REGISTRY.register(PrometheusCollector(kling_gate, minimax_gate))

    Every scrape reads ``gate.statistics()``; nothing is counted twice.

    Args:
        *gates: The gates to expose, one per service (``SyncCapacityGate`` too).

    Raises:
        ImportError: ``prometheus_client`` is not installed.
        ValueError: Two gates have the same service.
        TypeError: An argument is not a :class:`~capgate.CapacityGate` or a
            :class:`~capgate.SyncCapacityGate`.
    """

    def __init__(self, *gates: Gate) -> None:
        try:
            import prometheus_client  # noqa: F401 - fail here, with the hint, not at a scrape
        except ImportError as exc:
            raise ImportError(_PROMETHEUS_HINT) from exc
        self._gates = _checked(gates)

    def __repr__(self) -> str:
        services = ", ".join(gate.service for gate in self._gates)
        return f"<capgate.metrics.PrometheusCollector {services or 'no gates'}>"

    def describe(self) -> list[Metric]:
        """The metric families, without values: registering two collectors of capgate
        figures in one registry is refused (``Duplicated timeseries``), as it should be."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        """The figures of every gate, as ``prometheus_client`` metric families."""
        return self._families([_statistics(gate) for gate in self._gates])

    @staticmethod
    def _families(stats: list[GateStatistics]) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        family: CounterMetricFamily | GaugeMetricFamily
        for figure in _FIGURES:
            if figure.kind == "counter":
                family = CounterMetricFamily(figure.name, figure.help, labels=["service"])
            else:
                family = GaugeMetricFamily(figure.name, figure.help, labels=["service"])
            for s in stats:
                family.add_metric([s.service], float(figure.read(s)))
            yield family
        histogram = HistogramMetricFamily(_WAIT, _WAIT_HELP, labels=["service"])
        for s in stats:
            buckets = [(_le(bound), float(n)) for bound, n in s.wait_buckets] or [("+Inf", 0.0)]
            histogram.add_metric([s.service], buckets, sum_value=s.wait_sum)
        yield histogram
        for account_figure in _ACCOUNT_FIGURES:
            gauge = GaugeMetricFamily(
                account_figure.name, account_figure.help, labels=["service", "account"]
            )
            for s in stats:
                for row in s.accounts:
                    value = account_figure.read(row)
                    if value is not None:
                        gauge.add_metric([s.service, row.account], float(value))
            yield gauge


# --- OpenTelemetry ---------------------------------------------------------------------


def instrument(gate: Gate, meter_provider: MeterProvider | None = None) -> None:
    """Register the gate's figures as OpenTelemetry observable instruments (extra ``otel``).

    The instruments carry the same names as :class:`PrometheusCollector`'s series, with
    attributes ``service`` (and ``account``). Counters are observable counters, the rest
    observable gauges. OpenTelemetry has no observable histogram, so the waits are three
    observable counters in Prometheus's own shape: ``capgate_wait_seconds_bucket`` (with
    attribute ``le``, cumulative), ``capgate_wait_seconds_sum`` and
    ``capgate_wait_seconds_count``. Call it once per gate.

    Args:
        gate: The gate to observe (a ``SyncCapacityGate`` too).
        meter_provider: Where to register; the global provider when ``None``.

    Raises:
        ImportError: ``opentelemetry-api`` is not installed.
        TypeError: ``gate`` is not a :class:`~capgate.CapacityGate` or a
            :class:`~capgate.SyncCapacityGate`.
    """
    try:
        from opentelemetry import metrics as otel
        from opentelemetry.metrics import Observation
    except ImportError as exc:
        raise ImportError(_OTEL_HINT) from exc
    (gate,) = _checked([gate])
    from ._version import __version__

    provider = meter_provider if meter_provider is not None else otel.get_meter_provider()
    meter = provider.get_meter("capgate", __version__)
    service = {"service": gate.service}

    def gate_figure(figure: _Figure) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(figure.read(_statistics(gate)), service)]

        return observe

    def account_figure(
        figure: _AccountFigure,
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for row in _statistics(gate).accounts:
                value = figure.read(row)
                if value is not None:
                    out.append(Observation(value, {**service, "account": row.account}))
            return out

        return observe

    def waits(part: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            s = _statistics(gate)
            buckets = s.wait_buckets or ((math.inf, 0),)
            if part == "bucket":
                return [Observation(n, {**service, "le": _le(b)}) for b, n in buckets]
            if part == "sum":
                return [Observation(s.wait_sum, service)]
            return [Observation(buckets[-1][1], service)]

        return observe

    create: dict[str, Any] = {
        "gauge": meter.create_observable_gauge,
        "counter": meter.create_observable_counter,
    }
    for figure in _FIGURES:
        create[figure.kind](
            figure.name, callbacks=[gate_figure(figure)], unit=figure.unit, description=figure.help
        )
    for af in _ACCOUNT_FIGURES:
        meter.create_observable_gauge(af.name, callbacks=[account_figure(af)], description=af.help)
    for part, unit in (("bucket", ""), ("sum", "s"), ("count", "")):
        meter.create_observable_counter(
            f"{_WAIT}_{part}", callbacks=[waits(part)], unit=unit, description=_WAIT_HELP
        )
