"""mailq's layout as Postfix's postqueue prints it (showq_compat.c, long queue IDs):
columns, ``*``/``!`` marks, asctime arrival, one ``(reason)`` line per run of
recipients with the same reason, errno texts, and the Kbytes summary rounded down."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests import postfix_peer
from tests.conftest import trimail, write_main_cf
from tests.peers import Sink
from tests.ports import free_port
from trimail.queue import mailq
from trimail.queue.reads import MessageInfo, RecipientInfo

HEADER = "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------"
DEC_1 = time.mktime((2026, 12, 1, 10, 0, 0, 0, 0, -1))  # a Tuesday, 10:00 local time
REFUSED = "connect to 127.0.43.3[127.0.43.3]:2525: Connection refused"
BUSY = "host sink.example[127.0.43.2] said: 450 4.2.1 mailbox busy (in reply to RCPT TO command)"


def rcpt(address: str, status: str = "deferred", reply: str | None = None) -> RecipientInfo:
    """A recipient whose reply is stored as the queue stores it: the enhanced code first."""
    return RecipientInfo(address, status, 1, None, reply and ("4.4.1 " + reply))


def test_layout_columns_marks_and_reason_groups():
    messages = [
        MessageInfo("4Xk2cB1r5Wz8Fq4h", "deferred", "alice@client.example", DEC_1, 2100, [
            rcpt("a@down.example", reply=REFUSED), rcpt("busy@sink.example", reply=BUSY),
            rcpt("b@down.example", reply=REFUSED), rcpt("done@sink.example", "sent", "250 ok"),
            rcpt("new@sink.example", "pending")]),
        MessageInfo("4Xk2cB1r5Wz8Fq4j", "active", "", DEC_1 + 61, 512, [rcpt("x@far.example", "pending")]),
        MessageInfo("4Xk2cB1r5Wz8Fq4k", "hold", "bob@client.example", DEC_1, 1024, [rcpt("y@far.example", "pending")]),
    ]
    assert list(mailq.mailq_lines(messages)) == [
        HEADER,
        "4Xk2cB1r5Wz8Fq4h      2100 Tue Dec  1 10:00:00 alice@client.example",
        f"{' ' * (76 - len(REFUSED))}({REFUSED})",
        f"{' ' * 47}a@down.example",
        f"{' ' * 47}b@down.example",
        f"{' ' * (76 - len(BUSY))}({BUSY})",
        f"{' ' * 47}busy@sink.example",
        f"{' ' * 58}(reason unavailable)",
        f"{' ' * 47}new@sink.example",
        "",
        "4Xk2cB1r5Wz8Fq4j*      512 Tue Dec  1 10:01:01 MAILER-DAEMON",
        f"{' ' * 47}x@far.example",
        "",
        "4Xk2cB1r5Wz8Fq4k!     1024 Tue Dec  1 10:00:00 bob@client.example",
        f"{' ' * 47}y@far.example",
        "",
        "-- 3 Kbytes in 3 Requests.",  # 3636 bytes: showq divides by 1024 and rounds down
    ]


def test_kbytes_round_down_and_one_request_is_singular():
    one = MessageInfo("4Xk2cB1r5Wz8Fq4h", "incoming", "a@b.example", DEC_1, 1023, [rcpt("c@d.example", "pending")])
    assert list(mailq.mailq_lines([one]))[-1] == "-- 0 Kbytes in 1 Request."
    assert list(mailq.mailq_lines([])) == ["Mail queue is empty"]


def test_a_long_reason_starts_the_line_and_control_characters_are_masked():
    reason = "x" * 90
    m = MessageInfo("4Xk2cB1r5Wz8Fq4h", "deferred", "evil\x1b[2J@client.example", DEC_1, 10,
                    [rcpt("a\x07@b.example", reply=reason)])
    lines = list(mailq.mailq_lines([m]))
    assert lines[1].endswith(":00 evil?[2J@client.example") and lines[2] == f"({reason})"
    assert lines[3] == " " * 47 + "a?@b.example"


def _send(port: int, recipients: list[str]) -> str:
    with smtplib.SMTP("127.0.43.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("alice@client.example")
        for address in recipients:
            assert client.rcpt(address)[0] == 250
        code, reply = client.data(b"Subject: queued\r\n\r\nbody\r\n")
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def test_mailq_of_a_deferred_then_held_message_is_postfix_layout(tmp_path, serve_process):
    with socket.socket() as closed, Sink(host="127.0.43.2", rules={"busy": "450 4.2.1 mailbox busy"}) as sink:
        closed.bind(("127.0.43.3", 0))  # bound, never listening: connecting is refused
        down = closed.getsockname()[1]
        config_path = write_main_cf(
            tmp_path, smtpd_listen="127.0.43.1:0", master_service_disable="",
            transport_maps=f"inline:{{ down.example=smtp:[127.0.43.3]:{down}, "
                           f"sink.example=smtp:[127.0.43.2]:{sink.port} }}")
        proc = serve_process(config_path)
        queue_id = _send(proc.port, ["a@down.example", "busy@sink.example", "b@down.example", "ok@sink.example",
                                     "c@down.example"])
        for address in ("a@down.example", "b@down.example", "c@down.example", "busy@sink.example"):
            proc.wait_log(rf"{queue_id}: to=<{address}>.*status=deferred")
        assert trimail("queue", "hold", queue_id, "-c", str(config_path)).returncode == 0
        listed = trimail("queue", "list", "--json", "-c", str(config_path))
        (message,) = json.loads(listed.stdout)
        assert message["state"] == "hold"
        shown = trimail("queue", "list", "-c", str(config_path))
        assert proc.stop() == 0
    replies = {r["address"]: r["last_reply"] for r in message["recipients"]}
    refused = f"connect to 127.0.43.3[127.0.43.3]:{down}: Connection refused"  # errno text, as Postfix's
    assert replies["a@down.example"] == f"4.4.1 {refused}"
    busy = replies["busy@sink.example"].removeprefix("4.2.1 ")  # the queue keeps the code before the reason
    assert busy.endswith("said: 450 4.2.1 mailbox busy (in reply to RCPT TO command)")
    arrival = time.asctime(time.localtime(datetime.fromisoformat(message["arrival_time"]).timestamp()))[:19]
    size = message["size"]
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        HEADER,
        f"{queue_id + '!':<17} {size:>8} {arrival} alice@client.example",
        f"{' ' * (76 - len(refused))}({refused})",
        *(f"{' ' * 47}{address}@down.example" for address in "abc"),
        f"{' ' * (76 - len(busy))}({busy})",
        f"{' ' * 47}busy@sink.example",
        "",
        f"-- {size // 1024} Kbytes in 1 Request.",
    ]


# -- the same queue in a real Postfix -------------------------------------------------

MAILQ_LINE = re.compile(r"(\S+?)([*!]?) +(\d+) (\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d) (.*)")


def _shape(listing: str) -> tuple[list[object], set[tuple[str, int]], list[list[tuple[str, list[str]]]]]:
    """A mailq listing with what must differ between two MTAs taken out (queue IDs,
    sizes, arrival times; the order of the reason lines: Postfix lists its defer log
    in the order deliveries ended, so deliveries to two destinations at once may
    interleave their reasons, one line per run): the other lines, the columns of the
    reason and recipient lines, and each message's recipients by reason."""
    lines: list[object] = []
    columns: set[tuple[str, int]] = set()
    groups: list[list[tuple[str, list[str]]]] = []
    for line in listing.splitlines():
        m = MAILQ_LINE.fullmatch(line)
        if m and not line.startswith("-"):
            lines.append(("message", len(m.group(1)) + len(m.group(2)) <= 17, m.group(2), line.index(m.group(4)),
                          m.group(5)))
            groups.append([])
        elif line.startswith(" ") and line.strip().startswith("("):
            columns.add(("reason ends in column", len(line)))
            groups[-1].append((line.strip()[1:-1], []))
        elif line.startswith(" " * 47):
            columns.add(("recipient starts in column", len(line) - len(line.lstrip())))
            if not groups[-1]:
                groups[-1].append(("", []))  # recipients before any reason line: none known yet
            groups[-1][-1][1].append(line.strip())
        else:
            lines.append(line)
    merged = []
    for message in groups:
        by_reason: dict[str, list[str]] = {}
        for reason, addresses in message:
            by_reason.setdefault(reason, []).extend(addresses)
        merged.append(sorted((reason, sorted(addresses)) for reason, addresses in by_reason.items()))
    return lines, columns, merged


