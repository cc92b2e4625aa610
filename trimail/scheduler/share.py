"""A destination's share of the active queue: one congested site must not fill it.

Postfix's qmgr bounds the active queue as a whole (``qmgr_message_active_limit``
messages, ``qmgr_message_recipient_limit`` recipients in memory) and serves the
destinations in it round-robin, but nothing stops one destination's backlog from
taking every active slot: with a tarpit holding 20,000 messages, new mail for
every other site waits in the incoming queue until the tarpit drains.  trimail
adds one bound (``qmgr_destination_active_share``, percent of the active limit):
a destination's waiting jobs of new mail may take that share of the active queue
(counting the jobs in delivery, and never less than its concurrency limit), and
its retries as much again; past that it takes no more of that kind.  Two shares,
so a storm of retries never takes the room new mail for the same destination
needs, and one destination holds at most twice the share.  A message whose jobs would all go to such destinations is *parked*: put
back in the deferred queue, without a delivery attempt, its recipients untouched.

When it comes back is paced by the destination's own delivery rate (completed
jobs per second, a moving average), new mail and retries apart: the first
message of a kind parked in a congested spell returns when about half its share
should have drained, each next one one delivery interval later, so parked mail flows back about as fast as the
destination takes it, instead of every parked message being claimed and parked
again each round.  A destination that completes nothing (a tarpit) is assumed to
take one job a second; no message is parked longer than ``queue_run_delay``.  A
message with a job for a destination that has room is delivered as usual (its
congested jobs wait in line: a bounded exception, as its other recipients must
not wait).

``ParkingLot`` writes parked messages back to the deferred queue in batches (one
writer request per ``PARK_BATCH``), so a backlog of thousands costs tens of
requests, not thousands.

Parameters: qmgr_destination_active_share, qmgr_message_active_limit, queue_run_delay.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import trio

from trimail.config import Config
from trimail.delivery.route import Route
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.transitions import ClaimedMessage
from trimail.queue.writer import QueueWriter
from trimail.scheduler.destination import Destination
from trimail.supervise import report

log = logging.getLogger("trimail.qmgr")

FIRST_PARK = 1.0  # the shortest park, seconds
ASSUMED_RATE = 1.0  # jobs per second of a destination that has completed none yet
REMEMBERED = 4096  # destinations whose pace is remembered (the least recent forgotten first)
PARK_BATCH = 256  # messages parked per writer request


@dataclasses.dataclass(slots=True)
class _Pace:
    interval: float = 1.0 / ASSUMED_RATE  # moving average of the time between completed jobs
    last: float | None = None  # when the last job completed
    next_new: float = 0.0  # when the next new message parked in this congested spell returns
    next_retry: float = 0.0  # ... and the next retry


class Shares:
    """Which destinations hold their share of the active queue, and until when a
    message for them is parked."""

    def __init__(self, config: Config) -> None:
        self._paces: dict[tuple, _Pace] = {}
        self.apply(config)

    def apply(self, config: Config) -> None:
        percent = min(100, max(1, config.qmgr_destination_active_share))
        self.limit = max(1, config.qmgr_message_active_limit * percent // 100)  # for new mail, and for retries
        self.longest = max(FIRST_PARK, config.queue_run_delay)

    def _pace(self, key: tuple) -> _Pace:
        pace = self._paces.pop(key, None) or _Pace()
        self._paces[key] = pace  # re-inserted: the most recent
        while len(self._paces) > REMEMBERED:
            del self._paces[next(iter(self._paces))]
        return pace

    def congested(self, dest: Destination | None, retry: bool) -> bool:
        """Whether *dest* holds its share for new mail (or for retries, *retry*): its
        waiting jobs of that kind and those in delivery reach the share (never fewer
        than its concurrency limit: a share that could not keep its connections busy
        would only slow it down)."""
        return dest is not None and dest.jobs.count(retry) + dest.busy >= max(self.limit, dest.limit)

    def completed(self, key: tuple, now: float) -> None:
        """A job of *key* is done: its delivery rate is learned from these."""
        pace = self._paces.get(key)
        if pace is None:
            if len(self._paces) >= REMEMBERED:
                return
            pace = self._pace(key)
        if pace.last is not None:
            pace.interval = 0.9 * pace.interval + 0.1 * max(0.0, now - pace.last)
        pace.last = now

    def park_until(self, keys: Iterable[tuple], now: float, retry: bool) -> float:
        """When a new message (a retry, *retry*) whose jobs all go to the congested
        *keys* is due again: new mail and retries are paced apart, so parked new mail
        never waits behind a storm of parked retries."""
        until = now + FIRST_PARK
        for key in keys:
            pace = self._pace(key)
            first = now + max(FIRST_PARK, self.limit / 2 * pace.interval)
            if retry:
                slot = pace.next_retry = max(first, pace.next_retry + pace.interval)
            else:
                slot = pace.next_new = max(first, pace.next_new + pace.interval)
            until = max(until, slot)
        return min(until, now + self.longest)

    def relieved(self, key: tuple, retry: bool) -> None:
        """*key* has room again for new mail (retries): that kind's next congested
        spell is paced from scratch."""
        pace = self._paces.get(key)
        if pace is not None:
            if retry:
                pace.next_retry = 0.0
            else:
                pace.next_new = 0.0


Routes = list[Route | Exception] | None


class ParkingLot:
    """Messages waiting to be parked, written back to the deferred queue by one
    task, ``PARK_BATCH`` per writer request."""

    def __init__(self) -> None:
        self.waiting: list[tuple[ClaimedMessage, Routes, float]] = []
        self.draining = False  # a task is writing them

    def add(self, message: ClaimedMessage, routes: Routes, until: float) -> bool:
        """Queue *message* to be parked until *until*; True when the caller must start
        ``drain`` (no task is writing the lot)."""
        self.waiting.append((message, routes, until))
        if self.draining:
            return False
        self.draining = True
        return True

    async def drain(self, writer: QueueWriter, parked: Callable[[ClaimedMessage, float], None],
                    not_parked: Callable[[ClaimedMessage, Routes], None], metrics: Metrics | None) -> None:
        """Park the waiting messages (each due again at its time, no delivery attempt),
        telling *parked* about each; when the queue cannot be written they are handed
        to *not_parked* (delivered after all: they are active)."""
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:PARK_BATCH], self.waiting[PARK_BATCH:]
                try:
                    with trio.CancelScope(shield=True):  # a commit that has begun is waited for
                        await writer.run(transitions.park, [(m.id, until) for m, _, until in batch], durable=False)
                except Exception as exc:  # noqa: BLE001  (the queue cannot be written now: no parking)
                    report("qmgr: parking", exc, metrics, logger=log)
                    for message, routes, _ in batch:
                        not_parked(message, routes)
                    continue
                for message, _, until in batch:
                    parked(message, until)
        finally:
            self.draining = False
