"""Dispatching a claimed message (Postfix's qmgr_message.c): its recipients routed,
split into jobs and queued on their destinations.

Each recipient is routed (``delivery.route.Router``; on a lookup thread first,
within table_lookup_timeout, when a transport table may block, so no session
waits).  ``error:`` and ``discard:`` routes are decided at once; the others are
grouped per destination (transport, nexthop; ``destination.destination_key``) into
jobs of at most ``<transport>_destination_recipient_limit`` recipients (default
``default_destination_recipient_limit``) and queued on their destination, new mail
and retries in turn (``scheduler/jobqueue.py``), whose workers start up to its
window (``workers.start_workers``; a new destination's limit is
``<transport>_destination_concurrency_limit``, default
``default_destination_concurrency_limit``).  A job for a dead destination is
deferred at once, without a connection (``dead.DeadSites``), unless a flush made
its message due after the destination was declared dead.  A message whose
destinations all hold their share of the active queue
(``qmgr_destination_active_share``) is parked in the deferred queue instead
(``scheduler/share.py``).  A message that cannot even be split is deferred whole
(``4.3.0``).

``Dispatcher`` is the half of ``qmgr.Scheduler`` that does this: a base class, not
a helper object, so the split adds no call per message; the attributes and
methods it uses are the Scheduler's.

Parameters: default_destination_recipient_limit,
<transport>_destination_recipient_limit, default_destination_concurrency_limit,
<transport>_destination_concurrency_limit, table_lookup_timeout.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from trimail.config import Config
from trimail.delivery.bounce import status_of
from trimail.delivery.outcome import Outcome, bounced, deferred, sent
from trimail.delivery.route import FILTER_PARAM, Route, RouteError, Router
from trimail.maps import TableError, off_loop
from trimail.metrics import Metrics
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler.dead import DeadSites
from trimail.scheduler.destination import Destination, Job, destination_key
from trimail.scheduler.share import ParkingLot, Shares
from trimail.scheduler.workers import start_workers
from trimail.supervise import report

if TYPE_CHECKING:
    from trimail.scheduler.qmgr import ActiveMessage

log = logging.getLogger("trimail.qmgr")


class Dispatcher:
    """Splits messages into jobs for ``Scheduler``, which sets these in ``__init__``."""

    config: Config
    router: Router
    writer: QueueWriter
    metrics: Metrics | None
    active: dict[str, ActiveMessage]
    destinations: dict[tuple, Destination]
    dead: DeadSites
    shares: Shares
    parking: ParkingLot
    idle: trio.Event
    wall_clock: Callable[[], float]
    closing: bool
    _nursery: trio.Nursery | None

    if TYPE_CHECKING:  # the Scheduler's (qmgr.py)
        def wake(self) -> None: ...
        def _track(self, message: ClaimedMessage, outstanding: int) -> ActiveMessage: ...
        def _untrack(self, message: ClaimedMessage) -> None: ...
        async def _supervised(self, task: str, label: str | None, fn: Callable[..., Awaitable[None]],
                              *args: Any) -> None: ...
        async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None: ...

    def _dispatch_safely(self, message: ClaimedMessage, routes: list[Route | Exception] | None = None,
                         park: bool = True) -> None:
        """Split a message into jobs; one that cannot even be split is deferred whole
        (4.3.0).  When a transport table may block (a file being re-read, ``hash:``),
        the routes are looked up on a lookup thread first, so no session waits."""
        if routes is None and any(table.may_block() for table in self.router.tables):
            self._track(message, 1)  # counted while its routes are looked up
            self.idle = trio.Event() if self.idle.is_set() else self.idle
            assert self._nursery is not None
            self._nursery.start_soon(self._supervised, f"{message.id}: routing", "qmgr: routing",
                                     self._route_off_loop, message)
            return
        try:
            self._dispatch(message, routes, park)
        except Exception as exc:
            report(f"{message.id}: scheduling", exc, self.metrics, logger=log, label="qmgr: scheduling")
            outcome = deferred("4.3.0", "mail system temporarily unable to schedule this message")
            assert self._nursery is not None
            self._track(message, 1)
            self._nursery.start_soon(self._supervised, "qmgr: completing a message", None, self._complete_immediate,
                                     message, [(recipient, outcome) for recipient in message.recipients])

    async def _route_off_loop(self, message: ClaimedMessage) -> None:
        router = self.router
        try:
            routes = await off_loop(router.tables, self._route_all, router, message,
                                    timeout=self.config.table_lookup_timeout)
        except TableError as exc:
            routes = [exc] * len(message.recipients)
        self._dispatch_safely(message, routes)

    @staticmethod
    def _route_all(router: Router, message: ClaimedMessage) -> list[Route | Exception]:
        routes: list[Route | Exception] = []
        for recipient in message.recipients:
            try:
                routes.append(router.route(recipient.address, message.params.get(FILTER_PARAM)))
            except (RouteError, TableError) as exc:
                routes.append(exc)
        return routes

    def _dispatch(self, message: ClaimedMessage, routes: list[Route | Exception] | None = None,
                  park: bool = True) -> None:
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        groups: dict[tuple[str, str, int, bool], tuple[Route, list[QueuedRecipient]]] = {}
        immediate: list[tuple[QueuedRecipient, Outcome]] = []
        if routes is None:
            routes = self._route_all(self.router, message)
        for recipient, route in zip(message.recipients, routes, strict=True):
            if isinstance(route, Exception):
                log.warning("%s: transport table problem: %s", message.id, route)
                immediate.append((recipient, deferred("4.3.0", f"mail transport unavailable: {route}")))
                continue
            if route.transport == "error":
                text = route.nexthop or "5.0.0 mail delivery is not allowed"
                dsn = status_of(text)
                immediate.append((recipient, bounced(dsn, text) if dsn[0] == "5" else deferred(dsn, text)))
            elif route.transport == "discard":
                immediate.append((recipient, sent(f"discarded{': ' + route.nexthop if route.nexthop else ''}")))
            else:
                groups.setdefault(destination_key(route, recipient), (route, []))[1].append(recipient)
        assert self._nursery is not None
        if park and groups and not immediate and all(
                self.shares.congested(self.destinations.get(key), message.retry) for key in groups):
            self._track(message, 1)  # counted until it is back in the deferred queue
            until = self.shares.park_until(groups, self.wall_clock(), message.retry)
            if self.parking.add(message, routes, until):
                self._nursery.start_soon(self._supervised, "qmgr: parking", None, self.parking.drain,
                                         self.writer, self._parked,
                                         functools.partial(self._dispatch_safely, park=False), self.metrics)
            return
        jobs = [Job(message, recipients[i:i + limit], route, key)
                for key, (route, recipients) in groups.items()
                for limit in [self._recipient_limit(route)]
                for i in range(0, len(recipients), limit)]
        active = self._track(message, len(jobs) + (1 if immediate else 0))
        if immediate:
            self._nursery.start_soon(self._supervised, "qmgr: completing a message", None,
                                     self._complete_immediate, message, immediate)
        for job in jobs:
            self._enqueue(job)
        if active.outstanding == 0:  # no recipients left at all (all done before a crash)
            self._nursery.start_soon(self._supervised, "qmgr: finishing a message", None,
                                     self._finish_only, message)

    def _recipient_limit(self, route: Route) -> int:
        """Recipients per delivery: <transport>_destination_recipient_limit."""
        name = f"{route.transport}_destination_recipient_limit"
        return max(1, int(self.config.get(name) if route.transport in ("smtp", "relay")
                          else self.config.default_destination_recipient_limit))

    def _parked(self, message: ClaimedMessage, until: float) -> None:
        log.debug("%s: its destinations hold their share of the active queue: due again in %.0f s",
                  message.id, until - self.wall_clock())
        self._untrack(message)
        self.wake()  # a slot is free for the next message, and a new due time is set

    def _enqueue(self, job: Job) -> None:
        if self.closing:  # serve is stopping: the job's message stays active, returned to incoming
            return
        key = job.key or job.route.key
        assert self._nursery is not None
        refusal = self.dead.refusal(key, time.time(), job.message.flushed)
        if refusal is not None:  # a dead destination: deferred at once, without a connection
            self._nursery.start_soon(self._supervised, f"qmgr: deferring a job for {job.route}",
                                     "qmgr: deferring a job", self.complete,
                                     job, [refusal] * len(job.recipients), "none", time.time())
            return
        dest = self.destinations.get(key)
        if dest is None:
            limit = self.config.get(f"{job.route.transport}_destination_concurrency_limit") \
                if job.route.transport in ("smtp", "relay", "local") \
                else self.config.default_destination_concurrency_limit
            dest = self.destinations[key] = Destination(job.route, max(1, int(limit)), key)
        dest.add(job)
        if not self.shares.congested(dest, job.message.retry):
            self.shares.relieved(key, job.message.retry)
        start_workers(self, dest, self._nursery)  # up to its concurrency window (workers.py)

    async def _complete_immediate(self, message: ClaimedMessage, results: list[tuple[QueuedRecipient, Outcome]]) -> None:
        job = Job(message, [r for r, _ in results], Route("none", "none"))
        await self.complete(job, [o for _, o in results], "none", time.time())

    async def _finish_only(self, message: ClaimedMessage) -> None:
        self.active[message.id].outstanding = 1
        await self.complete(Job(message, [], Route("none", "none")), [], "none", time.time())
