"""The queue manager (Postfix's qmgr): from incoming to delivered, deferred or bounced.

One task in serve's nursery.  Each round, in one group commit, it promotes the
deferred messages that are due (through the (state, next_attempt) index), claims
incoming messages into ``active`` while fewer than ``qmgr_message_active_limit``
are active, and learns when the next deferred message is due.  Then it sleeps
until a new message is committed, an operator flushes, a delivery frees a slot, or
that due time comes: no polling, no table scans.

Claimed messages are split per recipient by route into jobs (at most
``default_destination_recipient_limit`` recipients each) and queued on their
destination (transport, nexthop).  Each destination has up to
``<transport>_destination_concurrency_limit`` worker tasks in the delivery nursery;
a worker keeps its connection for as many jobs as the destination has; local and
virtual deliveries run on a pool of 20 threads of their own (a slow command, a
locked mbox or a busy root helper never takes the threads the queue needs).  When a
destination cannot be reached at all, every job queued for it is deferred with
the same reason without a connection each (a dead destination), so a dead
destination costs one connection attempt, not one per message, and never holds up
the others.

New mail takes a shortcut.  When the scheduler has room, a session commits the
message straight into ``active`` and hands it over in memory (with its content,
when small), so accepting and scheduling one message costs one commit, not a
commit plus a claim plus a read; a crash before delivery returns it to
``incoming`` at the next start like any active message.

Every outcome is committed as soon as it is known (so a crash repeats at most the
deliveries in flight: at least once, never lost).  When all jobs of a message are
done the message is deferred (next attempt: the earliest of its recipients') or
removed, and recipients that bounced this round get one RFC 3464 notification,
queued in the same transaction.  Temporary failures past
``maximal_queue_lifetime`` (``bounce_queue_lifetime`` for bounces) bounce.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from trimail.cleanup import masquerade, masquerade_headers
from trimail.config import Config
from trimail.delivery.bounce import Failure, build_dsn, status_of
from trimail.delivery.local import Forward, LocalAgent
from trimail.delivery.route import FILTER_PARAM, Route, RouteError, Router
from trimail.delivery.virtual import VirtualAgent
from trimail.delivery.smtp import ConnectionFailed, Connection, Connector, Envelope
from trimail.errors import StorageError
from trimail.log import printable
from trimail.maps import TableError, off_loop
from trimail.metrics import Metrics
from trimail.queue import scheduling
from trimail.queue.ids import new_queue_id
from trimail.queue.scheduling import ClaimedMessage, QueuedRecipient, RecipientResult
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.queue.writer import QueueWriter
from trimail.scheduler.backoff import retry_delay
from trimail.smtp.client import Outcome, bounced, deferred, sent
from trimail.supervise import Backoff, contained, report, retry_with_backoff, thread_pool

log = logging.getLogger("trimail.qmgr")
smtp_log = logging.getLogger("trimail.smtp")
bounce_log = logging.getLogger("trimail.bounce")

RECIPIENT_LIMIT = 50
REPLY_TEXT_LIMIT = 1000  # characters of a peer's reply kept with a recipient
CONTENT_CHUNK = 1 << 20  # bytes read from the queue per step while sending a message
HELD_MESSAGE_LIMIT = 256 * 1024  # content handed over in memory up to this size (the spool's own limit) ...
HELD_TOTAL_LIMIT = 16 << 20  # ... while all held content together stays under this
# local(8) and virtual(8) run on threads of their own: one may wait long (a command,
# an mbox lock, the root helper), and must not take the threads the queue and the spool need
agent_threads = thread_pool("local and virtual delivery", 20)


@dataclasses.dataclass(slots=True)
class Job:
    message: ClaimedMessage
    recipients: list[QueuedRecipient]
    route: Route
    key: tuple = ()  # its destination's key: the route's, and for local delivery the recipient's too


@dataclasses.dataclass(slots=True)
class ActiveMessage:
    message: ClaimedMessage
    outstanding: int
    corrupt: bool = False  # its content could not be read whole: quarantined when its jobs are done


def _destination_key(route: Route, recipient: QueuedRecipient) -> tuple:
    """The destination a recipient's job belongs to.  For local delivery it is the
    recipient (Postfix's local_destination_recipient_limit = 1, which makes
    local_destination_concurrency_limit a limit per recipient): one user's slow
    command or locked mailbox holds up that user's mail only."""
    if route.transport == "local":
        return (*route.key, recipient.address.lower())
    return route.key


