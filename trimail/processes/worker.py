"""A worker process: ``python -m trimail.processes.worker SPEC`` (started by the master only).

SPEC is one JSON object: ``role`` (``smtpd`` or ``qmgr``), ``config`` and
``overrides`` (read again here, as the master read them), ``master`` (its pid),
``channel``, ``trigger`` and ``lock`` (inherited descriptors), ``parent`` when a
fork server started it (trimail.processes.forkserver), and for smtpd
``listeners`` (``[fd, kind, configured address]``), for qmgr ``addresses`` (what
serve listens on: mail for them is mail for us).

- **smtpd worker**: ``trimail.service.Server`` with every listener, its own
  group-commit writer, its sessions and policy; new mail is committed as
  ``incoming`` and the qmgr is woken through the trigger.  ``stop`` closes its
  listeners and drains its sessions, as a single-process serve does.
- **qmgr worker**: first returns what a predecessor left ``active`` to
  ``incoming`` (it is the only process that makes mail active), then runs the
  Scheduler with its delivery agents and bounces until ``stop``; in-flight
  deliveries then stop and their messages go back to ``incoming``.  ``reload``
  takes the new configuration in place (deliveries in progress finish as begun).

Either drops privileges (and enters the jail) as a single-process serve does,
after opening the queue and before it reads a byte from the network; the qmgr
starts the root delivery helper first when the configuration needs one.  The
worker dies with the master (``PR_SET_PDEATHSIG``): an orphan never goes on
serving a queue that a new master may take.  SIGINT and SIGHUP are the master's
to handle; SIGTERM stops the worker gracefully (the master restarts it).
Exit status: 0 after a stop, 2 for a configuration error, 1 otherwise.

Parameters: queue_directory, queue_busy_timeout, myhostname, chroot, maillog_file, graceful_timeout,
syslog_facility, dns_nameservers, dns_concurrency_limit (plus what the smtpd and qmgr
roles read: trimail.service, trimail.scheduler.qmgr).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import trio

from trimail import config as configuration
from trimail import log as maillog
from trimail.config import Config, ConfigError
from trimail.config.values import ListenAddress, parse_host_port
from trimail.delivery.connector import Connector
from trimail.delivery.local import privileged
from trimail.maps import TableError
from trimail.master import serve_sessions
from trimail.metrics import Metrics
from trimail.net.dns import Resolver
from trimail.policy.restrictions import restriction_lists
from trimail.policy.verifycleanup import clean_cache
from trimail.processes.board import SessionBoard
from trimail.processes.channel import Channel, ChannelClosed, await_go
from trimail.processes.clients import ClientBoard
from trimail.processes.reload import read_memfd
from trimail.processes.spawn import START_TIMEOUT
from trimail.processes.turns import Turns
from trimail.qshape import dead_destinations
from trimail.queue.inline import BookkeepingWriter
from trimail.queue.reserve import QueueReserve
from trimail.queue.reserve import keep as keep_reserve
from trimail.queue.solo import SmtpdWriter
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter
from trimail.scheduler import Scheduler
from trimail.scheduler.trigger import QmgrTrigger, receive_triggers
from trimail.service import Server
from trimail.startup import become_mail_owner, preflight, recover
from trimail.supervise import STRAY_SIGNALS, describe

log = logging.getLogger("trimail.master")

PR_SET_PDEATHSIG = 1
SHARE_LOCK = 0.002  # seconds the qmgr's writer leaves SQLite's write lock free between bookkeeping slices
STRESS_RECHECK = 0.2  # seconds between an smtpd worker's looks at the shared session total (stress mode)


def die_with_master(master: int, signum: int = signal.SIGKILL) -> None:
    """Linux: *signum* when the master goes (the fork server's is one it handles:
    trimail.processes.forkloop); if it went already, go now.  Called
    again after the worker becomes mail_owner: a change of uid or gid clears the
    setting (prctl(2)), and a worker that outlived a killed master kept the queue
    lock from the next serve while it drained its sessions."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):  # not Linux: the channel's EOF still stops us
        pass
    if os.getppid() != master:
        raise SystemExit(1)


