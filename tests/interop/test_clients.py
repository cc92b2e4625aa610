"""Real SMTP clients against trimail: msmtp (and swaks, in tests/net)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from trimail.testing import TestMTA


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed (CI installs it)")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls+auth"])
def test_msmtp_submits_to_trimail(tmp_path, tls):
    options = {"tls": True, "auth": {"app": "s3cret"}} if tls else {}
    with TestMTA(**options) as mta:
        args = ["msmtp", "--host=127.0.0.1", f"--port={mta.port}", "--from=app@client.example",
                "--domain=client.example"]
        if tls:
            args += ["--tls=on", "--tls-starttls=on", f"--tls-trust-file={mta.ca_file}", "--auth=plain",
                     "--user=app", "--passwordeval=echo s3cret"]
        else:
            args += ["--tls=off", "--auth=off"]
        result = subprocess.run([*args, "ann@far.example"], input=b"Subject: from msmtp\n\nhello\n",
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        [message] = mta.wait_for(subject="from msmtp")
        assert message.sender == "app@client.example" and message.recipients == ["ann@far.example"]
        assert message.helo == "client.example"
        if tls:
            assert message.auth == "app" and message.tls
