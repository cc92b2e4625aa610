"""The ``trimail`` command line (cyclopts): serve, queue tools, config.

Every command takes ``-c/--config PATH`` and ``-o NAME=VALUE`` (repeatable), after
the command words.  Exit status: 0 ok, 1 operational failure, 2 usage or
configuration error; every error is one line on stderr.  A command whose reader
goes away (``trimail queue list | head``) ends quietly with status 141, as
coreutils and Postfix's mailq do under SIGPIPE.

Parameters: queue_directory, myhostname, alias_database, maillog_file,
syslog_facility, smtpd_workers, smtpd_sasl_password_file (and every parameter, for
``trimail config``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import trio
from cyclopts import App, CycloptsError, Parameter

from trimail import __version__, mailq, maps
from trimail import config as configuration
from trimail import log as maillog
from trimail.config import Config, generate
from trimail.config.registry import PARAMETERS
from trimail.errors import ConfigurationError, TrimailError
from trimail.local.aliases import postalias
from trimail.maps import TableError, open_table
from trimail.net.control import send_command
from trimail.net.listener import ListenError
from trimail.privileges import PrivilegeError
from trimail.queue import admin, transitions
from trimail.queue.lock import AlreadyRunning
from trimail.queue.store import MessageInfo, QueueError, Store
from trimail.smtp.address import is_domain
from trimail.supervise import contained

if TYPE_CHECKING:
    from trimail.processes.forkserver import ForkServer

app = App(name="trimail", help="A secure SMTP gateway MTA.", version=__version__,
          exit_on_error=False, print_error=True)
queue_app = App(name="queue", help="Inspect and manage the mail queue (mailq, postqueue, postsuper).")
app.command(queue_app)

ConfigOption = Annotated[str | None, Parameter(name=["-c", "--config"], help="main.cf to read")]
Overrides = Annotated[
    list[str] | None,
    Parameter(name=["-o"], help="override one parameter, NAME=VALUE (repeatable)", consume_multiple=False),
]


class Failure(Exception):
    """An operational failure: exit status 1 with this one-line message."""


def load_config(path: str | None, overrides: list[str] | None) -> Config:
    cfg = configuration.load(path, overrides or ())
    for warning in cfg.warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)
    return cfg


# -- serve ---------------------------------------------------------------------


@app.command
def serve(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Run the MTA in the foreground until SIGTERM or SIGINT (postfix start-fg)."""
    cfg = load_config(config, o)
    from trimail.policy.restrictions import restriction_lists

    restriction_lists(cfg)  # a bad restriction list stops serve before it listens (exit 2)
    fork_server = None
    if cfg.smtpd_workers > 0:  # forked now, while this process has one thread and nothing open
        from trimail.processes.forkserver import ForkServer

        fork_server = ForkServer.start()
    try:
        maillog.setup(cfg.myhostname, maillog_file=cfg.maillog_file, syslog_facility=cfg.syslog_facility)
    except OSError as exc:
        raise Failure(f"maillog_file {cfg.maillog_file}: {exc.strerror or exc}") from None
    if cfg.maillog_file:  # stderr has main.cf's warnings (load_config); the mail log gets them too
        for warning in cfg.warnings:
            logging.getLogger("trimail.master").warning("%s", warning)
    try:
        trio.run(_serve_until_signal, cfg, fork_server)
    except BaseException as exc:
        if cfg.maillog_file:  # the reason belongs in the mail log too, not only on stderr
            known = _first_known(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(known, _OPERATOR_ERRORS):
                logging.getLogger("trimail.master").critical("%s", known)
        raise
    finally:
        maillog.shutdown()  # every line written before a fatal error is printed (or within 5 s)


async def _serve_until_signal(cfg: Config, fork_server: ForkServer | None) -> None:
    async def run_server(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if cfg.smtpd_workers > 0:  # a master with worker processes (trimail.processes)
            from trimail.processes.serve import serve_processes

            await serve_processes(cfg, fork_server, task_status=task_status)
        else:  # everything in this process
            from trimail.master import serve

            await serve(cfg, task_status=task_status)

    async def run_then_stop_watching(scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await run_server(task_status=task_status)
        scope.cancel()  # serve ended (signal or `trimail stop`): stop waiting for signals

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()
            server = await nursery.start(run_then_stop_watching, watching)
            with watching:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        with contained("reload on SIGHUP", server.metrics):  # a failed reload never ends serve
                            await server.reload()  # like `trimail reload`; a broken main.cf is logged and ignored
                    else:
                        server.stop()  # serve drains its sessions and returns


PERMISSION_DENIED = "permission denied: run as root or mail_owner"


def _require_access(cfg: Config) -> Path:
    """The queue directory, when this user may look into it (a missing one is
    left to the caller: "not running"); otherwise one clear line, never a
    traceback or a wrong "not running" (the control socket and the database
    are in a 0700 directory that belongs to mail_owner)."""
    queue = Path(cfg.queue_directory)
    try:
        os.stat(queue)
    except FileNotFoundError:
        return queue
    except PermissionError:
        raise Failure(f"{PERMISSION_DENIED} (cannot reach {queue})") from None
    if not os.access(queue, os.R_OK | os.X_OK):
        raise Failure(f"{PERMISSION_DENIED} (cannot read {queue})")
    return queue


def _control(cfg: Config, command: str) -> str:
    answer = send_command(_require_access(cfg), command, timeout=30)
    if answer is None:
        raise Failure(f"trimail serve is not running (no control socket in {cfg.queue_directory})")
    if answer.startswith("error:"):
        raise Failure(maillog.printable(answer[6:].strip(), 1000))  # the socket is in mail_owner's directory
    return answer


@app.command(name="reload")
def reload_command(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Re-read main.cf, tables, aliases and certificates without dropping sessions (postfix reload)."""
    cfg = load_config(config, o)
    _control(cfg, "reload")
    print("trimail: reload: ok", file=sys.stderr)


@app.command(name="stop")
def stop_command(*, config: ConfigOption = None, o: Overrides = None, timeout: float = 60.0) -> None:
    """Stop serve gracefully and wait until it is gone (postfix stop)."""
    from trimail.queue.lock import running_pid

    cfg = load_config(config, o)
    _control(cfg, "stop")
    deadline = time.monotonic() + timeout
    while running_pid(Path(cfg.queue_directory)) is not None:
        if time.monotonic() > deadline:
            raise Failure(f"serve did not stop within {timeout:g}s")
        time.sleep(0.05)
    print("trimail: stopped", file=sys.stderr)


@app.command(name="status")
def status_command(*, json_output: Annotated[bool, Parameter(name=["--json"], help="one JSON object")] = False,
                   config: ConfigOption = None, o: Overrides = None) -> None:
    """Is serve running: pid, uptime, listeners, queue counts, dead destinations;
    exit 0 running, 1 not (postfix status)."""
    cfg = load_config(config, o)
    answer = send_command(_require_access(cfg), "status", timeout=10)
    if answer is None:
        print('{"running": false}' if json_output else "trimail: not running")
        raise SystemExit(1)
    try:
        facts = json.loads(answer)
        if not isinstance(facts, dict):
            raise ValueError(answer)
    except ValueError:
        raise Failure(f"unexpected answer from serve's control socket: {maillog.printable(answer, 80)!r}") from None
    counts: dict[str, int] = {}
    try:
        store = Store.open(cfg.queue_directory, readonly=True)
        counts = store.counts()  # a few rows, however long the queue (queue_count)
        store.close()
    except QueueError:
        pass
    queue = {state: counts.get(state, 0) for state in ("maildrop", "incoming", "active", "deferred", "hold")}
    if json_output:  # serve's facts as it sent them (JSON escapes what a terminal must not see), and the queue
        print(json.dumps({"running": True, **facts, "queue": queue}))
        return
    # serve's answer comes through a socket in mail_owner's directory: printed
    # printable only, so a process posing as serve cannot write to root's terminal
    try:
        listeners = [maillog.printable(str(name)) for name in facts["listeners"]]
        pid, sessions, uptime = (maillog.printable(str(facts[key])) for key in ("pid", "sessions", "uptime"))
        helper_state = maillog.printable(str(facts.get("delivery_helper") or ""), 1000)
    except (KeyError, TypeError):
        raise Failure(f"unexpected answer from serve's control socket: {maillog.printable(answer, 80)!r}") from None
    listening = f"listening on {', '.join(listeners)}" if listeners else "not listening (drained)"
    with_uptime = f"up {float(uptime):.0f}s" if uptime.replace(".", "", 1).isdigit() else f"up {uptime}"
    print(f"trimail: running, pid {pid}, {with_uptime}, {listening}, {sessions} session(s)")
    _print_workers(facts.get("workers"))
    if isinstance(facts.get("fork_server"), int):
        print(f"  fork server pid {facts['fork_server']}")
    print("queue: " + ", ".join(f"{state} {count}" for state, count in queue.items()))
    dead = facts.get("dead_destinations_total")
    if dead:
        print(f"dead destinations: {maillog.printable(str(dead))} (trimail queue summary lists them)")
    if helper_state not in ("", "running"):
        print(f"warning: {helper_state}")


def _print_workers(workers: object) -> None:
    """One line per worker process (smtpd_workers > 0), printable only."""
    if not isinstance(workers, list):
        return
    for worker in workers:
        if not isinstance(worker, dict):
            continue
        role, state, pid = (maillog.printable(str(worker.get(key, "?")), 32) for key in ("role", "state", "pid"))
        uptime = worker.get("uptime")
        up = f", up {uptime:.0f}s" if isinstance(uptime, (int, float)) else ""
        load = (f", {maillog.printable(str(worker.get('sessions', 0)), 16)} session(s)" if role == "smtpd"
                else f", {maillog.printable(str(worker.get('active', 0)), 16)} active")
        restarts = worker.get("restarts")
        again = f", restarted {restarts} time(s)" if isinstance(restarts, int) and restarts else ""
        print(f"  {role} worker pid {pid}{up}, {state}{load}{again}")


# -- config ----------------------------------------------------------------------


@app.command(name="config")
def show_config(
    names: list[str] | None = None,
    *,
    n: Annotated[bool, Parameter(name=["-n"], help="only parameters set explicitly")] = False,
    d: Annotated[bool, Parameter(name=["-d"], help="the default values, not main.cf's")] = False,
    h: Annotated[bool, Parameter(name=["-h"], help="values only, without 'name = '")] = False,
    hide_values: Annotated[bool, Parameter(name=["-H"], help="names only, without ' = value'")] = False,
    x: Annotated[bool, Parameter(name=["-x"], help="expand $name references")] = False,
    sample: Annotated[bool, Parameter(name=["--sample"], help="print an annotated main.cf")] = False,
    config: ConfigOption = None,
    o: Overrides = None,
) -> None:
    """Print effective parameter values (postconf; -n, -d, -h, -H and -x as postconf's)."""
    if sample:
        print(generate.sample_main_cf())
        return
    for first, second in (("-d", "-n"), ("-d", "-o"), ("-h", "-H")):  # postconf's incompatible pairs
        given = {"-d": d, "-n": n, "-o": bool(o), "-h": h, "-H": hide_values}
        if given[first] and given[second]:
            print(f"trimail: fatal: specify one of {first} {second}", file=sys.stderr)
            raise SystemExit(2)
    if d:  # postconf -d reads no main.cf: the built-in values, derived ones (myhostname) included
        cfg = Config({}, "defaults")
    else:
        cfg = load_config(config, o)
    if names:
        wanted = names
    elif n:
        wanted = cfg.explicit_names()
    else:
        wanted = sorted(set(PARAMETERS) | set(cfg.explicit_names()))
    unknown = [name for name in wanted if name not in PARAMETERS and not cfg.is_set(name)]
    for name in wanted:
        if name in unknown:
            print(f"trimail: warning: {name}: unknown parameter", file=sys.stderr)
            continue
        if hide_values:
            print(name)
            continue
        value = cfg.expand(name) if x else cfg.raw(name)
        print(value if h else f"{name} = {value}".rstrip())
    if unknown:
        raise SystemExit(2)


@app.command(name="check")
def check_command(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Validate the configuration and the files it names (postfix check); report the
    addresses serve would listen on, without binding them."""
    from trimail.check import listeners_in_use, planned_listeners, resolver_reachable, warnings
    from trimail.queue.lock import running_pid

    cfg = load_config(config, o)
    problems = warnings(cfg) + resolver_reachable(cfg)
    try:
        pid = running_pid(Path(cfg.queue_directory))
    except PermissionError:
        pid = -1  # cannot tell: do not report serve's own listeners as taken
        problems.append(f"{cfg.queue_directory}: {PERMISSION_DENIED}; the queue was not checked")
    if pid is None:
        report, taken = listeners_in_use(cfg)
        problems += taken
    else:
        held = f"serve (pid {pid})" if pid > 0 else "serve, if it runs"
        report = [f"{parameter}: listens on {address} ({held})" for parameter, address in planned_listeners(cfg)]
    for line in report:
        print(f"trimail: {line}")
    errors = 0
    for problem in problems:
        if problem.startswith("error: "):
            errors += 1
            print(f"trimail: {problem}", file=sys.stderr)
        else:
            print(f"trimail: warning: {problem}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


# -- queue -----------------------------------------------------------------------


def _open_queue(cfg: Config) -> Store:
    _require_access(cfg)
    try:
        return Store.open(cfg.queue_directory, readonly=True)
    except QueueError as exc:
        raise Failure(str(exc)) from None


def _filtered(messages: Iterable[MessageInfo], state: str | None, sender: str | None, recipient: str | None,
              domain: str | None) -> Iterator[MessageInfo]:
    def keep(m: MessageInfo) -> bool:
        if state and m.state != state:
            return False
        if sender is not None and m.sender.lower() != sender.lower():
            return False
        pending = [r.address.lower() for r in m.recipients if r.status in ("pending", "deferred")]
        if recipient and recipient.lower() not in pending:
            return False
        return not (domain and not any(a.rpartition("@")[2] == domain.lower() for a in pending))

    return (m for m in messages if keep(m))


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
    _require_access(cfg)
    try:
        store = _open_queue(cfg)
    except Failure:
        if not json_output:
            raise
        print("[]")
        return
    source = store.iter_messages()
    try:
        messages = _filtered(source, state, sender, recipient, domain)
        if json_output:  # one JSON array, written element by element
            out = sys.stdout
            out.write("[")
            for number, message in enumerate(messages):
                out.write(("" if number == 0 else ", ") + json.dumps(message.to_json()))
            out.write("]\n")
            return
        if sys.stdout.isatty() and not postfix_layout:
            _rich_queue(messages)
            return
        for line in mailq.mailq_lines(messages):  # Postfix's layout, streamed for long queues
            print(line)
    finally:
        source.close()  # end its read snapshot while the connection is still open
        store.close()


def _rich_queue(messages: Iterable[MessageInfo]) -> None:
    """The mailq view as a terminal table (rich), with the same marks, reasons and summary."""
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
        mark = mailq.STATE_MARK.get(m.state, "")
        table.add_row(f"[bold]{m.id}{mark}[/bold]", str(m.size), mailq.arrival_time(m.arrival_time),
                      escape(mailq.printable(m.sender or mailq.EMPTY_SENDER)))
        for reason, addresses in mailq.recipients_by_reason(m.recipients):
            if reason:
                table.add_row("", "", "", f"[dim]({escape(reason)})[/dim]")
            for address in addresses:
                table.add_row("", "", "", escape(mailq.printable(address)))
    console = Console()
    if not count:
        console.print("Mail queue is empty")
        return
    console.print(table)
    console.print(mailq.summary(total, count))


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
        count = _queue_change(cfg, lambda store: admin.flush_site(store, site), "flush")
        print(f"trimail: flushed {count} message(s) for {site.lower().rstrip('.')}", file=sys.stderr)
        return
    _queue_change(cfg, lambda store: admin.flush(store, ids or None), "flush")


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
    """Put messages on hold: kept, but not delivered (postsuper -h)."""
    cfg = load_config(config, o)
    wanted = _ids_or_all(ids, all_)
    _report("placed on hold", _queue_change(cfg, lambda store: admin.set_state(
        store, wanted, "hold", ("maildrop", "incoming", "deferred"), time.time())), wanted)


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


# -- tables ----------------------------------------------------------------------


def _query_or_dump(ref: str, key: str | None, dump: bool, separator: str) -> bool:
    """``-q KEY`` (print the value; False when not found) or ``-s`` (print every
    entry, ``key<separator>value``), as postmap(1)/postalias(1) do; True when done."""
    if key is not None and dump:
        raise Failure("specify only one of -q or -s")
    if key is not None:
        value = open_table(ref).lookup(key)
        if value is None:
            raise SystemExit(1)  # not found: postmap's status 1, nothing printed
        print(value)
        return True
    if dump:
        for name, value in open_table(ref).entries():
            print(f"{name}{separator}{value}")
        return True
    return False


QueryOption = Annotated[str | None, Parameter(name=["-q"], help="look up KEY and print its value")]
DumpFlag = Annotated[bool, Parameter(name=["-s"], help="print every key and value")]


@app.command(name="postmap")
def postmap_command(table: str, *, q: QueryOption = None, s: DumpFlag = False,
                    config: ConfigOption = None, o: Overrides = None) -> None:
    """Compile a lookup table source into its indexed database, query it (-q) or
    list it (-s), as postmap does."""
    load_config(config, o)
    ref = table if ":" in table else f"hash:{table}"
    try:
        if _query_or_dump(ref, q, s, "\t"):
            return
        kind, _, name = ref.partition(":")
        if kind not in ("hash", "btree"):
            raise Failure(f"{ref}: only hash: and btree: tables are compiled")
        _count, warnings = maps.postmap(Path(name))
    except TableError as exc:
        raise Failure(str(exc)) from None
    for warning in warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)


# -- passwords -------------------------------------------------------------------

passwd_app = App(name="passwd", help="Manage AUTH logins (salted scrypt hashes, never plaintext).")
app.command(passwd_app)


@passwd_app.command(name="add")
def passwd_add(user: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Add or change a login; the password is read from standard input (or prompted for)."""
    from trimail import passwords

    cfg = load_config(config, o)
    try:
        passwords.check_user(user)
    except passwords.PasswordError as exc:
        raise Failure(str(exc)) from None
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            raise Failure("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise Failure("empty password")
    path = Path(cfg.smtpd_sasl_password_file)
    table = passwords.read_table(path)
    table[user] = passwords.hash_password(password)
    passwords.write_table(path, table)


@passwd_app.command(name="delete")
def passwd_delete(user: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Remove a login."""
    from trimail import passwords

    cfg = load_config(config, o)
    path = Path(cfg.smtpd_sasl_password_file)
    table = passwords.read_table(path)
    if table.pop(user, None) is None:
        raise Failure(f"{user}: no such login in {path}")
    passwords.write_table(path, table)


# -- aliases -----------------------------------------------------------------------


def _postalias(path: Path) -> None:
    try:
        _count, warnings = postalias(path)
    except TableError as exc:
        raise Failure(str(exc)) from None
    for warning in warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)


@app.command(name="postalias")
def postalias_command(file: str, *, q: QueryOption = None, s: DumpFlag = False,
                      config: ConfigOption = None, o: Overrides = None) -> None:
    """Compile an aliases(5) file into its indexed database, query it (-q) or list
    it (-s, ``name:<TAB>value``), as postalias does."""
    load_config(config, o)
    ref = file if ":" in file else f"hash:{file}"
    try:
        if _query_or_dump(ref, q, s, ":\t"):
            return
    except TableError as exc:
        raise Failure(str(exc)) from None
    kind, _, name = ref.partition(":")
    if kind not in ("hash", "btree"):
        raise Failure(f"{ref}: only hash: and btree: alias databases are compiled")
    _postalias(Path(name))


@app.command(name="newaliases")
def newaliases_command(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Rebuild every alias database named by alias_database (newaliases)."""
    cfg = load_config(config, o)
    if not cfg.alias_database:
        print("trimail: alias_database is empty: nothing to rebuild", file=sys.stderr)
    for ref in cfg.alias_database:
        kind, _, name = ref.partition(":")
        if kind not in ("hash", "btree"):
            raise Failure(f"{ref}: newaliases rebuilds hash: and btree: tables only")
        _postalias(Path(name))


# -- entry point -----------------------------------------------------------------


def _sendmail(argv: list[str]) -> None:
    from trimail.sendmail import SendmailError, submit

    try:
        raise SystemExit(submit(argv))
    except SendmailError as exc:
        print(f"sendmail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(exc.status) from None
    except (QueueError, TableError) as exc:
        print(f"sendmail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


# Invoked through a link with one of these names, the binary acts as that command.
PERSONALITIES = {"sendmail": ["sendmail"], "mailq": ["queue", "list", "--plain"], "newaliases": ["newaliases"]}


# Errors an operator fixes, reported on one line; anything else is a bug and keeps its traceback.
_OPERATOR_ERRORS = (TrimailError, Failure, ListenError, AlreadyRunning, PrivilegeError)


def _first_known(group: BaseExceptionGroup) -> BaseException:
    """The error an operator should see from a group raised by trio nurseries."""
    matched, _ = group.split((*_OPERATOR_ERRORS, KeyboardInterrupt))
    if matched is None:
        return group
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _reader_gone() -> NoReturn:
    """Standard output's reader went away (``trimail queue list | head``): end
    quietly, as coreutils and Postfix's mailq do when SIGPIPE ends them; a shell
    reports them with status 141 (128 + SIGPIPE), and so do we.  The standard
    output becomes /dev/null so that the interpreter's last flush fails no more
    (the recipe in Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no usable stdout at all: nothing left to protect
        pass
    raise SystemExit(128 + signal.SIGPIPE)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()
    except (OSError, ValueError):  # stdout closed or unusable: nothing more can reach it
        pass


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        name = Path(sys.argv[0]).name
        argv = sys.argv[1:]
        if name in PERSONALITIES:
            argv = PERSONALITIES[name] + argv
    if argv[:1] == ["sendmail"]:
        _sendmail(argv[1:])
    try:
        try:
            try:
                app(argv)  # cyclopts ends even a successful command with SystemExit
            finally:
                _flush_stdout()  # a reader that left shows here, not at interpreter exit
        except BaseExceptionGroup as group:  # errors from inside serve's nurseries
            raise _first_known(group) from None
    except BrokenPipeError:
        _reader_gone()
    except CycloptsError:
        raise SystemExit(2) from None
    except ConfigurationError as exc:
        print(f"trimail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except PermissionError as exc:  # a file of the queue this user may not touch: not a bug, not a traceback
        print(f"trimail: fatal: {PERMISSION_DENIED} ({exc.filename or exc.strerror})", file=sys.stderr)
        raise SystemExit(1) from None
    except _OPERATOR_ERRORS as exc:  # e.g. a table serve cannot open at start: one line, as Postfix's fatal:
        print(f"trimail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
