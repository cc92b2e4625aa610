"""Value types of main.cf parameters: the parsers the registry names, one per type.

Each parser takes the expanded text of a value and returns the typed value or
raises ``ValueError``; ``BadValue`` carries Postfix's own words for a bad number,
time or boolean (mail_conf_int.c, mail_conf_time.c, mail_conf_bool.c), which
``Config`` completes with the parameter's name and location.  Pure functions: no
file, no network, no name lookup (a host name in an address list is refused, not
resolved).

Parameters: none (the parsers are given values; ``trimail.config.registry`` names
which parameter has which parser).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any


class BadValue(ValueError):
    """A bad number, time or boolean, reported in Postfix's words (mail_conf_int.c,
    mail_conf_time.c, mail_conf_bool.c): *template* gets the parameter's name and
    the value as ``{name}`` and ``{value}``."""

    def __init__(self, template: str, value: str):
        super().__init__(template.format(name="parameter", value=value))
        self.template = template
        self.value = value

    def render(self, name: str) -> str:
        return self.template.format(name=name, value=self.value)


_BAD_NUMBER = "bad numerical configuration: {name} = {value}"


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise BadValue("bad boolean configuration: {name} = {value} (use yes or no)", text.strip())


def parse_int(text: str) -> int:
    """A whole number, as strtol() takes it in Postfix: no unit, no fraction."""
    value = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", value) or len(value) > 19:
        raise BadValue(_BAD_NUMBER, value)
    return int(value)


_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_workers(text: str) -> int:
    """``auto`` (one per core) or a count; 0 is the single-process mode."""
    if text.strip().lower() == "auto":
        return os.cpu_count() or 1
    value = parse_int(text)
    if value < 0:
        raise ValueError(f"bad worker count {text!r} (auto, 0 or more)")
    return value


def parse_time(text: str, default_unit: str = "s") -> float:
    """Postfix time value: ``300s``, ``5m``, ``1h``, ``5d``, ``2w``, or a bare number
    in the parameter's default unit.  Several terms add up (``1h30m``)."""
    value = text.strip().lower()
    terms = re.findall(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)([smhdw]?)", value)
    if not value or "".join(n + u for n, u in terms) != value:
        raise BadValue("parameter {name}: bad time value or unit: {value} (use a number with unit s, m, h, "
                       "d or w)", text.strip())
    return float(sum(float(n) * _TIME_UNITS[u or default_unit] for n, u in terms))


def parse_size(text: str) -> int:
    """A byte count: a plain whole number, as Postfix takes it (``10MB`` or ``10m``
    is fatal there, and here)."""
    return parse_int(text)


def parse_reject_code(text: str) -> int:
    """An SMTP reply code for a refusal: 4xx or 5xx (Postfix's unknown_*_reject_code)."""
    value = parse_int(text)
    if not 400 <= value <= 599:
        raise ValueError(f"bad reject code {text!r} (use 4xx or 5xx)")
    return value


def split_list(text: str, *, commas: bool = True) -> list[str]:
    """Postfix list: elements separated by commas and/or white space (white space only
    without *commas*, as master.cf's ``-o`` words); ``{ ... }`` groups (as in
    ``inline:{ a=b, c=d }``) stay one element."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and ((commas and ch == ",") or ch.isspace()):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '{{' in {text!r}")
    if current:
        items.append("".join(current))
    return items


_MAP_TYPES = frozenset(
    {"hash", "btree", "texthash", "inline", "static", "cidr", "regexp", "pcre", "unix", "fail"}
)


def parse_domain_names(text: str) -> list[str]:
    """A domain list of names only (virtual_alias_domains, virtual_mailbox_domains):
    Postfix's ``type:table`` and ``/file`` entries are refused, not silently unmatched."""
    names = split_list(text)
    for name in names:
        if ":" in name or "/" in name or "{" in name:
            raise ValueError(f"{name!r}: only domain names are supported here, not lookup tables or files")
    return names


