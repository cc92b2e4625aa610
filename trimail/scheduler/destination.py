"""Destinations (Postfix's qmgr queues): the jobs waiting for one (transport,
nexthop), the worker tasks that deliver them, and the connection cache.

A destination's jobs wait in a ``JobQueue``: new mail and retries in turn, so a
retry storm never queues new mail behind thousands of retries.

A destination has up to ``<transport>_destination_concurrency_limit`` worker
tasks in the delivery nursery; a worker keeps its connection for as many jobs as
the destination has, and lingers ``smtp_connection_cache_time_limit`` for the
next one (not while other destinations wait for one of ``default_process_limit``'s
slots: an idle cached connection must not hold one).  Local and virtual deliveries run on a pool of 20 threads of their own
(a slow command, a locked mbox or a busy root helper never takes the threads the
queue needs).  When a destination cannot be reached at all, every job queued for
it is deferred with the same reason without a connection each, so a dead
destination costs one connection attempt, not one per message.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol

import trio

from trimail.cleanup import masquerade, masquerade_headers
from trimail.config import Config
from trimail.delivery.local import Forward, LocalAgent
from trimail.delivery.route import Route
from trimail.delivery.smtp import Connection, ConnectionFailed, Connector, Envelope
from trimail.delivery.virtual import VirtualAgent
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler.jobqueue import JobQueue
from trimail.smtp.client import Outcome
from trimail.supervise import thread_pool

log = logging.getLogger("trimail.qmgr")

CONTENT_CHUNK = 1 << 20  # bytes read from the queue per step while sending a message
# local(8) and virtual(8) run on threads of their own: one may wait long (a command,
# an mbox lock, the root helper), and must not take the threads the queue and the spool need
agent_threads = thread_pool("local and virtual delivery", 20)


@dataclasses.dataclass(slots=True)
class Job:
    message: ClaimedMessage
    recipients: list[QueuedRecipient]
    route: Route
    key: tuple = ()  # its destination's key: the route's, and for local delivery the recipient's too


def destination_key(route: Route, recipient: QueuedRecipient) -> tuple:
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
    jobs: JobQueue = dataclasses.field(default_factory=JobQueue)
    workers: int = 0
    busy: int = 0  # workers with a job in hand (the others can take the next one)
    arrived: trio.Event = dataclasses.field(default_factory=trio.Event)  # set (and replaced) per new job

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.announce()

    def wants_worker(self) -> bool:
        """A new worker when the jobs outnumber the workers free to take them (busy
        workers are not), up to the destination's concurrency limit."""
        return self.workers < self.limit and len(self.jobs) > self.workers - self.busy

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


@dataclasses.dataclass(frozen=True, slots=True)
class DeadSite:
    destination: str  # as logged: transport:nexthop
    since: float  # wall-clock time it was declared dead
    until: float  # wall-clock time new jobs are tried again
    reason: str  # the failure that killed it (dsn and text)


class DeadSites:
    """Destinations declared dead, remembered after their last worker is gone, so
    new jobs for them are deferred at once without a connection each."""

    def __init__(self) -> None:
        self._dead: dict[tuple, tuple[DeadSite, Outcome]] = {}

    def refusal(self, key: tuple, now: float) -> Outcome | None:
        """The outcome for a new job to *key* while it is dead, else None."""
        entry = self._dead.get(key)
        if entry is None:
            return None
        if now >= entry[0].until:
            del self._dead[key]
            return None
        return entry[1]

    def snapshot(self, now: float) -> list[DeadSite]:
        """The destinations dead at *now* (for `trimail queue summary` and /metrics)."""
        return [site for site, _ in self._dead.values() if now < site.until]


class Qmgr(Protocol):
    """What the workers need of the queue manager (``qmgr.Scheduler``)."""

    config: Config
    connector: Connector
    writer: QueueWriter
    local: LocalAgent
    virtual: VirtualAgent
    metrics: Metrics | None
    destinations: dict[tuple, Destination]
    dead: DeadSites
    agents: trio.CapacityLimiter  # default_process_limit: delivery agents at once, all destinations
    masq_domains: list[str]
    masq_exceptions: list[str]
    masq_classes: list[str]

    def wake(self) -> None: ...

    async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None: ...

    def job_failed(self, job: Job, exc: Exception) -> list[Outcome]: ...

async def run_worker(q: Qmgr, dest: Destination) -> None:
    """One worker of *dest*: takes its jobs until none is left (and, for SMTP, none
    comes within the connection cache time)."""
    async with q.agents:  # a delivery agent's slot (default_process_limit), held while it works
        if dest.route.transport in ("local", "virtual"):  # agents on worker threads, no connection
            await local_worker(q, dest)
        else:
            await smtp_worker(q, dest)


