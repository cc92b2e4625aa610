"""The mail log reads in the order things happened, across processes: an smtpd
worker's ``client=`` and ``message-id=`` lines about a message come before the qmgr
worker's ``from=`` line about it, although each process writes its lines from a
thread of its own that batches them (pflogsumm counts a sender only when it has seen
the message received first)."""

from __future__ import annotations

import re
import smtplib
import time

from tests.conftest import write_main_cf
from tests.peers import Sink


def test_the_qmgr_never_logs_a_message_before_the_smtpd_that_received_it(tmp_path, serve_process):
    with Sink() as sink:
        config = write_main_cf(tmp_path, master_service_disable="", smtpd_workers="2",
                               relayhost=f"[127.0.0.1]:{sink.port}")
        proc = serve_process(config)
        count = 40
        for n in range(count):
            with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as client:
                client.sendmail("a@client.example", [f"r{n}@far.example"],
                                f"Message-ID: <m{n}@client.example>\r\nSubject: {n}\r\n\r\nx\r\n")
        deadline = time.monotonic() + 30
        while len(sink.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(sink.messages) == count
        deadline = time.monotonic() + 10
        while sum(" removed" in line for line in list(proc.log)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        log = list(proc.log)
    first: dict[tuple[str, str], int] = {}
    for index, line in enumerate(log):
        m = re.search(r"trimail/(\w+)\[\d+\]: ([0-9A-Za-z]+): (client|message-id|from)=", line)
        if m:
            first.setdefault((m.group(2), f"{m.group(1)} {m.group(3)}"), index)
    ids = {qid for qid, _ in first}
    assert len(ids) == count
    for qid in ids:
        received = first[(qid, "smtpd client")]
        noted = first[(qid, "cleanup message-id")]
        queued = first[(qid, "qmgr from")]
        assert received < noted < queued, "\n".join(line for line in log if qid in line)
