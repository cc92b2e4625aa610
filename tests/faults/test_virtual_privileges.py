"""virtual(8) delivery in production: serve started as root drops to ``mail_owner``
(``allow_root = no``) and its root helper (trimail.delivery.local.roothelper) writes
virtual mailboxes as their mapped owner (issue 14: deliveries a postmaster can
trust).  The helper trusts only the recipient and the message: it looks the
mailbox and the owner up itself, validates the path, refuses root, and never
follows a link planted in the mailbox path.  A helper that dies (kill -9) or
stops answering costs deferrals, never serve.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.faults.conftest import assert_serving, process_tree, send, trimail_cmd, wait_until
from tests.peers import Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start serve as root and change users")

OWNER = 5000  # virtual_uid_maps = static:5000, the usual virtual(8) setup


def production(public: Path, mailboxes: str, **params: object) -> dict[str, object]:
    base = public / "vmail"
    base.mkdir(exist_ok=True)
    os.chown(base, OWNER, OWNER)
    queue = public / "queue"
    queue.mkdir(mode=0o700, exist_ok=True)
    return {"queue_directory": str(queue), "mail_owner": "nobody", "allow_root": "no",
            "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
            "virtual_mailbox_domains": "mbox.example", "virtual_mailbox_base": str(base),
            "virtual_mailbox_maps": f"inline:{{ {mailboxes} }}",
            "virtual_uid_maps": f"static:{OWNER}", "virtual_gid_maps": f"static:{OWNER}", **params}


def every_file(top: Path) -> set[Path]:
    return {Path(root) / name for root, dirs, files in os.walk(top) for name in dirs + files}


def helper_pid(serve_pid: int) -> int:
    """The delivery helper: the process under serve (a child of serve, or of its
    qmgr worker) that runs ``trimail.delivery.local.roothelper``, as root (the fork server
    under a master is root too, and is not it)."""
    for pid in process_tree(serve_pid)[1:]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"trimail.delivery.local.roothelper" not in command:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["Uid"].split()[0] == "0":
            return pid
    raise AssertionError("serve has no root delivery helper")


def test_serve_as_mail_owner_delivers_to_virtual_mailboxes_as_the_mapped_owner(daemon, public):
    outside = public / "outside"
    outside.mkdir()
    before = every_file(outside)
    d = daemon(**production(public, "joe@mbox.example=mbox.example/joe/, ann@mbox.example=mbox.example/ann"))
    assert_serving(d)
    send(d.port, ["joe@mbox.example", "ann@mbox.example"], body=b"Subject: v\r\n\r\nhello virtual\r\n")
    d.proc.wait_log(r"to=<joe@mbox\.example>, relay=virtual.*status=sent \(delivered to maildir mbox\.example/joe\)")
    d.proc.wait_log(r"to=<ann@mbox\.example>, relay=virtual.*status=sent \(delivered to mailbox mbox\.example/ann\)")
    base = public / "vmail"
    [maildir_file] = list((base / "mbox.example" / "joe" / "new").iterdir())
    mbox = base / "mbox.example" / "ann"
    for path in (maildir_file, mbox):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (OWNER, OWNER, 0o600), path
    for path in every_file(base):
        assert os.lstat(path).st_uid == OWNER, path
    assert b"hello virtual" in maildir_file.read_bytes() and b"hello virtual" in mbox.read_bytes()
    assert b"Delivered-To: joe@mbox.example\r\n" in maildir_file.read_bytes()
    assert every_file(outside) == before
    assert_serving(d)


def test_helper_refuses_a_planted_symlink_and_root_owned_mailboxes(daemon, public):
    outside = public / "outside"
    outside.mkdir()
    params = production(public, "link@mbox.example=mbox.example/link/, file@mbox.example=mbox.example/file, "
                                "root@mbox.example=mbox.example/root/",
                        virtual_uid_maps=f"inline:{{ root@mbox.example=0, @mbox.example={OWNER} }}",
                        virtual_minimum_uid="0")
    domain = public / "vmail" / "mbox.example"
    domain.mkdir()
    os.chown(domain, OWNER, OWNER)
    os.symlink(outside, domain / "link")  # planted by the mailbox owner
    os.symlink(outside / "target", domain / "file")
    os.lchown(domain / "link", OWNER, OWNER)
    d = daemon(**params)
    send(d.port, ["link@mbox.example", "file@mbox.example", "root@mbox.example"])
    d.proc.wait_log(r"to=<link@mbox\.example>.*dsn=5\.3\.5, status=bounced \(.*symlinks are not followed")
    d.proc.wait_log(r"to=<file@mbox\.example>.*dsn=(5\.3\.5, status=bounced|4\.\d\.\d, status=deferred)")
    d.proc.wait_log(r"to=<root@mbox\.example>.*dsn=4\.3\.5, status=deferred \(.*uid 0")
    assert list(outside.iterdir()) == []
    assert not (domain / "root").exists()
    assert_serving(d)


def test_killing_the_root_helper_costs_only_deferrals(daemon, public):
    with Sink() as sink:
        d = daemon(**production(public, "joe@mbox.example=mbox.example/joe/",
                                relayhost=f"[127.0.0.1]:{sink.port}"))
        assert_serving(d)
        os.kill(helper_pid(d.proc.proc.pid), signal.SIGKILL)
        send(d.port, ["joe@mbox.example", "bob@relay.example"])
        d.proc.wait_log(r"to=<joe@mbox\.example>.*dsn=4\.3\.0, status=deferred \(.*helper")
        d.proc.wait_log(r"to=<bob@relay\.example>.*status=sent")
        wait_until(lambda: len(sink.messages) == 1)
        assert any("restart serve" in line for line in d.proc.log), "\n".join(d.proc.log[-20:])
        assert len([line for line in d.proc.log if "root delivery helper is gone:" in line]) == 1
        status = trimail_cmd("status", "-c", str(d.config_path))
        assert status.returncode == 0 and "warning: the root delivery helper" in status.stdout, status
        assert "restart serve" in status.stdout, status
        assert_serving(d)
        assert not (public / "vmail" / "mbox.example").exists()


def test_a_stuck_helper_does_not_starve_receiving_or_other_deliveries(daemon, public):
    """Deliveries waiting for a helper that does not answer (stopped here) hold
    worker threads; they must not be trio's shared ones, which the queue and the
    spool need: a large message to the relay is still received and delivered."""
    domains = [f"d{n}.example" for n in range(3)]
    with Sink() as sink:
        params = production(public, ", ".join(f"@{d}={d}/box/" for d in domains),
                            virtual_mailbox_domains=", ".join(domains), relayhost=f"[127.0.0.1]:{sink.port}")
        d = daemon(**params)
        assert_serving(d)
        helper = helper_pid(d.proc.proc.pid)
        os.kill(helper, signal.SIGSTOP)
        try:
            for n in range(45):  # more waiting deliveries than trio has shared threads (40)
                send(d.port, [f"u{n}@{domains[n % 3]}"])
            wait_until(lambda: sum("(queue active)" in line for line in d.proc.log) >= 45)
            large = b"Subject: large\r\n\r\n" + (b"x" * 998 + b"\r\n") * 600  # spooled to a file, read back
            send(d.port, ["bob@relay.example"], body=large)
            d.proc.wait_log(r"to=<bob@relay\.example>.*status=sent", timeout=15)
            wait_until(lambda: len(sink.messages) == 1)
        finally:
            os.kill(helper, signal.SIGKILL)
        d.proc.wait_log(r"to=<u44@d2\.example>.*dsn=4\.3\.0, status=deferred")
        assert_serving(d)
