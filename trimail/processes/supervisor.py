"""The master process (Postfix's master(8)) when ``smtpd_workers > 0``.

Structure::

    serve_processes
    ├── QueueWriter thread          (migrations and recovery at start; a worker reads the queue gauges)
    ├── one supervising task per worker slot: spawn, wait, restart with back-off
    │   ├── qmgr worker             (trimail.processes.worker: scheduler, delivery, bounces)
    │   └── smtpd worker × smtpd_workers   (sessions, policy, its own group commit)
    └── request loops: the control socket, the metrics endpoint

Start-up order is the single-process serve's (trimail.master.serve): the queue
lock, the queue database (opened, migrated, recovered), the TLS certificate,
the listeners, the control socket and the metrics endpoint; then the qmgr
worker and the smtpd workers, each reporting ready over its channel; only then
``daemon started``.  A worker that fails to start at start-up ends serve (exit 1).

The master stays as it started (root on a real gateway: it must start
replacement workers, which open the queue, start the root delivery helper and
enter the jail before they drop privileges, as Postfix's master does); it
reads nothing from the network except the metrics endpoint's bounded requests.

This module keeps the slots: a worker's restart with back-off, retiring slots
(stop, or an older generation), asking every worker at once, and the stop.  A
worker process is started by trimail.processes.spawn, a reload applied by
trimail.processes.reload, the operator's reports made by trimail.processes.reports.

Restart with back-off, reload by generations, stop, and what is counted where:
docs/architecture.md, section "Processes".

Parameters: smtpd_workers, master_service_disable, graceful_timeout (plus what trimail.master.serve reads).
"""

from __future__ import annotations

import heapq
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client import Counter

from trimail import __version__
from trimail.commands import command_table
from trimail.config import Config
from trimail.master import notify_systemd
from trimail.metrics import Metrics
from trimail.net.http import serve_metrics
from trimail.net.listener import bound_address
from trimail.postqueue import address
from trimail.processes import reports
from trimail.processes.aggregate import merge
from trimail.processes.board import SLOTS, SessionBoard
from trimail.processes.channel import ChannelClosed
from trimail.processes.clients import ClientBoard
from trimail.processes.forkserver import ForkServer
from trimail.processes.reload import apply_reload, workers_wanted
from trimail.processes.slot import Slot, Worker, WorkerStartError, exit_text
from trimail.processes.spawn import became_ready, spawn
from trimail.public import PublicSocket, serve_operators
from trimail.queue.lock import QueueLock
from trimail.queue.writer import QueueWriter
from trimail.scheduler.trigger import QmgrTrigger
from trimail.startup import Endpoint
from trimail.supervise import Backoff, contained, describe

log = logging.getLogger("trimail.master")

ASK_TIMEOUT = 3.0  # seconds for status, dead and metrics answers: well within the CLI's and the scrape's 10 s
STEADY = 60.0  # a worker that ran this long before it died restarts without back-off history
STOP_MARGIN = 15.0  # seconds beyond graceful_timeout before a stopping worker is killed
UNREADY_GRACE = 5.0  # seconds after SIGTERM for a worker never ready to end: no session to drain


