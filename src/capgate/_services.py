"""The family of useapi.net services and how each one names its fields.

All six services answer ``scheduler/available`` with the same shape but different names
(see ``shared/reference/useapi-scheduler.md``). A :class:`Service` holds one service's
names; nothing else in capgate knows a service by name.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SERVICES", "Service", "get_service"]

API_ROOT = "https://api.useapi.net"


@dataclass(frozen=True)
class Service:
    """How one useapi.net service names things.

    Attributes:
        name: The service's path segment (``"kling"``).
        version: The API version in its path (``"v1"``, ``"v2"`` for pixverse).
        account_key: The key naming the account in ``available[]`` and in create requests.
        job_id_keys: The keys that may hold a job's id in ``executing[]``, first match wins.
        executing_account_key: The key naming the account in ``executing[]``, or ``None``
            when the account is only embedded in the job id.
        embedded_marker: The marker after which the account appears in a job id
            (``"-minimax:"`` in ``…-minimax:<account>-video:…``), or ``None``.
    """

    name: str
    version: str
    account_key: str
    job_id_keys: tuple[str, ...]
    executing_account_key: str | None
    embedded_marker: str | None = None

    @property
    def url(self) -> str:
        """The default ``scheduler/available`` URL."""
        return f"{API_ROOT}/{self.version}/{self.name}/scheduler/available"

    def job_id_from(self, body: object) -> str | None:
        """The job id in a create response's JSON body (``id``, ``jobId``, ``videoId``…)."""
        if not isinstance(body, dict):
            return None
        for key in (*self.job_id_keys, "jobId", "job_id", "id"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
        return None

    def account_from_job_id(self, job_id: str) -> str | None:
        """The account embedded in a job id (``…-minimax:<account>-video:…``), if any."""
        if self.embedded_marker is None:
            return None
        start = job_id.find(self.embedded_marker)
        if start < 0:
            return None
        start += len(self.embedded_marker)
        end = job_id.find("-", start)
        # emails and user ids may contain "-": the account runs up to the next "-<word>:"
        while end >= 0:
            colon = job_id.find(":", end)
            dash = job_id.find("-", end + 1)
            if colon > end and (dash < 0 or colon < dash):
                break
            end = dash
        account = job_id[start:] if end < 0 else job_id[start:end]
        return account or None


SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        Service("ltxstudio", "v1", "email", ("jobId",), "email"),
        Service("kling", "v1", "email", ("id", "jobId"), "email"),
        Service("tempolor", "v1", "user_id", ("job_id",), None, "-tempolor:"),
        Service("riffusion", "v1", "user_id", ("job_id",), "user_id"),
        Service("minimax", "v1", "account", ("videoId", "imageId"), None, "-minimax:"),
        Service("pixverse", "v2", "email", ("id",), None, "-pixverse:"),
    )
}


def get_service(name: str) -> Service:
    """The :class:`Service` called ``name``.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a known service; the message lists the known ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"service must be a str, not {type(name).__name__}")
    try:
        return SERVICES[name]
    except KeyError:
        known = ", ".join(sorted(SERVICES))
        raise ValueError(f"unknown service {name!r}; known services: {known}") from None


Service.__module__ = "capgate"
