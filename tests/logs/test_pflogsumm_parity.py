"""pflogsumm counts the same for trimail as for a real Postfix on the same traffic
(issue 17 item 1): received, delivered, forwarded, deferred, bounced, rejected,
held and discarded.  The traffic and both configurations are in tests/logs/traffic.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.logs import traffic
from tests.peers import Sink
from tests.ports import free_port

pytestmark = pytest.mark.skipif(not traffic.postfix_available(), reason="needs root, Debian's postfix and pflogsumm")


def settled(log: Path, syslog_name: str, timeout: float = 15.0) -> dict[str, int]:
    """pflogsumm's counts once they reach the expected ones (or the last ones at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = traffic.pflogsumm(log, syslog_name)
        if counts == traffic.EXPECTED or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="trimail-logs-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sink():
    with Sink(host=traffic.SINK_HOST, rules=traffic.SINK_RULES) as peer:
        yield peer


def postfix_counts(workdir: Path, sink_port: int) -> dict[str, int]:
    directory = workdir / "postfix"
    directory.mkdir()
    common, _ = traffic.prepare(directory, sink_port)
    postfix = traffic.PrivatePostfix(directory, free_port(traffic.POSTFIX_HOST), common)
    try:
        traffic.run_sessions(traffic.POSTFIX_HOST, postfix.port)
        return settled(postfix.maillog, "postfix")
    finally:
        postfix.stop()


def trimail_counts(workdir: Path, sink_port: int, serve_process) -> tuple[dict[str, int], list[str]]:
    directory = workdir / "trimail"
    directory.mkdir()
    common, _ = traffic.prepare(directory, sink_port)
    settings = dict(line.split(" = ", 1) for line in _joined(common))
    config = write_main_cf(directory, master_service_disable="", smtpd_listen=f"{traffic.TRIMAIL_HOST}:0",
                           smtpd_workers="0", **settings)
    made = subprocess.run([sys.executable, "-m", "trimail", "postalias", "-c", str(config), str(directory / "aliases")],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    proc = serve_process(config)
    traffic.run_sessions(traffic.TRIMAIL_HOST, proc.port)
    maillog = directory / "maillog"

    def counts() -> dict[str, int]:
        with proc._cond:
            maillog.write_text("\n".join(proc.log) + "\n")
        return traffic.pflogsumm(maillog, "trimail")

    deadline = time.monotonic() + 15
    while (found := counts()) != traffic.EXPECTED and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.stop()
    return found, list(proc.log)


def _joined(text: str) -> list[str]:
    """main.cf lines with their continuation lines joined."""
    lines: list[str] = []
    for line in text.splitlines():
        if line[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line)
    return lines


def test_pflogsumm_counts_the_same_for_trimail_as_for_postfix(workdir, sink, serve_process):
    expected = postfix_counts(workdir, sink.port)
    found, log = trimail_counts(workdir, sink.port, serve_process)
    assert expected == traffic.EXPECTED  # the traffic still means what the comments say
    assert found == expected, "\n".join(log)
