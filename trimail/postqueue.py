"""The user's side of serve's public socket (trimail.public): how the ``mailq``,
``flush`` and ``sendmail`` of a user who may not touch the queue ask serve, as
Postfix's postqueue and postdrop reach its public services.

``address`` names the socket (a Linux abstract UNIX socket, from the queue
directory's name); ``ask`` sends one request (a line of JSON, then the message
for a submission) and yields the answer after its first line.  The answer counts
only when the process at the other end belongs to root, mail_owner or the queue
directory's owner (``SO_PEERCRED``): a user who bound the name before serve gets
nothing from another user, and says nothing to them.  A refusal is ``Refused``
with the exit status serve chose (Postfix's: 77 for a user an authorized_* list
does not name, 75 for a temporary condition, 69 for good).

No trio here: a user's sendmail imports this module.

Parameters: queue_directory, mail_owner, non_smtpd_milters, milter_connect_timeout,
milter_content_timeout, milter_command_timeout (how long serve may take to answer a
submission).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import socket
import struct
from collections.abc import Iterator
from typing import Any

PREFIX = b"\0trimail-public:"
ANSWER_LINE = 4096  # bytes of an answer's first line
_ERROR = re.compile(rb"error (\d{1,3}): (.*)", re.DOTALL)


class Refused(Exception):
    """serve refused the request, or could not be asked: *status* is the exit status."""

    def __init__(self, text: str, status: int = os.EX_UNAVAILABLE) -> None:
        super().__init__(text)
        self.status = status


def address(queue_directory: str | os.PathLike[str]) -> bytes:
    """The abstract socket address of the queue in *queue_directory*: from the name
    as main.cf gives it, made absolute without looking at the file system (a user
    may not be able to look at the path that leads to the queue)."""
    named = os.fsencode(os.path.normpath(os.path.abspath(queue_directory)))
    return PREFIX + hashlib.sha256(named).hexdigest()[:32].encode()


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of the UNIX socket *sock*."""
    pid_uid_gid = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", pid_uid_gid)[1]


def uid_of(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def trusted_uids(config: Any) -> set[int | None]:
    """Who may be serve: root, mail_owner, the queue directory's owner."""
    trusted = {0, uid_of(config.mail_owner)}
    try:
        trusted.add(os.stat(config.queue_directory).st_uid)
    except OSError:
        pass
    return trusted


def ask(config: Any, request: dict[str, Any], body: bytes = b"", *, timeout: float = 60.0,
        down: int = os.EX_UNAVAILABLE, work: float = 0.0) -> Iterator[bytes]:
    """One request to serve (blocking): the answer after its ``ok`` line, piece by
    piece.  ``Refused`` for an ``error`` line, an answer from a process that is not
    serve's, or no serve (status *down*).  *work*: seconds serve may take besides
    before its first line (a submission's milters)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address(config.queue_directory))
        except OSError:
            raise Refused("trimail serve is not running (only root and mail_owner may use the queue "
                          "without it)", down) from None
        holder = peer_uid(sock)
        if holder not in trusted_uids(config):
            raise Refused(f"the public socket of {config.queue_directory} is held by uid {holder}, not by "
                          "serve", down)
        data = b""
        try:
            try:
                sock.sendall(json.dumps(request).encode() + b"\n" + body)
            except OSError:  # a refusal before the whole message was taken: read it
                pass
            sock.settimeout(timeout + work)
            while b"\n" not in data and len(data) < ANSWER_LINE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise Refused(f"serve did not answer: {exc.strerror or exc}", os.EX_TEMPFAIL) from None
        status, _, rest = data.partition(b"\n")
        if status != b"ok":
            error = _ERROR.fullmatch(status)
            text = error.group(2).decode("utf-8", "replace") if error else "serve did not answer"
            raise Refused(text[:500], int(error.group(1)) if error else os.EX_TEMPFAIL)
        if rest:
            yield rest
        while chunk := sock.recv(65536):
            yield chunk


def submit_through_serve(config: Any, sender: str, rcpts: list[str], content: bytes,
                         params: dict[str, str | None]) -> int:
    """A user's sendmail: serve queues the message (cleanup/pickup.py); 0 once it is
    queued, ``Refused`` with serve's exit status (75 when serve is not running).
    The answer is awaited as long as serve's non_smtpd_milters may take (a milter's
    ``milter_content_timeout`` is 300 s): a sendmail that gave up at 60 s exited 75
    for a message serve then queued (red team 34e)."""
    request = {"command": "submit", "sender": sender, "recipients": rcpts, "size": len(content), "params": params}
    milters = len(getattr(config, "non_smtpd_milters", None) or ())
    work = milters * (config.milter_connect_timeout + config.milter_content_timeout
                      + (8 + len(rcpts)) * config.milter_command_timeout) if milters else 0.0
    for _ in ask(config, request, content, down=os.EX_TEMPFAIL, work=work):
        pass
    return 0
