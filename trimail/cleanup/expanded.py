"""The success notice of a virtual alias expansion (RFC 3461 6.2.7.3), as Postfix's
cleanup_out_recipient sends it.

A recipient that asked NOTIFY=SUCCESS and that virtual_alias_maps makes into other
addresses (one or many) gets one ``expanded`` success notice ("alias expanded"),
and the addresses it became get its NOTIFY without SUCCESS (NEVER when it said
SUCCESS alone) and its ORCPT: Postfix's option (b) of the three RFC 3461 allows.
Copying SUCCESS to each address made one RCPT a notice from every next hop the
alias reaches, and this MTA's own notice named every address of the alias (who is
on a list is none of the sender's business).

The notice is queued in the transaction that queues the message (``insert``), so
both are there or neither; mail from the null sender gets none.  The same holds for
a local submission with ``sendmail -N success`` (``expand``).

Parameters: none (myhostname through the caller).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from trimail.cleanup.rewrite import virtual_expand
from trimail.delivery import notify
from trimail.delivery.bounce import Failure, dsn_parts, header_lines
from trimail.delivery.notify import store as notify_store
from trimail.maps import Table
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.smtp import dsn

bounce_log = logging.getLogger("trimail.bounce")


EXPANDED_PARAM = "_DSN_EXPANDED"  # JSON [[address, orcpt], ...]: owed an expanded notice (taken out by insert)


def passed_on(address: str, entry: dict[str, str], finals: list[str]) -> tuple[dict[str, str], bool]:
    """The DSN entry each of *finals* (what virtual_alias_maps made of *address*) gets,
    and whether *address* is owed an ``expanded`` notice: SUCCESS is taken out when
    the alias changed the address."""
    words = dsn.notify_words(entry.get("NOTIFY", "")) or ()
    if "SUCCESS" not in words or finals == [address]:
        return entry, False
    rest = tuple(w for w in words if w != "SUCCESS") or ("NEVER",)
    return {**entry, "NOTIFY": ",".join(rest)}, True


def orcpt_text(entry: dict[str, str]) -> str:
    """An entry's ORCPT as a notice's Original-Recipient takes it ("" when none)."""
    try:
        kind, address = dsn.parse_orcpt(entry["ORCPT"]) if entry.get("ORCPT") else ("", "")
    except dsn.XtextError:
        return ""
    return f"{kind};{address}" if kind else ""


def expand(recipients: list[str], tables: list[Table], notify: str | None) -> tuple[list[str], dict[str, str]]:
    """A local submission's virtual_alias_maps expansion (sendmail -N: one NOTIFY for
    every recipient): the addresses, and the params that give the ones an alias made
    its NOTIFY without SUCCESS and owe the alias its ``expanded`` notice (``insert``)."""
    words = dsn.notify_words(notify) if notify else None
    if not words or "SUCCESS" not in words:
        return virtual_expand(recipients, tables), {}
    out: list[str] = []
    entries: dict[str, dict[str, str]] = {}
    owed: list[tuple[str, str]] = []
    for address in recipients:
        finals = virtual_expand([address], tables)
        entry, notice = passed_on(address, {"NOTIFY": ",".join(words)}, finals)
        if notice:
            owed.append((address, ""))
            for final in finals:
                entries.setdefault(final, entry)
        out += finals
    params: dict[str, str | None] = {}
    notify_store(params, entries)
    return out, {**params, **({EXPANDED_PARAM: json.dumps(owed)} if owed else {})}  # type: ignore[dict-item]


def insert(store: Store, message: NewMessage, hostname: str) -> None:
    """Writer-thread work: queue *message* and, when its params owe ``expanded``
    notices (EXPANDED_PARAM, not kept) and it has a sender, the success notice (the
    headers returned, as every success notice)."""
    params = dict(message.params)
    owed = _owed(params.pop(EXPANDED_PARAM, None))
    message = dataclasses.replace(message, params=params)
    store.insert_message(message)
    if not owed or message.sender == "":
        return
    failures = [Failure(address, "2.0.0", "X-Trimail; alias expanded", action="expanded", text="alias expanded",
                        orcpt=orcpt) for address, orcpt in owed]
    smtputf8 = "SMTPUTF8" in params
    head, tail = dsn_parts(hostname=hostname, queue_id=message.id, sender=message.sender,
                           arrival_time=message.arrival_time, failures=failures, full=False, smtputf8=smtputf8,
                           envid=notify.envid_of(params), success=True)
    spool = Spool()
    spool.write(head)
    spool.write(header_lines(transitions.read_headers(store, message.id)))
    spool.write(tail)
    notice_id = new_queue_id()
    store.insert_message(NewMessage(notice_id, "", [message.sender], spool, protocol="bounce",
                                    params={"SMTPUTF8": None, "BODY": "8BITMIME"} if smtputf8 else {}))
    bounce_log.info("%s: sender delivery status notification: %s", message.id, notice_id)


def _owed(text: str | None) -> list[tuple[str, str]]:
    try:
        owed = json.loads(text) if isinstance(text, str) else []
    except ValueError:
        return []
    return [(a, o) for a, o in owed if isinstance(a, str) and isinstance(o, str)] \
        if isinstance(owed, list) and all(isinstance(x, list) and len(x) == 2 for x in owed) else []
