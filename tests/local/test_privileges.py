"""Who local delivery runs as (Postfix local(8), issue 14 section 3): ``|command``
and ``/file`` targets from the alias table run as ``default_privs``, those from an
``:include:`` file as the include file's owner, never as root, never as
``mail_owner`` and never with root's supplementary groups; a world-writable
include file is refused, a group-writable one adds no file or command targets.

serve runs here as root (``allow_root = yes``, the test settings), the case in
which a 0666 include file used to make trimail write a file as uid 0.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.conftest import system_account, trimail
from tests.delivery.test_delivery import parse_dsn, send, wait_empty
from tests.local.test_local import maildir_messages
from tests.peers import Sink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change users")

OWNER = "trimail-test-x"


@pytest.fixture(scope="module")
def owner() -> pwd.struct_passwd:
    """An unprivileged user who owns include files and their target directories."""
    return system_account(OWNER)


def owned_dir(parent: Path, name: str, user: pwd.struct_passwd | None, mode: int = 0o700) -> Path:
    path = parent / name
    path.mkdir()
    path.chmod(mode)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def write_include(path: Path, text: str, user: pwd.struct_passwd | None, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def id_script(directory: Path) -> Path:
    """A program (no shell involved in trimail) that records who it runs as."""
    script = directory / "record-id"
    script.write_text("#!/bin/sh\ncat > /dev/null\n"
                      "printf '%s %s %s\\n' \"$(id -u)\" \"$(id -g)\" \"$(id -G)\" > \"$1\"\n")
    script.chmod(0o755)
    return script


def aliases_file(tmp_path: Path, text: str) -> str:
    aliases = tmp_path / "aliases"
    aliases.write_text(text)
    assert trimail("postalias", str(aliases)).returncode == 0
    return f"hash:{aliases}"


async def deliver(start_mta, alias_maps: str, recipient: str, *more: str, **params: str
                  ) -> list[tuple[str, str, str]]:
    """Send one message to the recipients; the DSN's per-recipient lines (none when delivered)."""
    with Sink() as senders:
        params.setdefault("allow_mail_to_commands", "alias, include")
        srv = await start_mta(alias_maps=alias_maps,
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}",
                              **params)
        await send(srv, "alice@client.example", [f"{name}@mx.test.example" for name in (recipient, *more)],
                   "Subject: priv\r\n\r\nx\r\n")
        await wait_empty(srv)
        if not senders.messages:
            return []
        return parse_dsn(senders.messages[0][2])[1]


async def test_world_writable_include_file_is_refused_and_writes_no_file(tmp_path, start_mta, public):
    out = owned_dir(public, "out", None, 0o777)
    include = write_include(public / "list.inc", f"{out / 'file'}\ncarol\n", None, 0o666)
    dsn = await deliver(start_mta, aliases_file(tmp_path, f"list: :include:{include}\n"), "list")
    assert not (out / "file").exists()
    assert dsn == [("rfc822; list@mx.test.example", "failed", "5.3.5")]


async def test_group_writable_include_file_adds_no_file_target_but_addresses_still_get_mail(
        tmp_path, start_mta, public):
    out = owned_dir(public, "out", None, 0o777)
    include = write_include(public / "list.inc", f"{out / 'file'}\ncarol\n", None, 0o664)
    dsn = await deliver(start_mta, aliases_file(tmp_path, f"list: :include:{include}\n"), "list")
    assert not (out / "file").exists()
    assert [m["Subject"] for m in maildir_messages(tmp_path / "queue" / "mailboxes", "carol")] == ["priv"]
    assert dsn == [("rfc822; list@mx.test.example", "failed", "5.3.5")]


async def test_file_target_from_include_is_written_as_the_include_file_owner(tmp_path, start_mta, public, owner):
    out = owned_dir(public, "out", owner)
    include = write_include(public / "list.inc", f"{out / 'file'}\n", owner, 0o644)
    dsn = await deliver(start_mta, aliases_file(tmp_path, f"list: :include:{include}\n"), "list")
    assert dsn == []
    st = (out / "file").stat()
    assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid)
    assert b"Subject: priv" in (out / "file").read_bytes()


