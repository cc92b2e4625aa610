"""Red team of the I/O fast path (issue 16 work): ``net.stream.DirectStream``, which
sends and receives with one non-blocking call and yields to trio only when it must
wait, under every smtpd session (through ``net.listener.DeferredAccept``) and under
the delivery agent's SMTP client (``delivery.smtp.Connection._read``/``_send``).

Each test attacks a real ``trimail serve`` the way the Internet can: clients that
pipeline without pause, never read, reset in the middle of a reply, half-close,
drip one byte at a time or send a huge line (in clear and after STARTTLS), resets in
the backlog; and, on the sending side, servers that drip their replies, flood them,
never greet, stop reading or reset in the middle of DATA.  What must hold: other
sessions are served promptly, every deadline still ends what it bounds, nothing
unexpected is logged, and serve (with its qmgr) lives.

Every test binds only loopback addresses in 127.0.48.0/24.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import smtplib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable

import pytest

from tests.faults.conftest import banner, serve_status, wait_until

HOST = "127.0.48.1"  # serve
PEER = "127.0.48.2"  # the hostile servers the delivery agent talks to
EHLO_FLOOD = b"EHLO flood.example\r\n" * 4000


def _client(port: int, source: str, timeout: float = 10.0) -> socket.socket:
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    conn.bind((source, 0))
    conn.connect((HOST, port))
    return conn


def _reset(conn: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0), as a client that vanishes does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _reply(stream) -> bytes:
    """The last line of the next (possibly multi-line) reply from a file object."""
    while True:
        line = stream.readline()
        assert line, "connection closed"
        if line[3:4] != b"-":
            return line


def _serving(d) -> None:
    assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
    assert banner(d.port, HOST).startswith("220 ")


def _no_failures(d) -> None:
    """Nothing reached a catch-all boundary (an unexpected error in a session or task)."""
    bad = [line for line in d.proc.log if re.search(r"Traceback|failed:|internal error|task failed", line)]
    assert not bad, "\n".join(bad[:10])


def _probe_latency(port: int, source: str) -> float:
    """Seconds for connect, banner, EHLO and QUIT of a well-behaved client."""
    start = time.monotonic()
    with _client(port, source, timeout=30) as conn:
        stream = conn.makefile("rb")
        assert _reply(stream).startswith(b"220 ")
        conn.sendall(b"EHLO probe.example\r\n")
        assert _reply(stream).startswith(b"250 ")
        conn.sendall(b"QUIT\r\n")
        assert _reply(stream).startswith(b"221 ")
    return time.monotonic() - start


def _smtpd(daemon, **params: object):
    """serve with one smtpd worker (the weakest case for fairness), no qmgr, no DNS."""
    settings: dict[str, object] = {"smtpd_listen": f"{HOST}:0", "smtpd_workers": 1,
                                   "master_service_disable": "qmgr", "smtpd_peername_lookup": "no"}
    settings.update(params)
    return daemon(**settings)


class Flooder:
    """Clients that pipeline EHLO without pause on non-blocking sockets, reading
    (and dropping) whatever comes back, reconnecting when serve closes them."""

    def __init__(self, port: int, count: int, source: str = "127.0.48.20") -> None:
        self.port, self.count, self.source = port, count, source
        self.received = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flooder:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self, sel: selectors.BaseSelector) -> None:
        conn = socket.socket()
        conn.bind((self.source, 0))
        conn.connect((HOST, self.port))
        conn.setblocking(False)
        self.connections += 1
        sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, [memoryview(b"")])

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            for _ in range(self.count):
                self._open(sel)
            while not self._stop.is_set():
                for key, events in sel.select(0.2):
                    conn, pending = key.fileobj, key.data
                    closed = False
                    if events & selectors.EVENT_READ:
                        try:
                            data = conn.recv(1 << 20)
                        except BlockingIOError:
                            data = None
                        except OSError:
                            data = b""
                        closed = data == b""
                        self.received += len(data or b"")
                    if not closed and events & selectors.EVENT_WRITE:
                        if not pending[0]:
                            pending[0] = memoryview(EHLO_FLOOD)
                        try:
                            pending[0] = pending[0][conn.send(pending[0]):]
                        except BlockingIOError:
                            pass
                        except OSError:
                            closed = True
                    if closed:
                        sel.unregister(conn)
                        conn.close()
                        self._open(sel)
            for key in list(sel.get_map().values()):
                key.fileobj.close()


# -- the smtpd side: clients that pipeline, never read, reset, half-close, drip --------------


def test_a_pipelining_flood_does_not_hold_up_other_clients(daemon):
    """Guard.  Three clients pipeline EHLO without pause (the junk-command limit
    raised, as a site with its own clients may: each 64 KiB read is 3,300 commands
    and 800 KiB of replies, all sent without a wait); a well-behaved client is still
    served promptly and serve lives."""
    d = _smtpd(daemon, smtpd_junk_command_limit=10**6, smtpd_hard_error_limit=10**6)
    with Flooder(d.port, 3) as flood:
        wait_until(lambda: flood.received > 4 << 20, timeout=20)
        latencies = [_probe_latency(d.port, "127.0.48.10") for _ in range(5)]
        assert flood.received > 8 << 20  # the flood really ran during the probes
    assert max(latencies) < 2.0, latencies
    _serving(d)
    _no_failures(d)


def test_a_client_that_never_reads_is_ended_by_smtpd_timeout(daemon):
    """Guard.  A client pipelines EHLO and never reads: our replies fill its receive
    window, the send must wait, and smtpd_timeout must still end the session (with
    the shielded final flush bounded too); meanwhile others are served."""
    d = _smtpd(daemon, smtpd_timeout="2s", smtpd_junk_command_limit=10**6, smtpd_hard_error_limit=10**6)
    conn = _client(d.port, "127.0.48.11")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.setblocking(False)
    start = time.monotonic()
    try:
        sent = 0
        while time.monotonic() - start < 1.0:  # until our send buffer is full too
            try:
                sent += conn.send(EHLO_FLOOD)
            except BlockingIOError:
                break
        assert _probe_latency(d.port, "127.0.48.10") < 2.0
        line = d.proc.wait_log(r"disconnect from unknown\[127\.0\.48\.11\]", timeout=20)
        elapsed = time.monotonic() - start
    finally:
        _reset(conn)
    assert any(re.search(r"timeout after \w+ from unknown\[127\.0\.48\.11\]", x) for x in d.proc.log), line
    assert elapsed < 2 + 5 + 5, elapsed  # smtpd_timeout + the final flush's bound + slack
    _serving(d)
    _no_failures(d)


@pytest.mark.parametrize("when", ["during-replies", "after-accept", "in-backlog"])
def test_resets_at_every_moment_cost_only_their_sessions(daemon, when):
    """Guard.  Clients reset (RST) while serve writes a large pipelined answer, right
    after the connection is accepted (ECONNRESET or EPIPE on the first send or
    receive), or before it is accepted at all: each is logged as a lost connection,
    nothing reaches a boundary and serve lives."""
    d = _smtpd(daemon, smtpd_junk_command_limit=10**6, smtpd_hard_error_limit=10**6)
    for round_ in range(50):
        conn = _client(d.port, "127.0.48.12")
        if when == "during-replies":
            conn.recv(100)
            conn.sendall(EHLO_FLOOD[: 200 * 20])
            conn.recv(1000)  # serve is answering: the rest is in flight when we reset
        elif when == "after-accept":
            conn.sendall(b"EHLO reset.example\r\n")
        _reset(conn)
    # reset before serve looked at it: Postfix's 'lost connection after CONNECT from unknown[unknown]'
    ended = re.compile(r"disconnect from unknown\[127\.0\.48\.12\]|lost connection after CONNECT from unknown\[unknown\]$")
    wait_until(lambda: sum(bool(ended.search(x)) for x in d.proc.log) == 50, timeout=30)
    _serving(d)
    _no_failures(d)


@pytest.mark.parametrize("quit_", [True, False], ids=["quit", "no-quit"])
def test_a_half_closed_client_gets_every_reply(daemon, quit_):
    """Guard.  A client pipelines its commands and half-closes (SHUT_WR) without
    waiting: it still gets a reply to every command (with QUIT or without), then EOF."""
    d = _smtpd(daemon)
    commands = [b"EHLO half.example", b"MAIL FROM:<a@client.example>", b"RSET", b"NOOP"] * 10 \
        + ([b"QUIT"] if quit_ else [])
    with _client(d.port, "127.0.48.13") as conn:
        conn.sendall(b"".join(c + b"\r\n" for c in commands))
        conn.shutdown(socket.SHUT_WR)
        stream = conn.makefile("rb")
        assert _reply(stream).startswith(b"220 ")
        replies = [_reply(stream) for _ in commands]
        assert stream.read() == b""
    assert replies[-1].startswith(b"221 " if quit_ else b"250 "), replies[-1]
    assert all(r[:1] in b"2" for r in replies), [r for r in replies if r[:1] not in b"2"][:3]
    _serving(d)
    _no_failures(d)


def test_a_slow_drip_and_a_huge_line_are_answered(daemon):
    """Guard.  A command one byte at a time (each byte its own segment) is answered;
    a 4 MiB line without an end is cut (bounded memory) and the session goes on in
    sync with the next command; serve lives."""
    d = _smtpd(daemon)
    with _client(d.port, "127.0.48.14") as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = conn.makefile("rb")
        assert _reply(stream).startswith(b"220 ")
        for byte in b"EHLO drip.example\r\n":
            conn.send(bytes([byte]))
            time.sleep(0.002)  # not synchronisation: makes separate segments likely
        assert _reply(stream).startswith(b"250 ")
        conn.sendall(b"NOOP " + b"x" * (4 << 20) + b"\r\nNOOP\r\n")
        first, second = _reply(stream), _reply(stream)
        assert first.startswith(b"500 "), first
        assert second.startswith(b"250 "), second
    _serving(d)
    _no_failures(d)


# -- the same after STARTTLS (an SSLStream over DirectStream) ----------------------------


def _tls_client(port: int, source: str, cafile: str) -> tuple[ssl.SSLSocket, object]:
    conn = _client(port, source)
    stream = conn.makefile("rb")
    assert _reply(stream).startswith(b"220 ")
    conn.sendall(b"EHLO tls.example\r\nSTARTTLS\r\n")
    assert _reply(stream).startswith(b"250 ")
    assert _reply(stream).startswith(b"220 ")
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False
    tls = context.wrap_socket(conn, server_hostname="mx.test.example")
    return tls, tls.makefile("rb")


def test_starttls_then_flood_never_read_and_reset(daemon, ca, tmp_path):
    """Guard.  After STARTTLS: a client that floods and never reads is ended by
    smtpd_timeout; one that resets in the middle of an encrypted answer is a lost
    connection; a well-behaved encrypted client is served meanwhile."""
    cert = tmp_path / "cert.pem"
    ca.issue_cert("mx.test.example", HOST).private_key_and_cert_chain_pem.write_to_path(str(cert))
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    d = _smtpd(daemon, smtpd_tls_cert_file=str(cert), smtpd_timeout="2s",
               smtpd_junk_command_limit=10**6, smtpd_hard_error_limit=10**6)
    stuck, _ = _tls_client(d.port, "127.0.48.15", str(cafile))
    stuck.settimeout(0.5)
    start = time.monotonic()
    with contextlib.suppress(OSError):  # our own send buffer full (timeout) or serve gone
        for _ in range(200):
            stuck.sendall(EHLO_FLOOD)
    resetter, stream = _tls_client(d.port, "127.0.48.16", str(cafile))
    resetter.sendall(EHLO_FLOOD[: 200 * 20])
    assert _reply(stream).startswith(b"250 ")
    _reset(resetter)
    good, stream = _tls_client(d.port, "127.0.48.17", str(cafile))
    with good:
        good.sendall(b"EHLO good.example\r\n")
        assert _reply(stream).startswith(b"250 ")
        good.sendall(b"QUIT\r\n")
        assert _reply(stream).startswith(b"221 ")
    d.proc.wait_log(r"disconnect from unknown\[127\.0\.48\.15\]", timeout=20)
    assert time.monotonic() - start < 2 + 5 + 5
    d.proc.wait_log(r"disconnect from unknown\[127\.0\.48\.16\]", timeout=20)
    _reset(stuck)
    _serving(d)
    _no_failures(d)


# -- the delivery agent's side: servers that drip, flood, never greet, stop reading, reset ----


class HostilePeer:
    """A listening socket on PEER that runs *script(conn)* in a thread for every
    connection (a raw, blocking socket with a small receive buffer)."""

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # accepted sockets inherit it
        self.sock.bind((PEER, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[float] = []  # time.monotonic() of each connection
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> HostilePeer:  # noqa: PYI034
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.sock.close()
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            self.script(conn)

    def stopped(self) -> bool:
        return self._stop.is_set()


def _read_until(conn: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def _greet_and_ehlo(conn: socket.socket) -> None:
    conn.sendall(b"220 peer.example ESMTP\r\n")
    _read_until(conn, b"\r\n")
    conn.sendall(b"250-peer.example\r\n250 PIPELINING\r\n")


def _relay(daemon, peer: HostilePeer, **params: object):
    settings: dict[str, object] = {
        "smtpd_listen": f"{HOST}:0", "smtpd_workers": 1, "smtpd_peername_lookup": "no",
        "relayhost": f"[{PEER}]:{peer.port}", "mynetworks": "127.0.0.0/8", "smtp_tls_security_level": "none",
        **{f"smtp_{stage}_timeout": "2s" for stage in ("helo", "mail", "rcpt", "data_init", "data_xfer",
                                                        "data_done", "quit")}}
    settings.update(params)
    return daemon(**settings)


def _submit(port: int, body: bytes = b"Subject: red\r\n\r\nbody\r\n") -> str:
    with smtplib.SMTP(HOST, port, timeout=60, source_address=("127.0.48.30", 0)) as client:
        client.ehlo("client.example")
        client.mail("a@client.example")
        client.rcpt("b@remote.example")
        code, reply = client.data(body)
        assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def _qmgr_alive(d) -> None:
    _serving(d)
    workers = serve_status(d.queue_directory).get("workers") or []
    assert [w for w in workers if w["role"] == "qmgr" and w.get("state") == "running"], workers
    _no_failures(d)


def _drip(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in b"220 peer.example ESMTP " + b"x" * 150 + b"\r\n":  # 8.7 s
        conn.send(bytes([byte]))
        time.sleep(0.05)  # the attack: faster than the timeout per byte, slower in total


def _silent(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.recv(1)  # until the client gives up


def _flood(conn: socket.socket) -> None:
    conn.sendall(b"220 peer.example ESMTP\r\n")
    _read_until(conn, b"\r\n")
    line = b"250-flood flood flood flood flood flood flood flood flood\r\n" * 1000
    while True:
        conn.sendall(line)


def _reset_mid_data(conn: socket.socket) -> None:
    _greet_and_ehlo(conn)
    _read_until(conn, b"DATA\r\n")
    conn.sendall(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    got = 0
    while got < 100_000:
        got += len(conn.recv(65536))
    _reset(conn)


def _never_read_data(conn: socket.socket) -> None:
    _greet_and_ehlo(conn)
    _read_until(conn, b"DATA\r\n")
    conn.sendall(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    with contextlib.suppress(OSError):
        conn.settimeout(60)
        conn.recv(1, socket.MSG_PEEK)  # never reads the content: waits for the client to go
        while conn.recv(1, socket.MSG_PEEK):
            time.sleep(0.1)  # not synchronisation: a slow poll of a peer that does not read


def _drip_final_reply(conn: socket.socket) -> None:
    _greet_and_ehlo(conn)
    _read_until(conn, b"DATA\r\n")
    conn.sendall(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    _read_until(conn, b"\r\n.\r\n")
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in b"250 2.0.0 Ok: queued as " + b"x" * 150 + b"\r\n":  # 8.7 s
        conn.send(bytes([byte]))
        time.sleep(0.05)


CLIENT_ATTACKS = {
    # script, body size, the reason's end, the longest the attempt may take
    "drip-greeting": (_drip, 100, r"timed out while receiving the initial server greeting", 6.0),
    "never-greets": (_silent, 100, r"timed out while receiving the initial server greeting", 6.0),
    "reply-flood": (_flood, 100, r"while receiving the EHLO reply: reply has too many lines", 6.0),
    "reset-mid-data": (_reset_mid_data, 4 << 20, r"lost connection with .* while sending message body", 10.0),
    "never-reads-data": (_never_read_data, 9 << 20, r"timed out while sending message body", 15.0),
    "drip-final-reply": (_drip_final_reply, 100, r"timed out while receiving the end of data reply", 6.0),
}


@pytest.mark.parametrize("attack", list(CLIENT_ATTACKS))
def test_hostile_servers_defer_the_delivery_and_the_qmgr_lives(daemon, attack):
    """Guard.  Each hostile server ends the attempt within its timeout (a reply's
    runs from the first wait for it, so a server dripping a reply faster than the
    timeout per byte but slower in total is still cut off), the mail is deferred
    4.4.2 with Postfix's reason, and serve and its qmgr live."""
    script, size, reason, bound = CLIENT_ATTACKS[attack]
    with HostilePeer(script) as peer:
        d = _relay(daemon, peer)
        body = b"Subject: red\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78 + 1)
        queue_id = _submit(d.port, body)
        line = d.proc.wait_log(rf"{queue_id}: to=<b@remote\.example>.*status=", timeout=bound + 20)
        ended = time.monotonic()
        assert peer.accepted, "no connection"
        assert "dsn=4.4.2, status=deferred" in line, line
        assert re.search(reason, line), line
        assert ended - peer.accepted[0] < bound, (ended - peer.accepted[0], line)
        _qmgr_alive(d)
