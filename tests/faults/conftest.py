"""Fault injection against a real ``trimail serve`` child process.

Every test here does something the Internet, a broken disk or an operator can do,
then asserts the three things that matter: serve still answers ``220``, nothing
acknowledged with ``250`` is lost (counted at the downstream), and the queue
database passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import os
import queue
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio

from tests.conftest import ServeProcess, write_main_cf
from trimail.processes.forkserver import children_of


class Daemon:
    """A running serve with its configuration, queue directory and SMTP port."""

    def __init__(self, proc: ServeProcess, config_path: Path, queue_directory: Path) -> None:
        self.proc = proc
        self.config_path = config_path
        self.queue_directory = queue_directory
        self.port = proc.port

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None


@pytest.fixture
def daemon(tmp_path: Path, serve_process) -> Iterator:
    """``daemon(**main_cf)`` starts serve (queue manager on unless the test says
    otherwise) with the standard test settings plus *main_cf*."""

    def start(directory: Path | None = None, **params: object) -> Daemon:
        where = directory or tmp_path
        params.setdefault("master_service_disable", "")
        config_path = write_main_cf(where, **params)
        queue_directory = Path(str(params.get("queue_directory", where / "queue")))
        return Daemon(serve_process(config_path), config_path, queue_directory)

    yield start


def process_tree(pid: int) -> list[int]:
    """*pid* and all its descendants (serve's master, its workers, their helpers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children_of(current)
    return found


def serve_status(queue_directory: Path) -> dict:
    """serve's own facts through its control socket: what ``trimail status --json``
    prints besides the queue counts, without an interpreter for the CLI each time
    (for tests that poll it; the CLI's own output is tested where it is the point)."""
    import json

    from trimail.net.control import send_command

    answer = send_command(Path(queue_directory), "status", timeout=30)
    assert answer is not None, f"no serve answers on {queue_directory}"
    return json.loads(answer)


def smtpd_pids(daemon: Daemon) -> list[int]:
    """The processes that accept SMTP connections: the smtpd workers (from serve's
    status), or serve itself when it runs as one process."""
    workers = serve_status(daemon.queue_directory).get("workers")
    if workers is None:
        return [daemon.proc.proc.pid]
    return [worker["pid"] for worker in workers if worker["role"] == "smtpd" and worker.get("state") == "running"]


def connectable(port: int) -> bool:
    """Does something accept TCP connections on 127.0.0.1:*port*?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def banner(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> str:
    """The greeting of a fresh connection (serve is up and answering)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.decode("ascii", "replace")


def smtp_command(conn: socket.socket, line: bytes) -> bytes:
    """Send one command line on a raw connection; the last line of its reply."""
    conn.sendall(line + b"\r\n")
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = conn.recv(4096)
        assert chunk, data
        data += chunk
    return data.split(b"\r\n")[-2]


def read_line(conn: socket.socket) -> bytes:
    """What a raw connection receives up to the end of a line (less at its close)."""
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def assert_serving(daemon: Daemon) -> None:
    assert daemon.alive, "serve exited:\n" + "\n".join(daemon.proc.log[-30:])
    greeting = banner(daemon.port)
    assert greeting.startswith("220 "), greeting


def send(port: int, recipients: list[str], body: bytes = b"Subject: fault\r\n\r\nbody\r\n",
         sender: str = "alice@client.example", host: str = "127.0.0.1") -> str:
    """One message over smtplib to *host*:*port*; returns the queue ID from the ``250``
    reply (raises smtplib's errors when any reply is not a success)."""
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.ehlo("client.example")
        code, reply = client.mail(sender)
        assert code == 250, reply
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            assert code == 250, reply
        code, reply = client.data(body)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def integrity_ok(queue_directory: Path) -> str:
    """``PRAGMA integrity_check`` through a read-only connection: 'ok' when sound."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def queued(queue_directory: Path, state: str | None = None) -> int:
    """Messages in the queue (in *state*, else every state), through a read-only connection."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        if state is None:
            return int(db.execute("SELECT count(*) FROM message").fetchone()[0])
        return int(db.execute("SELECT count(*) FROM message WHERE state = ?", (state,)).fetchone()[0])
    finally:
        db.close()


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll *predicate* with a deadline (for tests that are not inside trio)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def trimail_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run([sys.executable, "-m", "trimail", *args], capture_output=True, text=True,
                          timeout=timeout)


# the tests that mount one (``tmpfs``, ``queue_16m``)
NEEDS_TMPFS = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounts a tmpfs: needs root")


@contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """*directory*, made a tmpfs of *size* (mount's notation: "4m"), unmounted afterwards."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def small_queue(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to serve as the queue directory, unmounted afterwards."""
    with tmpfs(tmp_path / "queue", "4m") as queue:
        yield queue


@pytest.fixture
def queue_16m(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs to serve as the queue directory (a 512 KiB reserve), unmounted afterwards."""
    with tmpfs(tmp_path / "queue", "16m") as queue:
        yield queue


def free_space(path: Path) -> int:
    """Bytes free for unprivileged writers in the file system of *path*."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(queue: Path, leave: int, name: str = "filler") -> Path:
    """A filler file that leaves about *leave* bytes free in the file system."""
    filler = queue / name
    stat = os.statvfs(queue)
    size = max(0, stat.f_bavail * stat.f_frsize - leave)
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * (1 << 16)
        while size > 0:
            try:
                size -= out.write(block[:min(size, len(block))]) or 0
            except OSError:  # the tmpfs is full: good enough
                break
    return filler


@contextmanager
def trio_thread(*starts: Any) -> Iterator[list[Any]]:
    """Run trio services (``nursery.start`` arguments) in a thread of their own while
    the test drives a serve child process; yields what each one's start returned."""
    started: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            try:
                values = [await nursery.start(*args) for args in starts]
            except BaseException as exc:
                started.put(exc)
                raise
            started.put(values)
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    values = started.get(timeout=10)
    if isinstance(values, BaseException):
        raise values
    try:
        yield values
    finally:
        stop.set()
        thread.join(10)