def renumbered(spec: dict[str, Any], mapping: dict[int, int], parent: int) -> dict[str, Any]:
    """*spec* as the master wrote it, with each descriptor number replaced by the
    one this process received it as (*mapping*), and *parent*: the fork server
    (trimail.processes.forkserver), whose death this worker dies with."""
    fresh = dict(spec, parent=parent)
    for key in ("channel", "lock", "trigger", "board", "wake", "clients", "main_cf"):
        if key in spec:
            fresh[key] = mapping[spec[key]]
    if "listeners" in spec:
        fresh["listeners"] = [[mapping[fd], kind, configured] for fd, kind, configured in spec["listeners"]]
    return fresh


async def queue_facts(writer: QueueWriter) -> dict[str, Any]:
    """The queue's counts by state and its oldest arrival, for the master's gauges:
    the master reads no queue once serve runs (processes.reports.refresh_metrics)."""
    counts, oldest = await writer.read(Store.gauges)
    return {"counts": counts, "oldest": oldest}


def listening_sockets(spec: dict[str, Any]) -> list[tuple[trio.SocketListener, str, ListenAddress]]:
    endpoints = []
    for fd, kind, configured in spec["listeners"]:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        endpoints.append((trio.SocketListener(trio.socket.from_stdlib_socket(sock)), kind,
                          parse_host_port(configured)))
    return endpoints


async def serve_channel(channel: Channel, commands: dict[str, Any], stop: trio.Event) -> None:
    """Answer the master's requests until it closes the channel (then: stop)."""
    try:
        while True:
            request = await channel.receive()
            said = {"id": request.get("id")}  # the master matches answers to requests by it
            handler = commands.get(str(request.get("cmd")))
            if handler is None:
                await channel.send({**said, "error": f"unknown command {request.get('cmd')!r}"})
                continue
            try:
                answer = handler(request)
                if hasattr(answer, "__await__"):
                    answer = await answer
            except Exception as exc:  # noqa: BLE001 - one request's boundary: the answer says it
                await channel.send({**said, "error": describe(exc)})
                continue
            await channel.send({**said, "ok": answer})
    except ChannelClosed:
        if not stop.is_set():
            log.warning("lost the master's channel: stopping")
        stop.set()


async def say_final(channel: Channel, metrics: Metrics) -> None:
    """The last exposition, as the worker leaves: the master keeps its counts."""
    try:
        with trio.move_on_after(1):
            await channel.send({"final": metrics.exposition().decode()})
    except ChannelClosed:
        pass


def _open_store(config: Config):
    queue_directory: str = config.queue_directory
    busy_timeout = config.queue_busy_timeout
    holder = {"directory": queue_directory}

    def open_store() -> Store:  # reads the directory when called: "/" once inside the jail
        return Store.open(holder["directory"], busy_timeout=busy_timeout)

    return holder, open_store


