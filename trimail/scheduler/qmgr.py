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

Claimed messages are split per recipient by route into jobs and queued on their
destinations, or parked when those hold their share of the active queue
(``scheduler/dispatch.py``, the ``Dispatcher`` base class of ``Scheduler``).
``scheduler/destination.py`` has the destinations, ``scheduler/workers.py`` their
workers and connections (at most ``default_process_limit`` delivering at once,
``scheduler/slots.py``); ``scheduler/results.py`` turns outcomes into records,
retries, bounces and delay warnings.  ``complete()`` records a job's outcomes and
finishes a message after its last job.

New mail takes a shortcut.  When the scheduler has room, a session commits the
message straight into ``active`` and hands it over in memory (with its content,
when small), so accepting and scheduling one message costs one commit, not a
commit plus a claim plus a read; a crash before delivery returns it to
``incoming`` at the next start like any active message.

Local submissions leave maildrop for incoming in each round (Postfix's pickup),
with ``content_filter`` stored in their params on the way, as pickup does.

At a stop (``finish``) nothing more is claimed or begun, and the SMTP deliveries
in progress get ``graceful_timeout`` to end: a message the next hop has taken is then
recorded, not sent again after the next start.

Parameters: qmgr_message_active_limit, qmgr_message_recipient_limit,
default_process_limit, content_filter, masquerade_domains, masquerade_exceptions,
masquerade_classes (plus what dispatch.py, share.py, workers.py and results.py read).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trimail.cleanup import loglines
from trimail.cleanup.rewrite import LOCAL, REMOTE, header_rewriter
from trimail.config import Config
from trimail.delivery.connector import Connector
from trimail.delivery.local.agent import LocalAgent
from trimail.delivery.outcome import Outcome, deferred
from trimail.delivery.route import CHECKS_FILTER_PARAM, FILTER_PARAM, Router
from trimail.delivery.virtual import VirtualAgent
from trimail.errors import StorageError
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.queue.writer import QueueWriter
from trimail.scheduler.dead import DeadSites
from trimail.scheduler.destination import Destination, Job
from trimail.scheduler.dispatch import Dispatcher
from trimail.scheduler.results import Results
from trimail.scheduler.share import ParkingLot, Shares
from trimail.scheduler.slots import AgentSlots
from trimail.scheduler.transfer import ContentError
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


def schedule_round(store: Store, now: float, room: int, recipients: int | None = None, held: int = 0,
                   content_filter: str = "", picked: list[tuple[str, str]] | None = None,
                   ) -> tuple[list[ClaimedMessage], float | None]:
    """One step of a round, in one (non-durable) writer request: a bounded batch of
    maildrop to incoming, then up to min(*room*, ``CLAIM_BATCH``) messages claimed,
    new mail and due retries in turn (stopping once they have *recipients*
    recipients); and when the next deferred message is due (in the past while due
    retries wait for room).  The content of small claimed messages is loaded too,
    up to *held* bytes in all, so their delivery needs no read of its own (a
    thread hop per message that cost the event loop a sixth of its time in a
    retry storm).  *picked* gets the log lines that messages from root's sendmail
    kept for their pickup (``promote_maildrop``'s *logs*)."""
    transitions.promote_maildrop(store, param=(FILTER_PARAM, content_filter),  # pickup's content_filter
                                 override=CHECKS_FILTER_PARAM, logs=picked)  # unless header_checks said FILTER
    claimed = transitions.claim(store, min(room, transitions.CLAIM_BATCH), now, recipients)
    for message in claimed:
        if may_hold(message.size, held):
            message.content = store.read_content(message.id)
            held -= message.size
    return claimed, transitions.next_due(store)


class HeaderRewriters(dict[tuple[str | None, bool], Callable[[bytes], bytes]]):
    """(rewrite context, mapped) -> cleanup's header rewriter for it, made when first
    asked for: most configurations use one or two of the six."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    def __missing__(self, key: tuple[str | None, bool]) -> Callable[[bytes], bytes]:
        context, mapped = key
        if context not in (LOCAL, REMOTE, None):
            raise KeyError(key)
        config = self.config
        if not mapped and config.masquerade_domains:
            config = config.with_overrides({"masquerade_domains": ""})
        rewriter = self[key] = header_rewriter(config, context)
        return rewriter


class Scheduler(Dispatcher):
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
        self.closing = False  # serve is stopping: nothing more is claimed or begun (close)
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

    def close(self) -> None:
        """Serve is stopping: no more rounds, hand-overs or deliveries begun; the ones
        in progress go on (``finish``), so a message the next hop has taken is recorded
        as delivered, not sent again after the next start.  Stopping cancelled them
        all: a red team counted 320 of 17,237 messages delivered twice over 8 stops
        under load.  What is still active is returned to incoming at the stop."""
        self.closing = True
        for dest in self.destinations.values():
            dest.close()
        self.wake()

    async def finish(self, grace: float) -> None:
        """``close``, then up to *grace* seconds (graceful_timeout) until every SMTP
        delivery worker has left: its job in hand done, its connection closed with QUIT.
        Only the next hop's reply tells whether it took a message; a local delivery
        (which may wait 20 s for a mailbox lock) is ours to cancel.  Polled: it is
        waited on once, at a stop."""
        self.close()
        remote = [dest for dest in self.destinations.values() if dest.route.transport not in ("local", "virtual")]
        busy = sum(dest.busy for dest in remote)
        if busy:
            log.info("stop: waiting up to %gs for %d deliveries in progress", grace, busy)
        with trio.move_on_after(grace):
            while any(dest.workers for dest in remote):
                await trio.sleep(0.05)

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
        self.content_filter: str = config.content_filter  # pickup's: for local submissions (maildrop)
        self.masq_domains: list[str] = config.masquerade_domains
        self.masq_exceptions: list[str] = config.masquerade_exceptions
        self.masq_classes: list[str] = config.masquerade_classes
        # cleanup's header rewriting per rewrite context (cleanup.rewrite.header_context), each built
        # on first use (context, mapped): with mapped False (no_address_mappings) not masqueraded
        self.header_rewriters = HeaderRewriters(config)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as deliveries:
                self._nursery = deliveries
                task_status.started()
                await self._rounds()
        finally:
            self._nursery = None  # no more hand-overs: new mail stays in incoming

    async def _rounds(self) -> None:
        # at most 10 s between tries: mail already acknowledged waits in incoming for
        # the next try after the cause (a full disk) is gone, and no new mail wakes us
        backoff = Backoff(initial=1.0, maximum=10.0)
        while not self.closing:
            room = self.active_limit - len(self.active) - self._reserved
            if self._recipients >= self.recipient_limit:
                room = 0  # qmgr_message_recipient_limit: a finishing message wakes us
            batch = min(room, transitions.CLAIM_BATCH)
            bound = self.recipient_limit - self._recipients  # (as the round began)
            picked: list[tuple[str, str]] = []
            try:
                claimed, due = await self.writer.run(schedule_round, self.wall_clock(), batch, bound,
                                                     HELD_TOTAL_LIMIT - self._held, self.content_filter,
                                                     picked, durable=False)
            except Exception as exc:  # the round's boundary: disk full, queue locked, I/O error
                report("qmgr round", exc, self.metrics, logger=log)
                await trio.sleep(backoff.next())  # mail waits in incoming; sessions go on
                continue
            backoff.reset()
            for queue_id, lines in picked:  # pickup's and cleanup's lines of root's submissions
                loglines.write_stored(queue_id, lines)
            self._held += sum(len(m.content) for m in claimed if m.content is not None)
            for message in claimed:  # into active, as Postfix's qmgr logs it (a hand-over was logged by smtpd)
                log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", message.id, message.sender,
                         message.size, len(message.recipients))
                self._dispatch_safely(message)
            if not self.active:
                self.idle.set()
            # the claim stopped at the recipients there was room for when the round began;
            # messages that finished meanwhile (waking nobody if the last round was not
            # starved) made more: claim again at once (red team 40: a burst left mail in
            # incoming until new mail came)
            capped = bound > 0 and sum(len(m.recipients) for m in claimed) >= bound
            self._starved = len(claimed) >= room or self._recipients >= self.recipient_limit or capped
            if (capped and self._recipients < self.recipient_limit
                    and len(self.active) + self._reserved < self.active_limit):
                await trio.lowlevel.checkpoint()
                continue
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
        if (self._nursery is None or self.closing or len(self.active) + self._reserved >= self.active_limit
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

    async def _supervised(self, task: str, label: str | None, fn: Callable[..., Awaitable[None]],
                          *args: Any) -> None:
        """The last boundary of a task in the delivery nursery: a bug in one worker is
        logged and counted, never the end of the queue manager (its messages stay
        active in the queue and are delivered again after the next start)."""
        with contained(task, self.metrics, logger=log, label=label):
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
        report(f"{job.message.id}: delivery to {job.route}", exc, self.metrics, logger=log,
               label="qmgr: delivery")
        return [deferred("4.3.0", "mail system temporarily unable to deliver: internal error")] * len(job.recipients)

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
        notified = self.results.queued != queued_before  # a notification (a success notice: any job's)
        if corrupt:
            log.warning("%s: moved to the corrupt queue", message.id)
        if last:
            self._untrack(message)
            if finished.removed:
                log.info("%s: removed", message.id)
            # a new round only when it can find something: a slot freed for waiting
            # mail, a new due time, or a notification this message queued
            if self._starved or not finished.removed or notified:
                self.wake()
        elif notified:
            self.wake()
