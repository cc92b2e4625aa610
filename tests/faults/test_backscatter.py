"""No backscatter: a gateway refuses unknown users of the domains it relays for at RCPT.

An outsider with a forged sender and many unknown ``@corp.example`` recipients must
get ``550 5.1.1 ... User unknown in relay recipient table`` for each (Postfix's
``relay_recipient_maps``), so nothing is queued for them and no bounce ever goes to
the forged address; the one listed user gets ``250`` and is delivered.  A table
that cannot answer is ``451 4.3.0``, never the daemon.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.faults.conftest import assert_serving, integrity_ok, queued, wait_until
from tests.peers import Sink

OUTSIDE = "127.0.0.2"  # mynetworks is 127.0.0.1/32: this client is a stranger
UNKNOWN = [f"nobody{i}@corp.example" for i in range(50)]


def _gateway(tmp_path: Path, daemon, corp: Sink, forged: Sink, table: str):
    return daemon(mynetworks="127.0.0.1/32", relay_domains="corp.example", relay_recipient_maps=table,
                  transport_maps=f"inline:{{ corp.example=smtp:[127.0.0.1]:{corp.port}, "
                                 f"forged.example=smtp:[127.0.0.1]:{forged.port} }}",
                  # the internal server would bounce unknown users: the bounce goes to the forged sender
                  minimal_backoff_time="1s",
                  # Postfix's limits would slow down and then hang up on the attacker first
                  smtpd_hard_error_limit="100", smtpd_error_sleep_time="0")


def test_unknown_relay_recipients_are_refused_at_rcpt_and_nothing_bounces(tmp_path, daemon):
    users = tmp_path / "relay_recipients"
    users.write_text("known@corp.example x\n")
    # the internal server knows only "known": anything else it would refuse (and we would bounce)
    with Sink(rules={f"nobody{i}": "550 5.1.1 no such user" for i in range(50)}) as corp, Sink() as forged:
        d = _gateway(tmp_path, daemon, corp, forged, f"texthash:{users}")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30, source_address=(OUTSIDE, 0)) as client:
            client.ehlo("attacker.example")
            assert client.mail("victim@forged.example")[0] == 250
            for rcpt in UNKNOWN:
                code, text = client.rcpt(rcpt)
                refusal = f"5.1.1 <{rcpt}>: Recipient address rejected: User unknown in relay recipient table"
                assert (code, text.decode()) == (550, refusal), rcpt
            assert client.rcpt("known@corp.example")[0] == 250
            code, _ = client.data(b"Subject: spam\r\n\r\nattacker's text\r\n")
            assert code == 250
            # a transaction with only unknown recipients queues nothing
            assert client.mail("victim@forged.example")[0] == 250
            assert client.rcpt("nobody1@corp.example")[0] == 550
            assert client.docmd("DATA")[0] == 554
        wait_until(lambda: len(corp.messages) == 1)
        assert corp.messages[0][1] == ["known@corp.example"]
        wait_until(lambda: queued(d.queue_directory) == 0)  # delivered, nothing deferred to bounce later
        assert forged.messages == []
        assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"


def test_a_relay_recipient_table_that_cannot_answer_is_a_temporary_failure(tmp_path, daemon):
    with Sink() as corp, Sink() as forged:
        d = _gateway(tmp_path, daemon, corp, forged, f"texthash:{tmp_path / 'missing'}")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30, source_address=(OUTSIDE, 0)) as client:
            client.ehlo("client.example")
            assert client.mail("a@client.example")[0] == 250
            code, text = client.rcpt("known@corp.example")
            assert (code, text.decode()) == (451, "4.3.0 <known@corp.example>: Temporary lookup failure")
        assert_serving(d)
        assert queued(d.queue_directory) == 0
