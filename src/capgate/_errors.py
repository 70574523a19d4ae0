"""The exception tree.

Every error capgate raises on purpose derives from one root::

    CapacityGateError
     +-- AuthenticationError      the token was refused (401/403); retrying will not help
     +-- PollError                one poll of scheduler/available failed (network, 5xx, 429,
     |                            a body that is not the documented shape, over 1 MiB)
     +-- SlotTimeout              (also TimeoutError) no slot within the caller's timeout
     +-- AccountQuarantined       every account the caller may use is out of rotation
     +-- SubmissionFailed         gate.submit() ran out of attempts; carries the last response
     +-- GateClosed               the gate was closed while (or before) waiting

Misuse of the API (bad arguments, nesting ``async with gate`` in one task) raises the
builtin ``ValueError``, ``TypeError`` or ``RuntimeError`` instead, with an exact message.

No exception ever carries the API token: messages are built from the service name, the
account, the status code and a short, truncated excerpt of the server's error text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


class CapacityGateError(Exception):
    """The root of every error capgate raises on purpose."""


class AuthenticationError(CapacityGateError):
    """The API token was refused (HTTP 401 or 403).

    Raised in every task waiting on the gate at once; retrying with the same token is
    pointless, so the gate does not loop on it.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PollError(CapacityGateError):
    """One poll of ``scheduler/available`` failed.

    Waiters never see this: the gate logs it as ``capgate.poll_failed`` and retries with
    backoff. ``gate.refresh()`` raises it, since its caller asked for that one poll.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class SlotTimeout(CapacityGateError, TimeoutError):
    """No slot was granted within the caller's ``timeout``."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout


class AccountQuarantined(CapacityGateError):
    """Every account this caller may use is out of rotation (quarantined).

    ``reasons`` maps each such account to the reason it was quarantined for.
    """

    def __init__(self, message: str, *, reasons: Mapping[str, str]) -> None:
        super().__init__(message)
        self.reasons = dict(reasons)

    @classmethod
    def every(cls, service: str, reasons: Mapping[str, str]) -> AccountQuarantined:
        """The error for a caller whose every account (``reasons``' keys) is quarantined."""
        text = ", ".join(f"{a} ({r})" if r else a for a, r in sorted(reasons.items()))
        return cls(
            f"{service}: every account this caller may use is quarantined: {text}",
            reasons=reasons,
        )

    @property
    def accounts(self) -> tuple[str, ...]:
        """The quarantined accounts, sorted."""
        return tuple(sorted(self.reasons))


class SubmissionFailed(CapacityGateError):
    """``gate.submit()`` used up its attempts; ``response`` is the last answer."""

    def __init__(
        self, message: str, *, response: httpx.Response, attempts: int, account: str | None
    ) -> None:
        super().__init__(message)
        self.response = response
        self.attempts = attempts
        self.account = account

    @property
    def status_code(self) -> int:
        """The status code of the last response."""
        return self.response.status_code


class GateClosed(CapacityGateError):
    """The gate was closed with ``aclose()``."""


for _cls in (
    CapacityGateError,
    AuthenticationError,
    PollError,
    SlotTimeout,
    AccountQuarantined,
    SubmissionFailed,
    GateClosed,
):
    _cls.__module__ = "capgate"
del _cls
