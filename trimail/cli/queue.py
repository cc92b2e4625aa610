"""``trimail queue ...`` and ``trimail flush``: look into the queue and change it
(Postfix's mailq/postqueue -p and -j, qshape, postcat -q, postqueue -f/-i/-s,
postsuper -d/-h/-H/-r), and back it up online.

Reading opens the queue database read-only; every change is one transaction
through ``trimail.queue.admin``/``transitions`` (never SQL here), after which a
running serve is told to start a round (``wake``) or, for a flush, also to forget
its dead destinations (``flush``), as Postfix's flush does and postsuper does not.

Security: the queue directory belongs to mail_owner (0700); a user who may not
look into it gets one "permission denied" line, never a traceback or a wrong
"empty queue".  Sender and recipient addresses are printed printable only.

Parameters: queue_directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import apsw
from cyclopts import App, Parameter

from trimail import log as maillog
from trimail import postqueue
from trimail.cli import ConfigOption, Failure, Overrides, app, load_config, require_access
from trimail.config import Config
from trimail.net.controlclient import send_command
from trimail.queue import admin, mailq, transitions
from trimail.queue.database import DATABASE_NAME, QueueError, storage_error, works_the_queue_itself
from trimail.queue.reads import filtered
from trimail.queue.store import Store
from trimail.smtp.address import is_domain

queue_app = App(name="queue", help="Inspect and manage the mail queue (mailq, postqueue, postsuper).")
app.command(queue_app)


def _open_queue(cfg: Config) -> Store:
    require_access(cfg)
    try:
        return Store.open(cfg.queue_directory, readonly=True)
    except QueueError as exc:
        raise Failure(str(exc)) from None


StateFilter = Annotated[str | None, Parameter(name=["--state"], help="only messages in this queue")]


SenderFilter = Annotated[str | None, Parameter(name=["--sender"], help="only messages from this sender")]


RecipientFilter = Annotated[str | None, Parameter(name=["--recipient"], help="only messages to this recipient")]


DomainFilter = Annotated[str | None, Parameter(name=["--domain"], help="only messages to this domain")]


@queue_app.command(name="list")
def queue_list(*, json_output: Annotated[bool, Parameter(name=["--json"], help="one JSON array")] = False,
               state: StateFilter = None, sender: SenderFilter = None, recipient: RecipientFilter = None,
               domain: DomainFilter = None,
               postfix_layout: Annotated[bool, Parameter(name=["--plain", "-p"],
                                                         help="Postfix's layout on a terminal too")] = False,
               config: ConfigOption = None, o: Overrides = None) -> None:
    """List queued messages (mailq, postqueue -p / -j): Postfix's layout when piped
    (and always as mailq), a table on a terminal."""
    cfg = load_config(config, o)
    if not works_the_queue_itself(cfg.queue_directory):  # Postfix's showq, for any user
        _through_serve(cfg, {"command": "list", "json": json_output, "state": state, "sender": sender,
                             "recipient": recipient, "domain": domain})
        return
    require_access(cfg)
    try:
        store = _open_queue(cfg)
    except Failure:
        if not json_output or os.path.exists(os.path.join(cfg.queue_directory, DATABASE_NAME)):
            raise  # a queue that is there but cannot be read (locked, damaged) is no empty queue
        print("[]")  # no queue database yet (serve never ran): nothing queued
        return
    source = store.iter_messages()
    try:
        messages = filtered(source, state, sender, recipient, domain)
        if json_output:  # one JSON array, written element by element
            out = sys.stdout
            out.write("[")
            for number, message in enumerate(messages):
                out.write(("" if number == 0 else ", ") + json.dumps(message.to_json()))
            out.write("]\n")
            return
        if sys.stdout.isatty() and not postfix_layout:
            mailq.print_table(messages)
            return
        for line in mailq.mailq_lines(messages):  # Postfix's layout, streamed for long queues
            print(line)
    finally:
        source.close()  # end its read snapshot while the connection is still open
        store.close()


@queue_app.command(name="summary")
def queue_summary(*, json_output: Annotated[bool, Parameter(name=["--json"], help="one JSON object")] = False,
                  top: Annotated[int, Parameter(name=["--top", "-n"],
                                                help="per queue, only the N sites with most recipients "
                                                     "and one row for the others (0: all)")] = 0,
                  config: ConfigOption = None, o: Overrides = None) -> None:
    """Recipients per destination site and age, per queue (like Postfix's qshape),
    and the destinations a running serve holds dead."""
    from trimail import qshape

    cfg = load_config(config, o)
    if top < 0:
        raise Failure("--top takes a count, 0 for all")
    store = _open_queue(cfg)
    dead = qshape.ask_serve(Path(cfg.queue_directory))
    rows = admin.summary(store)
    try:
        (qshape.write_json if json_output else qshape.write_text)(sys.stdout, qshape.folded(rows, top), dead)
    finally:
        rows.close()  # end its read snapshot while the connection is still open
        store.close()


@queue_app.command(name="show")
def queue_show(queue_id: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Print one message: envelope and content (postcat -q)."""
    cfg = load_config(config, o)
    store = _open_queue(cfg)
    try:
        info = store.get_message(queue_id)
        content = store.read_content(queue_id)
    finally:
        store.close()
    if info is None or content is None:
        raise Failure(f"{queue_id}: no such message in the queue")
    print("*** ENVELOPE RECORDS ***")
    print(f"queue_id: {info.id}\nstate: {info.state}\nmessage_size: {info.size}")
    print(f"arrival_time: {time.ctime(info.arrival_time)}\nsender: {info.sender}")
    for r in info.recipients:
        print(f"recipient: {r.address} ({r.status}, attempts={r.attempts})")
    print("*** MESSAGE CONTENTS ***")
    sys.stdout.flush()
    sys.stdout.buffer.write(content.replace(b"\r\n", b"\n"))
    print("*** END OF MESSAGE ***")


def _queue_change(cfg: Config, change: Callable[[Store], list[str] | int], command: str = "wake") -> list[str] | int:
    """Run *change* in one transaction on the queue, then tell serve if it runs:
    ``wake`` (a new round), or ``flush`` (also forget the dead destinations, as
    Postfix's flush does and postsuper does not)."""
    store = Store.open(cfg.queue_directory)
    try:
        with store.transaction():
            result = change(store)
    except apsw.Error as exc:  # a full file system, a lock held too long: one fatal line, not a traceback
        raise storage_error(exc) from exc
    finally:
        store.close()
    send_command(Path(cfg.queue_directory), command)
    return result


def _ids_or_all(ids: list[str] | None, all_: bool) -> list[str] | None:
    if all_:
        return None
    if not ids:
        raise Failure("name the queue IDs, or use --all")
    return ids


AllFlag = Annotated[bool, Parameter(name=["--all"], help="every message in the queue")]


SiteOption = Annotated[str | None, Parameter(name=["--domain", "-d"],
                                              help="only the mail queued for this site: a domain or [address]")]


@queue_app.command(name="flush")
def queue_flush(ids: list[str] | None = None, *, domain: SiteOption = None, config: ConfigOption = None,
                o: Overrides = None) -> None:
    """Deliver deferred mail now: all, the given IDs, or the mail for one site
    (postqueue -f / -i / -s)."""
    cfg = load_config(config, o)
    if domain is not None:
        if ids:
            raise Failure("name queue IDs or a --domain, not both")
        site = domain.strip()
        if not (is_domain(site.rstrip(".")) or (site.startswith("[") and site.endswith("]"))):
            raise Failure(f"not a domain or an address literal: {maillog.printable(site, 300)}")
    if not works_the_queue_itself(cfg.queue_directory):  # a user's flush: serve does it
        answer = _through_serve(cfg, {"command": "flush", "ids": ids or None, "site": domain and site}, keep=True)
        count = int(b"".join(answer).strip() or 0)
    elif domain is not None:
        count = _queue_change(cfg, lambda store: admin.flush_site(store, site), "flush")
    else:
        _queue_change(cfg, lambda store: admin.flush(store, ids or None), "flush")
    if domain is not None:
        print(f"trimail: flushed {count} message(s) for {site.lower().rstrip('.')}", file=sys.stderr)


def _through_serve(cfg: Config, request: dict, keep: bool = False) -> list[bytes]:
    """A user who may not look into the queue asks serve (trimail.postqueue): its
    answer written to standard output as it comes, or returned (*keep*); a refusal
    is one fatal line and Postfix's exit status (77: a user authorized_* does not name)."""
    kept = []
    try:
        for piece in postqueue.ask(cfg, request):
            if keep:
                kept.append(piece)
            else:
                sys.stdout.flush()
                sys.stdout.buffer.write(piece)
    except (postqueue.Refused, OSError) as exc:
        print(f"trimail: fatal: {maillog.printable(str(exc), 300)}", file=sys.stderr)
        raise SystemExit(getattr(exc, "status", os.EX_UNAVAILABLE)) from None
    return kept


@app.command(name="flush")
def flush_alias(ids: list[str] | None = None, *, domain: SiteOption = None, config: ConfigOption = None,
                o: Overrides = None) -> None:
    """Alias of `trimail queue flush`."""
    queue_flush(ids, domain=domain, config=config, o=o)


def _report(verb: str, changed: list[str] | int, asked: list[str] | None) -> None:
    moved = changed if isinstance(changed, list) else []
    for queue_id in asked or []:
        if queue_id not in moved:
            print(f"trimail: warning: {queue_id}: no such message in a state that can be {verb}", file=sys.stderr)
    count = len(moved) if isinstance(changed, list) else changed
    print(f"trimail: {verb}: {count} message{'s' if count != 1 else ''}", file=sys.stderr)


@queue_app.command(name="delete")
def queue_delete(ids: list[str] | None = None, *, all_: AllFlag = False, config: ConfigOption = None,
                 o: Overrides = None) -> None:
    """Delete messages from the queue (postsuper -d)."""
    cfg = load_config(config, o)
    wanted = _ids_or_all(ids, all_)

    def change(store: Store) -> list[str]:
        targets = admin.existing_ids(store, wanted, STATES_NOT_ACTIVE)
        return [t for t in targets if transitions.remove(store, t)]

    _report("deleted", _queue_change(cfg, change), wanted)


STATES_NOT_ACTIVE = ("maildrop", "incoming", "deferred", "hold")


@queue_app.command(name="hold")
def queue_hold(ids: list[str] | None = None, *, all_: AllFlag = False, config: ConfigOption = None,
               o: Overrides = None) -> None:
    """Put messages on hold: kept, but not delivered (postsuper -h).  Not a message
    still in maildrop, as postsuper -h takes none: released, it would skip pickup (its
    content_filter, its FILTER and log lines: cleanup/loglines.py); red team 37."""
    cfg = load_config(config, o)
    wanted = _ids_or_all(ids, all_)
    _report("placed on hold", _queue_change(cfg, lambda store: admin.set_state(
        store, wanted, "hold", ("incoming", "deferred"), time.time())), wanted)


@queue_app.command(name="release")
def queue_release(ids: list[str] | None = None, *, all_: AllFlag = False, config: ConfigOption = None,
                  o: Overrides = None) -> None:
    """Release messages from hold (postsuper -H)."""
    cfg = load_config(config, o)
    wanted = _ids_or_all(ids, all_)
    _report("released from hold", _queue_change(cfg, lambda store: admin.set_state(
        store, wanted, "incoming", ("hold",), time.time())), wanted)


@queue_app.command(name="requeue")
def queue_requeue(ids: list[str] | None = None, *, all_: AllFlag = False, config: ConfigOption = None,
                  o: Overrides = None) -> None:
    """Queue messages again for immediate delivery (postsuper -r)."""
    cfg = load_config(config, o)
    wanted = _ids_or_all(ids, all_)

    def change(store: Store) -> list[str]:
        targets = admin.existing_ids(store, wanted, ("incoming", "deferred"))
        admin.flush(store, targets)
        return admin.set_state(store, targets, "incoming", ("incoming", "deferred"), time.time())

    _report("requeued", _queue_change(cfg, change), wanted)


@queue_app.command(name="backup")
def queue_backup(file: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Copy the queue to FILE while serve runs (SQLite's online backup API); restore
    by stopping serve and putting FILE in place of queue.db (docs/operations.md)."""
    from trimail.queue.backup import backup

    cfg = load_config(config, o)
    result = backup(cfg.queue_directory, file)
    print(f"backup: {result.messages} message(s), {result.pages} pages written to {result.path}")