class ContentError(Exception):
    """The queued content is not what was accepted (short, missing, unreadable)."""


@dataclasses.dataclass(slots=True)
class Destination:
    route: Route
    limit: int
    key: tuple = ()
    jobs: deque[Job] = dataclasses.field(default_factory=deque)
    workers: int = 0
    busy: int = 0  # workers with a job in hand (the others can take the next one)
    arrived: trio.Event = dataclasses.field(default_factory=trio.Event)  # set (and replaced) per new job

    def announce(self) -> None:
        self.arrived.set()
        self.arrived = trio.Event()

    async def next_job(self, linger: float) -> Job | None:
        """The next job; with none waiting, wait up to *linger* seconds for one (a
        worker holding an open connection caches it for the next message)."""
        deadline = trio.current_time() + linger
        while not self.jobs and trio.current_time() < deadline:
            with trio.move_on_at(deadline):
                await self.arrived.wait()
        return self.jobs.popleft() if self.jobs else None


def log_seconds(seconds: float) -> str:
    """Postfix's delay notation: 0.01 resolution below 10 s, no exponent, no trailing zeros."""
    seconds = max(0.0, seconds)
    text = f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def schedule_round(store: Store, now: float, room: int) -> tuple[list[ClaimedMessage], float | None]:
    scheduling.promote_due(store, now)
    claimed = scheduling.claim(store, room, now)
    return claimed, scheduling.next_due(store)


