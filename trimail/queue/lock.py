"""One serve per queue: an exclusive lock on the pid file, in a directory only root writes.

The lock is ``flock(2)`` on ``$queue_directory/pid/master.pid`` (Postfix's
master.pid), held for the life of serve and released by the kernel when the
process dies (even on ``kill -9``), so a stale pid file never blocks a restart.
The file holds the pid for ``trimail status``, ``stop`` and ``reload``.
``pid/queue.index`` beside it names the ``queue.db-wal`` and ``queue.db-shm`` serve
has open (devices and inodes, once the queue is open): while the lock is held,
every other opening of the queue compares them with the files there now
(``guards.refuse_other_index``).

Security notes: serve opens this file as root, before it becomes mail_owner,
and mail_owner owns the queue directory, so the pid file must not be anything
mail_owner can plant or redirect (``ln -s /etc/shadow $queue/master.lock`` made
root truncate the target in earlier versions).  As in Postfix: the ``pid/``
directory is created 0755 and owned by the user serve starts as (root), and is
refused (ConfigurationError, one line) when it is a symlink, owned by anyone
else, or group/world writable; the file is opened relative to a descriptor of
that directory (a rename of ``pid/`` by mail_owner after the check changes
nothing) with ``O_NOFOLLOW``, and the opened descriptor must be a regular file
with one link owned by that user (Postfix's ``safe_open``).  The privilege drop
(``trimail.privileges.hand_over``) leaves ``pid/`` to root.

Upgrade: a serve of an earlier version holds ``$queue_directory/master.lock``;
serve refuses to start while that lock is held, and ``running_pid`` reads it
when no ``pid/master.pid`` exists, without ever writing or following it.
"""

from __future__ import annotations

import fcntl
import os
import stat

from trimail.errors import ConfigurationError

PID_DIRECTORY = "pid"
PID_NAME = "master.pid"
INDEX_NAME = "queue.index"  # beside it: devices and inodes of the queue.db-wal and -shm serve has open
INDEX_RECORD = 128  # bytes of its one record (running_index reads that many)
OLD_LOCK_NAME = "master.lock"  # before issue 14: in the mail_owner-owned queue directory; read only
_OPEN = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class AlreadyRunning(Exception):
    pass


def pid_path(queue_directory: str | os.PathLike[str]) -> str:
    return os.path.join(queue_directory, PID_DIRECTORY, PID_NAME)


def open_pid_directory(queue_directory: str | os.PathLike[str]) -> int:
    """A descriptor of ``pid/``, created 0755 if missing; ConfigurationError when
    it is not a directory owned by us (root) and writable by us alone."""
    path = os.path.join(queue_directory, PID_DIRECTORY)
    try:
        os.mkdir(path, 0o755)  # never follows a planted symlink: EEXIST
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot create the pid directory: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _OPEN)
    except OSError as exc:
        raise ConfigurationError(f"{path}: the pid directory must be a real directory owned by uid "
                                 f"{os.geteuid()} (not a symlink): {exc.strerror}; remove it") from None
    st = os.fstat(fd)
    problem = ""
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not uid {os.geteuid()}"
    elif st.st_mode & 0o022:
        problem = f"is group or world writable (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        os.close(fd)
        raise ConfigurationError(f"{path}: pid directory {problem}; remove it (serve creates it 0755) "
                                 "or fix its owner and mode")
    return fd


def safe_open(directory_fd: int, name: str, flags: int, where: str | os.PathLike[str]) -> int:
    """Postfix's safe_open: open *name* in *directory_fd* without following a
    symlink; the result must be a regular file with one link owned by us."""
    try:
        fd = os.open(name, flags | _OPEN, 0o644, dir_fd=directory_fd)
    except OSError as exc:
        raise ConfigurationError(f"{where}: cannot open safely: {exc.strerror}; remove it") from None
    st = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not uid {os.geteuid()}"
    if problem:
        os.close(fd)
        raise ConfigurationError(f"{where}: {problem}; remove it")
    return fd


