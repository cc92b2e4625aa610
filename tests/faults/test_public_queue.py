"""A user who may not look into the queue lists and flushes it through serve's
public socket (trimail.public), as Postfix's postqueue reaches showq and flush for
any user: ``authorized_mailq_users`` and ``authorized_flush_users`` say who may;
the client believes only serve's process; nothing a user sends there ends serve.

The user is ``nobody``: the test's interpreter imports the command line as root,
then takes nobody's ids (the interpreter's own files may be out of nobody's reach)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import assert_serving, queued, send, wait_until
from tests.faults.test_startup import background, chroot_config, jail, needs_root  # noqa: F401
from tests.peers import Sink
from tests.ports import free_port
from trimail import postqueue, public
from trimail.cleanup import pickup

SINK_HOST = "127.0.0.86"
AS_NOBODY = """
import os, sys
import trimail.cli, trimail.cli.queue
os.setgroups([]); os.setgid(65534); os.setuid(65534)
trimail.cli.main(sys.argv[1:])
"""


@pytest.fixture
def readable() -> Iterator[Path]:
    """A directory nobody can read, for the main.cf the command reads as nobody."""
    with tempfile.TemporaryDirectory(prefix="trimail-t34-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def as_nobody(d, readable: Path, *args: str, extra: str = "") -> subprocess.CompletedProcess:
    config = readable / "main.cf"
    config.write_text(f"queue_directory = {d.queue_directory}\n{extra}")
    config.chmod(0o644)
    return subprocess.run([sys.executable, "-c", AS_NOBODY, *args, "-c", str(config)],
                          capture_output=True, timeout=60, cwd="/", check=False)


def as_root(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimail", *args, "-c", str(d.config_path)],
                          capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_user_lists_the_queue_as_root_sees_it(daemon, readable, workers):
    d = daemon(smtpd_workers=workers, master_service_disable="qmgr")  # the mail stays queued
    ids = {send(d.port, [f"r{n}@dest.example", "other@dest.example"]) for n in range(3)}
    listing = as_nobody(d, readable, "queue", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {m["id"] for m in json.loads(listing.stdout)} == ids
    assert listing.stdout == as_root(d, "queue", "list", "--json").stdout
    plain = as_nobody(d, readable, "queue", "list", "--plain", "--sender", "alice@client.example")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == as_root(d, "queue", "list", "--plain").stdout
    assert plain.stdout.decode().endswith("in 3 Requests.\n")


def test_the_authorized_lists_refuse_a_user_they_do_not_name(daemon, readable):
    d = daemon(smtpd_workers=0, master_service_disable="qmgr",
               authorized_mailq_users="root", authorized_flush_users="!nobody, static:anyone")
    send(d.port, ["a@dest.example"])
    for args, what in ((("queue", "list"), "view"), (("flush",), "flush"), (("flush", "-d", "dest.example"), "flush")):
        result = as_nobody(d, readable, *args, extra="authorized_mailq_users = static:anyone\n")
        assert result.returncode == os.EX_NOPERM, result.stderr  # serve's list counts, not the user's main.cf
        assert f"User nobody(65534) is not allowed to {what} the mail queue" in result.stderr.decode()
        assert result.stdout == b""
    assert_serving(d)


def test_a_users_flush_delivers_deferred_mail_now(daemon, readable):
    port = free_port(SINK_HOST)
    d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{port}")  # nobody listens there yet: deferred
    send(d.port, ["a@dest.example"])
    wait_until(lambda: queued(d.queue_directory, "deferred") == 1, timeout=30)
    with Sink(SINK_HOST, port=port) as sink:  # the next try is minimal_backoff_time (300 s) away ...
        result = as_nobody(d, readable, "flush")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(sink.messages) == 1, timeout=30)  # ... unless a flush makes it due
    wait_until(lambda: queued(d.queue_directory) == 0)


def test_a_process_holding_the_public_name_is_not_believed_and_serve_takes_the_name_later(
        daemon, readable, tmp_path):
    """A user who bound the name before serve: serve starts all the same (the name
    is tried again every RETRY seconds), a user's listing is refused rather than
    taken from the squatter, and once the name is free serve answers on it."""
    queue_directory = tmp_path / "queue"
    squatter = subprocess.Popen(
        [sys.executable, "-c", "import os, socket, sys\n"
         "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
         "s = socket.socket(socket.AF_UNIX); s.bind(bytes.fromhex(sys.argv[1])); s.listen()\n"
         "print('bound', flush=True)\n"
         "while True:\n    c, _ = s.accept(); c.sendall(b'ok\\nforged listing\\n'); c.close()\n",
         postqueue.address(queue_directory).hex()], stdout=subprocess.PIPE)
    try:
        assert squatter.stdout.readline() == b"bound\n"
        d = daemon(smtpd_workers=0, master_service_disable="qmgr", queue_directory=queue_directory)
        assert_serving(d)
        wait_until(lambda: any("public socket" in line and "trying again" in line for line in d.proc.log))
        refused = as_nobody(d, readable, "queue", "list")
        assert refused.returncode == os.EX_UNAVAILABLE, refused.stderr
        assert b"held by uid 65534, not by serve" in refused.stderr and b"forged" not in refused.stdout
    finally:
        squatter.kill()
        squatter.wait()
    send(d.port, ["a@dest.example"])
    wait_until(lambda: as_nobody(d, readable, "queue", "list").returncode == 0, timeout=30)
    assert b"in 1 Request." in as_nobody(d, readable, "queue", "list").stdout


def test_garbage_and_silence_on_the_public_socket_cost_serve_nothing(daemon):
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    name = postqueue.address(d.queue_directory)
    with socket.socket(socket.AF_UNIX) as probe:  # bound by its own task, just after "daemon started"
        wait_until(lambda: probe.connect_ex(name) == 0)
    requests = [b"\n", b"{}\n", b"[1]\n", b'{"command": "list", "state": 5}\n', b'{"command": "flush", "ids": "x"}\n',
                b'{"command": "flush", "site": "../../etc"}\n', b"x" * (pickup.ENVELOPE_LIMIT + 10), b'{"command": "list"}']
    for request in requests:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(name)
            try:
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                answer = b"".join(iter(lambda: sock.recv(65536), b""))
            except ConnectionResetError:  # closed with the rest of an over-long request unread
                assert len(request) > pickup.ENVELOPE_LIMIT
                answer = b""
        assert answer == b"" or answer.startswith(b"error 64: "), (request, answer)
    silent = [socket.socket(socket.AF_UNIX) for _ in range(public.LIMIT + 4)]  # more than it answers at once
    try:
        for sock in silent:
            sock.settimeout(10)
            wait_until(lambda sock=sock: connected(sock, name), timeout=20)  # (a full backlog: EAGAIN)
        with socket.socket(socket.AF_UNIX) as sock:  # a real request still gets its answer
            sock.settimeout(20)
            wait_until(lambda: connected(sock, name), timeout=20)
            sock.sendall(b'{"command": "list", "json": true}\n')
            assert b"".join(iter(lambda: sock.recv(65536), b"")) == b"ok\n[]\n"
    finally:
        for sock in silent:
            sock.close()
    assert_serving(d)


def connected(sock: socket.socket, name: bytes) -> bool:
    try:
        sock.connect(name)
    except BlockingIOError:
        return False
    return True


AS_UID = """
import os, sys
import trimail.cli, trimail.cli.queue
os.setgroups([]); os.setgid(65533); os.setuid(65533)
trimail.cli.main(sys.argv[1:])
"""


@needs_root
def test_a_serve_in_the_chroot_jail_answers_on_the_name_users_know(tmp_path, background, jail, readable):  # noqa: F811
    """With ``chroot = yes`` serve's queue directory is ``/`` once it is in the jail;
    the public socket keeps the name made from main.cf's queue_directory, which is
    the one users' tools make.  The user here has a uid without a passwd entry
    (``uid:65533`` to the authorized_* lists)."""
    port = free_port()
    maillog = tmp_path / "maillog"
    serve = background(chroot_config(tmp_path, jail, port))
    wait_until(lambda: (maillog.exists() and "daemon started" in maillog.read_text()) or not serve.alive,
               timeout=30)
    assert serve.alive, maillog.read_text() if maillog.exists() else ""
    send(port, ["someone@far.example"])
    config = readable / "main.cf"
    config.write_text(f"queue_directory = {jail}\nmail_owner = nobody\n")
    config.chmod(0o644)
    listing = subprocess.run([sys.executable, "-c", AS_UID, "queue", "list", "-c", str(config)],
                             capture_output=True, timeout=60, cwd="/", check=False)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().endswith("in 1 Request.\n")


def test_a_deeply_nested_request_is_a_bad_request_not_a_mail_log_line(daemon):
    """Red team 34: '[' * 1000 made json.loads raise RecursionError, which the
    request's boundary logged as a failure: any local user wrote a warning line to
    the mail log (and a task failure to /metrics) per connection."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    with socket.socket(socket.AF_UNIX) as probe:  # bound by its own task, just after "daemon started"
        wait_until(lambda: probe.connect_ex(postqueue.address(d.queue_directory)) == 0)
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(postqueue.address(d.queue_directory))
            sock.sendall(b"[" * 1000 + b"\n")
            assert b"".join(iter(lambda: sock.recv(65536), b"")) == b"error 64: bad request\n"
    assert not [line for line in d.proc.log if "public request failed" in line]
    assert_serving(d)


