"""Start-up and the mail log under faults: a queue that cannot be opened, a mail
log nobody reads, logrotate, and ``chroot = yes`` with files outside the jail."""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.faults.conftest import banner, integrity_ok, send, trimail_cmd, wait_until
from tests.ports import free_port

F_SETPIPE_SZ = 1031


class Background:
    """``trimail serve`` whose mail log is not stderr: a child process, killed at the end."""

    def __init__(self, config_path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[int, str]:
        if self.alive:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode("utf-8", "replace")


@pytest.fixture
def background() -> Iterator:
    started: list[Background] = []

    def start(config_path: Path) -> Background:
        started.append(Background(config_path))
        return started[-1]

    yield start
    for proc in started:
        if proc.alive:
            proc.proc.kill()
            proc.proc.wait(30)


def answers_220(port: int) -> bool:
    try:
        return banner(port, timeout=5).startswith("220 ")
    except OSError:
        return False


# -- defect 13: the queue is opened before any port is -------------------------------


def run_and_knock(config_path: Path, port: int) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run serve to its end while connecting to *port* as fast as possible; returns
    its result and the connections that were accepted meanwhile."""
    accepted: list[str] = []
    done = threading.Event()

    def knock() -> None:
        while not done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    accepted.append("accepted")
            except OSError:
                pass

    knocker = threading.Thread(target=knock, daemon=True)
    knocker.start()
    try:
        result = trimail_cmd("serve", "-c", str(config_path))
    finally:
        done.set()
        knocker.join(10)
    return result, accepted


@pytest.mark.parametrize("to_file", [False, True], ids=["stderr", "maillog_file"])
def test_a_queue_that_cannot_be_opened_is_one_fatal_line_before_any_port_opens(tmp_path, to_file):
    port = free_port()
    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    (queue / "queue.db").write_bytes(b"this is not an SQLite database\n" * 200)
    maillog = tmp_path / "maillog"
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", master_service_disable="",
                                **({"maillog_file": str(maillog)} if to_file else {}))
    result, accepted = run_and_knock(config_path, port)
    assert result.returncode != 0
    fatal = [line for line in result.stderr.splitlines() if "fatal" in line or "error" in line]
    assert len(fatal) == 1 and "queue.db" in fatal[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not accepted, f"serve accepted {len(accepted)} connection(s) before it failed"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    if to_file:  # the reason is in the mail log too
        assert [line for line in maillog.read_text().splitlines() if "fatal:" in line][0].endswith(
            fatal[0].split("fatal: ", 1)[1])


def test_a_certificate_that_cannot_be_loaded_is_fatal_before_any_port_opens(tmp_path):
    port = free_port()
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}",
                                smtpd_tls_cert_file=str(tmp_path / "missing.pem"))
    result, accepted = run_and_knock(config_path, port)
    assert result.returncode == 2, result.stderr
    fatal = [line for line in result.stderr.splitlines() if "fatal" in line]
    assert len(fatal) == 1 and "cannot load certificate" in fatal[0] and "Traceback" not in result.stderr
    assert not accepted, f"serve accepted {len(accepted)} connection(s) before it failed"


# -- defect 16: a mail log that blocks never stalls the event loop --------------------


def test_a_maillog_fifo_nobody_reads_does_not_stop_mail(tmp_path, background):
    fifo = tmp_path / "maillog"
    os.mkfifo(fifo)
    # a reader that exists (so serve can open the FIFO) but never reads: once the
    # one-page pipe is full, every write blocks, as a stopped journald or a hung disk would
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
        port = free_port()
        config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(fifo))
        serve = background(config_path)
        wait_until(lambda: answers_220(port) or not serve.alive, timeout=30)
        queued = [send(port, [f"r{n}@far.example"]) for n in range(40)]  # far more log than one page
        assert serve.alive and answers_220(port)
        assert len(set(queued)) == 40
        result = trimail_cmd("queue", "list", "--json", "-c", str(config_path))
        assert all(queue_id in result.stdout for queue_id in queued)
    finally:
        os.close(reader)
    status, err = serve.stop()
    assert status == 0 and "Traceback" not in err, err


def test_behind_a_maillog_that_stops_moving_every_message_is_delivered_before_the_next_arrives(
        tmp_path, background):
    """An smtpd worker has the qmgr worker woken about a message once its log lines
    about it are written (receive.commit, log.mark).  A message whose log mark was put before the destination stopped moving (its
    wake-up of the qmgr left to the log writer thread, which never gets there) is
    still delivered on its own, without another message to rescue it: the smtpd
    worker wakes the qmgr itself once the mark has waited STUCK_AFTER
    (scheduler.trigger.QmgrTrigger.wake_after).  Before, one of the messages
    around the point where the pipe filled sat in incoming for good."""
    from tests.peers import Sink

    fifo = tmp_path / "maillog"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
        with Sink() as sink:
            port = free_port()
            config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(fifo),
                                        smtpd_workers="2", master_service_disable="",
                                        relayhost=f"[127.0.0.1]:{sink.port}")
            serve = background(config_path)
            wait_until(lambda: answers_220(port) or not serve.alive, timeout=30)
            for n in range(60):  # far more log than the pipe holds: the writer blocks for good
                send(port, [f"r{n}@far.example"])
                wait_until(lambda: len(sink.messages) > n or not serve.alive, timeout=10)
                assert len(sink.messages) == n + 1, f"message {n} was not delivered on its own"
            assert serve.alive
    finally:
        os.close(reader)
    status, err = serve.stop()
    assert status == 0 and "Traceback" not in err, err


def test_maillog_is_reopened_after_logrotate_moves_it(tmp_path, background):
    maillog = tmp_path / "maillog"
    port = free_port()
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(maillog))
    serve = background(config_path)
    wait_until(lambda: maillog.exists() and "daemon started" in maillog.read_text(), timeout=30)
    first = send(port, ["a@far.example"])
    wait_until(lambda: first in maillog.read_text())
    maillog.rename(tmp_path / "maillog.1")  # what logrotate does (no signal)
    second = send(port, ["b@far.example"])
    wait_until(lambda: maillog.exists() and second in maillog.read_text())
    assert second not in (tmp_path / "maillog.1").read_text()
    status, _ = serve.stop()
    assert status == 0
    assert "terminating on stop request" in maillog.read_text()  # the last line is not lost at stop


# -- defect 12: chroot with files that live outside the jail ----------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chroot and change users")


@pytest.fixture
def jail() -> Iterator[Path]:
    """A queue directory outside pytest's root-only tmp tree (the jail)."""
    queue = Path(tempfile.mkdtemp(prefix="trimail-jail-", dir="/tmp"))
    try:
        yield queue
    finally:
        shutil.rmtree(queue, ignore_errors=True)


def chroot_config(tmp_path: Path, queue: Path, port: int, **extra: object) -> Path:
    pwd.getpwnam("nobody")
    return write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", queue_directory=str(queue),
                         mail_owner="nobody", allow_root="no", chroot="yes", master_service_disable="qmgr",
                         dns_nameservers="127.0.0.1:53", alias_maps="", alias_database="",
                         local_recipient_maps="", maillog_file=str(tmp_path / "maillog"),
                         **{"smtpd_workers": 0, **extra})  # the single process: serve itself is in the jail


