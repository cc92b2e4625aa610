"""Destinations (Postfix's qmgr queues): the jobs waiting for one (transport,
nexthop), the worker tasks that deliver them, their concurrency window, and the
connection cache.

A destination has up to its window of worker tasks in the delivery nursery
(``start_workers``).  The window (``feedback.Window``) starts at
``<transport>_initial_destination_concurrency`` and moves by feedback between 1
and ``<transport>_destination_concurrency_limit``: up when a connection gets its
greeting and EHLO reply (and per delivery once no attempt has failed for
``feedback.QUIET``), down when a connection attempt fails; it bounds new
connections (a connection that is up keeps delivering).  Each worker holds one of
``default_process_limit``'s slots (``slots.AgentSlots``, round-robin over
destinations) and gives it up after a job once its turn is over while a
destination holding none waits.  A worker connects first and then takes jobs (so
a failed attempt never holds one); it keeps its connection for as many jobs as
the destination has, and lingers ``smtp_connection_cache_time_limit`` for the
next one (not while a destination holding no slot waits: an idle cached
connection must not keep one from it).  A destination's jobs wait in a ``JobQueue``: new
mail and retries in turn, so a retry storm never queues new mail behind
thousands of retries.

A failed connection attempt while another connection to the destination is up or
being made lowers the window and ends that worker: the queued jobs stay for the
connections that work (a site answering ``421`` beyond N sessions gets its mail
over N sessions, none of it deferred).  With nothing up, the attempt's job is
deferred (Postfix defers the delivery the attempt was for) and the worker tries
again for the next one, until a whole failed cohort
(``<transport>_destination_concurrency_failed_cohort_limit``) makes the
destination dead: every job queued for it is deferred with ``delivery temporarily
suspended: <reason>``, and ``dead.DeadSites`` defers new jobs for it at once for
``minimal_backoff_time`` (then one probing connection, a window of 1).

Local and virtual deliveries run on a pool of 20 threads of their own (a slow
command, a locked mbox or a busy root helper never takes the threads the queue
needs); they have no window feedback (their limit is the window).

Parameters: <transport>_destination_concurrency_limit,
initial_destination_concurrency, default_destination_concurrency_{positive,negative}_feedback,
default_destination_concurrency_failed_cohort_limit (and their smtp_/relay_ forms),
minimal_backoff_time, smtp_connection_cache_time_limit, smtp_connection_reuse_time_limit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

import trio

from trimail.cleanup import RWR_PARAM
from trimail.config import Config
from trimail.delivery import attempt
from trimail.delivery.connector import ConnectionFailed, Connector
from trimail.delivery.local.agent import ORIG_TO_PARAM, Expanded, Forward, LocalAgent
from trimail.delivery.outcome import Outcome, sent
from trimail.delivery.route import Route
from trimail.delivery.smtp import Connection
from trimail.delivery.virtual import VirtualAgent
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler import transfer
from trimail.scheduler.dead import DeadSite, DeadSites, suspended  # noqa: F401 (DeadSite: re-exported)
from trimail.scheduler.feedback import Window, WindowSettings
from trimail.scheduler.jobqueue import JobQueue
from trimail.scheduler.slots import AgentSlots
from trimail.scheduler.transfer import ContentError, content_of, envelope_of
from trimail.supervise import contained, thread_pool

log = logging.getLogger("trimail.qmgr")

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


@dataclasses.dataclass(slots=True)
class Destination:
    route: Route
    limit: int  # <transport>_destination_concurrency_limit: the window's ceiling
    key: tuple  # its key in the queue manager's destinations (destination_key)
    jobs: JobQueue = dataclasses.field(default_factory=JobQueue)
    workers: int = 0
    busy: int = 0  # workers with a job in hand (the others can take the next one)
    arrived: trio.Event = dataclasses.field(default_factory=trio.Event)  # set (and replaced) per new job
    window: Window | None = None  # concurrency feedback (set by start_workers; None: the limit)
    connecting: int = 0  # connection attempts in progress
    connected: int = 0  # connections up
    nursery: trio.Nursery | None = None  # where its workers run (the queue manager's delivery nursery)

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        self.announce()

    @property
    def concurrency(self) -> int:
        """How many workers it may have now: its window (its limit without feedback)."""
        return self.window.size if self.window is not None else self.limit

    def wants_worker(self) -> bool:
        """A new worker when the jobs outnumber the workers free to take them (busy
        workers are not), up to the destination's concurrency window."""
        return self.workers < self.concurrency and len(self.jobs) > self.workers - self.busy

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
    agents: AgentSlots  # default_process_limit: delivery agents at once, round-robin over destinations
    masq_domains: list[str]
    masq_exceptions: list[str]
    masq_classes: list[str]
    header_rewriters: dict[str | None, Callable[[bytes], bytes]]

    def wake(self) -> None: ...

    async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None: ...

    def job_failed(self, job: Job, exc: Exception) -> list[Outcome]: ...

