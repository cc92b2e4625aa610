"""Rewriting the spooled content at the end of DATA: our field goes right after our
Received:, forged fields go (folded ones whole), the rest -- header order, body,
odd shapes -- stays byte for byte."""

from __future__ import annotations

import pytest

from trimail.authcheck.inbound import _forged, replace_content
from trimail.queue.spool import Spool

RECEIVED = b"Received: from a (b [192.0.2.1])\r\n\tby mx.test.example (trimail) id X; date\r\n"
OURS = b"Authentication-Results: mx.test.example; none\r\n"
BODY_CLAIM = (b"Subject: x\r\nAuthentication-Results: other.example; spf=pass\r\n\r\n"
              b"Authentication-Results: mx.test.example; in the body\r\n")


async def rewritten(tmp_path, client: bytes, memory_limit: int = 1 << 20) -> bytes:
    spool = Spool(tmp_path, memory_limit=memory_limit)
    await spool.write_async(RECEIVED + client)
    await spool.finish()
    raw = spool.getvalue() or b"".join(spool.chunks(1 << 16))
    new = await replace_content(tmp_path, spool, raw, OURS, lambda f: _forged(f, "mx.test.example"))
    return new.getvalue() or b"".join(new.chunks(1 << 16))


@pytest.mark.parametrize(("client", "expected"), [
    (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n"),
    (b"\r\nbody only\r\n", b"\r\nbody only\r\n"),
    (b"Subject: no body\r\n", b"Subject: no body\r\n"),
    (b"", b""),
    (b"Authentication-Results: mx.test.example;\r\n\tspf=pass\r\n\tdkim=pass\r\nSubject: x\r\n\r\nb\r\n",
     b"Subject: x\r\n\r\nb\r\n"),
    (BODY_CLAIM, BODY_CLAIM),  # a line in the body is no header field
])
async def test_our_field_follows_our_received_and_forgeries_go(tmp_path, client, expected):
    assert await rewritten(tmp_path, client) == RECEIVED + OURS + expected


async def test_a_message_past_the_memory_limit_is_rewritten_through_a_file(tmp_path):
    body = b"x" * 998 + b"\r\n"
    client = b"Authentication-Results: mx.test.example; dkim=pass\r\nSubject: big\r\n\r\n" + body * 600
    assert await rewritten(tmp_path, client, memory_limit=4096) == RECEIVED + OURS + b"Subject: big\r\n\r\n" + body * 600
