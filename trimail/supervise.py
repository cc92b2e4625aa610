"""Error boundaries: one task's failure is contained, logged and counted there.

Structured concurrency makes an unhandled exception end the whole nursery, which
for a daemon means one bad packet ends ``serve``.  Every long-lived task therefore
runs its units of work (one connection, one delivery job, one scheduler round, one
HTTP or control request) inside a boundary:

    with contained("smtpd session", metrics):
        ...

An ``Exception`` escaping the block is logged on one line (``warning: <what>
failed: <error>``, with the traceback at debug level), counted in
``trimail_task_failures_total{task=...}`` (under *label* when the task's name
names a message or a destination: a label per message would grow the metric
without bound) and swallowed; cancellation and
``KeyboardInterrupt``/``SystemExit`` pass through untouched, and so does an
``ExceptionGroup`` holding only cancellations.  ``retry_with_backoff`` runs a
unit again after a failure, waiting longer each time (bounded), so a failing
dependency (a full disk, a locked queue) is polled gently instead of in a tight
loop or not at all.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import trio

log = logging.getLogger("trimail.master")

# Signals an operator may send out of habit (``kill -USR1`` to reopen logs) or by
# mistake (``pkill -USR2 trimail``), whose default action ends a process: the
# master logs and ignores them (its end would be every worker's and every
# session's), the fork server and the workers ignore them.
STRAY_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)

T = TypeVar("T")


class FailureCounter(Protocol):
    def task_failed(self, task: str) -> None: ...


def describe(exc: BaseException) -> str:
    """One line for the log: the class and message, without the traceback."""
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def contained(task: str, metrics: FailureCounter | None = None, *,
              logger: logging.Logger | None = None, label: str | None = None) -> Iterator[None]:
    """Contain an ``Exception`` raised by the block (see the module docstring)."""
    try:
        yield
    except Exception as exc:  # the boundary: anything a unit of work did not expect
        report(task, exc, metrics, logger=logger, label=label)


def report(task: str, exc: BaseException, metrics: FailureCounter | None = None, *,
           logger: logging.Logger | None = None, label: str | None = None) -> None:
    """Log one contained failure on one line (traceback at debug) and count it,
    under *label* when given (a task named after a message or a destination)."""
    (logger or log).warning("%s failed: %s", task, describe(exc))
    (logger or log).debug("%s failed", task, exc_info=exc)
    if metrics is not None:
        try:
            metrics.task_failed(label or task)
        except Exception:  # never let the bookkeeping of a failure fail the boundary
            pass


class Backoff:
    """Delays that double from *initial* up to *maximum*; ``reset()`` after success."""

    def __init__(self, initial: float = 1.0, maximum: float = 60.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial


async def retry_with_backoff(task: str, fn: Callable[..., Awaitable[T]], *args: Any,
                             metrics: FailureCounter | None = None, initial: float = 1.0,
                             maximum: float = 60.0, retry_on: tuple[type[BaseException], ...] = (Exception,),
                             logger: logging.Logger | None = None, label: str | None = None) -> T:
    """``await fn(*args)`` until it returns; each failure of a *retry_on* kind is
    reported and followed by a growing delay.  Cancellation ends the retries."""
    backoff = Backoff(initial, maximum)
    while True:
        try:
            return await fn(*args)
        except retry_on as exc:
            report(task, exc, metrics, logger=logger, label=label)
            import trio  # (not at the top: sendmail imports this module, and trio costs it 80 ms)

            await trio.sleep(backoff.next())


def thread_pool(name: str, threads: int) -> Callable[[], trio.CapacityLimiter]:
    """A pool of worker threads of one kind, one limiter per trio run: work of that
    kind (table lookups, AUTH's scrypt) waits for its own threads and never fills
    trio's shared pool ahead of everybody else's.  Returns the limiter's getter.
    trio is imported at the first call, not here (sendmail imports the pools'
    modules and never runs trio: 80 ms of its start)."""
    var: trio.lowlevel.RunVar[trio.CapacityLimiter] | None = None

    def limiter() -> trio.CapacityLimiter:
        nonlocal var
        import trio

        if var is None:
            var = trio.lowlevel.RunVar(name)
        try:
            return var.get()
        except LookupError:
            made = trio.CapacityLimiter(threads)
            var.set(made)
            return made

    return limiter
