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

Lifetime: it dies with the master (``PR_SET_PDEATHSIG``) and its workers die with
it, so nothing outlives the master.  It ignores SIGINT, SIGHUP and SIGTERM (a
terminal's ^C and systemd's stop reach the whole group: the master and its
workers stop gracefully, and the workers must not lose their parent before they
have drained); when the master closes the socket it waits for its workers and
exits.  If it is gone anyway, the master starts each later worker with a new
interpreter (``python -m trimail.processes.worker``), as it does when no fork
server could be started (another thread was already running: a fork would copy
its locks held).

A worker started by the fork server runs the code that serve started with, also
after a reload; a new version of trimail takes effect when serve starts again.
"""

from __future__ import annotations

import array
import gc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import trio

log = logging.getLogger("trimail.master")

MESSAGE_LIMIT = 1 << 20  # bytes of one request: a spec names its listeners, at most a few hundred
DESCRIPTOR_LIMIT = 253  # SCM_RIGHTS' own limit per message (SCM_MAX_FD)
REPLY_TIMEOUT = 10.0  # seconds for the fork server to answer a request
REPORT_WAIT = 2.0  # seconds for the fork server to report the status of a worker that has exited
UNKNOWN_STATUS = 256  # a worker's status that the fork server never reported


class ForkedProcess:
    """A worker forked by the fork server: what the master uses of ``subprocess.Popen``.
    Its exit status comes from the fork server (its parent); that it exited, also
    from a pidfd taken when its pid was reported, so a fork server that stopped
    answering (SIGSTOP) cannot hide a worker's death."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.exited = trio.Event()
        self._orphaned = False
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:  # exited and reaped already: its report is on its way
            self._pidfd = None

    def poll(self) -> int | None:
        return self.returncode

    def ended(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)  # a task waiting on it wakes up
            os.close(self._pidfd)
            self._pidfd = None
        self.exited.set()

    async def until_exited(self) -> None:
        """Until it has exited, reaped or not."""
        if self._pidfd is not None:
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            except trio.ClosedResourceError:  # its report came meanwhile
                pass

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # exited; the report is on its way
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def orphan(self) -> None:
        """Its fork server died: it dies too (``PR_SET_PDEATHSIG``), and no status
        will come."""
        self._orphaned = True
        if self._pidfd is None:  # reaped already: gone
            self.ended(-signal.SIGKILL)

    async def wait(self) -> int:
        """Until it has exited; its status (the one task that waits on its pidfd)."""
        if self.returncode is None and self._pidfd is not None:
            await self.until_exited()  # it has exited (a zombie until the fork server reaps it)
            if not self._orphaned:
                with trio.move_on_after(REPORT_WAIT):
                    await self.exited.wait()
            if self.returncode is None and self._orphaned:
                self.ended(-signal.SIGKILL)
            elif self.returncode is None:  # the fork server does not say how it ended (stopped, stuck)
                log.warning("worker pid %d exited and the fork server did not say how", self.pid)
                self.ended(UNKNOWN_STATUS)
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode


class ForkServer:
    """The master's end: ``spawn`` a worker, ``run`` (a task) reads the answers."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.alive = True
        self._stdlib_socket = sock
        self._socket = trio.socket.from_stdlib_socket(sock)
        self._asking = trio.Lock()
        self._requests = 0
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
                code = _serve(theirs, master)
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
            log.warning("fork server pid %d did not exit: killed", self.pid)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
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


async def until_exited(pid: int) -> None:
    """Until process *pid* has exited (a pidfd, as trio itself waits; it need not be
    our child)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone (and reaped) already
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


# -- the fork server process ---------------------------------------------------------


def _serve(sock: socket.socket, master: int) -> int:
    from trimail.processes.worker import die_with_master

    die_with_master(master)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    os.set_blocking(wake_read, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    children: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    accepting = True
    while accepting or children:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, MESSAGE_LIMIT, DESCRIPTOR_LIMIT)
                except OSError:
                    data, fds = b"", []
                if not data:
                    accepting = False
                    selector.unregister(sock)
                    continue
                _fork_one(sock, data, fds, children, [wake_read, wake_write, selector.fileno()])
            else:
                try:
                    os.read(wake_read, 512)
                except BlockingIOError:
                    pass
        _reap(sock, children)
    return 0


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _say(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _say(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:  # the master is gone or closed its end: nothing to tell
        pass


def _fork_one(sock: socket.socket, data: bytes, fds: list[int], children: set[int], own: list[int]) -> None:
    request: Any = None
    try:
        request = json.loads(data)
        spec, sent = request["spec"], request["fds"]
        if len(sent) != len(fds):
            raise ValueError(f"{len(fds)} descriptors received, {len(sent)} named")
        if time.monotonic() > float(request.get("deadline", "inf")):  # the master has given up on it
            raise ValueError("the request came after its deadline")
        mapping = dict(zip(sent, fds, strict=True))
        parent = os.getpid()
        pid = os.fork()
    except (ValueError, KeyError, TypeError, OSError) as exc:
        for fd in fds:
            os.close(fd)
        _say(sock, {"id": request.get("id") if isinstance(request, dict) else None, "error": str(exc)})
        return
    if pid == 0:
        _run_worker(sock, spec, mapping, parent, own)
    for fd in fds:
        os.close(fd)
    children.add(pid)
    _say(sock, {"id": request["id"], "pid": pid})


def _run_worker(sock: socket.socket, spec: dict[str, Any], mapping: dict[int, int], parent: int,
                own: list[int]) -> None:
    """In the forked child: the worker, then exit (never back into the loop)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        sock.close()
        for fd in own:
            os.close(fd)
        gc.unfreeze()
        from trimail.processes.worker import renumbered, run

        run(renumbered(spec, mapping, parent))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the process's last boundary
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
