"""Delivery status notifications (RFC 3464), built as a pure function.

A bounce is a ``multipart/report; report-type=delivery-status`` message from
``MAILER-DAEMON@$myhostname`` with the null envelope sender, in three parts: a
human explanation, the ``message/delivery-status`` part (per-message fields:
Reporting-MTA, Arrival-Date; per-recipient fields: Final-Recipient, Action,
Status, Diagnostic-Code) and the returned message.  It is queued like any other
mail.  Mail from the null sender is never bounced (no bounce loops): the caller drops it and logs why.

RFC 3461's requests (``delivery.notify``) are honoured as Postfix honours them: a
recipient whose NOTIFY lacks FAILURE (or is NEVER) is in no bounce, one whose NOTIFY
lacks DELAY in no delay warning (``reported``); one that asked SUCCESS gets a success
notice (``success=True``: Action delivered or relayed, the headers returned); MAIL
FROM's ENVID comes back as ``Original-Envelope-Id`` after Reporting-MTA, and a
recipient's ORCPT as its ``Original-Recipient`` (without one, Postfix's habit: the
recipient itself).

For mail that was sent with SMTPUTF8 (``smtputf8=True``) the notification follows
RFC 6533 as Postfix writes it: the report is ``message/global-delivery-status``, the
returned headers ``message/global-headers``, and an address that is not ASCII is
given with the ``utf-8`` address type (``Final-Recipient: utf-8; rené@example``)
instead of ``rfc822``; the caller queues such a notification with SMTPUTF8, so it
is itself delivered only where SMTPUTF8 is offered.

The returned message (the third part) is what Postfix's bounce_original() returns:
``Return-Path: <sender>`` and then the complete original message as ``message/rfc822``
(``message/global`` for SMTPUTF8 mail), or only its header lines as
``text/rfc822-headers`` (``message/global-headers``) when

- the sender asked for headers only (``RET=HDRS`` at MAIL, RFC 3461),
- the notification is a success notice (Postfix's bounce_trace_service),
- the notification is a delay warning (Postfix's bounce_warn_service returns headers
  only, whatever RET= says), or
- the message is larger than ``bounce_size_limit`` (or of unknown size): Postfix does
  not truncate a large message (that would break its MIME structure), it sends the
  headers only.  ``bounce_size_limit = 0`` means no limit.

``returns_full`` makes that decision; ``dsn_parts`` gives the notification around the
returned text, so the caller can copy a large original in chunks between them.

Parameters: bounce_size_limit (read by the caller, scheduler/results.py).
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
import textwrap
import time

from trimail.delivery.notify import wants
from trimail.queue.ids import new_queue_id
from trimail.smtp.dsn import orcpt_param

_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # Postfix's is_header()
_DIAGNOSTIC_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*;")


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    recipient: str
    status: str  # RFC 3463, e.g. 5.1.1
    diagnostic: str  # "smtp; 550 5.1.1 ..." or the reason text
    remote_mta: str = ""
    action: str = ""  # RFC 3464 Action; "" = failed (delayed in a delay warning)
    text: str = ""  # the human part's explanation ("" = the diagnostic)
    orcpt: str = ""  # RCPT TO's ORCPT as "type;address" ("" = none given: the recipient itself)


# a recorded SMTP failure (delivery/smtp.py): host NAME[ADDR] said: REPLY (in reply to ... command)
_SAID = re.compile(r"host (?P<name>[^\s\[]+)\[[^\]]*\](?::\d+)? said: (?P<reply>.*?)"
                   r"(?: \(in reply to [^()]*\))?$", re.DOTALL)


def failure_of(recipient: str, reply: str) -> Failure:
    """The Failure of a recipient's recorded reply (``"5.1.1 host mx[addr] said: 550 ...
    (in reply to RCPT TO command)"``), as Postfix's bounce reports it: the human part
    says what the log says, the Diagnostic-Code is the remote server's reply itself
    (``smtp; 550 5.1.1 ...``) and Remote-MTA names the server; a failure that is no
    server's reply has no Remote-MTA and the ``X-Trimail`` diagnostic type (Postfix's
    ``X-Postfix``)."""
    status = status_of(reply)
    text = reply.split(" ", 1)[-1] if reply.startswith(status) else reply
    m = _SAID.match(text)
    if m is None:
        return Failure(recipient, status, f"X-Trimail; {text}", text=text)
    return Failure(recipient, status, f"smtp; {m.group('reply')}", remote_mta=m.group("name"), text=text)


def status_of(reply: str) -> str:
    """The RFC 3463 code in a recorded reply, or 5.0.0."""
    m = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", reply)
    return m.group(1) if m else "5.0.0"


def returns_full(*, size: int, ret: str | None, delayed: bool, limit: int) -> bool:
    """Whether the notification returns the whole message (else its headers only), as
    Postfix decides it: a delay warning never does, ``RET=HDRS`` never does, and a
    message over *limit* bytes (``bounce_size_limit``; 0 = no limit) or of unknown
    size is returned as headers only rather than truncated."""
    if delayed or (ret or "").upper() == "HDRS":
        return False
    return not (limit > 0 and (size <= 0 or size > limit))


def header_lines(head: bytes) -> bytes:
    """The header lines at the start of *head*, up to the first line that is not one
    (Postfix's IS_HEADER loop in bounce_original: the empty line ends them, and so
    does a body line where a header was expected); every line ends in CRLF."""
    out = bytearray()
    for line in head.splitlines(keepends=True):
        if not (line[:1] in (b" ", b"\t") and out or _HEADER_NAME.match(line)):
            break
        out += line.rstrip(b"\r\n") + b"\r\n"
    return bytes(out)


def build_dsn(*, hostname: str, queue_id: str, sender: str, arrival_time: float, failures: list[Failure],
              original: bytes, full: bool = False, reason: str = "", delayed: bool = False,
              smtputf8: bool = False, requested: bool = False, envid: str | None = None,
              success: bool = False) -> bytes:
    """The whole notification (wire format), *original* being the message (``full``)
    or its start, of which the header lines are returned.  See ``dsn_parts``."""
    head, tail = dsn_parts(hostname=hostname, queue_id=queue_id, sender=sender, arrival_time=arrival_time,
                           failures=failures, full=full, reason=reason, delayed=delayed, smtputf8=smtputf8,
                           requested=requested, envid=envid, success=success)
    body = original if full else header_lines(original)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body + tail


def dsn_parts(*, hostname: str, queue_id: str, sender: str, arrival_time: float, failures: list[Failure],
              full: bool, reason: str = "", delayed: bool = False, smtputf8: bool = False,
              requested: bool = False, envid: str | None = None, success: bool = False) -> tuple[bytes, bytes]:
    """The notification before and after the returned text: the returned message
    (``full``: every byte of it, ending in CRLF) or its header lines go between the
    two.  ``delayed=True`` makes the delay warning of delay_warning_time (Action:
    delayed) instead of a bounce; ``requested=True`` the delivery report the sender
    asked for (``sendmail -bv``: Postfix's "Mail Delivery Status Report", each
    recipient with its own Action); ``success=True`` the success notice of RFC 3461's
    NOTIFY=SUCCESS (Postfix's "Successful Mail Delivery Report", each recipient's Action
    ``delivered`` or ``relayed``); ``smtputf8=True`` the RFC 6533 form for mail sent
    with SMTPUTF8.  *envid* (MAIL FROM's ENVID, decoded) is given back as
    ``Original-Envelope-Id``, a failure's ``orcpt`` as its ``Original-Recipient``."""

    def typed(address: str) -> str:
        return f"{'utf-8' if smtputf8 and not address.isascii() else 'rfc822'}; {address}"

    def original(failure: Failure) -> str:
        """Postfix's Original-Recipient: the ORCPT as given (type;address), else the recipient."""
        if not failure.orcpt:
            return typed(failure.recipient).replace("rfc822; ", "rfc822;", 1)
        kind, _, address = failure.orcpt.partition(";")
        if not smtputf8 and not address.isascii():  # message/delivery-status is ASCII: RFC 6533's xtext
            return orcpt_param(kind, address)
        return failure.orcpt

    boundary = f"{queue_id}.{int(time.time())}/{hostname}"
    now = email.utils.formatdate(time.time(), localtime=True)
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        *(["Enclosed is the mail delivery report that you requested."] if requested else
          ["Your message was successfully delivered to the destination(s)",
           "listed below. If the message was delivered to mailbox you will",
           "receive no further notifications. Otherwise you may still receive",
           "notifications of mail delivery errors from other systems."] if success else
          ["This is just a warning: your message has not yet been delivered",
           "to one or more recipients. The mail system will keep trying;",
           "you do not need to send it again."] if delayed else
          ["I'm sorry to have to inform you that your message could not",
           "be delivered to one or more recipients. It's attached below."]),
        "",
        *([] if requested or success else [
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
            "",
        ]),
        "                   The mail system",
        "",
    ]
    if reason:
        human += [reason, ""]
    for failure in failures:
        human.append(_folded(f"<{failure.recipient}>: {_one_line(failure.text or failure.diagnostic)}"))
    status = [
        f"Reporting-MTA: dns; {hostname}",
        *([f"Original-Envelope-Id: {_one_line(envid)}"] if envid else []),  # where Postfix puts it
        f"X-Trimail-Queue-ID: {queue_id}",
        f"X-Trimail-Sender: {typed(sender)}",
        f"Arrival-Date: {email.utils.formatdate(arrival_time, localtime=True)}",
    ]
    for failure in failures:
        status += [
            "",
            f"Final-Recipient: {typed(failure.recipient)}",
            f"Original-Recipient: {original(failure)}",
            f"Action: {failure.action or ('delayed' if delayed else 'failed')}",
            f"Status: {failure.status}",
        ]
        if failure.remote_mta:
            status.append(f"Remote-MTA: dns; {failure.remote_mta}")
        diagnostic = _one_line(failure.diagnostic)
        if not _DIAGNOSTIC_TYPE.match(diagnostic):  # RFC 3464: diagnostic-type ";" text
            diagnostic = f"X-Trimail; {diagnostic}"
        if not smtputf8:  # message/delivery-status is US-ASCII (RFC 3464); 8-bit only in the global form
            diagnostic = diagnostic.encode("ascii", "replace").decode("ascii")
        status.append(_folded(f"Diagnostic-Code: {diagnostic}"))
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        "Subject: " + ("Mail Delivery Status Report" if requested else "Successful Mail Delivery Report"
                       if success else "Delayed Mail (still being retried)"
                       if delayed else "Undelivered Mail Returned to Sender"),
        f"To: {sender}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        f"Date: {now}",
        f"Message-Id: <{new_queue_id()}@{hostname}>",
    ]
    undelivered = "" if requested or success else "Undelivered "  # Postfix: only a bounce or delay warning says so
    if full:
        returned = (f"{undelivered}Message", "message/global" if smtputf8 else "message/rfc822")
    else:
        returned = (f"{undelivered}Message Headers", "message/global-headers" if smtputf8 else "text/rfc822-headers")
    parts = [
        "\r\n".join(headers),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "\r\n".join(human),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: message/{'global-' if smtputf8 else ''}delivery-status",
        *(["Content-Transfer-Encoding: 8bit"] if smtputf8 else []),
        "",
        "\r\n".join(status),
        "",
        f"--{boundary}",
        f"Content-Description: {returned[0]}",
        f"Content-Type: {returned[1]}",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"Return-Path: <{sender}>",  # Postfix prepends it: cleanup removed the original's
        "",
    ]
    return "\r\n".join(parts).encode("utf-8"), f"\r\n--{boundary}--\r\n".encode()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _folded(line: str) -> str:
    """*line* folded as Postfix folds a report's lines: at 78 columns, continuation
    lines indented four spaces (a header field's folding, RFC 5322 2.2.3).  A peer's
    reply may be 1,000 characters of one word: it is cut too, since no line of a
    message may pass 998 octets (red team 33a: a DSN with 2,946-octet lines)."""
    if len(line) <= 78:
        return line
    lines = textwrap.wrap(line, width=78, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    # a word is cut only past 240 characters (4 octets each at most in UTF-8: under 998); a URL stays whole
    return "\r\n".join(part if len(part) <= 240 else "\r\n    ".join(part[i:i + 240] for i in range(0, len(part), 240))
                       for part in lines)


def reported(params: dict[str, str | None], rcpts: list[tuple[str, str]],
             kind: str = "FAILURE") -> list[tuple[str, str]]:
    """*rcpts* (address, reply) of a message with *params* that the sender is to be told
    of *kind* about (``FAILURE``, ``DELAY``: RFC 3461's NOTIFY; the BCC copies of
    ``SILENT_PARAM`` never)."""
    return [(address, reply) for address, reply in rcpts if wants(params, address, kind)]
