"""The public socket: what every local user may ask serve.  Postfix's postqueue and
postdrop reach its showq, flush and pickup services for any user; here:

- the queue's listing (``mailq``, ``sendmail -bp``, ``trimail queue list``) for
  the users ``authorized_mailq_users`` names;
- a flush (``sendmail -q``, ``trimail flush [-d site] [IDs]``) for the users
  ``authorized_flush_users`` names (then the queue manager tries dead sites again);
- a local submission (a user's ``sendmail``: cleanup/pickup.py) for the users
  ``authorized_submit_users`` names (every user by default).

The queue is mail_owner's and 0700, and a Python program cannot be setgid as
postqueue and postdrop are, so a user who may not touch the queue asks serve, on a
Linux abstract UNIX socket named after the queue directory (``postqueue.address``:
no file that could be planted, moved or have its mode changed).  Each side checks
the other's credentials (``SO_PEERCRED``): serve judges the user's uid against
the authorized_* lists (trimail/userlists.py: root and mail_owner may always view
and flush, as postqueue lets them), and the user's side (trimail.postqueue) takes an answer only from
a process of root, mail_owner or the queue directory's owner: a user who took the
name first (serve logs it, starts all the same and tries again every ``RETRY``
seconds) answers nobody.

One request per connection: one line of JSON within ``READ_TIMEOUT`` seconds (at
most ``pickup.ENVELOPE_LIMIT`` bytes), ``{"command": "list", "json": false,
"state", "sender", "recipient", "domain"}`` (``trimail queue list``'s filters),
``{"command": "flush", "ids": [...], "site": ...}`` or ``{"command": "submit",
"sender", "recipients", "size", "params"}`` followed by the message.  The answer's
first line is ``ok`` or ``error N: text`` (N: the exit status the user's command
ends with: 77 for a user the list does not name, 75 for a temporary condition); a
listing follows in Postfix's layout (or JSON), made on a thread a few hundred lines
(at most about ``PIECE`` characters, ``SCAN`` messages looked at) at a time, one
page of the queue per read snapshot, so a reader that stops reading holds no
snapshot, and each piece must be taken within ``SEND_TIMEOUT`` seconds.
At most ``LIMIT`` requests are answered at once (``net.reading.serve_requests``:
a slow sender loses its place to a newcomer), at most ``PER_USER`` listings and
flushes of one user (a user's slow readers leave room for the others'; red team
34), and one flush at a time.

Parameters: authorized_mailq_users, authorized_flush_users, mail_owner,
queue_directory (and cleanup/pickup.py's, trimail/userlists.py's).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import trio

from trimail import postqueue, userlists
from trimail.cleanup import pickup
from trimail.config import Config
from trimail.errors import TrimailError
from trimail.net.control import serve_control
from trimail.net.reading import receive_until, request_read, serve_requests
from trimail.postqueue import peer_uid
from trimail.queue import admin, mailq
from trimail.queue.database import QueueError, storage_error
from trimail.queue.reads import MessageInfo, filtered
from trimail.queue.store import Store
from trimail.smtp.address import is_domain
from trimail.supervise import FailureCounter, contained

log = logging.getLogger("trimail.master")

MAX_IDS = 100  # queue IDs one flush may name
READ_TIMEOUT = 5.0  # seconds to send the request
SEND_TIMEOUT = 30.0  # seconds the client may take to read each piece of an answer
LIMIT = 16  # requests answered at once
PER_USER = 4  # listings and flushes of one user at once (not root's, not serve's own user)
RETRY = 5.0  # seconds between tries to bind a name another process holds
LINES = 500  # lines of a listing made per thread hop, at most
PIECE = 65536  # characters of a listing made per thread hop, about (a JSON line is a whole message)
SCAN = 1000  # messages a thread hop looks at, at most (a filter may keep none of them)
FILTERS = ("state", "sender", "recipient", "domain")


def _refusal(config: Config, users: str, uid: int) -> bytes | None:
    """The answer refusing *uid* when the list *users* (a parameter) does not name it."""
    refused = userlists.judged_by_serve(config, users, uid)
    return None if refused is None else f"error {os.EX_NOPERM}: {refused}\n".encode()


def _listing(queue_directory: Path, config: Config, uid: int, request: dict[str, Any]) -> Iterator[bytes]:
    """The answer to a listing, piece by piece (each ``next`` on a thread)."""
    refused = _refusal(config, "authorized_mailq_users", uid)
    if refused is not None:
        yield refused
        return
    try:
        store = Store.open(queue_directory, readonly=True)
    except QueueError as exc:
        yield f"error {os.EX_TEMPFAIL}: {exc}\n".encode()
        return
    source = store.iter_messages()
    try:
        yield b"ok\n"
        messages = _paused(source, [request.get(name) for name in FILTERS])
        if request.get("json"):  # as the CLI writes it: one line
            texts = itertools.chain(("[",), _json_texts(messages), ("]\n",))
        else:
            texts = (line if line is None else line + "\n" for line in mailq.paused_lines(messages))
        piece: list[str] = []
        size = 0
        for text in texts:  # a piece ends at LINES lines, PIECE characters or a pause (b"": nothing to send)
            if text is not None:
                piece.append(text)
                size += len(text)
            if text is None or len(piece) >= LINES or size >= PIECE:
                yield "".join(piece).encode()
                piece, size = [], 0
        if piece:
            yield "".join(piece).encode()
    finally:
        source.close()
        store.close()


def _paused(source: Iterator[MessageInfo], filters: list[Any]) -> Iterator[MessageInfo | None]:
    """The messages the filters keep, and a None (a pause) after every ``SCAN``
    messages looked at: a filter that keeps few makes no hop walk the whole queue."""
    for number, message in enumerate(source, 1):
        yield from filtered((message,), *filters)
        if number % SCAN == 0:
            yield None


def _json_texts(messages: Iterator[MessageInfo | None]) -> Iterator[str | None]:
    count = 0
    for m in messages:
        if m is None:
            yield None
        else:
            yield ("" if count == 0 else ", ") + json.dumps(m.to_json())
            count += 1


def _flush(queue_directory: Path, config: Config, uid: int, request: dict[str, Any]) -> bytes:
    refused = _refusal(config, "authorized_flush_users", uid)
    if refused is not None:
        return refused
    site, ids = request.get("site"), request.get("ids")
    if site is not None and not (isinstance(site, str) and (is_domain(site.rstrip(".")) or (
            site.startswith("[") and site.endswith("]") and len(site) <= 255))):
        return b"error 64: not a domain or an address literal\n"
    if ids is not None and not (isinstance(ids, list) and len(ids) <= MAX_IDS
                                and all(isinstance(i, str) and i.isalnum() and len(i) <= 64 for i in ids)):
        return b"error 64: bad queue IDs\n"
    try:
        store = Store.open(queue_directory)
        try:
            with store.transaction():
                count = admin.flush_site(store, site) if site is not None else admin.flush(store, ids or None)
        finally:
            store.close()
    except (TrimailError, apsw.Error) as exc:  # a full disk, a lock held too long: the user's answer
        return f"error {os.EX_TEMPFAIL}: {storage_error(exc) if isinstance(exc, apsw.Error) else exc}\n".encode()
    return f"ok\n{count}\n".encode()


class PublicSocket:
    """The public socket, bound at once when its name is free: before serve says it
    has started (and tells systemd), so a user's command right after finds serve
    (red team 34: one in four at once was told serve was not running).  When
    another process holds the name, ``serve_public`` binds it later."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.error = self.bind()

    def bind(self) -> OSError | None:
        try:
            self.sock.bind(self.name)
            self.sock.listen(16)
        except OSError as exc:  # another process holds the name: never the end of serve
            return exc
        return None


