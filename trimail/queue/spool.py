"""A message body on its way to the queue: memory for small ones, a file for big ones.

The SMTP session writes DATA chunks here as they arrive; the queue writer copies
the content into the database inside the commit.  Up to ``memory_limit`` bytes stay
in memory; past that the content moves to an unlinked temporary file in the queue
directory, so a session's memory does not grow with the size of its message.

File writes never run on the event loop: ``write_async`` (the SMTP session) gathers
what goes to the file into batches of ``FLUSH_SIZE`` bytes and writes each batch in
a worker thread; a message that stays in memory (nearly all of them) never leaves
the loop and costs no thread.  ``write`` is the same for callers without an event
loop (sendmail).  Any ``OSError`` of the file (ENOSPC, EDQUOT, EIO) becomes
``SpoolError``, an ``errors.StorageError`` whose ``no_space`` says the file system
is full; the caller discards the spool, which gives the space back at once.

The room in the queue file system is ``queue.space.QueueSpace``'s.  trio is imported
only by the two methods that use it: sendmail imports this module and never runs trio.

Parameters (through the caller): queue_directory.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from trimail.errors import StorageError

DEFAULT_MEMORY_LIMIT = 256 * 1024
FLUSH_SIZE = 256 * 1024  # bytes per file write (and per thread hop) past the memory limit


class SpoolError(StorageError):
    """The spool file could not be written; ``no_space`` for ENOSPC/EDQUOT."""

    def __init__(self, text: str, *, no_space: bool) -> None:
        super().__init__(text, temporary=True, no_space=no_space)


class Spool:
    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self._directory = directory
        self._memory_limit = memory_limit
        self._buffer: bytearray | None = bytearray()  # the content while it is in memory
        self._pending = bytearray()  # past the memory limit: bytes not yet in the file
        self._file: Any = None  # an unbuffered, unlinked file (io.FileIO on Linux)
        self.size = 0

    def _append(self, data: bytes) -> bool:
        """Take *data*; True when a batch is due for the file."""
        self.size += len(data)
        if self._buffer is not None:
            self._buffer += data
            if len(self._buffer) <= self._memory_limit:
                return False
            self._pending, self._buffer = self._buffer, None  # from now on the content goes to a file
            return True
        self._pending += data
        return len(self._pending) >= FLUSH_SIZE

    def _take(self) -> bytearray:
        batch, self._pending = self._pending, bytearray()
        return batch

    def write(self, data: bytes) -> None:
        """Add *data*, writing any due batch here (no event loop); SpoolError."""
        if self._append(data):
            self._write_file(self._take())

    async def write_async(self, data: bytes) -> None:
        """Add *data*; a due batch is written in a worker thread.  SpoolError."""
        if self._append(data):
            import trio

            await trio.to_thread.run_sync(self._write_file, self._take())

    async def finish(self) -> None:
        """Write what is still pending to the file (a worker thread); SpoolError."""
        if self._pending:
            import trio

            await trio.to_thread.run_sync(self._write_file, self._take())

    def _write_file(self, batch: bytearray) -> None:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._directory, prefix="spool.", buffering=0)
            view = memoryview(batch)
            while view:  # an unbuffered write may be short
                written = self._file.write(view)
                view = view[written or 0:]
        except OSError as exc:
            no_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise SpoolError(f"cannot write spool file in {self._directory}: {exc.strerror or exc}",
                             no_space=no_space) from exc

    @property
    def in_memory(self) -> bool:
        """Whether the whole content is still in memory (no file to read)."""
        return self._buffer is not None

    def getvalue(self) -> bytes | None:
        """The whole content if it is still in memory, else None (use chunks())."""
        return bytes(self._buffer) if self._buffer is not None else None

    def chunks(self, size: int) -> Iterator[bytes]:
        if self._buffer is not None:
            for start in range(0, len(self._buffer), size):
                yield bytes(self._buffer[start:start + size])
            return
        if self._pending:
            self._write_file(self._take())
        assert self._file is not None
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def close(self) -> None:
        self._buffer = bytearray()
        self._pending = bytearray()
        if self._file is not None:
            self._file.close()  # unlinked already: the space comes back now
            self._file = None
        self.size = 0
