"""The SMTP server's mail authentication: SPF at MAIL FROM, DKIM and DMARC at the end
of DATA, the Authentication-Results header, the opt-in rejections, and DKIM
signing of mail from our own clients.

Who gets what:

- A client outside ``mynetworks`` that did not authenticate: the checks named in
  ``smtpd_authentication_checks`` (default ``spf, dkim, dmarc``; empty turns them
  off) and an ``Authentication-Results: $myhostname; ...`` field right after our
  Received: header; any Authentication-Results field of the message that names
  our authserv-id is removed first (RFC 8601 section 5: a forgery, or a loop).
- A client in ``mynetworks`` or authenticated (SASL): signed with the key that
  ``dkim_signing_table`` gives for its From: address, when there is one.

Rejecting is opt-in, as with policyd-spf and OpenDMARC: ``smtpd_spf_reject`` names
the SPF results refused at MAIL FROM (fail and softfail: 550 5.7.23, permerror:
550 5.7.24, temperror: 451 4.7.24, RFC 7372's codes); ``smtpd_dmarc_reject = yes``
refuses at the end of DATA a message failing DMARC whose policy (after pct=) is
reject (550 5.7.1), and ``smtpd_dmarc_quarantine = hold`` puts one whose policy
is quarantine on hold.

All DNS goes through the session's trio resolver.  The checks of one message
share ``smtpd_authentication_timeout``: SPF at MAIL FROM and DKIM and DMARC at
the end of DATA spend from the same budget, and what does not finish in time is
temperror.

Memory: the checks read the whole message (its header section for DMARC, its body
for DKIM's hash, which also makes a canonical copy of it).  A message over
``LARGE_MESSAGE`` is checked only when one of ``LARGE_SLOTS`` slots of this process
is free, its session waiting until then, and the DKIM hash runs in at most
``DKIM_THREADS`` threads of this process (a thread the time budget abandoned keeps its
slot until it ends): red team 31 sent 200 signed 9 MB messages at once, and one
process grew to 5.7 GB and answered ``trimail status`` after 10 s, its DKIM threads
holding the interpreter lock.  Now what the checks hold at once is bounded by
(``LARGE_SLOTS`` + ``DKIM_THREADS``) times a few copies of ``message_size_limit``.

Time: a header section over ``LONG_HEADER`` has its From: read on one of those
threads.  The stdlib's address parser took 0.2-0.3 s over a From: padded to 90 kB,
every other session of the process waiting (the longest pause of the event loop is
now about 50 ms).  It is read whole: one cut short would make a padded From: of a
p=reject domain permerror, not fail.

Parameters: smtpd_authentication_checks, smtpd_authentication_timeout, smtpd_spf_reject,
smtpd_dmarc_reject, smtpd_dmarc_quarantine, dkim_signing_table, dkim_key_table,
mynetworks, myhostname, table_lookup_timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trimail.authcheck.dkimverify import SignedMessage, check_signature, signatures
from trimail.authcheck.dmarc import DmarcResult, check_dmarc, from_address, from_domain
from trimail.authcheck.results import NAME, claims, header_field
from trimail.authcheck.signing import Signer, SigningError, UnsignableMessage, sign_message
from trimail.authcheck.spf import SpfResult, check_spf
from trimail.config import ConfigError
from trimail.net.addresses import in_networks
from trimail.queue.spool import Spool
from trimail.smtp import replies
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.config import Config
    from trimail.net.dns import Resolver
    from trimail.receive.session import SmtpdSession, Transaction

log = logging.getLogger("trimail.smtpd")
_FIELD = re.compile(rb"[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")
LARGE_MESSAGE = 1 << 20  # bytes: above this a message's checks take one of LARGE_SLOTS
LARGE_SLOTS = 4  # large messages of one process checked at once (each held whole, and rewritten)
DKIM_THREADS = 4  # threads of one process hashing bodies for DKIM at once (the rest wait)
LONG_HEADER = 16 * 1024  # bytes: a header section this long has its From: read on one of those threads


@dataclasses.dataclass(slots=True)
class Results:
    """What the checks found for one transaction so far."""

    spf: SpfResult | None = None
    spent: float = 0.0  # seconds of the time budget used


class AuthChecks:
    """The authentication settings of one listener's configuration."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.methods = frozenset(config.smtpd_authentication_checks)
        self.timeout: float = config.smtpd_authentication_timeout
        self.spf_reject = frozenset(config.smtpd_spf_reject)
        self.dmarc_reject: bool = config.smtpd_dmarc_reject
        self.dmarc_hold = config.smtpd_dmarc_quarantine == "hold"
        self.authserv_id: str = config.myhostname
        self.mynetworks = config.mynetworks
        self.resolver = resolver
        self._large = trio.CapacityLimiter(LARGE_SLOTS)  # see the module's docstring
        self._threads = trio.CapacityLimiter(DKIM_THREADS)
        if bool(config.dkim_signing_table) != bool(config.dkim_key_table):
            given, missing = ("dkim_signing_table", "dkim_key_table") if config.dkim_signing_table \
                else ("dkim_key_table", "dkim_signing_table")
            raise ConfigError(f"{config.where(given)}: {given} needs {missing} (the key names' files)")
        try:
            self.signer = Signer(config.dkim_signing_table, config.dkim_key_table, config.table_lookup_timeout) \
                if config.dkim_signing_table else None
        except SigningError as exc:
            raise ConfigError(f"{config.where('dkim_signing_table')}: {exc}") from None

    def outside(self, session: SmtpdSession) -> bool:
        return not session.sasl_username and not in_networks(session.client_address, self.mynetworks)

    async def at_mail(self, session: SmtpdSession) -> Reply | None:
        """SPF for the MAIL FROM (or HELO) identity; a Reply when smtpd_spf_reject
        refuses it.  The error boundary of the checks: a failure of ours is 451 4.3.0."""
        txn = session.txn
        assert txn is not None
        txn.auth = Results()
        if "spf" not in self.methods or not self.outside(session):
            return None
        try:
            return await self._spf(session, txn)
        except Exception:  # a bug here costs this transaction a 451, never the session
            log.exception("%s: SPF check failed", txn.queue_id or "NOQUEUE")
            return replies.LOCAL_ERROR

    async def _spf(self, session: SmtpdSession, txn: Transaction) -> Reply | None:
        started = trio.current_time()
        with trio.move_on_after(self.timeout):
            txn.auth.spf = await check_spf(self.resolver, session.client_address, txn.sender, session.helo_name)
        txn.auth.spent = trio.current_time() - started
        spf = txn.auth.spf
        if spf is None:
            sender = txn.sender or f"postmaster@{session.helo_name}"
            spf = txn.auth.spf = SpfResult("temperror", "mailfrom" if txn.sender else "helo",
                                           sender.rpartition("@")[2], sender, "time limit exceeded")
        if spf.result not in self.spf_reject:
            return None
        what = {"fail": (550, "5.7.23", "SPF fail - not authorized"),
                "softfail": (550, "5.7.23", "SPF softfail - not authorized"),
                "permerror": (550, "5.7.24", "SPF permanent error"),
                "temperror": (451, "4.7.24", "SPF temporary error, try again later")}.get(spf.result)
        if what is None:
            return None
        code, enhanced, text = what
        reply = Reply(code, enhanced, f"<{txn.sender}>: Sender address rejected: Message rejected due to: {text};"
                                      f" {spf.reason}")
        session._log_reject("MAIL", reply, None)
        return reply

    async def at_end(self, session: SmtpdSession, txn: Transaction) -> Reply | None:
        """Before the commit: check and add Authentication-Results, or sign; a Reply
        when the message is refused (DMARC reject, a signing failure, 451 4.3.0 for a
        failure of ours)."""
        try:
            if self.outside(session):
                return await self._check(session, txn) if self.methods else None
            return await self._sign(session, txn) if self.signer is not None else None
        except Exception:  # the boundary: this message gets a 451, the session goes on
            log.exception("%s: authentication checks failed", txn.queue_id)
            return replies.LOCAL_ERROR

    async def _check(self, session: SmtpdSession, txn: Transaction) -> Reply | None:
        assert txn.spool is not None
        if txn.spool.size <= LARGE_MESSAGE:
            return await self._check_whole(session, txn)
        async with self._large:  # bounded memory: see the module's docstring
            return await self._check_whole(session, txn)

    async def _check_whole(self, session: SmtpdSession, txn: Transaction) -> Reply | None:
        assert txn.spool is not None
        results = getattr(txn, "auth", None) or Results()
        raw = await read_content(txn.spool)
        # the whole header section (bounded by header_size_limit), not txn.header: that
        # keeps only the first 64 kB, and a From: placed after them made DMARC permerror
        # instead of fail (smtpd_dmarc_reject bypassed by padding)
        header_from = await self._read_from(from_domain, header_section(raw))
        # what a check that runs out of time reports: temperror
        pending = signatures(raw) if self.methods & {"dkim", "dmarc"} else None
        dkims = None if pending is None else [
            dataclasses.replace(s, result="temperror", reason="time limit exceeded") for s in pending]
        dmarc = DmarcResult("temperror", header_from or "", reason="time limit exceeded") \
            if "dmarc" in self.methods else None
        signed = SignedMessage(raw)  # the signatures share its body hashes
        with trio.move_on_after(max(0.0, self.timeout - results.spent)):
            for index, found in enumerate(pending or []):
                dkims[index] = await check_signature(  # type: ignore[index]
                    self.resolver, signed, index, found, self._threads)
            if dmarc is not None:
                dmarc = await check_dmarc(self.resolver, header_from, results.spf, dkims or [])
        field = header_field(self.authserv_id, results.spf if "spf" in self.methods else None,
                             dkims if "dkim" in self.methods else None, dmarc)
        txn.spool = await replace_content(session.ctx.spool_directory, txn.spool, raw, field,
                                          lambda f: _forged(f, self.authserv_id))
        log.info("%s: %s", txn.queue_id, field.decode("utf-8", "replace").replace("\r\n\t", " ").strip())
        if dmarc is not None and dmarc.result == "fail":
            if dmarc.disposition == "reject" and self.dmarc_reject:
                reply = Reply(550, "5.7.1", f"rejected by DMARC policy for {dmarc.header_from}")
                session._log_reject("END-OF-MESSAGE", reply, None)
                return reply
            if dmarc.disposition == "quarantine" and self.dmarc_hold:
                txn.verdict.hold = True
                log.info("%s: hold: DMARC policy quarantine for %s", txn.queue_id, dmarc.header_from)
        return None

    async def _read_from(self, read: Callable[[bytes], str | None], header: bytes) -> str | None:
        """``read(header)``: off the event loop when the header section is long.  Parsing
        a hostile ``From:`` of 100 kB (``<<<<...``, ``@.@.``) took 0.3 s, every other
        session of the process waiting (red team 31); cut short, a padded From: would
        dodge DMARC (permerror, not fail), so it is read whole, on a thread."""
        if len(header) <= LONG_HEADER:
            return read(header)
        return await trio.to_thread.run_sync(read, header, limiter=self._threads)

    async def _sign(self, session: SmtpdSession, txn: Transaction) -> Reply | None:
        assert self.signer is not None and txn.spool is not None
        header_from = await self._read_from(from_address, await whole_header(txn)) or txn.envelope_sender
        try:
            key = await self.signer.find_async(header_from)
            if key is None:
                return None
            raw = await read_content(txn.spool)
            cut = first_field_end(raw)
            field = await trio.to_thread.run_sync(sign_message, raw[cut:], key, self.signer.cache)
        except SigningError as exc:
            log.error("%s: DKIM signing failed for %s: %s", txn.queue_id, header_from, exc)
            return replies.LOCAL_ERROR
        except UnsignableMessage as exc:  # the message's own fault: it goes as it is
            log.warning("%s: not DKIM-signed: %s", txn.queue_id, exc)
            return None
        txn.spool = await replace_content(session.ctx.spool_directory, txn.spool, raw, field, lambda f: False)
        log.info("%s: DKIM-Signature field added (s=%s d=%s)", txn.queue_id, key.selector, key.domain)
        return None


