"""The DSN extension's parameters (RFC 3461) and their xtext encoding, without I/O.

MAIL FROM takes ``RET=FULL|HDRS`` (what a failure notice returns of the message)
and ``ENVID=<xtext>`` (the sender's own name for the transaction, given back in
every notice); RCPT TO takes ``NOTIFY=NEVER`` or a comma list of
``SUCCESS``, ``FAILURE`` and ``DELAY`` (which notices the sender wants), and
``ORCPT=<addr-type>;<xtext>`` (the recipient as the sender first wrote it).

Each ``check_*`` returns None when the value is good, else the reply Postfix's
smtpd gives it (smtpd.c, mail_cmd and rcpt_cmd): ``501 5.5.4 Bad RET parameter
syntax``, ``501 5.5.4 Bad ENVID parameter syntax``, ``501 5.5.4 Error: Bad NOTIFY
parameter syntax``, ``501 5.5.4 Error: Bad ORCPT parameter syntax``; a parameter
given twice gets the same reply as a bad one.  With DSN not offered
(``smtpd_discard_ehlo_keywords = dsn``) each is refused ``501 5.7.1 DSN support is
disabled``.

xtext (RFC 3461 section 4): a character outside ``!`` to ``~``, ``+`` and ``=`` is
written ``+`` and two hexadecimal digits.  The decoder is Postfix's
(xtext_unquote): upper- and lower-case digits are read, a ``+`` without two digits
is an error.  Stricter than Postfix: a raw character of the text must be
printable ASCII (RFC 3461's xchar), the decoded ENVID at most 100 characters and
the ORCPT value at most 500, as received and as the SMTP client passes it on (RFC 3461
4.2 and 4.4; Postfix checks neither), and
a decoded ORCPT address may hold no control character (Postfix leaves it to the
bounce server to sanitize; here nothing with a line break reaches a report).
``utf-8`` ORCPTs (RFC 6533) are decoded as Postfix's uxtext_unquote does:
``\\x{HEX}`` is the character of that code point, any other character is itself.

Security notes: decoding is linear and bounded by the command line's length; every
decoded value that reaches the queue has no control character.

Parameters: none (``Settings.dsn`` is smtpd_discard_ehlo_keywords' answer).
"""

from __future__ import annotations

import re

from trimail.smtp.replies import Reply

MAX_ENVID = 100  # characters of the decoded ENVID (RFC 3461 4.4)
MAX_ORCPT = 500  # characters of the ORCPT value as sent (RFC 3461 4.2)
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")

BAD_RET = Reply(501, "5.5.4", "Bad RET parameter syntax")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter syntax")
BAD_NOTIFY = Reply(501, "5.5.4", "Error: Bad NOTIFY parameter syntax")
BAD_ORCPT = Reply(501, "5.5.4", "Error: Bad ORCPT parameter syntax")
DISABLED = Reply(501, "5.7.1", "DSN support is disabled")
MAIL_PARAMS = ("RET", "ENVID")
RCPT_PARAMS = ("NOTIFY", "ORCPT")

_HEX = "0123456789ABCDEFabcdef"
_XTEXT = re.compile(r"(?:[!-*,-~]|\+[0-9A-Fa-f]{2})*")  # printable ASCII, + only before two digits
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 3461 atom, as address types are
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UXTEXT_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


class XtextError(ValueError):
    """Not xtext (or uxtext)."""


def xtext_decode(text: str) -> str:
    """The text *text* encodes; each ``+XX`` is the byte XX, and the bytes are read as
    UTF-8 (an encoded ENVID is ASCII; an ORCPT may carry UTF-8 bytes)."""
    if _XTEXT.fullmatch(text) is None:
        raise XtextError(text)
    if "+" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise XtextError(text) from None


def xtext_encode(text: str) -> str:
    """*text* as xtext: ``+``, ``=``, space, controls and every byte outside ASCII as ``+XX``."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else
                   "".join(f"+{b:02X}" for b in ch.encode("utf-8")) for ch in text)


def uxtext_decode(text: str) -> str:
    """RFC 6533's utf-8-addr-xtext: ``\\x{HEX}`` escapes, other characters as they are."""
    def char(m: re.Match) -> str:
        code = int(m.group(1), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise XtextError(text)
        return chr(code)

    if "\\" in _UXTEXT_ESCAPE.sub("", text):  # a backslash that starts no escape
        raise XtextError(text)
    return _UXTEXT_ESCAPE.sub(char, text)


def uxtext_encode(text: str) -> str:
    """*text* as RFC 6533's utf-8-addr-xtext: every character outside ``!`` to ``~``,
    and ``+``, ``=`` and ``\\``, as ``\\x{HEX}`` (ASCII only, so it may go to a server
    without SMTPUTF8)."""
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}" for ch in text)


def check_ret(value: str | None) -> Reply | None:
    return None if value is not None and value.upper() in ("FULL", "HDRS") else BAD_RET


def check_envid(value: str | None) -> Reply | None:
    try:
        decoded = xtext_decode(value or "")
    except XtextError:
        return BAD_ENVID
    if not value or len(decoded) > MAX_ENVID or not all(" " <= ch <= "~" or ch == "\t" for ch in decoded):
        return BAD_ENVID  # Postfix's all_isprint_tab
    return None


def notify_words(value: str) -> tuple[str, ...] | None:
    """The NOTIFY list's words, upper case and each once, or None when it is not a
    valid list: NEVER alone, or any of SUCCESS, FAILURE, DELAY (Postfix's
    dsn_notify_mask: words in any case, empty items skipped)."""
    words = [w.upper() for w in value.split(",") if w]
    if words and all(w == "NEVER" for w in words):
        return ("NEVER",)
    if not words or any(w not in NOTIFY_WORDS for w in words):
        return None
    return tuple(w for w in NOTIFY_WORDS if w in words)


def check_notify(value: str | None) -> Reply | None:
    return None if value and notify_words(value) is not None else BAD_NOTIFY


def parse_orcpt(value: str) -> tuple[str, str]:
    """``(addr-type, address)`` of an ORCPT value; XtextError when it is not one."""
    kind, sep, coded = value.partition(";")
    if not sep or _ADDR_TYPE.fullmatch(kind) is None or len(value) > MAX_ORCPT:
        raise XtextError(value)
    address = uxtext_decode(coded) if kind.lower() == "utf-8" else xtext_decode(coded)
    if _CONTROL.search(address) or len(orcpt_param(kind, address)) > MAX_ORCPT:
        raise XtextError(value)  # (the form the SMTP client passes on is at most 500 characters too)
    return kind, address


def check_orcpt(value: str | None) -> Reply | None:
    try:
        parse_orcpt(value or "")
    except XtextError:
        return BAD_ORCPT
    return None


def orcpt_param(kind: str, address: str) -> str:
    """The ORCPT value that says *address* of type *kind* (what the SMTP client sends)."""
    return f"{kind};{uxtext_encode(address) if kind.lower() == 'utf-8' else xtext_encode(address)}"


MAIL_CHECKS = {"RET": (check_ret, BAD_RET), "ENVID": (check_envid, BAD_ENVID)}
RCPT_CHECKS = {"NOTIFY": (check_notify, BAD_NOTIFY), "ORCPT": (check_orcpt, BAD_ORCPT)}
