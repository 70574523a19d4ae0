"""A gate's checked configuration, and the token held as a :class:`Secret`.

Every argument of :class:`capgate.CapacityGate` is checked here, once, with an exact message;
the engine and the stores receive a :class:`GateConfig` and never check again.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._errors import CapacityGateError
from ._policy import MAX_POLL_INTERVAL
from ._services import Service, get_service
from ._strategy import STRATEGIES, Strategy

__all__ = [
    "GateConfig",
    "Secret",
    "account_name",
    "account_set",
    "check_config",
    "check_url",
    "number",
]


class Secret:
    """Holds the token so that no repr, ``vars()`` dump or traceback's locals show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    def __reduce__(self) -> Any:
        raise TypeError("the API token cannot be pickled")


@dataclass(frozen=True)
class GateConfig:
    """One gate's options, checked (internal)."""

    token: Secret
    service: Service
    url: httpx.URL
    poll_interval: float
    accounts: tuple[str, ...] | None
    max_jobs: int | Mapping[str, int] | None
    strategy: Strategy
    quarantine_for: float
    poll_timeout: float
    max_backoff: float
    jitter: float

    @property
    def allow(self) -> frozenset[str] | None:
        """The allow-list, or ``None`` for every account."""
        return None if self.accounts is None else frozenset(self.accounts)


def number(name: str, value: object, *, minimum: float, inclusive: bool = False) -> float:
    """A finite real number above ``minimum`` (or at it, when ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result < minimum or (result == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return result


def account_name(value: object, what: str) -> str:
    """A non-empty account name."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    return value


def account_set(value: object, what: str) -> tuple[str, ...]:
    """A non-empty collection of account names, in order, without repeats."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Collection):
        raise TypeError(f"{what} must be a collection of account names, not {type(value).__name__}")
    names = tuple(dict.fromkeys(account_name(v, f"each of {what}") for v in value))
    if not names:
        raise ValueError(f"{what} must not be empty")
    return names


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> httpx.URL:
    """Validate a scheduler URL: https anywhere, plain http only on loopback.

    Raises:
        TypeError: ``url`` is not a string.
        ValueError: The URL is not absolute http(s), or is plain http to a non-loopback host.
    """
    if not isinstance(url, (str, httpx.URL)):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"url is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("url must be an absolute http:// or https:// URL")
    if parsed.scheme == "http" and not _is_loopback(parsed.host):
        raise ValueError(
            f"url uses plain http:// to {parsed.host}; the token would travel in clear text. "
            "Use https://, or http:// only on a loopback host"
        )
    if parsed.userinfo:
        raise ValueError("url must not carry credentials; pass the token instead")
    return parsed


def _token(token: object) -> Secret:
    if token is None:
        token = os.environ.get("USEAPI_TOKEN")
        if not token or not token.strip():
            raise CapacityGateError(
                "no API token: pass token= or set the USEAPI_TOKEN environment variable"
            )
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, not {type(token).__name__}")
    token = token.strip()
    if not token:
        raise CapacityGateError("the API token is empty")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("the API token contains whitespace or control characters")
    if not token.isascii():  # it could never be sent in a header: every poll would fail
        raise ValueError("the API token contains non-ASCII characters")
    return Secret(token)


def _max_jobs(max_jobs: object, accounts: tuple[str, ...] | None) -> int | Mapping[str, int] | None:
    if max_jobs is None:
        return None
    if isinstance(max_jobs, Mapping):
        caps: dict[str, int] = {}
        for name, cap in max_jobs.items():
            account_name(name, "each account in max_jobs")
            if isinstance(cap, bool) or not isinstance(cap, int):
                raise TypeError(f"max_jobs[{name!r}] must be an int, not {type(cap).__name__}")
            if cap < 0:
                raise ValueError(f"max_jobs[{name!r}] must be >= 0, got {cap}")
            if accounts is not None and name not in accounts:
                raise ValueError(
                    f"max_jobs names {name!r}, which is not among accounts= ({', '.join(accounts)})"
                )
            caps[name] = cap
        return caps
    if isinstance(max_jobs, bool) or not isinstance(max_jobs, int):
        raise TypeError(
            f"max_jobs must be an int or a mapping of account to int, not {type(max_jobs).__name__}"
        )
    if max_jobs < 1:
        raise ValueError(f"max_jobs must be >= 1, got {max_jobs}")
    return max_jobs


def check_config(
    token: object,
    *,
    service: object,
    url: object,
    poll_interval: object,
    accounts: object,
    max_jobs: object,
    strategy: object,
    quarantine_for: object,
    poll_timeout: object,
    max_backoff: object,
    jitter: object,
) -> GateConfig:
    """Check every option of a gate; raise ``TypeError``/``ValueError`` with an exact message."""
    secret = _token(token)
    spec = get_service(service)  # type: ignore[arg-type]  # it checks the type itself
    checked_url = check_url(spec.url if url is None else url)  # type: ignore[arg-type]
    interval = number("poll_interval", poll_interval, minimum=0)
    if interval > MAX_POLL_INTERVAL:
        raise ValueError(
            f"poll_interval must be at most {MAX_POLL_INTERVAL:g} s, got {poll_interval!r}"
        )
    names = None if accounts is None else account_set(accounts, "accounts")
    if not callable(strategy) and strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)} or a callable"
        )
    jitter_f = number("jitter", jitter, minimum=0, inclusive=True)
    if jitter_f > 1:
        raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")
    return GateConfig(
        token=secret,
        service=spec,
        url=checked_url,
        poll_interval=interval,
        accounts=names,
        max_jobs=_max_jobs(max_jobs, names),
        strategy=strategy,  # type: ignore[arg-type]  # checked above
        quarantine_for=number("quarantine_for", quarantine_for, minimum=0),
        poll_timeout=number("poll_timeout", poll_timeout, minimum=0),
        max_backoff=(
            max(60.0, interval)
            if max_backoff is None
            else number("max_backoff", max_backoff, minimum=0)
        ),
        jitter=jitter_f,
    )
