"""cleanup: what happens to every message on its way into the queue (Postfix's cleanup(8)).

- Local submissions (``trimail sendmail``) get missing ``From:``, ``Date:`` and
  ``Message-ID:`` headers, CRLF line ends, and bare addresses qualified with
  ``myorigin`` (``append_at_myorigin``) or ``mydomain`` (``append_dot_mydomain``).
- ``virtual_alias_maps`` rewrites envelope recipients, for any domain: the full
  address is looked up, then ``@domain``; results expand recursively (bounded),
  a result equal to its key stops the recursion, duplicates are dropped.
- Masquerading (``masquerade_domains``, ``masquerade_exceptions``,
  ``masquerade_classes``) strips subdomains: ``joe@host.sub.example.com`` becomes
  ``joe@example.com`` for ``masquerade_domains = example.com``; ``!domain`` stops it
  for that domain; the classes say which addresses it applies to.

All functions here are pure (text in, text out) except the table lookups.
"""

from __future__ import annotations

import email.utils
import re

from trimail.maps import Table, lookup_first

VIRTUAL_DEPTH = 100
VIRTUAL_MAX = 1000

_HEADER_CLASSES = {
    "header_sender": ("from", "sender", "reply-to", "errors-to", "resent-from", "resent-sender"),
    "header_recipient": ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc"),
}


def masquerade(address: str, domains: list[str], exceptions: list[str]) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not domains or local.lower() in {e.lower() for e in exceptions}:
        return address
    lowered = domain.lower()
    for entry in domains:
        entry = entry.lower().lstrip(".")
        if entry.startswith("!"):
            name = entry[1:]
            if lowered == name or lowered.endswith("." + name):
                return address
            continue
        if lowered.endswith("." + entry):
            return f"{local}@{entry}"
        if lowered == entry:
            return address
    return address


_ADDR = re.compile(r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+)@([A-Za-z0-9.-]+)")


def masquerade_header_value(value: str, domains: list[str], exceptions: list[str]) -> str:
    return _ADDR.sub(lambda m: masquerade(m.group(0), domains, exceptions), value)


def split_header(content: bytes) -> tuple[bytes, bytes]:
    """(header section including its final CRLF, rest starting at the blank line)."""
    if content.startswith(b"\r\n"):
        return b"", content
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 2:]


def header_fields(header: bytes) -> list[bytes]:
    """The header section as a list of whole fields (with their continuation lines)."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n")[:-1] if header.endswith(b"\r\n") else header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def masquerade_headers(content: bytes, domains: list[str], exceptions: list[str], classes: list[str]) -> bytes:
    names = {n for c in classes for n in _HEADER_CLASSES.get(c, ())}
    if not domains or not names:
        return content
    header, rest = split_header(content)
    out = []
    for field in header_fields(header):
        if field_name(field) in names:
            name, _, value = field.partition(b":")
            text = value.decode("utf-8", "surrogateescape")
            field = name + b":" + masquerade_header_value(text, domains, exceptions).encode("utf-8", "surrogateescape")
        out.append(field)
    return b"".join(f + b"\r\n" for f in out) + rest


def qualify(address: str, myorigin: str, mydomain: str, append_at_myorigin: bool, append_dot_mydomain: bool) -> str:
    """user -> user@myorigin; user@host -> user@host.mydomain (Postfix's canonicalisation)."""
    if not address or address.startswith("@"):
        return address
    if "@" not in address:
        return f"{address}@{myorigin}" if append_at_myorigin else address
    local, _, domain = address.rpartition("@")
    if append_dot_mydomain and "." not in domain and not domain.startswith("["):
        return f"{local}@{domain}.{mydomain}"
    return address


def virtual_expand(recipients: list[str], tables: list[Table]) -> list[str]:
    """Rewrite recipients through virtual_alias_maps (recursively, bounded)."""
    if not tables:
        return recipients
    out: list[str] = []
    seen: set[str] = set()

    def expand(address: str, depth: int) -> None:
        key = address.lower()
        if depth > VIRTUAL_DEPTH:
            raise ValueError(f"virtual alias expansion of {address} is deeper than {VIRTUAL_DEPTH}")
        value = lookup_first(tables, key)
        if value is None and "@" in key:
            value = lookup_first(tables, "@" + key.rpartition("@")[2])
        if value is None:
            if key not in seen:
                seen.add(key)
                out.append(address)
            return
        for target in re.split(r"[,\s]+", value.strip()):
            if not target:
                continue
            if target.lower() == key:  # "a@x a@x, b@y": keep a@x itself
                if key not in seen:
                    seen.add(key)
                    out.append(target)
                continue
            expand(target, depth + 1)
        if len(out) > VIRTUAL_MAX:
            raise ValueError(f"virtual alias expansion has more than {VIRTUAL_MAX} recipients")

    for recipient in recipients:
        expand(recipient, 0)
    return out


def complete_headers(content: bytes, *, sender: str, full_name: str | None, hostname: str,
                     queue_id: str) -> bytes:
    """Add From:, Date: and Message-ID: when a locally submitted message lacks them."""
    header, rest = split_header(content)
    present = {field_name(f) for f in header_fields(header)}
    added = []
    if "from" not in present:
        shown = email.utils.formataddr((full_name, sender)) if full_name else f"<{sender}>" if sender else \
            f"MAILER-DAEMON@{hostname}"
        added.append(f"From: {shown}")
    if "date" not in present:
        added.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if "message-id" not in present:
        added.append(f"Message-Id: <{queue_id}@{hostname}>")
    extra = "".join(line + "\r\n" for line in added).encode("utf-8")
    if not rest:
        rest = b"\r\n"
    return header + extra + rest


def normalize_newlines(data: bytes) -> bytes:
    """Any of CRLF, bare LF, bare CR line ends to CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)
