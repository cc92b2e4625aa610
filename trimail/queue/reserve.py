"""The queue manager's space reserve: ``queue.reserve``, a file of allocated blocks
in the queue directory, given back to the file system when a queue write finds it
full (``release``), so that the queue manager can go on recording deliveries and
removing delivered mail, and so drain the queue.

Why: a queue write appends to the WAL, and after a quiet spell the WAL is empty
(``queue.checkpoints``: the idle checkpoint truncates it).  When something else
fills the file system (logs, another program), every queue write fails, the queue
manager's too: mail that was delivered cannot be marked so, and nothing moves until
the file system has room again.  Postfix's queue manager frees space as it delivers
(a delivered message is a file it deletes); ours needs a little first.

- ``QueueReserve.ensure`` (the queue manager, at start and every ``CHECK_SECONDS``)
  grows the file to ``reserve_size`` with ``posix_fallocate`` when the file system
  has at least twice the missing bytes free, and creates it empty when it has not,
  so the smtpd sees a reserve missing.
- ``QueueReserve.release`` (the queue writer, when a commit failed for want of
  space: ``QueueWriter.on_no_space``) truncates it to nothing, once, and says so.
- The smtpd's ``space.QueueSpace`` counts what is missing from the file as taken:
  the queue manager's bytes are not new mail's.  No file (a test queue, qmgr not
  running here yet): nothing is counted.

Its size: ``RESERVE_BYTES`` (8 MiB: twice the WAL's size when a checkpoint under
load starts it over, ``checkpoints.AUTOCHECKPOINT_PAGES``), at most a ``SHARE`` of
the file system (a 16 MiB file system keeps 512 KiB).  What the released blocks
must hold: the queue manager's records, and, when the disk filled while the WAL
still held new mail, that mail's copy into the database (a checkpoint grows it into
the released blocks; once the copy ends, the WAL starts over in the blocks it has).
8 MiB covers a WAL of up to about 4 MB waiting; on a file system under 256 MiB the
reserve is smaller than that, and the queue manager may still wait for room there
(a red team's 16 MiB tmpfs with 4.2 MB of WAL waiting).

Parameters: queue_directory (through the caller).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
import threading

import trio

RESERVE_NAME = "queue.reserve"
RESERVE_BYTES = 8 << 20
SHARE = 32  # the reserve takes at most 1/SHARE of the queue's file system
CHECK_SECONDS = 10.0  # how often the queue manager tries to restore a released reserve

log = logging.getLogger("trimail.queue")


def reserve_size(stat: os.statvfs_result) -> int:
    """The reserve's size on a file system of this ``statvfs``, in whole 4 KiB blocks."""
    return min(RESERVE_BYTES, stat.f_blocks * stat.f_frsize // SHARE) & ~4095


def _allocated(found: os.stat_result) -> int:
    """The bytes of the file that blocks back: a sparse file's holes (a copy made
    with ``rsync -S``, a ``truncate -s``) would give nothing back."""
    return min(found.st_size, found.st_blocks * 512)


def missing_bytes(directory: str | os.PathLike[str], stat: os.statvfs_result) -> int:
    """What the reserve in *directory* lacks (0 when there is no reserve file: a
    symbolic link or anything else but a regular file is none)."""
    try:
        found = os.lstat(os.path.join(directory, RESERVE_NAME))
    except OSError:
        return 0
    if not stat_module.S_ISREG(found.st_mode):
        return 0
    return max(0, reserve_size(stat) - _allocated(found))


class QueueReserve:
    """The reserve of one queue directory, kept by its queue manager."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = os.path.join(directory, RESERVE_NAME)
        self.directory = directory
        self._lock = threading.Lock()  # release runs on the writer's thread or the event loop's
        self._released = False  # since the last time it was whole
        self._told = ""  # the last failure release reported (each kind once, not at every commit)

    def _open(self, flags: int) -> int:
        """The file, never through a symbolic link, and never anything but a regular
        file: a FIFO in its place must not stop the thread that opens it."""
        fd = os.open(self.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return fd

    def ensure(self) -> bool:
        """Create the file, and allocate its blocks when there is room for them twice
        over; True when it is whole.  ``OSError`` is the caller's (a worker thread's)."""
        fd = -1
        try:
            with self._lock:
                stat = os.statvfs(self.directory)
                size = reserve_size(stat)
                fd = self._open(os.O_RDWR | os.O_CREAT)
                lacking = size - _allocated(os.fstat(fd))
                if lacking <= 0:
                    return True
                if stat.f_bavail * stat.f_frsize < 2 * lacking:
                    return False
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError:
                    os.ftruncate(fd, 0)  # not whole: the blocks it took go back
                    raise
                restored, self._released = self._released, False
            os.fsync(fd)  # outside the lock: a release meanwhile does not wait for the disk
        finally:
            if fd >= 0:
                os.close(fd)
        if restored:
            log.info("queue space reserve restored (%d bytes)", size)
        return True

    def release(self) -> None:
        """A queue write found the file system full: give the reserve's blocks back,
        and say so once.  Never raises, and never waits for the disk (the writer's
        thread calls it, or the queue manager's event loop): at most for an
        ``ensure`` under way to allocate the blocks, not to sync them."""
        with self._lock:
            try:
                fd = self._open(os.O_WRONLY)
                try:
                    found = os.fstat(fd)
                    released = _allocated(found)
                    if found.st_size:
                        os.ftruncate(fd, 0)
                        self._released = True
                finally:
                    os.close(fd)
            except FileNotFoundError:
                return  # not made yet (the file system was full from the start)
            except OSError as exc:
                text = exc.strerror or str(exc)
                if text != self._told:
                    self._told = text
                    log.warning("cannot release the queue space reserve %s: %s", self.path, text)
                return
        if released:
            log.warning("queue file system full: released the queue space reserve (%d bytes), so that the "
                        "queue manager can record deliveries and remove delivered mail", released)


async def keep(reserve: QueueReserve) -> None:
    """The queue manager's task: make the reserve whole at start, and again every
    ``CHECK_SECONDS`` once the file system has room.  Its own error boundary: a
    failure is logged (once until it changes) and tried again."""
    told = ""
    while True:
        try:
            await trio.to_thread.run_sync(reserve.ensure)
            told = ""
        except Exception as exc:  # OSError (read-only, quota), or a bug: never the queue manager's end
            text = getattr(exc, "strerror", None) or str(exc)
            if text != told:
                log.warning("cannot keep the queue space reserve %s: %s", reserve.path, text)
                told = text
        await trio.sleep(CHECK_SECONDS)
