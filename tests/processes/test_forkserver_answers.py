"""The master's end of the fork server (trimail.processes.forkserver.ForkServer)
against a fork server played by the test over a real ``SOCK_SEQPACKET`` pair, with
real processes standing in for the fork server and the worker it forks."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import trio
import trio.testing

from trimail.processes.forkloop import MESSAGE_LIMIT
from trimail.processes.forkserver import ForkServer, children_of

ROUNDS = 20  # the two orders of one pass of trio's loop come at random, half and half


async def test_a_fork_answered_as_its_spawn_is_cancelled_is_killed() -> None:
    """CI of 44816de: a stop cancelled a reload's ``spawn`` in the same pass of trio's
    loop in which ``run`` took the fork server's answer.  When ``run`` went first, the
    answer was for a request still waited on, so nobody killed the worker; when the
    spawn's cancellation went first, ``run`` killed it as forked too late.  A worker
    frozen before it closed its copy of the fork server's socket then kept serve from
    ending (the fork server's end never closed).  Either order must kill it."""
    for _ in range(ROUNDS):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stand_in = subprocess.Popen(["sleep", "60"])  # the fork server's pid, reaped as run() ends
        worker = subprocess.Popen(["sleep", "60"])
        server = ForkServer(stand_in.pid, ours)
        peer = trio.socket.from_stdlib_socket(theirs)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.run)
                spawning = trio.CancelScope()

                async def spawn() -> None:
                    with spawning:
                        await server.spawn({"role": "smtpd"}, [])

                nursery.start_soon(spawn)
                request = json.loads(await peer.recv(MESSAGE_LIMIT))
                await trio.testing.wait_all_tasks_blocked()  # spawn() waits for the answer
                theirs.send(json.dumps({"id": request["id"], "pid": worker.pid}).encode())
                spawning.cancel()  # run() wakes for the answer in the same pass
                deadline = time.monotonic() + 5
                while worker.poll() is None and time.monotonic() < deadline:
                    await trio.sleep(0.01)
                assert worker.returncode == -signal.SIGKILL, "the worker nobody waits for is still running"
                server.close()
                stand_in.kill()
                theirs.close()
        finally:
            for process in (stand_in, worker):
                if process.poll() is None:
                    process.kill()


def _gone(pid: int) -> bool:
    """*pid* has exited (a zombie that nobody reaped counts: a killed orphan's parent
    here may be a PID 1 that reaps nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def test_a_fork_server_that_does_not_exit_is_killed_with_the_processes_it_forked(monkeypatch, caplog) -> None:
    """``shut``: a fork server that has not exited within ``REPLY_TIMEOUT`` is killed, and
    so are the processes it forked that are still there: one forked a moment ago has no
    ``PR_SET_PDEATHSIG`` yet and still holds the fork server's socket, so ``run`` never
    saw its end and a stop waited for ever.  Here the socket's other end is held open
    (by the test), as such a process holds it; ``shut`` must still return."""
    monkeypatch.setattr("trimail.processes.forkserver.REPLY_TIMEOUT", 0.3)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stand_in = subprocess.Popen([sys.executable, "-c", "import subprocess, time; "
                                 "subprocess.Popen(['sleep', '60']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10
        while not children_of(stand_in.pid) and time.monotonic() < deadline:
            await trio.sleep(0.01)
        [forked] = children_of(stand_in.pid)
        server = ForkServer(stand_in.pid, ours)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run)
            with trio.fail_after(10):
                await server.shut()
        assert stand_in.poll() is not None
        deadline = time.monotonic() + 5
        while not _gone(forked) and time.monotonic() < deadline:
            await trio.sleep(0.01)
        assert _gone(forked), f"pid {forked}, forked by the fork server, is still running"
        assert f"did not exit: killed, and the processes it forked still running: pid {forked}" in caplog.text
    finally:
        theirs.close()
        if stand_in.poll() is None:
            stand_in.kill()
