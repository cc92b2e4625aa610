"""Red team 33b: ``trimail sendmail`` run by a user who may not write the queue
submits over SMTP to serve's loopback listener (cleanup/fallback.py).  smtplib's
``sendmail()`` returns the recipients serve refused and goes on, and sendmail then
exited 0: the refused recipients were lost without a word, 4xx ones included, and
with more recipients than ``smtpd_recipient_limit`` the rest vanished.  Now it is
all or nothing, and a temporary condition (serve down, a 4xx) exits 75
(EX_TEMPFAIL), so a caller that retries on it does.

The user is ``nobody``: the test's interpreter imports sendmail's modules as root,
then takes nobody's ids (the interpreter's own files may be out of nobody's reach)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import queued, wait_until
from tests.peers import Sink

SINK_HOST = "127.0.0.83"
RESTRICTIONS = "check_recipient_access inline:{ blocked.example=REJECT, tmp.example=DEFER }, permit_mynetworks, reject"
AS_NOBODY = """
import os, sys
import encodings.idna, trimail.cleanup.fallback, trimail.standalone, trimail.cleanup.submit as submit
os.setgroups([]); os.setgid(65534); os.setuid(65534)
submit.main(sys.argv[1:])
"""


@pytest.fixture
def readable() -> Iterator[Path]:
    """A directory nobody can read, for the main.cf sendmail reads as nobody."""
    with tempfile.TemporaryDirectory(prefix="trimail-t33-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def sendmail_as_nobody(d, readable: Path, *args: str, port: int | None = None, host: str = "127.0.0.1",
                       data: bytes = b"Subject: local\n\nhello\n", extra: str = "") -> subprocess.CompletedProcess:
    config = readable / "main.cf"
    config.write_text(f"myhostname = mx.test.example\nsmtpd_listen = {host}:{port or d.port}\n"
                      f"queue_directory = {d.queue_directory}\nalias_maps =\nalias_database =\n{extra}")
    config.chmod(0o644)
    return subprocess.run([sys.executable, "-c", AS_NOBODY, "-C", str(config), "-f", "me@mx.test.example", *args],
                          input=data, capture_output=True, timeout=60, cwd="/",
                          check=False)


def test_a_refused_recipient_sends_nothing_and_says_so(daemon, readable):
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", master_service_disable="",
                   smtpd_recipient_restrictions=RESTRICTIONS)
        permanent = sendmail_as_nobody(d, readable, "ok@dest.example", "u@blocked.example", "v@tmp.example")
        assert permanent.returncode == 69, permanent.stderr  # EX_UNAVAILABLE: a 5xx among the refusals
        said = permanent.stderr.decode()
        assert "nothing was sent" in said and "<u@blocked.example>: 554" in said and "<v@tmp.example>: 450" in said
        temporary = sendmail_as_nobody(d, readable, "ok@dest.example", "v@tmp.example")
        assert temporary.returncode == 75, temporary.stderr  # EX_TEMPFAIL: only 4xx
        accepted = sendmail_as_nobody(d, readable, "ok@dest.example", "also@dest.example")
        assert accepted.returncode == 0, accepted.stderr
        wait_until(lambda: queued(d.queue_directory) == 0 and len(sink.messages) == 1, timeout=30)
        [(_, recipients, _)] = sink.messages  # only the message sendmail said was sent
        assert sorted(recipients) == ["also@dest.example", "ok@dest.example"]


def test_a_users_mail_is_expanded_by_serve_through_tables_the_user_may_not_read(daemon, readable, tmp_path):
    """A user's sendmail read virtual_alias_maps itself before it went to serve, and
    a table only root and mail_owner may read (tmp_path is root's, 0700) made it exit
    1: the message was not sent.  serve expands the aliases of what it receives."""
    table = tmp_path / "virtual"
    table.write_text("alias@dest.example real@dest.example\n")
    table.chmod(0o600)
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", master_service_disable="",
                   virtual_alias_maps=f"texthash:{table}")
        result = sendmail_as_nobody(d, readable, "alias@dest.example",
                                    extra=f"virtual_alias_maps = texthash:{table}\n")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: queued(d.queue_directory) == 0 and len(sink.messages) == 1, timeout=30)
        [(_, recipients, _)] = sink.messages
        assert recipients == ["real@dest.example"]


def test_recipients_past_smtpd_recipient_limit_are_not_lost(daemon, readable):
    d = daemon(smtpd_workers=0, smtpd_recipient_limit=3)
    result = sendmail_as_nobody(d, readable, *[f"r{n}@dest.example" for n in range(5)])
    # 452 4.5.3 would come again at every try: 69, not 75 (red team 33c: retried for ever)
    assert result.returncode == 69, result.stderr
    assert "<r3@dest.example>: 452" in result.stderr.decode() and "send it in parts" in result.stderr.decode()
    assert queued(d.queue_directory) == 0


def test_serve_not_running_is_a_temporary_failure(daemon, readable):
    d = daemon(smtpd_workers=0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # a port nobody listens on
        result = sendmail_as_nobody(d, readable, "a@dest.example", port=unused.getsockname()[1])
    assert result.returncode == 75, result.stderr
    assert "cannot submit over SMTP" in result.stderr.decode()


def test_a_queue_opened_wide_by_an_admin_still_takes_a_users_mail_through_serve(readable, daemon):
    """Red team 33b: sendmail fell back to SMTP only when the queue's error said
    "permission"; after ``chmod 755`` of the queue directory and ``644`` of its files
    (an admin giving users mailq) the tightening chmod failed with EPERM and every
    user's sendmail exited 1.  A user other than root and mail_owner never writes
    the queue, whatever its modes."""
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", master_service_disable="",
                   queue_directory=readable / "queue")  # (where nobody can reach it)
        d.queue_directory.chmod(0o755)
        for name in ("queue.db", "queue.db-wal", "queue.db-shm"):
            if (d.queue_directory / name).exists():
                (d.queue_directory / name).chmod(0o644)
        result = sendmail_as_nobody(d, readable, "ok@dest.example")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(sink.messages) == 1, timeout=30)


SQUATTER = """
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
if sys.argv[1] == "4":
    listener = socket.create_server(("127.0.0.1", 0))
else:  # an IPv6 socket that takes IPv4 connections too: its end is in /proc/net/tcp6
    listener = socket.socket(socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::ffff:127.0.0.1", 0))
    listener.listen()
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    conn.sendall(b"220 squatter ESMTP\\r\\n")
    seen = b""
    while data := conn.recv(65536):
        seen += data
        for line in data.split(b"\\r\\n")[:-1]:
            conn.sendall(b"354 go on\\r\\n" if line.upper() == b"DATA" else b"250 ok\\r\\n")
        if b"\\r\\n.\\r\\n" in seen:
            sys.stdout.write("GOT MAIL\\n"); sys.stdout.flush()
    conn.close()
"""


@pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6-socket"])
def test_a_listener_that_is_not_serves_gets_no_mail(daemon, readable, family):
    """Red team 33b: with serve's port above 1023, a user who bound it while serve was
    down received other users' mail, and their sendmail exited 0.  A listener whose
    end of the connection belongs to another uid than root's or the queue's gets
    nothing, and sendmail says try again later (75)."""
    d = daemon(smtpd_workers=0)
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, family], stdout=subprocess.PIPE, text=True)
    try:
        port = int(squatter.stdout.readline())
        result = sendmail_as_nobody(d, readable, "a@dest.example", port=port)
        assert result.returncode == 75, result.stderr
        assert b"is not serve (its socket belongs to uid 65534)" in result.stderr, result.stderr
    finally:
        squatter.kill()
        rest, _ = squatter.communicate(timeout=10)
    assert "GOT MAIL" not in rest


def test_a_message_serve_accepted_is_sent_even_if_its_quit_is_refused(daemon, readable):
    """smtplib's ``with`` raised when QUIT got no 221, after DATA's 250: sendmail said
    "try again later" (75) for a message serve had taken, and a caller that retried
    sent it twice.  Played here by a root-owned listener that answers QUIT with 421."""
    d = daemon(smtpd_workers=0)
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 fake ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    got.append(b"".join(iter(lines.readline, b".\r\n")))
                    conn.sendall(b"250 2.0.0 queued\r\n")
                    lines.readline()  # QUIT, answered as a server going down answers it
                    conn.sendall(b"421 4.3.0 shutting down\r\n")
                    return
                conn.sendall(b"250 ok\r\n")

    server = threading.Thread(target=serve_once)
    server.start()
    try:
        result = sendmail_as_nobody(d, readable, "a@dest.example", port=listener.getsockname()[1])
    finally:
        server.join(30)
        listener.close()
    assert len(got) == 1 and result.returncode == 0, result.stderr


def test_bs_answers_a_refusal_for_good_with_a_permanent_reply(daemon, readable):
    """Red team 33c: ``sendmail -bs`` answered every failure of the submission through
    serve with ``451`` (try again), a refusal for good too."""
    d = daemon(smtpd_workers=0, smtpd_recipient_restrictions=RESTRICTIONS)
    session = (b"EHLO me.example\r\nMAIL FROM:<me@mx.test.example>\r\nRCPT TO:<u@blocked.example>\r\n"
               b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    result = sendmail_as_nobody(d, readable, "-bs", data=session)
    replies = result.stdout.decode().splitlines()
    assert any(line.startswith("554 5.0.0 Error: serve at") for line in replies), (replies, result.stderr)


def test_a_serve_listening_on_the_ipv6_wildcard_takes_a_users_mail(daemon, readable):
    """Red team 33e: the fallback dialled 127.0.0.1 for ``[::]``, where serve's IPv6-only
    socket is not: every user's sendmail failed, and another user could take that port."""
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", master_service_disable="",
                   smtpd_listen="[::]:0")
        result = sendmail_as_nobody(d, readable, "ok@dest.example", host="[::]")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(sink.messages) == 1, timeout=30)
