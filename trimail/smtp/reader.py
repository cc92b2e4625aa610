"""The command reader of the SMTP server machine: command lines in, replies and events out.

``CommandReader`` is the half of ``ServerConnection`` (``trimail.smtp.server``) that
reads commands: it frames a line (``line_length_limit``, bare ``<LF>``), splits the
verb as Postfix's smtpd_token() does (white space before the verb is skipped, a tab
separates too, an empty line is ``500 5.5.2 Error: bad syntax``), applies the limits
and the sequence rules (the state table of ``trimail.smtp.states``), and hands the
argument to the verb's check (``trimail.smtp.commands``) or answers the machine's own
commands (RSET, NOOP, QUIT, VRFY, HELP) and the SASL exchange of AUTH itself.  The
attributes it reads and writes are ServerConnection's, set in its ``__init__``.

Non-SMTP commands (a header or a forbidden command as an unknown verb,
``commands.is_non_smtp``) end the session with ``221 2.7.0``; this comes before the
access-denied answer, as in Postfix.  Connect-time refusal (``smtpd_delay_reject =
no``): every command except QUIT is answered ``503 5.7.0 Error: access denied for
<client>``.  Error limits (Postfix's smtpd): every error reply counts; at
``hard_error_limit`` errors the next command gets ``421`` and the session ends.
HELO, EHLO, NOOP, VRFY, RSET and ETRN are "junk" commands: past
``junk_command_limit`` of them each one counts as an error too
(``smtpd_junk_command_limit``); the junk count starts again after a message is
accepted.  While BDAT goes on (``trimail.smtp.bdat``), MAIL, RCPT and DATA get
Postfix's ``503 5.5.1 Error: MAIL after BDAT`` (``RCPT``, ``DATA``), in Postfix's order
among the sequence checks.

Performance: this is the path of every command.  A base class, not a helper
object, so that splitting the machine across two files adds no call and no
allocation: a method found through the class costs what it cost in one class.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING

from trimail.smtp import replies
from trimail.smtp.address import ascii_upper
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
)
from trimail.smtp.events import (
    Auth,
    Closed,
    DataStart,
    Event,
    Hello,
    MailFrom,
    NonSmtpCommand,
    RcptTo,
    Rejected,
    Reset,
)
from trimail.smtp.replies import Reply
from trimail.smtp.sasl import Credentials, SaslError, SaslExchange
from trimail.smtp.states import (
    AUTH_END,
    AUTH_START,
    RESET_BEFORE_HELO,
    TRANSITIONS,
    State,
    Trigger,
    advance,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from trimail.smtp.server import Settings

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
_JUNK_COMMANDS = frozenset({"HELO", "EHLO", "NOOP", "VRFY", "RSET", "ETRN"})  # Postfix's SMTPD_CMD_FLAG_LIMIT
_KNOWN_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ATRN", "SEND",
                                    "SOML", "SAML"})


class CommandReader:
    """Reads and answers commands for ``ServerConnection``, which sets these in ``__init__``."""

    settings: Settings
    client: str
    access_denied: Reply | None
    state: State
    helo_name: str | None
    error_count: int
    junk_commands: int
    recipient_count: int
    smtputf8: bool
    tls_active: bool
    tls_restarted: bool
    _sasl: SaslExchange | None
    command_stats: Counter[str]
    _in: bytearray
    _out: bytearray
    _events: deque[Event]
    _pending_verb: str
    _skipping_long_line: bool
    _last_command_crlf: bool
    _bdat: int  # Postfix's bdat_state: 0 none, BDAT_OK (chunks taken), BDAT_ERROR (chunks dropped)
    _bdat_size: int  # Postfix's act_size while BDAT goes on: content taken and bytes dropped

    # -- primitives (ServerConnection's decisions use them too) ------------

    def _end_transaction(self, trigger: Trigger) -> None:
        self.recipient_count = 0
        self.smtputf8 = False
        self._bdat = self._bdat_size = 0  # Postfix's mail_reset ends BDAT too
        self.state = advance(self.state, trigger)

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

    def _decide(self, event: Event) -> None:
        self._events.append(event)

    @property
    def _rejecting_bare_lf(self) -> bool:
        return self.settings.bare_newline in ("reject", "yes")

    def _bare_lf_reply(self) -> Reply:
        return replies.bare_lf(self.settings.bare_newline_code, self.settings.hostname)

    # -- commands ----------------------------------------------------------

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
        verb = ascii_upper(word)
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
        if verb in ("MAIL", "RCPT", "DATA", "AUTH", "BDAT") and self.settings.tls_required and not self.tls_active:
            self._error(name, replies.NEED_STARTTLS)
            return
        trigger = _VERB_TRIGGERS.get(verb)
        if trigger is not None:
            if self._bdat and trigger is DataStart:  # Postfix: before the sequence rules
                self._error(name, replies.DATA_AFTER_BDAT)
                return
            if trigger not in TRANSITIONS[self.state]:
                self._error(name, _SEQUENCE_ERRORS[verb][self.state])
                return
            if (trigger is MailFrom and self.state is State.INIT
                    and (self.settings.helo_required or self.tls_restarted)):
                self._error(name, replies.NEED_HELO)  # after STARTTLS: a new EHLO first (RFC 3207 4.2)
                return
            if self._bdat and trigger is not Hello:  # BDAT began or failed: MAIL, RCPT until LAST or RSET
                self._error(name, replies.MAIL_AFTER_BDAT if trigger is MailFrom else replies.RCPT_AFTER_BDAT)
                return
        self._pending_verb = name
        event = handler(self, arg)
        if event is None:  # the machine's own command: answered already
            return
        if event.__class__ is Rejected:
            self.error_count += 1
            self._send(event.reply)
        self._events.append(event)

    # the machine's own commands (the others: trimail.smtp.commands)
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

    def _do_bdat(self, arg: str) -> Event | None:  # trimail.smtp.bdat
        raise NotImplementedError


# one function per verb: a check of commands.py returns the event (a decision, or Rejected);
# the machine's own commands act at once and return None
_HANDLERS: dict[str, Callable[[CommandReader, str], Event | None]] = {
    "HELO": check_helo,
    "EHLO": check_ehlo,
    "MAIL": check_mail,
    "RCPT": check_rcpt,
    "DATA": check_data,
    "RSET": CommandReader._do_rset,
    "NOOP": CommandReader._do_noop,
    "QUIT": CommandReader._do_quit,
    "VRFY": CommandReader._do_vrfy,
    "ETRN": check_etrn,
    "HELP": CommandReader._do_help,
    "BDAT": lambda reader, arg: reader._do_bdat(arg),  # RFC 3030: trimail.smtp.bdat
    "STARTTLS": check_starttls,
    "AUTH": CommandReader._do_auth,
}
