"""smtpd_milters in the SMTP server: each stage of a session goes to the filters
(``trimail.milter``), their answers become SMTP replies as Postfix's smtpd gives
them, and their edits are made on the message before it is committed.

Postfix's behaviour kept here: a filter's refusal at CONNECT is the greeting (``554
$myhostname ESMTP not accepting connections``, or ``421 ... Service unavailable -
try again later``) and at HELO only a 421 is sent at once, the rest staying that
filter's answer to the MAIL and RCPT commands that follow (Sendmail's rule); a
refusal is logged ``NOQUEUE: milter-reject: RCPT from name[addr]: 550 5.7.1
Command rejected; from=<...> to=<...> proto=ESMTP helo=<...>``, a quarantine
``milter-hold`` and holds the message, a discard ``milter-discard``.  The content
goes to the filters once it is complete and in the spool (Postfix's cleanup does the
same), without our own ``Received:`` header, before the queue commit; the
end-of-data restrictions run first.  The filters' connections live as long as the
SMTP session; QUIT is sent when it ends.

Parameters: smtpd_milters, smtpd_delay_reject, milter_* (``trimail.milter.chain``),
milter_macro_daemon_name, milter_macro_v, myhostname, message_size_limit (a replaced body's bound).
"""

from __future__ import annotations

import logging
import re
import weakref
from typing import TYPE_CHECKING

from trimail import rewrite
from trimail.milter.chain import Milters, MilterSettings
from trimail.milter.edit import Content, split_header
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession
    from trimail.smtp.events import MailFrom, RcptTo
    from trimail.smtp.server import ServerConnection

log = logging.getLogger("trimail.smtpd")

MAILERS = {"local": "local", "virtual": "virtual", "relay": "relay", "remote": "smtp"}
HEADER_READ_LIMIT = 1 << 20  # bytes of header section read from the spool for the filters
_TLS = re.compile(r"(\S+) with cipher (\S+) \((\d+)/")


def parse_reply(text: str) -> Reply:
    """A filter's SMTP reply text (checked by chain.valid_reply) as a Reply."""
    lines = text.split("\r\n")
    code = int(lines[0][:3])
    enhanced = ""
    texts = []
    for line in lines:
        rest = line[4:]
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)", rest)
        if m:
            enhanced = enhanced or m.group(1)
            rest = rest[m.end():]
        texts.append(rest)
    return Reply(code, enhanced, texts[0] if len(texts) == 1 else tuple(texts))


