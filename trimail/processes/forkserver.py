"""The fork server: workers started in milliseconds, not by importing trimail again.

``trimail serve`` forks it before anything else runs (one thread, no event loop,
no queue, no listener; only stdio open), once the modules every worker needs are
imported.  The master then asks it for each worker: one message on a
``SOCK_SEQPACKET`` socketpair with the worker's spec (trimail.processes.worker)
and, as ``SCM_RIGHTS``, the descriptors the spec names.  It forks (unless the
request's deadline has passed: the master gave up on it), the child renumbers
the spec to the descriptors it received and runs the worker; the fork
server answers ``{"id", "pid"}`` and, when a worker exits, ``{"exited", "code"}``
(it is their parent and reaps them).  A new interpreter for every worker cost
0.45 s of CPU each, at every start, restart and reload.

This module is the master's end (``ForkServer``: start it, ``spawn`` a worker,
``run`` reading its answers, ``shut`` it); the fork server's own loop is
trimail.processes.forkloop, and the handle on each forked worker
trimail.processes.forked (``ForkedProcess``).

Lifetime: it dies with the master (``PR_SET_PDEATHSIG``), killing first every
process it forked (one forked a moment ago has no ``PR_SET_PDEATHSIG`` of its own
yet: trimail.processes.forkloop), and its workers die with it, so nothing outlives
the master.  It ignores SIGINT, SIGHUP and SIGTERM (a
terminal's ^C and systemd's stop reach the whole group: the master and its
workers stop gracefully, and the workers must not lose their parent before they
have drained); when the master closes the socket it waits for its workers and
exits.  If it is gone anyway, the master starts each later worker with a new
interpreter (``python -m trimail.processes.worker``), as it does when no fork
server could be started (another thread was already running: a fork would copy
its locks held).

A worker started by the fork server runs the code that serve started with, also
after a reload; a new version of trimail takes effect when serve starts again.

Parameters: none.
"""

from __future__ import annotations

import array
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import trio

from trimail.processes import forkloop
from trimail.processes.forked import ForkedProcess, until_exited
from trimail.processes.forkloop import DESCRIPTOR_LIMIT, MESSAGE_LIMIT, children_of

log = logging.getLogger("trimail.master")

REPLY_TIMEOUT = 10.0  # seconds for the fork server to answer a request


