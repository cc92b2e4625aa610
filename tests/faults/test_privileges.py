"""What root touches at start cannot be redirected by mail_owner, and the CLI says
"permission denied" to a user who may not look at the queue (issue 14, section 3).

serve starts as root with ``mail_owner = nobody``: the mail_owner account owns
the queue directory, so anything it planted there (a symlink named like the old
``master.lock``, a symlink to a root-owned file or directory) must not make root
write, truncate or chown the target.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import system_account
from tests.faults.conftest import assert_serving, trimail_cmd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start serve as root and change users")

PRECIOUS = b"root:precious-content:19000:0:99999:7:::\n"


@pytest.fixture
def queue() -> Iterator[Path]:
    """A queue directory nobody can reach by path (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="trimail-links-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim() -> Iterator[Path]:
    """A root-owned directory with a root-owned file, standing in for /etc/shadow."""
    path = Path(tempfile.mkdtemp(prefix="trimail-victim-", dir="/tmp"))
    (path / "shadow").write_bytes(PRECIOUS)
    (path / "shadow").chmod(0o640)
    (path / "inner").write_bytes(PRECIOUS)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unprivileged(queue: Path) -> dict[str, str]:
    return {"queue_directory": str(queue), "mail_owner": "nobody", "allow_root": "no",
            "alias_maps": "", "alias_database": "", "local_recipient_maps": ""}


def test_symlink_planted_as_master_lock_does_not_make_root_write_its_target(daemon, queue, victim):
    queue.chmod(0o700)
    os.symlink(victim / "shadow", queue / "master.lock")
    os.lchown(queue / "master.lock", pwd.getpwnam("nobody").pw_uid, -1)
    d = daemon(**unprivileged(queue))
    assert_serving(d)
    assert (victim / "shadow").read_bytes() == PRECIOUS
    assert (victim / "shadow").stat().st_uid == 0
    pid_file = queue / "pid" / "master.pid"
    assert pid_file.read_text().strip() == str(d.proc.proc.pid)
    assert pid_file.stat().st_uid == 0 and (queue / "pid").stat().st_uid == 0
    assert ((queue / "pid").stat().st_mode & 0o022) == 0
    status = trimail_cmd("status", "-c", str(d.config_path))
    assert status.returncode == 0 and f"pid {d.proc.proc.pid}" in status.stdout, status


def test_symlinks_planted_in_the_queue_tree_are_not_followed_by_the_chown_walk(daemon, queue, victim):
    os.symlink(victim / "shadow", queue / "looks-like-a-file")
    (queue / "sub").mkdir()
    os.symlink(victim, queue / "sub" / "looks-like-a-directory")
    d = daemon(**unprivileged(queue))
    assert_serving(d)
    for path in (victim, victim / "shadow", victim / "inner"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (0, 0), path
    assert (victim / "shadow").stat().st_mode & 0o777 == 0o640
    assert (queue / "sub").stat().st_uid == pwd.getpwnam("nobody").pw_uid


def test_hard_link_planted_in_the_queue_is_not_given_to_mail_owner(daemon, queue, victim):
    """Where fs.protected_hardlinks is off, mail_owner can link a root file into
    its queue directory: the chown walk must not hand that file over."""
    os.link(victim / "shadow", queue / "linked")
    d = daemon(**unprivileged(queue))
    assert_serving(d)
    st = (victim / "shadow").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o640)


def test_pid_directory_owned_by_mail_owner_is_refused_with_one_line(queue, tmp_path):
    from tests.conftest import write_main_cf

    (queue / "pid").mkdir()
    nobody = pwd.getpwnam("nobody")
    os.chown(queue / "pid", nobody.pw_uid, nobody.pw_gid)
    config_path = write_main_cf(tmp_path, **unprivileged(queue))
    result = trimail_cmd("serve", "-c", str(config_path), timeout=15)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if "fatal" in line]
    assert len(lines) == 1 and "pid" in lines[0] and "owned by uid" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_pid_file_replaced_by_a_symlink_is_refused_and_not_followed(queue, victim, tmp_path):
    from tests.conftest import write_main_cf

    (queue / "pid").mkdir(mode=0o755)
    os.symlink(victim / "shadow", queue / "pid" / "master.pid")
    config_path = write_main_cf(tmp_path, **unprivileged(queue))
    result = trimail_cmd("serve", "-c", str(config_path), timeout=15)
    assert result.returncode == 2, result
    assert "master.pid: cannot open safely" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert (victim / "shadow").read_bytes() == PRECIOUS