class SmtpdMilters:
    """The filters of one SMTP session (none: every call is a no-op)."""

    def __init__(self, session: SmtpdSession, names: list[str]) -> None:
        # held weakly (the session owns this): an ended session is freed by reference
        # counting, not left in a cycle for the garbage collector
        self.session = weakref.proxy(session)
        config = session.ctx.config
        self.chain = Milters(MilterSettings.from_config(config, names), self.macro) if names else None
        self.recipient: str | None = None

    # -- macros ---------------------------------------------------------------

    def macro(self, name: str) -> str | None:
        s = self.session
        txn = s.txn
        key = name.strip("{}")
        if key == "i":
            return txn.queue_id if txn is not None and txn.queue_id else None
        if key == "j":
            return s.ctx.hostname
        if key == "_":
            return f"{s.client_name} [{s.client_address}]"
        if key == "daemon_name":
            return s.ctx.config.milter_macro_daemon_name
        if key == "v":
            return s.ctx.config.milter_macro_v
        if key == "client_addr":
            return s.client_address
        if key in ("client_name", "client_ptr"):
            return s.client_name
        if key == "client_resolve":
            return "OK" if s.client_name != "unknown" else "FAIL"
        if key in ("tls_version", "cipher", "cipher_bits"):
            m = _TLS.match(s.tls or "")
            return m.group(("tls_version", "cipher", "cipher_bits").index(key) + 1) if m else None
        if key == "auth_type":
            return s.sasl_method or None
        if key == "auth_authen":
            return s.sasl_username or None
        if key.startswith("mail_") and txn is not None:
            return self._address_macro(key[5:], txn.envelope_sender)
        if key.startswith("rcpt_") and self.recipient is not None:
            return self._address_macro(key[5:], self.recipient)
        return None

    def _address_macro(self, part: str, address: str) -> str | None:
        if not address:
            return "" if part == "addr" else None
        resolved = rewrite.resolve(address, self.session.ctx.policy.rewrite)
        if part == "addr":
            return resolved.address
        if part == "host":
            return resolved.domain or self.session.ctx.hostname
        if part == "mailer":
            return "error" if resolved.klass == "invalid" else MAILERS.get(resolved.klass, "smtp")
        return None

    # -- the stages -----------------------------------------------------------

    async def connect(self, conn: ServerConnection) -> Reply | None:
        """The Connect decision: smtpd_client_restrictions when smtpd_delay_reject =
        no, then the filters (the Connect event comes for either)."""
        s = self.session
        if not s.ctx.config.smtpd_delay_reject:
            reply = await s._restrict("client", "CONNECT", conn)
            if reply is not None:
                return reply
        if self.chain is None:
            return None
        resp = self._check(await self.chain.connect(s.client_name, s.client_address, 0), "CONNECT")
        if resp is not None and resp.code == 421:
            return Reply(421, "", f"{s.ctx.hostname} Service unavailable - try again later")
        if resp is not None and resp.code >= 500:
            return Reply(554, "", f"{s.ctx.hostname} ESMTP not accepting connections")
        return None

    async def helo(self, name: str) -> Reply | None:
        if self.chain is None:
            return None
        resp = self._check(await self.chain.helo(name), "HELO")
        return resp if resp is not None and resp.code == 421 else None

    async def mail(self, event: MailFrom) -> Reply | None:
        if self.chain is None or self.session.txn is None:
            return None
        args = [f"<{event.sender}>"] + [k if v is None else f"{k}={v}" for k, v in event.params.items()]
        reply = self._check(await self.chain.mail(args), "MAIL")
        if reply is not None:
            await self.chain.abort()  # Postfix: undo the filters' MAIL
        return reply

    async def rcpt(self, event: RcptTo) -> Reply | None:
        if self.chain is None:
            return None
        args = [f"<{event.recipient}>"] + [k if v is None else f"{k}={v}" for k, v in event.params.items()]
        self.recipient = event.recipient
        try:
            return self._check(await self.chain.rcpt(args), "RCPT")
        finally:
            self.recipient = None

    async def data(self) -> Reply | None:
        if self.chain is None:
            return None
        return self._check(await self.chain.data(), "DATA")

    async def end(self) -> Reply | None:
        """The message to the filters, their edits made on the transaction (content,
        sender, recipients; hold, discard); a Reply when one refuses it."""
        s = self.session
        txn = s.txn
        if self.chain is None or txn is None or txn.spool is None or txn.verdict.discard or txn.header_too_big \
                or txn.verdict.passed:  # header/body checks' PASS
            return None
        header = await self._header_section(txn.spool)
        _, offset = split_header(header)
        content = Content(txn.spool, header[:offset], offset, own_first=True, sender=txn.envelope_sender,
                          recipients=txn.recipients, directory=s.ctx.spool_directory,
                          size_limit=s.ctx.config.message_size_limit,
                          stored=lambda address: rewrite.resolve(address, s.ctx.policy.rewrite).stored(address))
        reply = self._check(await self.chain.message(content), "END-OF-MESSAGE")
        if reply is not None:
            s._discard()
            return reply
        txn = s.txn
        if txn is None or txn.verdict.discard:
            return None
        txn.envelope_sender = content.sender
        txn.recipients = content.recipients
        if not txn.recipients:
            s._log_whatsup("milter-reject", "END-OF-MESSAGE", "5.1.0 no recipients left", None)
            s._discard()
            return Reply(554, "5.5.1", "Error: no valid recipients")
        if content.changed:
            spool = await content.build()
            txn.spool.close()
            txn.spool = spool
        return None

    async def _header_section(self, spool) -> bytes:
        data = spool.getvalue()
        if data is None:
            got = bytearray()
            for chunk in spool.chunks(1 << 16):
                got += chunk
                if b"\r\n\r\n" in got or len(got) > HEADER_READ_LIMIT:
                    break
            data = bytes(got)
        end = data.find(b"\r\n\r\n")
        return data[:end + 4] if end >= 0 else data[:HEADER_READ_LIMIT]

    def _check(self, resp: str | None, command: str) -> Reply | None:
        """Postfix's check_milter_reply: log and map one answer."""
        if resp is None:
            return None
        s = self.session
        txn = s.txn
        recipient = self.recipient
        if resp[0] == "H":
            if txn is not None and not txn.verdict.hold:
                txn.verdict.hold = True
                s._log_whatsup("milter-hold", command, resp[1:] or "milter triggers HOLD action", recipient)
            return None
        if resp[0] == "D":
            if txn is not None and not txn.verdict.discard:
                txn.verdict.discard = True
                s._log_whatsup("milter-discard", command, "milter triggers DISCARD action", recipient)
            return None
        reply = Reply(421, "4.7.0", "Server closing connection") if resp[0] == "S" else parse_reply(resp)
        if s.ctx.metrics is not None:
            s.ctx.metrics.rejected.labels(command, str(reply.code)).inc()
        s._log_whatsup("milter-reject", command, f"{reply.code} {reply.enhanced} {' '.join(reply.lines())}",
                       recipient)
        return reply

    def close(self) -> None:
        chain, self.chain = self.chain, None  # (the chain holds self.macro: a cycle until now)
        if chain is not None:
            chain.close()
