"""queue.batch.FailureLog: a queue whose every commit fails says so once a second,
with the count of the failures in between, instead of a line per commit."""

from __future__ import annotations

import logging

import pytest

from trimail.queue import batch


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_failures_within_a_second_are_counted_in_the_next_line(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(batch.time, "monotonic", lambda: clock[0])
    handler = _Lines()
    logger = logging.getLogger("trimail.queue")
    logger.addHandler(handler)
    try:
        failures = batch.FailureLog()
        for _ in range(400):
            failures.report(OSError("disk I/O error"))
            clock[0] += 0.002  # 400 a second
        clock[0] = 101.5
        failures.report(OSError("disk I/O error"))
        failures.report(OSError("disk I/O error"))
    finally:
        logger.removeHandler(handler)
    assert handler.lines == ["queue commit failed: disk I/O error",
                             "queue commit failed: disk I/O error (399 more failed since the last report)"]
