"""Starting and stopping the test MTA on first use: misspelt options, the address it
really listens on, no leftover directory, an unlisted uid, trustme missing, the lazy
plugin, the session fixture's marker and late mail.  Addresses: 127.0.42.0/24."""

from __future__ import annotations

import gc
import os
import re
import shutil
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.ports import free_port
from trimail.testing import TestMTA, open_test_mta
from trimail.testing.shared import SharedTestMTA

LISTEN = "127.0.42.1:0"
ROOT = Path(__file__).resolve().parents[2]


def python(code: str, *, cwd: Path, env: dict[str, str] | None = None,
           prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*(prefix or []), sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=environment, check=False)


def send(host: str, port: int, subject: str = "hi") -> None:
    with smtplib.SMTP(host, port, timeout=30) as client:
        client.sendmail("app@example.org", ["ann@example.com"], f"Subject: {subject}\r\n\r\nx\r\n")


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def leftovers(directory: Path, *patterns: str) -> list[Path]:
    """The test MTAs' directories (``trimail-test-*``) and those being removed
    (``trimail-removing-*``) in *directory*; ``trimail-*`` adds the template queue."""
    return sorted(path for pattern in patterns or ("trimail-test-*", "trimail-removing-*")
                  for path in directory.glob(pattern))


# -- options ------------------------------------------------------------------------

def test_misspelt_parameter_is_refused_with_the_closest_name():
    with pytest.raises(TypeError, match=r"unknown option smtpd_recipent_limit \(did you mean smtpd_recipient_limit\?"):
        TestMTA(smtpd_recipent_limit=5)
    with pytest.raises(TypeError, match=r"did you mean require_tls\?"):
        TestMTA(requre_tls=True)
    with pytest.raises(TypeError, match=r"^TestMTA\(\): unknown option no_such_thing; the options are relay"):
        TestMTA(no_such_thing=1)


async def test_trio_form_refuses_a_misspelt_parameter_too():
    with pytest.raises(TypeError, match=r"open_test_mta\(\): unknown option smtpd_recipent_limit \(did you mean"):
        async with open_test_mta(smtpd_recipent_limit=5):
            pass


def test_host_is_the_address_it_listens_on():
    with TestMTA(smtpd_listen="127.0.42.5:0", smtpd_recipient_limit=1) as mta:
        assert mta.host == "127.0.42.5"
        send(mta.host, mta.port)
        assert mta.wait_for()[0].recipients == ["ann@example.com"]


def test_tls_without_trustme_says_which_extra_to_install(tmp_path):
    result = python(f"""
        import sys
        sys.modules["trustme"] = None  # as after a plain pip install trimail
        from trimail.testing import TestMTA
        TestMTA(tls=True, smtpd_listen="{LISTEN}").start()
        """, cwd=tmp_path)
    assert result.returncode == 1
    assert "ModuleNotFoundError: tls=True needs trustme" in result.stderr
    assert "pip install 'trimail[testing]'" in result.stderr


# -- no leftover directory ------------------------------------------------------------

def test_a_forgotten_test_mta_is_stopped_and_removed_when_collected():
    mta = TestMTA(smtpd_listen=LISTEN).start()
    directory, host, port = mta.directory, mta.host, mta.port
    assert directory is not None and directory.is_dir()
    del mta
    gc.collect()
    wait_until(lambda: not directory.exists())
    with pytest.raises(OSError):
        send(host, port)


def test_a_stop_asked_before_the_mta_is_ready_stops_it_as_soon_as_it_is():
    """A finalizer or another thread may stop a TestMTA whose serve is not ready yet:
    it must stop once ready, not run on (and leave its directory) while stop() waits."""
    from trimail.testing.sync import _Runner, shared_loop

    mta = TestMTA(smtpd_listen=LISTEN)
    runner = _Runner(mta, mta._options)
    runner.loop = loop = shared_loop()
    assert loop.token is not None
    loop.token.run_sync_soon(runner._stop_server)  # before the MTA's task even runs
    loop.spawn(runner._run)
    assert runner.done.wait(30), "the MTA did not stop"
    assert runner.error is None
    assert runner.directory is not None and not os.path.exists(runner.directory)


