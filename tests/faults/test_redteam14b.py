"""Red team, round 2 of issue 14, against a real ``trimail serve`` started as root
that drops to ``mail_owner`` (production): what a local user who owns an
``:include:`` file, a compromised ``mail_owner`` and an outsider can make it do.

Roles: ``mail_owner`` is MO (a test account); BOB is a local user whose
``:include:`` file root's alias table names (``list: :include:/.../bob/list``).
A compromised ``mail_owner`` holds serve's ends of the root helper's pipes; the
tests act as it by opening the helper's standard input and output through
``/proc/PID/fd`` (the same pipes).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import system_account, trimail
from tests.faults.conftest import assert_serving, send
from tests.local.test_privileges import owned_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start serve as root and change users")

MAIL_OWNER = "trimail-rt-mo"
BOB = "trimail-rt-bob"
SECRET = "top secret line of a file bob may not read"


account = system_account


def production(public: Path, aliases: str, **params: object) -> dict[str, object]:
    """serve as root, dropping to MAIL_OWNER; root's alias table *aliases*."""
    mo = account(MAIL_OWNER)
    queue = owned_dir(public, "queue", None, 0o700)
    table = public / "aliases"
    table.write_text(aliases)
    assert trimail("postalias", str(table)).returncode == 0
    for path in (table, public / "aliases.db"):
        path.chmod(0o644)
    assert mo.pw_uid != 0
    return {"queue_directory": str(queue), "mail_owner": MAIL_OWNER, "allow_root": "no",
            "master_service_disable": "", "alias_maps": f"hash:{table}", "alias_database": "",
            "local_recipient_maps": "", "allow_mail_to_files": "alias, include", **params}


def secret_file(where: Path, owner: pwd.struct_passwd | None) -> Path:
    """A 0600 file only *owner* (root when None) may read."""
    path = where / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def bob_dir(public: Path) -> Path:
    bob = account(BOB)
    return owned_dir(public, "bob", bob, 0o755)


def ask_helper(config_path: Path, request: dict[str, object], content: bytes) -> dict[str, object]:
    """What a compromised mail_owner can do: write a request of its own to the
    root helper and read the answer.  The helper is started as serve starts it
    (as root, the configuration through a pipe), so that this test, not serve's
    answer reader, holds its pipes."""
    import pickle
    import select
    import sys

    from trimail import config as configuration
    from trimail.delivery.local.privileged import PACKAGE_ROOT

    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "trimail.delivery.local.roothelper", str(read_end)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(read_end,), cwd="/",
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PACKAGE_ROOT})
    os.close(read_end)
    with open(write_end, "wb") as pipe:
        pipe.write(pickle.dumps(configuration.load(config_path)))
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({**request, "id": 1, "size": len(content)}).encode() + b"\n" + content)
        proc.stdin.flush()
        assert select.select([proc.stdout], [], [], 20)[0], "the helper did not answer"
        return json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


# 1. An :include: file is read with the rights of the delivery it belongs to
#    (Postfix's include.c opens it with open_as(): default_privs for root's alias
#    table, the owner of a user's table or include file), never with serve's
#    (mail_owner) or the root helper's.  Before: a symlink from BOB's include file
#    to a file only mail_owner or root may read was read, and its lines came back
#    in the bounce ("bad alias target '...'") to a sender of BOB's choosing.

def test_an_include_file_linked_to_a_mail_owner_file_is_not_read_for_bob(daemon, public):
    mo = account(MAIL_OWNER)
    d = daemon(**production(public, f"list: :include:{public / 'bob' / 'list'}\n"))
    assert_serving(d)
    hidden = owned_dir(public, "mo", mo, 0o700)
    os.symlink(secret_file(hidden, mo), bob_dir(public) / "list")  # planted by bob
    send(d.port, ["list@localhost"], sender="bob@localhost")
    line = d.proc.wait_log(r"to=<list@localhost>.*status=(deferred|bounced)")
    assert SECRET not in "\n".join(d.proc.log), line
    assert_serving(d)


def test_a_compromised_mail_owner_cannot_make_the_root_helper_read_a_root_only_file(daemon, public):
    d = daemon(**production(public, f"list: :include:{public / 'bob' / 'list'}\n"))
    assert_serving(d)
    hidden = owned_dir(public, "root-only", None, 0o700)
    os.symlink(secret_file(hidden, None), bob_dir(public) / "list")
    answer = ask_helper(d.config_path, {"kind": "file", "value": "/nonexistent", "sender": "bob@localhost",
                                          "recipient": "list@localhost", "domain": "localhost"},
                        b"Subject: x\r\n\r\nx\r\n")
    assert answer["status"] in ("deferred", "bounced")
    assert SECRET not in json.dumps(answer), answer
    assert_serving(d)