class PrivatePostfix:
    """Debian's Postfix from a configuration directory of its own: its smtpd on
    127.0.43.20 only (unused here), mail submitted with its sendmail, long queue IDs."""

    def __init__(self, workdir: Path, transport_maps: str) -> None:
        self.dir = workdir
        for sub in ("conf", "queue", "data"):
            (workdir / sub).mkdir(parents=True)
        shutil.chown(workdir / "data", "postfix")
        for path in (workdir.parent, workdir, workdir / "conf"):
            path.chmod(0o755)
        (workdir / "conf" / "master.cf").write_text(postfix_peer.postfix_master_cf(f"127.0.43.20:{free_port('127.0.43.20')}"))
        (workdir / "conf" / "main.cf").write_text(
            "compatibility_level = 3.6\nenable_long_queue_ids = yes\n"
            f"queue_directory = {workdir / 'queue'}\ndata_directory = {workdir / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\ninet_interfaces = loopback-only\n"
            "inet_protocols = ipv4\nmyhostname = postfix.test.example\nmydestination =\n"
            f"transport_maps = {transport_maps}\n"
            f"maillog_file_prefixes = {workdir}\nmaillog_file = {workdir / 'maillog'}\n")
        self.postfix("start")

    def postfix(self, *args: str, tool: str = "postfix", stdin: bytes | None = None) -> str:
        done = subprocess.run([tool, "-c" if tool != "sendmail" else "-C", str(self.dir / "conf"), *args],
                              input=stdin, capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    def mailq(self) -> str:
        return self.postfix("-p", tool="postqueue")


def _wait(predicate, what: str, state=lambda: "", timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {state()}")


@pytest.mark.skipif(not postfix_peer.available(), reason="needs root and Debian's Postfix")
def test_mailq_matches_postfix_for_the_same_deferred_and_held_mail(tmp_path, serve_process):
    with socket.socket() as closed_one, socket.socket() as closed_two:
        closed_one.bind(("127.0.43.3", 0))  # bound, never listening: connecting is refused
        closed_two.bind(("127.0.43.3", 0))
        one, two = closed_one.getsockname()[1], closed_two.getsockname()[1]
        routes = f"inline:{{ one.example=smtp:[127.0.43.3]:{one}, two.example=smtp:[127.0.43.3]:{two} }}"
        recipients = ["a@one.example", "b@two.example", "c@one.example", "d@two.example", "e@one.example"]

        workdir = Path(tempfile.mkdtemp(prefix="trimail-mailq-"))  # Postfix's user must reach it
        postfix = PrivatePostfix(workdir / "postfix", routes)
        try:
            postfix.postfix("-f", "alice@client.example", *recipients, tool="sendmail",
                            stdin=b"Subject: queued\n\nbody\n")
            theirs = _wait(lambda: (text := postfix.mailq()).count("Connection refused") >= 2
                           and text.count("@") == 6 and "*" not in text
                           and text, "Postfix to defer the mail", lambda: postfix.mailq())
            postfix.postfix("-h", "ALL", tool="postsuper")
            theirs_held = postfix.mailq()
        finally:
            postfix.postfix("stop")
            shutil.rmtree(workdir, ignore_errors=True)

        config_path = write_main_cf(tmp_path, smtpd_listen="127.0.43.1:0", master_service_disable="",
                                    transport_maps=routes)
        proc = serve_process(config_path)
        queue_id = _send(proc.port, recipients)
        for address in recipients:
            proc.wait_log(rf"{queue_id}: to=<{address}>.*status=deferred")
        ours = _wait(lambda: "*" not in (text := trimail("queue", "list", "-c", str(config_path)).stdout) and text,
                     "trimail to defer the mail")
        assert trimail("queue", "hold", queue_id, "-c", str(config_path)).returncode == 0
        ours_held = trimail("queue", "list", "-c", str(config_path)).stdout
        assert proc.stop() == 0

    assert _shape(ours) == _shape(theirs), (ours, theirs)
    assert _shape(ours_held) == _shape(theirs_held), (ours_held, theirs_held)
    assert "!" in ours_held.splitlines()[1]
