"""A delivery the queue records has its ``status=`` line in the mail log, even when
the queue manager is killed with SIGKILL (found by a red team on 646ad3d).  The
qmgr's lines wait up to 10 ms for the log writer thread (``trimail.log``); a
delivery recorded in that time, and the process killed, left a delivered message
with no line: pflogsumm's count after a crash missed it.  Now, with the log in a
file, the lines about a job's outcomes are written before the commit that records
them (``scheduler.results.Results.commit``), as Postfix's delivery agent logs
before its queue manager updates the queue file.  A kill between the two delivers
the message again (a second line), never leaves it without one.

What a ``kill -9`` would leave is looked at directly, many times: the qmgr is
stopped (SIGSTOP) at moments of the load, and every message the downstream has
and the queue no longer holds (its delivery recorded) must have its line in the
file at that moment.  Then the qmgr is killed for real.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import apsw

from tests.conftest import write_main_cf
from tests.faults.conftest import Daemon, assert_serving, integrity_ok, queued, wait_until
from tests.faults.test_workers import Load, _tokens, running
from tests.peers import Sink
from tests.ports import free_port as _free_port


class _LogFileServe:
    """serve with its log in a file (``maillog_file``), which the test reads."""

    def __init__(self, config_path: Path, port: int, maillog: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)],
                                     stderr=subprocess.DEVNULL)
        self.port = port
        self.maillog = maillog
        try:
            wait_until(lambda: maillog.exists() and "daemon started" in maillog.read_text(), timeout=30)
        except BaseException:  # never started: the test's finally never gets it
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def log(self) -> list[str]:
        return self.maillog.read_text().splitlines()


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _unlogged_records(pid: int, queue: Path, maillog: Path, sink: Sink) -> set[str]:
    """With the qmgr *pid* stopped, as a kill would leave it: the messages the
    downstream has and the queue no longer holds, without a ``status=sent`` line."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _stopped(pid), timeout=10, interval=0.001)
        db = apsw.Connection(str(queue / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            held = {row[0] for row in db.execute("SELECT id FROM message")}
        finally:
            db.close()
        delivered = {m.group(1).decode() for _, _, content in list(sink.messages)
                     for m in [re.search(rb"with E?SMTPS?A? id (\w+)", content)] if m}
        logged = set(re.findall(r"trimail/smtp\[\d+\]: (\w+): to=<[^>]*>.* status=sent", maillog.read_text()))
        return (delivered - held) - logged
    finally:
        os.kill(pid, signal.SIGCONT)


def test_every_delivery_the_queue_records_has_its_log_line_after_a_killed_qmgr(tmp_path) -> None:
    maillog, port = tmp_path / "maillog", _free_port()
    with Sink() as sink:
        config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", master_service_disable="",
                                    smtpd_workers=2, relayhost=f"[127.0.0.1]:{sink.port}",
                                    maillog_file=str(maillog))
        served = _LogFileServe(config_path, port, maillog)
        d = Daemon(served, config_path, tmp_path / "queue")  # type: ignore[arg-type]
        try:
            [victim] = running(d, "qmgr")
            with Load(d.port, clients=8) as load:
                for sample in range(25):
                    wait_until(lambda: len(_tokens(sink.messages)) >= 20 * (sample + 1), timeout=60)
                    time.sleep(0.003 * (sample % 7))  # a different moment of the writer's 10 ms each time
                    missing = _unlogged_records(victim, d.queue_directory, maillog, sink)
                    assert not missing, f"recorded as delivered, not in the log: {sorted(missing)}"
                os.kill(victim, signal.SIGKILL)  # while deliveries are recorded, hundreds a second
                wait_until(lambda: len(running(d, "qmgr")) == 1 and victim not in running(d, "qmgr"), timeout=30)
                count = len(load.acknowledged)
                wait_until(lambda: len(load.acknowledged) >= count + 20, timeout=30)
            wanted = set(load.acknowledged)
            wait_until(lambda: wanted <= _tokens(sink.messages), timeout=60)
            wait_until(lambda: queued(d.queue_directory) == 0, timeout=60)
            assert_serving(d)
        finally:
            served.proc.terminate()
            served.proc.wait(30)
    text = maillog.read_text()
    accepted = set(re.findall(r"trimail/smtpd\[\d+\]: (\w+): client=", text))  # no transaction was cut:
    sent = set(re.findall(r"trimail/smtp\[\d+\]: (\w+): to=<[^>]*>.* status=sent", text))
    assert load.failures == 0 and len(accepted) == len(wanted)  # each client= line is a queued message
    assert accepted <= sent, f"{len(accepted - sent)} delivered message(s) without a status=sent line"
    assert integrity_ok(d.queue_directory) == "ok"