async def smtp_worker(q: Qmgr, dest: Destination) -> None:
    conn: Connection | None = None
    opened = 0.0
    busy = False
    try:
        while True:
            if busy:
                dest.busy, busy = dest.busy - 1, False
            # Postfix's connection cache: an open connection waits a little for the
            # next message to the same destination instead of hanging up at once
            # (not while other destinations wait for a delivery agent's slot: an idle
            # cached connection must not hold one of default_process_limit's slots)
            linger = q.config.smtp_connection_cache_time_limit \
                if conn is not None and conn.usable and not q.agents.statistics().tasks_waiting else 0
            job = await dest.next_job(linger)
            if job is None:
                break
            dest.busy, busy = dest.busy + 1, True
            if conn is not None and (not conn.usable or trio.current_time() - opened
                                     > q.config.smtp_connection_reuse_time_limit):
                await conn.close()
                conn = None
            if conn is None:
                started = time.time()
                opened = trio.current_time()
                try:
                    conn = await q.connector.open(dest.route)
                except ConnectionFailed as exc:
                    failed = [job, *dest.jobs]
                    dest.jobs.clear()
                    for each in failed:
                        await q.complete(each, [exc.outcome] * len(each.recipients), "none", started)
                    break
                except Exception as exc:  # the job's boundary (the others may find a way)
                    await q.complete(job, q.job_failed(job, exc), "none", started)
                    continue
            started = time.time()
            envelope = Envelope(
                sender=masquerade_address(q, job.message.sender, "envelope_sender"),
                recipients=[masquerade_address(q, r.address, "envelope_recipient") for r in job.recipients],
                size=job.message.size,
                eight_bit=str(job.message.params.get("BODY", "")).upper() == "8BITMIME",
                smtputf8="SMTPUTF8" in job.message.params,
            )
            message_id, held, size = job.message.id, job.message.content, job.message.size

            async def content() -> AsyncIterator[bytes]:
                if held is not None:
                    yield masquerade_headers(held, q.masq_domains, q.masq_exceptions, q.masq_classes)
                    return
                offset = 0
                while offset < size:
                    chunk = await q.writer.read(transitions.read_chunk, message_id, offset,
                                                   min(CONTENT_CHUNK, size - offset))
                    if not chunk:
                        # raised before the end of data is sent: the peer never gets a
                        # truncated message, and the connection is dropped
                        raise ContentError(f"content ends at {offset} of {size} bytes")
                    first = offset == 0
                    offset += len(chunk)
                    if first:  # the header section is in the first chunk (header_size_limit)
                        chunk = masquerade_headers(chunk, q.masq_domains, q.masq_exceptions,
                                                   q.masq_classes)
                    yield chunk

            try:
                outcomes = await conn.deliver(envelope, content)
            except Exception as exc:  # the job's boundary: this job is deferred, the worker goes on
                conn.usable = False  # possibly inside DATA: never reuse, never end the message
                outcomes = q.job_failed(job, exc)
            await q.complete(job, outcomes, conn.relay, started)
    finally:
        if busy:
            dest.busy -= 1
        dest.workers -= 1
        if q.metrics is not None:
            q.metrics.destinations.labels(str(dest.route)).dec()
        if conn is not None:
            await conn.close()
        if not dest.jobs and dest.workers == 0 and q.destinations.get(dest.key) is dest:
            del q.destinations[dest.key]


async def local_worker(q: Qmgr, dest: Destination) -> None:
    dest.busy += 1  # a local worker takes jobs only while there are some
    try:
        while dest.jobs:
            job = dest.jobs.popleft()
            started = time.time()
            try:
                outcomes = await deliver_local(q, job)
            except Exception as exc:  # the job's boundary: defer its recipients, keep the message
                outcomes = q.job_failed(job, exc)
            await q.complete(job, outcomes, job.route.transport, started)
    finally:
        dest.busy -= 1
        dest.workers -= 1
        if q.metrics is not None:
            q.metrics.destinations.labels(str(dest.route)).dec()
        if not dest.jobs and dest.workers == 0 and q.destinations.get(dest.key) is dest:
            del q.destinations[dest.key]


async def deliver_local(q: Qmgr, job: Job) -> list[Outcome]:
    content = job.message.content
    if content is None:
        content = await q.writer.read(transitions.read_content, job.message.id)
        if content is None or len(content) != job.message.size:
            raise ContentError(f"content {'missing' if content is None else len(content)} "
                               f"of {job.message.size} bytes")
    if job.route.transport == "virtual":  # virtual(8): mailboxes only, nothing to forward
        return await trio.to_thread.run_sync(
            q.virtual.deliver, job.message.sender, [r.address for r in job.recipients], content,
            limiter=agent_threads())
    result = await trio.to_thread.run_sync(
        q.local.deliver, job.message.sender, [r.address for r in job.recipients], content,
        limiter=agent_threads())
    for forward in result.forwards:
        with trio.CancelScope(shield=True):
            new_id = await q.writer.run(queue_forward, forward, content, durable=False)
        q.wake()  # the forwarded copy waits in incoming for a round
        log.info("%s: forwarded as %s to %s", job.message.id, new_id,
                 ", ".join(f"<{r}>" for r in forward.recipients))
    return result.outcomes


def queue_forward(store: Store, forward: Forward, content: bytes) -> str:
    spool = Spool()
    for address in forward.delivered_to:
        spool.write(f"Delivered-To: {address}\r\n".encode())
    spool.write(content)
    new_id = new_queue_id()
    store.insert_message(NewMessage(new_id, forward.sender, forward.recipients, spool, protocol="local"))
    return new_id


def masquerade_address(q: Qmgr, address: str, kind: str) -> str:
    """Masquerading applies to mail leaving the host, for the configured classes."""
    if kind not in q.masq_classes:
        return address
    return masquerade(address, q.masq_domains, q.masq_exceptions)