async def test_file_target_in_a_root_only_directory_is_not_written(tmp_path, start_mta, public, owner):
    secret = owned_dir(public, "secret", None, 0o700)
    include = write_include(public / "list.inc", f"{secret / 'from-include'}\n", owner, 0o644)
    alias_maps = aliases_file(tmp_path, f"list: :include:{include}\nfile: {secret / 'from-alias'}\n")
    dsn = await deliver(start_mta, alias_maps, "list", "file")
    assert sorted(dsn) == [(f"rfc822; {name}@mx.test.example", "failed", "5.2.0") for name in ("file", "list")]
    assert list(secret.iterdir()) == []


async def test_command_runs_as_default_privs_without_root_groups(tmp_path, start_mta, public):
    out = owned_dir(public, "out", None, 0o777)
    script = id_script(public)
    alias_maps = aliases_file(tmp_path, f'pipe: "|{script} {out / "id"}"\n')
    assert await deliver(start_mta, alias_maps, "pipe") == []
    nobody = pwd.getpwnam("nobody")
    assert (out / "id").read_text().split() == [str(nobody.pw_uid), str(nobody.pw_gid), str(nobody.pw_gid)]


async def test_command_from_include_runs_as_the_include_file_owner(tmp_path, start_mta, public, owner):
    out = owned_dir(public, "out", owner)
    script = id_script(public)
    include = write_include(public / "list.inc", f'"|{script} {out / "id"}"\n', owner, 0o644)
    assert await deliver(start_mta, aliases_file(tmp_path, f"list: :include:{include}\n"), "list") == []
    assert (out / "id").read_text().split() == [str(owner.pw_uid), str(owner.pw_gid), str(owner.pw_gid)]


async def test_default_privs_names_the_identity_of_alias_commands(tmp_path, start_mta, public, owner):
    out = owned_dir(public, "out", owner)
    script = id_script(public)
    alias_maps = aliases_file(tmp_path, f'pipe: "|{script} {out / "id"}"\n')
    assert await deliver(start_mta, alias_maps, "pipe", default_privs=OWNER) == []
    assert (out / "id").read_text().split()[0] == str(owner.pw_uid)


def test_root_and_mail_owner_are_never_delivery_identities(owner):
    from trimail.delivery.local.identity import IdentityError, identity

    nobody = pwd.getpwnam("nobody")
    assert identity(None, "nobody", "trimail").uid == nobody.pw_uid
    assert identity(0, "nobody", "trimail").uid == nobody.pw_uid  # a root-owned include: default_privs
    assert identity(owner.pw_uid, "nobody", "trimail").user == OWNER
    for uid, default_privs, mail_owner, words in ((None, "root", "trimail", "privileged user root"),
                                                  (None, "nobody", "nobody", "the mail_owner"),
                                                  (owner.pw_uid, "nobody", OWNER, "the mail_owner"),
                                                  (None, "no-such-user-xyz", "trimail", "has no account")):
        with pytest.raises(IdentityError, match=words) as caught:
            identity(uid, default_privs, mail_owner)
        assert caught.value.dsn == "4.3.5"


async def test_command_is_deferred_rather_than_run_as_mail_owner(tmp_path, start_mta, public):
    from tests.conftest import wait_for
    from tests.delivery.test_delivery import queue, recipient_status

    out = owned_dir(public, "out", None, 0o777)
    script = id_script(public)
    alias_maps = aliases_file(tmp_path, f'pipe: "|{script} {out / "id"}"\n')
    srv = await start_mta(alias_maps=alias_maps, allow_mail_to_commands="alias", mail_owner="nobody")
    queue_id = (await send(srv, "alice@client.example", ["pipe@mx.test.example"])).rsplit(" ", 1)[-1]

    def deferred() -> bool:
        status = recipient_status(srv, queue_id).get("pipe@mx.test.example")
        return status is not None and status[0] == "deferred"

    await wait_for(deferred, 20)
    assert "the mail_owner" in recipient_status(srv, queue_id)["pipe@mx.test.example"][1]
    assert not (out / "id").exists() and queue(srv)


