"""Shared helpers: configurations in tmp dirs, an in-process serve, a serve subprocess."""

from __future__ import annotations

import compileall
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.config import Config
from trimail.master import serve
from trimail.service import Server


def pytest_configure(config: pytest.Config) -> None:
    """Write trimail's bytecode once, before the run (in xdist's controller, or in a
    run without it): the suite starts hundreds of interpreters (serve, the CLI,
    sendmail), and where PYTHONDONTWRITEBYTECODE is set (as on this project's
    machines) each of them compiled every module it imports from source, 0.2-0.3 s a
    start.  ``compileall`` writes the files whatever that variable says; a module
    edited later is compiled again by Python as usual (the file's mtime no longer matches)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        compileall.compile_dir(Path(configuration.__file__).parents[1], quiet=1)  # trimail/


def write_main_cf(directory: Path, **params: object) -> Path:
    values = {
        "myhostname": "mx.test.example",
        "smtpd_listen": "127.0.0.1:0",
        "queue_directory": str(directory / "queue"),
        "graceful_timeout": "5s",
        "allow_root": "yes",  # the test suite runs as root in one process
        # receiving tests look at the queue before anything is delivered
        "master_service_disable": "qmgr",
    }
    if os.environ.get("TRIMAIL_TEST_SMTPD_WORKERS"):  # e.g. 0: the whole suite on the single process
        values["smtpd_workers"] = os.environ["TRIMAIL_TEST_SMTPD_WORKERS"]
    values.update({k: str(v) for k, v in params.items()})
    path = directory / "main.cf"
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


@pytest.fixture
def make_config(tmp_path: Path):
    def make(**params: object) -> Config:
        return configuration.load(write_main_cf(tmp_path, **params))

    return make


@pytest.fixture
async def server(make_config, nursery) -> AsyncIterator[Server]:
    """A serve running in this test's trio run, on an ephemeral loopback port."""
    srv = await nursery.start(serve, make_config())
    yield srv
    srv.stop()


async def wait_for(predicate, timeout: float = 10.0) -> None:
    """Wait on a condition with a deadline (never a bare sleep)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


class ServeProcess:
    """``trimail serve`` as a child process, ready once it logs that it listens."""

    def __init__(self, config_path: Path | None, env: dict[str, str] | None = None,
                 new_session: bool = False) -> None:
        args = [sys.executable, "-m", "trimail", "serve"]
        if config_path is not None:
            args += ["-c", str(config_path)]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=new_session)
        self.log: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_log(r"daemon started")
        except BaseException:  # never started: nobody else will stop it (the fixture never got it)
            self.proc.kill()
            self.proc.wait()
            raise
        self.port = int(re.search(r"listening on .*?:(\d+)", line).group(1))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.log.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_log(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.log:
                    if re.search(pattern, line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    raise AssertionError(f"no log line matching {pattern!r}; log:\n" + "\n".join(self.log))
                self._cond.wait(remaining)

    def stop(self, sig: int = 15, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def serve_process() -> Iterator[type[ServeProcess]]:
    started: list[ServeProcess] = []

    def start(config_path: Path | None, env: dict[str, str] | None = None, new_session: bool = False) -> ServeProcess:
        proc = ServeProcess(config_path, env, new_session)
        started.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def trimail(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trimail", *args], capture_output=True, text=True,
                          timeout=60, env=env or dict(os.environ))


@pytest.fixture
def start_mta(tmp_path, nursery):
    """A serve with its queue manager running and a loopback DNS server answering *zone*."""
    async def start(zone: dict | None = None, **params):
        dns_port = await nursery.start(run_dns_server, zone or {})
        settings = {"master_service_disable": "", "dns_nameservers": f"127.0.0.1:{dns_port}",
                    "smtp_connect_timeout": "5s", "mydestination": "mx.test.example"}
        settings.update(params)
        path = write_main_cf(tmp_path, **settings)
        return await nursery.start(serve, configuration.load(path))

    return start


@pytest.fixture(scope="module")
def ca():
    """A test CA (trustme) for the server certificates of one test module."""
    import trustme

    return trustme.CA()


@pytest.fixture
def cert(ca, tmp_path) -> Path:
    """Key and certificate chain for mx.test.example and 127.0.0.1, in one PEM file."""
    path = tmp_path / "cert.pem"
    ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@pytest.fixture
def submission(start_mta, cert, tmp_path):
    """Start serve with submission (STARTTLS, then AUTH) and smtps listeners and one
    login, alice / "correct horse"; keyword arguments are more main.cf settings."""
    async def start(**extra):
        srv = await start_mta(smtpd_tls_cert_file=str(cert), submission_listen="127.0.0.1:0",
                              smtps_listen="127.0.0.1:0", smtpd_sasl_password_file=str(tmp_path / "sasl_passwd"),
                              master_service_disable="qmgr", mynetworks="127.0.0.2/32", **extra)
        added = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "trimail", "passwd", "add", "alice", "-c", srv.config.source],
            input=b"correct horse\n", capture_output=True, timeout=60))
        assert added.returncode == 0, added.stderr
        return srv

    return start


def system_account(name: str) -> pwd.struct_passwd:
    """An unprivileged local account for privilege tests (created without a home
    and a login shell if this machine lacks it; the tests run as root)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", name], check=True)
        return pwd.getpwnam(name)


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory in /tmp every user can traverse (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="trimail-public-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def mail_log(**setup: object) -> Iterator[None]:
    """trimail.log.setup(**setup) for the block, its writer stopped at the end and the
    ``trimail`` logger's handlers, level and propagation put back as they were."""
    import logging

    from trimail import log as maillog

    root = logging.getLogger("trimail")
    saved = list(root.handlers), root.level, root.propagate
    maillog.setup("mx.test.example", **setup)  # type: ignore[arg-type]
    try:
        yield
    finally:
        maillog.shutdown(timeout=1)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        root.propagate = saved[2]
