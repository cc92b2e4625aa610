"""The reinjection listener (``reinject_listen``, master.cf's ``127.0.0.1:10025 ...
smtpd -o ...``) and ``receive_override_options``: what each listener leaves out,
its own restrictions, and configurations that must not start.  Real serves on
127.0.46.0/24, clients with smtplib."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import pytest
import trio

from tests.conftest import wait_for, write_main_cf
from tests.filter.mtas import FINAL, GATEWAY, OUTSIDE, queue, send, start
from tests.peers import Sink
from tests.ports import free_port
from trimail import config as configuration
from trimail.config import ConfigError
from trimail.master import serve
from trimail.queue.store import Store


def rcpt(port: int, recipient: str, source: str = GATEWAY) -> tuple[int, str]:
    with smtplib.SMTP(GATEWAY, port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        client.mail("a@client.example")
        code, text = client.rcpt(recipient)
        return code, text.decode()


def params_of(server) -> dict[str, dict]:
    store = Store.open(server.config.queue_directory, readonly=True)
    try:
        return {row[0]: json.loads(row[1]) for row in store.db.execute("SELECT id, params FROM message")}
    finally:
        store.close()


async def test_reinjection_skips_the_unknown_recipient_check_the_main_listener_makes(nursery, tmp_path):
    reinject_port = free_port(GATEWAY)
    srv = await start(nursery, tmp_path, master_service_disable="qmgr", mydestination="mx.test.example",
                      smtpd_listen=f"{GATEWAY}:0", reinject_listen=f"{GATEWAY}:{reinject_port}",
                      local_recipient_maps="inline:{ known=1 }", alias_maps="")
    main_port = srv.addresses_by_kind["smtp"][0].port
    code, text = await trio.to_thread.run_sync(rcpt, main_port, "nobody@mx.test.example")
    assert (code, text[:5]) == (550, "5.1.1")
    # reinject_overrides' default has receive_override_options = no_unknown_recipient_checks, ...
    assert await trio.to_thread.run_sync(rcpt, reinject_port, "nobody@mx.test.example") == (250, "2.1.5 Ok")
    assert srv.contexts["reinject"].receive_override_options == {
        "no_unknown_recipient_checks", "no_header_body_checks", "no_milters"}
    assert srv.contexts["smtp"].receive_override_options == frozenset()


async def test_reinjection_listener_has_its_own_restrictions(nursery, tmp_path):
    reinject_port = free_port(GATEWAY)
    srv = await start(nursery, tmp_path, master_service_disable="qmgr", smtpd_listen=f"{GATEWAY}:0",
                      reinject_listen=f"{GATEWAY}:{reinject_port}",
                      reinject_overrides=f"mynetworks={GATEWAY}/32 smtpd_relay_restrictions=permit_mynetworks,reject"
                                         " { smtpd_recipient_restrictions = permit_mynetworks, reject }")
    # the main listener trusts 127/8 (mynetworks), the reinjection listener only the filter's address
    assert (await trio.to_thread.run_sync(rcpt, srv.addresses_by_kind["smtp"][0].port, "r@remote.example",
                                          OUTSIDE))[0] == 250
    assert await trio.to_thread.run_sync(rcpt, reinject_port, "r@remote.example") == (250, "2.1.5 Ok")
    code, text = await trio.to_thread.run_sync(rcpt, reinject_port, "r@remote.example", OUTSIDE)
    assert (code, text) == (554, "5.7.1 <r@remote.example>: Recipient address rejected: Access denied")


async def test_reload_refuses_a_misspelt_override_and_keeps_the_listener(nursery, tmp_path):
    reinject_port = free_port(GATEWAY)
    srv = await start(nursery, tmp_path, master_service_disable="qmgr", smtpd_listen=f"{GATEWAY}:0",
                      reinject_listen=f"{GATEWAY}:{reinject_port}")
    main_cf = tmp_path / "main.cf"
    main_cf.write_text(main_cf.read_text() + "reinject_overrides = content_filer=\n")
    answer = await srv.reload()
    assert answer.startswith("error: ") and "unknown parameter content_filer" in answer
    assert await trio.to_thread.run_sync(rcpt, reinject_port, "r@remote.example") == (250, "2.1.5 Ok")
    assert srv.contexts["reinject"].config.content_filter == ""


async def test_reinjected_mail_is_never_filtered_again_even_without_content_filter_in_the_overrides(
        nursery, tmp_path):
    reinject_port = free_port(GATEWAY)
    srv = await start(nursery, tmp_path, master_service_disable="qmgr", smtpd_listen=f"{GATEWAY}:0",
                      reinject_listen=f"{GATEWAY}:{reinject_port}", content_filter="smtp:[127.0.46.2]:10024",
                      reinject_overrides="smtpd_recipient_restrictions=permit_mynetworks,reject")
    first = await trio.to_thread.run_sync(send, GATEWAY, srv.addresses_by_kind["smtp"][0].port,
                                          "a@client.example", ["r@remote.example"])
    back = await trio.to_thread.run_sync(send, GATEWAY, reinject_port, "a@client.example", ["r@remote.example"])
    params = params_of(srv)
    assert params[first]["_FILTER"] == "smtp:[127.0.46.2]:10024" and "_FILTER" not in params[back]


async def test_no_address_mappings_before_the_filter_and_mappings_after_it(nursery, tmp_path):
    """Postfix's FILTER_README: virtual aliases and masquerading happen once, after
    the filter; the filter sees the addresses as the client sent them."""
    reinject_port = free_port(GATEWAY)
    with Sink(FINAL) as content_filter, Sink("127.0.46.4") as final:
        srv = await start(nursery, tmp_path, smtpd_listen=f"{GATEWAY}:0", reinject_listen=f"{GATEWAY}:{reinject_port}",
                          relayhost=f"[127.0.46.4]:{final.port}",
                          content_filter=f"smtp:[{FINAL}]:{content_filter.port}",
                          receive_override_options="no_address_mappings",
                          virtual_alias_maps="inline:{ alias@remote.example=target@remote.example }",
                          masquerade_domains="example.com")
        await trio.to_thread.run_sync(send, GATEWAY, srv.addresses_by_kind["smtp"][0].port, "a@host.example.com",
                                      ["alias@remote.example"])
        await wait_for(lambda: len(content_filter.messages) == 1 and not queue(srv), 30)
        assert content_filter.messages[0][:2] == ("a@host.example.com", ["alias@remote.example"])
        # what the filter gives back is mapped (the reinjection listener's default has no no_address_mappings)
        await trio.to_thread.run_sync(send, GATEWAY, reinject_port, "a@host.example.com", ["alias@remote.example"])
        await wait_for(lambda: len(final.messages) == 1 and not queue(srv), 30)
        assert final.messages[0][:2] == ("a@example.com", ["target@remote.example"])


async def test_pickup_sends_local_submissions_through_the_content_filter(nursery, tmp_path):
    with Sink(FINAL) as content_filter:
        srv = await start(nursery, tmp_path, smtpd_listen=f"{GATEWAY}:0",
                          content_filter=f"smtp:[{FINAL}]:{content_filter.port}", relayhost="[127.0.46.5]:9")
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "trimail", "sendmail", "-c", str(srv.config.source), "-f", "a@mx.test.example",
             "r@remote.example"], input="Subject: local\n\nhello\n", capture_output=True, text=True, timeout=60,
            check=False))
        assert result.returncode == 0, result.stderr
        await wait_for(lambda: len(content_filter.messages) == 1 and not queue(srv), 30)
        assert content_filter.messages[0][1] == ["r@remote.example"]


async def test_local_submissions_honour_no_address_mappings_as_pickup_does(nursery, tmp_path):
    with Sink(FINAL) as content_filter:
        srv = await start(nursery, tmp_path, smtpd_listen=f"{GATEWAY}:0",
                          content_filter=f"smtp:[{FINAL}]:{content_filter.port}", relayhost="[127.0.46.5]:9",
                          receive_override_options="no_address_mappings", masquerade_domains="example.com",
                          virtual_alias_maps="inline:{ alias@remote.example=target@remote.example }")
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "trimail", "sendmail", "-c", str(srv.config.source), "-f", "a@host.example.com",
             "alias@remote.example"], input="Subject: local\n\nhello\n", capture_output=True, text=True,
            timeout=60, check=False))
        assert result.returncode == 0, result.stderr
        await wait_for(lambda: len(content_filter.messages) == 1 and not queue(srv), 30)
        assert content_filter.messages[0][:2] == ("a@host.example.com", ["alias@remote.example"])


@pytest.mark.parametrize(("params", "words"), [
    ({"reinject_overrides": "content_filer="},
     "reinject_overrides: unknown parameter content_filer (did you mean content_filter?)"),
    ({"reinject_overrides": "smtpd_recipient_restrictions=permit_mynetwork"}, "permit_mynetwork"),
    ({"reinject_overrides": "message_size_limit=10MB"}, "message_size_limit"),
    ({"reinject_overrides": "no_equals_sign"}, "bad override 'no_equals_sign'"),
    ({"content_filter": "amavis:[127.0.0.1]:10024"}, "unknown transport 'amavis'"),
    ({"content_filter": "smtp"}, "needs transport:destination"),
    ({"receive_override_options": "no_header_checks"}, "unknown option 'no_header_checks'"),
])
async def test_a_bad_filter_configuration_does_not_start(nursery, tmp_path, params, words):
    path = write_main_cf(tmp_path, smtpd_listen=f"{GATEWAY}:0", reinject_listen=f"{GATEWAY}:0", **params)
    with pytest.raises(ConfigError) as raised:
        await nursery.start(serve, configuration.load(path))
    assert words in str(raised.value) and str(path) in str(raised.value)


def test_check_reports_the_reinjection_listeners_restrictions(tmp_path):
    path = write_main_cf(tmp_path, smtpd_listen=f"{GATEWAY}:0", reinject_listen=f"{GATEWAY}:0", alias_maps="",
                         reinject_overrides="smtpd_recipient_restrictions=permit_mynetworks,reject_unath_destination")
    result = subprocess.run([sys.executable, "-m", "trimail", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("reinject_overrides"))
    assert result.returncode == 1
    assert (f"error: {path}, line {line}: reinject_overrides smtpd_recipient_restrictions: "
            "smtpd_recipient_restrictions: unknown restriction 'reject_unath_destination'") in result.stderr, result.stderr
