"""``capgate.metrics``: Prometheus and OpenTelemetry read the gate's statistics right."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from capgate import SlotTimeout, SyncCapacityGate
from capgate.metrics import PrometheusCollector, instrument
from capgate.testing import FakeScheduler, Fault, serve

pytestmark = pytest.mark.anyio


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The text exposition, parsed back: (sample name, labels) -> value."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _otel(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Everything the in-memory reader holds: (instrument name, attributes) -> value."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (metric.name, frozenset((k, str(v)) for k, v in (point.attributes or {}).items())): (
            point.value
        )
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points  # type: ignore[union-attr]
    }


def _svc(service: str = "ltxstudio", **labels: str) -> frozenset[tuple[str, str]]:
    return frozenset({"service": service, **labels}.items())


async def _run(gate, fake) -> None:
    """Three grants (b@x.io fills up), then one waiter that times out; a@x.io is left free."""
    async with gate.slot(account="b@x.io") as slot:
        slot.mark_submitted("job-1")
    for _ in range(2):
        async with gate.slot(account="a@x.io"):
            pass
    with pytest.raises(SlotTimeout):
        async with gate.slot(account="b@x.io", timeout=0.01):
            pass  # pragma: no cover


async def test_prometheus_exposition_after_a_run(make_gate):
    """After grants, a timeout and a failed poll, the exposition shows the gate's figures."""
    gate, fake = make_gate({"a@x.io": 3, "b@x.io": 1}, job_duration=600)
    fake.inject(Fault(status=503, body={"error": "down"}))
    await _run(gate, fake)
    gate.quarantine("a@x.io", 60, reason="test")
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(gate))
    samples = _samples(registry)
    stats = gate.statistics()

    assert samples["capgate_grants_total", _svc()] == 3
    assert samples["capgate_timeouts_total", _svc()] == 1
    assert samples["capgate_polls_total", _svc()] == stats.polls >= 1
    assert samples["capgate_poll_failures_total", _svc()] == 1
    assert samples["capgate_waiting", _svc()] == 0
    assert samples["capgate_held", _svc()] == 0
    waited = stats.wait_buckets[-1][1]  # grants counted in the histogram
    assert waited >= 1
    assert samples["capgate_wait_seconds_count", _svc()] == waited
    assert samples["capgate_wait_seconds_sum", _svc()] == pytest.approx(stats.wait_sum)
    assert samples["capgate_wait_seconds_bucket", _svc(le="+Inf")] == waited
    for bound, n in stats.wait_buckets:
        le = "+Inf" if bound == float("inf") else repr(bound)
        assert samples["capgate_wait_seconds_bucket", _svc(le=le)] == n
    assert samples["capgate_account_max_jobs", _svc(account="b@x.io")] == 1
    assert samples["capgate_account_executing", _svc(account="b@x.io")] == (
        next(row.executing for row in stats.accounts if row.account == "b@x.io")
    )
    assert samples["capgate_account_free_slots", _svc(account="b@x.io")] == 0
    assert samples["capgate_account_quarantined", _svc(account="a@x.io")] == 1
    assert samples["capgate_account_quarantined", _svc(account="b@x.io")] == 0


async def test_prometheus_free_slots_follow_the_gate(make_gate):
    """capgate_account_free_slots is what the gate would grant now, per account."""
    gate, _ = make_gate({"a@x.io": 3, "b@x.io": 1}, job_duration=600)
    async with gate.slot(account="a@x.io"):
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(gate))
        samples = _samples(registry)
        assert samples["capgate_held", _svc()] == 1
        assert samples["capgate_account_free_slots", _svc(account="a@x.io")] == 2
        assert samples["capgate_account_free_slots", _svc(account="b@x.io")] == 1
        assert samples["capgate_free", _svc()] == 3


async def test_two_services_share_one_registry(make_gate):
    """Two gates of two services in one collector: one family each, a series per service."""
    kling, _ = make_gate({"k@x.io": 2}, service="kling")
    minimax, _ = make_gate({"m@x.io": 1}, service="minimax")
    async with kling.slot():
        pass
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(kling, minimax))
    samples = _samples(registry)
    assert samples["capgate_grants_total", _svc("kling")] == 1
    assert samples["capgate_grants_total", _svc("minimax")] == 0
    text = generate_latest(registry).decode()
    assert text.count("# TYPE capgate_grants_total counter") == 1


async def test_a_second_collector_in_one_registry_is_refused(make_gate):
    """Registering capgate's figures twice in one registry fails loudly, not with clashing
    series at scrape time."""
    kling, _ = make_gate({"k@x.io": 2}, service="kling")
    minimax, _ = make_gate({"m@x.io": 1}, service="minimax")
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(kling))
    with pytest.raises(ValueError, match=r"^Duplicated timeseries"):
        registry.register(PrometheusCollector(minimax))


async def test_two_gates_of_one_service_are_refused(make_gate):
    """Two gates of the same service would clash on their labels: ValueError."""
    one, _ = make_gate({"a@x.io": 1})
    two, _ = make_gate({"a@x.io": 1})
    with pytest.raises(ValueError, match=r"^two gates for service 'ltxstudio': "):
        PrometheusCollector(one, two)


