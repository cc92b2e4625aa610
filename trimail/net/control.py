"""The control socket: ``$queue_directory/control``, a UNIX stream socket (0600).

One line per connection, one line back.  Commands: ``flush`` (wake the scheduler:
the database already says what is due) and ``ping``.  The operator's tools use it
to make serve act now; the database stays the source of truth, so a tool works
the same when serve is not running.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from trimail.net.reading import receive_until

CONTROL_NAME = "control"
MAX_LINE = 256


async def open_control_listener(queue_directory: Path) -> trio.SocketListener:
    path = queue_directory / CONTROL_NAME
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return trio.SocketListener(sock)


async def serve_control(listener: trio.SocketListener,
                        commands: dict[str, Callable[[], str | Awaitable[str]]]) -> None:
    async with listener:
        while True:
            stream = await listener.accept()
            async with stream:
                with trio.move_on_after(5):
                    line = await receive_until(stream, b"\n", MAX_LINE)
                    command = line.split(b"\n")[0].decode("ascii", "replace").strip()
                    handler = commands.get(command)
                    answer = handler() if handler else f"error: unknown command {command!r}"
                    if inspect.isawaitable(answer):
                        answer = await answer
                    try:
                        await stream.send_all(answer.encode() + b"\n")
                    except trio.BrokenResourceError:
                        pass


def send_command(queue_directory: Path, command: str, timeout: float = 5.0) -> str | None:
    """Blocking client for the CLI; None when no serve listens."""
    path = queue_directory / CONTROL_NAME
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(command.encode() + b"\n")
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(MAX_LINE)
                if not chunk:
                    break
                data += chunk
            return data.decode("ascii", "replace").strip()
    except OSError:
        return None
