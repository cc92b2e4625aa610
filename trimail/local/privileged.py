"""The root side of local delivery: ``/file`` and ``|command`` targets for a serve
that runs as ``mail_owner`` (the part of Postfix's local(8) that needs root).

serve started as root cannot become ``default_privs`` or an include file's
owner once it is ``mail_owner``, and must never run those targets as itself.
So, just before the privilege drop, ``start()`` launches this module as a small
root child (``python -m trimail.local.privileged``) that lives as long as serve:
it gets serve's configuration once through a pipe that is closed before the
drop, then answers one request at a time on its standard input and output.

Security notes: the requests come from a ``mail_owner`` process, which an
attacker may control, so the helper trusts nothing in them but the recipient,
the envelope and the message: it expands the recipient's aliases itself, with
its own tables and include files (the same rules: trimail.local.aliases), and
runs a target only when that expansion yields the same kind and value; the
identity (trimail.local.identity: never root, never mail_owner, the user's
primary group only) and ``allow_mail_to_files`` are decided here too.  So a
compromised ``mail_owner`` can make it do what mail to that recipient would
do anyway, nothing else (the same bound as Postfix's local(8), which trusts
only the alias configuration).  Requests are bounded (header line, message
size), a malformed one ends the helper (serve defers what it then cannot
deliver: 4.3.0), and every answer is one JSON line.  The helper uses the
configuration serve started with: a reload changes the tables it reads (they
are re-read when their files change), not its parameters.

Parameters: the local delivery parameters (trimail.delivery.local), read at start.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from trimail.config import Config

MAX_HEADER = 64 * 1024
MAX_MESSAGE = 1 << 31


class HelperGone(Exception):
    """The helper is not running or broke the protocol: the delivery is deferred."""


class Helper:
    """serve's handle on the root child: ``run(request, content)`` -> answer."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._lock = threading.Lock()  # one request at a time; deliveries run on several threads

    def run(self, request: dict[str, Any], content: bytes) -> dict[str, Any]:
        header = json.dumps({**request, "size": len(content)}).encode() + b"\n"
        with self._lock:
            stdin, stdout = self.proc.stdin, self.proc.stdout
            if stdin is None or stdout is None or self.proc.poll() is not None:
                raise HelperGone("the root local delivery helper is not running (restart serve)")
            try:
                stdin.write(header + content)
                stdin.flush()
                line = stdout.readline(MAX_HEADER)
            except OSError as exc:
                raise HelperGone(f"the root local delivery helper is gone: {exc.strerror or exc}") from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise HelperGone("the root local delivery helper is gone (no answer)") from None
        if not isinstance(answer, dict):
            raise HelperGone("unexpected answer from the root local delivery helper")
        return answer


_helper: Helper | None = None


def helper() -> Helper | None:
    return _helper


def start(config: Config) -> Helper:
    """Launch the helper (serve is still root) and hand it *config* through a pipe
    that is closed again before serve drops its privileges."""
    global _helper
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "trimail.local.privileged", str(read_end)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(read_end,), cwd="/",
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    finally:
        os.close(read_end)
    with open(write_end, "wb") as pipe:
        pipe.write(pickle.dumps(config))
    _helper = Helper(proc)
    return _helper


def _answer(out: IO[bytes], status: str, dsn: str = "", text: str = "") -> None:
    out.write(json.dumps({"status": status, "dsn": dsn, "text": text}).encode() + b"\n")
    out.flush()


def serve_requests(config: Config, inp: IO[bytes], out: IO[bytes]) -> None:
    """The helper's loop: one request, one answer, until serve closes the pipe."""
    from trimail.delivery.local import LocalAgent

    agent = LocalAgent(config)
    while True:
        line = inp.readline(MAX_HEADER + 1)
        if not line:
            return
        try:
            request = json.loads(line)
            size = int(request["size"])
            if not 0 <= size <= MAX_MESSAGE or len(line) > MAX_HEADER:
                raise ValueError("bad size")
        except (ValueError, KeyError, TypeError):
            return  # a peer that breaks the protocol gets no more answers
        content = inp.read(size)
        if len(content) != size:
            return
        try:
            _answer(out, *agent.privileged(request, content))
        except Exception as exc:  # noqa: BLE001 - the boundary of one request: answer, go on
            _answer(out, "temporary", "4.3.0", f"local delivery helper: internal error: {type(exc).__name__}")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C at serve's terminal: serve ends, then we do (EOF)
    with open(int(argv[0]), "rb") as pipe:
        config = pickle.loads(pipe.read())  # written by serve as root, closed before the drop
    serve_requests(config, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
