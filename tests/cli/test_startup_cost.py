"""Every ``trimail`` command pays for what ``trimail.cli`` imports, and test suites
run the CLI hundreds of times: DKIM and DNS libraries load only for the commands
that use them."""

from __future__ import annotations

import subprocess
import sys


def test_the_command_line_does_not_import_dkim_or_dns_until_a_command_needs_them():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, trimail.cli; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'dkim', 'dns', 'cryptography'}))"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