class QueueLock:
    def __init__(self, queue_directory: str | os.PathLike[str]) -> None:
        self.queue_directory = queue_directory
        self.path = pid_path(queue_directory)
        self._fd: int | None = None

    def acquire(self) -> None:
        _refuse_old_serve(self.queue_directory)
        directory = open_pid_directory(self.queue_directory)
        try:
            fd = safe_open(directory, PID_NAME, os.O_RDWR | os.O_CREAT, self.path)
        finally:
            os.close(directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"{self.path}: another trimail serve (pid {read_pid(self.path)}) "
                                 "uses this queue_directory") from None
        # in place, as Postfix's "%10d\n": a file that has its block needs no new one
        # (a start on a queue file system something else filled; release() leaves it)
        _rewrite(fd, f"{os.getpid():>10}\n".encode())
        self._fd = fd
        try:
            self.record_index(None)  # the last serve's, until this one has opened the queue
        except OSError:
            pass  # no record left at all: as good (startup.opened_queue says so when it records)

    def record_index(self, identity: tuple[int, ...] | None) -> None:
        """Write *identity* (``guards.index_identity``: devices and inodes of the WAL
        and its index this serve has open) to ``pid/``'s ``queue.index``, for
        ``running_index`` (None: a blank record).  The record has one size and is
        written in place, so a file that has it needs no new block: serve starting
        again on a queue file system something else filled (red team's disk-full
        test) got ENOSPC from the truncate-and-write this was, and ended.  When it
        cannot be written the file is removed (no record: other processes skip the
        check rather than compare with a stale one) and the OSError raised."""
        directory = open_pid_directory(self.queue_directory)
        path = os.path.join(self.queue_directory, PID_DIRECTORY, INDEX_NAME)
        try:
            fd = safe_open(directory, INDEX_NAME, os.O_WRONLY | os.O_CREAT, path)
            try:
                text = " ".join(map(str, identity)) if identity is not None else ""
                _rewrite(fd, text.encode().ljust(INDEX_RECORD - 1) + b"\n")
            finally:
                os.close(fd)
        except OSError:
            try:
                os.unlink(INDEX_NAME, dir_fd=directory)
            except OSError:
                pass
            raise
        finally:
            os.close(directory)

    def fileno(self) -> int:
        """The locked descriptor: worker processes inherit it, so the lock is held
        until the master and every worker are gone (flock belongs to the open file)."""
        assert self._fd is not None, "not locked"
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                _rewrite(self._fd, b" " * 10 + b"\n")  # no pid: blank, keeping the block
            except OSError:
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def _rewrite(fd: int, record: bytes) -> None:
    """*record* as the whole file, written over the start of what is there (a file at
    least that long needs no new block), the rest cut off."""
    os.pwrite(fd, record, 0)
    if os.fstat(fd).st_size > len(record):
        os.ftruncate(fd, len(record))


def open_regular_for_reading(path: str | os.PathLike[str]) -> int | None:
    """A read-only descriptor of a regular file at *path*, never through a symlink
    and never opening a device or FIFO; None when there is no such file."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | _OPEN)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read_fd(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def read_pid(path: str | os.PathLike[str]) -> int | None:
    try:
        fd = open_regular_for_reading(path)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _locked_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid in *path* when some process holds its lock; None when unlocked or
    missing.  PermissionError goes up: the caller may not look (not "not running")."""
    fd = open_regular_for_reading(path)
    if fd is None:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_fd(fd) or 0
        return None
    finally:
        os.close(fd)


def running_index(queue_directory: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """What the running serve recorded (``record_index``); None when no serve runs,
    it has recorded nothing yet, or the caller may not look."""
    try:
        if _locked_pid(pid_path(queue_directory)) is None:
            return None
        fd = open_regular_for_reading(os.path.join(queue_directory, PID_DIRECTORY, INDEX_NAME))
    except PermissionError:
        return None
    if fd is None:
        return None
    try:
        fields = os.pread(fd, INDEX_RECORD, 0).split()
    finally:
        os.close(fd)
    if not fields or not all(field.isdigit() for field in fields):
        return None
    return tuple(int(field) for field in fields)


def _refuse_old_serve(queue_directory: str | os.PathLike[str]) -> None:
    old = os.path.join(queue_directory, OLD_LOCK_NAME)
    try:
        pid = _locked_pid(old)
    except OSError:
        return
    if pid is not None:
        raise AlreadyRunning(f"{old}: an earlier trimail serve (pid {pid}) "
                             "uses this queue_directory; stop it first")


def running_pid(queue_directory: str | os.PathLike[str]) -> int | None:
    """The pid of the serve holding the lock, or None when none runs; raises
    PermissionError when the caller may not look into the queue directory."""
    new = pid_path(queue_directory)
    pid = _locked_pid(new)
    if pid is None and not os.path.exists(new):
        pid = _locked_pid(os.path.join(queue_directory, OLD_LOCK_NAME))  # a serve of the previous release
    return pid
