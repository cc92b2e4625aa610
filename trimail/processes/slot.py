"""The master's handle on one worker process, and the slot it runs in.

A ``Worker`` is one running process and the master's end of its channel: one
request at a time, each with an id (an answer that comes after its request gave
up is skipped, never taken for the next one's), bounded in time.  A ``Slot`` is a
place for one worker of a role and generation: the supervisor
(trimail.processes.supervisor) replaces the process in it when it dies, until
the slot is retired.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import trio

from trimail.errors import TrimailError
from trimail.processes.channel import Channel, ChannelClosed
from trimail.processes.forked import UNKNOWN_STATUS, ForkedProcess, until_exited

REQUEST_TIMEOUT = 10.0  # seconds for a worker to answer the master


class WorkerStartError(TrimailError):
    """A worker exited, or stayed silent, before it reported ready."""


def exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by signal {-returncode}"
    if returncode == UNKNOWN_STATUS:
        return "exit status unknown"
    return f"exit status {returncode}"


class Worker:
    """One running worker process and the master's end of its channel."""

    def __init__(self, slot: Slot, process: subprocess.Popen[bytes] | ForkedProcess, channel: Channel) -> None:
        self.slot = slot
        self.process = process
        self.channel = channel
        self.pid = process.pid
        self.started = time.monotonic()
        self._asking = trio.Lock()
        self._requests = 0  # the id of the last request: an answer to an earlier one that timed out is skipped
        self.final: str | None = None  # its metrics exposition as it exited (trimail.processes.aggregate)

    async def last_metrics(self) -> str | None:
        """After it exited: the exposition it sent as it went, if any."""
        with trio.move_on_after(1):
            try:
                async with self._asking:
                    while self.final is None:
                        self.final = (await self.channel.receive()).get("final")
            except ChannelClosed:
                pass
        return self.final

    async def wait(self) -> int:
        """Until the process has exited (a pidfd, as trio itself waits; a forked
        one's exit comes from the fork server, its parent); its status."""
        if isinstance(self.process, ForkedProcess):
            return await self.process.wait()
        if self.process.returncode is None:
            await until_exited(self.pid)
        return self.process.wait()

    async def request(self, command: str, timeout: float = REQUEST_TIMEOUT, **arguments: Any) -> Any:
        """One request and its answer; ``WorkerStartError``-free: a worker that is
        gone or silent raises ``ChannelClosed`` or ``trio.TooSlowError``."""
        with trio.fail_after(timeout):
            async with self._asking:
                self._requests += 1
                await self.channel.send({"cmd": command, "id": self._requests, **arguments})
                answer = await self.channel.receive()
                while answer.get("id") != self._requests:  # late: its request gave up waiting
                    self.final = answer.get("final", self.final)
                    answer = await self.channel.receive()
        if "error" in answer:
            raise RuntimeError(f"{self.slot.role} worker pid {self.pid}: {answer['error']}")
        return answer.get("ok")


class Slot:
    """A place for one worker: the process in it is replaced when it dies, until
    the slot is retired (a stop, or an older generation after a reload)."""

    def __init__(self, role: str, generation: int, peers: int = 1) -> None:
        self.role = role
        self.generation = generation
        self.peers = peers  # how many workers of its role its generation has
        self.retired = False
        self.farewell = "stop"  # what a worker that becomes ready in a retired slot is told
        self.leaving = trio.Event()  # set with retired: ends a restart back-off at once
        self.worker: Worker | None = None
        self.restarts = 0
        self.waiting = False  # in the back-off before a restart (status: "waiting", else "starting")
        self.board_slot: int | None = None  # its place on the session board (smtpd)
        self.gone = trio.Event()
