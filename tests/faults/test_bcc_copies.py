"""A BCC action's copy is never reported to the sender (Postfix's cleanup adds it with
NOTIFY=NEVER): when it bounces, the sender gets no notification that would name the
hidden address; a recipient the sender chose still gets one.  Access tables' BCC and
header_checks' BCC alike (receive/commit.py, delivery/notify.SILENT_PARAM)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import queued, send, wait_until
from tests.peers import Sink

SINK_HOST = "127.0.0.84"


def _notifications(sink: Sink) -> list:
    return [m for m in sink.messages if m[0] in ("", "<>")]


@pytest.mark.parametrize("where", ["header_checks", "access"])
def test_a_bcc_copy_that_bounces_is_not_reported_to_the_sender(daemon, tmp_path, where):
    rules = tmp_path / "checks"
    rules.write_text("/^Subject: copy me/ BCC hidden@remote.example\n")
    copy = {"header_checks": f"regexp:{rules}"} if where == "header_checks" else \
        {"smtpd_recipient_restrictions": "check_recipient_access inline:{ { ok@remote.example = BCC hidden@remote.example } },"
                                         " permit_mynetworks, reject"}
    with Sink(SINK_HOST, rules={"hidden": "550 5.1.1 no such user", "gone": "550 5.1.1 no such user"}) as sink:
        d = daemon(smtpd_workers=0, relayhost=f"[{SINK_HOST}]:{sink.port}", **copy)
        send(d.port, ["ok@remote.example"], b"Subject: copy me\r\n\r\nbody\r\n")
        wait_until(lambda: queued(d.queue_directory) == 0 and len(sink.messages) == 1, timeout=30)
        [(sender, recipients, _)] = sink.messages
        assert sender == "alice@client.example" and recipients == ["ok@remote.example"]
        d.proc.wait_log(r"hidden@remote\.example.*status=bounced")  # (the log is written after the commit)
        # the control: a recipient the sender named is reported
        send(d.port, ["gone@remote.example"], b"Subject: plain\r\n\r\nbody\r\n")
        wait_until(lambda: queued(d.queue_directory) == 0 and len(_notifications(sink)) == 1, timeout=30)
        [(_, to, report)] = _notifications(sink)
        assert to == ["alice@client.example"] and b"gone@remote.example" in report
        assert b"hidden" not in report
