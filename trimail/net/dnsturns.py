"""``dns_concurrency_limit``'s turns, shared out by zone, so that the names of one
zone whose servers never answer cannot hold up the lookups of every other zone.

A query holds a turn while it is in flight; a name server that never answers holds
it for the resolver's whole lifetime (10 s).  With one queue in arrival order, one
message to 1,000 names of a silent wildcard zone took every turn for 100 s and a
healthy destination's uncached MX lookup waited behind all of them (red team 39's
lead, once the delivery agents' slots no longer waited for DNS).  So the waiting
lookups are queued per zone (``zone_of``: a name's registered domain, as far as a
short list of second-level labels can tell it), and a free turn goes to the zones
in turn, first those that hold no turn at all, as ``scheduler/slots.py`` hands out
delivery agents.  A zone that holds turns never takes the last ``reserve`` free
ones (a quarter of them): those are kept for zones that hold none, so one silent
zone takes at most three quarters of the turns and another zone's lookup gets one
at once.  Many silent zones at once (many registered domains) still share the
turns with the others in turn.  Every operation is O(1) (a cancelled waiter is
left in its queue, marked, and skipped when its turn comes).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

# second-level labels under which names are registered (co.uk, com.au, ...), and the
# reverse trees: a zone is then three labels long (1.in-addr.arpa: a /8 of reverse lookups)
_REGISTRY_LABELS = frozenset({"ac", "co", "com", "edu", "go", "gov", "ne", "net", "or", "org",
                              "in-addr", "ip6"})


def zone_of(name: str) -> str:
    """The zone *name* is taken to belong to for its turns: its last two labels, or
    three under a second-level registry label (``example.co.uk``)."""
    labels = name.lower().rstrip(".").split(".")
    size = 3 if len(labels) >= 3 and labels[-2] in _REGISTRY_LABELS else 2
    return ".".join(labels[-size:])


class _Waiter:
    __slots__ = ("gone", "granted")

    def __init__(self) -> None:
        self.granted = trio.Event()
        self.gone = False  # cancelled while waiting: skipped when its turn comes


class Turns:
    """*total* turns; ``async with turns.turn(zone_of(name))`` around a query."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.reserve = self.total // 4  # free turns kept for zones that hold none
        self.used = 0
        self.held: dict[str, int] = {}  # turns in use per zone
        self._queues: dict[str, deque[_Waiter]] = {}  # waiting lookups per zone (and some gone)
        self._without: OrderedDict[str, None] = OrderedDict()  # waiting zones holding no turn, in turn
        self._with: OrderedDict[str, None] = OrderedDict()  # waiting zones holding turns, in turn
        self.waiting = 0  # waiters not gone

    @asynccontextmanager
    async def turn(self, zone: str) -> AsyncIterator[None]:
        await self._acquire(zone)
        try:
            yield
        finally:
            self._release(zone)

    async def _acquire(self, zone: str) -> None:
        waiter = _Waiter()
        line = self._queues.get(zone)
        if line is None:
            line = self._queues[zone] = deque()
            (self._with if self.held.get(zone) else self._without)[zone] = None
        line.append(waiter)
        self.waiting += 1
        self._grant()
        try:
            await waiter.granted.wait()  # (a checkpoint even when granted at once)
        except BaseException:
            if waiter.granted.is_set():
                self._release(zone)  # granted, but cancelled before it could be used
            else:
                waiter.gone = True
                self.waiting -= 1
            raise

    def _release(self, zone: str) -> None:
        self.used -= 1
        left = self.held.get(zone, 1) - 1
        if left > 0:
            self.held[zone] = left
        else:
            self.held.pop(zone, None)
            if zone in self._with:  # its waiting lookups now wait without a turn
                del self._with[zone]
                self._without[zone] = None
        self._grant()

    def _grant(self) -> None:
        while self.used < self.total and self.waiting:
            if self._without:
                turns = self._without
            elif self._with and self.total - self.used > self.reserve:
                turns = self._with
            else:
                return  # the last free turns are kept for a zone that holds none
            zone = next(iter(turns))
            del turns[zone]
            line = self._queues[zone]
            while line and line[0].gone:
                line.popleft()
            if not line:
                del self._queues[zone]
                continue
            waiter = line.popleft()
            self.waiting -= 1
            self.used += 1
            self.held[zone] = self.held.get(zone, 0) + 1
            if line:
                self._with[zone] = None  # its next lookup waits its turn again, at the end
            else:
                del self._queues[zone]
            waiter.granted.set()
