"""The SMTP server's decision side: what trimail answers to each protocol event.

The sans-IO machine (``trimail.smtp.server``) says *what the client asked*; this
module decides *what to do about it*: assign the queue ID at the first accepted
RCPT (as Postfix does; a transaction whose every recipient is refused has none and
logs ``NOQUEUE``), collect recipients, prepend the ``Received:`` header, spool the content,
count hops, and commit the message to the queue through the group-commit writer
before answering ``250 2.0.0 Ok: queued as ID``.  Policy (restriction lists)
will hook in here, per event.

Parameters: myhostname, mail_name, smtpd_banner, message_size_limit,
line_length_limit, smtpd_recipient_limit, smtpd_hard_error_limit,
smtpd_forbid_bare_newline, smtpd_forbid_bare_newline_reject_code,
smtpd_forbid_bare_newline_exclusions, cleanup_replace_stray_cr_lf, smtpd_forbidden_commands, hopcount_limit,
disable_vrfy_command, smtputf8_enable, queue_directory, queue_minfree,
smtpd_reject_unlisted_recipient (and the tables of ``trimail/unlisted.py``),
virtual_alias_maps, table_lookup_timeout.

Storage: MAIL FROM is answered ``452 4.3.1 Insufficient system storage`` when the
queue file system has no more than max(queue_minfree, 1.5 * message_size_limit)
bytes free (Postfix's rule; ``spool.QueueSpace``).  When the spool file of a big
message cannot be written (disk full, I/O error), the content is dropped at once,
the rest of DATA is still read to its real end so the session stays in step, and
the end of DATA is answered ``452 4.3.1`` (no space) or ``451 4.3.0``; a failed
queue commit answers ``451 4.3.0``.  Either costs that one message, never the
session or the daemon.

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
import email.utils
import ipaddress
import logging
import re
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from trimail import rewrite
from trimail.anvil import AuthFailures
from trimail.cleanup import RWR_PARAM, rewrite_context, virtual_expand
from trimail.config import Config, ConfigError
from trimail.delivery.dns import Resolver
from trimail.delivery.route import FILTER_PARAM
from trimail.errors import StorageError
from trimail.log import printable
from trimail.maps import Table, TableError, off_loop
from trimail.maps.patterns import _parse_pattern, match_regexp, parse_regexp
from trimail.metrics import Metrics
from trimail.passwords import PasswordError, authenticate, prepare
from trimail.policy.restrictions import Policy, Request, Verdict
from trimail.queue import admin
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import QueueSpace, Spool, SpoolError
from trimail.queue.store import NewMessage, Store
from trimail.queue.writer import QueueWriter
from trimail.rewrite import Resolved
from trimail.smtp import replies
from trimail.smtp.events import (
    Auth,
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
from trimail.smtp.server import ServerConnection, Settings
from trimail.supervise import thread_pool
from trimail.unlisted import TABLE_OF_CLASS, RecipientTables, Unlisted

if TYPE_CHECKING:
    from trimail.scheduler import Scheduler

log = logging.getLogger("trimail.smtpd")
cleanup_log = logging.getLogger("trimail.cleanup")
qmgr_log = logging.getLogger("trimail.qmgr")

HEADER_SCAN_LIMIT = 64 * 1024  # header bytes examined for Message-ID and hop count


def protocol_settings(config: Config, kind: str = "smtp") -> Settings:
    tls = bool(config.smtpd_tls_cert_file) and config.smtpd_tls_security_level != "none"
    return Settings(
        starttls=tls and kind != "smtps",
        tls_required=tls and config.smtpd_tls_security_level == "encrypt",
        auth=kind in ("submission", "smtps") or config.smtpd_sasl_auth_enable,
        auth_tls_only=config.smtpd_tls_auth_only,
        hostname=config.myhostname,
        banner=config.smtpd_banner,
        message_size_limit=config.message_size_limit,
        line_length_limit=config.line_length_limit,
        recipient_limit=config.smtpd_recipient_limit,
        hard_error_limit=config.smtpd_hard_error_limit,
        # Postfix: yes and note are normalize; trimail never ends DATA at a bare LF, so no is too
        bare_newline="reject" if config.smtpd_forbid_bare_newline == "reject" else "normalize",
        bare_newline_code=config.smtpd_forbid_bare_newline_reject_code,
        replace_stray_cr_lf=config.cleanup_replace_stray_cr_lf,
        forbidden_commands=frozenset(c.upper() for c in config.smtpd_forbidden_commands if ":" not in c),
        forbidden_match=forbidden_tables(config),
        # Postfix: smtpd_delay_reject = no runs smtpd_client_restrictions at connect
        connect_check=not config.smtpd_delay_reject and bool(config.smtpd_client_restrictions),
        smtputf8=config.smtputf8_enable,
        vrfy=not config.disable_vrfy_command,
        etrn=bool(config.fast_flush_domains),
        helo_required=config.smtpd_helo_required,
    )


def forbidden_tables(config: Config):
    """A matcher for the ``type:table`` entries of smtpd_forbidden_commands (Postfix's
    default ``regexp:{{/^[^A-Z]/ Bogus}}``): inline ``regexp:{{/re/ result}, ...}`` and
    ``pcre:`` entries, or regexp/pcre files, read once here; other table types are not
    consulted (a warning).  None when there are no entries."""
    rules: list = []
    for entry in config.smtpd_forbidden_commands:
        kind, sep, name = entry.partition(":")
        if not sep:
            continue
        if kind not in ("regexp", "pcre"):
            log.warning("%s: %s: only regexp: and pcre: tables are consulted here; ignored",
                        config.where("smtpd_forbidden_commands"), entry)
            continue
        try:
            if name.startswith("{"):
                for number, text in enumerate(_inline_rules(name), 1):
                    pattern, negated, result = _parse_pattern(Path("smtpd_forbidden_commands"), number, text)
                    if not result:
                        raise TableError(f"{entry}: no result after the pattern")
                    rules.append(([(pattern, negated)], result))
            else:
                rules += parse_regexp(Path(name))
        except (TableError, ValueError) as exc:
            raise ConfigError(f"{config.where('smtpd_forbidden_commands')}: {exc}") from None
    if not rules:
        return None
    return lambda word: match_regexp(rules, word) is not None


def _inline_rules(text: str) -> list[str]:
    """The rules of an inline table ``{ {rule}, {rule} }`` (or ``{rule}``)."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise ValueError(f"bad inline table {text!r}")
    body = body[1:-1].strip()
    if not body.startswith("{"):
        return [body] if body else []
    rules, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
            if depth == 1:
                start = i + 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                rules.append(body[start:i].strip())
            elif depth < 0:
                raise ValueError(f"bad inline table {text!r}")
    if depth:
        raise ValueError(f"bad inline table {text!r}")
    return rules


