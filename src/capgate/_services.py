"""The useapi.net services capgate knows: one :class:`Service` entry each.

An entry says where the service's API lives, how it names accounts and job ids, which
:class:`~capgate._sources.CapacitySource` reads its capacity, and what its fake answers
(``shared/reference/useapi-services.md`` and ``useapi-scheduler.md``). Adding a service is
one entry in :data:`SERVICES`; nothing else in capgate knows a service by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._fakeapi import (
    FakeApi,
    FlowMusicApi,
    GoogleFlowApi,
    KlingApi,
    LtxStudioApi,
    MinimaxApi,
    PixverseApi,
    TempolorApi,
)
from ._sources import (
    AccountsOnly,
    CapacitySource,
    JobList,
    JobsByAccount,
    OwnJobsOnly,
    SchedulerAvailable,
)

__all__ = [
    "SERVICES",
    "Cooldown",
    "Service",
    "ServiceInfo",
    "active_services",
    "get_service",
    "service_for_url",
    "services",
]

API_ROOT = "https://api.useapi.net"

#: a cooldown that lasts until the next midnight UTC (a daily quota)
UTC_MIDNIGHT = "utc-midnight"


@dataclass(frozen=True)
class Cooldown:
    """What a create answer's reason takes out of rotation, and for how long.

    Attributes:
        reason: The reason code, found anywhere in the answer's body.
        scope: ``"account"`` (the whole account) or ``"model"`` (that model only).
        seconds: Seconds out, or :data:`UTC_MIDNIGHT` for "until the next midnight UTC".
        source: Where the figure comes from (shown in the README table).
    """

    reason: str
    scope: Literal["account", "model"]
    seconds: float | str
    source: str = ""


@dataclass(frozen=True)
class Service:
    """How one useapi.net service is reached, read, and faked.

    Attributes:
        name: The service's name (``"kling"``, ``"minimax-agent"``).
        version: The API version in its path (``"v1"``, ``"v2"`` for pixverse).
        account_key: The key naming the account in create requests (and in ``available[]``).
        job_id_keys: Keys that may hold a job's id in the capacity answers (``executing[]``).
        create_id_paths: Where a create answer holds the new job's id, tried in order: a key
            (``"videoId"``), a dotted path (``"task.id"``: Kling's nested task), or a list
            whose first item is the id (``"jobs[]"``: TemPolor). Tried before
            ``job_id_keys`` and the generic ``jobId``/``jobid``/``job_id``/``id``.
        executing_account_key: ``scheduler/available`` only: the key naming the account in
            ``executing[]``, or ``None`` when it is only embedded in the job id.
        embedded_marker: The marker after which the account appears in a job id
            (``"-minimax:"`` in ``…-minimax:<account>-video:…``), or ``None``.
        root: The API root's path (``"v1/minimax"`` for ``minimax-agent``); by default
            ``<version>/<name>``.
        source: How capacity is read.
        status: ``"active"`` or ``"retired"``.
        retired_on: When it was retired (ISO date), if it was.
        default_max_jobs: The cap per account when neither the API nor ``max_jobs=`` gives
            one (Mureka's prose "up to 10").
        needs_max_jobs: ``max_jobs=`` is required (no cap is published).
        needs_accounts: ``accounts=`` is required (no account list is read).
        embedded_pattern: A regular expression whose first group is the account embedded in
            a job id, for the shapes the marker rule does not fit.
        cooldowns: The 429 reasons that take an account (or a model) out of rotation.
        guesses: What is inferred rather than documented, in words.
        create_path: The create endpoint, relative to the root (the documented one the
            fake answers; useapi's scripts use it).
        create_status: The fake's status for a created job (201 for async creates).
        sync_create: The fake's create answers only when the job ends (the service's
            default sync mode: Flow Music, Google Flow); ``"mode": "async"`` opts out.
        job_id_format: The fake's job ids (``{n}``, ``{account}``, ``{uuid}``, ``{name}``).
        fake_started: How the fake writes ``started``: ``"iso"`` or ``"epoch_ms"``.
        fake_extra: Extra fields the fake adds to each executing row.
        fake_api: The fake's job endpoints: create answer, job status, accounts, uploads
            and callback body (:mod:`capgate._fakeapi`).
    """

    name: str
    version: str
    account_key: str
    job_id_keys: tuple[str, ...]
    executing_account_key: str | None = None
    embedded_marker: str | None = None
    root: str = ""
    source: CapacitySource = field(default_factory=SchedulerAvailable)
    status: Literal["active", "retired"] = "active"
    retired_on: str | None = None
    default_max_jobs: int | None = None
    needs_max_jobs: bool = False
    needs_accounts: bool = False
    embedded_pattern: str | None = None
    cooldowns: tuple[Cooldown, ...] = ()
    guesses: str = ""
    create_path: str = "jobs"
    create_status: int = 200
    sync_create: bool = False
    job_id_format: str = "user:4242-{name}:{account}-job:{n}"
    fake_started: str = "iso"
    fake_extra: tuple[tuple[str, Any], ...] = ()
    fake_api: FakeApi = field(default_factory=FakeApi)
    create_id_paths: tuple[str, ...] = ()

    @property
    def api_root(self) -> str:
        """The default API root (``https://api.useapi.net/v1/kling``)."""
        return f"{API_ROOT}/{self.root or f'{self.version}/{self.name}'}"

    @property
    def url(self) -> str:
        """The default URL of the main capacity endpoint (the API root if none)."""
        path = self.source.path
        return f"{self.api_root}/{path}" if path else self.api_root

    def job_id_from(self, body: object) -> str | None:
        """The job id in a create answer's JSON body, or ``None`` when it holds none.

        The service's own places come first (:attr:`create_id_paths`: Kling's ``task.id``,
        PixVerse's ``video_id`` then ``image_id``, TemPolor's first ``jobs[]``), then its
        :attr:`job_id_keys`, then the generic ``jobId``, ``jobid``, ``job_id`` and ``id``.
        """
        if not isinstance(body, dict):
            return None
        paths = (*self.create_id_paths, *self.job_id_keys, "jobId", "jobid", "job_id", "id")
        for path in paths:
            found = _id_text(_dig(body, path))
            if found is not None:
                return found
        return None

    def account_from_job_id(self, job_id: str) -> str | None:
        """The account embedded in a job id (``…-minimax:<account>-video:…``), if any."""
        if self.embedded_pattern is not None:
            match = re.search(self.embedded_pattern, job_id)
            return match.group(1) if match and match.group(1) else None
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


def _dig(body: Mapping[str, Any], path: str) -> object:
    """The value at ``path`` in ``body``: ``"a.b"`` descends into objects, and a trailing
    ``[]`` takes the first item of a list (``"jobs[]"``)."""
    value: object = body
    for part in path.split("."):
        first = part.endswith("[]")
        name = part[:-2] if first else part
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
        if first:
            value = value[0] if isinstance(value, list) and value else None
    return value


def _id_text(value: object) -> str | None:
    """A job id as text: a non-blank string, or an integer (Kling's ids are numbers)."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


@dataclass(frozen=True)
class ServiceInfo:
    """A service as :func:`capgate.services` describes it.

    Attributes:
        name: What to pass as ``service=``.
        status: ``"active"`` or ``"retired"`` (a retired service still works).
        retired_on: When it was retired (ISO date), or ``None``.
        capacity: How capacity is read, in words.
        api_root: The default API root (``base_url=`` replaces it).
        max_jobs_required: Whether ``max_jobs=`` must be given.
        default_max_jobs: The cap used when neither the API nor ``max_jobs=`` gives one.
        guesses: What capgate infers rather than reads from the docs.
    """

    name: str
    status: str
    retired_on: str | None
    capacity: str
    api_root: str
    max_jobs_required: bool = False
    default_max_jobs: int | None = None
    guesses: str = ""


def _family(
    name: str, version: str, account_key: str, job_keys: tuple[str, ...], *rest: Any, **options: Any
) -> Service:
    return Service(name, version, account_key, job_keys, *rest, **options)


_GOOGLE_FLOW_COOLDOWNS = (
    # the docs changed these twice (May 20 and Jun 15, 2026): the latest is the default
    Cooldown("PUBLIC_ERROR_USER_QUOTA_REACHED", "account", 1800.0, "docs Jun 15, 2026 (~30 min)"),
    Cooldown(
        "PUBLIC_ERROR_PER_MODEL_DAILY_QUOTA_REACHED",
        "model",
        UTC_MIDNIGHT,
        "docs May 20, 2026 (next UTC midnight)",
    ),
    Cooldown("PUBLIC_ERROR_USER_REQUESTS_THROTTLED", "account", 1800.0, "docs (~30 min)"),
)

SERVICES: dict[str, Service] = {
    s.name: s
    for s in (
        _family(
            "ltxstudio",
            "v1",
            "email",
            ("jobId",),
            "email",
            status="retired",
            retired_on="2026-03-09",
            job_id_format="email:{account}:{uuid}-type:video",
            # GUESS: the create path is not in the reference; the job status is documented
            fake_api=LtxStudioApi(),
        ),
        _family(
            "kling",
            "v1",
            "email",
            ("id", "jobId"),
            "email",
            create_id_paths=("task.id",),
            create_path="videos/text2video",
            job_id_format="{n}",
            fake_started="epoch_ms",
            fake_api=KlingApi(),
        ),
        _family(
            "tempolor",
            "v1",
            "user_id",
            ("job_id",),
            None,
            "-tempolor:",
            create_id_paths=("jobs[]",),
            create_path="music/song",
            fake_api=TempolorApi(),
        ),
        _family(
            "riffusion",
            "v1",
            "user_id",
            ("job_id",),
            "user_id",
            status="retired",
            retired_on="2025-03-28",
            create_path="music/create-prompt",
        ),
        _family(
            "minimax",
            "v1",
            "account",
            ("videoId", "imageId"),
            None,
            "-minimax:",
            create_id_paths=("videoId", "imageId"),
            create_path="videos/create",
            job_id_format="user:4242-minimax:{account}-video:{n}",
            fake_api=MinimaxApi(),
        ),
        _family(
            "pixverse",
            "v2",
            "email",
            ("id",),
            None,
            "-pixverse:",
            create_id_paths=("video_id", "image_id"),
            create_path="videos/create",
            job_id_format="user:4242-pixverse:{account}-video:{n}",
            fake_started="epoch_ms",
            fake_extra=(("type", "video"),),
            fake_api=PixverseApi(),
        ),
        Service(
            "dreamina",
            "v1",
            "account",
            ("jobid",),
            source=JobsByAccount(
                polled=("scheduler",),
                jobs_key="executing",
                job_list_key="",
                caps_from="accounts",
                elapsed_style="int",
                capacity="GET scheduler (jobs per account) every poll; "
                "GET accounts and accounts/<account> (maxJobs) rarely",
            ),
            embedded_pattern=r"-u\d+-(.+):dreamina$",
            guesses="free = maxJobs - listed jobs (inferred); the accounts list's keys are "
            "read as account names (useapi's script)",
            create_path="videos",
            job_id_format="j{n}v-u12345-{account}:dreamina",
        ),
        Service(
            "mureka",
            "v1",
            "account",
            ("jobid",),
            source=JobsByAccount(
                polled=("jobs",),
                jobs_key="accounts",
                job_list_key="jobs",
                count_key="total",
                accounts_key="availableAccounts",
                elapsed_style="units",
                capacity="GET jobs (total per account, availableAccounts) every poll; "
                "cap 10 per account unless max_jobs=",
            ),
            default_max_jobs=10,
            embedded_pattern=r"-a(\d+)-bot:mureka",
            guesses="the cap of 10 is the docs' prose ('up to 10 parallel generations'); "
            "whether TTS shares it is unknown",
            create_path="music/create",
            create_status=201,
            job_id_format="j{n}m-u777-a{account}-bot:mureka",
        ),
        Service(
            "minimax-agent",
            "v1",
            "account",
            ("jobId",),
            root="v1/minimax",
            source=JobsByAccount(
                polled=("agent/jobs",),
                jobs_key="executing",
                job_list_key="",
                count_key="summary.executing",
                accounts_key="accounts",
                job_id_keys=("jobId",),
                capacity="GET agent/jobs (summary executing per account) every poll; "
                "cap: max_jobs= (none published)",
            ),
            needs_max_jobs=True,
            embedded_pattern=r"-a(\d+)-bot:minimax",
            guesses="no cap is published ('dynamic capacity limits'): max_jobs= is yours",
            create_path="agent",
            job_id_format="p{n}-u12345-a{account}-bot:minimax",
        ),
        Service(
            "luma",
            "v1",
            "email",
            ("jobid",),
            source=JobList(),
            embedded_pattern=r"-email:([^:]+):",
            guesses="free = concurrency - running jobs (inferred; both fields documented); "
            "the service may be gone (absent from useapi's index of 2026-07-26)",
            create_path="videos",
            job_id_format="j{n}v-u12345-email:{account}:{uuid}-bot:luma",
        ),
        Service(
            "flowmusic",
            "v1",
            "email",
            ("jobid",),
            source=AccountsOnly(),
            embedded_pattern=r"-user:[^-]+-(.+)-bot:flowmusic$",
            guesses="its GET jobs shape is not documented: the gate counts its own running "
            "jobs, so a job counts only while its slot is held (create in sync mode, or "
            "hold the slot until the job ends)",
            create_path="music",
            sync_create=True,
            fake_api=FlowMusicApi(),
            job_id_format="job:{uuid}-user:1234-{account}-bot:flowmusic",
        ),
        Service(
            "google-flow",
            "v1",
            "email",
            ("jobid", "jobId"),
            source=OwnJobsOnly(),
            needs_max_jobs=True,
            needs_accounts=True,
            embedded_pattern=r"-email:(.+)-bot:google-flow",
            cooldowns=_GOOGLE_FLOW_COOLDOWNS,
            guesses="no cap and no jobs model are published: the gate counts its own running "
            "jobs against max_jobs= while each slot is held (sync creates hold it); the "
            "429 cooldowns changed twice in the docs and are configurable",
            create_path="videos",
            sync_create=True,
            fake_api=GoogleFlowApi(),
            job_id_format="j{n}v-u12345-email:{account}-bot:google-flow",
        ),
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


def active_services() -> list[str]:
    """The names of the active services, sorted."""
    return sorted(n for n, s in SERVICES.items() if s.status == "active")


def services() -> list[ServiceInfo]:
    """Every service capgate knows, active and retired, in name order.

    Returns:
        One :class:`ServiceInfo` per service: its status, when it was retired, how its
        capacity is read, and whether ``max_jobs=`` is required.
    """
    return [
        ServiceInfo(
            name=s.name,
            status=s.status,
            retired_on=s.retired_on,
            capacity=s.source.capacity,
            api_root=s.api_root,
            max_jobs_required=s.needs_max_jobs,
            default_max_jobs=s.default_max_jobs,
            guesses=s.guesses,
        )
        for s in sorted(SERVICES.values(), key=lambda s: s.name)
    ]


def service_for_url(path: str) -> Service | None:
    """The service a URL's path names (its capacity endpoint, or its API root), if any.

    ``/v1/minimax`` alone is the ``minimax`` root (``minimax-agent`` shares it); its
    ``/agent/jobs`` names ``minimax-agent``.
    """
    path = "/" + path.strip("/")
    best: tuple[int, Service] | None = None
    for spec in SERVICES.values():
        root = "/" + (spec.root or f"{spec.version}/{spec.name}")
        candidates = [root + "/" + spec.source.path] if spec.source.path else []
        if not spec.root:  # a shared root names its first owner only
            candidates.append(root)
        for candidate in candidates:
            named = path == candidate or path.startswith(candidate.rstrip("/") + "/")
            if named and (best is None or len(candidate) > best[0]):
                best = (len(candidate), spec)
    return None if best is None else best[1]


def cooldown_map(spec: Service) -> Mapping[str, Cooldown]:
    """The service's cooldowns by reason."""
    return {c.reason: c for c in spec.cooldowns}


for _cls in (Service, ServiceInfo, Cooldown):
    _cls.__module__ = "capgate"
del _cls
services.__module__ = "capgate"
