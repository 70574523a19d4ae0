"""The public surface: ``__all__`` and the names' ``__module__``."""

from __future__ import annotations

import inspect

import pytest

import capgate
import capgate.testing


def test_all_is_sorted():
    """``__all__`` is sorted the way ruff's RUF022 sorts it (constants, classes, the rest)."""

    def kind(name: str) -> int:
        if name.isupper():
            return 0
        return 1 if name[0].isupper() else 2

    assert capgate.__all__ == sorted(capgate.__all__, key=lambda n: (kind(n), n))


def test_all_matches_public_names():
    """``__all__`` lists exactly the names the package exports without an underscore."""
    public = {
        name
        for name, value in vars(capgate).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    public.discard("annotations")  # from __future__ import annotations
    assert set(capgate.__all__) - {"__version__"} == public


@pytest.mark.parametrize(
    "name",
    [
        "CapacityGate",
        "Slot",
        "Snapshot",
        "AccountCapacity",
        "ExecutingJob",
        "GateStatistics",
        "CapacityGateError",
        "AuthenticationError",
        "SlotTimeout",
        "PollError",
    ],
)
def test_issue_names_are_exported(name):
    """Every name issue 2 fixes is importable from ``capgate``."""
    assert name in capgate.__all__
    assert hasattr(capgate, name)


@pytest.mark.parametrize(
    "name", [n for n in capgate.__all__ if inspect.isclass(getattr(capgate, n))]
)
def test_classes_live_in_capgate(name):
    """Exported classes say ``capgate`` in ``__module__``, so reprs read ``capgate.X``."""
    assert getattr(capgate, name).__module__ == "capgate"


def test_version_is_a_string():
    """``__version__`` is a non-empty version string."""
    assert isinstance(capgate.__version__, str)
    assert capgate.__version__[0].isdigit()


def test_error_tree():
    """Every capgate error derives from the root, and SlotTimeout is a TimeoutError."""
    for name in ("AuthenticationError", "PollError", "SlotTimeout"):
        assert issubclass(getattr(capgate, name), capgate.CapacityGateError)
    assert issubclass(capgate.SlotTimeout, TimeoutError)


def test_testing_all_matches_public_names():
    """``capgate.testing.__all__`` lists its public names."""
    public = {
        name
        for name, value in vars(capgate.testing).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and getattr(value, "__module__", None) == "capgate.testing"
    }
    assert set(capgate.testing.__all__) == public
