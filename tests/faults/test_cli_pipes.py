"""Commands that print, when their reader goes away (``trimail queue list | head``).

Each printing command runs with its standard output on a pipe of one page (so a
long output needs many writes) whose reader reads one line and closes, or closes
before anything was written.  The command must end quietly, as coreutils and
Postfix's mailq do under SIGPIPE: no traceback, no "Exception ignored" on stderr,
and exit status 141 (128 + SIGPIPE, what a shell reports for them) or 0.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.faults.conftest import Daemon
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store

F_SETPIPE_SZ = 1031
MESSAGES = 400


@pytest.fixture
def big_queue(tmp_path: Path) -> tuple[Path, str]:
    """A queue of MESSAGES messages, three recipients each in distinct domains, and
    one message of 256 KiB; returns the configuration and the big message's ID."""
    config_path = write_main_cf(tmp_path)
    store = Store.open(tmp_path / "queue")
    big = ""
    try:
        with store.transaction():
            for number in range(MESSAGES):
                spool = Spool()
                size = 256 * 1024 if number == 0 else 100
                spool.write(b"Subject: pipe\r\n\r\n" + b"x" * (size - 2) + b"\r\n")
                msg = NewMessage(new_queue_id(), f"sender{number}@client.example",
                                 [f"r{number}.{k}@d{number}-{k}.example" for k in range(3)], spool)
                store.insert_message(msg)
                big = big or msg.id
    finally:
        store.close()
    return config_path, big


def run_into_closing_pipe(args: list[str], read_first_line: bool) -> tuple[int, str, bytes]:
    """Run ``trimail ARGS`` with stdout on a one-page pipe whose reader reads one
    line (or nothing) and closes; returns (status, stderr, what was read)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, F_SETPIPE_SZ, 4096)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as for users
    proc = subprocess.Popen([sys.executable, "-m", "trimail", *args], stdout=write_end,
                            stderr=subprocess.PIPE, env=env)
    os.close(write_end)
    got = b""
    if read_first_line:
        with os.fdopen(read_end, "rb", buffering=0) as reader:
            while b"\n" not in got:
                chunk = reader.read(1)
                if not chunk:
                    break
                got += chunk
    else:
        os.close(read_end)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr.decode("utf-8", "replace"), got


def quiet(status: int, stderr: str) -> bool:
    return status in (0, 1, 141) and "Traceback" not in stderr and "Exception ignored" not in stderr \
        and "BrokenPipe" not in stderr


@pytest.mark.parametrize("read_first_line", [True, False], ids=["head-1", "closed"])
def test_printing_commands_exit_quietly_when_the_reader_goes_away(big_queue, read_first_line):
    config_path, big = big_queue
    c = ["-c", str(config_path)]
    commands = [["queue", "list", *c], ["queue", "list", "--json", *c], ["queue", "summary", *c],
                ["queue", "show", big, *c], ["config", *c], ["config", "-n", *c], ["config", "--sample"],
                ["status", *c]]  # serve is not running: "not running" and status 1
    for args in commands:
        status, stderr, got = run_into_closing_pipe(args, read_first_line)
        assert quiet(status, stderr), (args, status, stderr[-2000:])
        if read_first_line:
            assert got.endswith(b"\n"), (args, got)
        if args[0] != "status":
            assert status != 1, (args, stderr)


def test_status_exits_quietly_when_the_reader_goes_away(daemon):
    d: Daemon = daemon(master_service_disable="qmgr")
    for args in (["status", "-c", str(d.config_path)], ["queue", "list", "-c", str(d.config_path)]):
        status, stderr, _ = run_into_closing_pipe(args, read_first_line=False)
        assert quiet(status, stderr), (args, status, stderr)
    assert d.alive