def test_a_test_mta_still_running_at_exit_leaves_no_directory(tmp_path):
    result = python(f"""
        from trimail.testing import TestMTA
        mta = TestMTA(smtpd_listen="{LISTEN}").start()   # never stopped
        print(mta.directory)
        """, cwd=tmp_path, env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path))
    assert leftovers(tmp_path, "trimail-*") == []


@pytest.mark.parametrize("after", [0, 0.001, 0.003, 0.01, None])
async def test_trio_form_cancelled_at_any_point_leaves_no_directory(tmp_path, monkeypatch, after):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with trio.CancelScope() as scope:
        if after is not None:
            scope.deadline = trio.current_time() + after
        async with open_test_mta(smtpd_listen=LISTEN) as mta:
            assert mta.directory.parent == tmp_path
            scope.cancel()
            await trio.sleep_forever()
    assert not leftovers(tmp_path)  # gone at once, with its files


@pytest.mark.parametrize("squatter_is", ["a directory", "an empty directory", "a file"])
def test_a_directory_is_removed_when_its_removal_name_is_taken(tmp_path, monkeypatch, squatter_is):
    """The stopped MTA's directory goes at once, and nothing else beside it is touched,
    not even what holds the name trimail-removing-<its suffix> (the name it was renamed
    to, for a thread to delete, until deleting at once proved cheaper; an empty
    directory of that name was replaced by the rename until the red team found it)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with TestMTA(smtpd_listen=LISTEN) as mta:
        directory = mta.directory
        squatter = tmp_path / directory.name.replace("trimail-test-", "trimail-removing-")
        if squatter_is == "a file":
            squatter.write_text("not the MTA's")
        else:
            squatter.mkdir()
            if squatter_is == "a directory":
                (squatter / "kept").write_text("not the MTA's")
        before = squatter.stat().st_ino
    assert not directory.exists()  # gone at once
    assert leftovers(tmp_path) == [squatter]
    assert squatter.stat().st_ino == before
    if squatter_is == "a directory":
        assert (squatter / "kept").read_text() == "not the MTA's"
    elif squatter_is == "an empty directory":
        assert list(squatter.iterdir()) == []


# -- a uid without a passwd entry (CI containers) -------------------------------------

def test_runs_as_a_uid_without_a_passwd_entry():
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to become an unlisted uid")
    uid = 54321
    import pwd

    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    become = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    work = Path(tempfile.mkdtemp(prefix="unlisted-"))  # in /tmp, which any uid may enter
    try:
        work.chmod(0o777)
        if python("import trimail", cwd=work, prefix=become).returncode != 0:
            pytest.skip(f"uid {uid} cannot run this Python or read this tree")
        result = python(f"""
            import os, smtplib
            from trimail.testing import TestMTA
            assert os.getuid() == {uid}
            with TestMTA(smtpd_listen="{LISTEN}") as mta:
                with smtplib.SMTP(mta.host, mta.port) as client:
                    client.sendmail("app@example.org", ["ann@example.com"], "Subject: unlisted\\r\\n\\r\\nx\\r\\n")
                print(mta.wait_for()[0].subject)
            """, cwd=work, env={"TMPDIR": str(work), "HOME": str(work)}, prefix=become)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "unlisted"
        assert leftovers(work, "trimail-*") == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the pytest plugin ------------------------------------------------------------------

def test_importing_the_plugin_imports_nothing_of_the_mta(tmp_path):
    result = python("""
        import sys
        import trimail.testing.plugin
        heavy = ("trio", "apsw", "dns", "trustme", "trimail.master", "trimail.testing.mta",
                 "trimail.testing.sync", "trimail.config")
        print(sorted(m for m in sys.modules if m.startswith(heavy)))
        from trimail.testing import TestMTA, open_test_mta, CapturedMessage, MTAAssertionError, TrioTestMTA
        print("trio" in sys.modules)
        """, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


SUITE = '''
import smtplib
import pytest

late = []


def open_transaction(mta):
    client = smtplib.SMTP(mta.host, mta.port)
    client.ehlo()
    assert client.mail("app@example.org")[0] == 250
    assert client.rcpt("late@example.com")[0] == 250
    return client


def test_1_leaves_a_transaction_open(trimail_mta_session):
    late.append(open_transaction(trimail_mta_session))


def test_2_late_mail_of_the_first_test_is_not_seen(trimail_mta_session):
    client = late.pop()
    assert client.data(b"Subject: late\\r\\n\\r\\nx\\r\\n")[0] == 250   # accepted, not captured
    client.quit()
    with smtplib.SMTP(trimail_mta_session.host, trimail_mta_session.port) as own:
        own.sendmail("app@example.org", ["ann@example.com"], "Subject: own\\r\\n\\r\\nx\\r\\n")
    assert [m.subject for m in trimail_mta_session.wait_for(subject="own")] == ["own"]
    assert [m.subject for m in trimail_mta_session.messages] == ["own"]


@pytest.mark.trimail(message_size_limit=1000)
def test_3_marker_on_the_session_fixture(trimail_mta_session):
    pass


@pytest.mark.trimail(smtpd_recipent_limit=5)
def test_4_misspelt_marker(trimail_mta):
    pass
'''


def test_session_fixture_drops_late_mail_and_refuses_a_marker(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "-p", "no:randomly", "-rA", str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    out = result.stdout
    assert "PASSED test_suite.py::test_1_leaves_a_transaction_open" in out, out[-4000:]
    assert "PASSED test_suite.py::test_2_late_mail_of_the_first_test_is_not_seen" in out, out[-4000:]
    assert re.search(r"ERROR at setup of test_3_marker_on_the_session_fixture _+\n"
                     r"@pytest.mark.trimail\(...\) options do not apply to trimail_mta_session, which the whole "
                     r"session shares: use the trimail_mta fixture", out), out[-4000:]
    assert re.search(r"ERROR at setup of test_4_misspelt_marker _+\n@pytest.mark.trimail\(...\): unknown option "
                     r"smtpd_recipent_limit \(did you mean smtpd_recipient_limit\?\)", out), out[-4000:]
    assert "During handling" not in out


def test_clear_of_a_shared_mta_drops_mail_whose_transaction_began_before():
    with SharedTestMTA(smtpd_listen=LISTEN) as mta:
        with smtplib.SMTP(mta.host, mta.port) as early:
            early.ehlo()
            early.mail("app@example.org")
            early.rcpt("late@example.com")
            mta.clear()
            assert early.data(b"Subject: late\r\n\r\nx\r\n")[0] == 250
            early.sendmail("app@example.org", ["ann@example.com"], "Subject: after\r\n\r\nx\r\n")
        assert [m.subject for m in mta.wait_for(subject="after")] == ["after"]
        assert [m.subject for m in mta.messages] == ["after"]


# -- test mode: what it gives up for speed (testmode.py) ------------------------------------

def test_a_queue_marked_unsafe_commits_without_fsync_and_no_other_does(tmp_path):
    from trimail.queue.database import Database, unsafe_skip_fsync

    def synchronous(directory):
        db = Database.open(directory)
        try:
            db.set_durable(True)
            return db.db.execute("PRAGMA synchronous").fetchone()[0]
        finally:
            db.close()

    assert synchronous(tmp_path / "a") == 2  # FULL
    unsafe_skip_fsync(tmp_path / "a")
    try:
        assert synchronous(tmp_path / "a") == 0  # OFF, even when asked to be durable
        assert synchronous(tmp_path / "b") == 2
    finally:
        unsafe_skip_fsync(tmp_path / "a", skip=False)
    assert synchronous(tmp_path / "a") == 2


def test_an_unsafe_queue_is_not_checkpointed_at_close_and_loses_nothing(tmp_path):
    from trimail.queue.database import Database, unsafe_skip_fsync

    def write_and_close(directory):
        db = Database.open(directory)
        db.db.execute("CREATE TABLE kept (v)")
        db.db.execute("INSERT INTO kept VALUES ('there')")
        db.close()

    write_and_close(tmp_path / "real")
    assert not (tmp_path / "real" / "queue.db-wal").exists()  # checkpointed into the file, WAL removed
    unsafe_skip_fsync(tmp_path / "test")
    try:
        write_and_close(tmp_path / "test")
        assert (tmp_path / "test" / "queue.db-wal").stat().st_size > 0  # left in the WAL: no checkpoint
        db = Database.open(tmp_path / "test")
        try:
            assert db.db.execute("SELECT v FROM kept").fetchall() == [("there",)]
        finally:
            db.close()
    finally:
        unsafe_skip_fsync(tmp_path / "test", skip=False)


def test_a_test_queue_keeps_its_wal_index_in_memory_and_is_locked_against_other_processes():
    from trimail.queue.database import Database

    with TestMTA(smtpd_listen=LISTEN) as mta:
        with smtplib.SMTP(mta.host, mta.port) as client:
            client.sendmail("app@example.org", ["ann@example.com"], "Subject: one\r\n\r\nx\r\n")
        mta.wait_for(subject="one")
        database = mta.directory / "queue" / "queue.db"
        assert database.exists() and not (mta.directory / "queue" / "queue.db-shm").exists()
        code = f"import sqlite3; sqlite3.connect({str(database)!r}, timeout=0).execute('SELECT 1 FROM message')"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode != 0 and "database is locked" in result.stderr
        # trimail's own commands say what it is at once, rather than wait out the busy timeout
        # and (queue list --json) print an empty queue (found by the red team)
        began = time.monotonic()
        listing = subprocess.run([sys.executable, "-m", "trimail", "queue", "list", "--json", "-c",
                                  str(mta.directory / "main.cf")], capture_output=True, text=True, timeout=60,
                                 check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert time.monotonic() - began < 20
        assert listing.returncode != 0 and listing.stdout.strip() != "[]"
        assert "the queue of a trimail.testing test MTA" in listing.stderr
        own = Database.open(mta.directory / "queue", readonly=True)  # the test's own process reads it as usual
        try:
            assert own.db.execute("SELECT count(*) FROM message").fetchone()[0] == 1
        finally:
            own.close()


def test_a_start_that_fails_after_binding_leaves_no_socket_listening():
    """A configuration that fails once the listener is bound (a bad restriction list)
    raises from start(), and the port is free again: an embedding process keeps no
    listening socket of it (found by the red team)."""
    from trimail.config import ConfigError

    port = free_port("127.0.42.1")
    for _ in range(2):
        with pytest.raises(ConfigError):
            TestMTA(smtpd_listen=f"127.0.42.1:{port}", smtpd_recipient_restrictions="no_such_restriction").start()
        with socket.socket() as again:  # EADDRINUSE while a listener of the failed start is open
            again.bind(("127.0.42.1", port))
            again.listen()


def test_the_directories_are_in_memory_unless_a_temporary_directory_is_named(tmp_path):
    from trimail.testing import testmode

    code = """
        from trimail.testing import TestMTA
        with TestMTA(smtpd_listen="{listen}") as mta:
            print(mta.directory.parent)
        """.format(listen=LISTEN)
    environment = {name: value for name, value in os.environ.items() if name not in ("TMPDIR", "TEMP", "TMP")}
    if testmode._in_memory_usable():
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                                timeout=120, env={**environment, "PYTHONPATH": str(ROOT)}, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "/dev/shm"
    named = python(code, cwd=tmp_path, env={"TMPDIR": str(tmp_path)})
    assert named.returncode == 0, named.stderr
    assert named.stdout.strip() == str(tmp_path)


def test_a_small_or_missing_dev_shm_is_not_used(monkeypatch):
    from trimail.testing import testmode

    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    testmode._in_memory_usable.cache_clear()
    try:
        monkeypatch.setattr(testmode, "IN_MEMORY_FREE", 1 << 62)  # more than any /dev/shm has free
        assert testmode.scratch_parent() is None
        testmode._in_memory_usable.cache_clear()
        monkeypatch.setattr(testmode, "IN_MEMORY_FREE", 1)
        monkeypatch.setattr(testmode, "IN_MEMORY", "/nonexistent-shm")
        assert testmode.scratch_parent() is None
        monkeypatch.setattr(tempfile, "tempdir", "/somewhere/else")  # a test or the user named one
        monkeypatch.setattr(testmode, "IN_MEMORY", "/dev/shm")
        testmode._in_memory_usable.cache_clear()
        assert testmode.scratch_parent() is None
    finally:
        testmode._in_memory_usable.cache_clear()


def test_every_mta_logs_the_start_time_warnings_found_once_per_set_of_options(caplog):
    from trimail.testing import testmode

    options = {"smtpd_listen": LISTEN, "transport_maps": "hash:/nonexistent/trimail-transport"}
    with caplog.at_level("WARNING", logger="trimail"):
        for _ in range(3):  # whichever test runs first, each sees the warning (no order dependence)
            with TestMTA(**options) as mta:
                assert mta.server.config.start_warnings is not None
        with TestMTA(**options, smtpd_recipient_limit=7):  # other options: found again
            pass
    found = [r for r in caplog.records if "neither /nonexistent/trimail-transport" in r.getMessage()]
    assert len(found) == 4
    assert sum("transport_maps" in str(shape.warnings) for shape in testmode._shapes.values()) >= 2


async def test_the_test_mta_queue_is_unsynced_and_forgotten_when_it_stops():
    from trimail.queue import database

    async with open_test_mta(smtpd_listen=LISTEN) as mta:
        level = await mta.server.writer.run(lambda store: store.db.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 0
        queue = os.path.realpath(mta.directory / "queue")
        assert queue in database._UNSAFE_UNSYNCED
    assert queue not in database._UNSAFE_UNSYNCED


def test_one_ca_per_process_and_a_cheap_password_hash():
    with TestMTA(smtpd_listen=LISTEN, tls=True, auth={"app": "secret"}) as first, \
         TestMTA(smtpd_listen=LISTEN, tls=True, auth={"app": "secret"}, require_auth=True) as second:
        assert first.ca is second.ca
        assert Path(first.ca_file).read_bytes() == Path(second.ca_file).read_bytes()
        assert (second.directory / "sasl_passwd").read_text().startswith("app:scrypt$2$1$1$")
        with smtplib.SMTP(second.host, second.port, timeout=30) as client:
            client.starttls(context=first.ssl_context())
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("app", "wrong")
            client.login("app", "secret")
            client.sendmail("app@example.org", ["ann@example.com"], "Subject: tls\r\n\r\nx\r\n")
        assert second.wait_for()[0].auth == "app"


def test_mtas_with_the_same_options_share_the_checked_configuration_but_not_their_directories():
    from trimail.config import ConfigError
    from trimail.testing.testmode import SharedConfig

    with TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit=2) as first, \
         TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit=2) as second:
        for mta in (first, second):
            assert mta.server.config.queue_directory == str(mta.directory / "queue")
            assert str(mta.directory / "queue") in mta.server.config.address_verify_map  # $queue_directory/...
            assert mta.server.config.expand("smtpd_sasl_password_file").startswith(str(mta.directory))
            assert mta.server.config.smtpd_recipient_limit == 2
        assert isinstance(second.server.config, SharedConfig)
        refused = {}
        with smtplib.SMTP(second.host, second.port, timeout=30) as client:
            refused = client.sendmail("app@example.org", ["a@example.com", "b@example.com", "c@example.com"],
                                      "Subject: limit\r\n\r\nx\r\n")
        assert list(refused) == ["c@example.com"]
    for _ in range(2):  # a bad value is refused every time, not only the first
        with pytest.raises(ConfigError, match="smtpd_recipient_limit"):
            TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit="many").start()


def test_mtas_with_the_same_options_share_what_is_derived_from_them():
    with TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit=3) as first, \
         TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit=3) as second, \
         TestMTA(smtpd_listen=LISTEN, smtpd_recipient_limit=3) as third:
        for mta in (first, second, third):  # one per configuration: router and policy alike
            assert mta.server.context.policy.rewrite is mta.server.scheduler.router.rewrite
        assert second.server.context.policy.rewrite is third.server.context.policy.rewrite
        assert second.server.stress_limits is third.server.stress_limits
        assert second.server.config.queue_directory != third.server.config.queue_directory
        send(third.host, third.port)
        assert third.wait_for()[0].recipients == ["ann@example.com"]


def test_a_later_mta_with_the_same_options_has_main_cf_as_parsing_its_own_would_give():
    """main.cf is parsed once per set of options; each later MTA's settings (values,
    where each was set, the parser's warnings) name its own file, as a parse would."""
    from trimail.config.syntax import parse_main_cf

    options = dict(smtpd_listen=LISTEN, smtpd_banner="$myhostname at $queue_directory", message_size_limit=12345)
    for _ in range(3):
        with TestMTA(**options) as mta:
            config = mta.server.config
            path = mta.directory / "main.cf"
            settings, warnings = parse_main_cf(path.read_text(), str(path))
            assert config.explicit_names() == sorted(settings)
            assert [(config.raw(name), config.where(name)) for name in sorted(settings)] == \
                [(settings[name].value, settings[name].where) for name in sorted(settings)]
            assert config.warnings == warnings
            assert config.path == path and config.raw("queue_directory") == str(mta.directory / "queue")