@needs_root
def test_chroot_with_the_maillog_outside_the_jail_logs_and_serves(tmp_path, background, jail):
    port = free_port()
    maillog = tmp_path / "maillog"
    config_path = chroot_config(tmp_path, jail, port)
    serve = background(config_path)
    wait_until(lambda: (maillog.exists() and "daemon started" in maillog.read_text()) or not serve.alive,
               timeout=30)
    assert serve.alive, serve.stop()[1] + (maillog.read_text() if maillog.exists() else "")
    assert os.readlink(f"/proc/{serve.proc.pid}/root") == str(jail)
    queue_id = send(port, ["someone@far.example"])
    wait_until(lambda: f"{queue_id}: client=" in maillog.read_text())  # smtpd's line, at the first accepted RCPT
    assert answers_220(port)
    # main.cf lies outside the jail: reload cannot re-read it (as Postfix documents for
    # files a chrooted daemon needs later); it is refused with one line, serve stays up
    assert re.search(r"main.cf \S+ lies outside the jail", maillog.read_text())
    reload = trimail_cmd("reload", "-c", str(config_path))
    assert reload.returncode == 1 and len(reload.stderr.splitlines()) == 1, reload.stderr
    wait_until(lambda: "reload refused" in maillog.read_text())
    assert len([line for line in maillog.read_text().splitlines() if "reload refused" in line]) == 1
    assert answers_220(port) and serve.alive
    status, err = serve.stop()
    assert status == 0 and "Traceback" not in err, err
    assert "Traceback" not in maillog.read_text()
    assert integrity_ok(jail) == "ok"