async def test_alias_table_owned_by_a_user_runs_its_commands_as_that_user(tmp_path, start_mta, public, owner):
    out = owned_dir(public, "out", owner)
    script = id_script(public)
    alias_maps = aliases_file(tmp_path, f'pipe: "|{script} {out / "id"}"\n')
    os.chown(tmp_path / "aliases.db", owner.pw_uid, owner.pw_gid)  # Postfix: the alias database's owner
    assert await deliver(start_mta, alias_maps, "pipe") == []
    assert (out / "id").read_text().split() == [str(owner.pw_uid), str(owner.pw_gid), str(owner.pw_gid)]


def test_serve_running_as_mail_owner_runs_commands_as_default_privs_through_its_root_helper(
        tmp_path, serve_process, public, owner):
    """Production: serve drops root for mail_owner, and a |command alias still runs
    as default_privs (nobody) - through the root helper it started before the
    drop - never as mail_owner and never with root's groups."""
    import time

    from tests.conftest import write_main_cf
    from tests.faults.conftest import send as smtp_send

    out = owned_dir(public, "out", None, 0o777)
    script = id_script(public)
    aliases = public / "aliases"
    aliases.write_text(f'pipe: "|{script} {out / "id"}"\nfile: {out / "mbox"}\n')
    assert trimail("postalias", str(aliases)).returncode == 0
    for path in (aliases, public / "aliases.db"):
        path.chmod(0o644)
    queue = owned_dir(public, "queue", None, 0o700)
    config_path = write_main_cf(tmp_path, queue_directory=str(queue), mail_owner=OWNER, allow_root="no",
                                master_service_disable="", alias_maps=f"hash:{aliases}", alias_database="",
                                local_recipient_maps="", allow_mail_to_commands="alias")
    proc = serve_process(config_path)
    smtp_send(proc.port, ["pipe@mx.test.example", "file@mx.test.example"])
    deadline = time.monotonic() + 20
    while not ((out / "id").exists() and (out / "mbox").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    nobody = pwd.getpwnam("nobody")
    assert (out / "id").read_text().split() == [str(nobody.pw_uid), str(nobody.pw_gid), str(nobody.pw_gid)], \
        "\n".join(proc.log)
    assert (out / "mbox").stat().st_uid == nobody.pw_uid
    proc.wait_log(r"to=<pipe@mx\.test\.example>.*status=sent")
    assert proc.stop() == 0


def test_root_helper_delivers_only_what_its_own_alias_expansion_yields(tmp_path, public):
    from trimail import config as configuration
    from trimail.delivery.local.agent import LocalAgent

    out = owned_dir(public, "out", None, 0o777)
    aliases = tmp_path / "aliases"
    aliases.write_text(f"file: {out / 'mbox'}\n")
    assert trimail("postalias", str(aliases)).returncode == 0
    from tests.conftest import write_main_cf

    agent = LocalAgent(configuration.load(write_main_cf(tmp_path, alias_maps=f"hash:{aliases}",
                                                        allow_mail_to_commands="alias")))
    forged = [{"kind": "command", "value": "/usr/bin/touch /tmp/owned", "sender": "", "recipient": "file@x",
               "domain": "x"},
              {"kind": "file", "value": str(out / "elsewhere"), "sender": "", "recipient": "file@x", "domain": "x"},
              {"kind": "file", "value": str(out / "mbox"), "sender": "", "recipient": "other@x", "domain": "x"},
              {"kind": "mailbox", "value": "root", "sender": "", "recipient": "file@x", "domain": "x"},
              {"kind": "file", "value": 7}]
    for request in forged:
        status, _, _ = agent.privileged(request, b"Subject: x\r\n\r\nx\r\n")
        assert status in ("deferred", "bounced"), request
    assert list(out.iterdir()) == []
    assert agent.privileged({"kind": "file", "value": str(out / "mbox"), "sender": "a@b", "recipient": "file@x",
                             "domain": "x"}, b"Subject: x\r\n\r\nx\r\n")[0] == "sent"
    assert (out / "mbox").stat().st_uid == pwd.getpwnam("nobody").pw_uid


# The root helper's channel (trimail.delivery.local.privileged): bounded messages, and a
# deadline on every wait so a slow or stuck helper cannot hold serve's threads.

def _fake_helper(script: str) -> subprocess.Popen[bytes]:
    """A stand-in for the root helper that reads requests and answers as *script* says."""
    import sys

    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


_READ_REQUEST = ("import json, sys, time\n"
                 "def request():\n"
                 "    size = json.loads(sys.stdin.buffer.readline())['size']\n"
                 "    sys.stdin.buffer.read(size)\n")


def test_the_helper_refuses_a_message_beyond_message_size_limit(tmp_path):
    import io
    import json

    from tests.conftest import write_main_cf
    from trimail import config as configuration
    from trimail.delivery.local.roothelper import MARGIN, serve_requests

    config = configuration.load(write_main_cf(tmp_path, message_size_limit="10000"))
    small = {"kind": "virtual", "sender": "a@b", "recipient": "x@nowhere.example"}
    for size, answered in ((100, True), (10000 + MARGIN + 1, False)):
        inp, out = io.BytesIO(json.dumps({**small, "size": size}).encode() + b"\n" + b"x" * size), io.BytesIO()
        serve_requests(config, inp, out)
        assert bool(out.getvalue()) is answered, size
        if not answered:
            assert inp.tell() < 1000  # it did not read the message either


def test_serve_does_not_send_the_helper_a_message_it_would_refuse():
    from trimail.delivery.local.privileged import Helper

    proc = _fake_helper(_READ_REQUEST + "request()\nprint(json.dumps({'status': 'sent'}), flush=True)\n")
    try:
        helper = Helper(proc, limit=1000, timeout=5)
        answer = helper.run({"kind": "virtual"}, b"x" * 1001)
        assert (answer["status"], answer["dsn"]) == ("bounced", "5.3.4")
        assert helper.run({"kind": "virtual"}, b"x" * 1000)["status"] == "sent"
    finally:
        proc.kill()
        proc.wait()


def test_a_helper_that_does_not_answer_costs_a_deferral_within_the_deadline_not_a_stuck_thread():
    import time

    from trimail.delivery.local.privileged import Helper, HelperGone

    # answers the first request after 1.5 s, the second at once
    proc = _fake_helper(_READ_REQUEST + "request()\ntime.sleep(1.5)\n"
                        "print(json.dumps({'status': 'sent', 'text': 'first'}), flush=True)\n"
                        "request()\nprint(json.dumps({'status': 'sent', 'text': 'second'}), flush=True)\n")
    try:
        helper = Helper(proc, limit=1000, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(HelperGone, match="did not answer within"):
            helper.run({"kind": "virtual"}, b"one")
        assert time.monotonic() - started < 2
        helper.timeout = 5
        assert helper.run({"kind": "virtual"}, b"two")["text"] == "second"  # the late answer is not taken for it
        assert helper.broken is None
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_helper_is_logged_once_and_every_later_request_is_deferred(caplog):
    from trimail.delivery.local.privileged import Helper, HelperGone

    proc = _fake_helper("import sys\nsys.exit(0)\n")
    proc.wait()
    helper = Helper(proc, limit=1000, timeout=5)
    for _ in range(3):
        with pytest.raises(HelperGone, match="restart serve"):
            helper.run({"kind": "file"}, b"x")
    gone = [r for r in caplog.records if "root delivery helper is gone" in r.getMessage()]
    assert len(gone) == 1 and "restart" in gone[0].getMessage()
