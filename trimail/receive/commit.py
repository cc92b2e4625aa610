"""The end of a transaction: the ``Received:`` header, the header scan (Message-ID,
hop count, header_size_limit), virtual alias expansion, and the commit to the queue
through the group-commit writer -- shielded, because a commit that has begun cannot
be taken back and the client gets its ``250`` only after it -- then the hand-over to
the queue manager (straight into active when it has room) and cleanup's and qmgr's
log lines.

The message's content filter (``content_filter``, or an access-table FILTER) is
stored with it in its params, and so are ``no_address_mappings`` and the DSN
requests (MAIL FROM's RET and ENVID as received, the recipients' NOTIFY and ORCPT:
``trimail.delivery.notify``); a NOTIFY=SUCCESS recipient that virtual_alias_maps
expanded gets its ``expanded`` notice in the same transaction (``cleanup.expanded``).

Parameters: hopcount_limit, header_size_limit, virtual_alias_maps, duplicate_filter_limit, content_filter,
receive_override_options (through ReceiveContext), and trimail/authcheck/inbound.py's
(Authentication-Results, DKIM signing: before the commit).
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from typing import TYPE_CHECKING

from trimail import log as maillog
from trimail.cleanup.expanded import EXPANDED_PARAM, orcpt_text, passed_on
from trimail.cleanup.expanded import insert as insert_expanded
from trimail.cleanup.loglines import header_message_id
from trimail.cleanup.rewrite import NOMAP_PARAM, RWR_PARAM, unique
from trimail.delivery import notify
from trimail.delivery.notify import SILENT_PARAM
from trimail.delivery.route import FILTER_PARAM
from trimail.errors import StorageError
from trimail.maps import TableError
from trimail.queue.store import NewMessage, Store
from trimail.receive.hooks import AcceptedMessage
from trimail.scheduler.trigger import QmgrTrigger
from trimail.smtp import replies
from trimail.smtp.replies import Reply
from trimail.smtp.server import ServerConnection

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession

log = logging.getLogger("trimail.smtpd")
cleanup_log = logging.getLogger("trimail.cleanup")
qmgr_log = logging.getLogger("trimail.qmgr")

HEADER_SCAN_LIMIT = 64 * 1024  # header bytes examined for Message-ID and hop count


def received_header(session: SmtpdSession, conn: ServerConnection) -> bytes:
    assert session.txn is not None
    txn = session.txn
    stamp = rfc5322_date()
    lines = [
        f"Received: from {session.helo_name} ({session.client_name} [{session.client_address}])",
        *([f"\t(using {session.tls})"] if session.tls else []),
        f"\tby {session.ctx.hostname} ({session.ctx.mail_name}) with {txn.protocol} id {txn.queue_id}",
    ]
    if len(txn.recipients) == 1:
        lines.append(f"\tfor <{txn.recipients[0]}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")



def protocol_name(session: SmtpdSession, conn: ServerConnection) -> str:
    """RFC 3848 / 6531 WITH protocol types: ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS, ..."""
    base = "UTF8SMTP" if conn.smtputf8 else ("ESMTP" if session.extended else "SMTP")
    if session.tls:
        base += "S"
    if session.sasl_username and base != "SMTP":
        base += "A"
    return base


def scan_header(session: SmtpdSession, data: bytes) -> None:
    """Keep the header section (bounded) for Message-ID and the hop count."""
    txn = session.txn
    assert txn is not None
    if txn.header_done:
        return
    room = HEADER_SCAN_LIMIT - len(txn.header)
    if room > 0:
        txn.header += data[:room]
    window = txn.header_tail + data
    end = 0 if txn.header_seen == 0 and data.startswith(b"\r\n") else window.find(b"\r\n\r\n")
    if end >= 0:
        size = txn.header_seen - len(txn.header_tail) + end + 2
        cut = txn.header.find(b"\r\n\r\n")
        if txn.header.startswith(b"\r\n"):
            cut = 0
        if cut >= 0:
            del txn.header[cut + 2:]
        txn.header_done = True
    else:
        size = txn.header_seen + len(data)
        txn.header_tail = window[-3:]
    txn.header_seen = size
    if size > session.ctx.header_size_limit:  # header_size_limit: refuse at the end of DATA
        txn.header_too_big = True
        txn.header_done = True




async def commit(session: SmtpdSession) -> Reply:
    txn = session.txn
    assert txn is not None and txn.spool is not None
    session.txn = None
    try:
        if txn.header_too_big:
            log.info("%s: reject: header size exceeds header_size_limit from %s", txn.queue_id, session.client)
            return Reply(552, "5.6.0", "Message header size exceeds fixed limit")
        if hop_count(txn.header) > session.ctx.hopcount_limit:
            log.info("%s: reject: too many hops from %s", txn.queue_id, session.client)
            return replies.TOO_MANY_HOPS
        verdict = txn.verdict
        if verdict.discard:  # logged when the action triggered (log_whatsup)
            return replies.queued(txn.queue_id)
        # DKIM, DMARC and Authentication-Results for outside clients, DKIM signing for ours
        if (refused := await session.ctx.authcheck.at_end(session, txn)) is not None:
            return refused
        try:
            recipients = [verdict.redirect] if verdict.redirect else list(txn.recipients)
            recipients = unique(await session.ctx.expand_virtual(recipients), session.ctx.duplicate_filter_limit)
            silent: list[str] = []
            if copies := ([verdict.bcc] if verdict.bcc else []) + verdict.checks_bcc:  # BCC actions: one more copy
                count = len(recipients)  # each copy the sender is never told about (Postfix: NOTIFY=NEVER)
                recipients = unique(recipients + await session.ctx.expand_virtual(copies),
                                    session.ctx.duplicate_filter_limit)
                silent = recipients[count:]
            dsn, expanded = await _expanded_dsn(session, txn.dsn, txn.recipients) \
                if txn.dsn and not verdict.redirect else ({}, [])
        except (TableError, ValueError) as exc:
            log.error("%s: virtual alias expansion failed: %s", txn.queue_id, exc)
            return replies.LOCAL_ERROR
        params = {**txn.params, RWR_PARAM: txn.rewrite_context}  # cleanup.rewrite.header_context reads it
        if silent:
            params[SILENT_PARAM] = json.dumps(silent)
        notify.store(params, dsn)  # each recipient's NOTIFY and ORCPT (RFC 3461)
        if expanded:  # their notice, queued with the message (cleanup.expanded.insert)
            params[EXPANDED_PARAM] = json.dumps(expanded)
        # the content filter is stored now, so a reload does not change where queued mail goes:
        # an access-table FILTER overrides content_filter, REDIRECT overrides both (as in Postfix)
        content_filter = verdict.filter or session.ctx.content_filter
        if content_filter and not verdict.redirect:  # the router sends every recipient there
            params[FILTER_PARAM] = content_filter
        if "no_address_mappings" in session.ctx.receive_override_options:
            params[NOMAP_PARAM] = None  # no masquerading when it is delivered (scheduler/transfer.py)
        message = NewMessage(
            id=txn.queue_id,
            state="hold" if verdict.hold else "incoming",
            sender=txn.envelope_sender,
            recipients=recipients,
            content=txn.spool,
            client_address=session.client_address,
            client_name=session.client_name,
            helo_name=session.helo_name,
            protocol=txn.protocol,
            params=params,
        )
        message_id = header_message_id(txn.header)
        scheduler = session.ctx.scheduler
        hand_over = message.state == "incoming" and scheduler is not None and scheduler.reserve()
        if hand_over:
            message.state = "active"
        if message_id is not None:  # cleanup's line, before the queue file is done (as Postfix)
            cleanup_log.info("%s: message-id=%s", txn.queue_id, message_id)
        # the qmgr worker is woken once these lines are written too (log.mark): ours before its own
        written = maillog.mark() if isinstance(scheduler, QmgrTrigger) else None
        # room left for the queue manager once it is in (space.QueueSpace.room_for)
        taken = await session.ctx.queue_space.room_for(message.content.size, not message.content.in_memory)
        if taken is None:
            if hand_over:
                scheduler.release()  # type: ignore[union-attr]
            log.info("%s: reject: not enough free space in mail queue from %s", txn.queue_id, session.client)
            return replies.INSUFFICIENT_STORAGE
        # The client must get its 250 only after the commit, and a commit that
        # has begun cannot be taken back: so the wait is shielded from shutdown.
        try:
            if expanded:  # with the success notice of the alias expansion, in one transaction
                await session.ctx.writer.run_shielded(insert_expanded, message, session.ctx.hostname)
                del message.params[EXPANDED_PARAM]  # (not queued: not for the hand-over either)
            else:
                await session.ctx.writer.run_shielded(Store.insert_message, message)
        except Exception as exc:  # noqa: BLE001 - the commit's boundary: any failure costs this message a 4xx
            if hand_over:
                scheduler.release()  # type: ignore[union-attr]
            log.error("%s: cannot queue message from %s: %s", txn.queue_id, session.client, exc)
            full = isinstance(exc, StorageError) and exc.no_space
            return replies.INSUFFICIENT_STORAGE if full else replies.LOCAL_ERROR
        finally:
            session.ctx.queue_space.settled(taken)
        if scheduler is not None:
            if hand_over:
                scheduler.hand_over(message, message.content.getvalue())
            elif written is not None:
                scheduler.wake_after(written)  # type: ignore[union-attr]
            else:
                scheduler.wake()
            if expanded and hand_over:
                scheduler.wake()  # the notice waits in incoming
        if session.ctx.metrics is not None:
            session.ctx.metrics.received.inc()
        if session.ctx.hooks is not None:
            spool = message.content
            raw = spool.getvalue()
            if raw is None:
                raw = b"".join(spool.chunks(1 << 20))
            session.ctx.hooks.accepted(AcceptedMessage(
                txn.queue_id, txn.envelope_sender, list(recipients), dict(txn.params), session.client_address,
                session.helo_name, txn.protocol, session.tls, session.sasl_username, raw))
        if hand_over:  # into active at once: the qmgr's line, as Postfix's qmgr logs it (once); mail
            # left in incoming gets it when the qmgr claims it, held mail only once released
            qmgr_log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", txn.queue_id,
                          txn.envelope_sender, message.content.size, len(recipients))
        return replies.queued(txn.queue_id)
    finally:
        txn.discard()




async def _expanded_dsn(session: SmtpdSession, entries: dict[str, dict[str, str]], recipients: list[str]
                        ) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """RCPT TO's NOTIFY and ORCPT for every address virtual_alias_maps makes of the
    recipient that gave them (as Postfix's cleanup copies them to each expansion, but
    SUCCESS: ``cleanup.expanded``); of two recipients that became one address, the
    first one's.  Also the recipients owed an ``expanded`` notice, with their ORCPT.
    Only *recipients* (the transaction's, after the milters' edits) are looked at."""
    out: dict[str, dict[str, str]] = {}
    expanded: list[tuple[str, str]] = []
    kept = set(recipients)
    entries = {address: entry for address, entry in entries.items() if address in kept}
    for (address, entry), finals in zip(entries.items(), await session.ctx.expand_virtual_each(list(entries)),
                                        strict=True):
        entry, notice = passed_on(address, entry, finals)
        if notice:
            expanded.append((address, orcpt_text(entry)))
        for final in finals:
            out.setdefault(final, entry)
    return out, expanded


_date_cache: tuple[int, str] = (-1, "")


def rfc5322_date() -> str:
    """The current time as a Date:-style string, computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


def hop_count(header: bytes | bytearray) -> int:
    """Received: and Delivered-To: headers, plus the one we add (Postfix's hop count)."""
    return len(re.findall(rb"(?im)^(?:received|delivered-to):", header)) + 1