async def serve_public(queue_directory: Path, settings: Callable[[], Config], commands: dict[str, Callable[[], Any]],
                       metrics: FailureCounter | None = None, public: PublicSocket | None = None) -> None:
    """Answer on the public socket (bound again every ``RETRY`` seconds while another
    process holds the name) until cancelled; *settings* gives the configuration of
    the moment, *commands* the control socket's (its ``flush`` makes the queue
    manager try dead sites again); *public*: the socket, named before the chroot
    jail (where *queue_directory* is ``/``).  Its own boundary: a failure here costs
    the users' requests, never serve."""
    public = public or PublicSocket(postqueue.address(queue_directory))
    with contained("public socket", metrics, logger=log), public.sock:  # closed: the name is free again at once
        if public.error is not None:
            log.warning("public socket for users' mailq, flush and sendmail: %s; trying again every %gs",
                        public.error.strerror or public.error, RETRY)
            while public.bind() is not None:
                await trio.sleep(RETRY)
            log.info("public socket for users' mailq, flush and sendmail bound")
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(public.sock))
        await serve_requests(listener, _handler(queue_directory, settings, commands), task="public request",
                             metrics=metrics, limit=LIMIT)


def _handler(queue_directory: Path, settings: Callable[[], Config],
             commands: dict[str, Callable[[], Any]]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    one_flush = trio.Lock()
    big = trio.Semaphore(pickup.BIG_AT_ONCE)  # submissions over pickup.BIG read and queued at once
    busy: collections.Counter[int] = collections.Counter()  # listings and flushes in progress by uid

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        with trio.move_on_after(READ_TIMEOUT):
            data = await receive_until(stream, b"\n", pickup.ENVELOPE_LIMIT)
        line, newline, rest = data.partition(b"\n")
        if not newline:
            return  # silent, too slow or over-long: nothing was asked
        uid, config = peer_uid(stream.socket), settings()
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, TypeError, KeyError, RecursionError):  # (arrays nested 1,000 deep: no log line)
            request, command = {}, None
        if command == "submit":  # a user's sendmail (Postfix's postdrop): the message follows
            answer = await pickup.receive(stream, rest, uid, config, request, big)  # (calls request_read)
            if answer.startswith(b"ok"):
                commands["wake"]()
            # queued: the answer goes out even when serve stops now (red team 34e: exit 75, queued)
            with trio.CancelScope(shield=True), trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(answer)
            return
        request_read()
        if busy[uid] >= PER_USER and uid not in (0, os.geteuid()):  # red team 34: slow readers took every slot
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(f"error {os.EX_TEMPFAIL}: uid {uid} has {PER_USER} requests in progress\n"
                                      .encode())
            return
        busy[uid] += 1
        try:
            await queue_request(stream, uid, config, command, request)
        finally:
            busy[uid] -= 1
            if not busy[uid]:
                del busy[uid]

    async def queue_request(stream: trio.SocketStream, uid: int, config: Config, command: object,
                            request: dict[str, Any]) -> None:
        """A listing or a flush (at most PER_USER of them at once for one user)."""
        if command == "flush":
            async with one_flush:
                answer = await trio.to_thread.run_sync(_flush, queue_directory, config, uid, request)
            if answer.startswith(b"ok"):
                commands["flush"]()
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(answer)
            return
        if command != "list" or not all(isinstance(request.get(f), (str, type(None))) for f in FILTERS):
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(b"error 64: bad request\n")
            return
        pieces = _listing(queue_directory, config, uid, request)
        try:
            while (piece := await trio.to_thread.run_sync(next, pieces, None)) is not None:
                with trio.move_on_after(SEND_TIMEOUT) as sending:
                    await stream.send_all(piece)
                if sending.cancelled_caught:
                    return  # a reader that stopped reading: its answer ends
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(pieces.close)

    return handle


async def serve_operators(control: trio.SocketListener, commands: dict[str, Callable[[], Any]],
                          metrics: FailureCounter | None, queue_directory: Path,
                          settings: Callable[[], Config], public: PublicSocket) -> None:
    """The control socket (root and mail_owner) and the public socket (every user)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_control, control, commands, metrics, queue_directory)
        nursery.start_soon(serve_public, queue_directory, settings, commands, metrics, public)
