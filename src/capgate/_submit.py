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


__all__ = ["cooldown_for", "error_excerpt", "submit"]


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
    job_id_from = config.service.job_id_from
    cooldowns = config.cooldowns
    deadline = None if timeout is None else anyio.current_time() + timeout
    last: httpx.Response | None = None
    last_account: str | None = None
    attempt = 0
    while attempt < max_attempts:
        left = None if deadline is None else max(0.0, deadline - anyio.current_time())
        async with gate.slot(account, timeout=left, model=model) as slot:
            if slot.lost:
                # the fleet took this slot back while we were paused: creating now could
                # oversubscribe the account; wait for another slot (not an attempt)
                log.warning("capgate.slot_lost", service=service, account=slot.account)
                slot._give_back_unused()
                continue
            attempt += 1
            response = await create(slot.account)
            if not isinstance(response, httpx.Response):
                raise TypeError(
                    f"create must return an httpx.Response, not {type(response).__name__}"
                )
            status = response.status_code
            last, last_account = response, slot.account
            outcome = classify_create(status)
            if outcome == "created":
                slot.mark_submitted(job_id_from(await _json(response)))
                return response
            if outcome == "busy" and status == 429 and cooldowns:
                found = cooldown_for(cooldowns, await _json(response))
                if found is not None:
                    cooldown, seconds = found
                    # a per-model reason for a job of no known model: the whole account
                    scoped = model if cooldown.scope == "model" else None
                    slot.quarantine(seconds, reason=cooldown.reason, model=scoped)
                    continue
            if outcome == "busy":
                log.info(
                    "capgate.submit_busy",
                    service=service,
                    account=slot.account,
                    status_code=status,
                    attempt=attempt,
                )
                slot.mark_busy()
                continue
            if outcome == "broken":
                error = error_excerpt(await _json(response))
                slot.quarantine(reason=f"HTTP {status}" + (f": {error}" if error else ""))
                continue
            if outcome == "refused":
                slot._give_back_unused()
                raise AuthenticationError(
                    f"{service}: the create request was refused (HTTP 401)", status_code=401
                )
            return response
    assert last is not None  # noqa: S101 - max_attempts >= 1
    raise SubmissionFailed(
        f"{service}: no account took the job in {max_attempts} attempts "
        f"(last: HTTP {last.status_code} from {last_account})",
        response=last,
        attempts=max_attempts,
        account=last_account,
    )