@pytest.mark.parametrize("concurrent", [False, True])
def test_what_mtas_with_the_same_options_share_never_names_one_of_their_directories(concurrent):
    """A restriction's table and the banner that name ``$queue_directory``: each MTA
    uses its own (found by the red team: the restriction lists and protocol
    settings shared per set of options had kept the first MTA's directory, and the
    second MTA answered 451 for every recipient, its table gone with the first)."""
    options = dict(smtpd_listen=LISTEN, smtpd_banner="$myhostname ESMTP at $queue_directory",
                   smtpd_recipient_restrictions="check_recipient_access regexp:$queue_directory/../rcpt.re, "
                                                "permit_mynetworks, reject")

    def check(mta: TestMTA, who: str) -> None:
        (mta.directory / "rcpt.re").write_text(f"/^{who}@far\\.example$/ REJECT no {who}\n")
        with smtplib.SMTP(timeout=30) as client:
            code, banner = client.connect(mta.host, mta.port)
            assert code == 220 and str(mta.directory / "queue") in banner.decode()
            client.ehlo("client.example")
            client.mail("app@example.org")
            assert client.rcpt(f"{who}@far.example") == (554, f"5.7.1 <{who}@far.example>: Recipient address "
                                                              f"rejected: no {who}".encode())
            assert client.rcpt("other@far.example")[0] == 250

    if concurrent:
        with TestMTA(**options) as first, TestMTA(**options) as second:
            check(first, "first")
            check(second, "second")
            check(first, "first")  # the first still reads its own table
    else:
        for who in ("first", "second", "third"):
            with TestMTA(**options) as mta:
                check(mta, who)


