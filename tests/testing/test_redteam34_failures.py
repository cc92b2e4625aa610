"""Red team (session 34): two failing tests whose node ids are made safe alike
(``[<ann@example.com>]`` and ``[ann@example.com]``) wrote one folder, and the second
deleted the first's mail, which its report still named."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SUITE = '''
import smtplib
import pytest

HOST = "127.0.34.156"


@pytest.mark.trimail(smtpd_listen=HOST + ":0")
@pytest.mark.parametrize("to", ["<ann@example.com>", "ann@example.com"])
def test_fails(trimail_mta, to):
    with smtplib.SMTP(HOST, trimail_mta.port) as client:
        client.sendmail("app@example.org", [to.strip("<>")], f"Subject: for {to}\\r\\n\\r\\nx\\r\\n")
    trimail_mta.wait_for()
    assert False
'''


def test_tests_whose_ids_are_made_safe_alike_keep_their_own_mail(tmp_path):
    (tmp_path / "test_app.py").write_text(SUITE)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                             "--trimail-failures=failed", "test_app.py"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stdout[-3000:]
    named = re.findall(r"^(/\S+\.eml)$", result.stdout, re.MULTILINE)
    assert len(named) == 2 and len({Path(p).parent for p in named}) == 2, result.stdout[-3000:]
    subjects = sorted(Path(p).read_bytes().split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for p in named)
    assert subjects == [b"for <ann@example.com>", b"for ann@example.com"]
