"""Choosing one account among those with room.

A dispatch pass hands waiters out in order; for each one a :class:`Picker` chooses an
account among the ones that waiter may use and that have room. Built-in strategies:

- ``most_available`` (default): the most free slots; ties go to the preference order
  (the ``accounts=`` order, then the server's).
  Spreads load, which keeps every account's provider session warm and leaves the most
  headroom against slots taken from outside the gate.
- ``round_robin``: the next account with room after the one granted last.
- ``first_fit``: the first account with room, in the ``accounts=`` order (else the
  server's). Packs work onto few accounts.
- a callable ``(candidates: Sequence[Candidate]) -> str``: your own choice.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["STRATEGIES", "Candidate", "Picker", "Strategy", "StrategyName"]

StrategyName = Literal["most_available", "round_robin", "first_fit"]
STRATEGIES: tuple[str, ...] = ("most_available", "round_robin", "first_fit")
#: up to this many accounts with room, most_available scans instead of keeping a heap
SCAN_LIMIT = 16


@dataclass(frozen=True)
class Candidate:
    """An account a waiter may be granted, as a custom strategy sees it.

    Attributes:
        account: The account.
        free: Slots the gate may grant on it now (at least 1).
        max_jobs: The cap in force (``min(server maxJobs, local max_jobs)``), if known.
        executing: Jobs executing by the latest snapshot, if known.
        reserved: Local reservations the snapshot does not reflect yet.
    """

    account: str
    free: int
    max_jobs: int | None
    executing: int | None
    reserved: int


Candidate.__module__ = "capgate"

Strategy = StrategyName | Callable[[Sequence[Candidate]], str]


def most_available(free: Mapping[str, int], order: Iterable[str]) -> str | None:
    """``most_available`` by a scan: the account with the most free slots, ties to the first
    in ``order`` (``None`` if none has any)."""
    choice, most = None, 0
    for account in order:
        n = free.get(account, 0)
        if n > most:
            choice, most = account, n
    return choice


class Picker:
    """One dispatch pass's view of the free slots (internal).

    Args:
        strategy: A built-in name or a callable.
        free: Free slots per account with room, in server order.
        order: The accounts in preference order (``first_fit``, ``round_robin``).
        last: The account granted last (``round_robin``).
        describe: Builds a :class:`Candidate` for a callable strategy.
    """

    __slots__ = (  # one is built for every grant on the hot path and every dispatch pass
        "_cursor",
        "_describe",
        "_given_order",
        "_heap",
        "_order_list",
        "_rank_map",
        "free",
        "last",
        "strategy",
        "total",
    )

    def __init__(
        self,
        strategy: Strategy,
        free: dict[str, int],
        order: Sequence[str] | None = None,
        *,
        last: str | None = None,
        describe: Callable[[str, int], Candidate] | None = None,
    ) -> None:
        self.strategy = strategy
        self.free = free
        self.total = sum(free.values())
        self.last = last
        self._describe = describe
        self._given_order = order
        self._rank_map: dict[str, int] | None = None
        self._order_list: list[str] | None = None
        self._heap: list[tuple[int, int, str]] | None = None
        self._cursor = 0

    @property
    def _rank(self) -> dict[str, int]:
        """Preference rank per account: ``order`` first, then the server's (built lazily)."""
        if self._rank_map is None:
            rank: dict[str, int] = {}
            for account in (*(self._given_order or ()), *self.free):
                rank.setdefault(account, len(rank))
            self._rank_map = rank
        return self._rank_map

    @property
    def _order(self) -> list[str]:
        if self._order_list is None:
            self._order_list = sorted(self.free, key=self._rank.__getitem__)
        return self._order_list

    def __bool__(self) -> bool:
        return self.total > 0

    def take(self, account: str) -> None:
        """Count one grant on ``account``."""
        left = self.free[account] - 1
        if left > 0:
            self.free[account] = left
            if self._heap is not None:
                heapq.heappush(self._heap, (-left, self._rank[account], account))
        else:
            del self.free[account]
        self.total -= 1
        self.last = account

    def pick(self, allowed: frozenset[str] | None) -> str | None:
        """The account to grant a waiter restricted to ``allowed`` (``None``: any), if any."""
        if self.total <= 0:
            return None
        if callable(self.strategy):
            return self._pick_callable(allowed)
        if self.strategy == "most_available":
            return self._most_available(allowed)
        if self.strategy == "first_fit":
            return self._first_fit(allowed)
        return self._round_robin(allowed)

    def _candidates(self, allowed: frozenset[str] | None) -> list[str]:
        if allowed is None:
            return [a for a in self._order if a in self.free]
        return sorted((a for a in allowed if a in self.free), key=self._rank.__getitem__)

    def _most_available(self, allowed: frozenset[str] | None) -> str | None:
        if allowed is not None:
            best: tuple[int, int] | None = None
            choice = None
            for account in allowed:
                n = self.free.get(account)
                if n is not None:
                    key = (-n, self._rank[account])
                    if best is None or key < best:
                        best, choice = key, account
            return choice
        if self._heap is None and len(self.free) <= SCAN_LIMIT:
            # few accounts: a scan beats a heap; ties go to the first in server order
            # (in the preference order when accounts= gave one, as the heap ranks them)
            return most_available(self.free, self._order if self._given_order else self.free)
        if self._heap is None:
            self._heap = [(-n, self._rank[a], a) for a, n in self.free.items()]
            heapq.heapify(self._heap)
        while self._heap:
            neg, _, account = self._heap[0]
            if self.free.get(account) == -neg:
                return account  # left in place: take() pushes the new count, this goes stale
            heapq.heappop(self._heap)  # stale: the account's count changed since
        return None

    def _first_fit(self, allowed: frozenset[str] | None) -> str | None:
        if allowed is not None:
            found = self._candidates(allowed)
            return found[0] if found else None
        # free counts only fall during a pass, so the cursor never needs to move back
        while self._cursor < len(self._order):
            account = self._order[self._cursor]
            if account in self.free:
                return account
            self._cursor += 1
        return None

    def _round_robin(self, allowed: frozenset[str] | None) -> str | None:
        found = self._candidates(allowed)
        if not found:
            return None
        if self.last is None or self.last not in self._rank:
            return found[0]
        last_rank = self._rank[self.last]
        for account in found:
            if self._rank[account] > last_rank:
                return account
        return found[0]

    def _pick_callable(self, allowed: frozenset[str] | None) -> str | None:
        assert callable(self.strategy)  # noqa: S101 - narrowed by pick()
        assert self._describe is not None  # noqa: S101
        names = self._candidates(allowed)
        if not names:
            return None
        candidates = [self._describe(a, self.free[a]) for a in names]
        choice = self.strategy(candidates)
        if isinstance(choice, Candidate):
            choice = choice.account
        if choice not in names:
            raise ValueError(f"strategy returned {choice!r}, which is not one of the candidates")
        return choice


class Scan:
    """A :class:`Picker` for the common case, cheaper to make: ``most_available`` over at
    most :data:`SCAN_LIMIT` accounts in the server's order, with no preference order (internal).

    Picks exactly as :class:`Picker` would there (:func:`most_available`); one is made for
    every grant on the hot path.
    """

    __slots__ = ("free",)

    def __init__(self, free: dict[str, int]) -> None:
        self.free = free

    def __bool__(self) -> bool:
        return bool(self.free)  # only accounts with room are kept

    def take(self, account: str) -> None:
        """Count one grant on ``account``."""
        left = self.free[account] - 1
        if left > 0:
            self.free[account] = left
        else:
            del self.free[account]

    def pick(self, allowed: frozenset[str] | None) -> str | None:
        """The account to grant a waiter restricted to ``allowed`` (``None``: any), if any."""
        free = self.free
        return most_available(free, free if allowed is None else [a for a in free if a in allowed])