async def run_smtpd(spec: dict[str, Any], config: Config, terminated: trio.Event) -> None:
    started = time.monotonic()
    channel = Channel.from_fd(spec["channel"])
    trigger = QmgrTrigger(socket.socket(fileno=spec["trigger"]))
    listeners = listening_sockets(spec)
    holder, open_store = _open_store(config)
    async with SmtpdWriter(open_store) as writer:
        preflight(config)  # the certificate, read before the jail may hide it
        config, holder["directory"] = become_mail_owner(config, holder["directory"], helper=False,
                                                       handed_over=True)
        die_with_master(spec.get("parent", spec["master"]))
        several = spec.get("workers", 1) > 1  # they take turns to accept
        board = SessionBoard(spec["board"], spec["slot"], spec["wake"] if several else None)
        server = Server(config, writer, listeners, trigger, board, ClientBoard(spec["clients"], spec["slot"]),
                        turns=Turns(board) if several else None)
        writer.alone = lambda: len(server.sessions) <= 1  # its message commits in the loop (queue.solo)
        stopped = trio.Event()

        def metrics(_: dict[str, Any]) -> str:
            server.recheck_stress()  # the stress gauge as of now
            return server.metrics.exposition().decode()

        def status(_: dict[str, Any]) -> dict[str, Any]:
            server.recheck_stress()
            return {"role": "smtpd", "pid": os.getpid(), "uptime": round(time.monotonic() - started, 3),
                    "sessions": len(server.sessions), "stress": server.anvil.stress}

        def stop(_: dict[str, Any]) -> str:
            board.stop_accepting()
            server.stop()
            return "ok"

        def retire(_: dict[str, Any]) -> str:
            board.stop_accepting()  # its sessions still count; it is no longer anyone's turn
            server.retire()
            return "ok"

        commands = {"status": status, "stop": stop, "retire": retire, "ping": lambda _: "ok",
                    "metrics": metrics, "queue": lambda _: queue_facts(writer)}

        async def watch_channel() -> None:
            await serve_channel(channel, commands, stopped)
            server.stop()

        async def watch_signal() -> None:
            await terminated.wait()
            server.stop()

        async def watch_stress() -> None:
            # the session total moves with the other workers' sessions too: a worker
            # whose own sessions neither open nor close still learns of stress in time
            while True:
                await trio.sleep(STRESS_RECHECK)
                server.recheck_stress()

        async with trio.open_nursery() as top:
            top.start_soon(watch_channel)
            top.start_soon(watch_signal)
            top.start_soon(trigger.watch)  # the qmgr's wake-ups that the mail log holds up
            if spec.get("workers", 1) > 1:
                top.start_soon(watch_stress)

            def ready(_: trio.Nursery) -> None:
                top.start_soon(channel.send, {"ready": {"role": "smtpd", "pid": os.getpid()}})

            await serve_sessions(server, listeners, ready)
            await say_final(channel, server.metrics)
            top.cancel_scope.cancel()


async def run_qmgr(spec: dict[str, Any], config: Config, terminated: trio.Event) -> None:
    started = time.monotonic()
    channel = Channel.from_fd(spec["channel"])
    trigger = socket.socket(fileno=spec["trigger"])
    holder, open_store = _open_store(config)
    addresses = [parse_host_port(text) for text in spec.get("addresses", [])]
    async with BookkeepingWriter(open_store, share_lock=SHARE_LOCK) as writer:
        await recover(writer, holder["directory"])  # a predecessor's deliveries in flight: back to incoming
        config, holder["directory"] = become_mail_owner(config, holder["directory"], helper=True,
                                                       handed_over=True)
        die_with_master(spec.get("parent", spec["master"]))
        resolver = Resolver(config.dns_nameservers, concurrency=config.dns_concurrency_limit)
        scheduler = Scheduler(config, writer, Connector(config, resolver, lambda: addresses))
        reserve = QueueReserve(holder["directory"])
        writer.on_no_space = reserve.release
        metrics = Metrics()
        scheduler.metrics = metrics
        writer.on_commit = metrics.commit
        metrics.measure("dead", lambda: len(scheduler.dead.snapshot(time.time())))
        stop = trio.Event()
        current = {"config": config}

        def status(_: dict[str, Any]) -> dict[str, Any]:
            dead = dead_destinations(scheduler.dead.snapshot(time.time()))
            return {"role": "qmgr", "pid": os.getpid(), "uptime": round(time.monotonic() - started, 3),
                    "active": len(scheduler.active), "delivery_helper": privileged.state(),
                    "dead_destinations": dead["dead"], "dead_destinations_total": dead["total"]}

        def reload(request: dict[str, Any]) -> str:
            fresh = configuration.load(current["config"].path, current["config"].overrides,
                                       text=request.get("main_cf"))  # read by the master: the jail hides it
            if current["config"].chroot:
                fresh = fresh.with_overrides({"queue_directory": "/"})
            addresses[:] = [parse_host_port(text) for text in request.get("addresses", [])]
            scheduler.reconfigure(fresh)
            current["config"] = fresh
            return "ok"

        def flush(_: dict[str, Any]) -> str:
            scheduler.forget_dead()
            scheduler.wake()
            return "ok"

        def wake(_: dict[str, Any]) -> str:
            scheduler.wake()
            return "ok"

        def stopping(_: dict[str, Any]) -> str:
            stop.set()
            return "ok"

        commands = {"status": status, "stop": stopping, "ping": lambda _: "ok", "reload": reload,
                    "queue": lambda _: queue_facts(writer),
                    "flush": flush, "wake": wake, "metrics": lambda _: metrics.exposition().decode(),
                    "dead": lambda _: dead_destinations(scheduler.dead.snapshot(time.time()))}
        async with trio.open_nursery() as top:
            await top.start(scheduler.run)
            top.start_soon(receive_triggers, trigger, scheduler)
            top.start_soon(keep_reserve, reserve)
            top.start_soon(clean_cache, lambda: current["config"])  # the verification cache's expiry
            top.start_soon(serve_channel, channel, commands, stop)
            await channel.send({"ready": {"role": "qmgr", "pid": os.getpid()}})

            async def watch_signal() -> None:
                await terminated.wait()
                stop.set()

            top.start_soon(watch_signal)
            await stop.wait()
            await scheduler.finish(current["config"].graceful_timeout)
            top.cancel_scope.cancel()  # deliveries still in flight stop; their messages go back below
        returned = await writer.run(Store.recover_active)
        if returned:
            log.info("%d message(s) in delivery returned to the incoming queue", returned)
        await say_final(channel, metrics)


