"""The client's side of the control socket (``trimail.net.control``): one command
line sent, one line of answer read, with blocking sockets and no trio, so that
``trimail sendmail`` (which wakes serve after each message) and the CLI start
without importing trio (80 ms of sendmail's start).

Parameters: none (the socket is ``$queue_directory/control``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

CONTROL_NAME = "control"
MAX_ANSWER = 1 << 20  # what the CLI reads of serve's answer (a status is a few KiB; dead lists are bounded)
SUN_PATH_MAX = 107  # bytes of a UNIX socket address's path on Linux, without its NUL


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """The address to bind or connect for the socket *path*.  A path longer than a
    UNIX socket address allows (a queue under a deep $TMPDIR, as pytest's tmp_path
    gives) is reached through its directory's descriptor: ``/proc/self/fd/N/name``."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def send_command(queue_directory: Path, command: str, timeout: float = 5.0) -> str | None:
    """Blocking client for the CLI; None when no serve listens, ``error: ...`` when
    it took the command and did not answer within *timeout* (a reload waiting for
    its workers: it goes on, and its outcome is logged)."""
    path = queue_directory / CONTROL_NAME
    connected = False
    try:
        # the socket lives in mail_owner's directory: a symlink planted there is
        # not followed by a root CLI, and the answer is bounded (a process posing as
        # serve cannot grow the CLI without end); the caller prints it printable
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            with socket_address(path) as address:
                sock.connect(address)
            connected = True
            sock.sendall(command.encode() + b"\n")
            data = b""
            while b"\n" not in data and len(data) < MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data[:MAX_ANSWER].decode("ascii", "replace").strip()
    except TimeoutError:
        if not connected:
            return None
        return (f"error: serve took {command!r} and did not answer within {timeout:.0f} s; "
                "it may still complete: see serve's log")
    except OSError:
        return None