class Master:
    """Handle on a running multi-process serve: what ``trimail`` commands and
    signals act on (the same ``stop``/``reload``/``metrics`` as trimail.service.Server)."""

    def __init__(self, config: Config, writer: QueueWriter, lock: QueueLock, listeners: list[Endpoint],
                 fork_server: ForkServer | None = None) -> None:
        self.config = config
        self.main_cf: int | None = None  # main.cf's text as running, for every worker to load (processes.reload)
        self.queue_directory = ""
        self.queue_index: tuple[int, ...] | None = None  # the WAL and index every process has (spawn.check_queue_index)
        self.fork_server = fork_server
        self.writer = writer
        self.lock = lock
        self.listening: dict[tuple[str, str], list[Endpoint]] = {}
        for endpoint in listeners:
            self.listening.setdefault((endpoint[1], str(endpoint[2])), []).append(endpoint)
        self._send_trigger, self._receive_trigger = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.board = SessionBoard.create()
        self.clients = ClientBoard.create()  # per-client counts and rates of all smtpd workers
        self._free_slots = list(range(SLOTS))
        self.trigger = QmgrTrigger(self._send_trigger)
        self.slots: list[Slot] = []
        self.retired: list[Slot] = []  # older generations finishing their sessions after a reload
        self.generation = 0
        self.metrics = Metrics()
        self.restarts = Counter("trimail_worker_restarts", "Worker processes started again after an unexpected exit",
                                ["role"], registry=self.metrics.registry)
        self.metrics_addresses: list[Any] = []
        self._scraped: dict[int, str] = {}  # each worker's exposition at the last scrape
        self._departed = ""  # the counters and histograms of workers that are gone, summed
        self.started = time.monotonic()
        self.reloads = 0
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._reloading = trio.Lock()  # SIGHUP does not pass the control socket's one-command-at-a-time lock
        self._reload_scope: trio.CancelScope | None = None  # the reload in progress

    # -- the listeners as they are now --------------------------------------

    @property
    def endpoints(self) -> list[Endpoint]:
        return [endpoint for entries in self.listening.values() for endpoint in entries]

    @property
    def addresses(self) -> list[Any]:
        return [bound_address(listener) for listener, _, _ in self.endpoints]

    # -- workers ------------------------------------------------------------

    async def _keep(self, slot: Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a worker in *slot* until the slot is retired; the first start's
        failure is raised (to start-up or reload), later ones are retried.  A
        retired slot starts nothing more, even from its back-off wait."""
        backoff = Backoff(initial=0.5, maximum=30.0)
        first = True
        if slot.role == "smtpd":
            if not self._free_slots:  # 256 smtpd workers alive, most of them old generations draining
                slot.gone.set()
                raise WorkerStartError("no free session-board slot: too many smtpd workers still finishing "
                                       "sessions of earlier reloads")
            slot.board_slot = heapq.heappop(self._free_slots)  # the lowest: readers scan up to the highest
            self.board.hand_out(slot.board_slot)
        try:
            while True:
                began = time.monotonic()
                try:
                    worker = await spawn(self, slot)
                except (OSError, ValueError) as exc:  # no process at all: out of memory, processes, descriptors
                    if first:
                        raise WorkerStartError(f"{slot.role} worker could not be started: {describe(exc)}") from None
                    log.warning("process trimail/%s could not be started: %s", slot.role, describe(exc))
                else:
                    if worker is None:  # retired or stopping while the fork server did not answer
                        if first:
                            raise WorkerStartError(f"{slot.role} worker not started: serve is stopping")
                        return
                    ready = await self._run_one(slot, worker, task_status if first else None)
                    if first and not ready:
                        status = exit_text(worker.process.returncode)
                        raise WorkerStartError(f"{slot.role} worker pid {worker.pid} did not start: {status}")
                    first = False
                    if slot.retired or self._stop.is_set():
                        return
                    log.warning("process trimail/%s pid %d %s", slot.role, worker.pid,
                                exit_text(worker.process.returncode))
                slot.restarts += 1
                self.restarts.labels(slot.role).inc()
                if time.monotonic() - began >= STEADY:
                    backoff.reset()
                delay = backoff.next()
                if delay >= 4:
                    log.warning("trimail/%s: bad command startup -- throttling for %.0fs", slot.role, delay)
                slot.waiting = True
                try:
                    with trio.move_on_after(delay):
                        await slot.leaving.wait()  # a stop or a reload ends the wait, and the slot
                finally:
                    slot.waiting = False
                if slot.retired or self._stop.is_set():
                    return
        finally:
            if slot.board_slot is not None:
                heapq.heappush(self._free_slots, slot.board_slot)
            slot.gone.set()

    async def _run_one(self, slot: Slot, worker: Worker, task_status: trio.TaskStatus[None] | None) -> bool:
        """*worker* in *slot* from its start until it has exited; whether it became
        ready (then *task_status*, when given, is told)."""
        ready = False
        try:
            if await self._ready_unless_leaving(slot, worker):
                ready = True
                slot.worker = worker
                if task_status is not None:
                    task_status.started()
                if slot.retired or self._stop.is_set():  # retired while it started: nobody else tells it
                    await self._tell_stop(worker, slot.farewell)
            else:  # it failed (its own log line says why), stays silent, or a stop or a reload
                # came while it started (then SIGTERM): let it end, or end it.  Not ready, it
                # has no session to drain: a frozen one held a stop for graceful_timeout + 15 s
                if slot.leaving.is_set():
                    worker.process.terminate()
                with trio.move_on_after(UNREADY_GRACE):
                    await worker.wait()
                if worker.process.poll() is None:
                    worker.process.kill()
            await worker.wait()
        finally:
            slot.worker = None
            if slot.board_slot is not None:
                self.board.clear(slot.board_slot)  # its sessions died with it
                self.clients.clear(slot.board_slot)
            if slot.role == "smtpd":  # mail it committed but had not yet told the qmgr about (it
                self.trigger.wake()  # died, or was killed, in between): a round claims it now
            with trio.CancelScope(shield=True):
                if worker.process.poll() is None:
                    worker.process.kill()
                    await worker.wait()
                await self._depart(worker)
                await worker.channel.aclose()
        return ready

    @staticmethod
    async def _ready_unless_leaving(slot: Slot, worker: Worker) -> bool:
        """``became_ready``, except that the slot's retirement (a stop, a reload) ends
        the wait (False): a worker stuck in its start (frozen, starved) held a stop
        for the whole ``START_TIMEOUT``, past ``graceful_timeout`` + 15 s."""
        ready = False
        async with trio.open_nursery() as racing:
            async def starts() -> None:
                nonlocal ready
                ready = await became_ready(worker)
                racing.cancel_scope.cancel()

            async def leaves() -> None:
                await slot.leaving.wait()
                racing.cancel_scope.cancel()

            racing.start_soon(starts)
            racing.start_soon(leaves)
        return ready

    async def _depart(self, worker: Worker) -> None:
        """Its counts stay in /metrics' sums: a counter that fell would be a reset."""
        last = await worker.last_metrics() or self._scraped.get(worker.pid)
        self._scraped.pop(worker.pid, None)
        if last:
            self._departed = merge([self._departed, last], cumulative=True).decode()

    async def _start_slots(self, role: str, count: int, generation: int) -> list[Slot]:
        """Start *count* workers of *role*; all ready, or none left running."""
        assert self._nursery is not None
        slots = [Slot(role, generation, count) for _ in range(count)]
        try:
            async with trio.open_nursery() as starting:
                for slot in slots:
                    starting.start_soon(self._start_one, slot)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._retire(slots)
            failed = exc.subgroup(WorkerStartError) if isinstance(exc, BaseExceptionGroup) else None
            if failed is not None:
                raise failed.exceptions[0] from None  # one worker's reason, for the log and the exit
            raise
        self.slots += slots
        return slots

    async def _start_one(self, slot: Slot) -> None:
        assert self._nursery is not None
        await self._nursery.start(self._keep, slot)

    async def _retire(self, slots: list[Slot], wait: bool = False, command: str = "stop") -> None:
        """Tell the workers in *slots* to stop (smtpd: drain their sessions) or, after
        a reload, to retire (smtpd: let every session run to its end); with *wait*, kill
        those alive ``graceful_timeout`` + ``STOP_MARGIN`` after the telling began."""
        deadline = trio.current_time() + self.config.graceful_timeout + STOP_MARGIN  # a frozen one's telling: 10 s
        for slot in slots:
            slot.retired, slot.farewell = True, command
            slot.leaving.set()
        async with trio.open_nursery() as telling:
            for slot in slots:
                if slot.worker is not None:
                    telling.start_soon(self._tell_stop, slot.worker, command)
        if wait:
            with trio.move_on_at(deadline):
                for slot in slots:
                    await slot.gone.wait()
            for slot in slots:
                if slot.worker is not None and slot.worker.process.poll() is None:
                    log.warning("process trimail/%s pid %d did not stop: killed", slot.role, slot.worker.pid)
                    slot.worker.process.kill()
            for slot in slots:
                await slot.gone.wait()
        self.slots = [slot for slot in self.slots if slot not in slots]

    @staticmethod
    async def _tell_stop(worker: Worker, command: str) -> None:
        try:
            await worker.request(command)
        except (ChannelClosed, trio.TooSlowError, RuntimeError):
            worker.process.terminate()  # SIGTERM: the same graceful stop

    def _retiring(self) -> list[Slot]:
        self.retired = [slot for slot in self.retired if not slot.gone.is_set()]
        return list(self.retired)

    def _live(self, role: str) -> list[Worker]:
        return [slot.worker for slot in self.slots if slot.role == role and slot.worker is not None]

    async def _ask_all(self, command: str, role: str | None = None) -> list[tuple[Worker, Any]]:
        answers: list[tuple[Worker, Any]] = []

        async def ask(worker: Worker) -> None:
            try:
                answers.append((worker, await worker.request(command, timeout=ASK_TIMEOUT)))
            except (ChannelClosed, trio.TooSlowError, RuntimeError) as exc:
                answers.append((worker, exc))

        async with trio.open_nursery() as asking:
            for slot in self.slots + self._retiring():
                if slot.worker is not None and (role is None or slot.role == role):
                    asking.start_soon(ask, slot.worker)
        return answers

    # -- what the operator's commands do -------------------------------------

    def control_commands(self) -> dict[str, Callable[[], Any]]:
        return command_table(flush=lambda: self.trigger.forget_dead(), wake=lambda: self.trigger.wake(),
                             stop=self.stop, reload=self.reload, status=self.status, dead=self.dead)

    async def dead(self) -> str:
        return await reports.dead(self)

    async def status(self) -> str:
        return await reports.status(self)

    async def refresh_metrics(self) -> None:
        await reports.refresh_metrics(self)

    async def exposition(self) -> bytes:
        return await reports.exposition(self)

    def stop(self) -> None:
        self._stop.set()
        if self._reload_scope is not None:  # its new workers would hold the stop until they start
            self._reload_scope.cancel()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def reload(self) -> str:
        """One reload at a time (two at once both retired the same old generation
        and left one new generation running for ever); none once stopping."""
        async with self._reloading:
            if self._stop.is_set():
                log.info("reload ignored: serve is stopping")
                return "error: serve is stopping"
            self._reload_scope = trio.CancelScope()  # a stop cancels it (undone: apply_reload)
            try:
                with self._reload_scope:
                    return await apply_reload(self)
            finally:
                self._reload_scope = None
            log.info("reload cancelled: serve is stopping")
            return "error: serve is stopping"

    async def run(self, control: trio.SocketListener, metrics_listeners: list[trio.SocketListener], *,
                  task_status: trio.TaskStatus[Master] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as supervising:
            self._nursery = supervising
            if "qmgr" not in self.config.master_service_disable:
                await self._start_slots("qmgr", 1, self.generation)
            else:
                log.info("qmgr disabled by master_service_disable: mail stays queued")
            await self._start_slots("smtpd", workers_wanted(self.config), self.generation)
            async with trio.open_nursery() as requests:
                requests.start_soon(self.trigger.watch)  # an owed flush trigger (queue flush)
                requests.start_soon(serve_operators, control, self.control_commands(), self.metrics, Path(self.queue_directory),
                                    lambda: self.config, PublicSocket(address(self.queue_directory)))
                for listener in metrics_listeners:
                    requests.start_soon(serve_metrics, listener, self.metrics, self.refresh_metrics, self.exposition)
                    self.metrics_addresses.append(bound_address(listener))
                if self.metrics_addresses:
                    log.info("metrics endpoint listening on %s", ", ".join(map(str, self.metrics_addresses)))
                log.info("%d smtpd worker(s)%s running", len(self._live("smtpd")),
                         " and the qmgr worker" if self._live("qmgr") else "")
                log.info("daemon started -- version %s, configuration %s, listening on %s",
                         __version__, self.config.source, ", ".join(map(str, self.addresses)))
                task_status.started(self)
                notify_systemd(b"READY=1")
                await self._stop.wait()
                notify_systemd(b"STOPPING=1")
                requests.cancel_scope.cancel()
            async with self._reloading:  # a reload begun (SIGHUP) ends first: its workers are stopped below
                pass
            for listener, _, _ in self.endpoints:  # the workers hold their own copies until they drain
                with contained("closing a listener"):
                    await listener.aclose()
            await self._retire(self.slots + self._retiring(), wait=True)
            supervising.cancel_scope.cancel()

