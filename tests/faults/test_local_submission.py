"""``trimail sendmail`` run by a user who may not write the queue: serve takes the
message on its public socket and queues it (cleanup/pickup.py), as Postfix's
postdrop and pickup do, with the uid it sees (``SO_PEERCRED``) in the
``Received:`` line and the log, serve's tables, and none of smtpd's restrictions
or limits.  Exit 0 only once serve has queued it; 75 (EX_TEMPFAIL) when serve is
not running, or when what holds the public socket's name is not serve.

History: red team 33b found this path, then over SMTP, losing refused recipients
with exit 0 and handing other users' mail to whoever bound serve's port.

The user is ``nobody``: the test's interpreter imports sendmail's modules as root,
then takes nobody's ids (the interpreter's own files may be out of nobody's reach)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from tests.faults.conftest import queued, wait_until
from tests.peers import Sink
from trimail.postqueue import address

SINK_HOST = "127.0.0.83"
RESTRICTIONS = "check_recipient_access inline:{ blocked.example=REJECT, tmp.example=DEFER }, permit_mynetworks, reject"
AS_NOBODY = """
import os, sys
import encodings.idna, trimail.postqueue, trimail.standalone, trimail.cleanup.submit as submit
os.setgroups([]); os.setgid(65534); os.setuid(65534)
submit.main(sys.argv[1:])
"""


@pytest.fixture
def readable() -> Iterator[Path]:
    """A directory nobody can read, for the main.cf sendmail reads as nobody."""
    with tempfile.TemporaryDirectory(prefix="trimail-t33-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


def sendmail_as_nobody(d, readable: Path, *args: str, data: bytes = b"Subject: local\n\nhello\n",
                       extra: str = "") -> subprocess.CompletedProcess:
    config = readable / "main.cf"
    config.write_text(f"myhostname = mx.test.example\nqueue_directory = {d.queue_directory}\n"
                      f"alias_maps =\nalias_database =\n{extra}")
    config.chmod(0o644)
    return subprocess.run([sys.executable, "-c", AS_NOBODY, "-C", str(config), "-f", "me@mx.test.example", *args],
                          input=data, capture_output=True, timeout=60, cwd="/",
                          check=False)


def test_a_users_message_is_queued_by_serve_with_the_uid_it_sees(daemon, readable):
    """As Postfix's pickup: serve's own ``Received:`` with the uid from the socket
    (sendmail's own line is not sent), ``uid=N from=<...>`` in the log, and no smtpd
    restriction or smtpd_recipient_limit for a local submission."""
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", master_service_disable="",
                   smtpd_recipient_restrictions=RESTRICTIONS, smtpd_recipient_limit=2)
        result = sendmail_as_nobody(d, readable, "ok@dest.example", "u@blocked.example", "v@tmp.example")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: queued(d.queue_directory) == 0 and len(sink.messages) == 1, timeout=30)
        [(_, recipients, content)] = sink.messages
        assert sorted(recipients) == ["ok@dest.example", "u@blocked.example", "v@tmp.example"]
        received = [line for line in content.split(b"\r\n") if b"from userid" in line]
        assert len(received) == 1 and received[0].endswith(b"(trimail, from userid 65534)"), content[:400]
        wait_until(lambda: any("uid=65534 from=<me@mx.test.example>" in line for line in d.proc.log))


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


def test_serve_not_running_is_a_temporary_failure(daemon, readable, tmp_path):
    d = daemon(smtpd_workers=0)
    config = readable / "main.cf"  # a queue no serve runs for
    result = sendmail_as_nobody(d, readable, "a@dest.example", extra=f"queue_directory = {tmp_path / 'other'}\n")
    assert config.exists() and result.returncode == 75, result.stderr
    assert "serve is not running" in result.stderr.decode()


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
listener = socket.socket(socket.AF_UNIX)
listener.bind(bytes.fromhex(sys.argv[1]))
listener.listen()
print("bound", flush=True)
while True:
    conn, _ = listener.accept()
    conn.settimeout(5)
    try:
        while data := conn.recv(65536):
            sys.stdout.write("GOT " + str(len(data)) + "\\n"); sys.stdout.flush()
    except OSError:
        pass
    conn.close()
"""


def test_a_process_holding_the_public_name_gets_no_mail(daemon, readable, tmp_path):
    """A user who bound the public socket's name before serve gets nothing of another
    user's mail, and that user's sendmail says try again later (75)."""
    queue_directory = tmp_path / "queue"
    squatter = subprocess.Popen([sys.executable, "-c", SQUATTER, address(queue_directory).hex()],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert squatter.stdout.readline() == "bound\n"
        d = daemon(smtpd_workers=0, queue_directory=queue_directory)
        result = sendmail_as_nobody(d, readable, "a@dest.example")
        assert result.returncode == 75, result.stderr
        assert b"held by uid 65534, not by serve" in result.stderr, result.stderr
    finally:
        squatter.kill()
        rest, _ = squatter.communicate(timeout=10)
    assert "GOT" not in rest


def test_bs_answers_a_refusal_for_good_with_a_permanent_reply(daemon, readable, tmp_path):
    """Red team 33c: ``sendmail -bs`` answered every failure of the submission through
    serve with ``451`` (try again), a refusal for good too: here serve's own
    virtual_alias_maps, deeper than it follows."""
    table = tmp_path / "virtual"
    table.write_text("".join(f"a{n}@dest.example a{n + 1}@dest.example\n" for n in range(120)))
    table.chmod(0o600)
    d = daemon(smtpd_workers=0, virtual_alias_maps=f"texthash:{table}")
    session = (b"EHLO me.example\r\nMAIL FROM:<me@mx.test.example>\r\nRCPT TO:<a0@dest.example>\r\n"
               b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    result = sendmail_as_nobody(d, readable, "-bs", data=session)
    replies = result.stdout.decode().splitlines()
    assert any(line.startswith("554 5.0.0 Error: serve did not queue") for line in replies), (replies, result.stderr)
    assert queued(d.queue_directory) == 0


@pytest.mark.parametrize("size", [20, 5 << 20], ids=["small", "5MiB"])
def test_a_user_authorized_submit_users_leaves_out_is_refused_by_serve(daemon, readable, size):
    """Postfix's authorized_submit_users (postdrop's check, here serve's pickup): the
    user's sendmail exits 77 with Postfix's text and nothing is queued; serve refuses
    before it reads the message, and sendmail still gets the answer when serve did
    not take a 5 MiB one."""
    d = daemon(smtpd_workers=0, authorized_submit_users="!nobody, static:anyone")
    result = sendmail_as_nobody(d, readable, "you@dest.example", data=b"Subject: x\n\n" + b"y" * size + b"\n")
    assert result.returncode == 77, result.stderr
    assert result.stderr.decode().strip() == "sendmail: fatal: User nobody(65534) is not allowed to submit mail"
    session = b"HELO me.example\r\nMAIL FROM:<me@mx.test.example>\r\nRCPT TO:<you@dest.example>\r\nDATA\r\nx\r\n.\r\n"
    replies = sendmail_as_nobody(d, readable, "-bs", data=session).stdout.decode().splitlines()
    assert "554 5.0.0 Error: User nobody(65534) is not allowed to submit mail" in replies, replies
    assert queued(d.queue_directory) == 0
    # in the mail log, as Postfix's postdrop logs it: once a minute per user, however often asked
    wait_until(lambda: any("warning: User nobody(65534) is not allowed to submit mail" in line
                           for line in d.proc.log))
    assert sum("is not allowed to submit mail" in line for line in d.proc.log) == 1


def test_root_is_not_exempt_from_authorized_submit_users(tmp_path):
    """As Postfix's sendmail, which exempts no one: root's sendmail writes the queue
    itself, so it judges the list itself, before it reads the message (red team 35a:
    it read the whole message first, and ``-bs`` answered 554 per message)."""
    from tests.conftest import write_main_cf

    def sendmail(users: str, *args: str, stdin=None) -> subprocess.CompletedProcess:
        config_path = write_main_cf(tmp_path, authorized_submit_users=users)
        return subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), *args],
                              input=None if stdin is not None else b"Subject: x\n\nhi\n", stdin=stdin,
                              capture_output=True, timeout=60, check=False)

    reading, writing = os.pipe()  # a message that never ends: the refusal must not wait for it
    try:
        for args in (["you@dest.example"], ["-bs"]):
            refused = sendmail("!root, static:anyone", *args, stdin=reading)
            assert refused.returncode == 77, (args, refused.stdout)
            assert refused.stderr.decode().strip() == "sendmail: fatal: User root(0) is not allowed to submit mail"
    finally:
        os.close(reading)
        os.close(writing)
    assert not (tmp_path / "queue" / "queue.db").exists() or queued(tmp_path / "queue") == 0
    assert sendmail("static:anyone", "you@dest.example").returncode == 0
    assert queued(tmp_path / "queue") == 1


