"""``sendmail -bs``: SMTP on standard input and output (Postfix's stand-alone smtpd).

Postfix runs ``smtpd -S`` for ``sendmail -bs``: the real SMTP server, speaking to the
pipe, as the invoking user, with relay and other access controls off (the user is
local: whatever sendmail would accept, ``-bs`` accepts).  trimail does the same with
the real sans-IO machine (``trimail.smtp.server``, the settings serve's smtpd uses:
limits, SIZE, PIPELINING, 8BITMIME, SMTPUTF8, VRFY; never STARTTLS or AUTH, there is
no network) driven by blocking reads of standard input, and each accepted message
goes into the queue the way ``sendmail`` puts it there (``trimail.cleanup.submit.enqueue``:
the maildrop state, or SMTP to serve for a user who cannot write the queue), after
sendmail's cleanup: qualified addresses, virtual aliases, the address checks of
``sendmail`` (a bad address is refused at MAIL/RCPT with smtpd's reply), missing
``From:``/``Date:``/``Message-ID:`` added and a ``Received:`` header naming the
local user, as Postfix writes it (``from userid N``).  ``250 2.0.0 Ok: queued as
ID`` is sent only after the commit.

End of input ends the session (a message not yet complete is dropped); so does
QUIT.  Replies are written when the machine needs more input, so a pipelining
client gets its replies in one write, as from serve.

Security notes: the content is held in memory, bounded by ``message_size_limit``
(the machine refuses more, ``552 5.3.4``, and reads on to the end); command lines
are bounded by ``line_length_limit``.  The user can submit nothing here that
``sendmail`` would not take: the same checks, the same queue path.  DSN (RFC 3461) is
not offered and its parameters are refused (``501 5.7.1 DSN support is disabled``):
``sendmail -N``/``-R``/``-V`` are the way to ask for it here.

Parameters: those of smtpd's protocol settings (``trimail.receive.protocol.protocol_settings``),
myhostname, mail_name, myorigin, mydomain, append_at_myorigin, append_dot_mydomain,
virtual_alias_maps, receive_override_options, queue_directory.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import os
from typing import BinaryIO

from trimail.cleanup import headers
from trimail.cleanup import rewrite as cleanup_rewrite
from trimail.config import Config
from trimail.log import printable
from trimail.maps import TableError, open_table
from trimail.queue.database import QueueError, works_the_queue_itself
from trimail.queue.ids import new_queue_id
from trimail.receive.protocol import protocol_settings
from trimail.smtp import replies
from trimail.smtp.events import (
    NEED_DATA,
    BdatStart,
    ChunkEnd,
    Closed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Hello,
    MailFrom,
    RcptTo,
    Reset,
)
from trimail.smtp.replies import Reply
from trimail.smtp.server import ServerConnection

log = logging.getLogger("trimail.sendmail")

READ_SIZE = 64 * 1024


@dataclasses.dataclass(slots=True)
class _Transaction:
    queue_id: str
    sender: str
    params: dict[str, str | None]
    recipients: list[str] = dataclasses.field(default_factory=list)
    content: bytearray = dataclasses.field(default_factory=bytearray)


def serve_stdio(cfg: Config, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """One SMTP session on *stdin*/*stdout*; 0 when it ends (QUIT or end of input)."""
    settings = dataclasses.replace(protocol_settings(cfg), starttls=False, tls_required=False, auth=False,
                                   etrn=False, dsn=False)  # no DSN here: refused, never taken and dropped
    conn = ServerConnection(settings)
    session = _Session(cfg)
    conn.greet()
    fd = stdin.fileno() if hasattr(stdin, "fileno") else None
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            _write(stdout, conn.data_to_send())
            conn.receive_data(_read(stdin, fd))
            continue
        if isinstance(event, Closed):
            _write(stdout, conn.data_to_send())
            return 0
        if event.needs_reply:
            conn.respond(session.decide(event))
        else:
            session.note(event)


def _read(stdin: BinaryIO, fd: int | None) -> bytes:
    """What is there to read now (a pipe's reader gets each write as it comes)."""
    if fd is not None:
        try:
            return os.read(fd, READ_SIZE)
        except OSError:
            return b""
    return stdin.read1(READ_SIZE) if hasattr(stdin, "read1") else stdin.read(READ_SIZE)


def _write(stdout: BinaryIO, data: bytes) -> None:
    if data:
        try:
            stdout.write(data)
            stdout.flush()
        except (BrokenPipeError, ValueError):
            pass  # the client went away; end of input follows


class _Session:
    """The decisions of a stand-alone smtpd: a local user's submission, as sendmail's."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.helo = ""
        self.extended = False
        self.tx: _Transaction | None = None
        # a user who submits through serve leaves virtual_alias_maps to serve (cleanup/pickup.py)
        mapped = "no_address_mappings" not in cfg.receive_override_options
        self.virtual = [open_table(ref) for ref in cfg.virtual_alias_maps] \
            if mapped and works_the_queue_itself(cfg.queue_directory) else None

    def qualify(self, address: str) -> str:
        return cleanup_rewrite.qualified(address, self.cfg)

    def decide(self, event) -> Reply | None:
        from trimail.cleanup.submit import SendmailError, check_domain

        if isinstance(event, Hello):
            self.helo, self.extended = event.name, event.extended
            return None
        if isinstance(event, MailFrom):
            sender = self.qualify(event.sender) if event.sender else ""
            try:
                if sender:
                    check_domain(sender)
            except SendmailError:
                return replies.BAD_SENDER
            self.tx = _Transaction(new_queue_id(), sender, dict(event.params))
            return None
        if isinstance(event, RcptTo):
            recipient = self.qualify(event.recipient)
            try:
                check_domain(recipient)
            except SendmailError:
                return replies.BAD_RECIPIENT
            assert self.tx is not None
            self.tx.recipients.append(recipient)
            return None
        if isinstance(event, (DataStart, BdatStart, ChunkEnd)):
            return None
        if isinstance(event, DataEnd):
            return self.commit()
        return Reply(502, "5.5.1", "Error: command not implemented")

    def note(self, event) -> None:
        if isinstance(event, DataChunk) and self.tx is not None:
            self.tx.content += event.data
        elif isinstance(event, (Reset, DataAborted)):
            self.tx = None

    def commit(self) -> Reply:
        from trimail.cleanup.submit import SendmailError, check_domain, enqueue

        tx, self.tx = self.tx, None
        assert tx is not None
        cfg = self.cfg
        try:
            recipients = tx.recipients if self.virtual is None \
                else cleanup_rewrite.virtual_expand(tx.recipients, self.virtual)
            for address in recipients:
                check_domain(address)
        except SendmailError:
            return Reply(550, "5.1.3", "Error: bad recipient address syntax after virtual alias expansion")
        except (TableError, ValueError):
            return Reply(451, "4.3.0", "Error: temporary lookup failure")
        content = headers.complete_headers(bytes(tx.content), sender=tx.sender, full_name=None, hostname=cfg.myhostname,
                                           queue_id=tx.queue_id)
        protocol = "ESMTP" if self.extended else "SMTP"
        helo = printable(self.helo, 200)
        received = (f"Received: from {helo} (localhost [127.0.0.1])\r\n"
                    f"\tby {cfg.myhostname} ({cfg.mail_name}, from userid {os.getuid()})\r\n"
                    f"\twith {protocol} id {tx.queue_id}; {email.utils.formatdate(localtime=True)}\r\n").encode()
        params = {k: v for k, v in tx.params.items() if k in ("BODY", "SMTPUTF8")}
        try:
            enqueue(cfg, tx.queue_id, tx.sender, recipients, received + content, params=params,
                    protocol=protocol, helo_name=self.helo)
        except (SendmailError, QueueError, TableError, OSError) as exc:  # TableError: header/body checks
            log.error("%s: cannot queue the message: %s", tx.queue_id, exc)
            if isinstance(exc, SendmailError) and exc.status in (os.EX_DATAERR, os.EX_UNAVAILABLE, os.EX_NOPERM):  # for good (33c)
                return Reply(554, "5.0.0", f"Error: {printable(str(exc), 400)}")
            return replies.LOCAL_ERROR
        return replies.queued(tx.queue_id)
