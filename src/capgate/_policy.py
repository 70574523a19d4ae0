"""Every number and rule of capgate's policy, in one place.

Pure: no I/O, no clock of its own. The engine reads these; fleet mode's Lua scripts get
them as arguments from here (never retyped); ``gate.submit()`` and its sync twin read the
create answers with :func:`classify_create`.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = [
    "BROKEN_STATUSES",
    "BUSY_STATUSES",
    "INVALIDATE_FLOOR",
    "LAG_MARGIN",
    "LAG_SAMPLES",
    "MAX_POLL_INTERVAL",
    "MAX_RETRY_AFTER",
    "WATCH_FOR",
    "WATCH_MAX",
    "CreateOutcome",
    "backoff_delay",
    "classify_create",
    "poll_spacing",
]

#: invalidate() never brings a poll closer than this to the previous one (seconds)
INVALIDATE_FLOOR = 0.5
#: the longest poll_interval accepted (a day): past it, waiters would never see a poll
MAX_POLL_INTERVAL = 86400.0
#: a Retry-After longer than this is taken as this (seconds)
MAX_RETRY_AFTER = 3600.0

#: a reservation with a job id keeps counting while the snapshot was requested less than
#: the lag seen so far (times this margin) after the settle
LAG_MARGIN = 1.0
#: the lag is the largest of this many recent observations
LAG_SAMPLES = 32
#: how long (seconds) and how many dropped job ids are watched for a late listing
WATCH_FOR = 600.0
WATCH_MAX = 1024

#: create answers meaning "busy after all": 429, and MiniMax's 502/504 (provider busy)
BUSY_STATUSES = frozenset({429, 502, 504})
#: create answers no retry on the same account will fix: on hold (596), no credits (412),
#: no useapi subscription (402)
BROKEN_STATUSES = frozenset({596, 412, 402})

CreateOutcome = Literal["created", "busy", "broken", "refused", "other"]


def classify_create(status: int) -> CreateOutcome:
    """What a create request's HTTP status means for the slot it used.

    - ``created`` (2xx): the job exists; mark the slot submitted.
    - ``busy`` (429, 502, 504): no job; the account was full after all (``mark_busy``), retry.
    - ``broken`` (596, 412, 402): no job; quarantine the account, retry elsewhere.
    - ``refused`` (401): the token was refused; raise ``AuthenticationError``.
    - ``other``: returned to the caller untouched.
    """
    if 200 <= status < 300:
        return "created"
    if status in BUSY_STATUSES:
        return "busy"
    if status in BROKEN_STATUSES:
        return "broken"
    if status == 401:
        return "refused"
    return "other"


def poll_spacing(interval: float, jitter: float, u: float) -> float:
    """Seconds from one poll to the next: ``interval`` plus up to ``jitter`` of it (u in [0, 1))."""
    return interval * (1 + u * jitter)


def backoff_delay(
    interval: float,
    max_backoff: float,
    failures: int,
    u: float,
    retry_after: float | None = None,
) -> float:
    """Seconds before the next poll after ``failures`` failed polls in a row.

    Full jitter between ``interval`` and ``min(max_backoff, interval * 2**failures)``
    (``u`` in [0, 1) draws the point), never shorter than a ``Retry-After`` (capped at
    :data:`MAX_RETRY_AFTER`).
    """
    ceiling = min(max_backoff, interval * 2.0 ** min(failures, 30))
    delay = interval + u * (max(interval, ceiling) - interval)
    if retry_after is not None and not math.isnan(retry_after):
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay
