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

DATA (``trimail.smtp.dotreader``: chasquid's dotreader, Postfix's bare-newline
rules): the message ends only at ``<CR><LF>.<CR><LF>``; a line ending in a bare
``<LF>`` never ends it.  With ``bare_newline = "normalize"`` (the default;
``smtpd_forbid_bare_newline``) such a line is stored as if it ended in
``<CR><LF>``; with ``"reject"`` a command line ending in a bare ``<LF>`` ends the
session with ``<code> 5.5.2 <hostname> Error: bare <LF> received`` (Postfix's
text, ``smtpd_forbid_bare_newline_reject_code``), and message content with one is
read to its real end and then refused with that reply (``521`` also ends the
session).  Every other stray ``<CR>`` or ``<LF>`` in the content becomes a space
(``replace_stray_cr_lf``, Postfix's ``cleanup_replace_stray_cr_lf``), so what is
stored and later relayed has ``<CR><LF>`` line ends only: a ``<CR>.<CR>`` inside a
message can never end it at a lax downstream.  The size limit is enforced while
reading, but reading goes on to the real end of data so the session stays in
sync.  Content comes out as ``DataChunk`` events in wire format (``<CR><LF>`` line
ends, dots un-stuffed), never as a list of lines.

Connect-time access control (``smtpd_delay_reject = no``, Postfix's smtpd_proto()):
with ``Settings.connect_check`` the greeting is a decision too: ``greet()`` queues a
``Connect`` event instead of the banner, and ``respond(None)`` sends the banner.  An
error reply is sent as the greeting (``554 5.7.1 <client>: Client host rejected:
...``) and counts as an error; the session goes on, but every command except QUIT
is then answered ``503 5.7.0 Error: access denied for <client>`` (each one an error,
so the hard error limit ends it).  A ``421``/``521`` greeting ends the session.

Non-SMTP commands (Postfix's smtpd: ``is_header()`` and ``smtpd_forbidden_commands``):
a command that is not an SMTP verb and whose first word looks like a message header
(``Subject:``, ``From:``, ``Received:``: printable ASCII up to a colon), or that
``forbidden_commands``/``forbidden_match`` names (``CONNECT GET POST`` and Postfix's
``regexp:{{/^[^A-Z]/ Bogus}}``: a first word not starting with a letter), gets
``221 2.7.0 Error: I can break rules, too. Goodbye.`` and the session ends; a
``NonSmtpCommand`` event carries the line for the log.  This comes before the
access-denied answer, as in Postfix.  Leading white space before the verb is
skipped and an empty command line is ``500 5.5.2 Error: bad syntax`` (smtpd_token).

Error limits (Postfix's smtpd): every error reply counts; at ``hard_error_limit``
errors the next command gets ``421`` and the session ends.  HELO, EHLO, NOOP, VRFY
and RSET are "junk" commands: past ``junk_command_limit`` of them each one counts
as an error too (``smtpd_junk_command_limit``), so a client cannot hold a session
with NOOPs; the junk count starts again after a message is accepted.

Security notes: every buffer is bounded: command lines by ``line_length_limit``,
partial data lines by ``dotreader.FLUSH`` bytes; the caller reads only on NEED_DATA.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from collections.abc import Callable

from trimail.smtp import replies
from trimail.smtp.commands import (
    check_auth,
    check_data,
    check_ehlo,
    check_etrn,
    check_helo,
    check_mail,
    check_rcpt,
    check_starttls,
    is_non_smtp,
    not_a_letter_first,
)
from trimail.smtp.dotreader import DotReader
from trimail.smtp.events import (
    NEED_DATA,
    Auth,
    Closed,
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
    NonSmtpCommand,
    RcptTo,
    Rejected,
    Reset,
    StartTls,
)
from trimail.smtp.replies import Reply
from trimail.smtp.sasl import MECHANISMS, Credentials, SaslError, SaslExchange
from trimail.smtp.states import (
    AUTH_END,
    AUTH_START,
    GREET,
    RESET_BEFORE_HELO,
    TRANSITIONS,
    LocalProtocolError,
    State,
    Trigger,
    advance,
)

_ACCESS_DENIED_EXEMPT = frozenset({"QUIT"})


# Commands whose move TRANSITIONS decides; one the table lacks gets the reply here.
_VERB_TRIGGERS: dict[str, Trigger] = {"HELO": Hello, "EHLO": Hello, "MAIL": MailFrom, "RCPT": RcptTo,
                                      "DATA": DataStart}
_SEQUENCE_ERRORS: dict[str, dict[State, Reply]] = {
    "MAIL": {State.MAIL: replies.NESTED_MAIL, State.RCPT: replies.NESTED_MAIL},
    "RCPT": {State.INIT: replies.NEED_MAIL, State.READY: replies.NEED_MAIL},
    "DATA": {State.INIT: replies.NEED_RCPT, State.READY: replies.NEED_RCPT,
             State.MAIL: replies.NO_VALID_RECIPIENTS},
}

# respond(None): the standard reply accepting a decision (Hello and Connect: from the settings)
_ACCEPT_REPLIES: dict[type[Event], Reply] = {
    MailFrom: replies.MAIL_OK, RcptTo: replies.RCPT_OK, DataStart: replies.START_DATA,
    StartTls: replies.TLS_READY, Auth: replies.AUTH_OK, Etrn: replies.ETRN_STARTED,
}
_JUNK_COMMANDS = frozenset({"HELO", "EHLO", "NOOP", "VRFY", "RSET", "ETRN"})  # Postfix's SMTPD_CMD_FLAG_LIMIT
_KNOWN_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "BDAT", "ATRN", "SEND",
                                    "SOML", "SAML"})



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
    extra_extensions: tuple[str, ...] = ()


class ServerConnection:
    """One SMTP server session, without I/O."""

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
        if self.state is State.DATA:
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
            progressed = self._read_data() if self.state is State.DATA else self._read_command()
            if not progressed:
                if not self._eof:
                    return NEED_DATA
                if self.state is State.DATA:
                    self._events.append(DataAborted("lost connection in DATA"))
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
        if self.settings.smtputf8:
            keywords.append("SMTPUTF8")
        if self.settings.starttls and not self.tls_active:
            keywords.append("STARTTLS")
        if self.settings.auth and (self.tls_active or not self.settings.auth_tls_only) and not self.authenticated:
            keywords.append("AUTH " + " ".join(MECHANISMS))
        keywords += self.settings.extra_extensions
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

    def _end_transaction(self, trigger: Trigger) -> None:
        self.recipient_count = 0
        self.smtputf8 = False
        self.state = advance(self.state, trigger)

    # -- internals ---------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _close(self, reason: str) -> None:
        self.state = advance(self.state, Closed)
        self._events.append(Closed(reason))
        self._in.clear()

    def _error(self, verb: str, reply: Reply, sender: str | None = None) -> None:
        self.error_count += 1
        self._send(reply)
        self._events.append(Rejected(verb, reply, sender))

    def _read_command(self) -> bool:
        buf = self._in
        limit = self.settings.line_length_limit
        lf = buf.find(b"\n")
        if self._skipping_long_line:
            if lf < 0:
                buf.clear()
                return False
            del buf[: lf + 1]
            self._skipping_long_line = False
            return True
        if lf < 0:
            if len(buf) > limit:
                buf.clear()
                self._skipping_long_line = True
                self._error("", replies.LINE_TOO_LONG)
                return True
            return False
        raw = bytes(buf[:lf])
        del buf[: lf + 1]
        self._last_command_crlf = raw.endswith(b"\r")
        if self._last_command_crlf:
            raw = raw[:-1]
        elif self._rejecting_bare_lf:
            self._send(self._bare_lf_reply())  # Postfix: reply, then end the session
            self._close("bare <LF> received")
            return True
        if self.state is State.AUTH:
            self._sasl_line(raw)
            return True
        if len(raw) > limit:
            self._error("", replies.LINE_TOO_LONG)
            return True
        if self.error_count >= self.settings.hard_error_limit:
            self._send(replies.too_many_errors(self.settings.hostname))
            self._close("too many errors")
            return True
        self._command(raw)
        return True

    def _command(self, raw: bytes) -> None:
        if b"\x00" in raw:
            self._error("", replies.NUL_IN_COMMAND)
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error("", replies.BAD_UTF8)
            return
        # Postfix's smtpd_token(): white space before the verb is skipped, a tab separates too
        word, _, arg = line.lstrip(" \t").replace("\t", " ", 1).partition(" ")
        if not word:
            self._error("", replies.BAD_SYNTAX)
            return
        verb = word.upper()
        arg = arg.strip(" ")
        handler = _HANDLERS.get(verb)
        if handler is None:
            self.command_stats["unknown"] += 1
            if is_non_smtp(word, self.settings):
                self._events.append(NonSmtpCommand(line))
                self._send(replies.FORBIDDEN_COMMAND)
                self._close("non-SMTP command")
                return
        if self.access_denied is not None and verb not in _ACCESS_DENIED_EXEMPT:
            # Postfix: everything but QUIT, known or not, junk or not (RFC 5321 3.1)
            self._error(verb.lower() if handler else "unknown",
                        replies.access_denied(self.client))
            if handler is not None:
                self.command_stats[verb.lower()] += 1
            return
        if handler is None:
            self._error("unknown", replies.NOT_IMPLEMENTED if verb in _KNOWN_NOT_IMPLEMENTED
                        else replies.NOT_RECOGNIZED)
            return
        name = verb.lower()
        self.command_stats[name] += 1
        if verb in _JUNK_COMMANDS:
            if self.junk_commands > self.settings.junk_command_limit:
                self.error_count += 1
            self.junk_commands += 1
        if verb in ("MAIL", "RCPT", "DATA", "AUTH") and self.settings.tls_required and not self.tls_active:
            self._error(name, replies.NEED_STARTTLS)
            return
        trigger = _VERB_TRIGGERS.get(verb)
        if trigger is not None:
            if trigger not in TRANSITIONS[self.state]:
                self._error(name, _SEQUENCE_ERRORS[verb][self.state])
                return
            if (trigger is MailFrom and self.state is State.INIT
                    and (self.settings.helo_required or self.tls_restarted)):
                self._error(name, replies.NEED_HELO)  # after STARTTLS: a new EHLO first (RFC 3207 4.2)
                return
        self._pending_verb = name
        event = handler(self, arg)
        if event is None:  # the machine's own command: answered already
            return
        if event.__class__ is Rejected:
            self.error_count += 1
            self._send(event.reply)
        self._events.append(event)

    def _decide(self, event: Event) -> None:
        self._events.append(event)

    @property
    def _rejecting_bare_lf(self) -> bool:
        return self.settings.bare_newline in ("reject", "yes")

    def _bare_lf_reply(self) -> Reply:
        return replies.bare_lf(self.settings.bare_newline_code, self.settings.hostname)

    def _do_rset(self, arg: str) -> None:
        if arg:
            self._error("rset", replies.SYNTAX_RSET)
            return
        if self.state in (State.MAIL, State.RCPT):
            self._events.append(Reset())
        self._end_transaction(Reset if self.helo_name is not None else RESET_BEFORE_HELO)
        self.command_stats["rset/ok"] += 1
        self._send(replies.OK)

    def _do_noop(self, arg: str) -> None:
        self.command_stats["noop/ok"] += 1
        self._send(replies.OK)

    def _do_quit(self, arg: str) -> None:
        if arg:
            self._error("quit", replies.SYNTAX_QUIT)
            return
        self.command_stats["quit/ok"] += 1
        self._send(replies.BYE)
        if self.state in (State.MAIL, State.RCPT):
            self._events.append(Reset())
        self._close("quit")

    def _do_vrfy(self, arg: str) -> None:
        if not self.settings.vrfy:
            self._error("vrfy", replies.VRFY_DISABLED)
        elif not arg:
            self._error("vrfy", replies.SYNTAX_VRFY)
        else:
            self.command_stats["vrfy/ok"] += 1
            self._send(replies.VRFY_CANNOT)

    def _do_auth(self, arg: str) -> Rejected | None:
        mechanism, _, initial = arg.partition(" ")
        refused = check_auth(self, mechanism)
        if refused is not None:
            return refused
        self._sasl = SaslExchange(mechanism)
        self.state = advance(self.state, AUTH_START)
        self._sasl_result(lambda: self._sasl.start(initial.strip() or None) if self._sasl else "")
        return None

    def _sasl_line(self, raw: bytes) -> None:
        line = raw.decode("ascii", "replace")
        if line.strip() == "*":
            self.state = advance(self.state, AUTH_END)
            self._sasl = None
            self._error("auth", replies.AUTH_ABORTED)
            return
        self._sasl_result(lambda: self._sasl.step(line) if self._sasl else "")

    def _sasl_result(self, step) -> None:
        try:
            result = step()
        except SaslError as exc:
            self.state = advance(self.state, AUTH_END)
            self._sasl = None
            self._error("auth", replies.sasl_malformed(str(exc)))
            return
        if isinstance(result, Credentials):
            mechanism = self._sasl.mechanism if self._sasl else "PLAIN"
            self._sasl = None
            self._pending_verb = "auth"
            self._decide(Auth(mechanism, result))
        else:
            self._send(replies.sasl_challenge(result))

    def _do_help(self, arg: str) -> None:
        self.command_stats["help/ok"] += 1
        self._send(replies.HELP)

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


# one function per verb: a check of commands.py returns the event (a decision, or Rejected);
# the machine's own commands act at once and return None
_HANDLERS: dict[str, Callable[[ServerConnection, str], Event | None]] = {
    "HELO": check_helo,
    "EHLO": check_ehlo,
    "MAIL": check_mail,
    "RCPT": check_rcpt,
    "DATA": check_data,
    "RSET": ServerConnection._do_rset,
    "NOOP": ServerConnection._do_noop,
    "QUIT": ServerConnection._do_quit,
    "VRFY": ServerConnection._do_vrfy,
    "ETRN": check_etrn,
    "HELP": ServerConnection._do_help,
    "STARTTLS": check_starttls,
    "AUTH": ServerConnection._do_auth,
}
