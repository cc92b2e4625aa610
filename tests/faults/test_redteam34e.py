"""Red team 34e: a user's submission through serve's public socket (cleanup/pickup.py)
that serve has queued is answered ``ok`` whatever happens to its connection's slot:
a newcomer's eviction and serve's stop used to cut the answer off after the commit,
so the user's sendmail exited 75 (try again) for a message already in the queue,
and a retry queued it twice.

The submission is held in a non_smtpd_milter (a thread here) at the end of the
message until the test has done what it does to serve, then let go."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import apsw
import pytest

from tests.faults.conftest import queued, wait_until
from tests.faults.test_local_submission import AS_NOBODY, readable, sendmail_as_nobody  # noqa: F401 (a fixture)
from trimail.postqueue import address

HOST = "127.0.34.66"
SMTP = "127.0.34.67"
MILTER_PORT, SMTP_PORT = 45020, 45021


class HeldMilter:
    """A milter that holds each message at its end until ``release`` is set."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, MILTER_PORT))
        self.port = self.listener.getsockname()[1]
        self.holding, self.release = threading.Event(), threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        def frame(command: bytes, data: bytes = b"") -> bytes:
            return struct.pack(">I", len(data) + 1) + command + data

        with conn, conn.makefile("rb") as reader:
            while header := reader.read(4):
                packet = reader.read(struct.unpack(">I", header)[0])
                command = packet[:1]
                if command == b"O":
                    conn.sendall(frame(b"O", struct.pack(">III", 6, 0x1FF, 0)))
                elif command == b"E":
                    self.holding.set()
                    self.release.wait(60)
                    conn.sendall(frame(b"c"))
                elif command == b"Q":
                    return
                elif command not in (b"D", b"A"):
                    conn.sendall(frame(b"c"))


@pytest.fixture
def milter() -> Iterator[HeldMilter]:
    held = HeldMilter()
    yield held
    held.release.set()
    held.listener.shutdown(socket.SHUT_RDWR)  # (wakes its accept: the port is free again)
    held.listener.close()


def submit_in_background(d, readable) -> tuple[threading.Thread, list]:  # noqa: F811
    result: list = []
    thread = threading.Thread(target=lambda: result.append(sendmail_as_nobody(d, readable, "a@dest.example")))
    thread.start()
    return thread, result


@pytest.mark.parametrize("workers", [0, 2])
def test_a_newcomer_does_not_cut_off_the_answer_of_a_queued_submission(daemon, readable, milter,  # noqa: F811
                                                                       workers):
    """Every slot taken: a newcomer cut off the oldest connection still counted as
    sending its request, and a submission was counted so until it was queued."""
    d = daemon(smtpd_workers=workers, smtpd_listen=f"{SMTP}:{SMTP_PORT}",
               non_smtpd_milters=f"inet:{HOST}:{milter.port}")
    thread, result = submit_in_background(d, readable)
    assert milter.holding.wait(30)
    hogs = []
    try:
        for _ in range(17):  # every slot, and newcomers waiting for one: one is taken from the oldest
            hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            hogs.append(hog)
            wait_until(lambda: hog.connect_ex(address(d.queue_directory)) == 0)  # (EAGAIN: the backlog is full)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:  # answered: evictions have been made
            wait_until(lambda: probe.connect_ex(address(d.queue_directory)) == 0)
            probe.settimeout(30)
            probe.sendall(json.dumps({"command": "list"}).encode() + b"\n")
            assert probe.recv(100).startswith(b"ok\n")
        milter.release.set()
        thread.join(60)
    finally:
        for hog in hogs:
            hog.close()
    assert result[0].returncode == 0, result[0].stderr
    assert queued(d.queue_directory) == 1


def test_a_submission_queued_as_serve_stops_is_answered(daemon, readable, milter):  # noqa: F811
    d = daemon(smtpd_workers=0, smtpd_listen=f"{SMTP}:{SMTP_PORT}", non_smtpd_milters=f"inet:{HOST}:{milter.port}")
    thread, result = submit_in_background(d, readable)
    assert milter.holding.wait(30)
    d.proc.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:  # serve is stopping: it no longer accepts connections
        try:
            socket.create_connection((SMTP, SMTP_PORT), timeout=1).close()
        except OSError:
            return True
        return False

    wait_until(refused)
    milter.release.set()
    thread.join(60)
    d.proc.proc.wait(30)
    assert result[0].returncode == 0, result[0].stderr
    assert queued(d.queue_directory) == 1



def test_sendmail_waits_for_a_slow_milter_of_serves(daemon, readable, milter):  # noqa: F811
    """sendmail waited 60 s for serve's answer, a milter may take milter_content_timeout
    (300 s) at the end of the message: sendmail exited 75 and serve queued the message.
    Here sendmail's own wait is 2 s and the milter holds the message until sendmail
    has exited or 5 s have passed."""
    d = daemon(smtpd_workers=0, smtpd_listen=f"{SMTP}:{SMTP_PORT}", non_smtpd_milters=f"inet:{HOST}:{milter.port}")
    config = readable / "main.cf"
    config.write_text(f"myhostname = mx.test.example\nqueue_directory = {d.queue_directory}\n"
                      f"alias_maps =\nalias_database =\nnon_smtpd_milters = inet:{HOST}:{milter.port}\n")
    config.chmod(0o644)
    script = AS_NOBODY.replace("os.setgroups", "trimail.postqueue.ask.__kwdefaults__['timeout'] = 2.0\nos.setgroups")
    sendmail = subprocess.Popen([sys.executable, "-c", script, "-C", str(config), "a@dest.example"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    try:
        sendmail.stdin.write(b"Subject: slow\n\nhi\n")
        sendmail.stdin.close()
        assert milter.holding.wait(30)
        try:
            sendmail.wait(5)  # (the milter's time at the end of the message, not a synchronisation)
        except subprocess.TimeoutExpired:
            pass
        milter.release.set()
        status = sendmail.wait(60)
    finally:
        if sendmail.poll() is None:
            sendmail.kill()
            sendmail.wait()
    wait_until(lambda: queued(d.queue_directory) == 1)
    assert status == 0, sendmail.stderr.read()


def test_serve_qualifies_what_the_socket_brings(daemon):
    """A user who speaks the public socket's protocol without sendmail had bare names
    (``root``) queued as they came, as envelope sender and recipient: sendmail
    qualifies them (user@$myorigin, Postfix's cleanup), so serve does too."""
    d = daemon(smtpd_workers=0, smtpd_listen=f"{SMTP}:{SMTP_PORT}")
    body = b"Subject: bare\r\n\r\nhi\r\n"
    request = {"command": "submit", "sender": "root", "recipients": ["postmaster", "a@dest.example"],
               "size": len(body), "params": {}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address(d.queue_directory))
        sock.sendall(json.dumps(request).encode() + b"\n" + body)
        assert sock.recv(100).startswith(b"ok\n")
    db = apsw.Connection(str(d.queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        senders = [row[0] for row in db.execute("SELECT sender FROM message")]
        recipients = sorted(row[0] for row in db.execute("SELECT address FROM recipient"))
    finally:
        db.close()
    assert senders == ["root@mx.test.example"]
    assert recipients == ["a@dest.example", "postmaster@mx.test.example"]
