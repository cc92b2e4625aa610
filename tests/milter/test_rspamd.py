"""rspamd (Debian's rspamd) as a real milter: its rspamd_proxy worker in milter mode
rejects GTUBE at end of data with its own reply, and adds its headers
(X-Spamd-Result, X-Rspamd-*) to a message it lets through.  One rspamd for both
checks: it takes seconds to start."""

from __future__ import annotations

import logging

from tests.milter.conftest import MESSAGE, send, stored
from tests.milter.peers import Rspamd

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


async def test_rspamd_rejects_gtube_and_adds_its_headers(start_serve, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spam_filter = Rspamd(tmp_path / "rspamd")
    try:
        srv = await start_serve(smtpd_milters=spam_filter.name)
        spam = await send(srv, "alice@example.com", ["bob@remote.example"],
                          MESSAGE.replace("this is the body.", GTUBE))
        ham = await send(srv, "alice@example.com", ["bob@remote.example"])
        _, content = stored(srv, ham.queue_id)
    finally:
        spam_filter.close()
    assert spam.data is not None and spam.data[0] == 554, (spam, spam_filter.log()[-3000:])
    assert b"5.7.1" in spam.data[1]
    assert "milter-reject: END-OF-MESSAGE from" in caplog.text
    header = content.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nX-Spamd-Result: default: " in header, header
    assert b"\r\nX-Rspamd-Queue-Id: " in header
    assert b"\r\nX-Rspamd-Server: " in header