# 2. The hand-over of the queue to mail_owner (trimail.privileges.hand_over, as
#    root at every start) never gives away a file of someone else: a regular file
#    with a second link was skipped, but a socket (or FIFO) was lchown'ed whatever
#    its link count, so a hard link to root's socket planted in the queue (where
#    fs.protected_hardlinks = 0, or left from before) gave mail_owner that socket.

def test_a_hard_link_to_a_root_socket_in_the_queue_is_not_given_to_mail_owner(daemon, public):
    import socket

    params = production(public, "")
    root_sock = public / "root.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(root_sock))
        root_sock.chmod(0o600)
        os.link(root_sock, Path(str(params["queue_directory"])) / "planted.sock")
        d = daemon(**params)
        assert_serving(d)
        st = os.stat(root_sock)
        assert (st.st_uid, st.st_gid) == (0, 0)
        sockets = [p for p in d.queue_directory.iterdir() if p.is_socket() and p.name != "planted.sock"]
        assert sockets and all(p.stat().st_uid == account(MAIL_OWNER).pw_uid for p in sockets)  # serve's own
    finally:
        listener.close()


# 3. A trailing dot in a class list: the resolver drops it (mbox.example. is the
#    domain mbox.example, class virtual mailbox), and so must the virtual agent's
#    own check in the root helper; it compared the raw list, so every delivery to
#    a mailbox owned by another uid was deferred until the mail bounced.

def test_a_trailing_dot_in_virtual_mailbox_domains_does_not_defer_every_delivery(daemon, public):
    from tests.faults.test_virtual_privileges import OWNER
    from tests.faults.test_virtual_privileges import production as virtual_production

    d = daemon(**virtual_production(public, "joe@mbox.example=mbox.example/joe/",
                                    virtual_mailbox_domains="mbox.example."))
    assert_serving(d)
    send(d.port, ["joe@mbox.example"])
    line = d.proc.wait_log(r"to=<joe@mbox\.example>.*status=(sent|deferred|bounced)")
    assert "status=sent" in line, line
    [message] = (public / "vmail" / "mbox.example" / "joe" / "new").iterdir()
    assert message.stat().st_uid == OWNER


# 4. A request the helper cannot parse ends it quietly (the documented bound):
#    a size that is not a finite number ("size": 1e999, NaN) raised
#    OverflowError out of the helper's loop, a traceback into serve's log.

@pytest.mark.parametrize("size", ["1e999", "-1e999", "NaN", '"12x"', "[1]", "null"])
def test_the_helper_ends_quietly_on_a_size_that_is_no_number(tmp_path, size):
    import io

    from tests.conftest import write_main_cf
    from trimail import config as configuration
    from trimail.delivery.local.roothelper import serve_requests

    config = configuration.load(write_main_cf(tmp_path))
    out = io.BytesIO()
    serve_requests(config, io.BytesIO(b'{"kind": "virtual", "size": %s}\nxx' % size.encode()), out)
    assert out.getvalue() == b""


# 5. One slow |command of a local user's include file (bounded only by
#    command_time_limit, 1000 s by default) held the one root helper, and every
#    other delivery that needs it - virtual mailboxes of other uids, other
#    users' files and commands - waited behind it (Postfix runs local(8) and
#    virtual(8) deliveries in parallel processes).