class ForkServer:
    """The master's end: ``spawn`` a worker, ``run`` (a task) reads the answers."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.alive = True
        self._stdlib_socket = sock
        self._socket = trio.socket.from_stdlib_socket(sock)
        self._asking = trio.Lock()
        self._requests = 0
        self._waiting: int | None = None  # the request a spawn() waits on (None: nobody waits)
        self._answer: dict[str, Any] | None = None
        self._answered = trio.Event()
        self._children: dict[int, ForkedProcess] = {}
        self._closing = False
        self._finished = trio.Event()

    @classmethod
    def start(cls) -> ForkServer | None:
        """Fork the fork server now; None where it cannot be done safely."""
        if threading.active_count() > 1 or not hasattr(os, "fork") or not hasattr(socket, "SOCK_SEQPACKET"):
            return None
        import trimail.processes.worker  # noqa: F401 - what every worker runs, imported once for all

        gc.freeze()  # what is imported now stays shared: the workers' collections leave it alone
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        master = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the fork server; it never returns into serve's code
            code = 1
            try:
                ours.close()
                code = forkloop.run(theirs, master)
            except BaseException:  # noqa: BLE001 - the process's last boundary: say why, then go
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        gc.unfreeze()
        return cls(pid, ours)

    async def spawn(self, spec: dict[str, Any], fds: list[int]) -> ForkedProcess | None:
        """A worker for *spec*, forked; None when the fork server is gone or fails
        (the master then starts one with a new interpreter)."""
        if not self.alive or len(fds) > DESCRIPTOR_LIMIT:
            return None
        async with self._asking:
            self._requests += 1
            deadline = time.monotonic() + REPLY_TIMEOUT  # CLOCK_MONOTONIC: one clock for both processes
            request = json.dumps({"id": self._requests, "spec": spec, "fds": fds, "deadline": deadline}).encode()
            if len(request) > MESSAGE_LIMIT:
                return None
            self._answered = trio.Event()
            self._waiting = self._requests
            try:
                try:
                    await self._socket.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                            array.array("i", fds))])
                except OSError:
                    return None
                with trio.move_on_after(REPLY_TIMEOUT):
                    while self.alive and (self._answer is None or self._answer.get("id") != self._requests):
                        await self._answered.wait()
                        self._answered = trio.Event()
                answer, self._answer = self._answer, None
            except BaseException:  # cancelled (a stop): its answer may have come in the same pass of
                # trio's loop as the cancellation, taken by run while this still waited for it
                late, self._answer = self._answer, None
                if late is not None and late.get("id") == self._requests and "process" in late:
                    self._unwanted(late)
                raise
            finally:
                self._waiting = None  # an answer to it from now on is one nobody takes (run)
        if answer is None or answer.get("id") != self._requests or "pid" not in answer:
            if answer is not None and "error" in answer:
                log.warning("fork server could not start a worker: %s", answer["error"])
            elif self.alive:
                log.warning("fork server pid %d did not answer: workers are started with a new interpreter "
                            "from now on", self.pid)
                self.alive = False
            return None
        return answer["process"]  # (its exit may have been reported already)

    async def run(self) -> None:
        """Until the fork server is gone: its answers to ``spawn`` and the exits of
        its workers.  If it dies, its workers die with it (``PR_SET_PDEATHSIG``);
        each is reported killed once it is gone."""
        try:
            while True:
                try:
                    data = await self._socket.recv(MESSAGE_LIMIT)
                except (OSError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                message = json.loads(data)
                if "exited" in message:
                    process = self._children.pop(message["exited"], None)
                    if process is not None:
                        process.ended(message["code"])
                else:
                    if "pid" in message:  # registered now: its exit may be the very next message
                        message["process"] = self._children[message["pid"]] = ForkedProcess(message["pid"])
                        if message.get("id") != self._waiting:  # its spawn() gave up or was cancelled
                            self._unwanted(message)
                    self._answer = message
                    self._answered.set()
        finally:
            self.alive = False
            self._answered.set()
            self._socket.close()
            if not self._closing:
                log.warning("fork server pid %d exited: workers are started with a new interpreter from now on",
                            self.pid)
            for process in self._children.values():
                process.orphan()  # each one's own wait() sees it exit
            self._children = {}
            with trio.CancelScope(shield=True):
                await until_exited(self.pid)
                self.reap()  # no zombie left behind
            self._finished.set()

    def _unwanted(self, answer: dict[str, Any]) -> None:
        """A worker forked for a ``spawn`` that gave up or was cancelled: killed (it
        would exit at the end of its channel, unless frozen: then a stop waited for it)."""
        log.warning("fork server pid %d forked worker pid %d after the master gave up on it: killed",
                    self.pid, answer["pid"])
        answer["process"].kill()

    def close(self) -> None:
        """No more workers: the fork server exits once the ones it started have
        (then ``run`` returns)."""
        self._closing = True
        try:
            self._stdlib_socket.shutdown(socket.SHUT_WR)
        except OSError:  # gone already
            pass

    async def shut(self) -> None:
        """``close``, then until ``run`` has returned; a fork server that does not
        exit within ``REPLY_TIMEOUT`` (stopped, stuck) is killed: every worker has
        gone by now."""
        self.close()
        with trio.move_on_after(REPLY_TIMEOUT):
            await self._finished.wait()
        if not self._finished.is_set():
            left = children_of(self.pid)  # forked, not yet its own: no PR_SET_PDEATHSIG, and
            # holding the fork server's socket (a frozen one kept run from its end for ever)
            log.warning("fork server pid %d did not exit: killed%s", self.pid,
                        f", and the processes it forked still running: pid {', '.join(map(str, left))}" if left else "")
            for pid in [*left, self.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            with trio.move_on_after(REPLY_TIMEOUT):
                await self._finished.wait()
            if not self._finished.is_set():  # something else still holds the socket's other end
                self._socket.close()  # run's recv ends now
                await self._finished.wait()

    def abandon(self) -> None:
        """serve failed before ``run`` ran (no worker was started): let the fork
        server go and reap it.  After ``shut`` there is nothing left to do."""
        if not self._finished.is_set():
            self.close()
            self.reap()

    def reap(self) -> None:
        """Its exit status, once it has gone (it is the master's child)."""
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped already
            pass