def start_workers(q: Qmgr, dest: Destination, nursery: trio.Nursery) -> None:
    """Start the workers *dest* wants (``Destination.wants_worker``) in *nursery*.
    The first call sets up its window: a destination that was dead until a
    moment ago starts with a window of 1 (one probing connection)."""
    if dest.nursery is None:
        dest.nursery = nursery
        if dest.route.transport not in ("local", "virtual"):
            settings = WindowSettings.from_config(q.config, dest.route.transport, dest.limit)
            key, now = dest.key, time.time()
            dest.window = q.dead.window(key, now) or Window(settings, probing=q.dead.revived(key, now))
            dest.window.settings = settings  # (a reload may have changed them)
            dest.window.size = min(dest.window.size, settings.limit)
    while dest.wants_worker():
        dest.workers += 1
        if q.metrics is not None:
            q.metrics.destinations.labels(str(dest.route)).inc()
        nursery.start_soon(_supervised_worker, q, dest)


async def _supervised_worker(q: Qmgr, dest: Destination) -> None:
    """The last boundary of a worker: a bug in one is logged and counted, never the
    end of the queue manager (its messages stay active and are delivered again
    after the next start)."""
    with contained(f"qmgr: delivery worker for {dest.route}", q.metrics, logger=log):
        await run_worker(q, dest)


async def run_worker(q: Qmgr, dest: Destination) -> None:
    """One worker of *dest*: takes its jobs until none is left (and, for SMTP, none
    comes within the connection cache time)."""
    key = dest.key
    await q.agents.acquire(key)  # a delivery agent's slot (default_process_limit), held while it works
    try:
        if dest.route.transport in ("local", "virtual"):  # agents on worker threads, no connection
            await local_worker(q, dest)
        else:
            await smtp_worker(q, dest)
    finally:
        q.agents.release(key)


async def smtp_worker(q: Qmgr, dest: Destination) -> None:
    held_since = trio.current_time()  # when this worker got its slot
    conn: Connection | None = None
    opened = 0.0
    busy = False
    finished = False  # left the loop normally (not cancelled, not by a bug)
    try:
        while True:
            if busy:
                dest.busy, busy = dest.busy - 1, False
            if conn is not None and (not conn.usable or trio.current_time() - opened
                                     > q.config.smtp_connection_reuse_time_limit):
                dest.connected -= 1
                await conn.close()
                conn = None
            if conn is None and (not dest.jobs or dest.workers > dest.concurrency):
                # nothing to connect for, or the window shrank below its workers: the
                # window bounds new connections (one that is up keeps delivering)
                break
            if conn is None:
                conn, go_on = await connect(q, dest)
                if conn is None:
                    if not go_on:
                        break
                    continue
                opened = trio.current_time()
            # Postfix's connection cache: an open connection waits a little for the
            # next message to the same destination instead of hanging up at once
            # (not while other destinations wait for a delivery agent's slot: an idle
            # cached connection must not hold one of default_process_limit's slots)
            linger = q.config.smtp_connection_cache_time_limit \
                if conn.usable and not q.agents.starving() else 0
            job = await dest.next_job(linger)
            if job is None:
                break
            dest.busy, busy = dest.busy + 1, True
            await deliver_job(q, dest, conn, job)
            if q.agents.should_yield(dest.key, held_since):
                break  # its turn is over and a destination without a slot waits (slots.py)
        finished = True
    finally:
        if busy:
            dest.busy -= 1
        dest.workers -= 1
        if q.metrics is not None:
            q.metrics.destinations.labels(str(dest.route)).dec()
        if conn is not None:
            dest.connected -= 1
            await conn.close()
        if finished and dest.jobs and dest.workers == 0 and dest.nursery is not None:
            start_workers(q, dest, dest.nursery)  # jobs that came while the last worker was leaving
        if not dest.jobs and dest.workers == 0 and q.destinations.get(dest.key) is dest:
            del q.destinations[dest.key]
            now = time.time()
            if dest.window is not None and dest.window.fail_cohorts > 0 and q.dead.refusal(dest.key, now) is None:
                # failures not yet forgiven: the next job for it goes on counting
                q.dead.keep(dest.key, dest.window, now + q.config.minimal_backoff_time)


async def connect(q: Qmgr, dest: Destination) -> tuple[Connection | None, bool]:
    """A connection for *dest*, with the window's feedback; without one, whether
    the worker should go on (try again for the next job) or end."""
    started = time.time()
    failure: Outcome | None = None
    error: Exception | None = None
    dest.connecting += 1
    try:
        conn = await q.connector.open(dest.route)
    except ConnectionFailed as exc:
        conn, failure = None, exc.outcome
    except Exception as exc:  # a bug: one job takes the blame (so this cannot loop)
        conn, error = None, exc
    finally:
        dest.connecting -= 1
    if conn is not None:
        dest.connected += 1
        if dest.window is not None:
            dest.window.succeeded(dest.workers)
            if dest.nursery is not None:
                start_workers(q, dest, dest.nursery)  # a larger window: more workers for the backlog
        return conn, True
    if failure is not None:
        return None, await connection_failed(q, dest, failure, started)
    if dest.jobs:
        job = dest.jobs.popleft()
        await q.complete(job, q.job_failed(job, error or Exception("no connection")), "none", started)
    return None, True