def test_one_mta_failing_to_start_does_not_disturb_the_others():
    from trimail.config import ConfigError

    with TestMTA(smtpd_listen=LISTEN) as running:
        with pytest.raises(ConfigError):
            TestMTA(smtpd_listen=LISTEN, message_size_limit="huge").start()
        send(running.host, running.port, subject="still here")
        assert running.wait_for()[0].subject == "still here"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_test_mtas_of_its_own_and_leaves_its_parents_alone():
    import atexit

    with TestMTA(smtpd_listen=LISTEN) as parent:
        pid = os.fork()
        if pid == 0:  # the child: the parent's loop thread is not there
            code = 1
            try:
                with TestMTA(smtpd_listen=LISTEN) as child:
                    send(child.host, child.port, subject="child")
                    code = 0 if child.wait_for()[0].subject == "child" else 1
                atexit._run_exitfuncs()  # as the child's interpreter would at its exit
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert parent.directory.is_dir()
        send(parent.host, parent.port, subject="parent")
        assert [m.subject for m in parent.wait_for()] == ["parent"]


async def test_a_queue_writer_cancelled_while_starting_leaves_no_thread(tmp_path):
    from trimail.queue.store import Store
    from trimail.queue.writer import QueueWriter

    writer = QueueWriter(lambda: Store.open(tmp_path / "queue"))
    with trio.CancelScope() as scope:
        scope.cancel()
        async with writer:
            pytest.fail("the writer started inside a cancelled scope")
    assert writer._thread is not None and not writer._thread.is_alive()