def _forged(field: bytes, authserv_id: str) -> bool:
    name, colon, value = field.partition(b":")
    return bool(colon) and name.strip().lower() == NAME.lower().encode() and claims(
        value.decode("utf-8", "replace"), authserv_id)


async def whole_header(txn: Transaction) -> bytes:
    """The message's whole header section (bounded by header_size_limit): the
    session's copy when it holds all of it, as it does below 64 kB; else read from the
    stored content (a From: after 64 kB of header must still be found)."""
    if txn.header_done and not txn.header_too_big and txn.header_seen == len(txn.header):
        return bytes(txn.header)
    assert txn.spool is not None
    return header_section(await read_content(txn.spool))


def header_section(raw: bytes) -> bytes:
    """*raw*'s header section, with the empty line that ends it (all of *raw* without one)."""
    if raw.startswith(b"\r\n"):
        return b""
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[:end + 4]


def first_field_end(raw: bytes) -> int:
    """Where the first header field (trimail's Received:) ends."""
    match = _FIELD.match(raw)
    return match.end() if match else 0


async def read_content(spool: Spool) -> bytes:
    """The whole content (bounded by message_size_limit); a file is read in a thread."""
    value = spool.getvalue()
    if value is not None:
        return value
    return await trio.to_thread.run_sync(lambda: b"".join(spool.chunks(1 << 20)))


async def replace_content(directory: Path, spool: Spool, raw: bytes, insert: bytes,
                          drop: Callable[[bytes], bool]) -> Spool:
    """A new spool in *directory*: *raw*'s first field, *insert*, the other header
    fields except those *drop* says, and the body; the old spool is closed."""
    cut = first_field_end(raw)
    if raw.startswith(b"\r\n", cut):  # no header fields of the client's
        head_end = cut
    else:
        end = raw.find(b"\r\n\r\n", cut)
        head_end = len(raw) if end < 0 else end + 2
    head = raw[cut:head_end]
    kept, pos = [], 0
    for match in _FIELD.finditer(head):
        if match.start() != pos:
            break
        if not drop(match.group(0)):
            kept.append(match.group(0))
        pos = match.end()
    content = b"".join([raw[:cut], insert, *kept, head[pos:], raw[head_end:]])
    new = Spool(directory)
    await new.write_async(content)
    await new.finish()
    spool.close()
    return new
