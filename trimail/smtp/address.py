"""Envelope address syntax: ``MAIL FROM:<path> params`` and ``RCPT TO:<path> params``.

RFC 5321 section 4.1.2 grammar, with Postfix's tolerance for a space after the colon
and for a missing pair of angle brackets around a plain address.  Source routes
(``<@a,@b:user@c>``) are accepted and dropped (RFC 5321 appendix C).

Security notes: an address never contains control characters, NUL, CR or LF, and
never exceeds the RFC length limits, so nothing downstream (logs, headers, file
names) can be injected through it.  Non-ASCII is accepted only when the caller
says SMTPUTF8 was declared.
"""

from __future__ import annotations

import dataclasses
import re

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """The path or its parameters break the syntax; ``str()`` is the reply text."""


class Utf8NotDeclared(AddressError):
    """A non-ASCII address in a transaction without SMTPUTF8 (RFC 6531 3.4)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Path:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?:[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\-\x80-\U0010ffff]{0,61}[A-Za-z0-9\x80-\U0010ffff])?)")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_domain(text: str) -> bool:
    if len(text) > MAX_DOMAIN or not text:
        return False
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        if _IPV4.fullmatch(literal):
            return all(int(part) < 256 for part in literal.split("."))
        return literal.lower().startswith("ipv6:") and re.fullmatch(r"[0-9A-Fa-f:.]+", literal[5:]) is not None
    return all(_LABEL.fullmatch(label) for label in text.rstrip(".").split("."))


def check_mailbox(address: str, *, utf8: bool) -> str:
    """Validate ``local@domain`` and return it; raise AddressError."""
    if _CONTROL.search(address):
        raise AddressError("control character in address")
    if not utf8 and not address.isascii():
        raise Utf8NotDeclared("non-ASCII address without SMTPUTF8")
    local, sep, domain = address.rpartition("@")
    if not sep:
        # RFC 5321 4.5.1: <postmaster> without a domain must be accepted for RCPT
        if address.lower() == "postmaster":
            return address
        raise AddressError("address has no domain")
    if not local or len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("bad local part")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise AddressError("bad local part")
    if not is_domain(domain):
        raise AddressError("bad domain")
    return address


def parse_path(argument: str, prefix: str, *, utf8_allowed: bool) -> Path:
    """Parse the argument of MAIL (``prefix="FROM:"``) or RCPT (``"TO:"``).

    The SMTPUTF8 parameter on the same MAIL command allows a UTF-8 address, so
    parameters are parsed before the address is checked.
    """
    if argument[: len(prefix)].upper() != prefix:
        raise AddressError("syntax")
    rest = argument[len(prefix):].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            raise AddressError("syntax")
        path, params_text = rest[1:end], rest[end + 1:]
        if params_text and not params_text.startswith(" "):
            raise AddressError("syntax")
    else:
        path, _, params_text = rest.partition(" ")
        if not path:
            raise AddressError("syntax")
    params = parse_params(params_text)
    if len(path) > MAX_PATH:
        raise AddressError("path too long")
    if path.startswith("@"):  # source route: <@relay1,@relay2:user@domain>
        route, colon, path = path.partition(":")
        if not colon:
            raise AddressError("bad source route")
    if path == "":
        return Path("", params)
    utf8 = utf8_allowed or "SMTPUTF8" in params
    return Path(check_mailbox(path, utf8=utf8), params)


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing a path that starts at text[0] == '<', honouring
    quoted local parts; -1 when there is none."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_params(text: str) -> dict[str, str | None]:
    """``KEY=VALUE`` and ``KEY`` parameters; keys upper-cased (RFC 5321 4.1.2)."""
    params: dict[str, str | None] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (sep and (not value or _CONTROL.search(value))):
            raise AddressError(f"bad parameter {item!r}")
        params[key.upper()] = value if sep else None
    return params
