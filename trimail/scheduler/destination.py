"""Destinations (Postfix's qmgr queues): the jobs waiting for one (transport,
nexthop), how many workers it may have, and what its workers need of the queue
manager.

A ``Destination`` holds its jobs in a ``JobQueue`` (new mail and retries in turn,
so a retry storm never queues new mail behind thousands of retries), counts its
workers (those busy with a job, the connections up and being made) and has a
concurrency window (``feedback.Window``, set up by ``workers.start_workers``;
without one, its ``<transport>_destination_concurrency_limit`` is the window).  It
wants a new worker when its jobs outnumber the workers free to take them, up to
the window; a new job wakes one idle worker (the one idle the shortest time), never
all of them.  A job is a message's recipients for one destination
(``destination_key``: for local delivery each recipient is a destination of its
own, Postfix's local_destination_recipient_limit = 1).  ``Qmgr`` is what the
workers (``workers.py``, ``local.py``) need of the queue manager
(``qmgr.Scheduler``, or a fake in the tests).

Parameters: <transport>_destination_concurrency_limit (the limit, read by qmgr.py),
smtp_connection_cache_time_limit (how long a worker waits for a job, read by workers.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import trio

from trimail.config import Config
from trimail.delivery.connector import Connector
from trimail.delivery.local.agent import LocalAgent
from trimail.delivery.outcome import Outcome
from trimail.delivery.route import Route
from trimail.delivery.virtual import VirtualAgent
from trimail.metrics import Metrics
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler.dead import DeadSite, DeadSites  # noqa: F401 (DeadSite: re-exported)
from trimail.scheduler.feedback import Window
from trimail.scheduler.jobqueue import JobQueue
from trimail.scheduler.slots import AgentSlots


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
    idle: list[trio.Event] = dataclasses.field(default_factory=list)  # workers waiting for a job, in turn
    window: Window | None = None  # concurrency feedback (set by start_workers; None: the limit)
    connecting: int = 0  # connection attempts in progress
    connected: int = 0  # connections up
    nursery: trio.Nursery | None = None  # where its workers run (the queue manager's delivery nursery)
    closed: bool = False  # serve is stopping: its workers finish the job in hand and take no other

    def close(self) -> None:
        """No more jobs (serve is stopping): the waiting ones stay active in the queue,
        returned to incoming at the stop; idle workers leave now."""
        self.closed = True
        self.jobs.clear()
        while self.idle:
            self.idle.pop().set()

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
        """Wake one worker waiting for a job: the one that became idle last, whose
        connection is the warmest (the others' may expire after their linger).  Waking
        them all made every idle connection's worker wake, find the job taken and wait
        again: 8 task steps per message in the one-session bench, not one."""
        if self.idle:
            self.idle.pop().set()

    async def next_job(self, linger: float) -> Job | None:
        """The next job; with none waiting, wait up to *linger* seconds for one (a
        worker holding an open connection caches it for the next message)."""
        deadline = trio.current_time() + linger
        while not self.jobs and not self.closed and trio.current_time() < deadline:
            woken = trio.Event()
            self.idle.append(woken)
            try:
                with trio.move_on_at(deadline):
                    await woken.wait()
            finally:
                if not woken.is_set():  # its linger is over (or it was cancelled): not idle any more
                    self.idle.remove(woken)
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
    header_rewriters: dict[tuple[str | None, bool], Callable[[bytes], bytes]]  # (context, mapped)

    def wake(self) -> None: ...

    async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None: ...

    def job_failed(self, job: Job, exc: Exception) -> list[Outcome]: ...
