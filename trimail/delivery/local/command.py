"""A ``|command`` target of local delivery (Postfix's local(8) pipe_command).

``run()`` starts the command as the delivery's identity (uid, primary gid and no
other group: Postfix's set_ugid, decided in ``identity``), feeds it the message
with LF line ends and reads its output until it exits.  Exit status 0 is
delivered; 75 (EX_TEMPFAIL) defers 4.3.0 with the end of the output; any other
status, an empty command or one that cannot be started bounces 5.3.0; a command
still running after ``command_time_limit`` is killed and deferred 4.3.0.

Security notes: no shell (argv is split with ``shlex``), a minimal environment
(PATH, SENDER, RECIPIENT, LOCAL, DOMAIN, SHELL, USER, LOGNAME, HOME), working
directory ``/``; of the command's output only the last ``OUTPUT_KEPT`` bytes are
kept (a command that writes without end costs no memory), and of those 200
characters go into the bounce text.  The time limit is the agent's
``command_time_limit``, passed in.
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import subprocess
import threading
import time

from trimail.delivery.local.identity import Identity

OUTPUT_KEPT = 4096  # the end of a command's output kept for the bounce text (of which 200 characters are used)


def run(command: str, sender: str, recipient: str, domain: str, copy: bytes, who: Identity,
        time_limit: float) -> None:
    """Run *command* as *who*: uid, primary gid and no other group (Postfix's
    set_ugid), no shell, a minimal environment, *time_limit* (``command_time_limit``).

    Returns when the command exited 0; ``CommandFailed`` says why not, and
    ``IdentityError`` that serve cannot become *who*."""
    argv = shlex.split(command)
    if not argv:
        raise CommandFailed(False, "5.3.0", "empty command")
    env = {"PATH": "/usr/bin:/bin", "SENDER": sender, "RECIPIENT": recipient,
           "LOCAL": recipient.rpartition("@")[0], "DOMAIN": domain, "SHELL": "/bin/sh",
           "USER": who.user, "LOGNAME": who.user, "HOME": who.home}
    spawn = who.spawn()  # IdentityError when serve cannot become *who*
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, cwd="/", **spawn)  # type: ignore[call-overload]
    except OSError as exc:
        raise CommandFailed(False, "5.3.0", f"cannot run {command}: {exc.strerror}") from None
    try:
        returncode, output = _communicate(proc, copy.replace(b"\r\n", b"\n"), time_limit)
    except subprocess.TimeoutExpired:
        raise CommandFailed(True, "4.3.0", f"command time limit exceeded: {command}") from None
    if returncode == os.EX_TEMPFAIL:
        raise CommandFailed(True, "4.3.0", f"temporary failure. Command output: {_tail(output)}")
    if returncode != 0:
        raise CommandFailed(False, "5.3.0", f"Command died with status {returncode}: {command}. {_tail(output)}")


def _communicate(proc: subprocess.Popen[bytes], data: bytes, time_limit: float) -> tuple[int, bytes]:
    """Feed *data* to the command and read its output (standard output and error)
    until it exits, keeping only the last OUTPUT_KEPT bytes: a command that
    writes without end costs no memory.  TimeoutExpired (the command killed)
    past *time_limit*."""
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def feed() -> None:
        with contextlib.suppress(OSError, ValueError):  # a command that does not read its input
            stdin.write(data)
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    writer = threading.Thread(target=feed, name="command input", daemon=True)
    writer.start()
    deadline = time.monotonic() + time_limit
    kept = b""
    try:
        fd = stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(proc.args, time_limit)
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            kept = (kept + chunk)[-OUTPUT_KEPT:]
        returncode = proc.wait(max(0.0, deadline - time.monotonic()))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        writer.join(5)
        stdout.close()
    return returncode, kept


class CommandFailed(Exception):
    """A command target failed: deferred when *temporary*, else bounced, with *dsn* and *text*."""

    def __init__(self, temporary: bool, dsn: str, text: str) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.dsn = dsn
        self.text = text


def _tail(output: bytes) -> str:
    text = output.decode("utf-8", "replace").strip()
    return " ".join(text.split())[-200:]