def parse_maps(text: str) -> list[str]:
    """A list of lookup-table references ``type:name``."""
    maps = split_list(text)
    for ref in maps:
        kind, sep, name = ref.partition(":")
        if not sep or not name:
            raise ValueError(f"bad lookup table reference {ref!r} (use type:name, e.g. hash:/etc/aliases)")
        if kind not in _MAP_TYPES:
            raise ValueError(f"unsupported lookup table type {kind!r} in {ref!r}")
    return maps



def parse_user_list(text: str) -> list[str]:
    """Postfix's list of users (authorized_mailq_users, authorized_flush_users,
    authorized_submit_users): user names (``unknown``: a uid without one), ``uid:N``
    for a uid whatever its name, ``type:table`` lookups (``static:anyone`` names
    every user), each may be negated with ``!``; the first match decides
    (trimail/userlists.py)."""
    items = split_list(text)
    for item in items:
        pattern = item.removeprefix("!")
        if not pattern or pattern.startswith("!"):  # "! www-data" is two entries: the second lets www-data in
            raise ValueError(f"no user name or table after '!' in {item!r} (write !name, without a space)")
        kind, sep, _ = pattern.partition(":")
        if sep and kind != "uid":
            parse_maps(pattern)  # a lookup table: a known type and a name
        elif kind == "uid" and not pattern[4:].isdigit():
            raise ValueError(f"bad uid in {item!r} (use uid:N)")
    return items

@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(item: str, default_port: int | None = None) -> ListenAddress:
    """``host:port`` or ``[v6addr]:port``; a bare host takes *default_port*."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", item)
    if not m:
        raise ValueError(f"bad address {item!r} (use host:port or [ipv6]:port)")
    host = m.group(1) or m.group(3)
    port_text = m.group(2) or m.group(4)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {item!r} has no port (use host:port)")
        port = default_port
    else:
        port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port in {item!r}")
    if host == "*":
        host = "0.0.0.0"
    return ListenAddress(host, port)


def parse_listen(text: str) -> list[ListenAddress]:
    return [parse_host_port(item) for item in split_list(text)]


def parse_nameservers(text: str) -> list[ListenAddress]:
    servers = [parse_host_port(item, default_port=53) for item in split_list(text)]
    for server in servers:
        try:
            ipaddress.ip_address(server.host)
        except ValueError:
            raise ValueError(f"dns_nameservers wants IP addresses, not {server.host!r}") from None
    return servers


def parse_count(text: str) -> int:
    """A limit where 0 means no limit: a whole number, 0 or more (every whole-number
    parameter has a minimum of 0 or more, see ``Param.minimum``)."""
    return parse_int(text)


@dataclasses.dataclass(frozen=True, slots=True)
class Feedback:
    """Concurrency feedback (Postfix's qmgr_feedback.c): *base*, divided by the
    destination's concurrency window when *per_concurrency* (``1/concurrency``)."""

    base: float
    per_concurrency: bool = False

    def at(self, window: int) -> float:
        return self.base / max(1, window) if self.per_concurrency else self.base


def parse_feedback(text: str) -> Feedback:
    """``number``, ``number/number`` or ``number/concurrency``, in 0..1 (0: none)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/\s*(concurrency|\d+(?:\.\d*)?|\.\d+))?\s*", text)
    if m is None:
        raise ValueError(f"bad feedback value {text!r} (use a number, number/number or number/concurrency)")
    base = float(m.group(1))
    per = m.group(2) == "concurrency"
    if m.group(2) and not per:
        denominator = float(m.group(2))
        if denominator <= 0:
            raise ValueError(f"bad feedback value {text!r}: division by zero")
        base /= denominator
    if not 0 <= base <= 1:
        raise ValueError(f"feedback value {text!r} is outside the range 0..1")
    return Feedback(base, per)


def parse_addresses(text: str) -> list[str]:
    """A list of IP addresses (IPv6 with or without brackets), normalised."""
    out = []
    for item in split_list(text):
        try:
            out.append(str(ipaddress.ip_address(item[1:-1] if item.startswith("[") and item.endswith("]")
                                                else item)))
        except ValueError:
            raise ValueError(f"bad IP address {item!r} (host names are not looked up here)") from None
    return out


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``mynetworks``: CIDR blocks, IPv6 in brackets as Postfix writes them."""
    nets = []
    for item in split_list(text):
        m = re.fullmatch(r"\[([^\]]+)\](/\d+)?", item)
        spec = (m.group(1) + (m.group(2) or "")) if m else item
        try:
            nets.append(ipaddress.ip_network(spec, strict=False))
        except ValueError:
            raise ValueError(f"bad network {item!r} (use address/prefix, e.g. 192.0.2.0/24)") from None
    return nets


def parse_lock_methods(text: str) -> list[str]:
    """``mailbox_delivery_lock``: some of fcntl, flock, dotlock (Postfix's names)."""
    methods = split_list(text)
    for method in methods:
        if method not in ("fcntl", "flock", "dotlock"):
            raise ValueError(f"unknown locking method {method!r} (use fcntl, flock and/or dotlock)")
    return methods


def parse_5xx(text: str) -> int:
    """A permanent-error reply code (500-599), for the ``*_reject_code`` parameters."""
    code = parse_int(text)
    if not 500 <= code <= 599:
        raise ValueError(f"bad reply code {text!r} (use a 5XX code such as 550)")
    return code


def choice(*options: str) -> Callable[[str], str]:
    """One of *options* (an empty option allows an empty value)."""
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"bad value {text!r} (use one of: {', '.join(options)})")
        return value

    _KINDS[parse] = "one of: " + ", ".join(option or "(empty)" for option in options)
    return parse



