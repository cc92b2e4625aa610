"""virtual(8) delivery end to end: a real serve delivers to virtual mailboxes under
virtual_mailbox_base as the mapped uid/gid, refuses unsafe paths and low uids, and
refuses an unknown virtual user at RCPT."""

from __future__ import annotations

import os
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from trimail.delivery.virtual import _Unsafe, mailbox_relative

OWNER = 5000  # not root, above virtual_minimum_uid


def _send(port: int, recipients: list[str]) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("alice@client.example")
        answers = [client.rcpt(r) for r in recipients]
        if any(code == 250 for code, _ in answers):
            client.data(b"Subject: virtual\r\n\r\nhello virtual\r\n")
    return answers


@pytest.fixture
def vmail() -> Iterator[Path]:
    """virtual_mailbox_base, owned by OWNER, where OWNER can reach it (pytest's tmp_path is 0700 root's)."""
    top = Path(tempfile.mkdtemp(prefix="trimail-vmail-"))
    top.chmod(0o755)
    base = top / "vmail"
    base.mkdir()
    os.chown(base, OWNER, OWNER)
    yield base
    shutil.rmtree(top)


def _serve(tmp_path: Path, serve_process, base: Path, mailboxes: str, **params: object):
    settings = {"master_service_disable": "", "virtual_mailbox_domains": "mbox.example",
                "virtual_mailbox_base": str(base), "virtual_mailbox_maps": f"inline:{{ {mailboxes} }}",
                "virtual_uid_maps": f"static:{OWNER}", "virtual_gid_maps": f"static:{OWNER}", **params}
    return serve_process(write_main_cf(tmp_path, **settings)), base