def load_queue(queue_directory: Path, messages: int, recipients: int, prefix: str) -> None:
    """*messages* deferred messages of *recipients* recipients each, written straight
    into a running serve's queue (its queue manager is off): a big queue in seconds."""
    import time

    import apsw
    db = apsw.Connection(str(queue_directory / "queue.db"))
    db.execute("PRAGMA busy_timeout = 10000")
    now = time.time()
    with db:
        for m in range(messages):
            mid = f"{prefix}{m:010d}"
            db.execute("INSERT INTO message (id, state, sender, arrival_time, size, next_attempt)"
                       " VALUES (?, 'deferred', 's@x.example', ?, 1000, ?)", (mid, now, now + 3600))
            db.executemany("INSERT INTO recipient (message_id, seq, address, status, attempts, last_reply, next_attempt)"
                           " VALUES (?, ?, ?, 'deferred', 3, '4.2.2 mailbox full', ?)",
                           [(mid, i, f"user{i}@dom{m % 50}.example", now + 3600) for i in range(recipients)])
    db.close()


def peak_memory(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_a_listing_is_made_in_bounded_pieces(daemon):
    """Red team 34: a JSON listing was made 500 messages per thread hop, whole
    messages: with 1,000 recipients each one piece was ~70 MB, and 16 users who
    asked and did not read took serve to 1.5 GB (and SMTP waited on the GIL for
    minutes); a filter that kept nothing walked the whole queue in one hop, which a
    stop waits for.  Now a piece is at most about PIECE characters and a hop looks
    at most at SCAN messages."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    load_queue(d.queue_directory, 300, 1000, "0mBIG")
    before = peak_memory(d.proc.proc.pid)
    readers = []
    try:
        for _ in range(8):  # ask, and read nothing but the first bytes
            sock = socket.socket(socket.AF_UNIX)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(120)
            sock.connect(postqueue.address(d.queue_directory))
            sock.sendall(b'{"command": "list", "json": true}\n')
            readers.append(sock)
        for sock in readers:  # "ok" and the listing's first piece: it has been made
            first = b""
            while len(first) < 4:
                chunk = sock.recv(4 - len(first))
                assert chunk, first
                first += chunk
            assert first == b"ok\n["
        grown = peak_memory(d.proc.proc.pid) - before
        assert grown < 100 * 2**20, f"serve grew by {grown // 2**20} MiB for 8 listings"
    finally:
        for sock in readers:
            sock.close()
    assert_serving(d)

    from trimail import config as configuration  # a filter that keeps nothing: the hops still end
    load_queue(d.queue_directory, 3 * public.SCAN, 1, "0mSMALL")
    pieces = list(public._listing(d.queue_directory, configuration.load(d.config_path), 0,
                                  {"command": "list", "sender": "nobody@nowhere.example"}))
    assert b"".join(pieces) == b"ok\nMail queue is empty\n"
    assert len(pieces) >= 1 + (3 * public.SCAN + 300) // public.SCAN


def connect_as(uid: int, name: bytes) -> socket.socket:
    """A connection whose SO_PEERCRED says *uid* (taken at connect: the effective uid)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    os.seteuid(uid)
    try:
        sock.connect(name)
    finally:
        os.seteuid(0)
    return sock


def test_one_users_slow_readers_leave_room_for_the_others(daemon):
    """Red team 34: a user who asked for 16 listings and read them slowly held every
    slot of the public socket (each piece may take SEND_TIMEOUT): every other user's
    mailq and flush timed out, for as long as the listings lasted (hours at 100,000
    messages).  Now one user has at most PER_USER listings and flushes in progress;
    submissions are not counted (a script's parallel sendmails are all queued)."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    load_queue(d.queue_directory, 5000, 2, "0mSLOW")  # a listing of ~1 MB: more than the socket holds
    name = postqueue.address(d.queue_directory)
    with socket.socket(socket.AF_UNIX) as probe:
        wait_until(lambda: probe.connect_ex(name) == 0)
    slow = []
    try:
        for _ in range(public.LIMIT - 2):
            sock = connect_as(65534, name)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b'{"command": "list"}\n')
            slow.append(sock)
        for sock in slow[:public.PER_USER]:  # these are being answered, and are not read
            assert sock.recv(3) == b"ok\n"
        with connect_as(4242, name) as other:  # another user, within the client's 10 s
            other.sendall(b'{"command": "flush"}\n')
            assert b"".join(iter(lambda: other.recv(65536), b"")) == b"ok\n5000\n"
        refused = slow[-1].recv(200)
        assert refused == f"error 75: uid 65534 has {public.PER_USER} requests in progress\n".encode()
        with connect_as(65534, name) as submission:  # the same user's sendmail still gets through
            message = b"Subject: s\r\n\r\nbody\r\n"
            submission.sendall(json.dumps({"command": "submit", "sender": "me@x.example", "size": len(message),
                                           "recipients": ["a@dest.example"]}).encode() + b"\n" + message)
            assert b"".join(iter(lambda: submission.recv(65536), b"")).startswith(b"ok\n")
    finally:
        for sock in slow:
            sock.close()
    assert_serving(d)


def public_bound(queue_directory: Path) -> bool:
    """Whether a process has the public socket's name bound (/proc/net/unix lists
    an abstract name with a leading @)."""
    name = "@" + postqueue.address(queue_directory)[1:].decode()
    return any(line.split()[-1] == name for line in Path("/proc/net/unix").read_text().splitlines()[1:]
               if len(line.split()) == 8)


async def test_the_public_name_is_bound_before_serve_says_it_started(tmp_path):
    """Red team 34: serve logged "daemon started" (and told systemd it was ready) a
    moment before its task bound the public name, and a user's command at once was
    told serve was not running (1 run in 4 under load).  In one process: when
    ``serve`` reports that it started, the name is bound, before any other task ran."""
    from tests.conftest import write_main_cf
    from trimail import config as configuration
    from trimail.master import serve

    path = write_main_cf(tmp_path, smtpd_listen="127.0.0.1:0", master_service_disable="qmgr")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, configuration.load(path))
        assert public_bound(Path(server.config.queue_directory))
        server.stop()


def test_big_submissions_are_held_a_few_at_a_time(daemon):
    """Red team 34e: a submission is held in memory while it is queued (about three
    copies), and 16 users' 10 MB submissions at once took serve from 54 to 593 MB;
    with message_size_limit = 0 any user could have serve killed for memory.  Now at
    most pickup.BIG_AT_ONCE messages over pickup.BIG are read and queued at a time."""
    import threading

    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    name = postqueue.address(d.queue_directory)
    with socket.socket(socket.AF_UNIX) as probe:
        wait_until(lambda: probe.connect_ex(name) == 0)
    message = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8000  # 8 MB
    envelope = json.dumps({"command": "submit", "sender": "me@x.example", "size": len(message),
                           "recipients": ["a@dest.example"]}).encode() + b"\n"
    before = peak_memory(d.proc.proc.pid)
    answers: list[bytes] = []

    def submit() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(120)
            sock.connect(name)
            sock.sendall(envelope + message)
            answers.append(b"".join(iter(lambda: sock.recv(65536), b"")))

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(answers) == 12 and all(a.startswith(b"ok\n") for a in answers), answers
    grown = peak_memory(d.proc.proc.pid) - before
    assert grown < 200 * 2**20, f"serve grew by {grown // 2**20} MiB for 12 submissions of 8 MB"
    assert queued(d.queue_directory) == 12
