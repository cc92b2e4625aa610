"""A destination's waiting jobs: new mail and retries taken in turn.

Postfix's qmgr alternates between its incoming and deferred queues so that neither
starves the other; trimail does the same twice, when a round claims messages
(``queue/transitions.claim``) and here, when a destination's workers take jobs: a
retry storm that queues thousands of jobs on one destination never keeps its new
mail waiting behind them, nor new mail the retries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trimail.scheduler.destination import Job


class JobQueue:
    """A destination's waiting jobs, deque-like (``append``, ``extend``,
    ``appendleft``, ``popleft``, ``clear``, ``len``, iteration in the order they
    will be taken).

    New mail and retries wait in two FIFO queues taken in turn (Postfix's qmgr
    alternates its incoming and deferred queues): the thousands of retry jobs a
    storm queues on a destination never keep its new mail waiting behind them,
    nor new mail the retries."""

    __slots__ = ("_new", "_retry", "_retry_turn")

    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self._new: deque[Job] = deque()
        self._retry: deque[Job] = deque()
        self._retry_turn = False
        self.extend(jobs)

    def _side(self, job: Job) -> deque[Job]:
        return self._retry if job.message.retry else self._new

    def append(self, job: Job) -> None:
        self._side(job).append(job)

    def extend(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.append(job)

    def appendleft(self, job: Job) -> None:
        self._side(job).appendleft(job)

    def popleft(self) -> Job:
        """The next job, new mail and retries in turn; IndexError when empty."""
        if self._new and (self._retry_turn is False or not self._retry):
            self._retry_turn = True
            return self._new.popleft()
        self._retry_turn = False
        return self._retry.popleft()

    def count(self, retry: bool) -> int:
        """How many retries (new mail, when *retry* is false) wait."""
        return len(self._retry if retry else self._new)

    def clear(self) -> None:
        self._new.clear()
        self._retry.clear()

    def __len__(self) -> int:
        return len(self._new) + len(self._retry)

    def __bool__(self) -> bool:
        return bool(self._new or self._retry)

    def __iter__(self) -> Iterator[Job]:
        new, retry, retry_turn = iter(self._new), iter(self._retry), self._retry_turn
        pending_new, pending_retry = next(new, None), next(retry, None)
        while pending_new is not None or pending_retry is not None:
            if pending_new is not None and (not retry_turn or pending_retry is None):
                yield pending_new
                pending_new, retry_turn = next(new, None), True
            else:
                assert pending_retry is not None
                yield pending_retry
                pending_retry, retry_turn = next(retry, None), False
