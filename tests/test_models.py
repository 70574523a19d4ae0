"""Parsing answers into snapshots: lenient about what is missing, strict about what is there."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from capgate import AccountCapacity, ExecutingJob, PollError, Snapshot
from capgate._models import parse_snapshot
from capgate._services import get_service

LTX = get_service("ltxstudio")


def parse(data, service=LTX):
    return parse_snapshot(data, service, requested_at=1.0, received_at=2.0)


def row(account="a@x.io", **counts):
    return {"email": account, **counts}


# --- AccountCapacity.free: rule 1's server side -----------------------------------------


@pytest.mark.parametrize(
    ("max_jobs", "executing", "available", "free"),
    [
        (5, 1, 4, 4),  # consistent
        (5, 1, 9, 4),  # available overstated: maxJobs - executing wins
        (5, 1, 2, 2),  # available understated: the smaller wins
        (5, 7, 0, 0),  # executing over maxJobs: clamped at zero
        (5, 7, None, 0),  # derived, clamped
        (None, None, 3, 3),  # only available
        (5, 2, None, 3),  # only maxJobs and executing
        (None, None, None, 0),  # nothing known: no room
    ],
)
def test_server_free_is_clamped(max_jobs, executing, available, free):
    """Server free is ``available`` clamped to ``[0, maxJobs - executing]``."""
    assert AccountCapacity("a", max_jobs, executing, available).free == free


def test_busy_derived_when_executing_missing():
    """Executing jobs are derived from maxJobs - available when ``executing`` is missing."""
    assert AccountCapacity("a", 5, None, 2).busy == 3
    assert AccountCapacity("a", None, None, 2).busy is None


# --- parse_snapshot ----------------------------------------------------------------------


def test_parses_documented_example():
    """The documented ltxstudio answer parses into accounts and executing jobs."""
    snapshot, skipped = parse(
        {
            "executing": [
                {
                    "jobId": "email:a@x.io:7a34-type:image",
                    "email": "a@x.io",
                    "started": "2025-06-03T12:34:56.789Z",
                    "elapsed": "03:45",
                    "replyUrl": "https://example.com/webhook",
                    "replyRef": "ref-1",
                }
            ],
            "available": [
                {"email": "a@x.io", "maxJobs": 5, "executing": 1, "available": 4},
                {"email": "b@x.io", "maxJobs": 3, "executing": 0, "available": 3},
            ],
        }
    )
    assert skipped == []
    assert snapshot.accounts == (
        AccountCapacity("a@x.io", 5, 1, 4),
        AccountCapacity("b@x.io", 3, 0, 3),
    )
    assert snapshot.executing == (
        ExecutingJob(
            "email:a@x.io:7a34-type:image",
            "a@x.io",
            datetime(2025, 6, 3, 12, 34, 56, 789000, tzinfo=timezone.utc),
            "03:45",
        ),
    )
    assert (snapshot.requested_at, snapshot.received_at) == (1.0, 2.0)
    assert snapshot.total_free == 7


def test_missing_account_has_no_free_slot():
    """An account left out of ``available[]`` has 0 free (it is full), not an error."""
    snapshot, _ = parse({"available": [row("a@x.io", available=2)], "executing": []})
    assert snapshot.account("b@x.io") is None
    assert snapshot.free("b@x.io") == 0


def test_empty_lists_mean_all_busy():
    """Empty lists are a valid answer: every account is busy."""
    snapshot, skipped = parse({"available": [], "executing": []})
    assert (snapshot.accounts, snapshot.executing, skipped) == ((), (), [])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (row(maxJobs=5, executing=-1, available=3), "executing is negative"),
        (row(maxJobs="five", executing=1, available=3), "maxJobs is not a number"),
        (row(maxJobs=5, executing=1, available=2.5), "available is not a whole number"),
        (row(maxJobs=5, executing=True, available=3), "executing is a boolean"),
        (row(maxJobs=5, executing=1, available=float("nan")), "available is not a whole number"),
        ({"maxJobs": 5, "executing": 1, "available": 4}, "no email"),
        (row(account="  "), "no email"),
        (row(maxJobs=5), "no counts"),
        ("a@x.io", "row is not an object"),
    ],
)
def test_malformed_row_is_skipped(bad, reason):
    """A malformed row is skipped with its reason; the other rows are used."""
    good = row("b@x.io", maxJobs=3, executing=0, available=3)
    snapshot, skipped = parse({"available": [bad, good], "executing": []})
    assert [a.account for a in snapshot.accounts] == ["b@x.io"]
    assert [(s.section, s.index, s.reason) for s in skipped] == [("available", 0, reason)]
    assert snapshot.skipped == 1


@pytest.mark.parametrize("order", [(1, 4), (4, 1)])
def test_an_account_listed_twice_counts_its_fewest_free_slots(order):
    """Either row may be the stale one; trusting the roomier could oversubscribe (before,
    the first row won: 4 free). The other is skipped as a duplicate."""
    rows = [row(available=n) for n in order]
    snapshot, skipped = parse({"available": rows, "executing": []})
    assert snapshot.free("a@x.io") == 1
    assert [s.reason for s in skipped] == ["duplicate account"]


def test_numeric_strings_and_whole_floats_are_counts():
    """Counts written as ``"3"`` or ``3.0`` are read leniently."""
    snapshot, skipped = parse({"available": [row(maxJobs="5", executing=2.0, available=" 3 ")]})
    assert skipped == []
    assert snapshot.accounts == (AccountCapacity("a@x.io", 5, 2, 3),)


def test_job_row_without_id_is_skipped():
    """An executing row without a job id is skipped; the accounts still count."""
    snapshot, skipped = parse(
        {"available": [row(available=1)], "executing": [{"email": "a@x.io"}, "junk"]}
    )
    assert snapshot.executing == ()
    assert [(s.section, s.reason) for s in skipped] == [
        ("executing", "no jobId"),
        ("executing", "row is not an object"),
    ]
    assert snapshot.free("a@x.io") == 1


@pytest.mark.parametrize(
    "data",
    [[], "text", 3, None, {"available": {"email": "a"}}, {"executing": "nope"}],
    ids=["list", "str", "int", "null", "available-not-list", "executing-not-list"],
)
def test_wrong_shape_is_a_poll_error(data):
    """An answer that is not an object with list fields is a PollError, not a snapshot."""
    with pytest.raises(PollError, match=r"^ltxstudio: "):
        parse(data)


def test_object_without_either_list_is_a_poll_error():
    """An object with neither ``available`` nor ``executing`` is not the documented shape."""
    with pytest.raises(
        PollError, match=r"^ltxstudio: answer has neither 'available' nor 'executing'$"
    ):
        parse({"message": "hello"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-06-03T12:34:56Z", datetime(2025, 6, 3, 12, 34, 56, tzinfo=timezone.utc)),
        ("2025-06-03T12:34:56", datetime(2025, 6, 3, 12, 34, 56, tzinfo=timezone.utc)),
        (1748954096, datetime(2025, 6, 3, 12, 34, 56, tzinfo=timezone.utc)),
        (1748954096000, datetime(2025, 6, 3, 12, 34, 56, tzinfo=timezone.utc)),
        ("yesterday", None),
        (True, None),
        (float("inf"), None),
    ],
)
def test_started_accepts_iso_and_epoch(value, expected):
    """``started`` is read from an ISO string or an epoch number (s or ms); junk is None."""
    snapshot, _ = parse({"executing": [{"jobId": "j1", "email": "a", "started": value}]})
    assert snapshot.executing[0].started == expected


@pytest.mark.parametrize(
    ("service", "job", "job_id", "account"),
    [
        ("ltxstudio", {"jobId": "email:a@x.io:1-type:video", "email": "a@x.io"}, None, "a@x.io"),
        ("kling", {"id": 12345, "email": "a@x.io"}, "12345", "a@x.io"),
        ("tempolor", {"job_id": "user:1-tempolor:u9-job:3"}, None, "u9"),
        ("riffusion", {"job_id": "r-1", "user_id": "u9"}, None, "u9"),
        ("minimax", {"videoId": "user:1-minimax:acc-video:4"}, None, "acc"),
        ("minimax", {"imageId": "user:1-minimax:acc-image:4"}, None, "acc"),
        ("pixverse", {"id": "user:1-pixverse:a@x.io-video:5", "type": "video"}, None, "a@x.io"),
    ],
)
def test_every_service_shape(service, job, job_id, account):
    """Each service's executing row yields the job id (as a string) and its account."""
    spec = get_service(service)
    snapshot, skipped = parse(
        {
            "available": [{spec.account_key: account, "maxJobs": 2, "executing": 1}],
            "executing": [job],
        },
        spec,
    )
    assert skipped == []
    assert snapshot.free(account) == 1
    expected_id = job_id or next(str(job[k]) for k in spec.job_id_keys if k in job)
    assert snapshot.executing == (ExecutingJob(expected_id, account, None, None),)
    assert snapshot.lists_job(expected_id)


def test_snapshot_is_frozen():
    """Snapshots are immutable."""
    snapshot, _ = parse({"available": []})
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"^cannot assign to field"):
        snapshot.service = "kling"  # type: ignore[misc]


def test_snapshot_equality_ignores_indexes():
    """Two snapshots of the same answer compare equal."""
    data = {"available": [row(available=1)], "executing": [{"jobId": "j", "email": "a@x.io"}]}
    assert parse(data)[0] == parse(data)[0]
    assert isinstance(parse(data)[0], Snapshot)
