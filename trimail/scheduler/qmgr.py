"""The queue manager (Postfix's qmgr): from incoming to delivered, deferred or bounced.

One task in serve's nursery.  A round claims messages into ``active`` in small
batches (``schedule_round``: at most ``transitions.CLAIM_BATCH`` per writer
request, a non-durable one that never shares a transaction with accepted mail),
new mail and due retries in turn, each through its index, while fewer than
``qmgr_message_active_limit`` messages and ``qmgr_message_recipient_limit``
recipients are active (small messages come with their content, within
``HELD_TOTAL_LIMIT`` in all, so their delivery reads nothing more); then it
sleeps until a new message is committed, an operator flushes, a delivery frees a
slot, or the next deferred message is due: no polling, no table scans, no sort.

Claimed messages are split per recipient by route into jobs (at most
``<transport>_destination_recipient_limit`` recipients each, default
``default_destination_recipient_limit``) and queued on their destination
(transport, nexthop), new mail and retries in turn (``scheduler/jobqueue.py``).
A message whose destinations all hold their share of the active queue
(``qmgr_destination_active_share``) is parked in the deferred queue instead
(``scheduler/share.py``).  ``scheduler/destination.py`` has the destinations,
``scheduler/workers.py`` their workers and connections (at most
``default_process_limit`` delivering at once, ``scheduler/slots.py``); ``scheduler/results.py`` turns outcomes into records, retries, bounces and
delay warnings.

New mail takes a shortcut.  When the scheduler has room, a session commits the
message straight into ``active`` and hands it over in memory (with its content,
when small), so accepting and scheduling one message costs one commit, not a
commit plus a claim plus a read; a crash before delivery returns it to
``incoming`` at the next start like any active message.

Parameters: qmgr_message_active_limit, qmgr_message_recipient_limit,
default_process_limit, default_destination_concurrency_limit,
<transport>_destination_concurrency_limit, default_destination_recipient_limit,
<transport>_destination_recipient_limit, masquerade_domains, masquerade_exceptions,
masquerade_classes, table_lookup_timeout (plus what share.py, workers.py and
results.py read).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trimail.cleanup import LOCAL, REMOTE, header_rewriter
from trimail.config import Config
from trimail.delivery.bounce import status_of
from trimail.delivery.connector import Connector
from trimail.delivery.local.agent import LocalAgent
from trimail.delivery.outcome import Outcome, bounced, deferred, sent
from trimail.delivery.route import FILTER_PARAM, Route, RouteError, Router
from trimail.delivery.virtual import VirtualAgent
from trimail.errors import StorageError
from trimail.maps import TableError, off_loop
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler.dead import DeadSites
from trimail.scheduler.destination import Destination, Job, destination_key
from trimail.scheduler.results import Results
from trimail.scheduler.share import ParkingLot, Shares
from trimail.scheduler.slots import AgentSlots
from trimail.scheduler.transfer import ContentError
from trimail.scheduler.workers import start_workers
from trimail.supervise import Backoff, contained, report

log = logging.getLogger("trimail.qmgr")

HELD_MESSAGE_LIMIT = 256 * 1024  # content handed over in memory up to this size (the spool's own limit) ...
HELD_TOTAL_LIMIT = 16 << 20  # ... while all held content together stays under this


@dataclasses.dataclass(slots=True)
class ActiveMessage:
    message: ClaimedMessage
    outstanding: int
    corrupt: bool = False  # its content could not be read whole: quarantined when its jobs are done


def may_hold(size: int, room: int) -> bool:
    """Whether a message's content of *size* bytes may be kept in memory while it is
    active, with *room* bytes left of ``HELD_TOTAL_LIMIT``."""
    return size <= min(HELD_MESSAGE_LIMIT, room)


def schedule_round(store: Store, now: float, room: int, recipients: int | None = None,
                   held: int = 0) -> tuple[list[ClaimedMessage], float | None]:
    """One step of a round, in one (non-durable) writer request: a bounded batch of
    maildrop to incoming, then up to min(*room*, ``CLAIM_BATCH``) messages claimed,
    new mail and due retries in turn (stopping once they have *recipients*
    recipients); and when the next deferred message is due (in the past while due
    retries wait for room).  The content of small claimed messages is loaded too,
    up to *held* bytes in all, so their delivery needs no read of its own (a
    thread hop per message that cost the event loop a sixth of its time in a
    retry storm)."""
    transitions.promote_maildrop(store)
    claimed = transitions.claim(store, min(room, transitions.CLAIM_BATCH), now, recipients)
    for message in claimed:
        if may_hold(message.size, held):
            message.content = store.read_content(message.id)
            held -= message.size
    return claimed, transitions.next_due(store)


class Scheduler:
    def __init__(self, config: Config, writer: QueueWriter, connector: Connector) -> None:
        self.writer = writer
        self.connector = connector
        self.results = Results(config, writer)
        self.shares = Shares(config)
        self.agents = AgentSlots(config.default_process_limit)
        self._apply(config)
        self.active: dict[str, ActiveMessage] = {}
        self._recipients = 0  # recipients of the active messages (qmgr_message_recipient_limit)
        self.parking = ParkingLot()
        self.destinations: dict[tuple, Destination] = {}
        self.dead = DeadSites()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reserved = 0  # slots promised to sessions committing a message for hand-over
        self._held = 0  # bytes of content held in memory by active messages
        self._starved = False  # the last round filled every slot: a finished message must wake us
        self.idle = trio.Event()  # set whenever nothing is active (tests and stop wait on it)
        self._metrics: Metrics | None = None
        self.wall_clock: Callable[[], float] = time.time  # due times are wall-clock (tests may substitute one)

    @property
    def metrics(self) -> Metrics | None:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Metrics | None) -> None:
        self._metrics = self.results.metrics = metrics

    def wake(self) -> None:
        self._wake.set()

    def forget_dead(self) -> None:
        """Try dead destinations again at once (a flush, an ETRN that made mail due)."""
        self.dead.flush()

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded configuration: new routes, tables and limits for the
        messages claimed from now on (deliveries in progress finish as they began)."""
        self._apply(config)
        self.connector.reconfigure(config)
        self.wake()

    def _apply(self, config: Config) -> None:
        router, local = Router(config), LocalAgent(config)  # both built before anything changes
        self.config = config
        self.router, self.local = router, local
        self.virtual = VirtualAgent(config)  # virtual_transport = virtual: virtual(8) mailboxes
        self.active_limit: int = config.qmgr_message_active_limit
        self.recipient_limit: int = max(1, config.qmgr_message_recipient_limit)
        self.shares.apply(config)
        self.agents.total_tokens = config.default_process_limit
        self.results.apply(config)
        self.masq_domains: list[str] = config.masquerade_domains
        self.masq_exceptions: list[str] = config.masquerade_exceptions
        self.masq_classes: list[str] = config.masquerade_classes
        # cleanup's header rewriting per rewrite context (cleanup.header_context), built once
        self.header_rewriters = {context: header_rewriter(config, context) for context in (LOCAL, REMOTE, None)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as deliveries:
                self._nursery = deliveries
                task_status.started()
                await self._rounds()
        finally:
            self._nursery = None  # no more hand-overs: new mail stays in incoming

    async def _rounds(self) -> None:
        backoff = Backoff(initial=1.0, maximum=60.0)
        while True:
            room = self.active_limit - len(self.active) - self._reserved
            if self._recipients >= self.recipient_limit:
                room = 0  # qmgr_message_recipient_limit: a finishing message wakes us
            batch = min(room, transitions.CLAIM_BATCH)
            try:
                claimed, due = await self.writer.run(schedule_round, self.wall_clock(), batch,
                                                     self.recipient_limit - self._recipients,
                                                     HELD_TOTAL_LIMIT - self._held, durable=False)
            except Exception as exc:  # the round's boundary: disk full, queue locked, I/O error
                report("qmgr round", exc, self.metrics, logger=log)
                await trio.sleep(backoff.next())  # mail waits in incoming; sessions go on
                continue
            backoff.reset()
            self._held += sum(len(m.content) for m in claimed if m.content is not None)
            for message in claimed:  # into active, as Postfix's qmgr logs it (a hand-over was logged by smtpd)
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", message.id, message.sender,
                         message.size, len(message.recipients))
                self._dispatch_safely(message)
            if not self.active:
                self.idle.set()
            self._starved = len(claimed) >= room or self._recipients >= self.recipient_limit
            if batch > 0 and len(claimed) >= batch and not self._starved:
                # more may be waiting: the next small batch, after the sessions and
                # workers had their turn (each batch is its own short writer request)
                await trio.lowlevel.checkpoint()
                continue
            if self._starved:
                due = None  # no room for what is due: a finishing message wakes us
            deadline = math.inf if due is None else trio.current_time() + max(0.0, due - self.wall_clock())
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    def reserve(self) -> bool:
        """A slot for a message about to be committed straight into ``active``;
        False when the scheduler is not running or has no room (the message then
        goes to ``incoming`` and waits for a round)."""
        if (self._nursery is None or len(self.active) + self._reserved >= self.active_limit
                or self._recipients >= self.recipient_limit):
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """The reserved message was not committed after all."""
        self._reserved -= 1

    def hand_over(self, message: NewMessage, content: bytes | None) -> None:
        """Take a message just committed as ``active`` under a reservation."""
        self._reserved -= 1
        if content is not None and not may_hold(len(content), HELD_TOTAL_LIMIT - self._held):
            content = None  # read from the queue when delivered
        self._held += len(content) if content is not None else 0
        self._dispatch_safely(ClaimedMessage(
            message.id, message.sender, message.arrival_time, time.time(), message.content.size, message.params,
            [QueuedRecipient(seq, address, 0, None) for seq, address in enumerate(message.recipients)],
            content))

    def _dispatch_safely(self, message: ClaimedMessage, routes: list[Route | Exception] | None = None,
                         park: bool = True) -> None:
        """Split a message into jobs; one that cannot even be split is deferred whole
        (4.3.0).  When a transport table may block (a file being re-read, ``hash:``),
        the routes are looked up on a lookup thread first, so no session waits."""
        if routes is None and any(table.may_block() for table in self.router.tables):
            self._track(message, 1)  # counted while its routes are looked up
            self.idle = trio.Event() if self.idle.is_set() else self.idle
            assert self._nursery is not None
            self._nursery.start_soon(self._supervised, f"{message.id}: routing", self._route_off_loop, message)
            return
        try:
            self._dispatch(message, routes, park)
        except Exception as exc:
            report(f"{message.id}: scheduling", exc, self.metrics, logger=log)
            outcome = deferred("4.3.0", "mail system temporarily unable to schedule this message")
            assert self._nursery is not None
            self._track(message, 1)
            self._nursery.start_soon(self._supervised, "qmgr: completing a message", self._complete_immediate,
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

    def _track(self, message: ClaimedMessage, outstanding: int) -> ActiveMessage:
        """Count *message* as active (again) with *outstanding* jobs."""
        if message.id not in self.active:
            self._recipients += len(message.recipients)
        active = self.active[message.id] = ActiveMessage(message, outstanding)
        return active

    def _untrack(self, message: ClaimedMessage) -> None:
        """*message* is no longer active: its slot, recipients and held content are free."""
        del self.active[message.id]
        self._recipients -= len(message.recipients)
        if message.content is not None:
            self._held -= len(message.content)
        if not self.active:
            self.idle.set()

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
                self._nursery.start_soon(self._supervised, "qmgr: parking", self.parking.drain, self.writer,
                                         self._parked, functools.partial(self._dispatch_safely, park=False),
                                         self.metrics)
            return
        jobs = [Job(message, recipients[i:i + limit], route, key)
                for key, (route, recipients) in groups.items()
                for limit in [self._recipient_limit(route)]
                for i in range(0, len(recipients), limit)]
        active = self._track(message, len(jobs) + (1 if immediate else 0))
        if immediate:
            self._nursery.start_soon(self._supervised, "qmgr: completing a message", self._complete_immediate,
                                     message, immediate)
        for job in jobs:
            self._enqueue(job)
        if active.outstanding == 0:  # no recipients left at all (all done before a crash)
            self._nursery.start_soon(self._supervised, "qmgr: finishing a message", self._finish_only, message)

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
        key = job.key or job.route.key
        assert self._nursery is not None
        refusal = self.dead.refusal(key, time.time())
        if refusal is not None:  # a dead destination: deferred at once, without a connection
            self._nursery.start_soon(self._supervised, f"qmgr: deferring a job for {job.route}", self.complete,
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
        start_workers(self, dest, self._nursery)  # up to its concurrency window (destination.py)

    async def _supervised(self, task: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """The last boundary of a task in the delivery nursery: a bug in one worker is
        logged and counted, never the end of the queue manager (its messages stay
        active in the queue and are delivered again after the next start)."""
        with contained(task, self.metrics, logger=log):
            await fn(*args)

    def job_failed(self, job: Job, exc: Exception) -> list[Outcome]:
        """An unexpected failure of one delivery job: its recipients are deferred
        (4.3.0) and the message stays queued; content that cannot be read whole
        also sends the message to the corrupt queue once its jobs are done."""
        if isinstance(exc, ContentError) or (isinstance(exc, StorageError) and not exc.temporary):
            log.warning("%s: corrupt queue file: %s", job.message.id, exc)
            active = self.active.get(job.message.id)
            if active is not None:
                active.corrupt = True
            return [deferred("4.3.0", "queue file is damaged: moved to the corrupt queue")] * len(job.recipients)
        report(f"{job.message.id}: delivery to {job.route}", exc, self.metrics, logger=log)
        return [deferred("4.3.0", "mail system temporarily unable to deliver: internal error")] * len(job.recipients)

    async def _complete_immediate(self, message: ClaimedMessage, results: list[tuple[QueuedRecipient, Outcome]]) -> None:
        job = Job(message, [r for r, _ in results], Route("none", "none"))
        await self.complete(job, [o for _, o in results], "none", time.time())

    async def _finish_only(self, message: ClaimedMessage) -> None:
        self.active[message.id].outstanding = 1
        await self.complete(Job(message, [], Route("none", "none")), [], "none", time.time())

    async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None:
        """Record one job's outcomes; after the message's last job, finish it."""
        message = job.message
        if job.route.transport != "none":
            self.shares.completed(job.key or job.route.key, self.wall_clock())
        results = self.results.judge(job, outcomes, relay, started)
        active = self.active[message.id]
        active.outstanding -= 1
        last = active.outstanding == 0
        queued_before = self.results.queued
        corrupt = last and active.corrupt
        finished = await self.results.commit(message, results, last, corrupt)
        if corrupt:
            log.warning("%s: moved to the corrupt queue", message.id)
        if last:
            self._untrack(message)
            if finished.removed:
                log.info("%s: removed", message.id)
            # a new round only when it can find something: a slot freed for waiting
            # mail, a new due time, or a notification this message queued
            if self._starved or not finished.removed or self.results.queued != queued_before:
                self.wake()
