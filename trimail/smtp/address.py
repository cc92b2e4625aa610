"""Envelope address syntax: ``MAIL FROM:<path> params`` and ``RCPT TO:<path> params``.

RFC 5321 section 4.1.2 grammar, with Postfix's tolerance for a space after the colon
and for a missing pair of angle brackets around a plain address.  A path without a domain
(``<user>``, ``<Postmaster>``) is a valid local part alone, as Postfix's smtpd takes
it; the decision side qualifies it (``user@$myorigin``).  Source routes
(``<@a,@b:user@c>``, the A-d-l) are accepted and dropped (RFC 5321 appendix C: a
server SHOULD accept and ignore them; Postfix's resolver strips them), in MAIL and
RCPT alike.  The route ends at the first colon outside an address literal or a
quoted string (``<@[IPv6:::1]:u@d>``, RFC 821 allowed ``@[dotnum]``); each of its
at-domains must be a domain or an address literal, or the path is refused.

A domain must also be usable as a DNS name (``dns_name``): every label at most
63 octets and the whole name at most 255 octets in wire form (RFC 1035 2.3.4),
both counted after IDNA (UTS #46 non-transitional mapping, then the A-label of
IDNA 2008, as dnspython converts it), with no empty label.  A name a resolver
cannot even express is refused here (``501 5.1.7``/``501 5.1.3``), so it never
reaches the queue and the DNS code; the router and the DNS edge check again for
mail queued before this rule existed.

Security notes: an address never contains control characters (C0, C1, DEL: NUL,
CR and LF among them), Unicode line or paragraph separators (U+2028, U+2029) or
bidirectional formatting marks (U+061C, U+200E/F, U+202A-E, U+2066-9), even with
SMTPUTF8 (``501 5.1.3``/``501 5.1.7``), and never exceeds the RFC length limits, so
nothing downstream (logs, headers, terminals, file names) can be split, reordered
or injected through it.  Non-ASCII is accepted only when the caller
says SMTPUTF8 was declared.  IDNA work is bounded by the 255-character domain
limit checked first.
"""

from __future__ import annotations

import dataclasses
import functools
import re

try:  # the IDNA 2008 codec dnspython uses when it is installed (trio requires it)
    import idna as _idna
except ImportError:  # pragma: no cover - dnspython then falls back to IDNA 2003 too
    _idna = None

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_LABEL = 63  # octets of one DNS label (RFC 1035 2.3.4)
MAX_WIRE_NAME = 255  # octets of a whole DNS name in wire form, length bytes and root included


class AddressError(ValueError):
    """The path or its parameters break the syntax; ``str()`` is the reply text."""


