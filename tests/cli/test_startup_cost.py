"""Every ``trimail`` command pays for what ``trimail.cli`` imports, and test suites
run the CLI hundreds of times: DKIM and DNS libraries load only for the commands
that use them, and trio (serve's event loop, 60 ms of a 0.3 s ``trimail queue
list``) only for the commands that run it."""

from __future__ import annotations

import subprocess
import sys

from tests.cleanup.test_sendmail_without_trio import REFUSE_TRIO
from trimail.queue.store import Store


def test_the_command_line_does_not_import_dkim_dns_or_trio_until_a_command_needs_them():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, trimail.cli; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'dkim', 'dns', 'cryptography', 'trio'}))"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


WITHOUT_TRIO = REFUSE_TRIO + """
from trimail.cli import main
main(sys.argv[1:])
"""


def test_the_queue_listing_and_status_run_without_trio(tmp_path):
    (tmp_path / "main.cf").write_text(f"queue_directory = {tmp_path / 'queue'}\nallow_root = yes\n")
    Store.open(tmp_path / "queue").close()
    for command, status in ((["queue", "list"], 0), (["queue", "summary"], 0), (["status"], 1)):
        result = subprocess.run([sys.executable, "-c", WITHOUT_TRIO, *command, "-c", str(tmp_path / "main.cf")],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == status, (command, result.stderr)
        assert "imported trio" not in result.stderr, command
