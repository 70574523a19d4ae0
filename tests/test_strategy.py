"""Strategies: which account one dispatch pass grants, tested on the Picker alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capgate import Candidate
from capgate._strategy import SCAN_LIMIT, Picker, Scan

A, B, C = "a@x.io", "b@x.io", "c@x.io"


def grants(picker: Picker, n: int, allowed: frozenset[str] | None = None) -> list[str | None]:
    """What ``n`` waiters in a row get from one pass."""
    out: list[str | None] = []
    for _ in range(n):
        account = picker.pick(allowed)
        if account is not None:
            picker.take(account)
        out.append(account)
    return out


def test_most_available_takes_the_most_free_slots():
    """most_available grants where the most slots are free, then rebalances."""
    assert grants(Picker("most_available", {A: 1, B: 3, C: 2}), 4) == [B, B, C, A]


def test_most_available_breaks_ties_in_the_server_order():
    """Equal free slots: the account the server listed first."""
    assert grants(Picker("most_available", {B: 2, A: 2}), 2) == [B, A]


def test_most_available_breaks_ties_in_the_accounts_order_when_given():
    """With accounts= given, ties go to its order, as in fleet mode's Lua."""
    assert grants(Picker("most_available", {B: 2, A: 2}, [A, B]), 2) == [A, B]


def test_most_available_with_many_accounts_uses_the_heap_alike():
    """Past SCAN_LIMIT accounts the heap path gives the scan's answers."""
    free = {f"u{i}@x.io": 1 + i % 3 for i in range(SCAN_LIMIT + 4)}
    expected, left = [], dict(free)
    for _ in range(12):  # the rule, by brute force: most free, ties to the server's order
        best = max(left, key=lambda a: (left[a], -list(free).index(a)))
        expected.append(best)
        left[best] -= 1
    assert grants(Picker("most_available", dict(free)), 12) == expected


def test_most_available_within_an_allow_list():
    """A waiter restricted to some accounts gets the fullest of those."""
    picker = Picker("most_available", {A: 1, B: 3, C: 2})
    assert picker.pick(frozenset({A, C})) == C


def test_first_fit_packs_in_the_accounts_order():
    """first_fit fills the first account of accounts= before the next."""
    assert grants(Picker("first_fit", {A: 2, B: 2, C: 2}, [C, A, B]), 5) == [C, C, A, A, B]


def test_first_fit_with_an_allow_list_skips_to_an_allowed_account():
    """A restricted waiter takes the first allowed account with room."""
    picker = Picker("first_fit", {A: 1, B: 1, C: 1}, [A, B, C])
    assert picker.pick(frozenset({C, B})) == B


def test_round_robin_rotates_after_the_last_grant():
    """round_robin grants the next account with room after the one granted last."""
    assert grants(Picker("round_robin", {A: 2, B: 2, C: 1}), 5) == [A, B, C, A, B]


def test_round_robin_continues_after_a_last_account_that_is_full_now():
    """The account granted last keeps its place in the order though it has no room now."""
    picker = Picker("round_robin", {A: 1, C: 1}, [A, B, C], last=B)
    assert picker.pick(None) == C


def test_round_robin_wraps_around():
    """After the last account in the order comes the first again."""
    picker = Picker("round_robin", {A: 1, B: 1}, [A, B, C], last=C)
    assert picker.pick(None) == A


def test_an_order_naming_an_account_twice_keeps_its_first_place():
    """accounts= then the server's order may repeat a name: its rank is the first one."""
    picker = Picker("first_fit", {B: 1, A: 1}, [A, B, A, B])
    assert picker.pick(None) == A


def test_callable_sees_candidates_in_preference_order():
    """A callable strategy gets Candidates described by the caller's describe()."""
    seen: list[list[str]] = []

    def pick_last(candidates: list[Candidate]) -> str:
        seen.append([c.account for c in candidates])
        return candidates[-1].account

    picker = Picker(
        pick_last,
        {A: 2, B: 1},
        describe=lambda account, free: Candidate(account, free, None, None, 0),
    )
    assert picker.pick(None) == B
    assert seen == [[A, B]]


def test_callable_naming_no_candidate_raises():
    """A callable returning a name that is not a candidate is an error (the gate falls back)."""
    picker = Picker(
        lambda candidates: "nobody",
        {A: 1},
        describe=lambda account, free: Candidate(account, free, None, None, 0),
    )
    with pytest.raises(ValueError, match=r"^strategy returned 'nobody', which is not one of"):
        picker.pick(None)


def test_nothing_left_grants_nothing():
    """Once every free slot is taken, the picker grants nobody."""
    picker = Picker("most_available", {A: 1})
    assert grants(picker, 2) == [A, None]
    assert not picker


@given(
    free=st.dictionaries(
        st.sampled_from([f"acct{n}" for n in range(SCAN_LIMIT)]),
        st.integers(1, 4),
        max_size=SCAN_LIMIT,
    ),
    waiters=st.lists(
        st.none() | st.frozensets(st.sampled_from([f"acct{n}" for n in range(SCAN_LIMIT)])),
        max_size=30,
    ),
)
def test_scan_picks_as_the_picker_does(free, waiters):
    """The hot path's Scan grants the same accounts, in the same order, as Picker's
    ``most_available`` over the same free slots (server order, no preference order)."""
    picker, scan = Picker("most_available", dict(free), None), Scan(dict(free))
    for allowed in waiters:
        expected, got = picker.pick(allowed), scan.pick(allowed)
        assert got == expected
        if expected is not None:
            picker.take(expected)
            scan.take(got)
        assert bool(scan) == bool(picker)