def parse_text(text: str) -> str:
    """A string parameter: the value without surrounding white space."""
    return text.strip()


def reply_code_parser(first: str) -> Callable[[str], int]:
    """An SMTP reply code whose first digit is in *first* (e.g. "45")."""
    def parse(text: str) -> int:
        value = parse_int(text)
        if not (200 <= value <= 599 and str(value)[0] in first):
            raise ValueError(f"bad SMTP reply code {text!r} (use {' or '.join(d + 'xx' for d in first)})")
        return value
    _KINDS[parse] = "reply code " + "/".join(d + "xx" for d in first)
    return parse


TIME_UNIT: dict[Callable[[str], float], str] = {}
"""The time parsers, each with the unit a bare number is taken in."""


@functools.cache
def time_parser(default_unit: str = "s") -> Callable[[str], float]:
    """A time value in seconds, a bare number taken in *default_unit* (one parser per unit)."""
    def parse(text: str) -> float:
        return parse_time(text, default_unit)

    TIME_UNIT[parse] = default_unit
    return parse


_KINDS: dict[Callable[[str], Any], str] = {
    parse_bool: "boolean",
    parse_int: "integer",
    parse_count: "integer (0: no limit)",
    parse_size: "size",
    parse_workers: "auto or integer",
    parse_reject_code: "reply code 4xx/5xx",
    parse_5xx: "reply code 5xx",
    parse_text: "string",
    split_list: "list",
    parse_domain_names: "domain names",
    parse_maps: "lookup tables",
    parse_user_list: "user names and lookup tables",
    parse_listen: "host:port list",
    parse_nameservers: "IP[:port] list",
    parse_feedback: "feedback",
    parse_addresses: "IP addresses",
    parse_networks: "networks",
    parse_lock_methods: "lock methods",
}


def register_kind(parse: Callable[[str], Any], words: str) -> None:
    """Name the type of a parser defined outside this module (for the parameter table)."""
    _KINDS[parse] = words


def describe(parse: Callable[[str], Any]) -> str:
    """The type of values *parse* takes, in the words of the parameter table."""
    if parse in TIME_UNIT:
        return "time"
    return _KINDS[parse]


def python_type(parse: Callable[[str], Any]) -> str:
    """The Python type *parse* returns, as written in its annotation."""
    annotation = parse.__annotations__["return"]
    return annotation if isinstance(annotation, str) else annotation.__name__
