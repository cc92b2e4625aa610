"""``trimail serve``, ``reload``, ``stop`` and ``status``: the daemon's life
(postfix start-fg, reload, stop, status).

``serve`` runs the MTA in the foreground until SIGTERM or SIGINT; SIGHUP reloads
it (as ``trimail reload`` does).  ``reload``, ``stop`` and ``status`` talk to a
running serve over its control socket in queue_directory.

Security: the control socket is in mail_owner's 0700 queue directory, so what
comes back through it is printed printable only (a process posing as serve
cannot write escapes to root's terminal).

Parameters: queue_directory, smtpd_workers, myhostname, maillog_file,
syslog_facility.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from cyclopts import Parameter

from trimail import log as maillog
from trimail.cli import (
    OPERATOR_ERRORS,
    ConfigOption,
    Failure,
    Overrides,
    app,
    first_known,
    load_config,
    require_access,
)
from trimail.config import Config
from trimail.net.controlclient import send_command
from trimail.queue.database import QueueError
from trimail.queue.store import Store
from trimail.supervise import STRAY_SIGNALS, contained

if TYPE_CHECKING:
    from trimail.processes.forkserver import ForkServer


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
    import trio  # (here: every other command runs without the event loop's import)

    try:
        trio.run(_serve_until_signal, cfg, fork_server)
    except BaseException as exc:
        if cfg.maillog_file:  # the reason belongs in the mail log too, not only on stderr
            known = first_known(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(known, OPERATOR_ERRORS):
                logging.getLogger("trimail.master").critical("%s", known)
        raise
    finally:
        maillog.shutdown()  # every line written before a fatal error is printed (or within 5 s)


async def _serve_until_signal(cfg: Config, fork_server: ForkServer | None) -> None:
    import trio

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

    reloading = {"running": False, "again": False}

    async def reload_on_sighup(server) -> None:
        """SIGHUP's reloads, one after another, in a task of their own: the signal loop
        goes on (a SIGTERM is not held behind a reload waiting for its new workers);
        SIGHUPs that come during one make one more, not one each."""
        reloading["running"] = True
        try:
            while True:
                reloading["again"] = False
                with contained("reload on SIGHUP", server.metrics):  # a failed reload never ends serve
                    await server.reload()  # like `trimail reload`; a broken main.cf is logged and ignored
                if not reloading["again"]:
                    return
        finally:
            reloading["running"] = False

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, *STRAY_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()
            server = await nursery.start(run_then_stop_watching, watching)
            with watching:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if reloading["running"]:
                            reloading["again"] = True
                        else:
                            nursery.start_soon(reload_on_sighup, server)
                    elif signum in STRAY_SIGNALS:
                        logging.getLogger("trimail.master").warning(
                            "signal %s ignored (SIGHUP reloads, SIGTERM stops)", signal.Signals(signum).name)
                    else:
                        server.stop()  # serve drains its sessions and returns


def _control(cfg: Config, command: str, *, timeout: float = 30, absent: bool = False) -> str | None:
    """serve's answer to *command*; its ``error:`` answer is a Failure, and so is no
    control socket, unless *absent* (then None: not running, or stopping already)."""
    answer = send_command(require_access(cfg), command, timeout=timeout)
    if answer is None:
        if absent:
            return None
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
    pid = running_pid(Path(cfg.queue_directory))  # (serve lets the lock go a moment before it exits)
    if _control(cfg, "stop", absent=True) is None:  # not running, or stopping already (it closed the socket first)
        pid = running_pid(Path(cfg.queue_directory))
        if pid is None:
            raise Failure(f"trimail serve is not running (no control socket in {cfg.queue_directory})")
        print(f"trimail: serve pid {pid} is stopping already: waiting", file=sys.stderr)
    deadline = time.monotonic() + timeout
    while running_pid(Path(cfg.queue_directory)) is not None or (pid is not None and _alive(pid)):
        if time.monotonic() > deadline:
            raise Failure(f"serve did not stop within {timeout:g}s")
        time.sleep(0.05)
    print("trimail: stopped", file=sys.stderr)


def _alive(pid: int) -> bool:
    """Is *pid* a process that has not exited (a zombie, waiting for its parent to
    reap it, has)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


@app.command(name="status")
def status_command(*, json_output: Annotated[bool, Parameter(name=["--json"], help="one JSON object")] = False,
                   config: ConfigOption = None, o: Overrides = None) -> None:
    """Is serve running: pid, uptime, listeners, queue counts, dead destinations;
    exit 0 running (or stopping), 1 not (postfix status)."""
    from trimail.queue.lock import running_pid

    cfg = load_config(config, o)
    answer = _control(cfg, "status", timeout=10, absent=True)  # (an error: it runs, and did not answer in time)
    if answer is None:  # no control socket: not running, or stopping (it closed it first)
        pid = running_pid(Path(cfg.queue_directory))
        if pid is not None:  # still holding the queue: its sessions and deliveries are ending
            print(json.dumps({"running": True, "stopping": True, "pid": pid}) if json_output
                  else f"trimail: stopping, pid {pid}: finishing its sessions and deliveries")
            return
        print('{"running": false}' if json_output else "trimail: not running")
        raise SystemExit(1)
    try:
        facts = json.loads(answer)
        if not isinstance(facts, dict):
            raise ValueError(answer)  # noqa: TRY004 - caught below, with json.loads's own ValueError
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
