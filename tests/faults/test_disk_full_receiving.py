"""A full queue file system while receiving (issue 13, defect 6).

The queue directory is a real 4 MiB tmpfs.  Short of space, MAIL FROM gets
``452 4.3.1 Insufficient system storage`` (Postfix's queue_minfree rule); a big
message that fills the disk while it is spooled gets the same answer at the end
of DATA, with the session still in step (RSET, another message, QUIT).  When the
space comes back, mail is accepted again.  serve never stops answering.
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

from tests.faults.conftest import (
    NEEDS_TMPFS,
    assert_serving,
    banner,
    fill,
    integrity_ok,
    send,
    trimail_cmd,
    wait_until,
)
from trimail.queue.space import SPACE_CACHE_SECONDS

SMALL = b"Subject: small\r\n\r\n" + b"x" * 1000 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1024  # 1 MiB: past the in-memory spool limit

pytestmark = NEEDS_TMPFS


def queued_ids(config_path: Path) -> list[str]:
    import json

    result = trimail_cmd("queue", "list", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    return [message["id"] for message in json.loads(result.stdout or "[]")]


def command(client: smtplib.SMTP, line: str) -> tuple[int, str]:
    client.putcmd(line)
    code, text = client.getreply()
    return code, text.decode("utf-8", "replace")


def data(client: smtplib.SMTP, body: bytes) -> tuple[int, str]:
    code, text = command(client, "DATA")
    assert code == 354, text
    client.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    code, reply = client.getreply()
    return code, reply.decode("utf-8", "replace")


def test_mail_from_gets_452_when_the_queue_is_short_of_space_and_250_when_it_is_back(daemon, small_queue) -> None:
    # Postfix's rule: refuse MAIL unless free space > max(queue_minfree, 1.5 * message_size_limit)
    d = daemon(master_service_disable="qmgr", queue_directory=str(small_queue), message_size_limit=str(1 << 20))
    filler = fill(small_queue, leave=1 << 20)  # 1 MiB free < 1.5 MiB
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
        client.ehlo("client.example")
        for _ in range(2):  # a small message and a big one: both refused at MAIL
            code, text = command(client, "MAIL FROM:<alice@client.example>")
            assert (code, text) == (452, "4.3.1 Insufficient system storage")
        assert command(client, "RSET")[0] == 250  # the session is still usable
        assert command(client, "NOOP")[0] == 250
        assert command(client, "QUIT")[0] == 221
    assert_serving(d)
    d.proc.wait_log(r"not enough free space in mail queue")

    filler.unlink()
    freed = time.monotonic()

    def accepted() -> bool:  # the free space is cached for a second at most, by each smtpd worker
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("client.example")
            return client.mail("alice@client.example")[0] == 250

    wait_until(lambda: time.monotonic() - freed > SPACE_CACHE_SECONDS and accepted(), timeout=10)
    small = send(d.port, ["bob@example.net"], body=SMALL)
    big = send(d.port, ["bob@example.net"], body=BIG)
    assert {small, big} <= set(queued_ids(d.config_path))
    assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"


def test_disk_full_while_spooling_a_big_message_answers_452_at_end_of_data_and_the_session_goes_on(
        daemon, small_queue) -> None:
    # no size limit: MAIL passes while any space is left, so the spool file meets ENOSPC
    d = daemon(master_service_disable="qmgr", queue_directory=str(small_queue), message_size_limit="0")
    filler = fill(small_queue, leave=384 << 10)  # room for a small message, not for 1 MiB
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
        client.ehlo("client.example")
        assert command(client, "MAIL FROM:<alice@client.example>")[0] == 250
        assert command(client, "RCPT TO:<bob@example.net>")[0] == 250
        code, text = data(client, BIG)
        assert (code, text) == (452, "4.3.1 Insufficient system storage")
        # in step: the next commands get their own replies, and a small message goes through
        assert command(client, "RSET")[0] == 250
        assert command(client, "MAIL FROM:<alice@client.example>")[0] == 250
        assert command(client, "RCPT TO:<bob@example.net>")[0] == 250
        code, text = data(client, SMALL)
        assert code == 250, text
        small = text.rsplit(" ", 1)[1]
        assert command(client, "QUIT")[0] == 221
    assert_serving(d)
    assert queued_ids(d.config_path) == [small]
    assert not [p for p in small_queue.iterdir() if p.name.startswith("spool.")]

    filler.unlink()
    big = send(d.port, ["bob@example.net"], body=BIG)  # the space is back
    assert set(queued_ids(d.config_path)) == {small, big}
    assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"


def test_queue_commit_failing_for_lack_of_space_answers_4xx_and_mail_flows_again_after(daemon, small_queue) -> None:
    # the content fits in memory, but the database cannot grow to take it (SQLITE_FULL)
    d = daemon(master_service_disable="qmgr", queue_directory=str(small_queue), message_size_limit="0")
    before = send(d.port, ["bob@example.net"], body=SMALL)
    filler = fill(small_queue, leave=48 << 10)
    medium = b"Subject: medium\r\n\r\n" + (b"z" * 998 + b"\r\n") * 200  # 200 KB: stays in memory
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
        client.ehlo("client.example")
        assert command(client, "MAIL FROM:<alice@client.example>")[0] == 250
        assert command(client, "RCPT TO:<bob@example.net>")[0] == 250
        code, text = data(client, medium)
        assert code in (451, 452), text  # never 250: it is not in the queue
        assert command(client, "RSET")[0] == 250
        assert command(client, "QUIT")[0] == 221
    assert_serving(d)
    assert queued_ids(d.config_path) == [before]

    filler.unlink()
    after = send(d.port, ["bob@example.net"], body=medium)
    assert set(queued_ids(d.config_path)) == {before, after}
    assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"


def test_disk_full_in_a_bdat_chunk_answers_452_after_that_chunk_and_drops_the_rest(daemon, small_queue) -> None:
    # BDAT (RFC 3030): the chunk whose content could not be spooled is answered at its end,
    # as Postfix answers a cleanup write error there; later chunks are dropped until LAST
    host = "127.0.102.3"
    d = daemon(master_service_disable="qmgr", queue_directory=str(small_queue), message_size_limit="0",
               smtpd_listen=f"{host}:0")
    filler = fill(small_queue, leave=384 << 10)
    with smtplib.SMTP(host, d.port, timeout=30) as client:
        client.ehlo("client.example")
        assert "chunking" in client.esmtp_features
        assert command(client, "MAIL FROM:<alice@client.example>")[0] == 250
        assert command(client, "RCPT TO:<bob@example.net>")[0] == 250
        client.send(b"BDAT %d\r\n" % len(BIG) + BIG + b"BDAT 5 LAST\r\nlast.")
        assert client.getreply() == (452, b"4.3.1 Insufficient system storage")
        assert client.getreply() == (551, b"5.0.0 Discarded 5 bytes after earlier error")
        assert command(client, "MAIL FROM:<alice@client.example>")[0] == 250  # LAST ended the transaction
        assert command(client, "RCPT TO:<bob@example.net>")[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(SMALL) + SMALL)
        code, text = client.getreply()
        assert code == 250, text
        small = text.decode().rsplit(" ", 1)[1]
        assert command(client, "QUIT")[0] == 221
    assert d.alive and banner(d.port, host).startswith("220 ")
    assert queued_ids(d.config_path) == [small]
    assert not [p for p in small_queue.iterdir() if p.name.startswith("spool.")]
    filler.unlink()
