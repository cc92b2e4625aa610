"""Test mode: what the test MTA gives up to start, stop and capture in milliseconds.

- No fsync: the throw-away queue commits with ``synchronous = OFF``
  (``trimail.queue.database.unsafe_skip_fsync``, a switch no main.cf can reach).
  A commit is still atomic; only durability across a power loss is gone, and a
  test's queue is deleted when the test ends anyway.
- A new queue starts as a copy of one empty database made once per process
  (schema and WAL mode already in place) instead of being created and migrated.
  Its commits run in the event loop (``queue.inline.InlineWriter``): with no fsync
  and no other process, a thread and a hand-over per commit cost more than the commit.
- One test CA per process and one server certificate per set of listening
  addresses (``tls=True``), made on first use; each MTA gets a copy of the PEM file.
- The configuration is checked whole (``configuration.load``) the first time a test
  MTA has a set of options; the MTAs after it with the same options share its
  converted values (``SharedConfig``), except those that name their own directory.
- ``auth=`` passwords are hashed with the cheapest scrypt cost (N=2, r=1, p=1):
  the same scheme and code path as production, without its deliberate slowness.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from trimail import config as configuration
from trimail.config import Config
from trimail.config.registry import PARAMETERS
from trimail.config.syntax import parse_main_cf
from trimail.passwords import hash_password
from trimail.queue.database import DATABASE_NAME, Database, unsafe_skip_fsync

INSTALL_HINT = "pip install 'trimail[testing]'"
CHEAP_SCRYPT = (2, 1, 1)  # N, r, p: test passwords only

_lock = threading.Lock()
_template: Path | None = None  # an empty queue database, made once per process
_ca: Any = None  # the process's trustme.CA
_leaves: dict[tuple[str, ...], bytes] = {}  # the server's identities -> its key and certificate chain


def new_queue(queue_directory: Path) -> None:
    """Make *queue_directory* (0700) with an empty queue database in it, unsynced."""
    queue_directory.mkdir(mode=0o700)
    unsafe_skip_fsync(queue_directory)
    template = _template_database()
    fd = os.open(queue_directory / DATABASE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as target, open(template, "rb") as source:  # before any SQLite connection has it
        shutil.copyfileobj(source, target)


def forget_queue(queue_directory: Path) -> None:
    unsafe_skip_fsync(queue_directory, skip=False)


def _template_database() -> Path:
    global _template
    with _lock:
        if _template is None or not _template.exists():
            directory = Path(tempfile.mkdtemp(prefix="trimail-template-")) / "queue"
            unsafe_skip_fsync(directory)
            Database.open(directory).close()  # schema, WAL mode; the WAL is checkpointed away at close
            forget_queue(directory)
            _template = directory / DATABASE_NAME
            _register_removal(directory.parent)
        return _template


def _register_removal(directory: Path) -> None:
    import atexit

    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def tls_material(listen: str) -> tuple[Any, bytes]:
    """The process's test CA, and the key and certificate chain (PEM) of a server
    that listens on *listen* (``smtpd_listen``): one per set of addresses."""
    from trimail.config.values import parse_host_port, split_list

    global _ca
    try:
        hosts = sorted({host for item in split_list(listen)
                        if (host := parse_host_port(item).host) not in ("", "0.0.0.0", "::")})
    except ValueError:  # a bad smtpd_listen: the configuration says so, with its line
        hosts = []
    identities = tuple(dict.fromkeys([*hosts, "127.0.0.1", "::1", "localhost", "trimail.test"]))
    with _lock:
        if _ca is None:
            try:
                import trustme  # in the trimail[testing] extra, needed only for tls=True
            except ImportError:
                raise ModuleNotFoundError(f"tls=True needs trustme, which makes the test certificates: "
                                          f"{INSTALL_HINT}", name="trustme") from None
            _ca = trustme.CA()
        pem = _leaves.get(identities)
        if pem is None:
            pem = _leaves[identities] = _ca.issue_cert(*identities).private_key_and_cert_chain_pem.bytes()
        return _ca, pem


def write_private(path: Path, data: bytes) -> None:
    """A file only we read (0600), not fsynced: it lives as long as the test."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as out:
        out.write(data)


def password_table(auth: dict[str, str]) -> bytes:
    """``smtpd_sasl_password_file`` content for *auth*, with the cheap test cost."""
    return "".join(f"{user}:{hash_password(pw, *CHEAP_SCRYPT)}\n" for user, pw in sorted(auth.items())).encode()


class SharedConfig(Config):
    """A test MTA's configuration whose converted values are shared by every test MTA
    with the same options (``shared``), except the values that name this MTA's own
    temporary directory, which are its own.  Values are never changed once made."""

    shared: dict[str, Any]
    directory: str

    def get(self, name: str) -> Any:
        try:
            return self.shared[name]
        except KeyError:
            return super().get(name)


_shapes: dict[str, dict[str, Any]] = {}  # main.cf text, directory left out -> the values shared


def load_config(path: Path, text: str, directory: Path) -> Config:
    """The configuration of a test MTA in *directory* from main.cf *text*: the first
    time these options are seen, ``configuration.load`` converts and checks every
    parameter (errors name the line); later, a ``SharedConfig`` reuses those values."""
    shape = text.replace(str(directory), "\0")
    shared = _shapes.get(shape)
    if shared is None:
        config = configuration.load(path)
        _shapes[shape] = {name: config.get(name) for name in PARAMETERS if str(directory) not in config.expand(name)}
        if len(_shapes) > 64:
            del _shapes[next(iter(_shapes))]
        return config
    settings, warnings = parse_main_cf(text, str(path))
    config = SharedConfig(settings, str(path), warnings)
    config.path = path
    config.shared = shared
    config.__dict__.update(shared)  # read as attributes without a __getattr__ each (Config.__getattr__)
    return config
