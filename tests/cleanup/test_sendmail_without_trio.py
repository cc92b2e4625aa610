"""``trimail sendmail`` runs without importing trio: trio is serve's event loop, and
importing it was 80 ms of sendmail's 230 ms start (a cron job or a web application
may send many messages).  The tables, the header and body checks, the queue and the
wake-up of serve are all reached through modules that import trio only where they
run it (``supervise.thread_pool``, ``maps.off_loop``, ``queue.spool``'s async writes,
``net.controlclient``, ``milter.local`` for non_smtpd_milters)."""

from __future__ import annotations

import subprocess
import sys

from tests.cleanup.test_local_checks import config, stored

RUN_WITHOUT_TRIO = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "trio" or name.startswith("trio."):
            raise ImportError("sendmail imported trio")
sys.meta_path.insert(0, Refuse())
sys.argv = ["trimail", "sendmail"] + sys.argv[1:]
from trimail.entry import main
main()
"""


def test_sendmail_queues_a_message_through_the_checks_without_trio(tmp_path):
    path = config(tmp_path)  # header_checks and body_checks (regexp:), virtual aliases off
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TRIO, "-C", str(path), "bob@remote.example"],
                            input=b"Subject: tag me\n\nmy secret here\n", capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    [(state, _)] = stored(tmp_path)
    assert state == "maildrop"
