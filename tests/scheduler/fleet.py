"""A fleet of real SMTP peers and a DNS zone for the queue manager's test bed (issue 15).

The fleet runs in a thread of its own with its own trio loop, so plain (sync) tests
drive a real ``trimail serve`` child process while the peers answer it::

    with Fleet() as fleet:
        fast = fleet.peer("fast")                        # port 25 on 127.0.6x.y
        domains = fleet.zone.domains(300, fast)          # d0001.bed.test ... MX -> fast
        tarpit = fleet.peer("tarpit", drip=20)           # replies at 20 bytes/s
        ...  # main.cf: dns_nameservers = fleet.nameserver

Peers (one implementation, raw trio streams, thousands of messages per second) and
their behaviours, each changeable while running with ``fleet.set(peer, ...)``:

- fast (the default); slow: ``delay`` seconds before the end-of-data ``250``;
- tarpit: ``drip`` bytes per second for every reply, the greeting included;
- connection-limited: ``session_limit`` concurrent sessions, the others get
  ``421 4.7.0 Too many concurrent SMTP connections`` (Microsoft 365, Gmail, Yahoo);
  ``refusing=True`` gives every connection that 421 (a site turning everyone away);
- dead: ``greet=False`` accepts, counts and never greets (the client's timeout ends it;
  whatever the client says meanwhile is kept in ``unanswered``);
- flapping: ``up=False`` has nothing listening; ``fleet.up(peer)`` / ``fleet.down(peer)``;
- 4xx for a while: ``rcpt_reply=b"451 4.3.0 ..."`` until set back to None;
- ``rcpt_reply`` may also be a callable (recipient -> reply or None) for per-address answers;
- ``drop_at_data=True`` closes the connection at DATA without a reply (lost mid-transaction).

Every peer records what it received (sender, recipients, the ``X-Bed-Tag`` header,
arrival time on ``time.monotonic()``, the whole content for null-sender mail, i.e.
DSNs), connection attempts (with times), open connections now and at most, greeted
sessions ever, now and at most.  The fleet keeps the same counts over all its peers.

Peers listen on port 25 (root) unless the fleet or the peer says ``port=0``: an
ephemeral port, then in ``peer.port``, for tests that reach a peer as ``[host]:port``.
Tests running their own trio loop (serve in process) use the same calls: the fleet's
loop is another thread's, and those calls then block the caller's loop for the moment
they take.

``submit()`` is the sending side: a small SMTP client (several sessions on threads)
that measures end-of-data -> ``250`` for each message.  ``insert_queued()`` fills a
queue database directly (before serve starts), for backlogs and retry storms.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import apsw
import trio

from tests.dnsserver import run_dns_server

BED = "bed.test"
DNS_HOST = "127.0.60.1"  # engineer D's loopback range is 127.0.60.0 - 127.0.69.255
MAX_MESSAGE = 4 << 20  # bytes a peer takes per message (bounded memory)
MAX_LINE = 4096
TOO_MANY = b"421 4.7.0 Too many concurrent SMTP connections\r\n"

# peers get addresses 127.0.60.2 ... 127.0.69.254, never twice in one test run; under
# pytest-xdist each worker takes its own share (a peer made down binds nothing, so it could
# not see that another worker's peer had its address: the flapping-peer tests failed now
# and then under -n 3, their connections going to that other peer, or nowhere)
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_WORKERS = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_addresses = (f"127.0.{a}.{b}" for a, b in itertools.product(range(60, 70), range(2, 255))
              if (a, b) != (60, 1) and (b + 253 * (a - 60)) % _WORKERS == _WORKER % _WORKERS)


@dataclasses.dataclass(slots=True)
class Received:
    peer: str
    sender: str
    recipients: tuple[str, ...]
    tag: str  # the X-Bed-Tag header, "" when absent
    at: float  # time.monotonic() when the peer answered 250
    size: int
    data: bytes | None = None  # the content, kept for null-sender mail (DSNs) only


class Counter:
    """Open connections and greeted sessions, now and at most."""

    def __init__(self) -> None:
        self.connections = 0  # attempts accepted, ever
        self.connections_now = 0
        self.connections_max = 0
        self.sessions = 0  # connections greeted with 220, ever
        self.sessions_now = 0
        self.sessions_max = 0

    def opened(self) -> None:
        self.connections += 1
        self.connections_now += 1
        self.connections_max = max(self.connections_max, self.connections_now)

    def closed(self) -> None:
        self.connections_now -= 1

    def greeted(self) -> None:
        self.sessions += 1
        self.sessions_now += 1
        self.sessions_max = max(self.sessions_max, self.sessions_now)

    def ended(self) -> None:
        self.sessions_now -= 1


class Peer(Counter):
    def __init__(self, fleet: Fleet, name: str, host: str, port: int = 25, *, delay: float = 0.0,
                 drip: float = 0.0, session_limit: int = 0, greet: bool = True,
                 rcpt_reply: bytes | Callable[[str], bytes | None] | None = None, up: bool = True,
                 drop_at_data: bool = False, refusing: bool = False) -> None:
        super().__init__()
        self.fleet, self.name, self.host, self.port = fleet, name, host, port
        self.delay, self.drip, self.session_limit, self.greet = delay, drip, session_limit, greet
        self.rcpt_reply = rcpt_reply
        self.up = up
        self.drop_at_data = drop_at_data
        self.refusing = refusing
        self.unanswered = bytearray()  # what clients said to a peer that never greeted (64 KiB at most)
        self.dropped = 0  # connections dropped at DATA
        self.received: list[Received] = []
        self.attempt_times: list[float] = []  # time.monotonic() of each accepted connection
        self.durations: list[float] = []  # seconds each connection lasted, accept to close
        self.turned_away = 0  # connections answered with 421 (session_limit, refusing)
        self.rcpt_refused = 0
        self._scope: trio.CancelScope | None = None
        self._closed = trio.Event()

    def __repr__(self) -> str:
        return f"<Peer {self.name} {self.host}:{self.port}>"

    @property
    def tags(self) -> list[str]:
        return [r.tag for r in self.received]

    @property
    def recipients(self) -> list[str]:
        """The recipients of every message received, in arrival order."""
        return [rcpt for r in self.received for rcpt in r.recipients]

    # -- listening ------------------------------------------------------------------

    async def listen(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        closed = self._closed = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=4096)
                self.port = listeners[0].socket.getsockname()[1]  # port 0: the one it got
                task_status.started()
                try:
                    await trio.serve_listeners(self.session, listeners, handler_nursery=self.fleet.nursery)
                finally:
                    for listener in listeners:
                        with trio.CancelScope(shield=True):
                            await listener.aclose()
        finally:
            closed.set()

    async def stop_listening(self) -> None:
        """Close the listening socket (sessions in progress go on); returns once new
        connections are refused."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            await self._closed.wait()

    # -- one connection ---------------------------------------------------------------

    async def session(self, stream: trio.SocketStream) -> None:
        now = time.monotonic()
        self.attempt_times.append(now)
        for counter in (self, self.fleet):
            counter.opened()
        greeted, still_open = False, [True]  # still_open[0]: not yet counted as closed
        try:
            if not self.greet:  # dead: hold the connection until the client gives up
                while data := await stream.receive_some(4096):
                    if len(self.unanswered) < 1 << 16:
                        self.unanswered += data
                return
            if self.refusing or (self.session_limit and self.sessions_now >= self.session_limit):
                self.turned_away += 1
                await self.send(stream, TOO_MANY)
                return
            greeted = True
            for counter in (self, self.fleet):
                counter.greeted()
            await self.dialogue(stream, still_open)
            greeted = False  # the dialogue ended the session at QUIT
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, LineTooLong):
            pass
        finally:
            if greeted:
                for counter in (self, self.fleet):
                    counter.ended()
            if still_open[0]:
                for counter in (self, self.fleet):
                    counter.closed()
            self.durations.append(time.monotonic() - now)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    async def send(self, stream: trio.SocketStream, data: bytes) -> None:
        if not self.drip:
            await stream.send_all(data)
            return
        step = max(1, int(self.drip // 10))
        for i in range(0, len(data), step):
            await stream.send_all(data[i:i + step])
            await trio.sleep(step / self.drip)

    async def dialogue(self, stream: trio.SocketStream, open_: list[bool]) -> None:
        reader = LineReader(stream)
        await self.send(stream, f"220 {self.name}.{BED} ESMTP bed peer\r\n".encode())
        sender: str | None = None
        recipients: list[str] = []
        out = bytearray()
        while True:
            if out and not reader.has_line():  # pipelining: answer a whole group at once
                await self.send(stream, bytes(out))
                out.clear()
            line = await reader.line()
            if line is None:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                out += (f"250-{self.name}.{BED}\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                        f"250-SIZE {MAX_MESSAGE}\r\n250 ENHANCEDSTATUSCODES\r\n").encode()
            elif verb == b"HELO":
                out += f"250 {self.name}.{BED}\r\n".encode()
            elif verb == b"MAIL":
                sender, recipients = path_of(line), []
                out += b"250 2.1.0 Ok\r\n"
            elif verb == b"RCPT":
                address = path_of(line)
                reply = self.rcpt_reply(address) if callable(self.rcpt_reply) else self.rcpt_reply
                if sender is None:
                    out += b"503 5.5.1 Error: need MAIL command\r\n"
                elif reply:
                    self.rcpt_refused += 1
                    out += reply.rstrip(b"\r\n") + b"\r\n"
                else:
                    recipients.append(address)
                    out += b"250 2.1.5 Ok\r\n"
            elif verb == b"DATA":
                if sender is None or not recipients:
                    out += b"554 5.5.1 Error: no valid recipients\r\n"
                    continue
                if self.drop_at_data:  # vanish mid-transaction: nothing is received
                    self.dropped += 1
                    return
                await self.send(stream, bytes(out) + b"354 End data with <CR><LF>.<CR><LF>\r\n")
                out.clear()
                data = await reader.data()
                if self.delay:
                    await trio.sleep(self.delay)
                self.receive(sender, recipients, data)
                sender, recipients = None, []
                out += b"250 2.0.0 Ok: queued\r\n"
            elif verb == b"RSET":
                sender, recipients = None, []
                out += b"250 2.0.0 Ok\r\n"
            elif verb == b"NOOP":
                out += b"250 2.0.0 Ok\r\n"
            elif verb == b"QUIT":
                # counted as ended and closed before the 221 the client waits for: a client
                # that opens its next connection after the 221 never looks like one too many
                for counter in (self, self.fleet):
                    counter.ended()
                    counter.closed()
                open_[0] = False
                await self.send(stream, bytes(out) + b"221 2.0.0 Bye\r\n")
                return
            else:
                out += b"502 5.5.2 Error: command not recognized\r\n"

    def receive(self, sender: str, recipients: list[str], data: bytes) -> None:
        received = Received(self.name, sender, tuple(recipients), header(data, b"x-bed-tag"),
                            time.monotonic(), len(data), data if sender == "" else None)
        self.received.append(received)
        self.fleet.received.append(received)


class LineTooLong(Exception):
    pass


class LineReader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    def has_line(self) -> bool:
        return b"\r\n" in self.buffer

    async def _more(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    async def line(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return line
            if len(self.buffer) > MAX_LINE:
                raise LineTooLong
            if not await self._more():
                return None

    async def data(self) -> bytes:
        """The content up to CRLF.CRLF, dots un-stuffed."""
        searched = 0
        while True:
            if self.buffer.startswith(b".\r\n"):
                del self.buffer[:3]
                return b""
            end = self.buffer.find(b"\r\n.\r\n", max(0, searched - 4))
            if end >= 0:
                data = bytes(self.buffer[:end + 2])
                del self.buffer[:end + 5]
                return data.replace(b"\r\n..", b"\r\n.")
            searched = len(self.buffer)
            if searched > MAX_MESSAGE:
                raise LineTooLong
            if not await self._more():
                raise trio.BrokenResourceError("connection lost in DATA")


def path_of(line: bytes) -> str:
    start, end = line.find(b"<"), line.find(b">")
    return line[start + 1:end].decode("utf-8", "replace") if 0 <= start < end else ""


def header(data: bytes, name: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:len(name) + 1].lower() == name + b":":
            return line[len(name) + 1:].strip().decode("utf-8", "replace")
    return ""


# -- the DNS zone ------------------------------------------------------------------------


class Zone(dict):
    """Names for tests/dnsserver.py: ``zone.domains(300, peer)`` makes d0001.bed.test ...
    with an MX record pointing at the peer's own host name (one A record)."""

    def __init__(self) -> None:
        super().__init__()
        self._serial = itertools.count(1)

    def mx_host(self, peer: Peer) -> str:
        name = f"{peer.name}.mx.{BED}"
        self[name] = {"A": [peer.host]}
        return name

    def domain(self, name: str, peer: Peer) -> str:
        self[name] = {"MX": [f"10 {self.mx_host(peer)}."]}
        return name

    def domains(self, count: int, peer: Peer, prefix: str = "d") -> list[str]:
        mx = self.mx_host(peer)
        names = [f"{prefix}{next(self._serial):04d}.{BED}" for _ in range(count)]
        for name in names:
            self[name] = {"MX": [f"10 {mx}."]}
        return names


# -- the fleet ---------------------------------------------------------------------------


class Fleet(Counter):
    """Peers and a DNS server on a trio loop in a thread of their own."""

    def __init__(self, port: int = 25) -> None:
        super().__init__()
        self.port = port  # of new peers: 25, or 0 for ephemeral ports
        self.zone = Zone()
        self.peers: list[Peer] = []
        self.received: list[Received] = []
        self.nursery: trio.Nursery
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bed fleet", daemon=True)
        self.dns_port = 0

    @property
    def nameserver(self) -> str:
        return f"{DNS_HOST}:{self.dns_port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or self._token is None:
            raise RuntimeError(f"the fleet did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported by __enter__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.dns_port = await nursery.start(run_dns_server, self.zone, DNS_HOST)
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()

    def close(self) -> None:
        if self._token is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(10)

    def _on_loop(self, run: Callable[..., Any], fn: Callable[..., Any], *args: Any) -> Any:
        """``run`` (trio.from_thread.run or run_sync) *fn* on the fleet's loop.  From a
        task of another trio loop (an async test) trio refuses to block that loop, so
        the call goes through a helper thread while the caller's loop waits."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return run(fn, *args, trio_token=self._token)
        with concurrent.futures.ThreadPoolExecutor(1) as helper:
            return helper.submit(run, fn, *args, trio_token=self._token).result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run *fn* on the fleet's loop (changes to peers go through here)."""
        return self._on_loop(trio.from_thread.run_sync, fn, *args)

    def peer(self, name: str, host: str | None = None, **behaviour: Any) -> Peer:
        """A new peer on a loopback address of its own (*host*, or the next free one of
        the fleet's), on the fleet's port unless *behaviour* has ``port``."""
        behaviour.setdefault("port", self.port)
        for address in _addresses if host is None else [host]:
            peer = Peer(self, name, address, **behaviour)
            if not peer.up:
                self.peers.append(peer)
                return peer
            try:
                self._on_loop(trio.from_thread.run, self.nursery.start, peer.listen)
            except OSError:
                if host is not None:
                    raise
                continue  # the address is taken (an earlier run): the next one
            self.peers.append(peer)
            return peer
        raise RuntimeError("no loopback address left for a peer")

    def set(self, peer: Peer, **behaviour: Any) -> None:
        def apply() -> None:
            for name, value in behaviour.items():
                if not hasattr(peer, name):
                    raise AttributeError(name)
                setattr(peer, name, value)

        self.call(apply)

    def up(self, peer: Peer) -> None:
        if not peer.up:
            peer.up = True
            self._on_loop(trio.from_thread.run, self.nursery.start, peer.listen)

    def down(self, peer: Peer) -> None:
        peer.up = False
        self._on_loop(trio.from_thread.run, peer.stop_listening)

    def snapshot(self) -> list[Received]:
        return self.call(lambda: list(self.received))


# -- sending -----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Sent:
    tag: str
    recipients: list[str]
    queue_id: str
    acked: float  # time.monotonic() of the end-of-data 250
    eod_latency: float  # seconds from the final dot to the 250


def body(tag: str, sender: str, recipients: list[str]) -> bytes:
    return (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients[:3])}\r\n"
            f"Subject: bed {tag}\r\nMessage-ID: <{tag}@{BED}>\r\nX-Bed-Tag: {tag}\r\n\r\n"
            f"test bed message {tag}\r\n").encode()


class Client:
    """One SMTP session to serve (blocking sockets: the caller is a sync test)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")
        self.command(b"EHLO client.example\r\n", b"250")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline(MAX_LINE)
            if not line:
                raise ConnectionError("serve closed the connection: " + repr(b"".join(lines)))
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def expect(self, code: bytes) -> bytes:
        reply = self.reply()
        if not reply.startswith(code):
            raise AssertionError(f"expected {code!r}, got {reply!r}")
        return reply

    def command(self, line: bytes, code: bytes) -> bytes:
        self.sock.sendall(line)
        return self.expect(code)

    def message(self, tag: str, sender: str, recipients: list[str]) -> Sent:
        self.command(f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
        for rcpt in recipients:
            self.command(f"RCPT TO:<{rcpt}>\r\n".encode(), b"250")
        self.command(b"DATA\r\n", b"354")
        self.sock.sendall(body(tag, sender, recipients))
        started = time.monotonic()
        reply = self.command(b".\r\n", b"250")
        acked = time.monotonic()
        return Sent(tag, recipients, reply.split()[-1].decode(), acked, acked - started)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.file.close()
        self.sock.close()


def submit(port: int, messages: list[tuple[str, list[str]]], *, sessions: int = 4,
           sender: str = "alice@client.example", pace: float = 0.0) -> list[Sent]:
    """Send (tag, recipients) messages over *sessions* concurrent SMTP sessions, *pace*
    seconds apart within a session; returns what serve acknowledged, in send order."""
    results: list[Sent | None] = [None] * len(messages)
    errors: list[BaseException] = []

    def run(part: int) -> None:
        try:
            client = Client(port)
            try:
                for index in range(part, len(messages), sessions):
                    tag, rcpts = messages[index]
                    results[index] = client.message(tag, sender, rcpts)
                    if pace:
                        time.sleep(pace)  # the arrival rate of the scenario, not synchronisation
            finally:
                client.close()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(min(sessions, len(messages)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def submit_apart(port: int, messages: list[tuple[str, list[str]]], *, sessions: int = 4,
                 sender: str = "alice@client.example", pace: float = 0.0) -> list[Sent]:
    """submit() from a process of its own (spawned: this one has threads), so the
    client's timings are serve's latency, not this process's: the fleet's peers
    share its GIL and, under a storm, would delay the client's reads.  The times
    are ``time.monotonic()``, one clock for every process of the machine."""
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(submit, port, messages, sessions=sessions, sender=sender, pace=pace).result(timeout=300)


# -- the queue, directly -------------------------------------------------------------------


def insert_queued(queue_directory: Path, messages: Iterable[tuple[str, list[str]]], *,
                  state: str = "incoming", next_attempt: float | None = None,
                  sender: str = "alice@client.example", reply: str = "4.4.1 connection refused") -> list[str]:
    """Queue messages straight into the database (serve must not be running): new mail
    (``incoming``) or retries (``deferred`` with one failed attempt, due at
    *next_attempt*).  Returns their queue IDs."""
    from trimail.queue.ids import new_queue_id
    from trimail.queue.spool import Spool
    from trimail.queue.store import NewMessage, Store

    store = Store.open(queue_directory)
    ids = []
    arrival = time.time() - (600 if state == "deferred" else 0)
    try:
        store.set_durable(False)
        with store.transaction():
            for tag, rcpts in messages:
                spool = Spool()
                spool.write(body(tag, sender, rcpts))
                queue_id = new_queue_id()
                store.insert_message(NewMessage(queue_id, sender, rcpts, spool, state=state,
                                                arrival_time=arrival, protocol="ESMTP"))
                if state == "deferred":
                    store.db.execute("UPDATE message SET next_attempt = ? WHERE id = ?", (next_attempt, queue_id))
                    store.db.execute("UPDATE recipient SET status = 'deferred', attempts = 1, next_attempt = ?,"
                                     " last_reply = ? WHERE message_id = ?", (next_attempt, reply, queue_id))
                ids.append(queue_id)
        store.set_durable(True)
    finally:
        store.close()
    return ids


def recipient_statuses(queue_directory: Path) -> dict[str, int]:
    """Recipients still queued, by status, plus ``messages`` (queued messages) — read
    through a read-only connection while serve runs."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        db.set_busy_timeout(5000)
        counts = {status: n for status, n in db.execute(
            "SELECT status, count(*) FROM recipient GROUP BY status")}
        counts["messages"] = db.execute("SELECT count(*) FROM message").fetchone()[0]
        return counts
    finally:
        db.close()


def message_states(queue_directory: Path) -> dict[str, int]:
    """Queued messages per state — read through a read-only connection while serve runs."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        db.set_busy_timeout(5000)
        return dict(db.execute("SELECT state, count(*) FROM message GROUP BY state").fetchall())
    finally:
        db.close()


def deferred_recipients(queue_directory: Path, domain: str) -> list[tuple[str, int, str]]:
    """(address, attempts, last reply) of the deferred recipients at *domain*."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        db.set_busy_timeout(5000)
        return [(a, n, r or "") for a, n, r in db.execute(
            "SELECT address, attempts, last_reply FROM recipient WHERE status = 'deferred'"
            " AND address LIKE ?", (f"%@{domain}",))]
    finally:
        db.close()


def bed_scale() -> float:
    """TRIMAIL_BED_SCALE (default 1) multiplies the backlogs and storms of the bed."""
    return float(os.environ.get("TRIMAIL_BED_SCALE", "1"))


# -- figures -------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def figures(values: list[float]) -> str:
    return (f"n={len(values)} p50={percentile(values, 0.5):.3f}s p99={percentile(values, 0.99):.3f}s "
            f"max={max(values) if values else math.nan:.3f}s")


def dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