class Scheduler:
    def __init__(self, config: Config, writer: QueueWriter, connector: Connector) -> None:
        self.writer = writer
        self.connector = connector
        self.hostname: str = config.myhostname
        self._apply(config)
        self.active: dict[str, ActiveMessage] = {}
        self.destinations: dict[tuple[str, str, int, bool], Destination] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._reserved = 0  # slots promised to sessions committing a message for hand-over
        self._held = 0  # bytes of content held in memory by active messages
        self._starved = False  # the last round filled every slot: a finished message must wake us
        self._queued_here = 0  # notifications this scheduler queued (bounces, delay warnings): they need a round
        self.idle = trio.Event()  # set whenever nothing is active (tests and stop wait on it)
        self.metrics: Metrics | None = None

    def wake(self) -> None:
        self._wake.set()

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
        self.min_backoff: float = config.minimal_backoff_time
        self.max_backoff: float = config.maximal_backoff_time
        self.lifetime: float = config.maximal_queue_lifetime
        self.bounce_lifetime: float = config.bounce_queue_lifetime
        self.delay_warning: float = config.delay_warning_time
        self.masq_domains: list[str] = config.masquerade_domains
        self.masq_exceptions: list[str] = config.masquerade_exceptions
        self.masq_classes: list[str] = config.masquerade_classes

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
            try:
                claimed, due = await self.writer.run(schedule_round, time.time(), room, durable=False)
            except Exception as exc:  # the round's boundary: disk full, queue locked, I/O error
                report("qmgr round", exc, self.metrics, logger=log)
                await trio.sleep(backoff.next())  # mail waits in incoming; sessions go on
                continue
            backoff.reset()
            for message in claimed:
                self._dispatch_safely(message)
            if not self.active:
                self.idle.set()
            self._starved = len(claimed) >= room
            if len(claimed) == room and room > 0:
                continue  # more may be waiting; a finishing message wakes us otherwise
            deadline = math.inf if due is None else trio.current_time() + max(0.0, due - time.time())
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()

    # -- hand-over of new mail ------------------------------------------------------

    def reserve(self) -> bool:
        """A slot for a message about to be committed straight into ``active``;
        False when the scheduler is not running or has no room (the message then
        goes to ``incoming`` and waits for a round)."""
        if self._nursery is None or len(self.active) + self._reserved >= self.active_limit:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """The reserved message was not committed after all."""
        self._reserved -= 1

    def hand_over(self, message: NewMessage, content: bytes | None) -> None:
        """Take a message just committed as ``active`` under a reservation."""
        self._reserved -= 1
        if content is not None and (len(content) > HELD_MESSAGE_LIMIT or self._held + len(content) > HELD_TOTAL_LIMIT):
            content = None  # read from the queue when delivered
        self._held += len(content) if content is not None else 0
        self._dispatch_safely(ClaimedMessage(
            message.id, message.sender, message.arrival_time, time.time(), message.content.size, message.params,
            [QueuedRecipient(seq, address, 0, None) for seq, address in enumerate(message.recipients)],
            content))

    # -- fan-out -----------------------------------------------------------------

    def _dispatch_safely(self, message: ClaimedMessage, routes: list[Route | Exception] | None = None) -> None:
        """Split a message into jobs; one that cannot even be split is deferred whole
        (4.3.0).  When a transport table may block (a file being re-read, ``hash:``),
        the routes are looked up on a lookup thread first, so no session waits."""
        if routes is None and any(table.may_block() for table in self.router.tables):
            self.active[message.id] = ActiveMessage(message, 1)  # counted while its routes are looked up
            self.idle = trio.Event() if self.idle.is_set() else self.idle
            assert self._nursery is not None
            self._nursery.start_soon(self._supervised, f"{message.id}: routing", self._route_off_loop, message)
            return
        try:
            self._dispatch(message, routes)
        except Exception as exc:
            report(f"{message.id}: scheduling", exc, self.metrics, logger=log)
            outcome = deferred("4.3.0", "mail system temporarily unable to schedule this message")
            assert self._nursery is not None
            self.active[message.id] = ActiveMessage(message, 1)
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

    def _dispatch(self, message: ClaimedMessage, routes: list[Route | Exception] | None = None) -> None:
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
                groups.setdefault(_destination_key(route, recipient), (route, []))[1].append(recipient)
        jobs = [Job(message, recipients[i:i + RECIPIENT_LIMIT], route, key)
                for key, (route, recipients) in groups.items()
                for i in range(0, len(recipients), RECIPIENT_LIMIT)]
        active = ActiveMessage(message, len(jobs) + (1 if immediate else 0))
        self.active[message.id] = active
        assert self._nursery is not None
        if immediate:
            self._nursery.start_soon(self._supervised, "qmgr: completing a message", self._complete_immediate,
                                     message, immediate)
        for job in jobs:
            self._enqueue(job)
        if active.outstanding == 0:  # no recipients left at all (all done before a crash)
            self._nursery.start_soon(self._supervised, "qmgr: finishing a message", self._finish_only, message)

    def _enqueue(self, job: Job) -> None:
        key = job.key or job.route.key
        dest = self.destinations.get(key)
        if dest is None:
            limit = self.config.get(f"{job.route.transport}_destination_concurrency_limit") \
                if job.route.transport in ("smtp", "relay", "local") \
                else self.config.default_destination_concurrency_limit
            dest = self.destinations[key] = Destination(job.route, max(1, int(limit)), key)
        dest.jobs.append(job)
        dest.announce()
        # a new worker when the jobs outnumber the workers free to take them (busy
        # workers are not), up to the destination's concurrency limit
        if dest.workers < dest.limit and len(dest.jobs) > dest.workers - dest.busy:
            dest.workers += 1
            if self.metrics is not None:
                self.metrics.destinations.labels(str(job.route)).inc()
            assert self._nursery is not None
            self._nursery.start_soon(self._supervised, f"qmgr: delivery worker for {dest.route}", self._worker, dest)

    async def _supervised(self, task: str, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """The last boundary of a task in the delivery nursery: a bug in one worker is
        logged and counted, never the end of the queue manager (its messages stay
        active in the queue and are delivered again after the next start)."""
        with contained(task, self.metrics, logger=log):
            await fn(*args)

    async def _local_worker(self, dest: Destination) -> None:
        dest.busy += 1  # a local worker takes jobs only while there are some
        try:
            while dest.jobs:
                job = dest.jobs.popleft()
                started = time.time()
                try:
                    outcomes = await self._deliver_local(job)
                except Exception as exc:  # the job's boundary: defer its recipients, keep the message
                    outcomes = self._job_failed(job, exc)
                await self._complete(job, outcomes, job.route.transport, started)
        finally:
            dest.busy -= 1
            dest.workers -= 1
            if self.metrics is not None:
                self.metrics.destinations.labels(str(dest.route)).dec()
            if not dest.jobs and dest.workers == 0 and self.destinations.get(dest.key) is dest:
                del self.destinations[dest.key]

    async def _deliver_local(self, job: Job) -> list[Outcome]:
        content = job.message.content
        if content is None:
            content = await self.writer.read(scheduling.read_content, job.message.id)
            if content is None or len(content) != job.message.size:
                raise ContentError(f"content {'missing' if content is None else len(content)} "
                                   f"of {job.message.size} bytes")
        if job.route.transport == "virtual":  # virtual(8): mailboxes only, nothing to forward
            return await trio.to_thread.run_sync(
                self.virtual.deliver, job.message.sender, [r.address for r in job.recipients], content,
                limiter=agent_threads())
        result = await trio.to_thread.run_sync(
            self.local.deliver, job.message.sender, [r.address for r in job.recipients], content,
            limiter=agent_threads())
        for forward in result.forwards:
            with trio.CancelScope(shield=True):
                new_id = await self.writer.run(self._queue_forward, forward, content, durable=False)
            self.wake()  # the forwarded copy waits in incoming for a round
            log.info("%s: forwarded as %s to %s", job.message.id, new_id,
                     ", ".join(f"<{r}>" for r in forward.recipients))
        return result.outcomes

    def _job_failed(self, job: Job, exc: Exception) -> list[Outcome]:
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

    def _queue_forward(self, store: Store, forward: Forward, content: bytes) -> str:
        spool = Spool()
        for address in forward.delivered_to:
            spool.write(f"Delivered-To: {address}\r\n".encode())
        spool.write(content)
        new_id = new_queue_id()
        store.insert_message(NewMessage(new_id, forward.sender, forward.recipients, spool, protocol="local"))
        return new_id

    async def _worker(self, dest: Destination) -> None:
        if dest.route.transport in ("local", "virtual"):  # agents on worker threads, no connection
            await self._local_worker(dest)
            return
        conn: Connection | None = None
        opened = 0.0
        busy = False
        try:
            while True:
                if busy:
                    dest.busy, busy = dest.busy - 1, False
                # Postfix's connection cache: an open connection waits a little for the
                # next message to the same destination instead of hanging up at once
                linger = self.config.smtp_connection_cache_time_limit if conn is not None and conn.usable else 0
                job = await dest.next_job(linger)
                if job is None:
                    break
                dest.busy, busy = dest.busy + 1, True
                if conn is not None and (not conn.usable or trio.current_time() - opened
                                         > self.config.smtp_connection_reuse_time_limit):
                    await conn.close()
                    conn = None
                if conn is None:
                    started = time.time()
                    opened = trio.current_time()
                    try:
                        conn = await self.connector.open(dest.route)
                    except ConnectionFailed as exc:
                        failed = [job, *dest.jobs]
                        dest.jobs.clear()
                        for each in failed:
                            await self._complete(each, [exc.outcome] * len(each.recipients), "none", started)
                        break
                    except Exception as exc:  # the job's boundary (the others may find a way)
                        await self._complete(job, self._job_failed(job, exc), "none", started)
                        continue
                started = time.time()
                envelope = Envelope(
                    sender=self._masquerade(job.message.sender, "envelope_sender"),
                    recipients=[self._masquerade(r.address, "envelope_recipient") for r in job.recipients],
                    size=job.message.size,
                    eight_bit=str(job.message.params.get("BODY", "")).upper() == "8BITMIME",
                    smtputf8="SMTPUTF8" in job.message.params,
                )
                message_id, held, size = job.message.id, job.message.content, job.message.size

                async def content() -> AsyncIterator[bytes]:
                    if held is not None:
                        yield masquerade_headers(held, self.masq_domains, self.masq_exceptions, self.masq_classes)
                        return
                    offset = 0
                    while offset < size:
                        chunk = await self.writer.read(scheduling.read_chunk, message_id, offset,
                                                       min(CONTENT_CHUNK, size - offset))
                        if not chunk:
                            # raised before the end of data is sent: the peer never gets a
                            # truncated message, and the connection is dropped
                            raise ContentError(f"content ends at {offset} of {size} bytes")
                        first = offset == 0
                        offset += len(chunk)
                        if first:  # the header section is in the first chunk (header_size_limit)
                            chunk = masquerade_headers(chunk, self.masq_domains, self.masq_exceptions,
                                                       self.masq_classes)
                        yield chunk

                try:
                    outcomes = await conn.deliver(envelope, content)
                except Exception as exc:  # the job's boundary: this job is deferred, the worker goes on
                    conn.usable = False  # possibly inside DATA: never reuse, never end the message
                    outcomes = self._job_failed(job, exc)
                await self._complete(job, outcomes, conn.relay, started)
        finally:
            if busy:
                dest.busy -= 1
            dest.workers -= 1
            if self.metrics is not None:
                self.metrics.destinations.labels(str(dest.route)).dec()
            if conn is not None:
                await conn.close()
            if not dest.jobs and dest.workers == 0 and self.destinations.get(dest.key) is dest:
                del self.destinations[dest.key]

    def _masquerade(self, address: str, kind: str) -> str:
        """Masquerading applies to mail leaving the host, for the configured classes."""
        if kind not in self.masq_classes:
            return address
        return masquerade(address, self.masq_domains, self.masq_exceptions)

    # -- results -----------------------------------------------------------------

    async def _complete_immediate(self, message: ClaimedMessage, results: list[tuple[QueuedRecipient, Outcome]]) -> None:
        job = Job(message, [r for r, _ in results], Route("none", "none"))
        await self._complete(job, [o for _, o in results], "none", time.time())

    async def _finish_only(self, message: ClaimedMessage) -> None:
        self.active[message.id].outstanding = 1
        await self._complete(Job(message, [], Route("none", "none")), [], "none", time.time())

    async def _complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None:
        message = job.message
        now = time.time()
        lifetime = self.bounce_lifetime if message.sender == "" else self.lifetime
        expired = now - message.arrival_time >= lifetime
        results = []
        for recipient, outcome in zip(job.recipients, outcomes, strict=True):
            status = outcome.status
            # a peer's words reach the queue, the log, `queue list` and the bounce only
            # printable and bounded: no terminal escapes, no CR forging a log line
            text = reply_text = printable(outcome.text, REPLY_TEXT_LIMIT)
            next_attempt = None
            if status == "deferred":
                if expired:
                    status, text = "bounced", f"message expired: {reply_text}"
                else:
                    next_attempt = now + retry_delay(recipient.attempts + 1, self.min_backoff, self.max_backoff)
            results.append(RecipientResult(recipient.seq, status, f"{outcome.dsn} {text}", next_attempt))
            delay = log_seconds(now - message.arrival_time)
            delays = "/".join(map(log_seconds, (message.active_time - message.arrival_time,
                                                started - message.active_time, 0.0, now - started)))
            shown = "expired, returned to sender" if status == "bounced" and expired and outcome.status == "deferred" \
                else status
            if self.metrics is not None:
                self.metrics.outcome(status, outcome.dsn, job.route.transport, message.arrival_time)
            smtp_log.info("%s: to=<%s>, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
                          message.id, recipient.address, relay, delay, delays, outcome.dsn, shown, reply_text)
        active = self.active[message.id]
        active.outstanding -= 1
        last = active.outstanding == 0
        queued_before = self._queued_here
        corrupt = last and active.corrupt
        finished = await self._record_outcomes(message, results, last, corrupt)
        if corrupt:
            log.warning("%s: moved to the corrupt queue", message.id)
        if last:
            del self.active[message.id]
            if message.content is not None:
                self._held -= len(message.content)
            if finished.removed:
                log.info("%s: removed", message.id)
            if not self.active:
                self.idle.set()
            # a new round only when it can find something: a slot freed for waiting
            # mail, a new due time, or a notification this message queued
            if self._starved or not finished.removed or self._queued_here != queued_before:
                self.wake()

    async def _record_outcomes(self, message: ClaimedMessage, results: list[RecipientResult], last: bool,
                               corrupt: bool) -> scheduling.Finished:
        """Commit a job's outcomes; when the queue cannot be written (disk full, locked
        by another process, I/O error) keep them and try again with back-off.  The
        message stays ``active`` meanwhile, so a crash is still covered: the next
        start returns it to ``incoming`` and it is delivered again, never lost."""
        async def record_once() -> scheduling.Finished:
            with trio.CancelScope(shield=True):  # a commit that has begun is waited for
                return await self.writer.run(self._record, message, results, last, corrupt, durable=False)

        try:
            return await retry_with_backoff(f"{message.id}: recording delivery status", record_once,
                                            metrics=self.metrics, initial=0.5, maximum=30.0, logger=log)
        except trio.Cancelled:
            log.warning("%s: delivery status not recorded before stop: the message stays queued", message.id)
            raise

    def _record(self, store: Store, message: ClaimedMessage, results: list[RecipientResult],
                last: bool, corrupt: bool = False) -> scheduling.Finished:
        """Writer-thread work: record outcomes; after the last job, finish the message
        and queue a bounce for the recipients that failed this round (or, when its
        content could not be read whole, move it to the corrupt queue)."""
        if results:
            scheduling.record(store, message.id, results)
        if not last:
            return scheduling.Finished(False, None, [])
        if corrupt:
            scheduling.quarantine(store, message.id)
            return scheduling.Finished(False, None, [])
        return scheduling.finish(store, message.id,
                                 notify=lambda bounced: self._queue_bounce(store, message, bounced),
                                 warn=lambda waiting: self._queue_delay_warning(store, message, waiting))

    def _queue_bounce(self, store: Store, message: ClaimedMessage, bounced_rcpts: list[tuple[str, str]]) -> None:
        if message.sender == "":
            bounce_log.info("%s: not sending a notification about a bounce (null sender): %s", message.id,
                            ", ".join(f"<{a}>" for a, _ in bounced_rcpts))
            return
        bounce_id = self._queue_dsn(store, message, bounced_rcpts, delayed=False)
        bounce_log.info("%s: sender non-delivery notification: %s", message.id, bounce_id)

    def _queue_delay_warning(self, store: Store, message: ClaimedMessage, waiting: list[tuple[str, str]]) -> bool:
        if not self.delay_warning or message.sender == "" or time.time() - message.arrival_time < self.delay_warning:
            return False
        warning_id = self._queue_dsn(store, message, waiting, delayed=True)
        bounce_log.info("%s: sender delay notification: %s", message.id, warning_id)
        return True

    def _queue_dsn(self, store: Store, message: ClaimedMessage, rcpts: list[tuple[str, str]], *,
                   delayed: bool) -> str:
        failures = [Failure(address, status_of(reply), f"smtp; {reply.split(' ', 1)[-1]}")
                    for address, reply in rcpts]
        smtputf8 = "SMTPUTF8" in message.params  # RFC 6533: a utf-8 DSN, itself sent with SMTPUTF8
        content = build_dsn(hostname=self.hostname, queue_id=message.id, sender=message.sender,
                            arrival_time=message.arrival_time, failures=failures,
                            original_headers=scheduling.read_headers(store, message.id), delayed=delayed,
                            smtputf8=smtputf8)
        spool = Spool()
        spool.write(content)
        dsn_id = new_queue_id()
        store.insert_message(NewMessage(dsn_id, "", [message.sender], spool, protocol="bounce",
                                        params={"SMTPUTF8": None, "BODY": "8BITMIME"} if smtputf8 else {}))
        self._queued_here += 1  # (on the writer thread; read after the request's commit)
        return dsn_id
