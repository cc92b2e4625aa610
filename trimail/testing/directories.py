"""The test MTAs' temporary directories (``/dev/shm/trimail-test-*``, else
``$TMPDIR/trimail-test-*``: ``testmode.scratch_parent``): made at start, and
removed when the MTA stops, however it stops, and at interpreter exit at the
latest for one never stopped.

Removal deletes the few files at once, on the thread that stops the MTA: its path
is gone when ``remove_directory`` returns.  (A thread of its own that deleted them
later cost more than the deleting: it took turns at the GIL with the MTAs' trio
loop and the test, and start + stop took up to a millisecond longer.)
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

from trimail.testing import testmode

_directories: dict[str, int] = {}  # temporary directories of the test MTAs still running -> the process's pid
_lock = threading.Lock()


def new_directory() -> str:
    """A temporary directory for one test MTA; removed when it stops (``remove_directory``),
    and at interpreter exit at the latest, even when it was never stopped."""
    directory = tempfile.mkdtemp(prefix="trimail-test-", dir=testmode.scratch_parent())
    with _lock:
        _directories[directory] = os.getpid()
    return directory


def remove_directory(directory: str) -> None:
    """Delete the directory and what is in it.  Once per directory; a forked child
    never removes its parent's."""
    with _lock:
        if _directories.get(directory) != os.getpid():
            return
        del _directories[directory]
    testmode.forget_queue(os.path.join(directory, "queue"))
    try:
        _delete(directory)
    except OSError:  # something unexpected in it (a test's own files, a mount): the careful way
        shutil.rmtree(directory, ignore_errors=True)


def _delete(path: str) -> None:
    """*path* and everything under it; symbolic links are removed, never followed.  (The
    directory is ours, 0700: shutil.rmtree's defences against another user's races
    cost half again as much as this.)"""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _delete(entry.path)
            else:
                os.unlink(entry.path)
    os.rmdir(path)


@atexit.register
def _remove_leftovers() -> None:
    for directory in list(_directories):
        remove_directory(directory)
