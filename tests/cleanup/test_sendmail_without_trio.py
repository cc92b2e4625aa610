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

# the start of a program whose import of trio fails ("... imported trio")
REFUSE_TRIO = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "trio" or name.startswith("trio."):
            raise ImportError("the command imported trio")
sys.meta_path.insert(0, Refuse())
"""

RUN_WITHOUT_TRIO = REFUSE_TRIO + """
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


def test_an_smtp_session_on_standard_input_queues_a_message_without_trio(tmp_path):
    """``sendmail -bs`` (Symfony Mailer's and other libraries' default way in) makes
    its session's protocol settings from ``trimail.receive.protocol``, which imports
    nothing of serve's: it imported serve's whole receiving side (trio, DNS, the
    queue writer) and started in 0.31-0.35 s instead of about 0.16 s."""
    path = config(tmp_path)
    session = (b"EHLO client.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@remote.example>\r\n"
               b"DATA\r\nSubject: tag me\r\n\r\nmy secret here\r\n.\r\nQUIT\r\n")
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TRIO, "-C", str(path), "-bs"],
                            input=session, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    replies = result.stdout.decode()
    assert "250 2.0.0 Ok: queued as " in replies and replies.rstrip().endswith("221 2.0.0 Bye"), replies
    [(state, _)] = stored(tmp_path)
    assert state == "maildrop"