def test_a_users_envelope_cannot_get_past_the_duplicate_filter(daemon, readable):
    """Red team 35a: a user's sendmail has no recipient limit, and the duplicate
    filter remembers duplicate_filter_limit (1000) addresses, as Postfix's: 1,000
    other addresses first, then one mailbox 5,000 times, queued 5,000 copies for it.
    serve's pickup remembers every address of the envelope (already in memory)."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")  # the queue as pickup left it
    fillers = [f"f{n}@dest.example" for n in range(1000)]
    result = sendmail_as_nobody(d, readable, *fillers, *["victim@dest.example"] * 50)
    assert result.returncode == 0, result.stderr
    db = apsw.Connection(str(d.queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = db.execute("SELECT address, count(*) FROM recipient GROUP BY address HAVING count(*) > 1").fetchall()
        total = db.execute("SELECT count(*) FROM recipient").fetchone()[0]
    finally:
        db.close()
    assert rows == [] and total == 1001


def test_serve_applies_header_checks_to_a_users_submission_and_logs_from_local(daemon, readable, tmp_path):
    """As Postfix's cleanup checks mail from pickup (trimail/cleanup/inspection.py): the
    user's sendmail reports the REJECT (exit 69), nothing is queued, and serve logs it
    as cleanup does (``from local;``)."""
    (tmp_path / "hc").write_text("/^Subject: .*forbidden/ REJECT 5.7.1 Not this subject\n")
    d = daemon(smtpd_workers=0, master_service_disable="qmgr", header_checks=f"regexp:{tmp_path / 'hc'}")
    result = sendmail_as_nobody(d, readable, "bob@remote.example", data=b"Subject: a forbidden thing\n\nhi\n")
    assert result.returncode == 69, result.stderr
    assert b"5.7.1 Not this subject" in result.stderr
    assert queued(d.queue_directory) == 0
    wait_until(lambda: any("reject: header Subject: a forbidden thing from local; from=<me@mx.test.example> "
                           "to=<bob@remote.example>: 5.7.1 Not this subject" in line for line in d.proc.log))


def test_serve_writes_the_log_lines_of_roots_submission_when_it_picks_it_up(daemon, tmp_path):
    """Root's sendmail writes the queue itself and has no mail log: pickup's ``uid=0``
    line, cleanup's header_checks lines and its ``message-id=`` come from serve's
    queue manager when it takes the message from maildrop (cleanup/loglines.py), as
    Postfix's pickup and cleanup write them then; a message the checks held goes to
    hold at that moment, with its lines.  Before, none of these lines was written."""
    (tmp_path / "hc").write_text("/^Subject: watch me/ WARN watched\n/^Subject: hold me/ HOLD held here\n")
    with Sink(SINK_HOST) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", header_checks=f"regexp:{tmp_path / 'hc'}")
        for subject in (b"watch me", b"hold me"):
            result = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-C", str(d.config_path),
                                     "-f", "alice@mx.test.example", "bob@dest.example"],
                                    input=b"Subject: " + subject + b"\nMessage-ID: <" + subject.replace(b" ", b"-")
                                    + b"@mx.test.example>\n\nhello\n", capture_output=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr
        wait_until(lambda: len(sink.messages) == 1 and queued(d.queue_directory) == 1, timeout=30)
        wanted = ["uid=0 from=<alice@mx.test.example>",
                  "warning: header Subject: watch me from local; from=<alice@mx.test.example> "
                  "to=<bob@dest.example>: watched", "message-id=<watch-me@mx.test.example>",
                  "hold: header Subject: hold me from local; from=<alice@mx.test.example> "
                  "to=<bob@dest.example>: held here", "message-id=<hold-me@mx.test.example>"]
        wait_until(lambda: all(any(text in line for line in d.proc.log) for text in wanted))
        assert sum("uid=0 from=<alice@mx.test.example>" in line for line in d.proc.log) == 2  # once each
        state = apsw.Connection(str(d.queue_directory / "queue.db")).execute("SELECT state FROM message").fetchall()
        assert state == [("hold",)]


def test_a_message_roots_sendmail_cannot_sign_reaches_serve_as_it_was_submitted(daemon, tmp_path):
    """Root's sendmail hands a message it cannot sign (a key it cannot read) to serve,
    which checks and signs it itself: serve must get the submission as it was.  It
    got the message with sendmail's header_checks already applied (a PREPEND twice)
    and sendmail's own ``Received:`` line beside serve's (red team 37's side note)."""
    keys = tmp_path / "keys"
    keys.mkdir()
    made = subprocess.run([sys.executable, "-m", "trimail", "dkim", "keygen", "mx.test.example", "s1", "--type",
                           "ed25519", "--directory", str(keys)], capture_output=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    (tmp_path / "signing").write_text("mx.test.example  s1._domainkey.mx.test.example\n")
    (tmp_path / "keys.table").write_text(f"s1._domainkey.mx.test.example  mx.test.example:s1:{keys}/s1.private\n")
    (tmp_path / "keys.broken").write_text(f"s1._domainkey.mx.test.example  mx.test.example:s1:{keys}/gone.private\n")
    (tmp_path / "hc").write_text("/^Subject: tag me/ PREPEND X-Tagged: yes\n")
    d = daemon(smtpd_workers=0, master_service_disable="qmgr", header_checks=f"regexp:{tmp_path / 'hc'}",
               dkim_signing_table=f"texthash:{tmp_path / 'signing'}", dkim_key_table=f"texthash:{tmp_path / 'keys.table'}")
    sent = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-C", str(d.config_path),
                           "-o", f"dkim_key_table=texthash:{tmp_path / 'keys.broken'}", "-f", "alice@mx.test.example",
                           "bob@remote.example"], input=b"From: alice@mx.test.example\nSubject: tag me\n\nhello\n",
                          capture_output=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    assert b"submitting it through serve" in sent.stderr
    db = apsw.Connection(str(d.queue_directory / "queue.db"))
    [(content,)] = db.execute("SELECT content FROM body").fetchall()
    header = bytes(content).split(b"\r\n\r\n")[0]
    assert header.count(b"X-Tagged: yes") == 1, header
    assert header.count(b"\r\nReceived: ") + header.startswith(b"Received: ") == 1, header
    assert b"(trimail, from userid 0)" in header and b"DKIM-Signature:" in header
