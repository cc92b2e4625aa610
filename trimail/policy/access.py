"""access(5): lookup keys for addresses and clients, and what a table's answer means.

Address lookups try, in order: ``user@domain``, ``domain``, each parent domain
(``.parent`` form, or the bare parent when ``parent_domain_matches_subdomains``
names the calling restriction class), and ``user@``.  Client lookups try the
host name and its parents, then the IP address and its shorter prefixes
(``1.2.3.4``, ``1.2.3``, ``1.2``, ``1``; IPv6 by nibble-free colon groups).

Results: ``OK`` (permit), ``DUNNO`` (go on), ``REJECT [text]``, ``DEFER [text]``,
``DEFER_IF_PERMIT``/``DEFER_IF_REJECT`` (a 450 remembered by the engine: answered
if the rest permits / instead of a later reject), ``4NN text``/``5NN text``,
``DISCARD``, ``HOLD``, ``REDIRECT addr``, ``FILTER transport:nexthop``, ``BCC addr``,
``PREPEND header``, ``WARN text``, or the name of a restriction (evaluated by the
caller).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re


@dataclasses.dataclass(frozen=True, slots=True)
class AccessResult:
    action: str  # ok, dunno, reject, defer, defer_if_permit, defer_if_reject, code, discard, hold, redirect,
    #              filter, bcc, prepend, warn, info, restriction
    text: str = ""
    code: int = 0
    enhanced: str = ""


_CODE = re.compile(r"([45]\d\d)(?:\s+([45]\.\d{1,3}\.\d{1,3}))?\s*(.*)", re.DOTALL)


def parse_result(value: str) -> AccessResult:
    value = value.strip()
    word, _, rest = value.partition(" ")
    upper = word.upper()
    rest = rest.strip()
    if re.fullmatch(r"\d+", value):  # an all-numerical result means OK (access(5))
        return AccessResult("ok")
    m = _CODE.fullmatch(value)
    if m:
        code = int(m.group(1))
        enhanced = m.group(2) or ("4.7.1" if code < 500 else "5.7.1")
        return AccessResult("code", m.group(3).strip(), code, enhanced)
    if upper == "OK":
        return AccessResult("ok")
    if upper == "DUNNO":
        return AccessResult("dunno")
    if upper == "REJECT":
        return AccessResult("reject", rest)
    if upper == "DEFER":
        return AccessResult("defer", rest)
    if upper in ("DEFER_IF_PERMIT", "DEFER_IF_REJECT"):
        return AccessResult(upper.lower(), rest)
    if upper in ("DISCARD", "HOLD", "REDIRECT", "PREPEND", "WARN", "INFO", "FILTER", "BCC"):
        return AccessResult(upper.lower(), rest)
    return AccessResult("restriction", value)


def address_keys(address: str, parent_matches: bool) -> list[str]:
    local, at, domain = address.rpartition("@")
    if not at:
        return [address.lower(), f"{address.lower()}@"]
    domain = domain.lower().rstrip(".")
    keys = [f"{local.lower()}@{domain}", domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        keys.append(parent if parent_matches else "." + parent)
    keys.append(f"{local.lower()}@")
    return keys


def client_keys(address: str, hostname: str | None, parent_matches: bool) -> list[str]:
    keys: list[str] = []
    if hostname and hostname != "unknown":
        labels = hostname.lower().rstrip(".").split(".")
        keys.append(".".join(labels))
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            keys.append(parent if parent_matches else "." + parent)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return keys
    if ip.version == 4:
        parts = str(ip).split(".")
        keys += [".".join(parts[:n]) for n in range(4, 0, -1)]
    else:
        groups = ip.exploded.split(":")
        keys.append(str(ip))
        keys += [":".join(g.lstrip("0") or "0" for g in groups[:n]) for n in range(7, 0, -1)]
    return keys