async def connection_failed(q: Qmgr, dest: Destination, outcome: Outcome, started: float) -> bool:
    """A connection attempt failed: feedback, and what becomes of the queued jobs.
    Returns whether the worker goes on."""
    up = dest.connected > 0 or dest.connecting > 0  # connections that work (or may) carry the jobs
    if outcome.status != "deferred" or dest.window is None:
        # no such domain, a mail loop (the same for every job queued), or no feedback
        if not up:
            await fail_queued(q, dest, outcome, outcome, started)
        return False
    cohort_failed = dest.window.failed(trio.current_time())
    if up:
        return False
    if cohort_failed:  # Postfix's throttled queue: dead for minimal_backoff_time
        q.dead.mark(dest.key, str(dest.route), outcome, time.time(),
                    q.config.minimal_backoff_time)
        await fail_queued(q, dest, outcome, suspended(outcome), started)
        return False
    if dest.jobs:  # the delivery this attempt was for is deferred; the next job gets an attempt of its own
        job = dest.jobs.popleft()
        await q.complete(job, [outcome] * len(job.recipients), "none", started)
    return True


async def fail_queued(q: Qmgr, dest: Destination, first: Outcome, rest: Outcome, started: float) -> None:
    """Complete every job queued for *dest*: the first with *first* (the attempt's
    own failure), the others with *rest*, without a connection each."""
    failed = list(dest.jobs)
    dest.jobs.clear()
    for i, job in enumerate(failed):
        await q.complete(job, [first if i == 0 else rest] * len(job.recipients), "none", started)


async def deliver_job(q: Qmgr, dest: Destination, conn: Connection, job: Job) -> None:
    """One job over an established connection; its outcomes are recorded."""
    started = time.time()
    try:  # soft failures go on to the next mail host within the attempt (smtp_mx_session_limit)
        outcomes, relay = await attempt.deliver(q.connector, conn, dest.route, envelope_of(q, job),
                                                content_of(q, job), job.message.id)
    except Exception as exc:  # the job's boundary: this job is deferred, the worker goes on
        conn.usable = False  # possibly inside DATA: never reuse, never end the message
        outcomes, relay = q.job_failed(job, exc), conn.relay
    if conn.usable and dest.window is not None:
        before = dest.window.size
        dest.window.delivered(dest.workers, trio.current_time())
        if dest.window.size > before and dest.nursery is not None:
            start_workers(q, dest, dest.nursery)  # a larger window: more workers for the backlog
    await q.complete(job, outcomes, relay, started)


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
    # what Postfix's cleanup did before queueing (masquerading, header rewriting in the
    # message's rewrite context) is what local mailboxes see too, as the SMTP agent sends it
    content = transfer.local_content(q, job, content)
    sender = transfer.masquerade_address(q, job.message.sender, "envelope_sender")
    if job.route.transport == "virtual":  # virtual(8): mailboxes only, nothing to forward
        return await trio.to_thread.run_sync(
            q.virtual.deliver, sender, [r.address for r in job.recipients], content,
            limiter=agent_threads())
    result = await trio.to_thread.run_sync(
        q.local.deliver, sender, [r.address for r in job.recipients], content,
        limiter=agent_threads())
    outcomes = result.outcomes
    for forward in result.forwards:
        # the original recipient travels with the copy (Postfix's ORCP record): a copy of a
        # copy keeps the first one, list mail (owner-<alias>) starts afresh
        orig_to = "" if forward.list_mail else job.message.params.get(ORIG_TO_PARAM) or forward.orig_to
        with trio.CancelScope(shield=True):
            new_id = await q.writer.run(queue_forward, forward, content, orig_to,
                                        job.message.params.get(RWR_PARAM), durable=False)
        q.wake()  # the forwarded copy waits in incoming for a round
        outcome = outcomes[forward.index]  # Postfix's local(8): "to=<alias>, ... (forwarded as ID)"
        lines = outcome.lines if isinstance(outcome, Expanded) else ()
        outcomes[forward.index] = Expanded(outcome.status, outcome.dsn, outcome.text,
                                           (*lines, (forward.orig_to, sent(f"forwarded as {new_id}"))))
    return outcomes


def queue_forward(store: Store, forward: Forward, content: bytes, orig_to: str = "",
                  context: str | None = None) -> str:
    """The new message an alias makes for its remote targets: it carries the original
    recipient (*orig_to*) and keeps the rewrite *context* of the message it came from
    (Postfix's local(8) forward passes both on)."""
    spool = Spool()
    for address in forward.delivered_to:
        spool.write(f"Delivered-To: {address}\r\n".encode())
    spool.write(content)
    new_id = new_queue_id()
    params: dict[str, str | None] = {ORIG_TO_PARAM: orig_to} if orig_to else {}
    if context:
        params[RWR_PARAM] = context
    store.insert_message(NewMessage(new_id, forward.sender, forward.recipients, spool, protocol="local",
                                    params=params))
    return new_id