OUTSIDER = "trimail-test-x"


@pytest.fixture(scope="module")
def outsider() -> str:
    """An unprivileged local user who is neither root nor mail_owner."""
    system_account(OUTSIDER)
    return OUTSIDER


# The test interpreter lives under /root (0700), so another user cannot exec it: the
# child starts as root, imports the CLI, becomes *user* for good, then runs it.
_AS_USER = """
import os, pwd, sys
import trimail.cli, trimail.check, trimail.queue.lock, trimail.net.control, trimail.queue.store
import json, encodings.idna
entry = pwd.getpwnam(sys.argv[1])
os.setgroups([])
os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
trimail.cli.main(sys.argv[2:])
"""


def run_as(user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _AS_USER, user, *args], check=False, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[2])


def test_unprivileged_user_gets_permission_denied_not_a_traceback(daemon, queue, outsider):
    where = Path(tempfile.mkdtemp(prefix="trimail-cf-", dir="/tmp"))
    try:
        where.chmod(0o755)
        d = daemon(where, **unprivileged(queue))
        assert_serving(d)
        d.config_path.chmod(0o644)
        for args in (["status"], ["queue", "show", "X"], ["stop"], ["reload"]):
            result = run_as(outsider, *args, "-c", str(d.config_path))
            assert result.returncode != 0, (args, result)
            assert "Traceback" not in result.stderr, (args, result.stderr)
            assert "not running" not in result.stdout + result.stderr, (args, result)
            assert "permission denied: run as root or mail_owner" in result.stderr, (args, result.stderr)
        # the listing is any user's, through serve, as Postfix's mailq (tests/faults/test_public_queue.py)
        listing = run_as(outsider, "queue", "list", "-c", str(d.config_path))
        assert listing.returncode == 0 and "Mail queue is empty" in listing.stdout, listing
        assert_serving(d)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_dangling_symlinks_planted_as_the_queue_files_create_nothing_as_root(queue, victim, tmp_path):
    """mail_owner removed the queue and planted queue.db and queue.stamp as links to
    files that do not exist yet: root must not create (or chmod) them at start."""
    from tests.conftest import write_main_cf

    os.symlink(victim / "new-db", queue / "queue.db")
    os.symlink(victim / "nologin", queue / "queue.stamp")
    config_path = write_main_cf(tmp_path, **unprivileged(queue))
    result = trimail_cmd("serve", "-c", str(config_path), timeout=15)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result
    assert sorted(p.name for p in victim.iterdir()) == ["inner", "shadow"]
    os.unlink(queue / "queue.db")
    result = trimail_cmd("serve", "-c", str(config_path), timeout=15)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result
    assert sorted(p.name for p in victim.iterdir()) == ["inner", "shadow"]


def test_a_serve_of_the_previous_release_holding_master_lock_is_seen_and_not_written(tmp_path):
    """Upgrade: the old lock is only read - status/stop still find the old serve,
    and a new serve refuses to start beside it."""
    import fcntl

    from tests.conftest import write_main_cf
    from trimail.queue.lock import running_pid

    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    old = queue / "master.lock"
    old.write_text("4242\n")
    with open(old) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert running_pid(queue) == 4242
        result = trimail_cmd("serve", "-c", str(write_main_cf(tmp_path)), timeout=15)
        assert result.returncode == 1, result
        assert "an earlier trimail serve (pid 4242)" in result.stderr and "Traceback" not in result.stderr
    assert running_pid(queue) is None
    assert old.read_text() == "4242\n"
