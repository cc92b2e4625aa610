"""The open-relay battery: an outside client tries every trick; nothing relays, nothing is queued."""

from __future__ import annotations

import smtplib

import pytest
import trio

from trimail.queue.store import Store

OUTSIDE = "127.0.0.2"  # the test client binds here; mynetworks is 127.0.0.1/32

FORMS = [
    "user@outside.example",
    "USER@OUTSIDE.EXAMPLE",
    "user@outside.example.",
    "user%outside.example@gw.example",
    '"user%outside.example"@gw.example',
    '"user@outside.example"@gw.example',
    '"user@outside.example."@gw.example',
    "<@gw.example:user@outside.example>",
    "<@gw.example,@other.example:user@outside.example>",
    # source routes are ignored (RFC 5321 appendix C), the relay decision is on what follows
    "<@gw.example:victim@outside.example>",
    "<@[IPv6:::1]:victim@outside.example>",
    "<@[127.0.0.1],@gw.example:victim@outside.example>",
    '<@gw.example:"victim@outside.example"@gw.example>',
    '<@gw.example:"@gw.example:victim@outside.example"@gw.example>',
    "outside.example!user@gw.example",
    "outside.example!user",
    "outside.example!user%other.example@gw.example",
    # address literals that are not one of our listener addresses (127.0.0.1 is:
    # mail to it is local, see ALL_FORMS and tests/policy/test_own_literals.py)
    "user@[192.0.2.1]",
    "user@[127.0.0.3]",
    "user@[IPv6:::1]",
    "user@[IPv6:2001:db8::1]",
    "user@[IPv6:::ffff:127.0.0.1]",
    "user@[127.0.0.1]@outside.example",
    "user@sub.gw.example",
    "user@gw.example.outside.example",
    "user@localhost.outside.example",
    "user@outside.example@gw.example",
    "user@gw.example@outside.example",
    "user@outside.example%gw.example",
    "user%outside.example",
    "<user@outside.example >",
    "user@outside .example",
    "user@[192.0.2.1]@gw.example",
    "\"user\"@outside.example",
    "user+tag@outside.example",
    # issue 14: a resolver that gave up after ten rounds took these for local
    '"victim@outside.example@@@@@@@@@"@gw.example',
    "!!!!!!!!!outside.example!victim@gw.example",
    '"victim@outside.example@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@"@gw.example',
    "a!b!c!d!e!f!g!h!i!j!k!outside.example!victim@gw.example",
    '"@"@gw.example',
    "user@",
]