class Utf8NotDeclared(AddressError):
    """A non-ASCII address in a transaction without SMTPUTF8 (RFC 6531 3.4)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Path:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]
    repeated: frozenset[str] = frozenset()  # keys given more than once (the value kept is the last)


# Character classes with every non-ASCII character are written as the ASCII they leave
# out: sre compiles [...\x80-\U0010ffff] in about 3 ms per class, which every process
# paid at start (29 ms for these, of a CLI tool's 400).  tests/smtp/test_address_classes.py
# checks them against their positive forms over all of Unicode.
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f]'  # RFC 5321 atext, and UTF-8 (RFC 6531)
_QTEXT = r'[^\x00-\x1f"\\\x7f]'  # qtextSMTP: %d32-33 / %d35-91 / %d93-126, and UTF-8
_LET_DIG = r"[^\x00-\x2f:-@\[-`{-\x7f]"  # A-Z a-z 0-9, and UTF-8
_LDH = r"[^\x00-\x2c./:-@\[-`{-\x7f]"  # A-Z a-z 0-9 -, and UTF-8
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(rf'"(?:{_QTEXT}|\\[\x20-\x7e])*"')
_LABEL = re.compile(rf"(?:{_LET_DIG}(?:{_LDH}{{0,61}}{_LET_DIG})?)")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")
# C0 and C1 controls and DEL; U+2028/U+2029 (line and paragraph separators: a line
# break to many log readers and editors); the bidi marks, embeddings, overrides and
# isolates (U+061C, U+200E/F, U+202A-E, U+2066-9) that reorder what a terminal shows
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


_DOTS = re.compile("[.\u3002\uff0e\uff61]")  # the full stops IDNA and dnspython split on


def ascii_upper(text: str) -> str:
    """*text* in upper case as SMTP compares its keywords: in ASCII only (Postfix's
    strcasecmp).  ``str.upper()`` maps "ı" to "I" and "ſ" to "S": ``MAıL`` was MAIL to
    trimail and no command at all to Postfix or a filter in front of it (red team 31).
    A word with other characters stays as it is, and so matches no keyword."""
    return text.upper() if text.isascii() else text


def is_domain(text: str) -> bool:
    """A domain (final dots aside) or an address literal that mail can be
    routed to: RFC 5321 syntax, and a name DNS can express (``dns_name``)."""
    if len(text) > MAX_DOMAIN or not text:
        return False
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        if _IPV4.fullmatch(literal):
            return all(int(part) < 256 for part in literal.split("."))
        return literal.lower().startswith("ipv6:") and re.fullmatch(r"[0-9A-Fa-f:.]+", literal[5:]) is not None
    name = text.rstrip(".")  # final dots are dropped before routing (smtpd, route)
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return False
    return dns_name(name) is not None


@functools.lru_cache(maxsize=4096)  # pure; each message asks for its domains several times
def dns_name(domain: str) -> bytes | None:
    """*domain* as the ASCII name a resolver sends (A-labels, dot-separated, no
    final dot), or None when it cannot be a DNS name: an empty label, a label
    over 63 octets or a name over 255 octets in wire form after IDNA, or a
    U-label IDNA cannot encode.  Pure; never raises for any ``str``."""
    if not domain or len(domain) > MAX_DOMAIN:
        return None
    if domain.isascii():  # nearly every name: the labels are their own A-labels
        name = domain[:-1] if len(domain) > 1 and domain[-1] == "." else domain  # one final dot: absolute
        labels = name.split(".")
        if "" in labels or max(map(len, labels)) > MAX_LABEL or len(name) + 2 > MAX_WIRE_NAME:
            return None
        return name.encode("ascii")
    return _idna_name(domain)


def _idna_name(domain: str) -> bytes | None:
    """``dns_name`` label by label, through IDNA (any text; the general case)."""
    labels = _DOTS.split(domain)
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one final dot: the name is absolute
    encoded: list[bytes] = []
    for label in labels:
        alabel = _alabel(label)
        if alabel is None or not 0 < len(alabel) <= MAX_LABEL:
            return None
        encoded.append(alabel)
    if sum(len(label) + 1 for label in encoded) + 1 > MAX_WIRE_NAME:
        return None
    return b".".join(encoded)


def _alabel(label: str) -> bytes | None:
    """The ASCII form of one label (IDNA for non-ASCII), or None when it has none."""
    if label.isascii():
        return label.encode("ascii")
    try:
        if _idna is not None:
            return bytes(_idna.alabel(_idna.uts46_remap(label, std3_rules=False, transitional=False)))
        return label.encode("idna")  # pragma: no cover - IDNA 2003, as dnspython without idna
    except (ValueError, UnicodeError):  # idna.IDNAError is a UnicodeError
        return None


def check_mailbox(address: str, *, utf8: bool) -> str:
    """Validate ``local@domain`` and return it; raise AddressError."""
    if _CONTROL.search(address):
        raise AddressError("control character in address")
    if not utf8 and not address.isascii():
        raise Utf8NotDeclared("non-ASCII address without SMTPUTF8")
    local, sep, domain = address.rpartition("@")
    bare = not sep or _QUOTED.fullmatch(address) is not None
    if bare:
        # no domain: RFC 5321 4.5.1's <postmaster>, and as Postfix any local part
        # (smtpd qualifies it: user@$myorigin, trimail/rewrite.py canonical())
        local = address
    if not local or len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("bad local part")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise AddressError("bad local part")
    if bare:
        return address
    if not is_domain(domain):
        raise AddressError("bad domain")
    return address


def parse_path(argument: str, prefix: str, *, utf8_allowed: bool) -> Path:
    """Parse the argument of MAIL (``prefix="FROM:"``) or RCPT (``"TO:"``).

    The SMTPUTF8 parameter on the same MAIL command allows a UTF-8 address, so
    parameters are parsed before the address is checked.
    """
    if ascii_upper(argument[: len(prefix)]) != prefix:
        raise AddressError("syntax")
    rest = argument[len(prefix):].lstrip(" ")
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:  # Postfix: "Bad sender/recipient address syntax", not the command's syntax
            raise AddressError("unclosed")
        path, params_text = rest[1:end], rest[end + 1:]
        if params_text and not params_text.startswith(" "):
            raise AddressError("syntax")
    else:
        path, _, params_text = rest.partition(" ")
        if not path:
            raise AddressError("syntax")
    params, repeated = parse_params_repeated(params_text)
    if len(path) > MAX_PATH:
        raise AddressError("path too long")
    if path.startswith("@"):  # source route: <@relay1,@relay2:user@domain>
        end = source_route_end(path)
        if end < 0 or not all(hop.strip().startswith("@") and is_domain(hop.strip()[1:])
                              for hop in path[:end].split(",")):
            raise AddressError("bad source route")
        path = path[end + 1:]
    if path == "":
        return Path("", params, repeated)
    utf8 = utf8_allowed or "SMTPUTF8" in params
    return Path(check_mailbox(path, utf8=utf8), params, repeated)


def source_route_end(text: str) -> int:
    """Index of the colon that ends the source route *text* starts with (the first
    colon outside an address literal or a quoted string, as Postfix's tokenizer
    sees it); -1 when *text* does not start with a route."""
    if not text.startswith("@"):
        return -1
    quoted = bracket = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"' and not bracket:
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "[":
            bracket = True
        elif ch == "]":
            bracket = False
        elif ch == ":" and not bracket:
            return i
    return -1


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing a path that starts at text[0] == '<', honouring
    quoted local parts; -1 when there is none."""
    if '"' not in text:  # nothing quoted (nearly every path): the first '>'
        return text.find(">", 1)
    return _scan_closing_bracket(text)


def _scan_closing_bracket(text: str) -> int:
    """``_closing_bracket`` character by character (any text; the general case)."""
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
    return parse_params_repeated(text)[0]


def parse_params_repeated(text: str) -> tuple[dict[str, str | None], frozenset[str]]:
    """The parameters and the keys given more than once (a repeated DSN parameter is
    refused, as Postfix's smtpd refuses it)."""
    params: dict[str, str | None] = {}
    repeated: set[str] = set()
    for item in text.split():
        key, sep, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or (sep and (not value or _CONTROL.search(value))):
            raise AddressError(f"bad parameter {item!r}")
        key = ascii_upper(key)
        if key in params:
            repeated.add(key)
        params[key] = value if sep else None
    return params, frozenset(repeated)
