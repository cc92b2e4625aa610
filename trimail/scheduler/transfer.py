"""What an SMTP worker sends for a job: the envelope and the content stream (and,
``local_content``, what a local or virtual mailbox gets: the same headers).

Masquerading (``masquerade_domains``, ``masquerade_exceptions``,
``masquerade_classes``) applies to mail as it is delivered: the envelope sender and
recipients of all mail.  The sender and recipient headers are rewritten (incomplete
addresses completed, then masqueraded: ``cleanup.header_rewriter``) only for mail in
a header rewriting context (``cleanup.rewrite.header_context``: local submissions and
``local_header_rewrite_clients``; other clients' mail only with
``remote_header_rewrite_domain``).  Mail received with
``receive_override_options = no_address_mappings`` (``NOMAP_PARAM``: on its way to
a content filter) is not masqueraded; it is when it comes back.  The
content comes from memory when it was handed over at acceptance, else it is read
from the queue in pieces of ``CONTENT_CHUNK`` bytes (memory does not grow with the
message); a piece that is missing raises ``ContentError`` before the end of data is
sent, so a peer never gets a truncated message.  The envelope carries the DSN
requests stored with the message (``delivery.notify``) for a server that offers DSN.

Parameters: myhostname, remote_header_rewrite_domain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from trimail.cleanup.headers import complete_headers
from trimail.cleanup.rewrite import LOCAL, NOMAP_PARAM, RWR_PARAM, header_context, masquerade
from trimail.delivery import notify
from trimail.delivery.smtp import Envelope
from trimail.queue import transitions
from trimail.queue.inline import SMALL_READ

if TYPE_CHECKING:
    from trimail.scheduler.destination import Job, Qmgr

CONTENT_CHUNK = 1 << 20  # bytes read from the queue per step while sending a message


class ContentError(Exception):
    """The queued content is not what was accepted (short, missing, unreadable)."""


def envelope_of(q: Qmgr, job: Job) -> Envelope:
    message = job.message
    mapped = NOMAP_PARAM not in message.params
    return Envelope(
        sender=masquerade_address(q, message.sender, "envelope_sender") if mapped else message.sender,
        recipients=[masquerade_address(q, r.address, "envelope_recipient") if mapped else r.address
                    for r in job.recipients],
        size=message.size,
        eight_bit=str(message.params.get("BODY", "")).upper() == "8BITMIME",
        smtputf8="SMTPUTF8" in message.params,
        dsn_mail=tuple(notify.mail_params(message.params)),
        dsn_rcpts=tuple(tuple(notify.rcpt_params(message.params, r.address)) for r in job.recipients)
        if notify.per_recipient(message.params) else (),
    )


def content_of(q: Qmgr, job: Job) -> Callable[[], AsyncIterator[bytes]]:
    """The job's content as a stream that can be started again (a retry in clear)."""
    message_id, held, size = job.message.id, job.message.content, job.message.size
    headers = cleanup_headers(q, job)

    async def content() -> AsyncIterator[bytes]:
        if held is not None:
            yield headers(held)
            return
        offset = 0
        while offset < size:
            length = min(CONTENT_CHUNK, size - offset)
            chunk = await q.writer.read(transitions.read_chunk, message_id, offset, length,
                                        small=length <= SMALL_READ)
            if not chunk:
                # raised before the end of data is sent: the peer never gets a
                # truncated message, and the connection is dropped
                raise ContentError(f"content ends at {offset} of {size} bytes")
            first = offset == 0
            offset += len(chunk)
            if first:  # the header section is in the first chunk (header_size_limit)
                chunk = headers(chunk)
            yield chunk

    return content


def cleanup_headers(q: Qmgr, job: Job) -> Callable[[bytes], bytes]:
    """What Postfix's cleanup does to the header section (the start of the content:
    header_size_limit) before queueing, done here as the message is delivered: header
    rewriting only in a rewrite context (cleanup's hdr_rewrite_context), and for mail
    from a local-context SMTP client a missing From:, Date: (its arrival) and
    Message-ID: (from its queue ID) added, the same in every copy."""
    message = job.message
    context = header_context(message.params, q.config.remote_header_rewrite_domain)
    rewrite = q.header_rewriters[(context, NOMAP_PARAM not in message.params)]
    if message.params.get(RWR_PARAM) != LOCAL:  # sendmail completed its own; remote clients' mail is theirs
        return rewrite
    hostname = q.config.myhostname

    def complete(content: bytes) -> bytes:
        if b"\r\n\r\n" not in content and not content.startswith(b"\r\n"):
            return rewrite(content)  # no end of the header section seen: never add inside the body
        return rewrite(complete_headers(content, sender=message.sender, full_name=None, hostname=hostname,
                                        queue_id=message.id, date=message.arrival_time))

    return complete


def local_content(q: Qmgr, job: Job, content: bytes) -> bytes:
    """The whole content for a local or virtual mailbox, its headers as for SMTP."""
    return cleanup_headers(q, job)(content)


def masquerade_address(q: Qmgr, address: str, kind: str) -> str:
    """Masquerading applies to mail as it is delivered, for the configured classes."""
    if kind not in q.masq_classes:
        return address
    return masquerade(address, q.masq_domains, q.masq_exceptions)
