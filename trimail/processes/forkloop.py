"""The fork server's own process: a loop that forks a worker for each request and
reports each worker's exit.

Forked by trimail.processes.forkserver (``ForkServer.start``) before serve runs
anything else: one thread, no event loop, no queue, no listener; only stdio open.
``run`` waits with a selector on the master's ``SOCK_SEQPACKET`` socket and a
SIGCHLD wake-up pipe.  A request is one message, at most ``MESSAGE_LIMIT`` bytes
of JSON (``{"id", "spec", "fds", "deadline"}``) with at most ``DESCRIPTOR_LIMIT``
descriptors as ``SCM_RIGHTS``; it answers ``{"id", "pid"}`` or ``{"id", "error"}``
and, when a worker exits, ``{"exited", "code"}`` (it is their parent and reaps
them).  The forked child renumbers the spec to the descriptors it received and
runs the worker (trimail.processes.worker), never returning into the loop.

Security: it stays root on a gateway (it must start workers that enter the jail
before they drop privileges) and reads nothing but the master's socket.  A
request that names other descriptors than it carries, or comes after its
deadline (the master gave up on it), forks nothing and its descriptors are
closed.  It dies with the master and ignores SIGINT, SIGHUP and SIGTERM, so the
workers drain before their parent goes; when the master closes the socket it
waits for its workers and exits.

Its ``PR_SET_PDEATHSIG`` is ``MASTER_GONE``, not SIGKILL: when the master dies it
first kills every process it forked (``_master_gone``), then exits.  A worker sets
its own ``PR_SET_PDEATHSIG`` in its first milliseconds and, if its parent went
before that, sees it (getppid) and exits; but one stopped in those milliseconds
(SIGSTOP, a debugger) when the master was killed (kill -9 during a reload, which
forks a new generation) outlived it for good, stopped, holding the queue lock and
the listening sockets it was given: the next serve was refused ("another trimail
serve uses this queue_directory").  SIGKILL ends a stopped process too.  (A fork
server itself stopped when the master dies acts once it runs again; meanwhile its
workers find their channels closed and stop as at a stop.)

Parameters: none.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from trimail.supervise import STRAY_SIGNALS

MESSAGE_LIMIT = 1 << 20  # bytes of one request: a spec names its listeners, at most a few hundred
DESCRIPTOR_LIMIT = 253  # SCM_RIGHTS' own limit per message (SCM_MAX_FD)
MASTER_GONE = signal.SIGRTMIN  # the fork server's PR_SET_PDEATHSIG (a signal nobody sends it by mistake)


def run(sock: socket.socket, master: int) -> int:
    """The fork server's life, until the master has closed the socket and every worker
    it forked has exited; its exit code."""
    from trimail.processes.worker import die_with_master

    signal.signal(MASTER_GONE, lambda *_: _master_gone(master))
    die_with_master(master, MASTER_GONE)
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, *STRAY_SIGNALS):
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


def _master_gone(master: int) -> None:
    """``MASTER_GONE`` came: if the master has died, SIGKILL to every process this one
    forked (the kernel's list: also one forked a moment ago), then exit."""
    if os.getppid() == master:  # not its death: a stray signal
        return
    for pid in children_of(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(1)


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
        for signum in (signal.SIGCHLD, signal.SIGTERM, MASTER_GONE):
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


def children_of(pid: int) -> list[int]:
    """The pids of the children of every thread of *pid* (Linux's /proc; none where it
    cannot be read).  (A master's worker started with a new interpreter is the child of
    its starter thread: trimail.processes.starter.)"""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found
