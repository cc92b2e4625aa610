"""The test MTAs' temporary directories (``/dev/shm/trimail-test-*``, else
``$TMPDIR/trimail-test-*``: ``testmode.scratch_parent``): made at start, and
removed when the MTA stops, however it stops, and at interpreter exit at the
latest for one never stopped.

Removal takes the directory away at once (a rename: its path is gone when
``remove_directory`` returns) and deletes the files on a thread of its own, off
the test's time and off the trio loop the MTAs share; the exit waits for it.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

from trimail.testing import testmode

_directories: dict[str, int] = {}  # temporary directories of the test MTAs still running -> the process's pid
_trash: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # renamed directories, for the remover thread
_remover: threading.Thread | None = None
_remover_lock = threading.Lock()


def new_directory() -> Path:
    """A temporary directory for one test MTA; removed when it stops (``remove_directory``),
    and at interpreter exit at the latest, even when it was never stopped."""
    directory = tempfile.mkdtemp(prefix="trimail-test-", dir=testmode.scratch_parent())
    with _remover_lock:
        _directories[directory] = os.getpid()
    return Path(directory)


def remove_directory(directory: Path | str) -> None:
    """Take the directory away at once (a rename: its path is gone when this
    returns) and delete its files on a thread of its own, off the test's time; the
    exit waits for that thread.  Once per directory; a forked child never removes
    its parent's."""
    with _remover_lock:
        if _directories.get(str(directory)) != os.getpid():
            return
        del _directories[str(directory)]
    testmode.forget_queue(os.path.join(directory, "queue"))
    parent, name = os.path.split(directory)
    # trimail-test-XYZ becomes trimail-removing-XYZ (unique as its name was; made first, so
    # that nothing else of that name is replaced), or, should that name be taken, a
    # directory of its own in a new trimail-removing-* directory
    trash = os.path.join(parent, "trimail-removing-" + name.removeprefix("trimail-test-"))
    try:
        os.mkdir(trash, 0o700)
        target = trash
    except OSError:
        trash = tempfile.mkdtemp(prefix="trimail-removing-", dir=parent)
        target = os.path.join(trash, "directory")
    try:
        os.rename(directory, target)  # onto (or into) the empty directory just made: ours
    except FileNotFoundError:
        os.rmdir(trash)
        return
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
    with _remover_lock:
        if _remover is None or not _remover.is_alive() or _remover_pid != os.getpid():
            _start_remover()
        _trash.put(trash)


_remover_pid = 0


def _start_remover() -> None:
    global _remover, _remover_pid
    _remover = threading.Thread(target=_remove_trash, name="trimail-test-remover", daemon=True)
    _remover_pid = os.getpid()
    _remover.start()


def _remove_trash() -> None:
    while (trash := _trash.get()) is not None:
        shutil.rmtree(trash, ignore_errors=True)


@atexit.register
def _remove_leftovers() -> None:
    for directory in list(_directories):
        remove_directory(directory)
    with _remover_lock:
        remover = _remover
        if remover is not None and remover.is_alive():
            _trash.put(None)
    if remover is not None:
        remover.join(30)
