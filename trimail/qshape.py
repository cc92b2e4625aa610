"""``trimail queue summary`` (Postfix's qshape): the recipients not yet done per
queue, site and age, written as they come from ``queue.admin.summary`` (SQLite
aggregates; nothing here grows with the queue), and the destinations serve holds
dead, asked over the control socket.

Text: a header, one row per (queue, site) by queue then most recipients first,
optionally only the first ``top`` sites of each queue and one ``(N others)`` row
for the rest, then ``TOTAL``; then, when serve runs and holds destinations dead,
a ``dead destinations`` section.  JSON (one object, rows written one by one)::

    {"buckets": ["5m", "1h", "1d", "older"],
     "dead_destinations": null | [{"destination", "since", "until", "reason"}],
     "dead_destinations_total": N,            (only when serve runs)
     "rows": [{"queue", "domain", "total", "ages": [n, n, n, n]}, ...],
     "total": N}

``dead_destinations`` is ``null`` when serve is not running (nothing is known),
``[]`` when it runs and none is dead; serve sends at most ``DEAD_LIST_LIMIT`` of
them (``dead_destinations_total`` counts all).

Security: serve's answer comes through a socket in mail_owner's directory and a
reason quotes a remote server: text output prints it printable only (a process
posing as serve, or a peer's reply, cannot write escapes to root's terminal);
JSON escapes control characters itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from trimail import log as maillog
from trimail.net.controlclient import send_command
from trimail.queue.admin import AGE_BUCKETS
from trimail.queue.reads import rfc3339

DEAD_LIST_LIMIT = 1000  # dead destinations serve lists in one answer (all are counted)
DEAD_LIST_BYTES = 256 << 10  # and at most this much JSON of them
REASON_LIMIT = 300  # characters of each reason (and destination)

Row = tuple[str, str, int, list[int]]


def dead_destinations(snapshot: Iterable[Any]) -> dict[str, Any]:
    """serve's answer to the control command ``dead`` (and part of ``status``): the
    destinations held dead (``scheduler.destination.DeadSite``), soonest retried
    first, at most DEAD_LIST_LIMIT of them and DEAD_LIST_BYTES of JSON (the answer
    must fit the control socket's, net.control.MAX_ANSWER), all of them counted."""
    sites = sorted(snapshot, key=lambda site: (site.until, site.destination))
    listed: list[dict[str, Any]] = []
    size = 0
    for site in sites[:DEAD_LIST_LIMIT]:
        entry = {"destination": site.destination[:REASON_LIMIT], "since": rfc3339(site.since),
                 "until": rfc3339(site.until), "reason": site.reason[:REASON_LIMIT]}
        size += len(json.dumps(entry)) + 2
        if size > DEAD_LIST_BYTES:
            break
        listed.append(entry)
    return {"total": len(sites), "dead": listed}


def ask_serve(queue_directory: Path) -> dict[str, Any] | None:
    """The dead destinations of the serve running on *queue_directory*, or None when
    none runs (or its answer makes no sense: then nothing is known either)."""
    answer = send_command(queue_directory, "dead", timeout=10)
    if answer is None:
        return None
    try:
        facts = json.loads(answer)
        dead = [{key: str(entry[key]) for key in ("destination", "since", "until", "reason")}
                for entry in facts["dead"]]
        return {"total": int(facts["total"]), "dead": dead}
    except (ValueError, KeyError, TypeError):
        return None


def folded(rows: Iterable[Row], top: int) -> Iterator[Row]:
    """The rows with, per queue, those after the first *top* summed into one
    ``(N others)`` row (all rows when *top* is 0)."""
    queue, shown, others, sums = "", 0, 0, [0] * len(AGE_BUCKETS)

    def rest() -> Row:
        return queue, f"({others} others)", sum(sums), list(sums)

    for row in rows:
        if row[0] != queue:
            if others:
                yield rest()
            queue, shown, others, sums = row[0], 0, 0, [0] * len(AGE_BUCKETS)
        shown += 1
        if top and shown > top:
            others += 1
            sums = [a + b for a, b in zip(sums, row[3], strict=True)]
            continue
        yield row
    if others:
        yield rest()


def _line(queue: str, domain: str, total: int | str, ages: Iterable[int | str]) -> str:
    return f"{queue:<10} {domain:<32} {total:>6} " + " ".join(f"{n:>6}" for n in ages)


def write_text(out: TextIO, rows: Iterable[Row], dead: dict[str, Any] | None) -> None:
    out.write(_line("queue", "domain", "total", [name for name, _ in AGE_BUCKETS]) + "\n")
    total = 0
    for queue, domain, count, ages in rows:
        total += count
        out.write(_line(queue, maillog.printable(domain, 255), count, ages) + "\n")
    out.write(f"{'':<10} {'TOTAL':<32} {total:>6}\n")
    if dead and dead["total"]:
        more = f", {len(dead['dead'])} shown" if dead["total"] > len(dead["dead"]) else ""
        out.write(f"\ndead destinations (deferred without a connection until the time shown): "
                  f"{dead['total']}{more}\n")
        out.writelines(f"{maillog.printable(entry['destination'], 255):<42} until {maillog.printable(entry['until'])}"
                      f"  ({maillog.printable(entry['reason'], REASON_LIMIT)})\n" for entry in dead["dead"])


def write_json(out: TextIO, rows: Iterable[Row], dead: dict[str, Any] | None) -> None:
    out.write('{"buckets": ' + json.dumps([name for name, _ in AGE_BUCKETS]))
    out.write(', "dead_destinations": ' + json.dumps(None if dead is None else dead["dead"]))
    if dead is not None:
        out.write(f', "dead_destinations_total": {int(dead["total"]):d}')
    out.write(', "rows": [')
    total = 0
    for number, (queue, domain, count, ages) in enumerate(rows):
        total += count
        out.write(("" if number == 0 else ", ")
                  + json.dumps({"queue": queue, "domain": domain, "total": count, "ages": ages}))
    out.write(f'], "total": {total:d}}}\n')
