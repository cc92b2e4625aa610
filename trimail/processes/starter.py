"""Workers started with a new interpreter, from a thread of their own.

When there is no fork server (it died, or could not be started) the master starts
each worker with ``python -m trimail.processes.worker``.  ``subprocess.Popen``
returns only once the child has called exec (CPython starts it with vfork, and a
fork would have it wait on the exec's error pipe instead): a child frozen before
its exec (SIGSTOP, red team 32) held the master's only event-loop thread in the
kernel, deaf to every signal and to ``trimail stop``, until the child was let go.

So ``Starter.start`` runs ``Popen`` on one thread that lives as long as the
process: a worker's ``PR_SET_PDEATHSIG`` fires when the thread that started it
exits, which rules out trio's thread cache.  The event loop waits ``START_WAIT``
seconds for it; a start that takes longer is abandoned (``OSError``: the slot
tries again after its back-off), and no other start is tried until that one has
returned: the process it started then is killed.  A start whose caller was
cancelled (a stop) is killed the same way.  The descriptors an abandoned start was
given stay open (the caller sees ``StartAbandoned``): ``Popen`` may still be reading
them.  A start refused meanwhile is a plain ``OSError``; its descriptors are closed.

Parameters: none.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import queue
import subprocess
import threading
from collections.abc import Callable

import trio

log = logging.getLogger("trimail.master")

START_WAIT = 10.0  # seconds for Popen to return (it takes milliseconds)


class StartAbandoned(OSError):
    """The start did not return in time: its descriptors must stay open."""


@dataclasses.dataclass(slots=True)
class _Start:
    args: list[str]
    fds: list[int]
    wake: Callable[[], None]
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    done: bool = False
    process: subprocess.Popen[bytes] | None = None
    error: BaseException | None = None
    abandoned: bool = False


class Starter:
    """``start(args, fds)``: ``Popen(args, pass_fds=fds)`` on the starter's thread."""

    def __init__(self, popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> None:
        self._popen = popen  # (tests give one that takes its time)
        self._starts: queue.SimpleQueue[_Start] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.stuck = False  # an abandoned start has not returned yet

    async def start(self, args: list[str], fds: list[int]) -> subprocess.Popen[bytes]:
        if self.stuck:  # (nothing was given to Popen: the caller closes the descriptors as usual)
            raise OSError(errno.EAGAIN, "an earlier start of a worker with a new interpreter "
                                        "has not returned (its process frozen before exec?)")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trimail-worker-starter", daemon=True)
            self._thread.start()
        token, done = trio.lowlevel.current_trio_token(), trio.Event()
        job = _Start(args, fds, lambda: token.run_sync_soon(done.set))
        self._starts.put(job)
        cancelled = True
        try:
            with trio.move_on_after(START_WAIT):
                await done.wait()
            cancelled = False
        finally:
            with job.lock:
                job.abandoned = not job.done
                if job.abandoned:
                    self.stuck = True  # (under the lock: the thread clears it once the start returns)
            if job.done and cancelled and job.process is not None:
                job.process.kill()  # started for a caller that is gone (a stop); reaped by subprocess
        if not job.done:
            log.warning("a worker's start with a new interpreter did not return within %gs: abandoned "
                        "(its process is killed if it ever returns)", START_WAIT)
            raise StartAbandoned(errno.ETIMEDOUT, f"the new interpreter did not start within {START_WAIT:g}s")
        if job.error is not None:
            raise job.error
        assert job.process is not None
        return job.process

    def _run(self) -> None:
        while True:
            job = self._starts.get()
            with job.lock:
                skip = job.abandoned  # its caller gave up before its turn came: never started
            if skip:
                self.stuck = False  # (this thread is free: nothing is in Popen now)
                continue
            process, error = None, None
            try:
                process = self._popen(job.args, pass_fds=job.fds, stdin=subprocess.DEVNULL)
            except Exception as exc:  # noqa: BLE001 - handed to the caller (OSError, ValueError)
                error = exc
            with job.lock:
                job.done, job.process, job.error = True, process, error
                abandoned = job.abandoned
            if abandoned:
                _end(process)
                self.stuck = False
                continue
            try:
                job.wake()
            except trio.RunFinishedError:  # serve has ended meanwhile
                _end(process)


def _end(process: subprocess.Popen[bytes] | None) -> None:
    """A process nobody waits for: killed and reaped (on the starter's thread)."""
    if process is not None:
        process.kill()
        process.wait()
