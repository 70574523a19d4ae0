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
from ._log import log
from ._policy import MAX_POLL_INTERVAL
from ._services import (
    UTC_MIDNIGHT,
    Cooldown,
    Service,
    active_services,
    get_service,
    service_for_url,
)
from ._sources import ReadContext, SchedulerAvailable
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
    base_url: httpx.URL | None = None
    reading: ReadContext | None = None
    cooldowns: tuple[Cooldown, ...] = ()

    @property
    def api_root(self) -> httpx.URL:
        """The API root the source's endpoints hang off."""
        return self.base_url if self.base_url is not None else self.url

    @property
    def allow(self) -> frozenset[str] | None:
        """The allow-list, or ``None`` for every account."""
        return None if self.accounts is None else frozenset(self.accounts)


def number(name: str, value: object, *, minimum: float, inclusive: bool = False) -> float:
    """A finite real number above ``minimum`` (or at it, when ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond any float: not finite, and too long to print
        raise _not_finite(name, minimum, inclusive, "an int too large for a float") from None
    if not math.isfinite(result) or result < minimum or (result == minimum and not inclusive):
        raise _not_finite(name, minimum, inclusive, repr(value))
    return result


def _not_finite(name: str, minimum: float, inclusive: bool, shown: str) -> ValueError:
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    return ValueError(f"{name} must be a finite number {bound}, got {shown}")


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
    if parsed.port is not None and not 0 < parsed.port <= 65535:  # httpx accepts 99999
        raise ValueError(f"url's port must be from 1 to 65535, not {parsed.port}")
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


#: services whose retirement was already logged by this process
_RETIRED_LOGGED: set[str] = set()


def _service(service: object, base_url: object, url: object) -> Service:
    """The service named, or the one ``base_url=``/``url=`` names; ``TypeError`` if none."""
    if service is not None:
        return get_service(service)  # type: ignore[arg-type]  # it checks the type itself
    for value in (url, base_url):
        if isinstance(value, (str, httpx.URL)):
            try:
                spec = service_for_url(httpx.URL(value).path)
            except httpx.InvalidURL:
                spec = None
            if spec is not None:
                return spec
    raise TypeError(
        "service= is required (there is no default any more): one of "
        + ", ".join(active_services())
        + "; or a base_url= or url= naming a known service path"
    )


def _urls(spec: Service, base_url: object, url: object) -> tuple[httpx.URL, httpx.URL]:
    """The capacity URL and the API root."""
    path = spec.source.path
    root = check_url(base_url) if base_url is not None else None  # type: ignore[arg-type]
    if root is not None:
        root = root.copy_with(path=root.path.rstrip("/") or "/")
    if url is not None:
        capacity = check_url(url)  # type: ignore[arg-type]
        suffix = "/" + path if path else ""
        if root is None:
            if not suffix:
                root = capacity  # nothing is read on each poll: url= is the root itself
            elif capacity.path.rstrip("/").endswith(suffix):
                root = capacity.copy_with(path=capacity.path.rstrip("/")[: -len(suffix)] or "/")
            elif isinstance(spec.source, SchedulerAvailable):
                root = capacity  # a proxy's own path: the one endpoint is url= itself
            else:
                raise ValueError(
                    f"url= must end in /{path or '<API root>'} for {spec.name}; "
                    "pass base_url= (the API root) instead"
                )
        return capacity, root
    if root is None:
        root = httpx.URL(spec.api_root)
    capacity = root.copy_with(path=root.path.rstrip("/") + ("/" + path if path else ""))
    return capacity, root


def _cooldowns(spec: Service, cooldowns: object) -> tuple[Cooldown, ...]:
    if cooldowns is None:
        return spec.cooldowns
    if not isinstance(cooldowns, Mapping):
        raise TypeError(f"cooldowns must be a mapping, not {type(cooldowns).__name__}")
    known = {c.reason: c for c in spec.cooldowns}
    out = dict(known)
    for reason, seconds in cooldowns.items():
        if reason not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ValueError(
                f"cooldowns names {reason!r}, not a 429 reason of {spec.name} (known: {names})"
            )
        if seconds != UTC_MIDNIGHT:
            seconds = number(f"cooldowns[{reason!r}]", seconds, minimum=0, inclusive=True)
        out[reason] = Cooldown(reason, known[reason].scope, seconds, "cooldowns=")
    return tuple(out.values())


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
    base_url: object = None,
    cooldowns: object = None,
) -> GateConfig:
    """Check every option of a gate; raise ``TypeError``/``ValueError`` with an exact message."""
    secret = _token(token)
    spec = _service(service, base_url, url)
    checked_url, root = _urls(spec, base_url, url)
    interval = number("poll_interval", poll_interval, minimum=0)
    if interval > MAX_POLL_INTERVAL:
        raise ValueError(
            f"poll_interval must be at most {MAX_POLL_INTERVAL:g} s, got {poll_interval!r}"
        )
    names = None if accounts is None else account_set(accounts, "accounts")
    caps = _max_jobs(max_jobs, names)
    if spec.needs_max_jobs and caps is None:
        raise ValueError(
            f"{spec.name} publishes no per-account cap: max_jobs= is required "
            "(an int for every account, or a mapping per account)"
        )
    if spec.needs_accounts and names is None:
        if not isinstance(caps, Mapping):
            raise ValueError(
                f"{spec.name} has no account list the gate can read: accounts= is required "
                "(or a max_jobs= mapping per account)"
            )
        names = tuple(caps)
    if not callable(strategy) and strategy not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)} or a callable"
        )
    jitter_f = number("jitter", jitter, minimum=0, inclusive=True)
    if jitter_f > 1:
        raise ValueError(f"jitter must be between 0 and 1, got {jitter!r}")
    chosen_cooldowns = _cooldowns(spec, cooldowns)
    if spec.status == "retired" and spec.name not in _RETIRED_LOGGED:
        _RETIRED_LOGGED.add(spec.name)
        log.warning("capgate.service_retired", service=spec.name, retired_on=spec.retired_on)
    return GateConfig(
        token=secret,
        service=spec,
        url=checked_url,
        poll_interval=interval,
        accounts=names,
        max_jobs=caps,
        strategy=strategy,  # type: ignore[arg-type]  # checked above
        quarantine_for=number("quarantine_for", quarantine_for, minimum=0),
        poll_timeout=number("poll_timeout", poll_timeout, minimum=0),
        max_backoff=(
            max(60.0, interval)
            if max_backoff is None
            else number("max_backoff", max_backoff, minimum=0)
        ),
        jitter=jitter_f,
        base_url=root,
        reading=ReadContext(spec, caps, names),
        cooldowns=chosen_cooldowns,
    )
