"""The two MTAs of ``scripts/bench``, each fresh in a temporary directory.

Addresses (loopback, ephemeral ports): trimail listens on 127.0.21.1, the
``smtp-sink`` of end-to-end runs on 127.0.21.2, Postfix on 127.0.21.3.

trimail runs ``trimail serve`` in a session of its own (so that its workers, if
``smtpd_workers`` makes any, are found by session id, like Postfix's daemons) with
``smtpd_workers`` set from ``--workers``; ``stop`` ends it with SIGTERM and then
ends by pid whatever of its session outlived it.  Postfix is Debian's package run
from a configuration directory of its own (as tests/postfix_peer.py, on this
benchmark's address).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.postfix_peer
from bench_procs import tree_pids

from tests.postfix_peer import postfix_master_cf

TRIMAIL_ADDRESS = "127.0.21.1"
SINK_ADDRESS = "127.0.21.2"
POSTFIX_ADDRESS = "127.0.21.3"


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def listening(address: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((address, port)) == 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)  # polling another process's state, with a deadline


class Trimail:
    """``trimail serve`` with *workers* as ``smtpd_workers`` (None: the default)."""

    name = "trimail"

    def __init__(self, workdir: Path, relay: tuple[str, int] | None, workers: str | None = None) -> None:
        self.workdir = workdir / "trimail"
        self.workdir.mkdir()
        self.address, self.port = TRIMAIL_ADDRESS, free_port(TRIMAIL_ADDRESS)
        config = self.workdir / "main.cf"
        config.write_text(
            f"smtpd_listen = {self.address}:{self.port}\n"
            f"queue_directory = {self.workdir / 'queue'}\n"
            "myhostname = bench.example\n"
            "smtpd_client_connection_count_limit = 0\n"
            "smtpd_process_limit = 20000\n"
            "alias_maps =\nalias_database =\nlocal_recipient_maps =\n"
            "allow_root = yes\n"  # the benchmark runs as root, like the Postfix it is compared with
            + (f"smtpd_workers = {workers}\n" if workers is not None else "")
            + (f"relayhost = [{relay[0]}]:{relay[1]}\n" if relay else "master_service_disable = qmgr\n")
        )
        self.log_path = self.workdir / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config)],
                                         stderr=log, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while "daemon started" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit("bench: trimail serve did not start:\n" + self.log_path.read_text())
            time.sleep(0.05)  # polling the log of another process, with a deadline

    def root_pid(self) -> int | None:
        return self.proc.pid

    def queue_size(self) -> int:
        db = sqlite3.connect(f"file:{self.workdir / 'queue' / 'queue.db'}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute("SELECT count(*) FROM message").fetchone()[0]
        finally:
            db.close()

    def stop(self) -> None:
        """SIGTERM to serve (its master stops its workers), then SIGKILL by pid to any
        process of its tree still alive: a benchmark must not leave daemons behind."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in tree_pids(self.proc.pid):  # its session outlives it: orphans are still found
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# Postfix with delivery off, for accept runs: every message is put on hold at DATA,
# so cleanup moves it to the hold queue, which qmgr (running as usual) does not read
# (one static lookup and one log line per message more than trimail's accept run).
# Not master_service_disable: it names a service as name/type, so a bare "qmgr" (what
# trimail takes) disables nothing and qmgr, smtp and bounce tried to deliver during
# every accept run until 2026-12-02; and with "qmgr/unix" cleanup tries to wake the
# missing qmgr for every message ("unable to look up public/qmgr") at about 20 msg/s.
# With qmgr/unix off and the hold, the rate was the same or lower (1 KiB, 20
# sessions, 2,000 messages, 3 alternating rounds: 394 against 545 msg/s median
# one message per connection, 445 against 471 with reuse).
ACCEPT_ONLY = "smtpd_data_restrictions = check_client_access static:HOLD\n"


class Postfix:
    """Debian's Postfix from a configuration directory of its own, on POSTFIX_ADDRESS."""

    name = "postfix"

    def __init__(self, workdir: Path, relay: tuple[str, int] | None, workers: str | None = None) -> None:
        del workers  # Postfix's process model is its own
        self.address = POSTFIX_ADDRESS
        self.dir, self.conf, self.port = start_postfix(
            workdir, self.address, f"relayhost = [{relay[0]}]:{relay[1]}\n" if relay else ACCEPT_ONLY)

    def root_pid(self) -> int | None:
        """master(8)'s pid, which is also its session's id."""
        try:
            return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def queue_size(self) -> int:
        return sum(len(files) for sub in ("maildrop", "incoming", "active", "deferred", "hold")
                   for _, _, files in os.walk(self.dir / "queue" / sub))

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: not listening(self.address, self.port), 30, "postfix to stop")


def start_postfix(workdir: Path, address: str, main_cf: str) -> tuple[Path, Path, int]:
    """Debian's Postfix from a configuration directory of its own under *workdir*
    (nothing installed), smtpd on *address* and a free port, with *main_cf* added
    to the common settings; returns its directory, its configuration directory and
    the port, once it listens (scripts/bench_storm.py starts its Postfix here too)."""
    directory = workdir / "postfix"
    for sub in ("conf", "queue", "data"):
        (directory / sub).mkdir(parents=True)
    shutil.chown(directory / "data", "postfix")
    for path in (workdir, directory, directory / "conf"):
        path.chmod(0o755)
    port = free_port(address)
    conf = directory / "conf"
    (conf / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {directory / 'queue'}\n"
        f"data_directory = {directory / 'data'}\n"
        "mail_owner = postfix\nsetgid_group = postdrop\n"
        "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"  # master.cf names the address
        "myhostname = bench-postfix.example\nmydestination =\nmynetworks = 127.0.0.0/8\n"
        "smtpd_relay_restrictions = permit_mynetworks, reject\n"
        f"maillog_file_prefixes = {workdir}\nmaillog_file = {directory / 'maillog'}\n" + main_cf)
    (conf / "master.cf").write_text(postfix_master_cf(f"{address}:{port}"))
    subprocess.run(["postfix", "-c", str(conf), "start"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: listening(address, port), 30, "postfix to start")
    return directory, conf, port
