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
both are there or neither; mail from the null sender gets none.

Parameters: none (myhostname through the caller).
"""

from __future__ import annotations

import dataclasses
import logging

from trimail.delivery import notify
from trimail.delivery.bounce import Failure, dsn_parts, header_lines
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.smtp import dsn

bounce_log = logging.getLogger("trimail.bounce")


@dataclasses.dataclass(frozen=True, slots=True)
class Expansions:
    """What the notice says: the recipients that were expanded, each with its ORCPT
    (``type;address`` decoded, "" when none was given)."""

    hostname: str
    recipients: list[tuple[str, str]]


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


def insert(store: Store, message: NewMessage, expansions: Expansions | None) -> None:
    """Writer-thread work: queue *message* and, when it has *expansions* and a sender,
    the ``expanded`` success notice (the headers returned, as every success notice)."""
    store.insert_message(message)
    if expansions is None or not expansions.recipients or message.sender == "":
        return
    failures = [Failure(address, "2.0.0", "X-Trimail; alias expanded", action="expanded", text="alias expanded",
                        orcpt=orcpt) for address, orcpt in expansions.recipients]
    smtputf8 = "SMTPUTF8" in message.params
    head, tail = dsn_parts(hostname=expansions.hostname, queue_id=message.id, sender=message.sender,
                           arrival_time=message.arrival_time, failures=failures, full=False, smtputf8=smtputf8,
                           envid=notify.envid_of(message.params), success=True)
    spool = Spool()
    spool.write(head)
    spool.write(header_lines(transitions.read_headers(store, message.id)))
    spool.write(tail)
    notice_id = new_queue_id()
    store.insert_message(NewMessage(notice_id, "", [message.sender], spool, protocol="bounce",
                                    params={"SMTPUTF8": None, "BODY": "8BITMIME"} if smtputf8 else {}))
    bounce_log.info("%s: sender delivery status notification: %s", message.id, notice_id)