class ReceiveContext:
    """What every session of one serve shares: configuration and the queue writer."""

    def __init__(self, config: Config, writer: QueueWriter, scheduler: Scheduler | None = None,
                 resolver: Resolver | None = None, kind: str = "smtp",
                 auth_failures: AuthFailures | None = None) -> None:
        if kind in ("submission", "smtps"):
            # Postfix's master.cf submission defaults: TLS first, and only logins may send
            config = config.with_overrides({
                "smtpd_tls_security_level": "encrypt" if kind == "submission" else "may",
                "smtpd_client_restrictions": "permit_sasl_authenticated, reject",
                "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
                # the client list above needs AUTH first: never at connect (smtpd_delay_reject = no)
                "smtpd_delay_reject": "yes",
            })
        self.kind = kind
        self.config = config
        self.writer = writer
        self.scheduler = scheduler  # woken for new mail, or takes it straight into active when it has room
        self.tls_context = server_tls_context(config) if config.smtpd_tls_cert_file else None
        self.password_file = Path(config.smtpd_sasl_password_file)
        self.auth_failure_limit: int = config.smtpd_auth_failure_limit
        self.tls_handshake_timeout: float = config.smtpd_tls_handshake_timeout
        self.hooks: SessionHooks | None = None
        self.metrics: Metrics | None = None
        self.auth_failures = auth_failures if auth_failures is not None else AuthFailures()
        self.policy = Policy(config, resolver or Resolver(config.dns_nameservers))
        self.recipients = RecipientTables(config)
        self.policy.unlisted = self.unlisted
        self.reject_unlisted_recipient: bool = config.smtpd_reject_unlisted_recipient
        self.fast_flush_domains = frozenset(d.lower().rstrip(".") for d in config.fast_flush_domains)
        self.fast_flush_subdomains = "fast_flush_domains" in config.parent_domain_matches_subdomains
        self.settings = protocol_settings(config, kind)
        if self.settings.auth:
            try:  # the dummy hash for unknown users, made now rather than at the first one
                prepare(self.password_file)
            except PasswordError:
                pass  # each AUTH attempt reports it
        self.hostname: str = config.myhostname
        self.mail_name: str = config.mail_name
        self.hopcount_limit: int = config.hopcount_limit
        self.header_size_limit: int = config.header_size_limit
        self.spool_directory = Path(config.queue_directory)
        self.queue_space = QueueSpace(self.spool_directory, config.queue_minfree, config.message_size_limit)
        self.lookup_timeout: float = config.table_lookup_timeout

    def virtual_tables(self) -> list[Table]:
        return self.recipients.tables("virtual_alias_maps")

    async def unlisted(self, recipient: str, resolved: Resolved | None = None) -> Unlisted | None:
        """Whether the table of *recipient*'s address class lacks it (``trimail/unlisted.py``:
        local_recipient_maps, virtual_alias_maps, virtual_mailbox_maps, relay_recipient_maps),
        read off the event loop within table_lookup_timeout; TableError when a table cannot answer."""
        resolved = resolved or rewrite.resolve(recipient, self.policy.rewrite)
        if resolved.klass == "invalid":
            return None
        return await self.recipients.unlisted(resolved)

    async def expand_virtual(self, recipients: list[str]) -> list[str]:
        """virtual_alias_maps applied to *recipients*, off the event loop when a table
        may block (TableError, ValueError as virtual_expand)."""
        tables = self.virtual_tables()
        return await off_loop(tables, virtual_expand, recipients, tables, timeout=self.lookup_timeout)


