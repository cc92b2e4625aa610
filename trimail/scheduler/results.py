"""Delivery results (Postfix's qmgr_defer, qmgr_bounce, bounce(8)): outcome ->
recipient record, retry time, expiry, logging, DSNs and delay warnings.

Every outcome is committed as soon as it is known (so a crash repeats at most the
deliveries in flight: at least once, never lost).  When all jobs of a message are
done the message is deferred (next attempt: the earliest of its recipients') or
removed, and recipients that bounced this round get one RFC 3464 notification,
queued in the same transaction; so do the recipients that asked NOTIFY=SUCCESS and
were delivered or relayed to a server without DSN (one success notice: each such
``sent`` record says it is owed one, and the round's last job queues it, as
Postfix's qmgr flushes a message's trace; one notice per job made a message to
1,000 local users 1,000 notices).  RFC 3461's NOTIFY decides who is in a bounce or delay warning,
ENVID and ORCPT what it says back (``delivery.notify``, ``delivery.bounce``).  Temporary failures past
``maximal_queue_lifetime`` (``bounce_queue_lifetime`` for bounces) bounce; a
message deferred longer than ``delay_warning_time`` gets one delay notification.

Parameters: minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime,
bounce_queue_lifetime, delay_warning_time, bounce_size_limit, myhostname.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio

from trimail.config import Config
from trimail.delivery import notify
from trimail.delivery.bounce import (
    Failure,
    dsn_parts,
    failure_of,
    header_lines,
    reported,
    returns_full,
)
from trimail.delivery.local.agent import ORIG_TO_PARAM, Expanded
from trimail.delivery.outcome import REPLY_TEXT_LIMIT, Outcome, Relayed
from trimail.log import printable, write_waiting
from trimail.metrics import Metrics
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import ClaimedMessage, RecipientResult
from trimail.queue.writer import QueueWriter
from trimail.scheduler.backoff import retry_delay
from trimail.scheduler.destination import Job
from trimail.supervise import retry_with_backoff

log = logging.getLogger("trimail.qmgr")
smtp_log = logging.getLogger("trimail.smtp")
# the delivery agents' names in the log, as Postfix's (postfix/local, postfix/virtual)
AGENT_LOGS = {"local": logging.getLogger("trimail.local"), "virtual": logging.getLogger("trimail.virtual")}
bounce_log = logging.getLogger("trimail.bounce")



_OWED = {"relayed": 2, "delivered": 3, "expanded": 4}  # recipient.notified of a sent one owed a notice
_ACTIONS = {code: action for action, code in _OWED.items()}


def _owed_notice(params: dict[str, str | None], address: str, reply: str, code: int) -> Failure:
    """The success notice's Failure of a recipient recorded as owed one: its reply is
    ``"DSN delivery via RELAY: TEXT"`` (``Results._notice``'s text)."""
    action = _ACTIONS.get(code, "delivered")
    dsn, _, text = reply.partition(" ")
    relay, _, said = text.removeprefix("delivery via ").partition(": ")
    if action == "relayed":
        return Failure(address, dsn, f"smtp; {said}", remote_mta=relay.partition("[")[0], action=action, text=text,
                       orcpt=_orcpt(params, address))
    return Failure(address, dsn, f"X-Trimail; {said}", action=action, text=text, orcpt=_orcpt(params, address))


def _orcpt(params: dict[str, str | None], address: str) -> str:
    """The recipient's ORCPT for its Original-Recipient field ("" = none given)."""
    orcpt = notify.orcpt_of(params, address)
    return f"{orcpt[0]};{orcpt[1]}" if orcpt else ""


def log_seconds(seconds: float) -> str:
    """Postfix's delay notation: 0.01 resolution below 10 s, no exponent, no trailing zeros."""
    seconds = max(0.0, seconds)
    text = f"{seconds:.0f}" if seconds >= 100 else f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _log_delivery(logger: logging.Logger, queue_id: str, to: str, orig_to: str, relay: str, delay: str,
                  delays: str, dsn: str, status: str, text: str) -> None:
    """Postfix's log_adhoc line; ``orig_to=`` only when it differs from ``to=``."""
    orig = f", orig_to=<{orig_to}>" if orig_to and orig_to.lower() != to.lower() else ""
    logger.info("%s: to=<%s>%s, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
                queue_id, to, orig, relay, delay, delays, dsn, status, text)


class Results:
    """Judges and records the outcomes of the queue manager's jobs."""

    def __init__(self, config: Config, writer: QueueWriter) -> None:
        self.writer = writer
        self.metrics: Metrics | None = None
        # told each recipient's outcome: (queue id, recipient, status, dsn, text, relay); trimail.testing's
        self.observer: Callable[[str, str, str, str, str, str], None] | None = None
        self.queued = 0  # notifications queued (bounces, delay warnings): each needs a round
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.hostname: str = config.myhostname
        self.min_backoff: float = config.minimal_backoff_time
        self.max_backoff: float = config.maximal_backoff_time
        self.lifetime: float = config.maximal_queue_lifetime
        self.bounce_lifetime: float = config.bounce_queue_lifetime
        self.delay_warning: float = config.delay_warning_time
        self.bounce_size_limit: int = config.bounce_size_limit

    def judge(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> list[RecipientResult]:
        """The recipients' results of one job: a temporary failure past the queue
        lifetime bounces, the others get their next attempt (exponential backoff); each
        is logged as Postfix logs it and counted."""
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
            notice = self._notice(job, recipient.address, outcome, relay, reply_text)
            results.append(RecipientResult(recipient.seq, status, f"{outcome.dsn} {notice.text if notice else text}",
                                           next_attempt, _OWED[notice.action] if notice else 0))
            delay = log_seconds(now - message.arrival_time)
            delays = "/".join(map(log_seconds, (message.active_time - message.arrival_time,
                                                started - message.active_time, 0.0, now - started)))
            shown = "expired, returned to sender" if status == "bounced" and expired and outcome.status == "deferred" \
                else status
            if self.metrics is not None:
                self.metrics.outcome(status, outcome.dsn, job.route.transport, message.arrival_time)
            if self.observer is not None:
                self.observer(message.id, recipient.address, status, outcome.dsn, text, relay)
            agent_log = AGENT_LOGS.get(job.route.transport, smtp_log)
            orig_to = message.params.get(ORIG_TO_PARAM) or ""  # a forwarded copy: the alias it was sent for
            if isinstance(outcome, Expanded) and outcome.lines and shown == outcome.status:
                # local(8): one line per final recipient of the aliases, orig_to= the queued one
                for to, line in outcome.lines:
                    _log_delivery(agent_log, message.id, to, orig_to or recipient.address, relay, delay, delays,
                                  line.dsn, line.status, printable(line.text, REPLY_TEXT_LIMIT))
            else:
                _log_delivery(agent_log, message.id, recipient.address, orig_to, relay, delay, delays,
                              outcome.dsn, shown, reply_text)
        return results

    @staticmethod
    def _notice(job: Job, address: str, outcome: Outcome, relay: str, text: str) -> Failure | None:
        """The success notice a delivery calls for (RFC 3461 NOTIFY=SUCCESS, as Postfix
        sends them): a final delivery by local(8) or virtual(8) is ``delivered`` (an
        alias that forwarded a copy ``expanded``), a relay to a server without DSN
        ``relayed``; a server that offers DSN got the NOTIFY and answers it itself."""
        params = job.message.params
        if outcome.status != "sent" or job.message.sender == "" or not notify.per_recipient(params) \
                or not notify.wants(params, address, "SUCCESS"):  # mail without NOTIFY: no look at the JSON
            return None
        if isinstance(outcome, Relayed):
            return Failure(address, outcome.dsn, f"smtp; {text}", remote_mta=relay.partition("[")[0],
                           action="relayed", text=f"delivery via {relay}: {text}",
                           orcpt=_orcpt(job.message.params, address))
        if job.route.transport not in AGENT_LOGS:
            return None
        forwarded = isinstance(outcome, Expanded) and any(o.text.startswith("forwarded as ")
                                                          for _, o in outcome.lines)
        return Failure(address, outcome.dsn, f"X-Trimail; {text}", action="expanded" if forwarded else "delivered",
                       text=f"delivery via {job.route.transport}: {text}", orcpt=_orcpt(job.message.params, address))

    async def commit(self, message: ClaimedMessage, results: list[RecipientResult], last: bool,
                     corrupt: bool) -> transitions.Finished:
        """Commit a job's outcomes; when the queue cannot be written (disk full, locked
        by another process, I/O error) keep them and try again with back-off.  The
        message stays ``active`` meanwhile, so a crash is still covered: the next
        start returns it to ``incoming`` and it is delivered again, never lost.
        The lines about the outcomes are written first when the log is a file (as
        Postfix's delivery agent logs before its queue manager updates the queue
        file): a ``kill -9`` right after the commit loses no ``status=`` line of
        a delivery the queue already records."""
        async def record_once() -> transitions.Finished:
            write_waiting()
            with trio.CancelScope(shield=True):  # a commit that has begun is waited for
                return await self.writer.run(self._record, message, results, last, corrupt, durable=False)

        try:
            return await retry_with_backoff(f"{message.id}: recording delivery status", record_once,
                                            metrics=self.metrics, initial=0.5, maximum=30.0, logger=log,
                                            label="qmgr: recording delivery status")
        except trio.Cancelled:
            log.warning("%s: delivery status not recorded before stop: the message stays queued", message.id)
            raise

    def _record(self, store: Store, message: ClaimedMessage, results: list[RecipientResult],
                last: bool, corrupt: bool = False) -> transitions.Finished:
        """Writer-thread work: record outcomes; after the last job, finish the message
        and queue a bounce for the recipients that failed this round (or, when its
        content could not be read whole, move it to the corrupt queue)."""
        if results:
            transitions.record(store, message.id, results)  # a success notice owed is kept with its recipient
        if not last:
            return transitions.Finished(False, None, [])
        if corrupt:
            transitions.quarantine(store, message.id)
            return transitions.Finished(False, None, [])
        if owed := transitions.owed_notices(store, message.id):  # one notice for the round, as Postfix's
            notice_id = self._queue_dsn(store, message, [], delayed=False,
                                        notices=[_owed_notice(message.params, *row) for row in owed])
            bounce_log.info("%s: sender delivery status notification: %s", message.id, notice_id)
        return transitions.finish(store, message.id,
                                 notify=lambda bounced: self._queue_bounce(store, message, bounced),
                                 warn=lambda waiting: self._queue_delay_warning(store, message, waiting))

    def _queue_bounce(self, store: Store, message: ClaimedMessage, bounced_rcpts: list[tuple[str, str]]) -> None:
        if message.sender == "":
            bounce_log.info("%s: not sending a notification about a bounce (null sender): %s", message.id,
                            ", ".join(f"<{a}>" for a, _ in bounced_rcpts))
            return
        if not (bounced_rcpts := reported(message.params, bounced_rcpts)):  # NOTIFY without FAILURE, BCC copies
            return
        bounce_id = self._queue_dsn(store, message, bounced_rcpts, delayed=False)
        bounce_log.info("%s: sender non-delivery notification: %s", message.id, bounce_id)

    def _queue_delay_warning(self, store: Store, message: ClaimedMessage, waiting: list[tuple[str, str]]) -> bool:
        if not self.delay_warning or message.sender == "" or time.time() - message.arrival_time < self.delay_warning:
            return False
        if not (waiting := reported(message.params, waiting, "DELAY")):  # NOTIFY without DELAY, BCC copies
            return False
        warning_id = self._queue_dsn(store, message, waiting, delayed=True)
        bounce_log.info("%s: sender delay notification: %s", message.id, warning_id)
        return True

    def _queue_dsn(self, store: Store, message: ClaimedMessage, rcpts: list[tuple[str, str]], *,
                   delayed: bool, notices: list[Failure] | None = None) -> str:
        params = message.params
        failures = notices or [dataclasses.replace(failure_of(address, reply), orcpt=_orcpt(params, address))
                               for address, reply in rcpts]
        smtputf8 = "SMTPUTF8" in params  # RFC 6533: a utf-8 DSN, itself sent with SMTPUTF8
        full = not notices and returns_full(size=message.size, ret=params.get("RET"), delayed=delayed,
                                            limit=self.bounce_size_limit)
        head, tail = dsn_parts(hostname=self.hostname, queue_id=message.id, sender=message.sender,
                               arrival_time=message.arrival_time, failures=failures, full=full, delayed=delayed,
                               smtputf8=smtputf8, envid=notify.envid_of(params), success=bool(notices))
        spool = Spool()
        spool.write(head)
        if full:  # the whole original, in chunks (bounce_size_limit = 0 returns any size)
            offset, last = 0, b""
            while chunk := transitions.read_chunk(store, message.id, offset, 1 << 20):
                spool.write(chunk)
                offset, last = offset + len(chunk), chunk
            if last and not last.endswith(b"\r\n"):
                spool.write(b"\r\n")
        else:
            spool.write(header_lines(transitions.read_headers(store, message.id)))
        spool.write(tail)
        eight_bit = str(params.get("BODY", "")).upper() == "8BITMIME"
        params: dict[str, str | None] = {"SMTPUTF8": None, "BODY": "8BITMIME"} if smtputf8 else \
            {"BODY": "8BITMIME"} if full and eight_bit else {}
        dsn_id = new_queue_id()
        store.insert_message(NewMessage(dsn_id, "", [message.sender], spool, protocol="bounce", params=params))
        self.queued += 1  # (on the writer thread; read after the request's commit)
        return dsn_id
