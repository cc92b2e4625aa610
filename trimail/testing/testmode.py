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
- The configuration is checked whole (``configuration.load``), and the start-time
  warnings found, the first time a test MTA has a set of options; the MTAs after it
  with the same options share its converted values (``SharedConfig``), except those
  that name their own directory, and log the same warnings.
- ``auth=`` passwords are hashed with the cheapest scrypt cost (N=2, r=1, p=1):
  the same scheme and code path as production, without its deliberate slowness.
- Files in memory: the test MTAs' directories are made in ``/dev/shm`` (a tmpfs)
  when the user named no temporary directory of their own (``TMPDIR``, ``TEMP``,
  ``TMP`` or ``tempfile.tempdir``) and it is a writable directory with at least
  1 GiB free (``scratch_parent``): a disk file system's journal made creating and
  deleting the few files of a test queue about a third of start + stop.  A small
  ``/dev/shm`` (64 MiB in a default Docker container) is not used: a test's large
  messages must not fill it.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from trimail import config as configuration
from trimail.config import Config
from trimail.config.registry import PARAMETERS
from trimail.config.syntax import Setting, parse_main_cf
from trimail.passwords import hash_password
from trimail.queue.database import DATABASE_NAME, TEST_QUEUE_MARK, Database, unsafe_skip_fsync

INSTALL_HINT = "pip install 'trimail[testing]'"
CHEAP_SCRYPT = (2, 1, 1)  # N, r, p: test passwords only

_lock = threading.Lock()
_template: bytes | None = None  # an empty queue database, made once per process
_ca: Any = None  # the process's trustme.CA
_leaves: dict[tuple[str, ...], bytes] = {}  # the server's identities -> its key and certificate chain

IN_MEMORY = "/dev/shm"
IN_MEMORY_FREE = 1 << 30  # bytes free that /dev/shm needs to be used
SYSTEM_TEMPORARY = ("/tmp", "/var/tmp", "/usr/tmp")  # tempfile's own choices (with the working directory)


def scratch_parent() -> str | None:
    """Where the test MTAs' directories go: ``/dev/shm`` when nobody named a temporary
    directory and it is usable (see the module's docstring), else None (tempfile's)."""
    if any(os.environ.get(name) for name in ("TMPDIR", "TEMP", "TMP")):
        return None
    if tempfile.tempdir is not None and tempfile.tempdir not in SYSTEM_TEMPORARY:  # set by the user or a test
        return None
    return IN_MEMORY if _in_memory_usable() else None


@functools.cache
def _in_memory_usable() -> bool:
    try:
        status = os.lstat(IN_MEMORY)
        space = os.statvfs(IN_MEMORY)
    except OSError:
        return False
    return (stat.S_ISDIR(status.st_mode) and os.access(IN_MEMORY, os.W_OK | os.X_OK)
            and space.f_bavail * space.f_frsize >= IN_MEMORY_FREE)


def new_queue(queue_directory: str) -> None:
    """Make *queue_directory* (0700) with an empty queue database in it, unsynced."""
    os.mkdir(queue_directory, 0o700)
    unsafe_skip_fsync(queue_directory)
    write_file(os.path.join(queue_directory, DATABASE_NAME), _template_database(), 0o600, exclusive=True)
    write_file(os.path.join(queue_directory, TEST_QUEUE_MARK), b"", 0o600, exclusive=True)  # other processes: hands off


def forget_queue(queue_directory: str | os.PathLike[str]) -> None:
    unsafe_skip_fsync(queue_directory, skip=False)


def _template_database() -> bytes:
    """An empty queue database (schema, WAL mode), made once per process."""
    global _template
    with _lock:
        if _template is None:
            directory = Path(tempfile.mkdtemp(prefix="trimail-template-", dir=scratch_parent())) / "queue"
            try:
                unsafe_skip_fsync(directory)
                database = Database.open(directory)
                database.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the schema into the file
                database.close()
                forget_queue(directory)
                _template = (directory / DATABASE_NAME).read_bytes()
            finally:
                shutil.rmtree(directory.parent, ignore_errors=True)
        return _template


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


def write_private(path: str, data: bytes) -> None:
    """A file only we read (0600), not fsynced: it lives as long as the test."""
    write_file(path, data, 0o600, exclusive=True)