async def test_otel_reader_sees_the_figures(make_gate):
    """instrument() registers observable instruments the SDK's in-memory reader reads."""
    gate, fake = make_gate({"a@x.io": 3, "b@x.io": 1}, job_duration=600)
    await _run(gate, fake)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument(gate, meter_provider=provider)
    points = _otel(reader)
    stats = gate.statistics()
    assert points["capgate_grants_total", _svc()] == 3
    assert points["capgate_timeouts_total", _svc()] == 1
    assert points["capgate_polls_total", _svc()] == stats.polls
    assert points["capgate_poll_failures_total", _svc()] == 0
    assert points["capgate_waiting", _svc()] == 0
    assert points["capgate_held", _svc()] == 0
    waited = stats.wait_buckets[-1][1]  # grants counted in the histogram
    assert waited >= 1
    assert points["capgate_wait_seconds_count", _svc()] == waited
    assert points["capgate_wait_seconds_sum", _svc()] == pytest.approx(stats.wait_sum)
    assert points["capgate_wait_seconds_bucket", _svc(le="+Inf")] == waited
    assert points["capgate_account_max_jobs", _svc(account="a@x.io")] == 3
    assert points["capgate_account_free_slots", _svc(account="b@x.io")] == 0
    assert points["capgate_account_quarantined", _svc(account="a@x.io")] == 0
    provider.shutdown()


async def test_otel_counters_are_monotonic_sums(make_gate):
    """grants_total is an OpenTelemetry monotonic sum, waiting a gauge."""
    gate, _ = make_gate({"a@x.io": 1})
    async with gate.slot():
        pass
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrument(gate, meter_provider=provider)
    data = reader.get_metrics_data()
    assert data is not None
    kinds = {
        metric.name: type(metric.data).__name__
        for scope in data.resource_metrics[0].scope_metrics
        for metric in scope.metrics
    }
    assert kinds["capgate_grants_total"] == "Sum"
    assert kinds["capgate_waiting"] == "Gauge"
    assert kinds["capgate_account_free_slots"] == "Gauge"
    provider.shutdown()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter, our own code
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_importing_capgate_imports_neither_extra():
    """``import capgate`` (and ``capgate.metrics``) imports neither prometheus_client nor
    opentelemetry."""
    done = _python(
        """
        import sys, capgate, capgate.metrics
        loaded = sorted(m for m in sys.modules if m.startswith(("prometheus", "opentelemetry")))
        print(loaded)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("blocked", "call", "hint"),
    [
        ("prometheus_client", "PrometheusCollector()", "pip install 'capgate[prometheus]'"),
        ("opentelemetry", "instrument(None)", "pip install 'capgate[otel]'"),
    ],
)
def test_missing_extra_names_the_install(blocked, call, hint):
    """Without its extra, each entry point raises an ImportError naming the pip install."""
    done = _python(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if it were not installed
        from capgate.metrics import PrometheusCollector, instrument
        try:
            {call}
        except ImportError as exc:
            print(exc)
        """
    )
    assert done.returncode == 0, done.stderr
    assert hint in done.stdout


async def test_a_scrape_from_another_thread_sees_free_slots(make_gate):
    """A scrape from a server thread (start_http_server's) sees the same free slots."""
    gate, _ = make_gate({"a@x.io": 3})
    async with gate.slot():
        registry = CollectorRegistry()
        registry.register(PrometheusCollector(gate))
        text = await anyio.to_thread.run_sync(generate_latest, registry)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }
    assert samples["capgate_account_free_slots", _svc(account="a@x.io")] == 2


@pytest.mark.trio_only
async def test_learnt_durations_are_exposed_per_account(make_gate):
    """Once jobs were seen to end, each account's median duration is a series."""
    import httpx

    gate, fake = make_gate({"a@x.io": 1}, job_duration=30.0, poll_interval=5.0)
    headers = {"Authorization": f"Bearer {fake.token}"}
    async with httpx.AsyncClient(transport=fake.transport()) as client:

        async def create(account: str) -> httpx.Response:
            return await client.post(
                fake.create_url, json={fake.spec.account_key: account}, headers=headers
            )

        for _ in range(7):  # one at a time: six are seen to end
            await gate.submit(create)
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(gate))
    median = _samples(registry)["capgate_account_median_duration_seconds", _svc(account="a@x.io")]
    assert median == pytest.approx(30, abs=3)


def test_the_sync_twin_is_exposed_like_its_gate():
    """Flask and Celery users hold a SyncCapacityGate: both exporters take it (before, a
    TypeError), reading its figures on its loop thread."""
    fake = FakeScheduler({"a@x.io": 2}, service="kling")
    with serve(fake) as url:
        gate = SyncCapacityGate(fake.token, service="kling", url=url, poll_interval=0.1)
        try:
            with gate.slot():
                pass
            registry = CollectorRegistry()
            registry.register(PrometheusCollector(gate))
            reader = InMemoryMetricReader()
            provider = MeterProvider(metric_readers=[reader])
            instrument(gate, meter_provider=provider)
            assert _samples(registry)["capgate_grants_total", _svc("kling")] == 1
            assert _otel(reader)["capgate_grants_total", _svc("kling")] == 1
            provider.shutdown()
        finally:
            gate.close()


def test_what_is_not_a_gate_is_refused():
    with pytest.raises(TypeError, match="expected CapacityGate or SyncCapacityGate objects"):
        PrometheusCollector(object())  # type: ignore[arg-type]
