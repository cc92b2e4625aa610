"""Delivery-agent slots (``default_process_limit``), handed out round-robin over
destinations.

A delivery worker holds a slot while it works, and keeps its connection for
job after job.  With a plain FIFO limiter the workers that got a slot first
would keep it until their destinations' queues were empty, and a destination
whose workers queued last would wait for whole backlogs of others (new mail for
it too: seconds in a retry storm).  So the waiting workers are queued per
destination, and a free slot goes to the destinations in turn (Postfix's qmgr
serves destinations round-robin): first those that hold no slot at all, then
the others.  A worker that has held its slot for a turn (``TURN``, or
``LONE_TURN`` when it is its destination's only one) gives it up after its job
while a destination without a slot waits; its destination gets a new worker
that queues again.  Once every waiting destination has a slot, nobody
gives one up, so connections are not churned.  Every operation is O(1).
"""

from __future__ import annotations

from collections import OrderedDict, deque

import trio

TURN = 0.5  # seconds a worker keeps its slot before it yields to a destination without one ...
LONE_TURN = 2.0  # ... or, when it is its destination's only slot, this many


class _Waiter:
    __slots__ = ("granted", "key")

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.granted = trio.Event()


class AgentSlots:
    """``default_process_limit`` slots; ``acquire(key)`` / ``release(key)`` per destination *key*."""

    def __init__(self, total: int) -> None:
        self._total = max(1, total)
        self.used = 0
        self.held: dict[tuple, int] = {}  # slots in use per destination
        self._queues: dict[tuple, deque[_Waiter]] = {}  # waiting workers per destination
        self._without: OrderedDict[tuple, None] = OrderedDict()  # waiting destinations holding no slot, in turn
        self._with: OrderedDict[tuple, None] = OrderedDict()  # waiting destinations holding one, in turn
        self.waiting = 0

    @property
    def total_tokens(self) -> int:
        return self._total

    @total_tokens.setter
    def total_tokens(self, total: int) -> None:  # a reload
        self._total = max(1, total)
        self._grant()

    def starving(self) -> bool:
        """Some destination waits without holding a slot."""
        return bool(self._without)

    def should_yield(self, key: tuple, held_since: float) -> bool:
        """Whether a worker of *key* that got its slot at *held_since* (trio time)
        should give it up now: a destination without a slot is waiting, and this
        worker has had its turn (``TURN``; ``LONE_TURN`` when it is its
        destination's only slot, so a destination is rarely left with none and
        connections are not churned)."""
        if not self._without:
            return False
        held_for = trio.current_time() - held_since
        return held_for >= (TURN if self.held.get(key, 0) > 1 else LONE_TURN)

    async def acquire(self, key: tuple) -> None:
        if self.used < self._total and not self.waiting:
            self._take(key)
            return
        waiter = _Waiter(key)
        line = self._queues.get(key)
        if line is None:
            line = self._queues[key] = deque()
            (self._with if self.held.get(key) else self._without)[key] = None
        line.append(waiter)
        self.waiting += 1
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                self.release(key)  # granted, but cancelled before it could be used
            else:
                self._forget(waiter)
            raise

    def release(self, key: tuple) -> None:
        self.used -= 1
        left = self.held.get(key, 1) - 1
        if left > 0:
            self.held[key] = left
        else:
            self.held.pop(key, None)
            if key in self._with:  # its waiting workers now wait without a slot
                del self._with[key]
                self._without[key] = None
        self._grant()

    def _take(self, key: tuple) -> None:
        self.used += 1
        before = self.held.get(key, 0)
        self.held[key] = before + 1
        if not before and key in self._without:
            del self._without[key]
            self._with[key] = None

    def _forget(self, waiter: _Waiter) -> None:
        line = self._queues[waiter.key]
        line.remove(waiter)
        self.waiting -= 1
        if not line:
            del self._queues[waiter.key]
            self._without.pop(waiter.key, None)
            self._with.pop(waiter.key, None)

    def _grant(self) -> None:
        while self.used < self._total and self.waiting:
            turns = self._without or self._with
            key = next(iter(turns))
            del turns[key]
            line = self._queues[key]
            waiter = line.popleft()
            self.waiting -= 1
            self._take(key)
            if line:
                self._with[key] = None  # its next worker waits its turn again, at the end
            else:
                del self._queues[key]
            waiter.granted.set()
