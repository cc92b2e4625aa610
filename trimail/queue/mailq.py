"""mailq's text layout (``trimail queue list``, the ``mailq`` personality), as
Postfix's postqueue prints it (src/postqueue/showq_compat.c), and the same view
as a table on a terminal (``print_table``).

trimail's queue IDs are Postfix's *long* queue IDs (``enable_long_queue_ids =
yes``: time and a counter in a vowel-less base-51 alphabet), so the layout is the
one Postfix prints for those::

    ----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------
    4Xk2cB1r5Wz8Fq4h*     1234 Tue Dec  1 10:00:00  sender@example.com
                   (connect to 127.0.0.1[127.0.0.1]:25: Connection refused)
                                                    rcpt1@example.net
                                                    rcpt2@example.net

    -- 1 Kbytes in 1 Request.

``*`` marks a message in the active queue, ``!`` one on hold; the null sender is
``MAILER-DAEMON``; characters that are not printable show as ``?``; the arrival time is asctime(3)'s, day of the month padded with
a space.  Each recipient not yet done is listed, those with a reason first: one
``(reason)`` line, right-aligned to column 78, before each run of recipients
with the same reason, and ``(reason unavailable)`` before recipients without one
that follow recipients with one.  Kbytes are the total size divided by 1024,
rounded down, as showq does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator

from trimail.queue.reads import MessageInfo, RecipientInfo

HEADINGS = ("----Queue ID-----", "--Size--", "---Arrival Time----", "--Sender/Recipient------")
STATE_MARK = {"active": "*", "hold": "!"}
EMPTY_SENDER = "MAILER-DAEMON"  # Postfix's empty_address_recipient as showq prints the null sender


def printable(text: str) -> str:
    """Non-printable characters as ``?``, as showq sends every field (a sender
    address cannot write escape sequences to the operator's terminal)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _columns(queue_id: str, size: str, arrival: str, who: str) -> str:
    return f"{queue_id:<17} {size:>8} {arrival:<19} {printable(who)}"


def arrival_time(timestamp: float) -> str:
    """``Tue Dec  1 10:00:00``: asctime(3) without the year (locale-independent)."""
    return time.asctime(time.localtime(timestamp))[:19]


def reason_line(reason: str) -> str:
    """``(reason)`` right-aligned so that it ends in column 78 (or starts the line)."""
    return " " * max(0, 76 - len(reason)) + f"({reason})"


_DSN = re.compile(r"[245]\.\d{1,3}\.\d{1,3} ")


def reason(last_reply: str | None) -> str:
    """The text Postfix keeps as the reason: the queue stores the enhanced status
    code in front of it (``4.4.1 connect to ...``), the defer log apart from it."""
    text = last_reply or ""
    match = _DSN.match(text)
    return text[match.end():] if match else text


def recipients_by_reason(recipients: Iterable[RecipientInfo]) -> list[tuple[str, list[str]]]:
    """The recipients not yet done as (reason, addresses) groups: those with a
    reason first (Postfix lists its defer log before the queue file), one group per
    distinct reason in order of first appearance, then those without ("")."""
    groups: dict[str, list[str]] = {}
    for r in recipients:
        if r.status in ("pending", "deferred"):
            groups.setdefault(printable(reason(r.last_reply)), []).append(r.address)
    without = groups.pop("", None)
    ordered = list(groups.items())
    if without:
        ordered.append(("", without))
    return ordered


def message_lines(m: MessageInfo) -> Iterator[str]:
    yield _columns(m.id + STATE_MARK.get(m.state, ""), str(m.size), arrival_time(m.arrival_time),
                   m.sender or EMPTY_SENDER)
    shown = ""
    for reason, addresses in recipients_by_reason(m.recipients):
        if reason != shown:  # a change of reason, as showq_compat compares with the one before
            yield reason_line(reason or "reason unavailable")
            shown = reason
        for address in addresses:
            yield _columns("", "", "", address)


def summary(total_bytes: int, count: int) -> str:
    return f"-- {total_bytes // 1024} Kbytes in {count} Request{'' if count == 1 else 's'}."


def mailq_lines(messages: Iterable[MessageInfo]) -> Iterator[str]:
    """The whole listing line by line (streams a long queue)."""
    return (line for line in paused_lines(messages) if line is not None)


def paused_lines(messages: Iterable[MessageInfo | None]) -> Iterator[str | None]:
    """``mailq_lines``, where a None among the messages (a pause: trimail.public ends
    a thread hop there) comes out as a None among the lines."""
    total = count = 0
    for m in messages:
        if m is None:
            yield None
            continue
        yield _columns(*HEADINGS) if count == 0 else ""
        count += 1
        total += m.size
        yield from message_lines(m)
    if count == 0:
        yield "Mail queue is empty"
        return
    yield ""
    yield summary(total, count)


def print_table(messages: Iterable[MessageInfo]) -> None:
    """The mailq view as a terminal table (rich, imported only here: a piped
    listing never loads it), with the same marks, reasons and summary."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("Queue ID", "left"), ("Size", "right"), ("Arrival Time", "left"),
                            ("Sender/Recipient", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    total = count = 0
    for m in messages:
        count += 1
        total += m.size
        mark = STATE_MARK.get(m.state, "")
        table.add_row(f"[bold]{m.id}{mark}[/bold]", str(m.size), arrival_time(m.arrival_time),
                      escape(printable(m.sender or EMPTY_SENDER)))
        for why, addresses in recipients_by_reason(m.recipients):
            if why:
                table.add_row("", "", "", f"[dim]({escape(why)})[/dim]")
            for address in addresses:
                table.add_row("", "", "", escape(printable(address)))
    console = Console()
    if not count:
        console.print("Mail queue is empty")
        return
    console.print(table)
    console.print(summary(total, count))
