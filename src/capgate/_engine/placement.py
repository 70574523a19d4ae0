"""Where a job finishes first: hold a slow account's free slot for a faster one.

When the durations learnt per account differ markedly (one account runs a slower model),
granting every free slot at once is not always best: a job given the slow account's slot now
may end long after the same job given a faster account's slot that frees a moment later. At
the end of a batch this decides the makespan; the oracle of ``capgate.simulation`` knows each
job's duration and waits for the faster slot whenever that ends sooner.

The gate does not know a job's duration, only each account's typical one
(:meth:`Forecast.typical`: about the 90th percentile, the accounts told apart only beyond
chance; the same job is slower on a slower account). A dispatch pass therefore plans the
waiters in service order by *expected earliest finish* (list scheduling): each waiter goes
to the slot where ``slot free + typical`` is least, the slots free now at ``now`` and the
busy ones when their listed jobs are expected to end (:meth:`Forecast.expected_ends`; a
reservation not listed yet counts as a job just started). A waiter planned onto a slot
free now is granted (on an account the store's strategy picks among those no worse than
waiting); one planned onto a slot that frees later is left waiting, and the next waiter is
planned with that slot taken. A slow account's free slot is thus used as soon as the queue
is long enough that its last waiters would finish sooner there, and left idle when not.

Bounds on what is held back: a waiter with a ``timeout=`` is held only for a slot expected
to free at least ``margin`` (two poll cycles, each a spacing with its jitter plus the last
answer's round trip: time for a poll to show it and a pass to grant it) before its
deadline, so ``timeout=0`` is never held and a slot that overruns its forecast leaves the
waiter to take the free one before it gives up; a slot whose job is older than any seen to
end is not expected to free at all, nor is a reservation older than its account's typical
duration; the plan runs only with a typical duration for every
account that has room and at most :data:`PLAN_ACCOUNTS` accounts; after :data:`MAX_HELD`
waiters held in one pass the rest are granted as without a plan (a queue that deep uses
every slot).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

__all__ = ["MAX_HELD", "PLAN_ACCOUNTS", "FinishFirst"]

#: with typical durations that differ less than this ratio, every free slot is granted as before
MARKED = 2 / 3
#: the plan runs over at most this many accounts (its cost per waiter is linear in them)
PLAN_ACCOUNTS = 64
#: waiters left waiting in one pass at most; after that, every free slot is granted
MAX_HELD = 256


class FinishFirst:
    """One dispatch pass's plan by expected earliest finish (internal).

    Args:
        now: The pass's instant.
        free: Slots free now, per account.
        typical: The learnt typical duration per account (the accounts planned over).
        busy: Per account, when its busy slots are expected to free (absolute instants,
            any order; one already past counts as freeing now); a slot not expected to
            free is left out.
        margin: A waiter with a deadline is held only for a slot expected to free at
            least this long before it.
    """

    __slots__ = ("_busy", "_free", "_margin", "_now", "_typical", "held")

    def __init__(
        self,
        now: float,
        free: Mapping[str, int],
        typical: Mapping[str, float],
        busy: Mapping[str, list[float]],
        margin: float = 0.0,
    ) -> None:
        self._now = now
        self._margin = margin
        self._typical = typical
        self._free = {a: n for a, n in free.items() if n > 0 and a in typical}
        self._busy: dict[str, list[float]] = {}
        for account in typical:
            slots = [max(now, t) for t in busy.get(account, ())]
            if slots:
                heapq.heapify(slots)
                self._busy[account] = slots
        self.held = 0

    @staticmethod
    def applies(free: Mapping[str, int], typical: Mapping[str, float]) -> bool:
        """Whether a plan can change anything: every account with room has a typical
        duration, and some account's jobs end markedly sooner than another's."""
        if not free or len(typical) < 2 or len(typical) > PLAN_ACCOUNTS:
            return False
        if any(account not in typical for account in free):
            return False
        values = typical.values()
        return min(values) < MARKED * max(values)

    def usable(self, allowed: frozenset[str] | None, deadline: float) -> frozenset[str] | None:
        """The accounts free now where this waiter finishes no later than by waiting for a
        slot that frees later; empty to leave it waiting (that later slot is then taken for
        it in this plan); ``None`` once :data:`MAX_HELD` waiters were held: grant as
        without a plan. Call :meth:`took` with the account it is granted."""
        if self.held >= MAX_HELD:
            return None
        now, typical = self._now, self._typical
        latest = deadline - self._margin  # inf - margin is inf: no deadline, no bound
        later, best = math.inf, None
        for account, slots in self._busy.items():
            if slots[0] < latest and (allowed is None or account in allowed):
                finish = slots[0] + typical[account]
                if finish < later:
                    later, best = finish, account
        usable = frozenset(
            account
            for account in self._free
            if now + typical[account] <= later and (allowed is None or account in allowed)
        )
        if not usable and best is not None:
            # it waits for that slot, which is then not free for those behind it
            heapq.heapreplace(self._busy[best], later)
            self.held += 1
        return usable

    def took(self, account: str) -> None:
        """A waiter was granted a slot free now on ``account``."""
        left = self._free.get(account, 0) - 1
        if left < 0:
            return
        if left:
            self._free[account] = left
        else:
            del self._free[account]
        heapq.heappush(self._busy.setdefault(account, []), self._now + self._typical[account])
