"""The worker tasks of a destination: started up to its concurrency window, each
holding a delivery agent's slot, SMTP workers keeping a connection for job after job.

A destination has up to its window of worker tasks in the delivery nursery
(``start_workers``).  The window (``feedback.Window``) starts at
``<transport>_initial_destination_concurrency`` and moves by feedback between 1
and ``<transport>_destination_concurrency_limit``: up when a connection gets its
greeting and EHLO reply (and per delivery once no attempt has failed for
``feedback.QUIET``), down when a connection attempt fails; it bounds new
connections (a connection that is up keeps delivering).  Each worker holds one of
``default_process_limit``'s slots (``slots.AgentSlots``, round-robin over
destinations) while it connects and delivers, and gives it up after a job once its
turn is over while a destination holding none waits.  An SMTP worker makes its
connection's DNS lookups (the MX hosts and the addresses of the best that have
any: ``Connector.lookup``) before it takes its slot (``Slot``), and gives the slot
up when it must look up again for a new connection: a destination whose DNS does
not answer waits for it bounded by dns_concurrency_limit alone, and holds no slot
from the others (red team 39's lead: one message to 1,000 names of a silent zone
held every slot for minutes).  A worker connects first and then takes jobs (so
a failed attempt never holds one); it keeps its connection for as many jobs as
the destination has, and lingers ``smtp_connection_cache_time_limit`` for the
next one (not while a destination holding no slot waits: an idle cached
connection must not keep one from it).

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

Local and virtual destinations have workers without a connection
(``local.local_worker``) and no window feedback (their limit is the window).

Parameters: <transport>_destination_concurrency_limit,
initial_destination_concurrency, default_destination_concurrency_{positive,negative}_feedback,
default_destination_concurrency_failed_cohort_limit (and their smtp_/relay_ forms),
minimal_backoff_time, smtp_connection_cache_time_limit, smtp_connection_reuse_time_limit.
"""

from __future__ import annotations

import logging
import time

import trio

from trimail.delivery import attempt
from trimail.delivery.connector import ConnectionFailed
from trimail.delivery.outcome import Outcome
from trimail.delivery.smtp import Connection
from trimail.scheduler.dead import suspended
from trimail.scheduler.destination import Destination, Job, Qmgr
from trimail.scheduler.feedback import Window, WindowSettings
from trimail.scheduler.local import local_worker
from trimail.scheduler.slots import AgentSlots
from trimail.scheduler.transfer import content_of, envelope_of
from trimail.supervise import contained

log = logging.getLogger("trimail.qmgr")


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
            q.metrics.delivery_worker(str(dest.route), 1)
        nursery.start_soon(_supervised_worker, q, dest)


async def _supervised_worker(q: Qmgr, dest: Destination) -> None:
    """The last boundary of a worker: a bug in one is logged and counted, never the
    end of the queue manager (its messages stay active and are delivered again
    after the next start)."""
    with contained(f"qmgr: delivery worker for {dest.route}", q.metrics, logger=log,
                   label="qmgr: delivery worker"):
        await run_worker(q, dest)


class Slot:
    """A worker's hold on one of ``default_process_limit``'s slots (``slots.AgentSlots``):
    taken (``take``) once its connection's DNS lookups are done, given up when it
    looks up again for a new connection and when it ends, so that a worker
    waiting only on DNS holds none."""

    __slots__ = ("agents", "key", "since")

    def __init__(self, agents: AgentSlots, key: tuple) -> None:
        self.agents, self.key = agents, key
        self.since: float | None = None  # trio time it got the slot; None: holds none

    async def take(self) -> None:
        if self.since is None:
            await self.agents.acquire(self.key)
            self.since = trio.current_time()

    def give_up(self) -> None:
        if self.since is not None:
            self.since = None
            self.agents.release(self.key)

    def turn_over(self) -> bool:
        """It has had its turn while a destination without a slot waits (``should_yield``)."""
        return self.since is not None and self.agents.should_yield(self.key, self.since)


async def run_worker(q: Qmgr, dest: Destination) -> None:
    """One worker of *dest*: takes its jobs until none is left (and, for SMTP, none
    comes within the connection cache time)."""
    slot = Slot(q.agents, dest.key)  # a delivery agent's slot (default_process_limit), held while it works
    try:
        if dest.route.transport in ("local", "virtual"):  # agents on worker threads, no connection
            await slot.take()
            await local_worker(q, dest)
        else:
            await smtp_worker(q, dest, slot)  # (takes it after the DNS lookups of its connection)
    finally:
        slot.give_up()


async def smtp_worker(q: Qmgr, dest: Destination, slot: Slot) -> None:
    conn: Connection | None = None
    opened = 0.0
    reused = False  # conn has carried a transaction
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
                conn, go_on = await connect(q, dest, slot)
                if conn is None:
                    if not go_on:
                        break
                    continue
                opened, reused = trio.current_time(), False
            # Postfix's connection cache: an open connection waits a little for the
            # next message to the same destination instead of hanging up at once
            # (not while other destinations wait for a delivery agent's slot: an idle
            # cached connection must not hold one of default_process_limit's slots)
            linger = q.config.smtp_connection_cache_time_limit \
                if conn.usable and not q.agents.starving() else 0
            job = await dest.next_job(linger)
            if job is None:
                break
            if reused and conn.desynchronized():  # it spoke out of turn: a new connection for the job
                dest.jobs.appendleft(job)
                conn.usable = False
                continue
            dest.busy, busy = dest.busy + 1, True
            await deliver_job(q, dest, conn, job)
            reused = True  # (a new connection is not judged: one that always talks out of turn would loop)
            if slot.turn_over():
                break  # its turn is over and a destination without a slot waits (slots.py)
        finished = True
    finally:
        if busy:
            dest.busy -= 1
        dest.workers -= 1
        if q.metrics is not None:
            q.metrics.delivery_worker(str(dest.route), -1)
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


async def connect(q: Qmgr, dest: Destination, slot: Slot) -> tuple[Connection | None, bool]:
    """A connection for *dest*, with the window's feedback; without one, whether
    the worker should go on (try again for the next job) or end.  The DNS lookups
    come first, without a delivery agent's slot (the worker gives up the one it
    holds): *slot* is taken after them, for the connection attempts and what the
    connection carries, so destinations whose DNS does not answer cannot take
    every slot from those whose does (red team 39's lead: 1,000 names of a silent
    zone held them all for minutes)."""
    started = time.time()
    failure: Outcome | None = None
    error: Exception | None = None
    dest.connecting += 1
    try:
        slot.give_up()
        targets = await q.connector.lookup(dest.route)  # bounded by dns_concurrency_limit, not by the slots
        await slot.take()
        conn = await q.connector.open(dest.route, targets=targets)
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
