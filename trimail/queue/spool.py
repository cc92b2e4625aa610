"""A message body on its way to the queue: memory for small ones, a file for big ones.

The SMTP session writes DATA chunks here as they arrive; the queue writer copies
the content into the database inside the commit.  Up to ``memory_limit`` bytes stay
in memory; past that the content moves to an unlinked temporary file in the queue
directory, so a session's memory does not grow with the size of its message.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

DEFAULT_MEMORY_LIMIT = 256 * 1024


class Spool:
    def __init__(self, directory: str | os.PathLike[str] | None = None,
                 memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self._directory = directory
        self._memory_limit = memory_limit
        self._buffer: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._buffer is not None:
            self._buffer += data
            if len(self._buffer) <= self._memory_limit:
                return
            self._file = tempfile.TemporaryFile(dir=self._directory, prefix="spool.")
            self._file.write(self._buffer)
            self._buffer = None
            return
        assert self._file is not None
        self._file.write(data)

    def getvalue(self) -> bytes | None:
        """The whole content if it is still in memory, else None (use chunks())."""
        return bytes(self._buffer) if self._buffer is not None else None

    def chunks(self, size: int) -> Iterator[bytes]:
        if self._buffer is not None:
            for start in range(0, len(self._buffer), size):
                yield bytes(self._buffer[start:start + size])
            return
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def close(self) -> None:
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.size = 0
