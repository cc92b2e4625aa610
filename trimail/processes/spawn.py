"""Starting one worker process for a slot: its spec, the descriptors it inherits,
forked by the fork server or else a new interpreter, and its first word (ready).

The spec (trimail.processes.worker reads it) names the configuration file and
the ``-o`` overrides, and passes main.cf's text as serve runs it (a sealed
in-memory file: trimail.processes.reload.text_memfd); the worker loads it.  An
smtpd worker gets the listening sockets, the session board, the client board and
the sending end of the qmgr trigger; the qmgr worker gets the trigger's receiving
end and the listening addresses (mail for them is mail for us).  Both get the
queue lock's descriptor and their channel.

Each try has a channel of its own: a fork that comes after its request gave up
(trimail.processes.forkserver) finds its channel closed and exits, never sharing
the next worker's.  A worker started with a new interpreter is started on the
starter's own thread (trimail.processes.starter), which lives as long as serve: its
``PR_SET_PDEATHSIG`` fires when the thread that started it exits, and a child
frozen before its exec holds that thread, not the event loop.

Security: a worker inherits only the descriptors its spec names (``pass_fds``, or
``SCM_RIGHTS`` to the fork server).

Parameters: none (the worker loads its configuration itself).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import trio

from trimail.processes.channel import GO, Channel, ChannelClosed
from trimail.processes.forked import ForkedProcess
from trimail.processes.slot import Slot, Worker
from trimail.processes.starter import StartAbandoned, Starter
from trimail.queue.guards import QueueError, refuse_other_index

if TYPE_CHECKING:
    from trimail.processes.supervisor import Master

START_TIMEOUT = 60.0  # seconds for a worker to report ready
STARTER = Starter()  # this process's starts with a new interpreter (its thread is made at the first)


def worker_spec(master: Master, slot: Slot, channel_fd: int,
                main_cf: int | None = None) -> tuple[dict[str, Any], list[int]]:
    """The spec of a worker for *slot* and the descriptors it names; *main_cf*: this
    try's own copy of the running main.cf's descriptor (``_start``)."""
    spec: dict[str, Any] = {"role": slot.role, "config": str(master.config.path) if master.config.path else None,
                            "overrides": list(master.config.overrides), "master": os.getpid(),
                            "channel": channel_fd, "lock": master.lock.fileno(), "generation": slot.generation}
    fds = [channel_fd, master.lock.fileno()]
    if main_cf is not None:
        spec["main_cf"] = main_cf
        fds.append(main_cf)
    if slot.role == "smtpd":
        spec["board"], spec["slot"], spec["clients"] = master.board.fd, slot.board_slot, master.clients.fd
        spec["wake"] = master.board.wake
        spec["workers"] = slot.peers  # several: they take turns to accept (trimail.processes.turns)
        fds += [master.board.fd, master.board.wake, master.clients.fd]
        spec["trigger"] = master._send_trigger.fileno()
        spec["listeners"] = [[listener.socket.fileno(), kind, str(configured)]
                             for listener, kind, configured in master.endpoints]
        fds += [master._send_trigger.fileno(), *(fd for fd, _, _ in spec["listeners"])]
    else:
        spec["trigger"] = master._receive_trigger.fileno()
        spec["addresses"] = [str(address) for address in master.addresses]
        fds.append(master._receive_trigger.fileno())
    return spec, fds


def check_queue_index(master: Master) -> None:
    """OSError when ``queue.db-wal`` or ``queue.db-shm`` is no longer the file the
    running processes have open (removed or replaced under serve: SQLite cannot
    tell): a worker started now would make a WAL or an index of its own, the two
    would disagree, and mail it acknowledged could be lost (red team 29).  The slot
    waits with back-off; the running workers go on, all with the one WAL."""
    if master.queue_index is None:
        return
    try:
        refuse_other_index(master.queue_directory, master.queue_index)
    except QueueError as exc:
        raise OSError(errno.ESTALE, str(exc)) from None


async def spawn(master: Master, slot: Slot) -> Worker | None:
    """Forked by the fork server, or else with a new interpreter.  Each try has a
    channel of its own: a fork that comes after its request gave up finds its
    channel closed and exits, never sharing the next worker's.  None: the slot was
    retired, or serve began to stop, while the fork server did not answer (up to
    its timeout): nothing is started then (a stop may have closed the listening
    sockets the new interpreter would be given).  OSError: no process could be
    started, or none may be (``check_queue_index``)."""
    check_queue_index(master)
    if master.fork_server is not None and master.fork_server.alive:
        worker = await _start(master, slot, forked=True)
        if worker is not None:
            return worker
        if slot.retired or master.stopping:
            return None
    worker = await _start(master, slot, forked=False)
    assert worker is not None
    return worker


async def _start(master: Master, slot: Slot, forked: bool) -> Worker | None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process: subprocess.Popen[bytes] | ForkedProcess | None = None
    # a copy of its own: a reload may close the master's while this try waits for
    # the fork server, and the number could name another file by the time it is sent
    main_cf = None if master.main_cf is None else os.dup(master.main_cf)
    abandoned = False
    try:
        spec, fds = worker_spec(master, slot, theirs.fileno(), main_cf)
        if forked:
            assert master.fork_server is not None
            process = await master.fork_server.spawn(spec, fds)
        else:  # on the starter's thread: a child frozen before its exec holds that thread, not the loop
            try:
                process = await STARTER.start([sys.executable, "-m", "trimail.processes.worker", json.dumps(spec)],
                                              fds)
            except StartAbandoned:  # Popen may still read these: left open (one start's worth)
                abandoned = True
                raise
        if process is not None:  # this process is the one started: it may begin (channel.await_go)
            try:
                ours.sendall(GO)  # (a new socket pair: it takes the line at once)
            except OSError:
                pass  # it died already: became_ready finds the channel closed
    finally:
        if abandoned:
            theirs.detach()
        else:
            theirs.close()
            if main_cf is not None:
                os.close(main_cf)
        if process is None:
            ours.close()
    return None if process is None else Worker(slot, process, Channel(ours))


async def became_ready(worker: Worker) -> bool:
    """Whether *worker* reported ready within ``START_TIMEOUT``."""
    try:
        with trio.fail_after(START_TIMEOUT):
            said = await worker.channel.receive()
    except (ChannelClosed, trio.TooSlowError):
        return False
    return "ready" in said
