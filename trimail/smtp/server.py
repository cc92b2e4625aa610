"""The SMTP server as a pure state machine (RFC 5321 with RFC 2920 pipelining).

Use it the way h11 is used::

    conn = ServerConnection(settings)
    conn.greet()                          # queues the 220 banner
    conn.receive_data(bytes_from_peer)    # b"" means end of file
    event = conn.next_event()             # an Event, or NEED_DATA
    conn.respond(reply)                   # answers a decision event
    wire = conn.data_to_send()            # reply bytes for the peer

Events that need a decision (``Hello``, ``MailFrom``, ``RcptTo``, ``DataStart``,
``DataEnd``) must be answered with ``respond()`` before ``next_event()`` moves on;
so pipelined commands are processed strictly in order and every command gets
exactly one reply.  Syntax, sequence and limit errors are answered by the machine
itself.  The peer breaking the protocol never raises: it becomes a reply.  Calling
the machine wrongly raises ``LocalProtocolError`` (a bug in the caller).

The parts, as h11 has them: ``events`` (what next_event() returns), ``states``
(the one table of legal moves; every change of state goes through
``states.advance``), ``reader`` (the command reader: framing, limits, sequence
rules, the machine's own commands), ``commands`` (one check per verb),
``dotreader`` (DATA), ``bdat`` (BDAT, RFC 3030 CHUNKING: exactly N raw bytes, given
as DATA's events), ``replies`` (every reply a named value).  This module holds
the machine's public side: input and output buffers, the events, the decisions
(``respond``) and what accepting one changes.

DATA (``trimail.smtp.dotreader``: chasquid's dotreader, Postfix's bare-newline
rules): the message ends only at ``<CR><LF>.<CR><LF>``.  With ``bare_newline =
"reject"`` (``smtpd_forbid_bare_newline``) a command line ending in a bare
``<LF>`` ends the session with ``<code> 5.5.2 <hostname> Error: bare <LF>
received`` (``smtpd_forbid_bare_newline_reject_code``), and message content with
one is read to its real end and then refused with that reply (``521`` also ends
the session).  The size limit is enforced while reading, but reading goes on to
the real end of data so the session stays in sync.  Content comes out as
``DataChunk`` events in wire format, never as a list of lines.

Connect-time access control (``smtpd_delay_reject = no``, Postfix's smtpd_proto()):
with ``Settings.connect_check`` the greeting is a decision too: ``greet()`` queues a
``Connect`` event instead of the banner, and ``respond(None)`` sends the banner.  An
error reply is sent as the greeting (``554 5.7.1 <client>: Client host rejected:
...``) and counts as an error; the session goes on, but every command except QUIT
is then refused (``trimail.smtp.reader``).  A ``421``/``521`` greeting ends the
session.

Security notes: every buffer is bounded: command lines by ``line_length_limit``,
partial data lines by ``dotreader.FLUSH`` bytes; the caller reads only on NEED_DATA.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable

from trimail.smtp import replies
from trimail.smtp.bdat import BdatReader
from trimail.smtp.commands import not_a_letter_first
from trimail.smtp.dotreader import DotReader
from trimail.smtp.events import (
    NEED_DATA,
    Auth,
    BdatStart,
    Connect,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Etrn,
    Event,
    Hello,
    MailFrom,
    NeedData,
    RcptTo,
    StartTls,
)
from trimail.smtp.replies import Reply
from trimail.smtp.sasl import MECHANISMS, SaslExchange
from trimail.smtp.states import GREET, LocalProtocolError, State, advance

# respond(None): the standard reply accepting a decision (Hello and Connect: from the settings)
_ACCEPT_REPLIES: dict[type[Event], Reply] = {
    MailFrom: replies.MAIL_OK, RcptTo: replies.RCPT_OK, DataStart: replies.START_DATA,
    StartTls: replies.TLS_READY, Auth: replies.AUTH_OK, Etrn: replies.ETRN_STARTED,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    hostname: str = "localhost"
    banner: str = "localhost ESMTP trimail"
    message_size_limit: int = 10240000  # 0: no limit
    line_length_limit: int = 2048
    recipient_limit: int = 1000
    hard_error_limit: int = 20
    junk_command_limit: int = 100  # HELO/EHLO/NOOP/VRFY/RSET before each counts as an error
    bare_newline: str = "normalize"  # or "reject" ("yes": the same, older name); data never ends on bare LF
    bare_newline_code: int = 550  # smtpd_forbid_bare_newline_reject_code (521 also disconnects)
    replace_stray_cr_lf: bool = True  # cleanup_replace_stray_cr_lf: stray CR/LF in content -> space
    forbidden_commands: frozenset[str] = frozenset({"CONNECT", "GET", "POST"})  # upper case
    # smtpd_forbidden_commands' table entries (Postfix's default regexp:{{/^[^A-Z]/ Bogus}}):
    # does this first word of an unknown command match one?
    forbidden_match: Callable[[str], bool] | None = not_a_letter_first
    connect_check: bool = False  # smtpd_delay_reject = no with client restrictions: a Connect decision
    smtputf8: bool = True
    vrfy: bool = True
    etrn: bool = False  # offer ETRN (fast_flush_domains names at least one site)
    helo_required: bool = False  # smtpd_helo_required: MAIL before HELO/EHLO is refused
    starttls: bool = False  # offer STARTTLS (a certificate is configured)
    tls_required: bool = False  # smtpd_tls_security_level = encrypt: no mail before STARTTLS
    auth: bool = False  # offer AUTH PLAIN LOGIN
    auth_tls_only: bool = True  # smtpd_tls_auth_only: AUTH only once TLS is active
    chunking: bool = True  # offer CHUNKING and take BDAT (RFC 3030; smtpd_discard_ehlo_keywords may hide it)
    dsn: bool = True  # offer DSN and take its parameters (RFC 3461; smtpd_discard_ehlo_keywords may hide it)
    discard_ehlo: frozenset[str] = frozenset()  # smtpd_discard_ehlo_keywords, upper case: not announced
    extra_extensions: tuple[str, ...] = ()


class ServerConnection(BdatReader):
    """One SMTP server session, without I/O (its command reader: ``trimail.smtp.reader``,
    BDAT's: ``trimail.smtp.bdat``)."""

    def __init__(self, settings: Settings = Settings(), client: str = "unknown") -> None:
        self.settings = settings
        self.client = client  # name[address], as Postfix's 503 access denied text names it
        self.access_denied: Reply | None = None  # the greeting's refusal (smtpd_delay_reject = no)
        self.state = State.GREETING
        self.extended = False  # EHLO (True) or HELO
        self.helo_name: str | None = None
        self.error_count = 0
        self.junk_commands = 0
        self.recipient_count = 0
        self.smtputf8 = False  # SMTPUTF8 declared on the current MAIL
        self.tls_active = False
        self.tls_restarted = False  # STARTTLS done: a new HELO/EHLO is required before MAIL
        self.authenticated: str | None = None  # the SASL login once AUTH succeeded
        self._sasl: SaslExchange | None = None
        self.command_stats: Counter[str] = Counter()  # "ehlo" -> total, "ehlo/ok" -> accepted
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._events: deque[Event] = deque()
        self._pending: Event | None = None
        self._pending_verb = ""
        self._skipping_long_line = False
        self._last_command_crlf = True
        self._reader = DotReader()  # the DATA reader of the current message
        self._raw = None  # BDAT: raw bytes owed (trimail.smtp.bdat)
        self._bdat = self._bdat_size = 0

    # -- I/O side ----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        if data:
            if self._eof:
                raise LocalProtocolError("receive_data() after end of file")
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending_input(self) -> bool:
        """Bytes already received beyond the command being decided (pipelined input)."""
        return bool(self._in)

    @property
    def output_size(self) -> int:
        """Bytes of replies queued and not yet taken by data_to_send()."""
        return len(self._out)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def greet(self, reply: Reply | None = None) -> None:
        """Queue the greeting; an error reply (554/421) ends the session.  With
        ``connect_check`` and no *reply*, a ``Connect`` event decides the greeting."""
        if self.state is not State.GREETING:
            raise LocalProtocolError("greet() twice")
        if reply is None and self.settings.connect_check:
            self.state = advance(self.state, GREET)
            self._events.append(Connect())
            return
        reply = reply or replies.greeting(self.settings.banner)
        self._send(reply)
        if reply.is_error:
            self._close("rejected at connect")
        else:
            self.state = advance(self.state, GREET)

    def close(self, reply: Reply | None, reason: str) -> None:
        """End the session now (shutdown, timeout): queue *reply* and go CLOSED."""
        if self.state is State.CLOSED:
            return
        if self.state is State.DATA or self.state is State.BDAT:
            self._events.append(DataAborted(reason))
        if reply is not None:
            self._send(reply)
        self._pending = None
        self._close(reason)

    # -- events ------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        if self._pending is not None:
            raise LocalProtocolError(f"respond() to {self._pending!r} first")
        while not self._events:
            if self.state is State.CLOSED:
                raise LocalProtocolError("next_event() after Closed")
            if self.state is State.GREETING:
                return NEED_DATA
            if self.state is State.DATA:
                progressed = self._read_data()
            else:
                progressed = self._read_command() if self._raw is None else self._read_raw()
            if not progressed:
                if not self._eof:
                    return NEED_DATA
                if self.state is State.DATA or self.state is State.BDAT:
                    self._events.append(DataAborted(f"lost connection in {self.state.name}"))
                self._close("lost connection")
        event = self._events.popleft()
        if event.needs_reply:
            self._pending = event
        return event

    def respond(self, reply: Reply | None = None) -> None:
        """Answer the pending decision event; None accepts with the standard reply."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("respond() with no event waiting for a reply")
        if event.__class__ is BdatStart or self.state is State.BDAT:
            self._pending = None
            self._bdat_decided(event, reply)
            return
        if reply is None:
            if isinstance(event, DataEnd):
                raise LocalProtocolError("DataEnd needs an explicit reply (e.g. queued as ID)")
            reply = self._accept_reply(event)
        self._pending = None
        if isinstance(event, Connect):
            self._send(reply)
            if reply.is_error:
                self.error_count += 1
                if reply.code in (421, 521):
                    self._close("rejected at connect")
                else:
                    self.access_denied = reply
            return
        verb = self._pending_verb
        if reply.is_positive:
            if isinstance(event, DataEnd):
                self.junk_commands = 0
            if not isinstance(event, DataStart):  # DATA counts as done at its end
                self.command_stats[verb + "/ok"] += 1
            self._proceed(event)
        else:
            self.error_count += 1
            if isinstance(event, DataEnd):
                self._end_transaction(DataEnd)
            elif isinstance(event, Auth):
                self.state = advance(self.state, Auth)
        self._send(reply)
        if reply.code == 421:
            if self.state is State.DATA:
                self._events.append(DataAborted("session closed"))
            self._close("closed by server")

    def _accept_reply(self, event: Event) -> Reply:
        reply = _ACCEPT_REPLIES.get(type(event))
        if reply is not None:
            return reply
        if isinstance(event, Hello):
            if not event.extended:
                return replies.helo(self.settings.hostname)
            return replies.ehlo(self.settings.hostname, self.extensions())
        if isinstance(event, Connect):
            return replies.greeting(self.settings.banner)
        raise LocalProtocolError(f"no default reply for {event!r}")

    def extensions(self) -> list[str]:
        size = self.settings.message_size_limit
        keywords = ["PIPELINING", f"SIZE {size}" if size else "SIZE"]
        if self.settings.vrfy:
            keywords.append("VRFY")
        if self.settings.etrn:
            keywords.append("ETRN")
        keywords += ["ENHANCEDSTATUSCODES", "8BITMIME"]
        if self.settings.dsn:
            keywords.append("DSN")
        if self.settings.smtputf8:
            keywords.append("SMTPUTF8")
        if self.settings.chunking:
            keywords.append("CHUNKING")
        if self.settings.starttls and not self.tls_active:
            keywords.append("STARTTLS")
        if self.settings.auth and (self.tls_active or not self.settings.auth_tls_only) and not self.authenticated:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        keywords += self.settings.extra_extensions
        if self.settings.discard_ehlo:
            keywords = [k for k in keywords if k.split(" ", 1)[0].upper() not in self.settings.discard_ehlo]
        return keywords

    def _proceed(self, event: Event) -> None:
        if isinstance(event, Hello):
            self.extended = event.extended
            self.helo_name = event.name
            self._end_transaction(Hello)
        elif isinstance(event, MailFrom):
            self.smtputf8 = "SMTPUTF8" in event.params
            self.state = advance(self.state, MailFrom)
        elif isinstance(event, RcptTo):
            self.recipient_count += 1
            self.state = advance(self.state, RcptTo)
        elif isinstance(event, DataStart):
            self.state = advance(self.state, DataStart)
            self._reader = DotReader(self.settings.message_size_limit, self._rejecting_bare_lf,
                                     self.settings.replace_stray_cr_lf, prev_crlf=self._last_command_crlf)
        elif isinstance(event, DataEnd):
            self._end_transaction(DataEnd)
        elif isinstance(event, StartTls):
            # CVE-2011-0411 class: nothing received before the handshake may be
            # executed as if it had come encrypted; start over from before EHLO.
            self._in.clear()
            self._eof = False
            # RFC 3207 4.2: the HELO name is forgotten too, and MAIL needs a new EHLO
            # (whatever smtpd_helo_required says), so nothing said in plaintext is used.
            self.tls_active = True
            self.tls_restarted = True
            self.helo_name = None
            self.extended = False
            self._end_transaction(StartTls)
        elif isinstance(event, Auth):
            self.authenticated = event.credentials.username
            self.state = advance(self.state, Auth)

    # -- DATA ------------------------------------------------------------------

    def _read_data(self) -> bool:
        """Move complete lines from the input to DataChunk events; True on progress."""
        reader = self._reader
        content, ended, progressed = reader.read(self._in)
        if content:
            self._events.append(DataChunk(content))
        if ended:
            self._pending_verb = "data"
            if reader.bare_lf:
                self._events.append(DataAborted("bare <LF> received"))
                self._end_transaction(DataAborted)
                reply = self._bare_lf_reply()
                self._error("data", reply)
                if reply.code == 521:
                    self._close("bare <LF> received")
            elif reader.too_big:
                self._events.append(DataAborted("message too big"))
                self._end_transaction(DataAborted)
                self._error("data", replies.MESSAGE_FILE_TOO_BIG)
            else:
                self._decide(DataEnd(reader.size))
            return True
        return progressed

