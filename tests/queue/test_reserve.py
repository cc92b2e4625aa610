"""The queue manager's space reserve (trimail.queue.reserve) on the real file system
of the test's directory: made, released once, restored, and never followed through
a symbolic link.  Its use when the file system fills: tests/faults/test_disk_full_other_writer.py."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest
import trio

from tests.faults.conftest import NEEDS_TMPFS, fill, tmpfs
from trimail.queue import reserve as reserve_module
from trimail.queue.reserve import RESERVE_NAME, QueueReserve, keep, missing_bytes, reserve_size


def test_reserve_is_made_released_once_and_restored(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trimail.queue")
    size = reserve_size(os.statvfs(tmp_path))
    assert 0 < size <= 8 << 20 and size % 4096 == 0
    reserve = QueueReserve(tmp_path)
    path = tmp_path / RESERVE_NAME
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == 0  # no file: nothing counted
    assert reserve.ensure()
    assert path.stat().st_size == size and path.stat().st_blocks * 512 >= size  # allocated, not sparse
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == 0
    assert not caplog.records

    reserve.release()
    reserve.release()  # nothing left: says nothing
    assert path.stat().st_size == 0
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == size
    released = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert released == [f"queue file system full: released the queue space reserve ({size} bytes), so that "
                        "the queue manager can record deliveries and remove delivered mail"]

    assert reserve.ensure()
    assert path.stat().st_size == size
    assert [r.getMessage() for r in caplog.records if "restored" in r.getMessage()] == [
        f"queue space reserve restored ({size} bytes)"]


@NEEDS_TMPFS
def test_reserve_waits_for_twice_its_size_free(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "queue", "4m") as queue:  # a 128 KiB reserve
        size = reserve_size(os.statvfs(queue))
        assert size == 128 << 10
        filler = fill(queue, leave=2 * size - 8192)
        reserve = QueueReserve(queue)
        assert not reserve.ensure()
        path = queue / RESERVE_NAME
        assert path.stat().st_size == 0  # made empty: the smtpd counts it as missing
        assert missing_bytes(queue, os.statvfs(queue)) == size
        filler.unlink()
        assert reserve.ensure() and path.stat().st_size == size


def test_a_symbolic_link_in_its_place_is_never_followed(tmp_path: Path, caplog) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 10_000)
    (tmp_path / RESERVE_NAME).symlink_to(target)
    reserve = QueueReserve(tmp_path)
    with pytest.raises(OSError):
        reserve.ensure()
    reserve.release()  # logs, never raises, never truncates the target
    assert target.stat().st_size == 10_000
    assert any("cannot release the queue space reserve" in r.getMessage() for r in caplog.records)
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == 0


async def test_keep_reports_a_failure_once_and_goes_on(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(reserve_module, "CHECK_SECONDS", 0.01)
    (tmp_path / RESERVE_NAME).mkdir()  # a directory in its place: every try fails
    with trio.move_on_after(0.3):
        await keep(QueueReserve(tmp_path))
    failures = [r for r in caplog.records if "cannot keep the queue space reserve" in r.getMessage()]
    assert len(failures) == 1


def test_a_fifo_in_its_place_never_stops_the_caller(tmp_path: Path, caplog) -> None:
    os.mkfifo(tmp_path / RESERVE_NAME)
    reserve = QueueReserve(tmp_path)
    done = threading.Event()
    caller = threading.Thread(target=lambda: (reserve.release(), reserve.release(), done.set()), daemon=True)
    caller.start()
    assert done.wait(5), "release() waited on a FIFO (the queue manager's event loop would stop)"
    with pytest.raises(OSError, match="not a regular file"):
        reserve.ensure()
    warned = [r.getMessage() for r in caplog.records if "cannot release" in r.getMessage()]
    assert len(warned) == 1  # once, not at every commit that finds the file system full
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == 0


def test_a_sparse_file_is_no_reserve_until_its_blocks_are_allocated(tmp_path: Path) -> None:
    size = reserve_size(os.statvfs(tmp_path))
    path = tmp_path / RESERVE_NAME
    with open(path, "wb") as sparse:  # as `truncate -s` or `rsync -S` leave it: a size, no blocks
        sparse.truncate(size)
    assert path.stat().st_blocks == 0
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == size
    assert QueueReserve(tmp_path).ensure()
    assert path.stat().st_blocks * 512 >= size
    assert missing_bytes(tmp_path, os.statvfs(tmp_path)) == 0