def attempt(port: int, sender: str, recipient: str, source: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("gw.example")
        code, text = client.docmd("MAIL", f"FROM:<{sender}>")
        if code != 250:
            return code, text
        rcpt = recipient if recipient.startswith("<") else f"<{recipient}>"
        return client.docmd("RCPT", f"TO:{rcpt}")


@pytest.fixture
async def gateway(start_mta):
    return await start_mta(mynetworks="127.0.0.1/32", myhostname="gw.example", mydestination="gw.example",
                           local_recipient_maps="inline:{ postmaster=x, user=x }", master_service_disable="qmgr")


@pytest.mark.parametrize("sender", ["someone@client.example", "", "user@gw.example"],
                         ids=["stranger", "null-sender", "own-domain"])
async def test_outside_client_cannot_relay_with_any_address_form(gateway, sender):
    port = gateway.addresses[0].port
    results = {}
    for form in FORMS:
        results[form] = await trio.to_thread.run_sync(attempt, port, sender, form, OUTSIDE)
    accepted = {form: r for form, r in results.items() if r[0] < 400}
    assert accepted == {}
    assert all(400 <= code < 600 for code, _ in results.values())
    assert results["user@outside.example"] == (450, b"4.7.1 <user@outside.example>: Relay access denied")
    store = Store.open(gateway.config.queue_directory, readonly=True)
    assert store.list_messages() == []


async def test_inside_client_may_relay(gateway):
    code, _text = await trio.to_thread.run_sync(attempt, gateway.addresses[0].port, "a@client.example",
                                               "user@outside.example", "127.0.0.1")
    assert code == 250


async def test_local_recipient_from_outside_is_accepted(gateway):
    code, _ = await trio.to_thread.run_sync(attempt, gateway.addresses[0].port, "a@client.example",
                                            "user@gw.example", OUTSIDE)
    assert code == 250


async def test_reject_unauth_destination_gives_554(start_mta):
    srv = await start_mta(mynetworks="127.0.0.1/32", smtpd_relay_restrictions="permit_mynetworks, "
                          "reject_unauth_destination", master_service_disable="qmgr")
    code, text = await trio.to_thread.run_sync(attempt, srv.addresses[0].port, "a@client.example",
                                               "user@outside.example", OUTSIDE)
    assert (code, text) == (554, b"5.7.1 <user@outside.example>: Relay access denied")


async def test_relay_domains_and_their_subdomains_are_authorized(start_mta):
    srv = await start_mta(mynetworks="127.0.0.1/32", relay_domains="internal.example",
                          master_service_disable="qmgr")
    for rcpt in ["a@internal.example", "a@sub.internal.example"]:
        code, _ = await trio.to_thread.run_sync(attempt, srv.addresses[0].port, "a@client.example", rcpt, OUTSIDE)
        assert code == 250, rcpt


LOCAL_RECIPIENTS = {
    "default": {},  # proxy:unix:passwd.byname $alias_maps
    "empty": {"local_recipient_maps": ""},  # every local name accepted (Postfix's documented setting)
    # a catch-all virtual alias for the local domain, and a virtual alias domain whose every user it maps
    "catch-all": {"local_recipient_maps": "", "virtual_alias_domains": "virt.example",
                  "virtual_alias_maps": "inline:{ @gw.example=postmaster@gw.example, "
                                        "@virt.example=postmaster@gw.example }"},
}
# every form again with the virtual alias domain in place of the local one, and at a relay domain
ALL_FORMS = FORMS + [f.replace("gw.example", "virt.example") for f in FORMS if "gw.example" in f] + [
    "user@internal.example", "outside.example!user@internal.example", '"user@outside.example"@internal.example',
    "user@outside.example@internal.example", "internal.example!user@gw.example",
    # our own address literal is local (Postfix's resolve_local), and resolves further like gw.example
    "user@[127.0.0.1]", '"user@outside.example"@[127.0.0.1]', "outside.example!user@[127.0.0.1]",
    "user@outside.example@[127.0.0.1]", "<@[127.0.0.1]:user@outside.example>"]


def transaction(port: int, recipient: str, source: str) -> tuple[int, str | None]:
    """RCPT's code, and the queue ID when the whole message was accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        client.docmd("MAIL", "FROM:<someone@client.example>")
        rcpt = recipient if recipient.startswith("<") else f"<{recipient}>"
        code, _ = client.docmd("RCPT", f"TO:{rcpt}")
        if code >= 400:
            return code, None
        code, text = client.data(b"Subject: relay test\r\n\r\nx\r\n")
        return 250, text.decode().rsplit(" ", 1)[1] if code == 250 else None


@pytest.mark.parametrize("recipients", list(LOCAL_RECIPIENTS), ids=list(LOCAL_RECIPIENTS))
async def test_an_outside_client_250_is_always_a_local_or_relay_route(start_mta, recipients):
    """The invariant: whatever an outside client gets 250 for is stored as an address
    whose route is local or a domain we relay for, never the outside world; every
    form, three ways (issue 14)."""
    from trimail import rewrite
    from trimail.delivery.route import Router

    srv = await start_mta(mynetworks="127.0.0.1/32", myhostname="gw.example", mydestination="gw.example",
                          relay_domains="internal.example", master_service_disable="qmgr",
                          **LOCAL_RECIPIENTS[recipients])
    router = Router(srv.config)
    settings = rewrite.Settings.from_config(srv.config)
    accepted = {"local": 0, "relay": 0}
    virtual_accepted = 0
    for form in ALL_FORMS:
        _code, queue_id = await trio.to_thread.run_sync(transaction, srv.addresses[0].port, form, OUTSIDE)
        if queue_id is None:
            continue
        store = Store.open(srv.config.queue_directory, readonly=True)
        [info] = store.list_messages_by_id([queue_id])
        virtual_accepted += "virt.example" in form
        for recipient in info.recipients:
            route = router.route(recipient.address)
            final = rewrite.resolve(recipient.address, settings)
            assert route.transport == "local" or (route.transport == "relay" and final.klass == "relay"
                                                  and final.domain == "internal.example"), (form, recipient, route)
            accepted[route.transport] += 1
    assert accepted["relay"] >= 4  # the relay domain's forms, in every configuration
    if recipients != "default":
        assert accepted["local"] > 0  # the invariant was tested on accepted local mail, not only on refusals
    # the virtual alias domain's forms: accepted (and stored rewritten to local) only where it is one
    assert (virtual_accepted > 0) == (recipients == "catch-all")


def rcpt(port: int, recipient: str, source: str = OUTSIDE) -> tuple[int, str]:
    code, text = attempt(port, "someone@client.example", recipient, source)
    return code, text.decode()


async def test_each_address_class_refuses_its_unknown_users_with_postfixs_words(start_mta):
    """reject_unlisted_recipient per class (Postfix's check_rcpt_maps), each with its reject code."""
    srv = await start_mta(mynetworks="127.0.0.1/32", myhostname="gw.example", mydestination="gw.example",
                          master_service_disable="qmgr", local_recipient_maps="inline:{ known=x }",
                          virtual_alias_domains="alias.example", virtual_mailbox_domains="mbox.example",
                          relay_domains="corp.example",
                          virtual_alias_maps="inline:{ known@alias.example=known@gw.example, "
                                             "alias@gw.example=known@gw.example }",
                          virtual_mailbox_maps="inline:{ known@mbox.example=mbox.example/known/ }",
                          relay_recipient_maps="inline:{ known@corp.example=x, @sub.corp.example=x }",
                          unknown_virtual_mailbox_reject_code="450", recipient_delimiter="+")
    port = srv.addresses[0].port
    for known in ["known@gw.example", "known+tag@gw.example", "alias@gw.example", "postmaster@gw.example",
                  "known@alias.example", "known@mbox.example", "known@corp.example", "KNOWN+x@corp.example",
                  "anyone@sub.corp.example"]:
        assert (await trio.to_thread.run_sync(rcpt, port, known))[0] == 250, known
    for unknown, table, code in [("who@gw.example", "local recipient", 550),
                                 ("who@alias.example", "virtual alias", 550),
                                 ("who@mbox.example", "virtual mailbox", 450),
                                 ("who@corp.example", "relay recipient", 550)]:
        dsn = f"{code // 100}.1.1"
        assert await trio.to_thread.run_sync(rcpt, port, unknown) == (
            code, f"{dsn} <{unknown}>: Recipient address rejected: User unknown in {table} table"), unknown


async def test_smtpd_reject_unlisted_recipient_no_leaves_it_to_the_restriction(start_mta, tmp_path):
    params = {"mynetworks": "127.0.0.1/32", "relay_domains": "corp.example", "master_service_disable": "qmgr",
              "relay_recipient_maps": "inline:{ known@corp.example=x }", "smtpd_reject_unlisted_recipient": "no"}
    srv = await start_mta(**params)
    assert (await trio.to_thread.run_sync(rcpt, srv.addresses[0].port, "who@corp.example"))[0] == 250
    srv = await start_mta(**params, smtpd_recipient_restrictions="reject_unlisted_recipient",
                          queue_directory=tmp_path / "queue2")
    assert await trio.to_thread.run_sync(rcpt, srv.addresses[0].port, "who@corp.example") == (
        550, "5.1.1 <who@corp.example>: Recipient address rejected: User unknown in relay recipient table")


async def test_virtual_domains_are_authorized_destinations(start_mta):
    srv = await start_mta(mynetworks="127.0.0.1/32", master_service_disable="qmgr",
                          virtual_alias_domains="alias.example", virtual_mailbox_domains="mbox.example",
                          virtual_alias_maps="inline:{ @alias.example=postmaster }")
    port = srv.addresses[0].port
    assert (await trio.to_thread.run_sync(rcpt, port, "anyone@alias.example"))[0] == 250
    assert (await trio.to_thread.run_sync(rcpt, port, "anyone@mbox.example"))[0] == 250  # no maps: anyone
    assert (await trio.to_thread.run_sync(rcpt, port, "anyone@sub.mbox.example"))[0] == 450  # not a subdomain
