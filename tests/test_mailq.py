"""mailq's layout as Postfix's postqueue prints it (showq_compat.c, long queue IDs):
columns, ``*``/``!`` marks, asctime arrival, one ``(reason)`` line per run of
recipients with the same reason, errno texts, and the Kbytes summary rounded down."""

from __future__ import annotations

import json
import smtplib
import socket
import time
from datetime import datetime

from tests.conftest import trimail, write_main_cf
from tests.peers import Sink
from trimail import mailq
from trimail.queue.store import MessageInfo, RecipientInfo

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
