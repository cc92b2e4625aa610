"""sendmail(1) compatibility: -bs, -bv, -bp, -q, -bi, -R and the full name from the
password entry, each through a real ``python -m trimail sendmail`` process."""

from __future__ import annotations

import email
import email.policy
import functools
import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import trio

from tests.conftest import trimail, wait_for, write_main_cf
from tests.peers import Sink
from trimail.cleanup.submit import gecos_name
from trimail.queue.store import Store

HOST = "127.0.44.1"  # this module's loopback addresses
SINK = "127.0.44.2"


def sendmail(config_path: Path, *args: str, data: bytes = b"", env: dict[str, str] | None = None):
    environment = {k: v for k, v in os.environ.items() if k != "NAME"}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), *args],
                          input=data, capture_output=True, timeout=60, env=environment, check=False)


def listed(config_path: Path) -> list[dict]:
    return json.loads(trimail("queue", "list", "--json", "-c", str(config_path)).stdout)


def content_of(config_path: Path, queue_id: str) -> bytes:
    store = Store.open(Path(config_path).parent / "queue", readonly=True)
    try:
        return store.read_content(queue_id)
    finally:
        store.close()


def config(tmp_path: Path, **params) -> Path:
    settings = {"smtpd_listen": f"{HOST}:0", "myorigin": "origin.example", "alias_maps": "", "alias_database": ""}
    return write_main_cf(tmp_path, **{**settings, **params})


# -- -bs ---------------------------------------------------------------------


