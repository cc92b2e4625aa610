"""Reading a bounded request from a trio stream."""

from __future__ import annotations

import trio


async def receive_until(stream: trio.abc.ReceiveStream, marker: bytes, limit: int) -> bytes:
    """Bytes up to and including *marker* (and whatever came with it), at most about
    *limit* bytes; stops early at end of file.  The caller sets the time limit."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = await stream.receive_some(limit)
        if not chunk:
            break
        data += chunk
    return data