@needs_root
def test_chroot_with_the_certificate_outside_the_jail_offers_starttls(tmp_path, background, jail, ca, cert):
    port = free_port()
    maillog = tmp_path / "maillog"
    config_path = chroot_config(tmp_path, jail, port, smtpd_tls_cert_file=str(cert))
    serve = background(config_path)
    wait_until(lambda: (maillog.exists() and "daemon started" in maillog.read_text()) or not serve.alive,
               timeout=30)
    assert serve.alive, serve.stop()[1] + (maillog.read_text() if maillog.exists() else "")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.starttls(context=context)
        client.ehlo("client.example")
        client.sendmail("alice@client.example", ["b@far.example"], "Subject: tls\r\n\r\nx\r\n")
    wait_until(lambda: re.search(r": client=", maillog.read_text()) is not None)
    reload = trimail_cmd("reload", "-c", str(config_path))
    # main.cf and the certificate lie outside the jail: reload is refused with one line
    # (or, with main.cf inside it, keeps the certificate loaded at start); never a crash
    wait_until(lambda: re.search(r"reload refused|reload -- version", maillog.read_text()) is not None)
    assert serve.alive and answers_220(port), reload.stderr
    status, err = serve.stop()
    assert status == 0 and "Traceback" not in err, err


def test_a_blocked_log_destination_drops_and_counts_lines_instead_of_blocking(tmp_path):
    """In-process: the logging call never waits for the destination; past the bound
    lines are dropped, counted, and reported once the destination moves again."""
    import logging

    from tests.conftest import mail_log
    from trimail import log as maillog

    fifo = tmp_path / "maillog"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    read = b""

    def drained() -> bool:
        nonlocal read
        try:
            read += os.read(reader, 65536)
        except BlockingIOError:
            pass
        return b"mail log line(s) dropped" in read

    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)
        with mail_log(maillog_file=str(fifo), bound=50):
            started = time.monotonic()
            for number in range(2000):
                logging.getLogger("trimail.smtpd").info("line %d %s", number, "x" * 100)
            assert time.monotonic() - started < 5  # 2000 lines into a full pipe, without waiting on it
            assert maillog.dropped_lines() > 1000
            wait_until(drained)
            assert b"trimail/smtpd[" in read and b"line 0 " in read
    finally:
        os.close(reader)


@needs_root
def test_chroot_with_the_maillog_inside_the_jail_follows_logrotate(tmp_path, background, jail):
    port = free_port()
    maillog = jail / "maillog"
    config_path = chroot_config(tmp_path, jail, port)
    config_path.write_text(config_path.read_text().replace(str(tmp_path / "maillog"), str(maillog)))
    serve = background(config_path)
    wait_until(lambda: (maillog.exists() and "daemon started" in maillog.read_text()) or not serve.alive,
               timeout=30)
    assert serve.alive, serve.stop()[1]
    first = send(port, ["a@far.example"])
    wait_until(lambda: first in maillog.read_text())
    maillog.rename(jail / "maillog.1")
    second = send(port, ["b@far.example"])
    wait_until(lambda: maillog.exists() and second in maillog.read_text())
    assert second not in (jail / "maillog.1").read_text()
    status, err = serve.stop()
    assert status == 0 and "Traceback" not in err, err


