"""What the sender asked to be told (RFC 3461), as a queued message keeps it.

A message's params (the JSON of its queue row) hold the DSN requests in wire form:

- ``RET`` and ``ENVID``: MAIL FROM's (``ENVID`` xtext-encoded, as received);
- ``NOTIFY``: one NOTIFY for every recipient (``sendmail -N``);
- ``_DSN_RCPT`` (``RCPT_PARAM``): a JSON object, recipient address as queued ->
  ``{"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a+2Bb@example"}``, for the
  recipients that gave RCPT TO parameters; a recipient that virtual_alias_maps
  expanded passes its own to each address it became (as Postfix's cleanup copies them),
  less SUCCESS: it gets one ``expanded`` notice instead (``cleanup.expanded``).

A message queued before these existed has none of them, and is reported as before:
a recipient without NOTIFY gets failure notices and delay warnings and no success
notice (Postfix's default).  The BCC copies of ``SILENT_PARAM`` are NOTIFY=NEVER
(Postfix's cleanup adds them so).

Parameters: none.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from trimail.smtp import dsn

T = TypeVar("T")

RCPT_PARAM = "_DSN_RCPT"
SILENT_PARAM = "_NOTIFY_NEVER"  # the copies BCC actions added: a JSON list of addresses
_DEFAULT = ("FAILURE", "DELAY")
CACHE_TEXT = 8 << 20  # characters of _DSN_RCPT (and SILENT_PARAM) texts whose parsed form is kept


class _Parsed:
    """*parse* of the texts seen last, kept while their lengths add up to at most
    *limit* characters and at most *entries* of them (the last one always, however
    long: a message of 20,000 recipients would otherwise parse its table once per
    recipient).  A message's _DSN_RCPT is read for each of its recipients, so it is
    parsed once while the message is active; an ``lru_cache`` of 256 kept a quarter of
    a gigabyte alive after 256 messages of 1,000 recipients with long ORCPTs had gone
    (red team 40: 0.56 MB of text and 0.88 MB parsed each).  Thread-safe (the writer
    thread reads ORCPTs for bounces)."""

    def __init__(self, parse: Callable[[str], T], limit: int, entries: int = 256) -> None:
        self.parse, self.limit, self.entries = parse, limit, entries
        self.kept: OrderedDict[str, T] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def __call__(self, text: str) -> T:
        with self.lock:
            if (value := self.kept.get(text)) is not None:
                self.kept.move_to_end(text)
                return value
        value = self.parse(text)
        with self.lock:
            if text not in self.kept:
                self.kept[text] = value
                self.size += len(text)
            while len(self.kept) > 1 and (self.size > self.limit or len(self.kept) > self.entries):
                self.size -= len(self.kept.popitem(last=False)[0])  # the last one stays, however long
        return value


def _parse_table(text: str) -> dict[str, dict[str, str]]:
    try:
        table = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, dict)}


def _parse_silent(text: str) -> frozenset[str]:
    try:
        silent = json.loads(text)
    except ValueError:
        return frozenset()
    return frozenset(a for a in silent if isinstance(a, str)) if isinstance(silent, list) else frozenset()


_table = _Parsed(_parse_table, CACHE_TEXT)
_silent = _Parsed(_parse_silent, CACHE_TEXT)


def per_recipient(params: dict[str, str | None]) -> bool:
    """Whether any recipient of a message with *params* has a NOTIFY or ORCPT."""
    return RCPT_PARAM in params or SILENT_PARAM in params or "NOTIFY" in params


def rcpt_entry(params: dict[str, str | None]) -> dict[str, str]:
    """What to keep of RCPT TO's parameters (checked by the server machine): NOTIFY in
    its normal form, ORCPT as received."""
    entry: dict[str, str] = {}
    if (notify := params.get("NOTIFY")) and (words := dsn.notify_words(notify)):
        entry["NOTIFY"] = ",".join(words)
    if orcpt := params.get("ORCPT"):
        entry["ORCPT"] = orcpt
    return entry


def store(params: dict[str, str | None], entries: dict[str, dict[str, str]]) -> None:
    """Put the recipients' *entries* (address -> rcpt_entry) in a message's *params*."""
    if entries := {a: e for a, e in entries.items() if e}:
        params[RCPT_PARAM] = json.dumps(entries, ensure_ascii=False, sort_keys=True)


def _entry(params: dict[str, str | None], address: str) -> dict[str, str]:
    text = params.get(RCPT_PARAM)
    return _table(text).get(address, {}) if isinstance(text, str) else {}


def notify_of(params: dict[str, str | None], address: str) -> tuple[str, ...] | None:
    """The recipient's NOTIFY words (``("NEVER",)`` for a BCC copy), None if not given."""
    silent = params.get(SILENT_PARAM)
    if isinstance(silent, str) and address in _silent(silent):
        return ("NEVER",)
    value = _entry(params, address).get("NOTIFY") or params.get("NOTIFY")
    return dsn.notify_words(value) if isinstance(value, str) else None


def wants(params: dict[str, str | None], address: str, kind: str) -> bool:
    """Whether the sender is to be told of *kind* (``FAILURE``, ``DELAY``, ``SUCCESS``)
    for *address*: as NOTIFY says, else failures and delays only."""
    return kind in (notify_of(params, address) or _DEFAULT)


def orcpt_of(params: dict[str, str | None], address: str) -> tuple[str, str] | None:
    """The recipient's ORCPT, ``(addr-type, decoded address)``, or None."""
    value = _entry(params, address).get("ORCPT")
    if not value:
        return None
    try:
        return dsn.parse_orcpt(value)
    except dsn.XtextError:
        return None


def envid_of(params: dict[str, str | None]) -> str | None:
    """MAIL FROM's ENVID decoded, or None (also when what is stored is not one)."""
    value = params.get("ENVID")
    if not value or dsn.check_envid(value) is not None:
        return None
    return dsn.xtext_decode(value)


def mail_params(params: dict[str, str | None]) -> list[str]:
    """RET and ENVID for MAIL FROM to a next hop that offers DSN (RFC 3461 5.2.1: passed
    on as received, never made up)."""
    out = []
    if (ret := params.get("RET")) and dsn.check_ret(ret) is None:
        out.append(f"RET={ret.upper()}")
    if (envid := envid_of(params)) is not None:
        out.append(f"ENVID={dsn.xtext_encode(envid)}")
    return out


def rcpt_params(params: dict[str, str | None], address: str) -> list[str]:
    """NOTIFY and ORCPT for RCPT TO to a next hop that offers DSN: the recipient's own,
    xtext-encoded; NOTIFY only when given (RFC 3461 5.2.1)."""
    out = []
    if (words := notify_of(params, address)) is not None:
        out.append(f"NOTIFY={','.join(words)}")
    if (orcpt := orcpt_of(params, address)) is not None:
        out.append(f"ORCPT={dsn.orcpt_param(*orcpt)}")
    return out