@pytest.mark.skipif(os.geteuid() != 0, reason="delivery as another uid needs root")
def test_a_real_serve_delivers_to_maildir_and_mbox_as_the_mapped_owner(tmp_path, serve_process, vmail):
    proc, base = _serve(tmp_path, serve_process, vmail, "joe@mbox.example=mbox.example/joe/, "
                                                 "ann@mbox.example=mbox.example/ann")
    answers = _send(proc.port, ["joe@mbox.example", "ann@mbox.example", "who@mbox.example"])
    assert [code for code, _ in answers] == [250, 250, 550]
    assert answers[2][1] == (b"5.1.1 <who@mbox.example>: Recipient address rejected: "
                             b"User unknown in virtual mailbox table")
    proc.wait_log(r"to=<joe@mbox.example>, relay=virtual.*status=sent \(delivered to maildir mbox.example/joe\)")
    proc.wait_log(r"to=<ann@mbox.example>, relay=virtual.*status=sent \(delivered to mailbox mbox.example/ann\)")
    [maildir_file] = list((base / "mbox.example" / "joe" / "new").iterdir())
    mbox = base / "mbox.example" / "ann"
    for path in (maildir_file, mbox, base / "mbox.example", base / "mbox.example" / "joe"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (OWNER, OWNER), path
    assert b"Delivered-To: joe@mbox.example\r\n" in maildir_file.read_bytes()
    assert b"hello virtual" in maildir_file.read_bytes()
    assert mbox.read_bytes().startswith(b"From alice@client.example ")


@pytest.mark.skipif(os.geteuid() != 0, reason="delivery as another uid needs root")
def test_unsafe_paths_symlinks_and_low_uids_are_never_written(tmp_path, serve_process, vmail):
    outside = vmail.parent / "outside"
    outside.mkdir()
    proc, base = _serve(tmp_path, serve_process, vmail,
                        "dots@mbox.example=../outside/, abs@mbox.example=/etc/x, "
                        "link@mbox.example=mbox.example/link/, root@mbox.example=mbox.example/root/",
                        virtual_uid_maps=f"inline:{{ root@mbox.example=0, @mbox.example={OWNER} }}")
    (base / "mbox.example").mkdir()
    os.chown(base / "mbox.example", OWNER, OWNER)
    os.symlink(outside, base / "mbox.example" / "link")  # planted by the mailbox owner
    answers = _send(proc.port, ["dots@mbox.example", "abs@mbox.example", "link@mbox.example",
                                "root@mbox.example"])
    assert [code for code, _ in answers] == [250] * 4
    proc.wait_log(r"to=<dots@mbox.example>.*dsn=5\.3\.5, status=bounced \(unsafe virtual mailbox path")
    proc.wait_log(r"to=<abs@mbox.example>.*dsn=5\.3\.5, status=bounced \(unsafe virtual mailbox path")
    proc.wait_log(r"to=<link@mbox.example>.*dsn=5\.3\.5, status=bounced \(.*symlinks are not followed")
    proc.wait_log(r"to=<root@mbox.example>.*dsn=4\.3\.5, status=deferred \(.*below virtual_minimum_uid")
    assert list(outside.iterdir()) == []
    assert not (base / "mbox.example" / "root").exists()


def test_virtual_delivery_without_a_base_defers_clearly(tmp_path, serve_process):
    proc, _ = _serve(tmp_path, serve_process, tmp_path, "joe@mbox.example=mbox.example/joe/", virtual_mailbox_base="")
    assert [code for code, _ in _send(proc.port, ["joe@mbox.example"])] == [250]
    proc.wait_log(r"to=<joe@mbox.example>.*dsn=4\.3\.5, status=deferred \(virtual mailbox delivery is not "
                  r"available")


@pytest.mark.parametrize("value", ["../x/", "a/../b", "/etc/passwd", "a//b", "./a", "a/\x1b[2J/", "a\nb", "",
                                   "/", "x" * 2000])
def test_unsafe_mailbox_paths_are_refused(value):
    with pytest.raises(_Unsafe):
        mailbox_relative(value)


@pytest.mark.parametrize("value, expected", [("d/u/", ("d/u", True)), ("d/u", ("d/u", False)),
                                             ("u.mbox", ("u.mbox", False))])
def test_safe_mailbox_paths(value, expected):
    assert mailbox_relative(value) == expected


def _agent(tmp_path: Path, base: Path, **params: object):
    from trimail import config as configuration
    from trimail.delivery.virtual import VirtualAgent

    settings = {"virtual_mailbox_domains": "mbox.example", "virtual_mailbox_base": str(base),
                "virtual_mailbox_maps": "inline:{ joe@mbox.example=mbox.example/joe/, ann@mbox.example=mbox.example/ann }",
                "virtual_uid_maps": f"static:{OWNER}", "virtual_gid_maps": f"static:{OWNER}", **params}
    return VirtualAgent(configuration.load(write_main_cf(tmp_path, **settings)))


@pytest.mark.skipif(os.geteuid() != 0, reason="delivery as another uid needs root")
def test_the_owner_write_is_a_fresh_process_not_a_fork_of_the_threaded_serve(tmp_path, vmail, monkeypatch):
    """A fork of a multi-threaded process keeps the locks other threads held; the
    write must be a new program (trimail.delivery.local.filewriter --virtual)."""
    def no_fork() -> int:
        raise AssertionError("os.fork() in a multi-threaded serve")

    monkeypatch.setattr(os, "fork", no_fork)
    agent = _agent(tmp_path, vmail)
    [joe, ann] = agent.deliver("alice@client.example", ["joe@mbox.example", "ann@mbox.example"],
                               b"Subject: x\r\n\r\nfresh\r\n")
    assert (joe.status, ann.status) == ("sent", "sent"), (joe, ann)
    [message] = list((vmail / "mbox.example" / "joe" / "new").iterdir())
    assert (message.stat().st_uid, message.stat().st_gid, message.stat().st_mode & 0o777) == (OWNER, OWNER, 0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="delivery as another uid needs root")
def test_a_locked_mbox_is_bounded_by_command_time_limit(tmp_path, vmail):
    import fcntl
    import time

    agent = _agent(tmp_path, vmail, command_time_limit="1s", mailbox_delivery_lock="fcntl",
                   deliver_lock_attempts="1000", deliver_lock_delay="1s")
    (vmail / "mbox.example").mkdir()
    mbox = vmail / "mbox.example" / "ann"
    mbox.touch()
    for path in (vmail / "mbox.example", mbox):
        os.chown(path, OWNER, OWNER)
    with open(mbox, "rb+") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        started = time.monotonic()
        [outcome] = agent.deliver("alice@client.example", ["ann@mbox.example"], b"Subject: x\r\n\r\nx\r\n")
    assert time.monotonic() - started < 5
    assert (outcome.status, outcome.dsn) == ("deferred", "4.3.0") and "time limit" in outcome.text, outcome
    assert mbox.read_bytes() == b""


def test_the_helper_side_trusts_only_the_recipient(tmp_path, vmail):
    """A forged request (another domain, a malformed field) writes nothing; the
    mailbox and its owner always come from the helper's own tables."""
    agent = _agent(tmp_path, vmail, virtual_uid_maps="static:0", virtual_minimum_uid="0")
    for request in ({"sender": "a@b", "recipient": "joe@elsewhere.example"}, {"sender": 7, "recipient": "joe@x"},
                    {"sender": "a@b"}, {"sender": "a@b", "recipient": "joe@mbox.example", "uid": OWNER,
                                         "mailbox": "mbox.example/joe/"}):
        status, _dsn, text = agent.privileged(request, b"Subject: x\r\n\r\nx\r\n")
        assert status in ("deferred", "bounced"), (request, text)
    assert "refusing to deliver as uid 0" in agent.privileged({"sender": "", "recipient": "joe@mbox.example"},
                                                              b"x")[2]
    assert list(vmail.iterdir()) == []