# -- red team 33b: the mail log is never opened through a symlink ---------------------


def test_a_symlink_planted_as_the_maillog_file_is_never_followed(tmp_path, background):
    """The master opens ``maillog_file`` as root: a user who may write its directory
    planted a symlink there and had root append to a root-only file, or create one
    anywhere (/etc/nologin), or (red team 33c) a FIFO of their own after logrotate
    moved the file, and read the log.  At start serve now refuses such a path; after
    a rotation it reopens nothing that is not root's and goes on with the moved file."""
    nobody = pwd.getpwnam("nobody")
    secret = tmp_path / "root-only"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    logs = tmp_path / "logs"
    logs.mkdir()
    os.chown(logs, nobody.pw_uid, nobody.pw_gid)  # a directory the user may write
    planted = logs / "maillog"
    planted.symlink_to(secret)
    os.lchown(planted, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(planted))
    refused = trimail_cmd("serve", "-c", str(config_path), timeout=30)
    assert refused.returncode != 0 and str(planted) in refused.stderr, refused.stderr
    assert secret.read_text() == "secret\n"
    planted.unlink()
    for plant in ("symlink", "dangling", "fifo"):
        port = free_port()
        config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(planted))
        serve = background(config_path)
        wait_until(lambda port=port: answers_220(port) or not serve.alive, timeout=30)
        assert serve.alive and stat.S_IMODE(planted.stat().st_mode) == 0o640  # it names every sender: not 0644
        moved = logs / f"maillog.{plant}"
        planted.rename(moved)  # logrotate
        reader = None
        if plant in ("symlink", "dangling"):  # (dangling: nothing there to stat, red team 33e)
            planted.symlink_to(secret if plant == "symlink" else tmp_path / "nowhere")
            os.lchown(planted, nobody.pw_uid, nobody.pw_gid)
        else:
            os.mkfifo(planted, 0o600)
            os.chown(planted, nobody.pw_uid, nobody.pw_gid)
            reader = os.open(planted, os.O_RDONLY | os.O_NONBLOCK)  # the user's reader
        send(port, ["r@far.example"])
        wait_until(lambda: "cannot reopen after it was moved" in moved.read_text(), timeout=30)
        assert serve.alive and secret.read_text() == "secret\n"
        if reader is not None:
            assert os.read(reader, 65536) == b"", "the log went to the user's FIFO"
            os.close(reader)
        fixed = logs / "maillog.new"  # the admin puts a proper file there: it is taken (red team 33d: never again)
        fixed.touch(mode=0o640)
        os.replace(fixed, planted)  # (made before the planted one goes: another inode number)
        send(port, ["again@far.example"])
        wait_until(lambda: "connect from" in planted.read_text(), timeout=30)
        status, err = serve.stop()
        assert status == 0 and "Traceback" not in err, err
        planted.unlink()


def test_maillog_file_dev_stdout_logs_to_standard_output(tmp_path):
    """Red team 33c: the first fix refused every symlink, and /dev/stdout is one (to
    /proc/self/fd/1): Postfix's documented container setting no longer started.  A
    symlink root owns in a directory only root may write is followed."""
    port = free_port()
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file="/dev/stdout")
    proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "trimail/master" in line, line + proc.stderr.read() if proc.poll() is not None else line
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_a_maillog_file_another_user_owns_in_roots_directory_is_written(tmp_path):
    """Red team 33d: logrotate's ``create 0640 syslog adm`` makes the log another
    user's, and serve refused to start with it (Postfix takes it).  In a directory
    only root may write, only root could have put it there: it is taken."""
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    log_file = logs / "maillog"
    log_file.touch(mode=0o640)
    os.chown(log_file, 65534, 65534)
    port = free_port()
    config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", maillog_file=str(log_file))
    proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "daemon started" in log_file.read_text() or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