def write_file(path: str | os.PathLike[str], data: bytes, mode: int = 0o666, *, exclusive: bool = False) -> None:
    """*data* into the file *path* (made with *mode*, less the umask; *exclusive*: a
    new one), not fsynced, with neither a file object nor a buffer of its own."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def password_table(auth: dict[str, str]) -> bytes:
    """``smtpd_sasl_password_file`` content for *auth*, with the cheap test cost."""
    return "".join(f"{user}:{hash_password(pw, *CHEAP_SCRYPT)}\n" for user, pw in sorted(auth.items())).encode()


class _Shape:
    """What the test MTAs with one set of options share: the converted values that do
    not name an MTA's directory, and the expanded text of those that do, with a NUL
    character in place of the directory; main.cf as parsed, the same way."""

    def __init__(self, config: Config, directory: str, main_cf: str, path: str) -> None:
        from trimail.startup import start_warnings

        self.values: dict[str, Any] = {}
        self.texts: dict[str, str] = {}
        self.memo: dict[str, Any] = {}  # Config.memo's values, for every MTA of the shape
        self.warnings = start_warnings(config)  # logged by every MTA, found by the first
        for name in PARAMETERS:
            text = config.expand(name)
            if directory in text:
                self.texts[name] = text.replace(directory, "\0")
            else:
                self.values[name] = config.get(name)
        self.own = frozenset(self.texts)  # the parameters that name each MTA's directory (Config.memo)
        # main.cf as parsed (its values, and where each is: the file's name has the directory in it)
        settings, warnings = parse_main_cf(main_cf, path)
        self.settings = {name: (setting.value.replace(directory, "\0"), setting.where.replace(directory, "\0"))
                         for name, setting in settings.items()}
        self.parse_warnings = [warning.replace(directory, "\0") for warning in warnings]

    def parsed(self, directory: str) -> tuple[dict[str, Setting], list[str]]:
        """What ``parse_main_cf`` gives for this shape's main.cf in *directory*, without parsing it again."""
        settings = {name: Setting(value.replace("\0", directory), where.replace("\0", directory))
                    for name, (value, where) in self.settings.items()}
        return settings, [warning.replace("\0", directory) for warning in self.parse_warnings]


class SharedConfig(Config):
    """A test MTA's configuration whose converted values are shared by every test MTA
    with the same options (``shape.values``), except the values that name this MTA's
    own temporary directory, which are its own (converted from the shape's expanded
    text, with no ``$name`` expansion again).  Values are never changed once made.
    The start-time warnings (``check.warnings``) are the first MTA's, logged again."""

    shape: _Shape
    directory: str
    _main_cf: str | None = None

    @property  # type: ignore[override]
    def path(self) -> Path | None:  # the main.cf read (reload): a Path made only when asked for
        return None if self._main_cf is None else Path(self._main_cf)

    @path.setter
    def path(self, value: str | os.PathLike[str] | None) -> None:
        self._main_cf = None if value is None else os.fspath(value)

    def get(self, name: str) -> Any:
        try:
            return self.shape.values[name]
        except KeyError:
            return super().get(name)

    def expand(self, name: str) -> str:
        text = self.shape.texts.get(name)
        return super().expand(name) if text is None else text.replace("\0", self.directory)


_shapes: dict[str, _Shape] = {}  # main.cf text, directory left out -> what its MTAs share


def load_config(path: str, text: str, directory: str) -> Config:
    """The configuration of a test MTA in *directory* from main.cf *text*: the first
    time these options are seen, ``configuration.load`` converts and checks every
    parameter (errors name the line); later, a ``SharedConfig`` reuses those values."""
    key = text.replace(directory, "\0")
    shape = _shapes.get(key)
    if shape is None:
        config = configuration.load(path)
        shape = _shapes[key] = _Shape(config, directory, text, path)
        if len(_shapes) > 64:
            del _shapes[next(iter(_shapes))]
    else:
        settings, warnings = shape.parsed(directory)
        config = SharedConfig(settings, path, warnings)
        config.path = path
        config.shape, config.directory = shape, directory
        config.__dict__.update(shape.values)  # read as attributes without a __getattr__ each (Config.__getattr__)
    config.start_warnings = shape.warnings
    config.__dict__["_memo"] = shape.memo  # Config.memo's store: shared by every MTA of the shape
    config.__dict__["_own"] = shape.own  # ... except values kept from parameters that name its directory
    return config
