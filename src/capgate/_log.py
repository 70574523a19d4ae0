"""capgate's logger: structlog's events, delivered through the standard library.

A library must not decide where its log lines go. Every event capgate logs is a stable,
namespaced name (``capgate.poll``, ``capgate.grant``) with key-value fields, as structlog
writes them, but it travels as a :class:`logging.LogRecord` of the ``"capgate"`` logger:

- nothing configured: silent, except warnings and errors through :mod:`logging`'s last-resort
  handler, on stderr. Never anything on stdout.
- ``logging.basicConfig(level=logging.INFO)``: the info events on stderr, as
  ``capgate.poll service=kling accounts=3 free=2 …``.
- ``structlog.stdlib.ProcessorFormatter`` on a handler: the record carries the event dict as
  structlog's own stdlib integration does, so ``JSONRenderer`` or ``ConsoleRenderer`` see
  every field (README, "Logging").
- ``structlog.testing.capture_logs()``: sees every event, whatever the levels.

``structlog.configure()`` is never called here: the processor chain is the library's own.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import structlog
from structlog.testing import LogCapture

__all__ = ["Logger", "log"]

_stdlib = logging.getLogger("capgate")


class _Event(dict[str, Any]):
    """An event dict that reads as ``event key=value …`` where a plain formatter shows it."""

    def __str__(self) -> str:
        fields = " ".join(f"{key}={value!r}" for key, value in self.items() if key != "event")
        return f"{self['event']} {fields}" if fields else str(self["event"])


#: structlog's global configuration, which ``structlog.get_config()`` copies into a new
#: dict on every call: the grant and settle events check for ``capture_logs()`` twice per
#: grant, so they read the chain here (``None`` if a structlog version moved it)
_config: Any = getattr(getattr(structlog, "_config", None), "_CONFIG", None)
if not hasattr(_config, "default_processors"):  # pragma: no cover - other structlog versions
    _config = None


def _capture() -> list[Any] | None:
    """The processors of a ``capture_logs()`` in force (it swaps structlog's global ones for
    its own, ending in a ``LogCapture``), else ``None``."""
    processors: list[Any] = (
        structlog.get_config()["processors"] if _config is None else _config.default_processors
    )
    if processors and isinstance(processors[-1], LogCapture):
        return processors
    return None


class Logger:
    """The few methods capgate logs with (internal); fields are keyword arguments."""

    __slots__ = ()

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        capture = _capture()
        if capture is not None:
            entry: Any = dict(fields, event=event)
            if method == "exception":
                entry["exc_info"] = True
            with contextlib.suppress(structlog.DropEvent):  # how LogCapture keeps the entry
                for processor in capture:
                    entry = processor(None, method, entry)
            return
        if not _stdlib.isEnabledFor(level):
            return
        record = _Event(event=event, **fields)
        # the attributes structlog's ProcessorFormatter reads to treat this as its own event
        _stdlib.log(
            level,
            record,
            exc_info=method == "exception",
            extra={"_logger": _stdlib, "_name": method},
            stacklevel=3,
        )

    def debug_enabled(self) -> bool:
        """Whether a debug event would go anywhere: a ``capture_logs()`` in force (it sees
        every event) or a ``capgate`` logger enabled for DEBUG. The per-grant and per-settle
        events check this first, so a program that drops them does not pay for building
        their fields on every grant."""
        return _capture() is not None or _stdlib.isEnabledFor(logging.DEBUG)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._emit(logging.ERROR, "exception", event, fields)


log = Logger()
