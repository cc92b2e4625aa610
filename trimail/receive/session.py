"""The SMTP server's decision side (smtpd(8)): what trimail answers to each protocol event.

The sans-IO machine (``trimail.smtp.server``) says *what the client asked*; this module
decides *what to do about it*: the queue ID at the first accepted RCPT (as Postfix; a
transaction whose every recipient is refused has none: ``NOQUEUE``), the restrictions,
the ``Received:`` header, the spool, and the commit before ``250 2.0.0 Ok: queued as ID``
(BDAT: its first chunk decided as DATA, its content as DATA's, ``trimail.smtp.bdat``).

Parameters: myhostname, mail_name, smtpd_banner, message_size_limit, line_length_limit,
smtpd_recipient_limit, smtpd_hard_error_limit, smtpd_forbid_bare_newline,
smtpd_forbid_bare_newline_reject_code, smtpd_forbid_bare_newline_exclusions,
cleanup_replace_stray_cr_lf, smtpd_forbidden_commands, hopcount_limit, disable_vrfy_command,
smtputf8_enable, queue_directory, queue_minfree, smtpd_reject_unlisted_recipient (and the
tables of ``trimail/unlisted.py``), virtual_alias_maps, table_lookup_timeout, local_header_rewrite_clients.

Storage: MAIL FROM is answered ``452 4.3.1 Insufficient system storage`` when the
queue file system has no more than max(queue_minfree, 1.5 * message_size_limit) bytes
free (Postfix's rule; ``space.QueueSpace``).  When the spool file of a big message
cannot be written (disk full, I/O error), the content is dropped at once, the rest of
DATA is still read to its real end so the session stays in step, and the end of DATA
(or of that BDAT chunk) is answered ``452 4.3.1`` (no space) or ``451 4.3.0``; a failed
queue commit answers ``451 4.3.0``.  Either costs that one message, never the session.

Postfix's session details: with ``smtpd_delay_reject = no`` the client restrictions
run at connect (the machine's ``Connect`` event) and a refusal is the greeting, after
which every command but QUIT is answered ``503 5.7.0 Error: access denied for
name[addr]``; a header or forbidden command (``smtpd_forbidden_commands``, inline
``regexp:{{...}}``/``pcre:`` entries and regexp/pcre files too) is logged ``warning:
non-SMTP command``; an unqualified MAIL FROM or RCPT TO address is qualified
(``user@$myorigin``, ``trimail/rewrite.py``'s canonical()) for the relay check, the
lookups and the queue, and a bare ``postmaster`` recipient is accepted before any
restriction (Postfix's smtpd_check_rcpt; RFC 5321 4.5.1).

Security notes: client-supplied text (HELO name) is made printable before it goes
into a header or a log line; our own failures answer 451 4.3.0 with the details in
the log only.  After STARTTLS the HELO name and any transaction from before the
handshake are forgotten (RFC 3207 4.2), so a name given in plaintext never reaches
``Received:``, the restrictions or the policy service.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from trimail import rewrite
from trimail.cleanup.rewrite import rewrite_context
from trimail.delivery.notify import rcpt_entry
from trimail.log import printable
from trimail.maps import TableError
from trimail.net.addresses import in_networks
from trimail.policy.restrictions import Request, Verdict
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool, SpoolError
from trimail.receive.auth import authenticate_session
from trimail.receive.checks import check_content
from trimail.receive.commit import commit, protocol_name, received_header, scan_header
from trimail.receive.context import ReceiveContext
from trimail.receive.etrn import etrn
from trimail.smtp import replies
from trimail.smtp.bdat import WARNINGS as BDAT_WARNINGS
from trimail.smtp.events import (
    Auth,
    BdatStart,
    ChunkEnd,
    Connect,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Etrn,
    Event,
    Hello,
    MailFrom,
    NonSmtpCommand,
    RcptTo,
    Rejected,
    Reset,
    StartTls,
)
from trimail.smtp.replies import Reply
from trimail.smtp.server import ServerConnection
from trimail.unlisted import TABLE_OF_CLASS

log = logging.getLogger("trimail.smtpd")


class Transaction:
    """One mail transaction: MAIL FROM to the end of DATA."""

    def __init__(self, sender: str, params: dict[str, str | None]) -> None:
        self.queue_id = ""  # assigned at the first accepted RCPT, as Postfix's smtpd opens its queue file there
        self.instance = new_queue_id()  # names the transaction before that (policy delegation's instance)
        self.sender = sender
        self.params = params
        self.recipients: list[str] = []
        self.dsn: dict[str, dict[str, str]] = {}  # recipient -> its NOTIFY and ORCPT (delivery.notify)
        self.spool: Spool | None = None
        self.spool_error: SpoolError | None = None  # the content could not be stored: refuse at the end
        self.protocol = "SMTP"
        self.header = bytearray()  # start of the content, until the blank line
        self.header_done = False
        self.header_seen = 0  # bytes of header section seen so far
        self.header_tail = b""  # the last bytes of the previous chunk, to find CRLFCRLF across chunks
        self.header_too_big = False
        self.verdict = Verdict()  # actions collected from the restrictions (HOLD, PREPEND, ...)
        self.envelope_sender = sender  # what the queue stores: *sender* qualified (rewrite.canonical)
        self.rewrite_context = "remote"  # local_header_rewrite_clients' answer at MAIL (cleanup.rewrite.rewrite_context)
        self.auth: Any = None  # trimail.authcheck.inbound.Results: SPF's at MAIL, for the end of DATA

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class SmtpdSession:
    """The decisions for one SMTP connection; the I/O loop lives in trimail.net.session."""

    def __init__(self, ctx: ReceiveContext, client_address: str, client_name: str = "unknown") -> None:
        self.ctx = ctx
        self.client_address = client_address
        self.client_name = client_name
        self.client = f"{client_name}[{client_address}]"
        self.helo_name = ""
        self.extended = False
        self.txn: Transaction | None = None
        self.dns_cache: dict = {}  # DNS answers for the restrictions, per session
        self.tls: str | None = None  # "TLSv1.3 with cipher ..." once encrypted
        self.sasl_username = ""
        self.sasl_method = ""
        # local_header_rewrite_clients' answer: it depends on the client's address, AUTH and
        # TLS only, so it is found at the first MAIL and again only after AUTH or STARTTLS
        self._rewrite_context: str | None = None
        self.milters = ctx.session_milters(self)  # smtpd_milters (trimail/receive/milters.py)

    def connection(self) -> ServerConnection:
        settings = self.ctx.settings
        if settings.bare_newline == "reject" and in_networks(
                self.client_address, self.ctx.config.smtpd_forbid_bare_newline_exclusions):
            settings = dataclasses.replace(settings, bare_newline="normalize")
        return ServerConnection(settings, client=self.client)

    async def handle(self, conn: ServerConnection, event: Event) -> Reply | None:
        """Decide on *event*; a Reply for decision events (None accepts), else None."""
        if isinstance(event, Connect):  # smtpd_delay_reject = no: the client list; smtpd_milters
            return await self.milters.connect(conn)
        if isinstance(event, Rejected):
            if event.sender is not None:  # SIZE above message_size_limit: Postfix's smtpd_check_size logs it
                self._log_reject("MAIL", event.reply, None, sender=event.sender)
            elif event.command == "bdat" and (why := BDAT_WARNINGS.get(event.reply)):  # Postfix's msg_warn
                log.warning("%s: %s", self.txn and self.txn.queue_id or "NOQUEUE", why.format(self.client))
            return None
        if isinstance(event, NonSmtpCommand):
            log.warning("non-SMTP command from %s: %s", self.client, printable(event.line, 100))
            return None
        if isinstance(event, StartTls):
            if self.ctx.tls_context is None:
                return Reply(454, "4.7.0", "TLS not available due to local problem")
            # RFC 3207 4.2: forget what the client said in plaintext, the HELO name
            # included, so it reaches no Received: header, restriction or log line
            self.helo_name = ""
            self._rewrite_context = None  # a client certificate may change it
            self.extended = False
            self._discard()
            return None
        if isinstance(event, Auth):
            return await authenticate_session(self, event)
        if isinstance(event, Etrn):
            return await etrn(self, event.site, conn)
        if isinstance(event, Hello):
            self.helo_name = printable(event.name, 255)
            self.extended = event.extended
            self._discard()
            return await self._restrict("helo", "HELO", conn) or await self.milters.helo(event.name)
        if isinstance(event, MailFrom):
            self._discard()
            self.txn = Transaction(event.sender, event.params)
            # cleanup's envelope rewrite (local context): user -> user@$myorigin
            self.txn.envelope_sender = rewrite.canonical(event.sender, self.ctx.policy.rewrite)
            if (hooked := await self._hook("mail", event.sender)) is not None:
                self.txn = None
                return hooked
            if await self.ctx.queue_space.short() is not None:
                self._log_reject("MAIL", replies.INSUFFICIENT_STORAGE, None)
                self.txn = None
                return replies.INSUFFICIENT_STORAGE
            reply = await self._restrict("sender", "MAIL", conn, sender=event.sender)
            if reply is None:  # local_header_rewrite_clients (cleanup.rewrite.rewrite_context), Postfix's order
                context = self._rewrite_context or await rewrite_context(
                    self.ctx.policy, self._request(), self.ctx.config.local_header_rewrite_clients)
                if isinstance(context, Reply):  # a table could not answer: asked again at the next MAIL
                    self._log_reject("MAIL", context, None)
                    self.txn = None
                    return context
                self.txn.rewrite_context = self._rewrite_context = context
                reply = await self.ctx.authcheck.at_mail(self)  # SPF (trimail/authcheck/inbound.py)
            return reply or await self.milters.mail(event)
        if isinstance(event, RcptTo):
            assert self.txn is not None
            if (hooked := await self._hook("rcpt", event.recipient)) is not None:
                return hooked
            resolved = rewrite.resolve(event.recipient, self.ctx.policy.rewrite)  # once: checked, looked up and stored
            if event.recipient.lower() == "postmaster" and resolved.klass != "invalid":
                # Postfix's smtpd_check_rcpt: a bare postmaster is accepted before any
                # restriction or recipient table (RFC 5321 4.5.1); stored as postmaster@$myorigin
                self._accept_recipient(resolved.stored(event.recipient), event.params)
                return None
            if resolved.klass == "invalid":
                # trivial-rewrite cannot resolve it: refused, never taken for local
                reply = replies.Reply(501, "5.1.3", "Bad recipient address syntax")
                self._log_reject("RCPT", reply, event.recipient)
                return reply
            reply = await self._restrict("recipient", "RCPT", conn, sender=self.txn.sender,
                                         recipient=event.recipient)
            if reply is not None:
                return reply
            try:  # smtpd_reject_unlisted_recipient: no user of ours we would only bounce (backscatter);
                # not once DISCARD is set: the mail goes nowhere (Postfix: state->discard == 0)
                unknown = await self.ctx.unlisted(event.recipient, resolved) \
                    if self.ctx.reject_unlisted_recipient and not self.txn.verdict.discard else None
            except (TableError, ValueError) as exc:
                log.warning("%s: %s lookup failed: %s", self.txn.queue_id or "NOQUEUE",
                            TABLE_OF_CLASS.get(resolved.klass, "recipient"), exc)
                reply = Reply(451, "4.3.0", f"<{event.recipient}>: Temporary lookup failure")
                self._log_reject("RCPT", reply, event.recipient)
                return reply
            if unknown is not None:
                reply = Reply(*unknown.text(event.recipient))
                self._log_reject("RCPT", reply, event.recipient)
                return reply
            return await self.milters.rcpt(event) or self._accept_recipient(resolved.stored(event.recipient),
                                                                           event.params)
        if isinstance(event, DataStart):
            return await self._begin_content("DATA", conn)
        if isinstance(event, DataChunk):
            if self.txn is not None and self.txn.spool is not None:
                scan_header(self, event.data)
                await self._spool(event.data)
            return None
        if isinstance(event, DataEnd):
            assert self.txn is not None
            if (failed := await self._spool_end()) is not None:
                return failed
            if (hooked := await self._hook("end", None)) is not None:
                self._discard()
                return hooked
            reply = await self._restrict("end_of_data", "END-OF-MESSAGE", conn, sender=self.txn.sender,
                                         size=event.size)
            if reply is not None:
                self._discard()
                return reply
            return await check_content(self) or await self.milters.end() or await commit(self)
        if isinstance(event, BdatStart):  # the first chunk (RFC 3030): Postfix decides it as DATA
            return await self._begin_content("BDAT", conn)
        if isinstance(event, ChunkEnd):  # a chunk before LAST: refused only if it could not be stored
            return None if self.txn is None or self.txn.spool_error is None else await self._spool_end()
        if isinstance(event, (DataAborted, Reset)):
            self._discard()
        return None

    async def _begin_content(self, command: str, conn: ServerConnection) -> Reply | None:
        """DATA or the first BDAT: the restrictions, filters, spool file, Received:, PREPEND."""
        assert self.txn is not None
        if (hooked := await self._hook("data", None)) is not None:
            return hooked
        if reply := await self._restrict("data", command, conn, sender=self.txn.sender) or await self.milters.data():
            return reply
        self.txn.protocol = protocol_name(self, conn)
        self.txn.spool = Spool(self.ctx.spool_directory)
        await self._spool(received_header(self, conn))
        for header in self.txn.verdict.prepend:
            await self._spool(printable(header, 998).encode("utf-8") + b"\r\n")
        return None

    def _accept_recipient(self, recipient: str, params: dict[str, str | None]) -> None:
        """Add an accepted recipient; the first one gives the transaction its queue ID
        and logs ``ID: client=...``, as Postfix's smtpd does when it opens the queue
        file there: a transaction whose every RCPT is refused has no ID and is not
        counted as received (pflogsumm counts the ``client=`` lines)."""
        txn = self.txn
        assert txn is not None
        txn.recipients.append(recipient)
        if params and (entry := rcpt_entry(params)):  # the first RCPT's (Postfix's duplicate filter keeps it)
            txn.dsn.setdefault(recipient, entry)
        if txn.queue_id:
            return
        txn.queue_id = new_queue_id()
        sasl = f", sasl_method={self.sasl_method}, sasl_username={self.sasl_username}" \
            if self.sasl_username else ""
        log.info("%s: client=%s%s", txn.queue_id, self.client, sasl)

    async def _spool(self, data: bytes) -> None:
        """Store DATA content; after a storage failure the rest is read and dropped."""
        txn = self.txn
        assert txn is not None and txn.spool is not None
        if txn.spool_error is not None:
            return
        try:
            await txn.spool.write_async(data)
        except SpoolError as exc:
            txn.spool_error = exc
            txn.spool.close()  # give the space back now, not at the end of DATA
            log.warning("%s: queue file write error from %s: %s", txn.queue_id, self.client, exc)

    async def _spool_end(self) -> Reply | None:
        """At the end of DATA: the rest of the content goes to the spool file, and
        a storage failure is answered 452 4.3.1 (no space) or 451 4.3.0."""
        txn = self.txn
        assert txn is not None and txn.spool is not None
        if txn.spool_error is None:
            try:
                await txn.spool.finish()
            except SpoolError as exc:
                txn.spool_error = exc
                log.warning("%s: queue file write error from %s: %s", txn.queue_id, self.client, exc)
        if txn.spool_error is None:
            return None
        reply = replies.INSUFFICIENT_STORAGE if txn.spool_error.no_space else replies.LOCAL_ERROR
        self._log_reject("END-OF-MESSAGE", reply, None)
        self._discard()
        return reply

    async def _restrict(self, stage: str, command: str, conn: ServerConnection, *, sender: str | None = None,
                        recipient: str | None = None, size: int = 0, etrn: str = "") -> Reply | None:
        """Run the restriction lists for *stage*; a Reply when the command is refused."""
        policy = self.ctx.policy
        if not policy.lists_for(stage):
            return None
        txn = self.txn
        request = self._request(sender=sender, recipient=recipient, size=size, etrn=etrn,
                                pipelined=conn.pending_input and (command == "DATA" or not self.extended))
        verdict = await policy.check(stage, request)
        for action, text in verdict.logged:  # HOLD, DISCARD, INFO, WARN, ... as Postfix logs them
            if txn is not None and (action == "hold" and txn.verdict.hold
                                    or action == "discard" and txn.verdict.discard):
                continue  # Postfix: once per transaction
            self._log_whatsup(action, command, text, recipient)
        for warned in verdict.reject_warnings:  # warn_if_reject: what would have been refused
            self._log_reject(command, warned, recipient, what="reject_warning")
        if verdict.reply is not None:
            self._log_reject(command, verdict.reply, recipient)
            return verdict.reply
        if txn is not None:
            mine = txn.verdict
            mine.hold = mine.hold or verdict.hold
            mine.discard = mine.discard or verdict.discard
            mine.redirect = verdict.redirect or mine.redirect
            mine.filter = verdict.filter or mine.filter  # FILTER and BCC: the last one wins (Postfix)
            mine.bcc = verdict.bcc or mine.bcc
            mine.prepend += verdict.prepend
        return None

    def _request(self, **command: Any) -> Request:
        """What the policy sees of this session and transaction now, and *command*'s (sender, recipient...)."""
        txn = self.txn
        return Request(
            client_address=self.client_address, client_name=self.client_name, helo=self.helo_name,
            protocol="ESMTP" if self.extended else "SMTP", queue_id=txn.queue_id if txn else "",
            instance=txn.instance if txn else "", recipient_count=len(txn.recipients) if txn else 0,
            sasl_username=self.sasl_username, tls=self.tls is not None, cache=self.dns_cache, **command)

    async def _hook(self, stage: str, address: str | None) -> Reply | None:
        return None if (hooks := self.ctx.hooks) is None else await hooks.before(stage, self, address)

    def _log_reject(self, command: str, reply: Reply, recipient: str | None, what: str = "reject",
                    sender: str | None = None) -> None:
        if self.ctx.metrics is not None and what == "reject":
            self.ctx.metrics.rejected.labels(command, str(reply.code)).inc()
        self._log_whatsup(what, command, f"{reply.code} {reply.enhanced} {' '.join(reply.lines())}", recipient,
                          sender)

    def _log_whatsup(self, what: str, command: str, text: str, recipient: str | None,
                     sender: str | None = None) -> None:
        """Postfix's log_whatsup: ``ID: what: COMMAND from name[addr]: text; from=<s> to=<r>
        proto=ESMTP helo=<h>`` (``NOQUEUE`` before the first accepted RCPT; from=, to= and
        helo= only when known), which pflogsumm counts (reject, hold, discard)."""
        txn = self.txn
        if sender is None and txn is not None:
            sender = txn.sender
        details = f" from=<{sender}>" if sender is not None else ""
        if recipient is not None:
            details += f" to=<{recipient}>"
        details += f" proto={'ESMTP' if self.extended else 'SMTP'}"
        if self.helo_name:
            details += f" helo=<{self.helo_name}>"
        if self.sasl_username:
            details += f" sasl_method={self.sasl_method} sasl_username={self.sasl_username}"
        log.info("%s: %s: %s from %s: %s;%s", txn.queue_id if txn and txn.queue_id else "NOQUEUE", what,
                 command, self.client, text, details)

    def close(self) -> None:
        self._discard()
        self.milters.close()

    def _discard(self) -> None:
        if self.txn is not None:
            self.txn.discard()
            self.txn = None