def sleeping_as(uid: int) -> list[int]:
    """The pids of this test's ``/bin/sleep 30`` commands running as *uid*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if cmdline == b"/bin/sleep\x0030\x00" and int(fields["Uid"].split()[0]) == uid:
            found.append(int(entry.name))
    return found


def test_a_slow_command_of_a_local_user_does_not_hold_up_other_users_deliveries(daemon, public):
    from tests.faults.conftest import wait_until
    from tests.faults.test_virtual_privileges import OWNER

    bob = account(BOB)
    include = bob_dir(public) / "list"
    include.write_text('"|/bin/sleep 30"\n')
    os.chown(include, bob.pw_uid, bob.pw_gid)
    base = owned_dir(public, "vmail", None, 0o755)
    os.chown(base, OWNER, OWNER)
    d = daemon(**production(public, f"slow: :include:{include}\n", allow_mail_to_commands="include",
                            command_time_limit="20s", virtual_mailbox_domains="mbox.example",
                            virtual_mailbox_base=str(base), virtual_mailbox_maps="inline:{ joe@mbox.example=joe/ }",
                            virtual_uid_maps=f"static:{OWNER}", virtual_gid_maps=f"static:{OWNER}"))
    assert_serving(d)
    try:
        send(d.port, ["slow@localhost"])
        wait_until(lambda: sleeping_as(bob.pw_uid), timeout=10)
        send(d.port, ["joe@mbox.example"])
        line = d.proc.wait_log(r"to=<joe@mbox\.example>.*status=", timeout=8)
        assert "status=sent" in line, line
    finally:
        for pid in sleeping_as(bob.pw_uid):  # the command this test started, by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert_serving(d)


# 6. The queue manager's local destination is the recipient's domain with
#    local_destination_concurrency_limit (2) workers, so two slow |commands of one
#    local user's include file held every local delivery of that domain - other
#    users' plain mailboxes too - for up to command_time_limit.  Postfix's local
#    transport has local_destination_recipient_limit = 1: the destination is the
#    recipient, and the concurrency limit applies per recipient; so does trimail's
#    scheduler now (_destination_key).

def test_slow_commands_of_one_local_user_do_not_hold_up_other_local_mailboxes(daemon, public):
    from tests.faults.conftest import wait_until

    bob = account(BOB)
    include = bob_dir(public) / "list"
    include.write_text('"|/bin/sleep 30"\n')
    os.chown(include, bob.pw_uid, bob.pw_gid)
    table = public / "aliases"
    table.write_text(f"slow: :include:{include}\n")
    assert trimail("postalias", str(table)).returncode == 0
    spool = owned_dir(public, "spool", None, 0o755)
    d = daemon(alias_maps=f"hash:{table}", alias_database="", local_recipient_maps="",
               allow_mail_to_commands="include", command_time_limit="20s", mail_spool_directory=str(spool),
               home_mailbox="Maildir/")
    assert_serving(d)
    try:
        send(d.port, ["slow@localhost"])
        send(d.port, ["slow@localhost"])
        wait_until(lambda: len(sleeping_as(bob.pw_uid)) == 2, timeout=10)
        send(d.port, ["joe@localhost"])
        line = d.proc.wait_log(r"to=<joe@localhost>.*status=", timeout=8)
        assert "status=sent" in line, line
    finally:
        for pid in sleeping_as(bob.pw_uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# 7. `trimail status` run by root prints what the control socket answers, and
#    the socket lives in the queue directory mail_owner owns: a compromised
#    mail_owner answering in serve's place wrote terminal escape sequences to
#    root's terminal (a retitled window, a forged line).  Printed now as '?'.

def test_status_prints_a_forged_control_answer_without_terminal_escapes(tmp_path):
    import socket
    import threading

    from tests.conftest import write_main_cf
    from tests.faults.conftest import trimail_cmd

    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    evil = "\x1b]0;owned\x07\x1b[2J"
    facts = {"pid": f"1{evil}", "uptime": 5, "listeners": [f"127.0.0.1:25{evil}"], "sessions": f"0{evil}",
             "delivery_helper": f"gone{evil}"}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(queue / "control"))
    server.listen()

    def answer() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    command = conn.recv(100)
                    reply = json.dumps(facts) if command.startswith(b"status") else f"error: no{evil}"
                    conn.sendall(reply.encode() + b"\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        config = write_main_cf(tmp_path, queue_directory=str(queue))
        status = trimail_cmd("status", "-c", str(config))
        reload = trimail_cmd("reload", "-c", str(config))
    finally:
        server.close()
    assert "running" in status.stdout and reload.returncode == 1, (status, reload)
    for result in (status, reload):
        assert "\x1b" not in result.stdout + result.stderr and "\x07" not in result.stdout + result.stderr, result


# 8. A |command's output was collected whole in memory (subprocess.run with
#    capture_output) for command_time_limit, by serve (as root) or by the root
#    helper, though only its last 200 characters are used: a local user's include
#    file running a chatty command grew a root process by gigabytes.  Only the
#    tail is kept now.

def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_command_writing_100_mb_does_not_grow_the_process_that_runs_it(daemon, public):
    bob = account(BOB)
    include = bob_dir(public) / "list"
    include.write_text('"|/usr/bin/head -c 100000000 /dev/zero"\n')
    os.chown(include, bob.pw_uid, bob.pw_gid)
    table = public / "aliases"
    table.write_text(f"chatty: :include:{include}\n")
    assert trimail("postalias", str(table)).returncode == 0
    d = daemon(alias_maps=f"hash:{table}", alias_database="", local_recipient_maps="",
               allow_mail_to_commands="include")
    assert_serving(d)
    before = peak_rss_kib(d.proc.proc.pid)
    send(d.port, ["chatty@localhost"])
    line = d.proc.wait_log(r"to=<chatty@localhost>.*status=")
    assert "status=sent" in line, line
    assert peak_rss_kib(d.proc.proc.pid) - before < 40_000, "serve grew by the command's output"
    assert_serving(d)
