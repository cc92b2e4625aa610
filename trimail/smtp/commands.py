"""The command checks of the SMTP server machine, one per verb (OpenSMTPD's smtp_check_*).

Each check reads the session (``ServerConnection``'s public attributes: settings,
state, HELO and TLS facts) and the command's argument, never changes either, and
returns the event for the machine: the decision event the caller answers
(``Hello``, ``MailFrom``, ``RcptTo``, ``DataStart``, ``Etrn``, ``StartTls``), or
``Rejected`` carrying the machine's own error reply (syntax, parameters, limits,
sequence rules the state table cannot say).  The machine (``trimail.smtp.server``)
counts and sends a rejection and queues a decision; policy is the caller's.

Non-SMTP commands (Postfix's smtpd: ``is_header()`` and ``smtpd_forbidden_commands``):
a command that is not an SMTP verb and whose first word looks like a message header
(``Subject:``, ``From:``, ``Received:``: printable ASCII up to a colon), or that
``forbidden_commands``/``forbidden_match`` names (``CONNECT GET POST`` and Postfix's
``regexp:{{/^[^A-Z]/ Bogus}}``: a first word not starting with a letter), ends the
session (``is_non_smtp``); the machine answers it
``221 2.7.0 Error: I can break rules, too. Goodbye.``.

Performance: a check is called once per command and allocates only the event it
returns; the reply values are constants of ``trimail.smtp.replies``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from trimail.smtp import dsn, replies
from trimail.smtp.address import AddressError, Utf8NotDeclared, ascii_upper, is_domain, parse_path
from trimail.smtp.events import DataStart, Etrn, Event, Hello, MailFrom, RcptTo, Rejected, StartTls
from trimail.smtp.replies import Reply
from trimail.smtp.sasl import MECHANISMS
from trimail.smtp.states import State

if TYPE_CHECKING:
    from trimail.smtp.server import ServerConnection, Settings

# Postfix's is_header(): a field name (printable ASCII but space and colon) and a colon
_HEADER_LIKE = re.compile(r"[\x21-\x39\x3b-\x7e]+:")
_TRANSACTION = (State.MAIL, State.RCPT)


def not_a_letter_first(word: str) -> bool:
    """Postfix's default ``regexp:{{/^[^A-Z]/ Bogus}}`` (regexp tables ignore case)."""
    return not ("A" <= ascii_upper(word[:1]) <= "Z")


def looks_like_header(word: str) -> bool:
    """The first word of a command line is a message header's start (``Subject:``)."""
    return _HEADER_LIKE.match(word) is not None


def is_non_smtp(word: str, settings: Settings) -> bool:
    """A header as a command, or smtpd_forbidden_commands names it (unknown verbs only)."""
    return (looks_like_header(word) or ascii_upper(word) in settings.forbidden_commands
            or (settings.forbidden_match is not None and settings.forbidden_match(word)))


def check_helo(conn: ServerConnection, arg: str) -> Event:
    return _hello(arg, False)


def check_ehlo(conn: ServerConnection, arg: str) -> Event:
    return _hello(arg, True)


def _hello(arg: str, extended: bool) -> Event:
    name = arg.split(" ")[0] if arg else ""
    if not name:
        if extended:
            return Rejected("ehlo", replies.SYNTAX_EHLO)
        return Rejected("helo", replies.SYNTAX_HELO)
    return Hello(name, extended)


def check_mail(conn: ServerConnection, arg: str) -> Event:
    try:
        path = parse_path(arg, "FROM:", utf8_allowed=False)
    except Utf8NotDeclared:
        return Rejected("mail", replies.NEED_SMTPUTF8)
    except AddressError as exc:
        return Rejected("mail", replies.SYNTAX_MAIL if str(exc) == "syntax" else replies.BAD_SENDER)
    problem = check_mail_params(path.params, conn.extended, conn.settings, path.repeated)
    if problem is not None:  # refused for its SIZE: Postfix logs the sender, as for a policy reject
        return Rejected("mail", problem, path.address if problem is replies.MESSAGE_TOO_BIG else None)
    return MailFrom(path.address, path.params)


def check_mail_params(params: dict[str, str | None], extended: bool, settings: Settings,
                      repeated: frozenset[str] = frozenset()) -> Reply | None:
    if params and not extended:
        return replies.unsupported_option(*next(iter(params.items())))
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()):  # not "²": int() refuses it
                return replies.bad_parameter("Bad message size syntax")
            limit = settings.message_size_limit
            if limit and int(value) > limit:
                return replies.MESSAGE_TOO_BIG
        elif key == "BODY":
            if value is None or ascii_upper(value) not in ("7BIT", "8BITMIME"):
                return replies.unsupported_option(key, value)  # Postfix: BODY=BINARY too
        elif key == "SMTPUTF8" and settings.smtputf8:
            if value is not None:
                return replies.bad_parameter("Bad SMTPUTF8 parameter syntax")
        elif key in dsn.MAIL_CHECKS:
            if (problem := _dsn_param(key, value, settings, repeated, dsn.MAIL_CHECKS)) is not None:
                return problem
        else:
            return replies.unsupported_option(key, value)
    return None


