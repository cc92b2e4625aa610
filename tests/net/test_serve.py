"""trimail serve over real sockets: smtplib, raw pipelining, swaks, crash and stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess

import pytest
import trio

from tests.conftest import trimail, wait_for, write_main_cf
from trimail.master import serve
from trimail.queue.store import Store

BODY = "Subject: hello\r\nMessage-ID: <m1@client.example>\r\n\r\nline one\r\n.leading dot\r\n"


def smtplib_send_reply(port: int, recipients: list[str], body: bytes = BODY.encode()) -> str:
    """Send one message and return the final DATA reply text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("alice@client.example")
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(body)
        assert code == 250, reply
        return reply.decode()


def raw_exchange(port: int, data: bytes, expect_lines: int, host: str = "127.0.0.1") -> list[str]:
    """Send *data* in one write and read until *expect_lines* final reply lines arrived."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)
        buf = b""
        while sum(1 for line in buf.split(b"\r\n") if len(line) > 3 and line[3:4] == b" ") < expect_lines:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [line.decode() for line in buf.split(b"\r\n") if len(line) > 3 and line[3:4] == b" "]


def queue_json(config_path) -> list[dict]:
    result = trimail("queue", "list", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_smtplib_message_is_queued_with_the_id_from_the_reply(tmp_path, nursery):
    config_path = write_main_cf(tmp_path)
    from trimail import config as configuration
    srv = await nursery.start(serve, configuration.load(config_path))
    reply = await trio.to_thread.run_sync(smtplib_send_reply, srv.addresses[0].port, ["bob@example.com"])
    assert reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    [entry] = await trio.to_thread.run_sync(queue_json, config_path)
    assert entry["id"] == queue_id
    assert entry["state"] == "incoming"
    assert entry["sender"] == "alice@client.example"
    assert [r["address"] for r in entry["recipients"]] == ["bob@example.com"]
    assert entry["recipients"][0] == {"address": "bob@example.com", "status": "pending", "attempts": 0,
                                      "next_attempt": None, "last_reply": None}
    store = Store.open(srv.config.queue_directory, readonly=True)
    content = store.read_content(queue_id)
    assert entry["size"] == len(content)
    assert content.startswith(b"Received: from client.example (unknown [127.0.0.1])\r\n"
                              b"\tby mx.test.example (trimail) with ESMTP id " + queue_id.encode())
    assert content.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n")
    srv.stop()


async def test_pipelined_message_with_100_recipients(server):
    port = server.addresses[0].port
    rcpts = [f"user{i}@example.com" for i in range(100)]
    data = (b"EHLO raw.example\r\nMAIL FROM:<>\r\n"
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
            + b"DATA\r\nSubject: many\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    lines = await trio.to_thread.run_sync(raw_exchange, port, data, 1 + 1 + 1 + 100 + 1 + 1 + 1)
    assert lines[0].startswith("220 ")
    assert lines[2:103] == ["250 2.1.0 Ok"] + ["250 2.1.5 Ok"] * 100
    assert lines[103].startswith("354 ")
    assert lines[104].startswith("250 2.0.0 Ok: queued as ")
    assert lines[105] == "221 2.0.0 Bye"
    queue_id = lines[104].rsplit(" ", 1)[1]
    store = Store.open(server.config.queue_directory, readonly=True)
    [info] = store.list_messages()
    assert info.id == queue_id and info.sender == ""
    assert [r.address for r in info.recipients] == rcpts


async def test_smtplib_with_one_and_with_100_recipients(server):
    port = server.addresses[0].port
    await trio.to_thread.run_sync(smtplib_send_reply, port, ["one@example.com"])
    await trio.to_thread.run_sync(smtplib_send_reply, port, [f"r{i}@example.com" for i in range(100)])
    store = Store.open(server.config.queue_directory, readonly=True)
    assert sorted(len(m.recipients) for m in store.list_messages()) == [1, 100]


async def test_data_cut_off_before_the_final_dot_is_not_queued(server):
    port = server.addresses[0].port

    def cut_off() -> list[str]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            got = b""
            while b"354 " not in got:
                chunk = sock.recv(4096)
                assert chunk, f"closed before 354: {got!r}"
                got += chunk
            sock.sendall(b"Subject: half\r\n\r\nthe message is not finished\r\n")
        return got.decode().split("\r\n")

    await trio.to_thread.run_sync(cut_off)
    await wait_for(lambda: not server.sessions)
    store = Store.open(server.config.queue_directory, readonly=True)
    assert store.list_messages() == []


async def test_oversized_message_is_refused_and_session_stays_in_sync(make_config, nursery):
    srv = await nursery.start(serve, make_config(message_size_limit=1000))
    body = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 50
    data = (b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + body
            + b".\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmall\r\n.\r\nQUIT\r\n")
    lines = await trio.to_thread.run_sync(raw_exchange, srv.addresses[0].port, data, 11)
    assert lines[5] == "552 5.3.4 Error: message file too big"  # Postfix: its words for the content
    assert lines[8].startswith("354") and lines[9].startswith("250 2.0.0 Ok: queued as ")
    assert len(Store.open(srv.config.queue_directory, readonly=True).list_messages()) == 1
    srv.stop()


async def test_mail_loop_is_refused_by_hop_count(make_config, nursery):
    srv = await nursery.start(serve, make_config(hopcount_limit=5))
    looped = b"".join(b"Received: from hop%d\r\n" % i for i in range(5)) + b"Subject: loop\r\n\r\nx\r\n"
    data = b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + looped + b".\r\n"
    lines = await trio.to_thread.run_sync(raw_exchange, srv.addresses[0].port, data, 6)
    assert lines[-1] == "554 5.4.0 Error: too many hops"
    srv.stop()


async def test_idle_client_gets_421_after_smtpd_timeout(make_config, nursery):
    srv = await nursery.start(serve, make_config(smtpd_timeout="1s"))

    def idle() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            got = b""
            while chunk := sock.recv(4096):
                got += chunk
            return got

    got = await trio.to_thread.run_sync(idle)
    assert got.split(b"\r\n")[1] == b"421 4.4.2 mx.test.example Error: timeout exceeded"
    srv.stop()


async def test_too_many_connections_from_one_client(make_config, nursery):
    srv = await nursery.start(serve, make_config(smtpd_client_connection_count_limit=2))
    port = srv.addresses[0].port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    try:
        await wait_for(lambda: len(srv.sessions) == 2)
        lines = await trio.to_thread.run_sync(raw_exchange, port, b"", 1)
        assert lines[0].startswith("421 4.7.0")
    finally:
        for s in socks:
            s.close()
    srv.stop()


async def test_ipv4_and_ipv6_listeners(make_config, nursery):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 is not configured")
    srv = await nursery.start(serve, make_config(smtpd_listen="127.0.0.1:0, [::1]:0"))
    assert {a.host for a in srv.addresses} == {"127.0.0.1", "::1"}
    v6 = next(a for a in srv.addresses if a.host == "::1")
    lines = await trio.to_thread.run_sync(raw_exchange, v6.port, b"QUIT\r\n", 2, "::1")
    assert lines == ["220 mx.test.example ESMTP trimail", "221 2.0.0 Bye"]
    srv.stop()


async def test_second_serve_on_the_same_queue_is_refused(server):
    result = await trio.to_thread.run_sync(
        lambda: trimail("serve", "-c", str(server.config.source)))
    assert result.returncode == 1
    assert "another trimail serve" in result.stderr


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (CI installs it)")
async def test_swaks_pipelined_delivery(server):
    port = server.addresses[0].port
    result = await trio.to_thread.run_sync(lambda: subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--pipeline", "--from", "s@client.example",
         "--to", "r1@example.com,r2@example.com", "--header", "Subject: swaks"],
        capture_output=True, text=True, timeout=60))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queued as" in result.stdout
    [info] = Store.open(server.config.queue_directory, readonly=True).list_messages()
    assert [r.address for r in info.recipients] == ["r1@example.com", "r2@example.com"]


# -- as a process: crash safety, graceful stop, the development default -------------


def test_kill_9_right_after_250_loses_nothing(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    replies = [smtplib_send_reply(proc.port, [f"r{i}@example.com"]) for i in range(5)]
    proc.proc.kill()  # SIGKILL, no chance to clean up
    proc.proc.wait(30)
    ids = [r.rsplit(" ", 1)[1] for r in replies]
    assert sorted(m["id"] for m in queue_json(config_path)) == sorted(ids)
    again = serve_process(config_path)  # restarts on the same queue despite the stale lock file
    assert sorted(m["id"] for m in queue_json(config_path)) == sorted(ids)
    assert again.stop() == 0


def test_sigterm_answers_421_to_idle_sessions_and_exits_cleanly(tmp_path, serve_process):
    proc = serve_process(write_main_cf(tmp_path))
    with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as sock:
        sock.sendall(b"EHLO x\r\n")
        got = b""
        while b"250 CHUNKING\r\n" not in got:
            got += sock.recv(4096)
        proc.proc.send_signal(signal.SIGTERM)
        while chunk := sock.recv(4096):
            got += chunk
    assert b"421 4.3.2 mx.test.example Service shutting down" in got
    assert proc.proc.wait(30) == 0
    proc.wait_log("terminating on stop request")


def test_session_in_data_may_finish_during_graceful_stop(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as sock:
        sock.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        got = b""
        while b"354 " not in got:
            chunk = sock.recv(4096)
            assert chunk, f"closed before 354: {got!r}"
            got += chunk
        proc.proc.send_signal(signal.SIGTERM)
        proc.wait_log("connect from")  # still alive and serving this session
        sock.sendall(b"Subject: late\r\n\r\nfinished in the grace period\r\n.\r\n")
        while b"queued as" not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        while chunk := sock.recv(4096):
            got += chunk
    assert b"421 4.3.2" in got  # closed once the transaction was done
    assert proc.proc.wait(30) == 0
    assert len(queue_json(config_path)) == 1


def test_serve_with_no_configuration_uses_the_development_default(tmp_path, serve_process):
    if os.path.exists("/etc/trimail/main.cf"):
        pytest.skip("/etc/trimail/main.cf exists; the built-in default is not used")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    env.pop("TRIMAIL_CONFIG", None)
    proc = serve_process(None, env)
    assert proc.port == 2525
    reply = smtplib_send_reply(2525, ["root@localhost"])
    queue_id = reply.rsplit(" ", 1)[1]
    assert (tmp_path / "state" / "trimail" / "queue.db").exists()
    # local mail lands in a Maildir under $queue_directory/mailboxes, no system account needed
    new = tmp_path / "state" / "trimail" / "mailboxes" / "root" / "Maildir" / "new"
    proc.wait_log(rf"{queue_id}: to=<root@localhost>, relay=local, .*status=sent \(delivered to maildir root\)")
    [delivered] = list(new.iterdir())
    assert queue_id.encode() in delivered.read_bytes()
    assert json.loads(trimail("queue", "list", "--json", env=env).stdout) == []
    assert proc.stop() == 0
