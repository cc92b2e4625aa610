"""SMTP replies as values (RFC 5321 codes with RFC 3463 enhanced status codes).

Every reply trimail sends is built here or from ``Reply(...)``; texts that other
tools match on (``Ok: queued as``) are part of the interface contract.  Our own
failures answer ``451 4.3.0`` and the details go to the log, never to the peer.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "2.0.0", or "" where RFC 3463 has none (220, 221 greeting lines)
    text: str | tuple[str, ...]
    # the wire form, made at the first to_bytes(): the constants below and the cached
    # greeting and EHLO replies are sent by every session
    _wire: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    def to_bytes(self) -> bytes:
        if self._wire is not None:
            return self._wire
        lines = self.lines()
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(lines) - 1
        # the enhanced code goes on every line of a multi-line reply (RFC 2034 section 4)
        out = [f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n" for i, line in enumerate(lines)]
        wire = "".join(out).encode("utf-8", "replace")
        object.__setattr__(self, "_wire", wire)
        return wire

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def __str__(self) -> str:
        return " ".join(filter(None, (str(self.code), self.enhanced, " / ".join(self.lines()))))


def ok(text: str = "Ok") -> Reply:
    return Reply(250, "2.0.0", text)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def chunk_ok(size: int) -> Reply:
    """A BDAT chunk (not the last) taken: its declared size, as Postfix says it."""
    return Reply(250, "2.0.0", f"Ok: {size} bytes")


def chunks_queued(reply: Reply, size: int) -> Reply:
    """The end of a BDAT message: Postfix's ``Ok: N bytes queued as ID`` (N: the content's
    size) for the ``Ok: queued as ID`` of DATA; any other reply as it is."""
    if reply.code == 250 and isinstance(reply.text, str) and reply.text.startswith("Ok: queued as "):
        return Reply(250, reply.enhanced, f"Ok: {size} bytes {reply.text[4:]}")
    return reply


def chunks_discarded(size: int) -> Reply:
    """A BDAT chunk after an earlier error in the same message (Postfix's skip_bdat)."""
    return Reply(551, "5.0.0", f"Discarded {size} bytes after earlier error")


@functools.lru_cache(maxsize=32)
def greeting(banner: str) -> Reply:
    """The 220 banner; one value per banner, so its wire form is made once."""
    return Reply(220, "", banner)


def ehlo(hostname: str, keywords: list[str] | tuple[str, ...]) -> Reply:
    return _ehlo(hostname, tuple(keywords))


@functools.lru_cache(maxsize=64)
def _ehlo(hostname: str, keywords: tuple[str, ...]) -> Reply:
    # a serve offers a few keyword sets (before and after STARTTLS, AUTH): one value each
    return Reply(250, "", (hostname, *keywords))


def helo(hostname: str) -> Reply:
    return Reply(250, "", hostname)


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down, closing transmission channel")


def timeout(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def too_many_connections(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections")


OK = Reply(250, "2.0.0", "Ok")  # RSET, NOOP: one value, its wire form made once
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
VRFY_CANNOT = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")

# Postfix's smtpd answers a HELO/EHLO without a name with no enhanced code (smtpd.c,
# helo_cmd/ehlo_cmd), and its VRFY syntax reply names the SMTPUTF8 option (smtputf8_enable
# defaults to yes); tests/differential compares both with a real Postfix
SYNTAX_HELO = Reply(501, "", "Syntax: HELO hostname")
SYNTAX_EHLO = Reply(501, "", "Syntax: EHLO hostname")
SYNTAX_MAIL = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
SYNTAX_RCPT = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
SYNTAX_DATA = Reply(501, "5.5.4", "Syntax: DATA")
SYNTAX_RSET = Reply(501, "5.5.4", "Syntax: RSET")
SYNTAX_QUIT = Reply(501, "5.5.4", "Syntax: QUIT")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address [SMTPUTF8]")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")  # Postfix's words
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
NOT_RECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")  # SIZE= above the limit
MESSAGE_FILE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big")  # the content itself (Postfix)
NUL_IN_COMMAND = Reply(500, "5.5.2", "Error: NUL character in command")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")  # an empty command line (Postfix's smtpd_token)
IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")  # STARTTLS, AUTH
# STARTTLS (RFC 3207)
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
SYNTAX_STARTTLS = Reply(501, "5.5.4", "Syntax: STARTTLS")
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")  # smtpd_tls_security_level = encrypt
# AUTH (RFC 4954)
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_MECHANISM_UNSUPPORTED = Reply(504, "5.5.4", "Unsupported authentication mechanism")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
# Postfix's etrn_cmd answers without enhanced status codes
ETRN_STARTED = Reply(250, "", "Queuing started")
ETRN_SYNTAX = Reply(500, "", "Syntax: ETRN domain")
ETRN_BAD_DOMAIN = Reply(501, "", "Error: invalid parameter syntax")
ETRN_IN_TRANSACTION = Reply(503, "", "Error: MAIL transaction in progress")
ETRN_UNABLE = Reply(458, "", "Unable to queue messages")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: queue file write error")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")  # queue file system short or full
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Error: internal error, try again later")
BDAT_DISABLED = Reply(521, "5.5.1", "Error: command not implemented")  # CHUNKING discarded: hang up
SYNTAX_BDAT = Reply(521, "5.5.4", "Syntax: BDAT count [LAST]")  # the next bytes are content: hang up
NULL_BDAT = Reply(551, "5.7.1", "Null BDAT request")  # BDAT 0 without LAST
CHUNK_TOO_BIG = Reply(552, "5.3.4", "Chunk exceeds message size limit")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT")
MAIL_AFTER_BDAT = Reply(503, "5.5.1", "Error: MAIL after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT after BDAT")
BARE_LF = Reply(521, "5.5.2", "Error: bare <LF> received")
FORBIDDEN_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
TOO_MANY_HOPS = Reply(554, "5.4.0", "Error: too many hops")


def unsupported_option(name: str, value: str | None = None) -> Reply:
    """Postfix names the option as the client gave it: ``FOO=bar``."""
    return Reply(555, "5.5.4", f"Unsupported option: {name}" + (f"={value}" if value is not None else ""))


def etrn_refused(site: str) -> Reply:
    return Reply(459, "", f"<{site}>: service unavailable")


def bad_parameter(text: str) -> Reply:
    return Reply(501, "5.5.4", text)


def access_denied(client: str) -> Reply:
    """Every command but QUIT after a refused greeting (smtpd_delay_reject = no)."""
    return Reply(503, "5.7.0", f"Error: access denied for {client}")


def bare_lf(code: int, hostname: str) -> Reply:
    """smtpd_forbid_bare_newline = reject: *code* is smtpd_forbid_bare_newline_reject_code."""
    return Reply(code, "5.5.2", f"{hostname} Error: bare <LF> received")


def sasl_challenge(text: str) -> Reply:
    """A server challenge (base64, or empty) in an AUTH exchange."""
    return Reply(334, "", text)


def sasl_malformed(text: str) -> Reply:
    """A client response the SASL mechanism could not decode; *text* says why (our words)."""
    return Reply(501, "5.5.2", text)
