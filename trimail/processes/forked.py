"""The master's handle on a worker that the fork server forked, and waiting for
any process's exit by pidfd.

A forked worker is not the master's child, so ``subprocess.Popen`` cannot stand for
it: ``ForkedProcess`` is what the master uses of Popen (``pid``, ``poll``, ``wait``,
``terminate``, ``kill``).  Its exit status comes from the fork server, its parent
(trimail.processes.forkserver reports it with ``ended``); that it exited, also from a
pidfd taken when its pid was reported, so a fork server that stopped answering
(SIGSTOP, a frozen cgroup) cannot hide a worker's death: it is then reported with
``UNKNOWN_STATUS`` after ``REPORT_WAIT``.  ``until_exited`` waits for any process
(a worker started with a new interpreter, the fork server itself) as trio waits.

Parameters: none.
"""

from __future__ import annotations

import logging
import os
import signal

import trio

log = logging.getLogger("trimail.master")

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

