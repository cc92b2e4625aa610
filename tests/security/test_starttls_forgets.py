"""RFC 3207 section 4.2: after STARTTLS the server forgets what the client said before,
the HELO name included.  A client must say EHLO again before MAIL; the Received:
header, the HELO restrictions and the log then carry the name given under TLS."""

from __future__ import annotations

from tests.security.test_tls_auth import Line, client_context, run
from tests.smtp.driver import Driver
from trimail.queue.store import Store
from trimail.smtp.events import StartTls
from trimail.smtp.server import Settings


async def test_mail_after_starttls_needs_a_new_ehlo_and_received_has_the_new_name(start_mta, cert, ca):
    srv = await start_mta(smtpd_tls_cert_file=str(cert), master_service_disable="qmgr")

    def talk() -> tuple:
        c = Line(srv.addresses[0].port)
        c.reply()
        c.cmd("EHLO before-tls.example")
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls(client_context(ca))
        early = c.cmd("MAIL FROM:<a@client.example>")
        c.cmd("EHLO after-tls.example")
        c.cmd("MAIL FROM:<a@client.example>")
        c.cmd("RCPT TO:<b@far.example>")
        c.cmd("DATA")
        return early, c.cmd("Subject: tls\r\n\r\nx\r\n.")

    early, queued = await run(talk)
    assert early == (503, ["503 5.5.1 Error: send HELO/EHLO first"])
    assert queued[0] == 250, queued
    queue_id = queued[1][0].rsplit(" ", 1)[1]
    content = Store.open(srv.config.queue_directory, readonly=True).read_content(queue_id)
    assert b"Received: from after-tls.example (" in content
    assert b"before-tls.example" not in content


async def test_helo_restrictions_judge_the_name_given_under_tls(start_mta, cert, ca):
    srv = await start_mta(smtpd_tls_cert_file=str(cert), master_service_disable="qmgr",
                          smtpd_helo_restrictions="check_helo_access inline:{ bad.example=REJECT }")

    def talk(first: str, second: str) -> tuple:
        c = Line(srv.addresses[0].port)
        c.reply()
        c.cmd(f"EHLO {first}")
        c.cmd("STARTTLS")
        c.starttls(client_context(ca))
        c.cmd(f"EHLO {second}")
        c.cmd("MAIL FROM:<a@client.example>")
        return c.cmd("RCPT TO:<b@far.example>")

    forgotten = await run(talk, "bad.example", "good.example")
    judged = await run(talk, "good.example", "bad.example")
    assert forgotten[0] == 250, forgotten
    assert judged[0] == 554 and "bad.example" in judged[1][0], judged


def test_machine_forgets_helo_at_starttls_even_without_smtpd_helo_required():
    d = Driver(Settings(starttls=True, helo_required=False))
    d.feed(b"EHLO before.example\r\nSTARTTLS\r\n")
    assert any(isinstance(e, StartTls) for e in d.events)
    assert d.conn.helo_name is None and d.conn.tls_active
    d.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert d.replies()[-1] == "503 5.5.1 Error: send HELO/EHLO first"
    d.feed(b"EHLO after.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.conn.helo_name == "after.example"
    assert d.replies()[-1] == "250 2.1.0 Ok"
