"""``gate.submit()``: the create loop, and what each create answer means for its slot.

The status policy itself (which answers are busy, broken, refused) is
:func:`capgate._policy.classify_create`, shared with the sync twin.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import httpx

from ._config import number
from ._errors import AuthenticationError, SubmissionFailed
from ._log import log
from ._policy import classify_create

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ._config import GateConfig
    from ._services import Cooldown


class _Held(Protocol):
    """What the create loop uses of a slot (``capgate.Slot``; named here, not imported, so
    that the facade and this module do not import each other)."""

    @property
    def account(self) -> str: ...
    @property
    def lost(self) -> bool: ...
    def mark_submitted(self, job_id: str | int | None = None) -> None: ...
    def mark_busy(self) -> None: ...
    def quarantine(
        self, seconds: float | None = None, reason: str = "", *, model: str | None = None
    ) -> None: ...
    def _give_back_unused(self) -> None: ...


class _Gate(Protocol):
    """What the create loop uses of the gate (``capgate.CapacityGate``)."""

    @property
    def service(self) -> str: ...
    def slot(
        self,
        account: str | Collection[str] | None = None,
        *,
        timeout: float | None = None,
        priority: int = 0,
        model: str | None = None,
    ) -> AbstractAsyncContextManager[_Held]: ...


__all__ = ["answer", "cooldown_for", "error_excerpt", "needs_body", "skip_lost", "submit"]


async def _json(response: httpx.Response) -> Any:
    """A response's JSON body, or ``None`` when it has none (never raises)."""
    try:
        await response.aread()
        return response.json()
    except Exception:  # noqa: BLE001 - any unreadable body simply has no job id
        return None


def error_excerpt(body: Any, limit: int = 200) -> str:
    """The ``error`` text of a JSON error body, on one line and at most ``limit`` long."""
    error = body.get("error") if isinstance(body, dict) else None
    text = " ".join(str(error).split()) if error is not None else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _until_utc_midnight() -> float:
    import time  # wall-clock only to place an absolute instant (a daily quota's reset)

    return 86400.0 - time.time() % 86400.0


def cooldown_for(cooldowns: tuple[Cooldown, ...], body: Any) -> tuple[Cooldown, float] | None:
    """The cooldown a 429's body names (its reason anywhere in the body), with its seconds.

    The reasons' field in Google Flow's body is not documented, so the whole body is read.
    """
    if not cooldowns or body is None:
        return None
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    for cooldown in cooldowns:
        if cooldown.reason in text:
            seconds = cooldown.seconds
            if isinstance(seconds, str):  # UTC_MIDNIGHT, the only text config allows
                return cooldown, _until_utc_midnight()
            return cooldown, float(seconds)
    return None


def skip_lost(slot: _Held, service: str) -> bool:
    """Give back a slot the fleet took back while we were paused; ``True`` if it was lost.

    Creating on it could oversubscribe the account: the caller waits for another slot, and
    that wait is not an attempt.
    """
    if not slot.lost:
        return False
    log.warning("capgate.slot_lost", service=service, account=slot.account)
    slot._give_back_unused()
    return True


def needs_body(status: int, config: GateConfig) -> bool:
    """Whether :func:`answer` reads the body of a create answer with this status."""
    outcome = classify_create(status)
    if outcome == "busy":
        return status == 429 and bool(config.cooldowns)
    return outcome in ("created", "broken")


def answer(
    slot: _Held,
    status: int,
    body: Any,
    *,
    config: GateConfig,
    model: str | None,
    attempt: int,
) -> bool:
    """Apply one create answer to its slot: the rules of ``submit()``, async and sync.

    Args:
        slot: The slot the create request used.
        status: The answer's HTTP status.
        body: Its JSON body when :func:`needs_body` says so, else anything (unread).
        config: The gate's configuration (service, cooldowns).
        model: The job's model, for a per-model cooldown.
        attempt: The create call's number, for the log.

    Returns:
        ``True`` to try again on another slot, ``False`` when the answer is the result.

    Raises:
        AuthenticationError: The create request was refused (401); the slot is given back.
    """
    service = config.service.name
    outcome = classify_create(status)
    if outcome == "created":
        slot.mark_submitted(config.service.job_id_from(body))
        return False
    if outcome == "busy" and status == 429 and config.cooldowns:
        found = cooldown_for(config.cooldowns, body)
        if found is not None:
            cooldown, seconds = found
            # a per-model reason for a job of no known model: the whole account
            scoped = model if cooldown.scope == "model" else None
            slot.quarantine(seconds, reason=cooldown.reason, model=scoped)
            return True
    if outcome == "busy":
        log.info(
            "capgate.submit_busy",
            service=service,
            account=slot.account,
            status_code=status,
            attempt=attempt,
        )
        slot.mark_busy()
        return True
    if outcome == "broken":
        error = error_excerpt(body)
        slot.quarantine(reason=f"HTTP {status}" + (f": {error}" if error else ""))
        return True
    if outcome == "refused":
        slot._give_back_unused()
        raise AuthenticationError(
            f"{service}: the create request was refused (HTTP 401)", status_code=401
        )
    return False


async def submit(
    gate: _Gate,
    config: GateConfig,
    create: Callable[[str], Awaitable[httpx.Response]],
    *,
    account: str | Collection[str] | None,
    timeout: float | None,
    max_attempts: int,
    model: str | None = None,
) -> httpx.Response:
    """The body of :meth:`CapacityGate.submit` (documented there)."""
    if not callable(create):
        raise TypeError(f"create must be an async callable, not {type(create).__name__}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise TypeError(f"max_attempts must be an int, not {type(max_attempts).__name__}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if timeout is not None:
        timeout = number("timeout", timeout, minimum=0, inclusive=True)
    service = gate.service
    deadline = None if timeout is None else anyio.current_time() + timeout
    last: httpx.Response | None = None
    last_account: str | None = None
    attempt = 0
    while attempt < max_attempts:
        left = None if deadline is None else max(0.0, deadline - anyio.current_time())
        async with gate.slot(account, timeout=left, model=model) as slot:
            if skip_lost(slot, service):
                continue
            attempt += 1
            response = await create(slot.account)
            if not isinstance(response, httpx.Response):
                raise TypeError(
                    f"create must return an httpx.Response, not {type(response).__name__}"
                )
            status = response.status_code
            last, last_account = response, slot.account
            body = await _json(response) if needs_body(status, config) else None
            if answer(slot, status, body, config=config, model=model, attempt=attempt):
                continue
            return response
    assert last is not None  # noqa: S101 - max_attempts >= 1
    raise SubmissionFailed(
        f"{service}: no account took the job in {max_attempts} attempts "
        f"(last: HTTP {last.status_code} from {last_account})",
        response=last,
        attempts=max_attempts,
        account=last_account,
    )