@pytest.mark.parametrize("options", [{}, {"tls": True, "auth": {"app": "secret"}}], ids=["plain", "tls-auth"])
def test_a_stopped_test_mta_and_its_sessions_leave_nothing_to_the_garbage_collector(options):
    """What a test MTA and its SMTP sessions made is freed by reference counting when
    they end: no reference cycle of trimail's keeps them for the garbage collector
    (whose work was about a tenth of a start + stop)."""

    def run() -> None:
        with TestMTA(smtpd_listen=LISTEN, **options) as mta:
            with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
                if options:
                    client.starttls(context=mta.ssl_context())
                    client.login("app", "secret")
                client.sendmail("app@example.org", ["ann@example.com"], "Subject: hi\r\n\r\nx\r\n")
            mta.wait_for(1)

    run()  # the first: imports, what MTAs with the same options share
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        left = sorted({f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                       if type(o).__module__.startswith("trimail")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # trio's SSLStream is a cycle of its own (its handshake _Once holds its bound method),
    # and it holds the connection's stream under it: that one is trio's, not ours
    allowed = ["trimail.net.stream.DirectStream"] if options else []
    assert left in ([], allowed)


def test_what_a_test_kept_of_a_stopped_and_freed_mta_still_answers():
    """Red team: the metrics, queue manager or policy a test kept outlive the Server they
    read, which holds them weakly: the exposition still works, the loop check sees no
    address of ours, and the policy finds no recipient unlisted (no ReferenceError)."""
    mta = TestMTA(smtpd_listen=LISTEN, relay=True)
    mta.start()
    metrics, scheduler, policy = mta.server.metrics, mta.server.scheduler, mta.server.context.policy
    send(mta.host, mta.port)
    mta.wait_for(1)
    mta.stop()
    del mta
    gc.collect()
    assert b"trimail_smtpd_sessions 0.0" in metrics.exposition()
    assert scheduler.connector.own() == []
    assert trio.run(policy.unlisted, "nobody@localhost") is None


def _task_names(task: trio.lowlevel.Task) -> list[str]:
    names = [task.name]
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            names += _task_names(child)
    return names


async def test_a_test_mta_runs_no_cache_cleanup_task_and_no_control_socket_but_serve_does(tmp_path):
    """The address-verification cache of a test MTA is a file in its queue, deleted
    with it within seconds: no task waits 12 hours to expire its entries.  A test MTA
    is driven through its Python object, so it binds no control socket either.  A
    serve with a queue of its own keeps both."""
    from tests.conftest import write_main_cf
    from trimail import config as configuration
    from trimail.master import serve
    from trimail.net.control import CONTROL_NAME

    def tasks(part):
        return [name for name in _task_names(trio.lowlevel.current_root_task()) if part in name]

    async with open_test_mta(smtpd_listen=LISTEN) as mta:
        assert not tasks("clean_cache") and not tasks("serve_control")
        assert not os.path.lexists(mta.directory / "queue" / CONTROL_NAME)
    path = write_main_cf(tmp_path, smtpd_listen=LISTEN)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, configuration.load(path))
        await trio.testing.wait_all_tasks_blocked()  # (the control socket's task starts the public socket's too)
        assert tasks("clean_cache") and tasks("serve_control") and tasks("serve_public")
        assert stat.S_ISSOCK(os.lstat(os.path.join(server.config.queue_directory, CONTROL_NAME)).st_mode)
        server.stop()