# The last certificate loaded from each (cert, key) path.  serve loads it at start, as root and
# outside any chroot jail (master.preflight); when the path cannot be opened later (the jail, or a
# root-only key after the switch to mail_owner), reload keeps that one instead of failing.
_loaded: dict[tuple[str, str], ssl.SSLContext] = {}
_kept_warned: set[tuple[str, str]] = set()


def server_tls_context(config: Config) -> ssl.SSLContext:
    """TLS 1.2 or newer with the configured certificate (ConfigError when unusable).
    A certificate that cannot be opened any more but was loaded before is kept,
    with one warning (restart serve to load a new one)."""
    key = (config.smtpd_tls_cert_file, config.smtpd_tls_key_file)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.smtpd_tls_cert_file, config.smtpd_tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        if not isinstance(exc, ssl.SSLError) and key in _loaded:
            if key not in _kept_warned:
                _kept_warned.add(key)
                log.warning("cannot read %s now (%s): keeping the certificate loaded at start; restart serve "
                            "to load a new one", config.smtpd_tls_cert_file, exc.strerror or exc)
            return _loaded[key]
        raise ConfigError(f"{config.where('smtpd_tls_cert_file')}: cannot load certificate "
                          f"{config.smtpd_tls_cert_file} / key {config.smtpd_tls_key_file}: {exc}") from None
    _loaded[key] = ctx
    return ctx



class DropConnection(Exception):
    """Raised by a hook to make the session vanish without a reply (fault injection)."""


@dataclasses.dataclass(slots=True)
class AcceptedMessage:
    """What a hook learns about each message committed to the queue."""

    queue_id: str
    sender: str
    recipients: list[str]
    params: dict[str, str | None]
    client_address: str
    helo: str
    protocol: str
    tls: str | None
    sasl_username: str
    raw: bytes


class SessionHooks:
    """Extension points used by trimail.testing: refuse, delay or drop at a stage
    (``mail``, ``rcpt``, ``data``, ``end``) and learn about accepted messages."""

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        return None

    def accepted(self, message: AcceptedMessage) -> None:
        pass


