"""trimail.processes.starter: workers started with a new interpreter on a thread of
their own, so that a start that does not return (its child frozen before exec)
holds that thread and not the master's event loop (red team 32)."""

from __future__ import annotations

import errno
import subprocess
import threading
import time

import pytest
import trio

from trimail.processes.starter import StartAbandoned, Starter

SLEEPER = ["sleep", "60"]


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await trio.sleep(0.01)


async def test_a_start_returns_the_process():
    process = await Starter().start(SLEEPER, [])
    try:
        assert process.poll() is None
    finally:
        process.kill()
        process.wait()


async def test_a_start_that_does_not_return_is_abandoned_and_its_process_killed(monkeypatch):
    """A Popen that does not return (here: it waits for the test, as one whose child
    is frozen before exec waits in vfork) costs the caller START_WAIT, not the event
    loop; the next start is refused until it returns; the process it then starts is
    killed, and starts work again."""
    monkeypatch.setattr("trimail.processes.starter.START_WAIT", 0.3)
    gate = threading.Event()
    started: list[subprocess.Popen[bytes]] = []

    def popen(args, **kwargs):
        assert threading.current_thread() is not threading.main_thread(), "Popen on the event loop's thread"
        gate.wait(timeout=10)
        started.append(subprocess.Popen(args, **kwargs))
        return started[-1]

    starter = Starter(popen)
    with pytest.raises(StartAbandoned) as abandoned:
        await starter.start(SLEEPER, [])
    assert abandoned.value.errno == errno.ETIMEDOUT and starter.stuck
    with pytest.raises(OSError) as refused:  # not StartAbandoned: its descriptors were never given
        await starter.start(SLEEPER, [])
    assert refused.value.errno == errno.EAGAIN and not isinstance(refused.value, StartAbandoned)
    gate.set()  # the frozen child is let go: its start returns, nobody wants it
    await _until(lambda: started and started[0].returncode is not None and not starter.stuck)
    assert started[0].returncode == -9
    process = await starter.start(SLEEPER, [])
    try:
        assert process.poll() is None and len(started) == 2
    finally:
        process.kill()
        process.wait()


async def test_a_start_that_fails_raises_its_error():
    with pytest.raises(FileNotFoundError):
        await Starter().start(["/nonexistent/trimail-worker"], [])
