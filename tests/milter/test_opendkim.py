"""OpenDKIM (Debian's opendkim, libmilter) as a real milter: trimail hands it each
message from mynetworks, OpenDKIM signs it, and the signature verifies with dkimpy."""

from __future__ import annotations

import dkim

from tests.milter.conftest import send, stored
from tests.milter.peers import OpenDkim


async def test_opendkim_signs_outbound_mail_and_dkimpy_verifies_it(start_serve, tmp_path):
    signer = OpenDkim(tmp_path / "opendkim")
    try:
        srv = await start_serve(smtpd_milters=signer.name)
        result = await send(srv, "alice@example.com", ["bob@remote.example"])
        info, content = stored(srv, result.queue_id)
    finally:
        signer.close()
    assert b"DKIM-Signature:" in content
    assert b"d=example.com" in content and b"s=test" in content
    # OpenDKIM inserts at index 0: above our Received: header, as with Postfix
    assert content.startswith(b"DKIM-Signature:")
    assert content.index(b"Received: from client.example") < content.index(b"From: Alice")
    assert dkim.verify(content, dnsfunc=signer.dnsfunc)
    assert info.state == "incoming" and [r.address for r in info.recipients] == ["bob@remote.example"]
    tampered = content.replace(b"this is the body.", b"this is another body.")
    assert not dkim.verify(tampered, dnsfunc=signer.dnsfunc)
