"""SPF records (RFC 7208) as values: the parser and the macro language, no DNS.

``parse(text)`` turns a ``v=spf1 ...`` record into ``Record`` (its directives in
order, ``redirect=`` and ``exp=``) or raises ``SpfPermError``: RFC 7208 section
4.6 wants the whole record checked before any term is evaluated, so a syntax
error anywhere is a ``permerror`` even when an earlier term would have matched.
``expand(macro_string, env)`` is section 7's macro expansion.

Security notes: everything here comes from DNS, so from anyone: the parser is
strict (a term it does not know is an error, as the RFC says), bounded by the
record's length (a TXT answer), and every failure is ``SpfPermError``; an
expanded name longer than 253 octets loses labels on the left (section 7.3), in
one cut (time linear in the expansion, which a 64 kB record of ``%{h}`` macros
makes megabytes long).

Parameters: none read.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse

MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_VERSION = re.compile(r"(?i)v=spf1(?: |$)")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9._-]*)(.*)", re.DOTALL)
_MACRO = re.compile(r"%(?:\{([A-Za-z])(\d*)(r?)([.\-+,/_=]*)\}|(.)|$)", re.IGNORECASE)
_DUAL_CIDR = re.compile(r"(?:/(0|[1-9]\d?))?(?://(0|[1-9]\d{0,2}))?\Z")
_TOPLABEL = re.compile(r"(?i)(?=[a-z0-9]*[a-z])[a-z0-9]+|[a-z0-9]+-[a-z0-9-]*[a-z0-9]")
MACRO_LETTERS = "slodiphcrtv"
EXPLANATION_ONLY = "crt"


class SpfPermError(Exception):
    """The record or a name made from it is not valid SPF: ``permerror``."""


@dataclasses.dataclass(frozen=True, slots=True)
class Directive:
    qualifier: str  # pass, fail, softfail, neutral
    mechanism: str  # one of MECHANISMS
    domain: str | None = None  # the domain-spec (macro-string), None for the current domain
    network: str | None = None  # ip4:/ip6: the address
    cidr4: int | None = None
    cidr6: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    directives: tuple[Directive, ...]
    redirect: str | None = None
    explanation: str | None = None


def is_spf(text: str) -> bool:
    """Is this TXT string an SPF version 1 record (section 4.5)?"""
    return bool(_VERSION.match(text))


def parse(text: str) -> Record:
    if not is_spf(text):
        raise SpfPermError("not an SPF record")
    directives: list[Directive] = []
    modifiers: dict[str, str] = {}
    for term in text[6:].split(" "):
        if not term:
            continue
        mod = _MODIFIER.fullmatch(term)
        if mod and mod.group(1).lower() not in MECHANISMS:
            name, value = mod.group(1).lower(), mod.group(2)
            check_macro_string(value, explanation=False)
            if name in ("redirect", "exp"):
                if name in modifiers:
                    raise SpfPermError(f"{name}= given twice")
                check_domain_spec(value)
                modifiers[name] = value
            continue
        directives.append(_directive(term))
    return Record(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _directive(term: str) -> Directive:
    match = _MECHANISM.fullmatch(term)
    if not match:
        raise SpfPermError(f"bad term {term!r}")
    qualifier = QUALIFIERS[match.group(1) or "+"]
    name, rest = match.group(2).lower(), match.group(3)
    if name not in MECHANISMS:
        raise SpfPermError(f"unknown mechanism {name!r}")
    if name == "all":
        if rest:
            raise SpfPermError(f"bad term {term!r}")
        return Directive(qualifier, name)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise SpfPermError(f"{name} needs an address: {term!r}")
        address, slash, length = rest[1:].partition("/")
        limit = 32 if name == "ip4" else 128
        if slash and not re.fullmatch(r"0|[1-9]\d{0,2}", length) or slash and int(length) > limit:
            raise SpfPermError(f"bad prefix length in {term!r}")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise SpfPermError(f"bad address in {term!r}") from None
        if ip.version != (4 if name == "ip4" else 6):
            raise SpfPermError(f"bad address in {term!r}")
        cidr = int(length) if slash else limit
        return Directive(qualifier, name, network=address,
                         cidr4=cidr if name == "ip4" else None, cidr6=cidr if name == "ip6" else None)
    cidr4 = cidr6 = None
    if name in ("a", "mx"):
        dual = _DUAL_CIDR.search(rest)
        assert dual is not None  # it may match the empty string, never fail
        if dual.group(1) is not None:
            cidr4 = int(dual.group(1))
        if dual.group(2) is not None:
            cidr6 = int(dual.group(2))
        if (cidr4 or 0) > 32 or (cidr6 or 0) > 128:
            raise SpfPermError(f"bad prefix length in {term!r}")
        rest = rest[:dual.start()]
    if not rest:
        if name in ("include", "exists"):
            raise SpfPermError(f"{name} needs a domain: {term!r}")
        return Directive(qualifier, name, cidr4=cidr4, cidr6=cidr6)
    if not rest.startswith(":") or len(rest) == 1:
        raise SpfPermError(f"bad term {term!r}")
    check_domain_spec(rest[1:])
    return Directive(qualifier, name, domain=rest[1:], cidr4=cidr4, cidr6=cidr6)


def check_macro_string(text: str, *, explanation: bool) -> None:
    """SpfPermError unless *text* is a macro-string (letters c, r, t only in exp=)."""
    pos = 0
    while (at := text.find("%", pos)) >= 0:
        if any(not 0x21 <= ord(ch) <= 0x7E for ch in text[pos:at]):
            raise SpfPermError("bad character in a macro string")
        match = _MACRO.match(text, at)
        if not match or match.group(0) == "%" or match.group(5) and match.group(5) not in "%_-":
            raise SpfPermError(f"bad macro in {text!r}")
        letter = match.group(1)
        if letter is not None and (letter.lower() not in MACRO_LETTERS
                                   or not explanation and letter.lower() in EXPLANATION_ONLY
                                   or len(match.group(2)) > 3 or match.group(2) and int(match.group(2)) == 0):
            raise SpfPermError(f"bad macro in {text!r}")
        pos = match.end()
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in text[pos:]):
        raise SpfPermError("bad character in a macro string")


def check_domain_spec(text: str) -> None:
    """SpfPermError unless *text* is a domain-spec: a macro-string ending with a
    macro or with a top label that is not all digits (section 7.1)."""
    check_macro_string(text, explanation=False)
    if text.endswith("}") and "%{" in text:
        return
    labels = text.rstrip(".").split(".")
    if len(labels) < 2 or not _TOPLABEL.fullmatch(labels[-1]):
        raise SpfPermError(f"bad domain-spec {text!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class MacroEnv:
    """What the macros stand for (section 7.3)."""

    sender: str  # local-part@domain; postmaster@helo for the null sender
    domain: str  # the current domain (changes with include: and redirect=)
    ip: str
    helo: str
    receiver: str = "unknown"

    @property
    def local_part(self) -> str:
        return self.sender.rpartition("@")[0] or "postmaster"

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2]


def _ip_text(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    if address.version == 4:
        return str(address)
    return ".".join(address.exploded.replace(":", ""))


def _value(letter: str, env: MacroEnv) -> str:
    letter = letter.lower()
    version = ipaddress.ip_address(env.ip).version
    values = {"s": env.sender, "l": env.local_part, "o": env.sender_domain, "d": env.domain, "h": env.helo,
              "v": "in-addr" if version == 4 else "ip6", "p": "unknown", "r": env.receiver,
              "c": env.ip}
    if letter == "i":
        return _ip_text(env.ip)
    if letter == "t":
        import time

        return str(int(time.time()))
    return values[letter]


def expand(text: str, env: MacroEnv, *, explanation: bool = False) -> str:
    """*text* with its macros replaced (section 7.4); SpfPermError if not valid."""
    check_macro_string(text, explanation=explanation)

    def one(match: re.Match[str]) -> str:
        if match.group(5) is not None:
            return {"%": "%", "_": " ", "-": "%20"}[match.group(5)]
        letter, digits, reverse, delimiters = match.groups()[:4]
        parts = re.split("[" + re.escape(delimiters or ".") + "]", _value(letter, env))
        if reverse:
            parts.reverse()
        if digits:
            parts = parts[-int(digits):]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        return value

    return _MACRO.sub(one, text)


def expand_domain(text: str, env: MacroEnv) -> str:
    """A domain-spec expanded into a name to look up (at most 253 octets)."""
    name = expand(text, env).rstrip(".")
    if len(name) > 253:  # labels off the left, in one cut: a loop copying the rest for each
        # label was quadratic, and "exists:%{h}%{h}..." (64 kB, a HELO of 125 labels)
        # froze the event loop for minutes at MAIL FROM
        dot = name.find(".", len(name) - 254)
        name = name[dot + 1:] if dot >= 0 else name[name.rfind(".") + 1:]
    return name