class _NamedAfterRole(logging.Filter):
    """What the shared start-up and boundary code logs as ``trimail/master`` is, in a
    worker, that worker's line: ``trimail/smtpd[pid]`` or ``trimail/qmgr[pid]``."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.name_as = f"trimail.{role}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.name = self.name_as
        return True


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run(json.loads(args[0]))


def run(spec: dict[str, Any]) -> None:
    """The worker *spec* describes, until it stops (raises SystemExit on failure)."""
    die_with_master(spec.get("parent", spec["master"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C goes to the whole group: the master's
    for signum in (signal.SIGHUP, *STRAY_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    if not await_go(spec["channel"], START_TIMEOUT):  # a late fork: another worker has its place
        print(f"trimail: warning: {spec['role']} worker pid {os.getpid()} was started after the master "
              "gave up on it: exiting", file=sys.stderr)
        raise SystemExit(0)
    try:
        # main.cf as serve runs it (the master's), never as the file may say by now
        text = read_memfd(spec["main_cf"]) if "main_cf" in spec else None
        config = configuration.load(spec["config"], spec["overrides"], text=text)
        restriction_lists(config)  # imports every policy module it names now: the jail may hide them later
    except (ConfigError, TableError, OSError, UnicodeDecodeError) as exc:
        print(f"trimail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    maillog.setup(config.myhostname, maillog_file=config.maillog_file, syslog_facility=config.syslog_facility)
    logging.getLogger("trimail.master").addFilter(_NamedAfterRole(spec["role"]))
    serve_role = run_smtpd if spec["role"] == "smtpd" else run_qmgr

    async def until_terminated() -> None:
        terminated = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def work() -> None:
                    await serve_role(spec, config, terminated)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(work)
                async for _ in signals:
                    terminated.set()  # SIGTERM: a graceful stop, as the master's stop request

    try:
        trio.run(until_terminated)
    except BaseException as exc:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # the one error of a nursery: what the operator must read
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            logging.getLogger("trimail.master").critical("%s worker: %s", spec["role"], exc)
            logging.getLogger("trimail.master").debug("%s worker failed", spec["role"], exc_info=exc)
            maillog.shutdown()
            raise SystemExit(1) from None
        raise
    maillog.shutdown()


if __name__ == "__main__":
    main()