def test_bs_is_an_smtp_session_on_stdin_that_queues_like_sendmail(tmp_path):
    config_path = config(tmp_path)
    session = (b"EHLO me.example\r\nMAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@far.example>\r\n"
               b"RCPT TO:<carol@far.example>\r\nDATA\r\n"  # pipelined, as a PIPELINING client may
               b"Subject: stand-alone\r\n\r\nline one\r\n..dot-stuffed\r\n.\r\nQUIT\r\n")
    result = sendmail(config_path, "-bs", data=session)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert replies[0] == "220 mx.test.example ESMTP trimail"
    assert "250-PIPELINING" in replies and "250-8BITMIME" in replies
    assert not any("STARTTLS" in r or "AUTH" in r for r in replies)  # no network, no TLS, no login
    assert replies[-7:-3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[-3].startswith("250 2.0.0 Ok: queued as ") and replies[-2:] == ["221 2.0.0 Bye", ""]
    queue_id = replies[-3].rsplit(" ", 1)[1]
    [entry] = listed(config_path)
    assert entry["id"] == queue_id and entry["state"] == "maildrop"
    assert entry["sender"] == "alice@client.example"
    assert sorted(r["address"] for r in entry["recipients"]) == ["bob@far.example", "carol@far.example"]
    content = content_of(config_path, queue_id)
    assert content.startswith(b"Received: from me.example (localhost [127.0.0.1])\r\n")
    assert f"(trimail, from userid {os.getuid()})".encode() in content and b"with ESMTP id " + queue_id.encode() in content
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["Subject"] == "stand-alone" and message["Message-ID"] and message["Date"]
    assert message.get_content().splitlines() == ["line one", ".dot-stuffed"]


def test_bs_takes_bdat_as_postfixs_stand_alone_smtpd_does(tmp_path):
    config_path = config(tmp_path)
    session = (b"EHLO me.example\r\nMAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@far.example>\r\n"
               b"BDAT 24\r\nSubject: chunked\r\n\r\n.oneBDAT 5 LAST\r\n\r\ntwoQUIT\r\n")
    result = sendmail(config_path, "-bs", data=session)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert "250-SMTPUTF8" in replies and "250 CHUNKING" in replies
    assert replies[-5:-3] == ["250 2.1.5 Ok", "250 2.0.0 Ok: 24 bytes"]
    assert replies[-3].startswith("250 2.0.0 Ok: 31 bytes queued as ") and replies[-2:] == ["221 2.0.0 Bye", ""]
    content = content_of(config_path, replies[-3].rsplit(" ", 1)[1])
    assert b"\r\nSubject: chunked\r\n" in content and content.endswith(b"\r\n\r\n.one\r\ntwo\r\n")


def test_bs_answers_errors_with_smtpds_replies_and_queues_nothing_unfinished(tmp_path):
    config_path = config(tmp_path)
    session = (b"HELO me\r\nRCPT TO:<bob@far.example>\r\nMAIL FROM:<alice@client.example>\r\n"
               b"RCPT TO:<bob@exa mple>\r\nRCPT TO:<bob@far.example>\r\nDATA\r\nSubject: cut\r\n\r\nno end")
    result = sendmail(config_path, "-bs", data=session)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode().split("\r\n")
    assert replies[1:6] == ["250 mx.test.example", "503 5.5.1 Error: need MAIL command", "250 2.1.0 Ok",
                            "501 5.1.3 Bad recipient address syntax", "250 2.1.5 Ok"]
    assert listed(config_path) == []  # the input ended inside DATA: nothing was accepted


def test_bs_takes_no_recipient_arguments(tmp_path):
    result = sendmail(config(tmp_path), "-bs", "bob@far.example")
    assert result.returncode == 2 and b"stand-alone mode requires no recipient" in result.stderr


# -- -bp, -q, -bi -------------------------------------------------------------


def test_bp_prints_what_mailq_prints(tmp_path):
    config_path = config(tmp_path)
    assert sendmail(config_path, "bob@far.example", data=b"Subject: x\n\nhi\n").returncode == 0
    result = sendmail(config_path, "-bp")
    assert result.returncode == 0, result.stderr
    mailq = trimail("queue", "list", "-c", str(config_path))
    assert result.stdout.decode() == mailq.stdout and "bob@far.example" in mailq.stdout
    refused = sendmail(config_path, "-bp", "bob@far.example")
    assert refused.returncode == 2 and b"display queue mode requires no recipient" in refused.stderr


def test_q_flags_as_postfix_accepts_them(tmp_path):
    config_path = config(tmp_path)
    site = sendmail(config_path, "-qRfar.example")
    assert site.returncode == 0 and b"flushed 0 message(s) for far.example" in site.stderr
    assert sendmail(config_path, "-q30m").returncode == 0  # an interval: serve's queue_run_delay
    not_implemented = sendmail(config_path, "-qSfar.example")
    assert not_implemented.returncode == 2 and b"-qS is not implemented" in not_implemented.stderr
    assert b"specify: -qRsitename" in sendmail(config_path, "-qR").stderr


async def test_q_delivers_deferred_mail_now(start_mta, tmp_path):
    srv = await start_mta({"sick.example": "SERVFAIL"}, smtpd_listen=f"{HOST}:0")

    def submit() -> None:
        assert sendmail(srv.config.source, "r@sick.example", data=b"Subject: x\n\nhi\n").returncode == 0

    def attempts() -> int:
        return max((r["attempts"] for m in listed(srv.config.source) for r in m["recipients"]), default=0)

    await trio.to_thread.run_sync(submit)
    await wait_for(lambda: attempts() == 1, 20)
    result = await trio.to_thread.run_sync(lambda: sendmail(srv.config.source, "-q"))
    assert result.returncode == 0, result.stderr
    await wait_for(lambda: attempts() == 2, 20)  # minimal_backoff_time is 300s: only the flush retries it


def test_bi_rebuilds_the_alias_databases_and_oA_names_one(tmp_path):
    aliases, other = tmp_path / "aliases", tmp_path / "other"
    aliases.write_text("team: alice, bob\n")
    other.write_text("crew: carol\n")
    config_path = config(tmp_path, alias_database=f"hash:{aliases}")
    for flag in ("-bi", "-I"):
        Path(f"{aliases}.db").unlink(missing_ok=True)
        result = sendmail(config_path, flag)
        assert result.returncode == 0, result.stderr
        assert trimail("postmap", "-q", "team", f"hash:{aliases}", "-c", str(config_path)).stdout.strip() \
            == "alice, bob"
    assert sendmail(config_path, "-bi", f"-oA{other}").returncode == 0
    assert trimail("postmap", "-q", "crew", f"hash:{other}", "-c", str(config_path)).stdout.strip() == "carol"


# -- From: with the full name ---------------------------------------------------


def test_gecos_full_name_as_postfix_reads_it():
    assert gecos_name("& Smith,Room 1,555-1234", "joe") == "Joe Smith"
    assert gecos_name("Ann Lee;x", "ann") == "Ann Lee"
    assert gecos_name("50% off", "x") == "50"
    assert gecos_name("", "joe") == ""


def from_header(config_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = sendmail(config_path, "-f", "me@client.example", *args, "bob@far.example",
                      data=b"Subject: x\n\nhi\n", env=env)
    assert result.returncode == 0, result.stderr
    [entry] = listed(config_path)
    content = content_of(config_path, entry["id"])
    assert trimail("queue", "delete", entry["id"], "-c", str(config_path)).returncode == 0
    return email.message_from_bytes(content, policy=email.policy.default)["From"]


def test_missing_from_gets_the_full_name_of_the_password_entry(tmp_path):
    config_path = config(tmp_path)
    entry = pwd.getpwuid(os.getuid())
    expected = gecos_name(entry.pw_gecos, entry.pw_name)
    assert from_header(config_path) == (f"{expected} <me@client.example>" if expected else "me@client.example")
    assert from_header(config_path, env={"NAME": "Jane Q. Doe"}) == '"Jane Q. Doe" <me@client.example>'
    assert from_header(config_path, "-F", "Given Name", env={"NAME": "ignored"}) == "Given Name <me@client.example>"


# -- -bv and -R ----------------------------------------------------------------


def test_bv_reports_what_would_happen_and_delivers_nothing(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("team: alice, bob@far.example\nbroken: :include:/nonexistent/list\n")
    (tmp_path / "transport").write_text(f"refused.example error:5.7.1 no mail here\n"
                                        f"relay.example smtp:[{SINK}]:2525\n")
    # a bare alias target is qualified with $myorigin (Postfix's trivial-rewrite): local here
    config_path = config(tmp_path, alias_maps=f"hash:{aliases}", alias_database=f"hash:{aliases}",
                         local_recipient_maps="$alias_maps", transport_maps=f"texthash:{tmp_path / 'transport'}",
                         myorigin="mx.test.example")
    assert trimail("newaliases", "-c", str(config_path)).returncode == 0
    result = sendmail(config_path, "-bv", "-f", "tester@client.example", "team@mx.test.example",
                      "nobody@mx.test.example", "x@refused.example", "y@relay.example",
                      data=b"Subject: check\n\nbody\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == ("<team@mx.test.example>: delivery via local: delivers to mailbox of alice, "
                        "forwarded to <bob@far.example>")
    assert lines[1].startswith("<nobody@mx.test.example>: undeliverable: ") and "User unknown" in lines[1]
    assert lines[2] == "<x@refused.example>: undeliverable: 5.7.1 no mail here"
    assert lines[3].startswith(f"<y@relay.example>: delivery via smtp:[{SINK}]:2525")
    [report] = listed(config_path)  # the report only: the message itself is not queued
    assert report["sender"] == "" and [r["address"] for r in report["recipients"]] == ["tester@client.example"]
    message = email.message_from_bytes(content_of(config_path, report["id"]), policy=email.policy.default)
    assert message["Subject"] == "Mail Delivery Status Report"
    parts = list(message.iter_parts())
    actions = [(r["Final-Recipient"], r["Action"], r["Status"]) for r in parts[1].get_payload()[1:]]
    assert actions == [("rfc822; team@mx.test.example", "deliverable", "2.0.0"),
                       ("rfc822; nobody@mx.test.example", "undeliverable", "5.1.1"),
                       ("rfc822; x@refused.example", "undeliverable", "5.7.1"),
                       ("rfc822; y@relay.example", "deliverable", "2.0.0")]
    assert parts[2].get_content_type() == "text/rfc822-headers" and "Subject: check" in parts[2].get_content()


async def test_R_hdrs_makes_the_bounce_return_headers_only(start_mta):
    with Sink(SINK) as senders:
        srv = await start_mta(smtpd_listen=f"{HOST}:0",
                              transport_maps=f"inline:{{ client.example=smtp:[{SINK}]:{senders.port} }}")
        for count, ret in enumerate(("hdrs", "full"), 1):
            result = await trio.to_thread.run_sync(functools.partial(
                sendmail, srv.config.source, "-R", ret, "-f", "alice@client.example", "rcpt@gone.example",
                data=b"Subject: doomed\n\nsecret body line\n"))
            assert result.returncode == 0, result.stderr
            await wait_for(lambda n=count: len(senders.messages) == n, 20)
        returned = [email.message_from_bytes(content, policy=email.policy.default).get_payload()[2]
                    for _, _, content in senders.messages]
        assert [part.get_content_type() for part in returned] == ["text/rfc822-headers", "message/rfc822"]
        assert b"secret body line" not in senders.messages[0][2] and b"secret body line" in senders.messages[1][2]


def test_a_line_without_end_is_refused_at_the_size_limit_not_read_whole(tmp_path):
    """Red team 33b: sendmail read a whole line before it checked message_size_limit,
    so 1.5 GB without a newline took 2 GiB of memory.  Here the process may not use
    more than 512 MiB of address space and is sent 768 MiB without a newline."""
    import resource
    import threading

    config_path = config(tmp_path, message_size_limit="1000000")
    limit = 512 << 20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.Popen([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), "a@far.example"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=cap)

    def feed() -> None:
        try:
            for _ in range(768):
                proc.stdin.write(b"x" * (1 << 20))
            proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join(120)
    err = proc.stderr.read()
    proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 1, err
    assert b"message is larger than message_size_limit" in err and b"Traceback" not in err, err[-500:]