def check_rcpt_params(params: dict[str, str | None], settings: Settings,
                      repeated: frozenset[str] = frozenset()) -> Reply | None:
    """RCPT TO's parameters: NOTIFY and ORCPT (RFC 3461), nothing else (Postfix)."""
    for key, value in params.items():
        if key not in dsn.RCPT_CHECKS:
            return replies.unsupported_option(key, value)
        if (problem := _dsn_param(key, value, settings, repeated, dsn.RCPT_CHECKS)) is not None:
            return problem
    return None


def _dsn_param(key: str, value: str | None, settings: Settings, repeated: frozenset[str], checks) -> Reply | None:
    if not settings.dsn:  # smtpd_discard_ehlo_keywords names dsn
        return dsn.DISABLED
    check, bad = checks[key]
    return bad if key in repeated else check(value)


def check_rcpt(conn: ServerConnection, arg: str) -> Event:
    if conn.recipient_count >= conn.settings.recipient_limit:
        return Rejected("rcpt", replies.TOO_MANY_RECIPIENTS)
    try:
        path = parse_path(arg, "TO:", utf8_allowed=conn.smtputf8)
    except Utf8NotDeclared:
        return Rejected("rcpt", replies.NEED_SMTPUTF8)
    except AddressError as exc:
        return Rejected("rcpt", replies.SYNTAX_RCPT if str(exc) == "syntax" else replies.BAD_RECIPIENT)
    if not path.address:
        return Rejected("rcpt", replies.BAD_RECIPIENT)
    if path.params and (problem := check_rcpt_params(path.params, conn.settings, path.repeated)) is not None:
        return Rejected("rcpt", problem)
    return RcptTo(path.address, path.params)


def check_data(conn: ServerConnection, arg: str) -> Event:
    if arg:
        return Rejected("data", replies.SYNTAX_DATA)
    return DataStart()


def check_etrn(conn: ServerConnection, arg: str) -> Event:
    """Postfix's etrn_cmd: the checks of syntax and sequence; the site's
    eligibility (fast_flush_domains) is the caller's decision."""
    settings = conn.settings
    site = arg.strip()
    if not settings.etrn:
        return Rejected("etrn", replies.NOT_IMPLEMENTED)
    if settings.helo_required and conn.state is State.INIT:
        return Rejected("etrn", replies.NEED_HELO)
    if conn.state in _TRANSACTION:
        return Rejected("etrn", replies.ETRN_IN_TRANSACTION)
    if not site or " " in site:
        return Rejected("etrn", replies.ETRN_SYNTAX)
    if not site[0].isalnum():  # "@domain" and "#queue" forms name the domain
        site = site[1:]
    if not (is_domain(site.rstrip(".")) and site.isascii()):
        return Rejected("etrn", replies.ETRN_BAD_DOMAIN)
    return Etrn(site.lower().rstrip("."))


def check_starttls(conn: ServerConnection, arg: str) -> Event:
    if not conn.settings.starttls:
        return Rejected("starttls", replies.NOT_IMPLEMENTED)
    if conn.tls_active:
        return Rejected("starttls", replies.TLS_ALREADY_ACTIVE)
    if arg:
        return Rejected("starttls", replies.SYNTAX_STARTTLS)
    if conn.state in _TRANSACTION:
        return Rejected("starttls", replies.IN_TRANSACTION)
    return StartTls()


def check_auth(conn: ServerConnection, mechanism: str) -> Rejected | None:
    """None: the SASL exchange for *mechanism* may start (RFC 4954 section 4)."""
    settings = conn.settings
    if not settings.auth:
        return Rejected("auth", replies.AUTH_NOT_ENABLED)
    if not conn.tls_active and settings.auth_tls_only:
        return Rejected("auth", replies.AUTH_NEEDS_TLS)
    if conn.authenticated:
        return Rejected("auth", replies.ALREADY_AUTHENTICATED)
    if conn.state in _TRANSACTION:
        return Rejected("auth", replies.IN_TRANSACTION)
    if conn.helo_name is None:
        return Rejected("auth", replies.NEED_HELO)
    if ascii_upper(mechanism) not in MECHANISMS:
        return Rejected("auth", replies.AUTH_MECHANISM_UNSUPPORTED)
    return None