class Transaction:
    """One mail transaction: MAIL FROM to the end of DATA."""

    def __init__(self, sender: str, params: dict[str, str | None]) -> None:
        self.queue_id = ""  # assigned at the first accepted RCPT, as Postfix's smtpd opens its queue file there
        self.instance = new_queue_id()  # names the transaction before that (policy delegation's instance)
        self.sender = sender
        self.params = params
        self.recipients: list[str] = []
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
        self.rewrite_context = "remote"  # local_header_rewrite_clients' answer at MAIL (cleanup.rewrite_context)

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

    def connection(self) -> ServerConnection:
        settings = self.ctx.settings
        if settings.bare_newline == "reject" and _in_networks(
                self.client_address, self.ctx.config.smtpd_forbid_bare_newline_exclusions):
            settings = dataclasses.replace(settings, bare_newline="normalize")
        return ServerConnection(settings, client=self.client)

    async def handle(self, conn: ServerConnection, event: Event) -> Reply | None:
        """Decide on *event*; a Reply for decision events (None accepts), else None."""
        if isinstance(event, Connect):  # smtpd_delay_reject = no: the client list at connect
            return await self._restrict("client", "CONNECT", conn)
        if isinstance(event, Rejected):
            if event.sender is not None:  # SIZE above message_size_limit: Postfix's smtpd_check_size logs it
                self._log_reject("MAIL", event.reply, None, sender=event.sender)
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
            return await self._authenticate(event)
        if isinstance(event, Etrn):
            return await self._etrn(event.site, conn)
        if isinstance(event, Hello):
            self.helo_name = printable(event.name, 255)
            self.extended = event.extended
            self._discard()
            return await self._restrict("helo", "HELO", conn)
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
            if reply is None:  # local_header_rewrite_clients (cleanup.rewrite_context), Postfix's order
                context = self._rewrite_context or await rewrite_context(
                    self.ctx.policy, self._request(), self.ctx.config.local_header_rewrite_clients)
                if isinstance(context, Reply):  # a table could not answer: asked again at the next MAIL
                    self._log_reject("MAIL", context, None)
                    self.txn = None
                    return context
                self.txn.rewrite_context = self._rewrite_context = context
            return reply
        if isinstance(event, RcptTo):
            assert self.txn is not None
            if (hooked := await self._hook("rcpt", event.recipient)) is not None:
                return hooked
            resolved = rewrite.resolve(event.recipient, self.ctx.policy.rewrite)  # once: checked, looked up and stored
            if event.recipient.lower() == "postmaster" and resolved.klass != "invalid":
                # Postfix's smtpd_check_rcpt: a bare postmaster is accepted before any
                # restriction or recipient table (RFC 5321 4.5.1); stored as postmaster@$myorigin
                self._accept_recipient(resolved.stored(event.recipient))
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
            self._accept_recipient(resolved.stored(event.recipient))
            return None
        if isinstance(event, DataStart):
            assert self.txn is not None
            if (hooked := await self._hook("data", None)) is not None:
                return hooked
            reply = await self._restrict("data", "DATA", conn, sender=self.txn.sender)
            if reply is not None:
                return reply
            self.txn.protocol = self._protocol(conn)
            self.txn.spool = Spool(self.ctx.spool_directory)
            await self._spool(self._received_header(conn))
            for header in self.txn.verdict.prepend:
                await self._spool(printable(header, 998).encode("utf-8") + b"\r\n")
            return None
        if isinstance(event, DataChunk):
            if self.txn is not None and self.txn.spool is not None:
                self._scan_header(event.data)
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
            return await self._commit()
        if isinstance(event, (DataAborted, Reset)):
            self._discard()
        return None

    def _accept_recipient(self, recipient: str) -> None:
        """Add an accepted recipient; the first one gives the transaction its queue ID
        and logs ``ID: client=...``, as Postfix's smtpd does when it opens the queue
        file there: a transaction whose every RCPT is refused has no ID and is not
        counted as received (pflogsumm counts the ``client=`` lines)."""
        txn = self.txn
        assert txn is not None
        txn.recipients.append(recipient)
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
                                pipelined=conn.pending_input and (stage == "data" or not self.extended))
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
        """What the policy sees of this session and transaction now; *command*: what
        the command being decided adds (sender, recipient, size, ...)."""
        txn = self.txn
        return Request(
            client_address=self.client_address, client_name=self.client_name, helo=self.helo_name,
            protocol="ESMTP" if self.extended else "SMTP", queue_id=txn.queue_id if txn else "",
            instance=txn.instance if txn else "", recipient_count=len(txn.recipients) if txn else 0,
            sasl_username=self.sasl_username, tls=self.tls is not None, cache=self.dns_cache, **command)

    async def _hook(self, stage: str, address: str | None) -> Reply | None:
        hooks = self.ctx.hooks
        return None if hooks is None else await hooks.before(stage, self, address)

    async def _authenticate(self, event: Auth) -> Reply:
        ctx = self.ctx
        now = time.monotonic()
        failures = ctx.auth_failures.count(self.client_address, now)
        if failures >= ctx.auth_failure_limit:
            log.warning("%s: too many failed AUTH attempts (%d)", self.client, failures)
            return Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
        user = event.credentials.username
        try:
            ok = await trio.to_thread.run_sync(authenticate, ctx.password_file, user, event.credentials.password,
                                               limiter=_auth_limiter())
        except PasswordError as exc:  # Postfix: 454 when the password backend cannot answer
            log.warning("%s: SASL %s authentication failed: cannot read the password table: %s",
                        self.client, event.mechanism, exc)
            return Reply(454, "4.7.0", "Temporary authentication failure")
        if not ok:
            ctx.auth_failures.failed(self.client_address, now)
            log.warning("%s: SASL %s authentication failed: authentication failure, sasl_username=%s",
                        self.client, event.mechanism, printable(user, 64))
            return Reply(535, "5.7.8", "Error: authentication failed: authentication failure")
        self.sasl_username = user
        self.sasl_method = event.mechanism
        self._rewrite_context = None  # permit_sasl_authenticated may say local now
        return Reply(235, "2.7.0", "Authentication successful")

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

    async def _etrn(self, site: str, conn: ServerConnection) -> Reply | None:
        """ETRN (RFC 1985, Postfix's flush(8)): the deferred mail for an eligible
        site is made due now and the queue manager woken."""
        ctx = self.ctx
        refused = await self._restrict("etrn", "ETRN", conn, etrn=site)
        if refused is not None:
            return refused
        if not rewrite.domain_listed(site, ctx.fast_flush_domains, ctx.fast_flush_subdomains):
            log.warning("reject: ETRN %s... from %s", site, self.client)
            return replies.etrn_refused(site)
        try:
            count = await ctx.writer.run(admin.flush_site, site)
        except Exception as exc:  # noqa: BLE001 - this request's boundary: 458, the session goes on
            log.warning("ETRN %s from %s: %s", site, self.client, exc)
            return replies.ETRN_UNABLE
        if ctx.scheduler is not None:
            if count:  # flush(8) tells qmgr to forget dead sites (QMGR_REQ_FLUSH_DEAD) when it has mail
                ctx.scheduler.forget_dead()  # for the site: an ETRN for nothing revives nothing
            ctx.scheduler.wake()
        log.info("ETRN %s from %s: %d message(s) made due", site, self.client, count)
        return None

    def close(self) -> None:
        self._discard()

    def _discard(self) -> None:
        if self.txn is not None:
            self.txn.discard()
            self.txn = None

    def _protocol(self, conn: ServerConnection) -> str:
        """RFC 3848 / 6531 WITH protocol types: ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS, ..."""
        base = "UTF8SMTP" if conn.smtputf8 else ("ESMTP" if self.extended else "SMTP")
        if self.tls:
            base += "S"
        if self.sasl_username and base != "SMTP":
            base += "A"
        return base

    def _received_header(self, conn: ServerConnection) -> bytes:
        assert self.txn is not None
        txn = self.txn
        stamp = rfc5322_date()
        lines = [
            f"Received: from {self.helo_name} ({self.client_name} [{self.client_address}])",
            *([f"\t(using {self.tls})"] if self.tls else []),
            f"\tby {self.ctx.hostname} ({self.ctx.mail_name}) with {txn.protocol} id {txn.queue_id}",
        ]
        if len(txn.recipients) == 1:
            lines.append(f"\tfor <{txn.recipients[0]}>; {stamp}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{stamp}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _scan_header(self, data: bytes) -> None:
        """Keep the header section (bounded) for Message-ID and the hop count."""
        txn = self.txn
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
        if size > self.ctx.header_size_limit:  # header_size_limit: refuse at the end of DATA
            txn.header_too_big = True
            txn.header_done = True


    async def _commit(self) -> Reply:
        txn = self.txn
        assert txn is not None and txn.spool is not None
        self.txn = None
        try:
            if txn.header_too_big:
                log.info("%s: reject: header size exceeds header_size_limit from %s", txn.queue_id, self.client)
                return Reply(552, "5.6.0", "Message header size exceeds fixed limit")
            if hop_count(txn.header) > self.ctx.hopcount_limit:
                log.info("%s: reject: too many hops from %s", txn.queue_id, self.client)
                return replies.TOO_MANY_HOPS
            verdict = txn.verdict
            if verdict.discard:  # logged when the action triggered (log_whatsup)
                return replies.queued(txn.queue_id)
            try:
                recipients = [verdict.redirect] if verdict.redirect else list(txn.recipients)
                if verdict.bcc and verdict.bcc not in recipients:  # access action BCC: one more copy
                    recipients.append(verdict.bcc)
                recipients = await self.ctx.expand_virtual(recipients)
            except (TableError, ValueError) as exc:
                log.error("%s: virtual alias expansion failed: %s", txn.queue_id, exc)
                return replies.LOCAL_ERROR
            params = {**txn.params, RWR_PARAM: txn.rewrite_context}  # cleanup.header_context reads it
            if verdict.filter and not verdict.redirect:  # FILTER: the router sends every recipient there
                params[FILTER_PARAM] = verdict.filter  # (REDIRECT overrides FILTER, as in Postfix)
            message = NewMessage(
                id=txn.queue_id,
                state="hold" if verdict.hold else "incoming",
                sender=txn.envelope_sender,
                recipients=recipients,
                content=txn.spool,
                client_address=self.client_address,
                client_name=self.client_name,
                helo_name=self.helo_name,
                protocol=txn.protocol,
                params=params,
            )
            message_id = header_message_id(txn.header)
            scheduler = self.ctx.scheduler
            hand_over = message.state == "incoming" and scheduler is not None and scheduler.reserve()
            if hand_over:
                message.state = "active"
            # The client must get its 250 only after the commit, and a commit that
            # has begun cannot be taken back: so the wait is shielded from shutdown.
            with trio.CancelScope(shield=True):
                try:
                    await self.ctx.writer.run(Store.insert_message, message)
                except Exception as exc:  # noqa: BLE001 - the commit's boundary: any failure costs this message a 4xx
                    if hand_over:
                        scheduler.release()  # type: ignore[union-attr]
                    log.error("%s: cannot queue message from %s: %s", txn.queue_id, self.client, exc)
                    full = isinstance(exc, StorageError) and exc.no_space
                    return replies.INSUFFICIENT_STORAGE if full else replies.LOCAL_ERROR
            if scheduler is not None:
                if hand_over:
                    scheduler.hand_over(message, message.content.getvalue())
                else:
                    scheduler.wake()
            if self.ctx.metrics is not None:
                self.ctx.metrics.received.inc()
            if self.ctx.hooks is not None:
                spool = message.content
                raw = spool.getvalue()
                if raw is None:
                    raw = b"".join(spool.chunks(1 << 20))
                self.ctx.hooks.accepted(AcceptedMessage(
                    txn.queue_id, txn.envelope_sender, list(recipients), dict(txn.params), self.client_address,
                    self.helo_name, txn.protocol, self.tls, self.sasl_username, raw))
            if message_id is not None:
                cleanup_log.info("%s: message-id=%s", txn.queue_id, message_id)
            if hand_over:  # into active at once: the qmgr's line, as Postfix's qmgr logs it (once); mail
                # left in incoming gets it when the qmgr claims it, held mail only once released
                qmgr_log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", txn.queue_id,
                              txn.envelope_sender, message.content.size, len(recipients))
            return replies.queued(txn.queue_id)
        finally:
            txn.discard()


AUTH_THREADS = 2  # scrypt checks at once: an AUTH flood waits for these, never for the threads others need
# Each AUTH check costs a 16 MiB scrypt; on trio's shared pool a flood of bad
# passwords from many addresses crowded out the spool writes and free-space checks
# of every session receiving mail.
_auth_limiter = thread_pool("trimail_auth_checks", AUTH_THREADS)


_date_cache: tuple[int, str] = (-1, "")


def rfc5322_date() -> str:
    """The current time as a Date:-style string, computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, localtime=True))
    return _date_cache[1]


def _in_networks(address: str, networks: list) -> bool:
    """smtpd_forbid_bare_newline_exclusions: is the client *address* in one of *networks*?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def hop_count(header: bytes | bytearray) -> int:
    """Received: and Delivered-To: headers, plus the one we add (Postfix's hop count)."""
    return len(re.findall(rb"(?im)^(?:received|delivered-to):", header)) + 1


def header_message_id(header: bytes | bytearray) -> str | None:
    m = re.search(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", header)
    if not m:
        return None
    return printable(m.group(1).decode("utf-8", "replace").replace("\r\n", "").strip(), 200)
