"""serve started as root: binds port 25, then runs as mail_owner (optionally chrooted), and mail flows."""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.peers import Sink
from trimail.processes.forkserver import children_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind port 25 and change users")


def ids(pid: int) -> tuple[list[int], list[int]]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()]


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
@pytest.mark.parametrize("chroot", [False, True], ids=["mail_owner", "mail_owner+chroot"])
def test_serve_drops_root_and_mail_still_flows(tmp_path, serve_process, chroot, workers):
    """One process: serve itself becomes mail_owner.  With workers: the master stays
    root (it starts workers, as Postfix's master(8)), and so does the fork server
    that forks them, and every worker, the processes that read from the network
    and deliver, runs as mail_owner."""
    nobody = pwd.getpwnam("nobody")
    queue = Path(tempfile.mkdtemp(prefix="trimail-priv-", dir="/tmp"))
    try:
        with Sink() as sink:
            config_path = write_main_cf(
                tmp_path, smtpd_listen="127.0.0.1:25", queue_directory=str(queue), mail_owner="nobody",
                allow_root="no", chroot="yes" if chroot else "no", master_service_disable="",
                relayhost=f"[127.0.0.1]:{sink.port}", alias_maps="", alias_database="", local_recipient_maps="",
                smtpd_workers=workers)
            proc = serve_process(config_path)
            assert proc.port == 25
            if workers:  # the master's one child is the fork server (root, as the master); the workers are its
                [server] = children_of(proc.proc.pid)
                assert ids(proc.proc.pid)[0] == [0] * 4 and ids(server)[0] == [0] * 4
                unprivileged = children_of(server)
            else:
                unprivileged = [proc.proc.pid]
            assert len(unprivileged) == (workers + 1 if workers else 1)
            for pid in unprivileged:
                uids, gids = ids(pid)
                assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4
                if chroot:
                    assert os.readlink(f"/proc/{pid}/root") == str(queue)
            assert (queue / "queue.db").stat().st_uid == nobody.pw_uid
            assert (queue.stat().st_mode & 0o777) == 0o700
            with smtplib.SMTP("127.0.0.1", 25, timeout=30) as client:
                client.sendmail("a@client.example", ["b@far.example"], "Subject: unprivileged\r\n\r\nx\r\n")
                # an internationalised domain: the idna package's UTS 46 table, which it
                # imports at the first such domain, must be loaded before the jail hid it
                client.sendmail("a@client.example", ["b@m\u00fcnchen.example"], "Subject: idn\r\n\r\nx\r\n",
                                mail_options=["SMTPUTF8"])
            deadline = time.monotonic() + 30
            while len(sink.messages) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            got = sorted(rcpts[0] for _, rcpts, _ in sink.messages)
            assert len(got) == 2 and got[0] == "b@far.example", got
            assert got[1] in ("b@m\u00fcnchen.example", "b@xn--mnchen-3ya.example"), got
            assert proc.stop() == 0
    finally:
        shutil.rmtree(queue, ignore_errors=True)


def test_root_or_missing_mail_owner_is_refused(tmp_path):
    from tests.conftest import trimail

    for owner, message in (("root", "has root privileges"), ("no-such-user-xyz", "does not exist")):
        config_path = write_main_cf(tmp_path, mail_owner=owner, allow_root="no")
        result = trimail("serve", "-c", str(config_path))
        assert result.returncode == 1 and message in result.stderr, result.stderr


def test_check_reports_wrong_owner_and_modes(tmp_path):
    from tests.conftest import trimail

    queue = tmp_path / "queue"
    queue.mkdir(mode=0o755)
    (queue / "queue.db").write_bytes(b"")
    (queue / "queue.db").chmod(0o644)
    config_path = write_main_cf(tmp_path, mail_owner="nobody", allow_root="no")
    result = trimail("check", "-c", str(config_path))
    assert "queue is accessible to other users (mode 755); expected 700" in result.stderr
    assert "queue.db is accessible to other users (mode 644); expected 600" in result.stderr
    assert "not mail_owner nobody" in result.stderr
