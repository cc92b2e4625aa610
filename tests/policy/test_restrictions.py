"""Every restriction with an accepting and a refusing case, Postfix's codes and texts,
against a real DNS server on loopback."""

from __future__ import annotations

import logging
import smtplib
import socket

import pytest
import trio

from tests.conftest import trimail
from trimail.queue.store import Store

ZONE = {
    "good.example": {"MX": ["10 mx.good.example."]},
    "mx.good.example": {"A": ["127.0.0.9"]},
    "aonly.example": {"A": ["127.0.0.9"]},
    "sick.example": "SERVFAIL",
    "2.0.0.127.in-addr.arpa": {"PTR": ["client.good.example."]},
    "client.good.example": {"A": ["127.0.0.2"]},
    "3.0.0.127.in-addr.arpa": {"PTR": ["liar.example."]},
    "liar.example": {"A": ["10.9.9.9"]},
    "2.0.0.127.zen.example": {"A": ["127.0.0.2"], "TXT": ['"listed, see https://zen.example/q?127.0.0.2"']},
    "2.0.0.127.filtered.example": {"A": ["127.0.0.10"]},
    # a hostile list: its TXT record tries to end our reply line and add one of its own
    "2.0.0.127.evil.example": {"A": ["127.0.0.2"], "TXT": ['"listed\\013\\010250 2.0.0 injected"']},
    "bad.example.rhsbl.example": {"A": ["127.0.0.2"]},
    "badhelo.example.rhsbl.example": {"A": ["127.0.0.2"]},
    "2.0.0.127.wl.example": {"A": ["127.0.0.2"]},
    "4.0.0.127.in-addr.arpa": "NXDOMAIN",
}


def converse(port: int, source: str, helo: str, sender: str, rcpt: str, data: bool) -> tuple[int, str]:
    """The first refusal in a whole transaction, or (250, "") when everything passed."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        code, text = client.ehlo(helo)
        if code != 250:
            return code, text.decode()
        for verb, arg in (("MAIL", f"FROM:<{sender}>"), ("RCPT", f"TO:<{rcpt}>")):
            code, text = client.docmd(verb, arg)
            if code >= 400:
                return code, text.decode()
        if data:
            try:
                code, text = client.data(b"Subject: policy\r\n\r\nx\r\n")
            except smtplib.SMTPDataError as exc:  # the DATA command itself was refused
                return exc.smtp_code, exc.smtp_error.decode()
            if code >= 400:  # the final reply
                return code, text.decode()
    return 250, ""


D = dict(source="127.0.0.1", helo="client.good.example", sender="a@good.example", rcpt="r@good.example",
         data=False)

# (id, parameters, conversation, expected code, expected text prefix)
CASES = [
    ("permit_mynetworks-ok", {"smtpd_recipient_restrictions": "permit_mynetworks, reject"}, {}, 250, ""),
    ("permit_mynetworks-no", {"smtpd_recipient_restrictions": "permit_mynetworks, reject"},
     {"source": "127.0.0.2"}, 554, "5.7.1 <r@good.example>: Recipient address rejected: Access denied"),
    ("reject", {"smtpd_client_restrictions": "reject"}, {}, 554,
     "5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied"),
    ("defer", {"smtpd_sender_restrictions": "defer"}, {}, 450,
     "4.7.1 <a@good.example>: Sender address rejected: Access denied"),
    ("permit-stops-list", {"smtpd_recipient_restrictions": "permit, reject"}, {}, 250, ""),
    ("permit_auth_destination-ok", {"relay_domains": "good.example",
                                    "smtpd_recipient_restrictions": "permit_auth_destination, reject"},
     {"source": "127.0.0.2"}, 250, ""),
    ("permit_auth_destination-no", {"smtpd_relay_restrictions": "",
                                    "smtpd_recipient_restrictions": "permit_auth_destination, reject"},
     {"source": "127.0.0.2", "rcpt": "r@else.example"}, 554,
     "5.7.1 <r@else.example>: Recipient address rejected: Access denied"),
    ("unknown_sender_domain-mx", {"smtpd_sender_restrictions": "reject_unknown_sender_domain"}, {}, 250, ""),
    ("unknown_sender_domain-a", {"smtpd_sender_restrictions": "reject_unknown_sender_domain"},
     {"sender": "a@aonly.example"}, 250, ""),
    ("unknown_sender_domain-nx", {"smtpd_sender_restrictions": "reject_unknown_sender_domain"},
     {"sender": "a@missing.example"}, 450, "4.1.8 <a@missing.example>: Sender address rejected: Domain not found"),
    ("unknown_sender_domain-servfail", {"smtpd_sender_restrictions": "reject_unknown_sender_domain"},
     {"sender": "a@sick.example"}, 450, "4.1.8 <a@sick.example>: Sender address rejected: Domain not found"),
    ("unknown_recipient_domain-ok", {"smtpd_recipient_restrictions": "reject_unknown_recipient_domain"},
     {}, 250, ""),
    ("unknown_recipient_domain-nx", {"smtpd_recipient_restrictions": "reject_unknown_recipient_domain"},
     {"rcpt": "r@missing.example"}, 450, "4.1.2 <r@missing.example>: Recipient address rejected: Domain not found"),
    ("non_fqdn_sender-ok", {"smtpd_sender_restrictions": "reject_non_fqdn_sender"}, {}, 250, ""),
    ("non_fqdn_sender-no", {"smtpd_sender_restrictions": "reject_non_fqdn_sender"}, {"sender": "a@host"},
     504, "5.5.2 <a@host>: Sender address rejected: need fully-qualified address"),
    ("non_fqdn_recipient-no", {"smtpd_recipient_restrictions": "reject_non_fqdn_recipient"},
     {"rcpt": "r@host"}, 504, "5.5.2 <r@host>: Recipient address rejected: need fully-qualified address"),
    ("non_fqdn_helo-ok", {"smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"}, {"helo": "[127.0.0.1]"},
     250, ""),
    ("non_fqdn_helo-no", {"smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"}, {"helo": "host"},
     504, "5.5.2 <host>: Helo command rejected: need fully-qualified hostname"),
    ("invalid_helo-no", {"smtpd_helo_restrictions": "reject_invalid_helo_hostname"}, {"helo": "bad!host"},
     501, "5.5.2 <bad!host>: Helo command rejected: Invalid name"),
    ("unknown_client_hostname-ok", {"smtpd_client_restrictions": "reject_unknown_client_hostname"},
     {"source": "127.0.0.2"}, 250, ""),
    ("unknown_client_hostname-no", {"smtpd_client_restrictions": "reject_unknown_client_hostname"},
     {"source": "127.0.0.3"}, 450, "4.7.25 Client host rejected: cannot find your hostname, [127.0.0.3]"),
    ("unknown_reverse-ok", {"smtpd_client_restrictions": "reject_unknown_reverse_client_hostname"},
     {"source": "127.0.0.3"}, 250, ""),
    ("unknown_reverse-no", {"smtpd_client_restrictions": "reject_unknown_reverse_client_hostname"},
     {"source": "127.0.0.4"}, 450, "4.7.1 Client host rejected: cannot find your reverse hostname, [127.0.0.4]"),
    ("rbl-listed", {"smtpd_client_restrictions": "reject_rbl_client zen.example"}, {"source": "127.0.0.2"},
     554, "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using zen.example; listed, see "),
    ("rbl-txt-with-crlf-stays-one-line", {"smtpd_client_restrictions": "reject_rbl_client evil.example"},
     {"source": "127.0.0.2"}, 554, "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using evil.example; "
                                   "listed??250 2.0.0 injected"),
    ("rbl-clean", {"smtpd_client_restrictions": "reject_rbl_client zen.example"}, {"source": "127.0.0.3"},
     250, ""),
    ("rbl-filter-miss", {"smtpd_client_restrictions": "reject_rbl_client filtered.example=127.0.0.[2..9]"},
     {"source": "127.0.0.2"}, 250, ""),
    ("rbl-filter-hit", {"smtpd_client_restrictions": "reject_rbl_client filtered.example=127.0.0.[2..11]"},
     {"source": "127.0.0.2"}, 554, "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using "
                                   "filtered.example"),
    ("rhsbl_sender-listed", {"smtpd_sender_restrictions": "reject_rhsbl_sender rhsbl.example"},
     {"sender": "a@bad.example"}, 554, "5.7.1 Service unavailable; Sender address [a@bad.example] blocked"),
    ("rhsbl_sender-clean", {"smtpd_sender_restrictions": "reject_rhsbl_sender rhsbl.example"}, {}, 250, ""),
    ("rhsbl_helo-listed", {"smtpd_helo_restrictions": "reject_rhsbl_helo rhsbl.example"},
     {"helo": "badhelo.example"}, 554, "5.7.1 Service unavailable; Helo command [badhelo.example] blocked"),
    ("unlisted_recipient-ok", {"mydestination": "good.example", "local_recipient_maps": "inline:{r=1}",
                               "smtpd_recipient_restrictions": "reject_unlisted_recipient"}, {}, 250, ""),
    ("unlisted_recipient-no", {"mydestination": "good.example", "local_recipient_maps": "inline:{r=1}",
                               "smtpd_recipient_restrictions": "reject_unlisted_recipient"},
     {"rcpt": "x@good.example"}, 550, "5.1.1 <x@good.example>: Recipient address rejected: User unknown"),
    ("unlisted_sender-no", {"mydestination": "good.example", "local_recipient_maps": "inline:{r=1}",
                            "smtpd_sender_restrictions": "reject_unlisted_sender"},
     {"sender": "nobody@good.example"}, 550, "5.1.0 <nobody@good.example>: Sender address rejected: User unknown"),
    ("data_restrictions", {"smtpd_data_restrictions": "reject"}, {"data": True}, 554,
     "5.7.1 <DATA>: Data command rejected: Access denied"),
    ("end_of_data_restrictions", {"smtpd_end_of_data_restrictions": "defer"}, {"data": True}, 450,
     "4.7.1 <END-OF-MESSAGE>: End-of-data rejected: Access denied"),
    ("no_delay_reject-helo", {"smtpd_delay_reject": "no", "smtpd_helo_restrictions": "reject_invalid_helo_hostname"},
     {"helo": "bad!host"}, 501, "5.5.2 <bad!host>: Helo command rejected: Invalid name"),
    ("inline_access-reject", {"smtpd_sender_restrictions": "check_sender_access inline:{good.example=REJECT}"},
     {}, 554, "5.7.1 <a@good.example>: Sender address rejected: Access denied"),
    ("access-code", {"smtpd_recipient_restrictions": "check_recipient_access inline:{ { r@=550 5.1.1 gone } }"}, {},
     550, "5.1.1 <r@good.example>: Recipient address rejected: gone"),
    ("access-ok-stops", {"smtpd_recipient_restrictions": "check_recipient_access inline:{r@good.example=OK}, reject"},
     {}, 250, ""),
    ("access-restriction-name", {"smtpd_relay_restrictions": "", "smtpd_recipient_restrictions":
                                 "check_recipient_access inline:{else.example=reject_unauth_destination}"},
     {"source": "127.0.0.2", "rcpt": "r@else.example"}, 554, "5.7.1 <r@else.example>: Relay access denied"),
    ("client_access-cidr", {"smtpd_client_restrictions": "check_client_access cidr:{cidr}"},
     {"source": "127.0.0.2"}, 554, "5.7.1 <client.good.example[127.0.0.2]>: Client host rejected: no thanks"),
    ("client_access-cidr-ok", {"smtpd_client_restrictions": "check_client_access cidr:{cidr}"}, {}, 250, ""),
    ("client_access-hostname", {"smtpd_client_restrictions": "check_client_access inline:{good.example=DEFER}"},
     {"source": "127.0.0.2"}, 450, "4.7.1 <client.good.example[127.0.0.2]>: Client host rejected: Access denied"),
    ("helo_access-regexp", {"smtpd_helo_restrictions": "check_helo_access regexp:{regexp}"},
     {"helo": "dyn-1-2-3-4.isp.example"}, 550, "5.7.1 <dyn-1-2-3-4.isp.example>: Helo command rejected: "
                                               "dynamic host dyn-1-2-3-4"),
    # issue 14: names that were accepted and did nothing
    ("plaintext_session-no", {"smtpd_recipient_restrictions": "reject_plaintext_session"}, {}, 450,
     "4.7.1 Session encryption is required"),
    ("unknown_helo-a", {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"}, {"helo": "aonly.example"},
     250, ""),
    ("unknown_helo-mx", {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"}, {"helo": "good.example"},
     250, ""),
    ("unknown_helo-nx", {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"}, {"helo": "nohost.example"},
     450, "4.7.1 <nohost.example>: Helo command rejected: Host not found"),
    ("unknown_helo-servfail-defers-if-permit", {"smtpd_helo_restrictions": "reject_unknown_helo_hostname"},
     {"helo": "sick.example"}, 450, "4.7.1 <sick.example>: Helo command rejected: Host not found"),
    ("reverse_client_access-unverified-ptr", {"smtpd_client_restrictions":
                                              "check_reverse_client_hostname_access inline:{liar.example=REJECT}"},
     {"source": "127.0.0.3"}, 554, "5.7.1 <liar.example>: Client host rejected: Access denied"),
    ("reverse_client_access-miss", {"smtpd_client_restrictions":
                                    "check_reverse_client_hostname_access inline:{liar.example=REJECT}"},
     {"source": "127.0.0.2"}, 250, ""),
    ("warn_if_reject-turns-reject-into-warning", {"smtpd_client_restrictions": "warn_if_reject, reject"}, {},
     250, ""),
    ("warn_if_reject-only-the-next", {"smtpd_client_restrictions": "warn_if_reject, reject_unknown_client_hostname, "
                                                                   "reject"}, {}, 554,
     "5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied"),
    ("defer_if_reject-reject-becomes-defer", {"smtpd_client_restrictions": "defer_if_reject, reject"}, {}, 450,
     "4.7.0 <unknown[127.0.0.1]>: Client host rejected: defer_if_reject requested"),
    ("defer_if_reject-permit-stays", {"smtpd_client_restrictions": "defer_if_reject, permit"}, {}, 250, ""),
    ("defer_if_permit-permit-becomes-defer", {"smtpd_client_restrictions": "defer_if_permit, permit"}, {}, 450,
     "4.7.0 <unknown[127.0.0.1]>: Client host rejected: defer_if_permit requested"),
    ("defer_if_permit-later-rbl-reject-wins", {"smtpd_client_restrictions":
                                               "defer_if_permit, reject_rbl_client zen.example"},
     {"source": "127.0.0.2"}, 554, "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using zen.example"),
    ("defer_if_permit-applies-after-all-lists", {"smtpd_client_restrictions": "defer_if_permit",
                                                 "smtpd_recipient_restrictions": "reject_non_fqdn_recipient"},
     {"rcpt": "r@host"}, 504, "5.5.2 <r@host>: Recipient address rejected: need fully-qualified address"),
    ("dnswl-listed-permits", {"smtpd_client_restrictions": "permit_dnswl_client wl.example, reject"},
     {"source": "127.0.0.2"}, 250, ""),
    ("dnswl-unlisted", {"smtpd_client_restrictions": "permit_dnswl_client wl.example, reject"},
     {"source": "127.0.0.3"}, 554, "5.7.1 <unknown[127.0.0.3]>: Client host rejected: Access denied"),
    ("dnswl-never-opens-the-relay", {"smtpd_relay_restrictions": "", "smtpd_recipient_restrictions":
                                     "permit_dnswl_client wl.example, reject_unauth_destination"},
     {"source": "127.0.0.2", "rcpt": "r@else.example"}, 554, "5.7.1 <r@else.example>: Relay access denied"),
    ("inet_interfaces-own-address", {"smtpd_client_restrictions": "permit_inet_interfaces, reject"}, {}, 250, ""),
    ("inet_interfaces-other-address", {"smtpd_client_restrictions": "permit_inet_interfaces, reject"},
     {"source": "127.0.0.2"}, 554, "5.7.1 <client.good.example[127.0.0.2]>: Client host rejected: Access denied"),
    ("access-defer_if_permit-defers-a-permit", {"smtpd_client_restrictions":
                                               "check_client_access inline:{ { 127.0.0.1=DEFER_IF_PERMIT later } }, "
                                               "permit"}, {}, 450,
     "4.7.1 <unknown[127.0.0.1]>: Client host rejected: later"),
    ("access-defer_if_permit-loses-to-a-reject", {"smtpd_client_restrictions":
                                                  "check_client_access inline:{127.0.0.2=DEFER_IF_PERMIT}, "
                                                  "reject_rbl_client zen.example"}, {"source": "127.0.0.2"}, 554,
     "5.7.1 Service unavailable; Client host [127.0.0.2] blocked using zen.example"),
    ("access-defer_if_reject-softens-a-reject", {"smtpd_client_restrictions":
                                                 "check_client_access inline:{127.0.0.1=DEFER_IF_REJECT}, reject"},
     {}, 450, "4.7.1 <unknown[127.0.0.1]>: Client host rejected: Service unavailable"),
    ("tls_clientcerts-plaintext-no-match", {"smtpd_client_restrictions": "permit_tls_clientcerts, reject"}, {},
     554, "5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied"),
]


@pytest.mark.parametrize("params, talk, code, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_restriction(start_mta, tmp_path, params, talk, code, text):
    (tmp_path / "cidr").write_text("127.0.0.2/32 REJECT no thanks\n")
    (tmp_path / "regexp").write_text("/^(dyn-[0-9-]+)\\./ 550 dynamic host $1\n")
    params = {k: v.replace("cidr:{cidr}", f"cidr:{tmp_path / 'cidr'}").replace(
        "regexp:{regexp}", f"regexp:{tmp_path / 'regexp'}") for k, v in params.items()}
    settings = {"mynetworks": "127.0.0.1/32", "master_service_disable": "qmgr", "alias_maps": "",
                "relay_domains": "good.example",
                "local_recipient_maps": "", **params}
    srv = await start_mta(ZONE, **settings)
    conversation = {**D, **talk}
    got = await trio.to_thread.run_sync(lambda: converse(srv.addresses[0].port, **conversation))
    assert got[0] == code, got
    assert got[1].startswith(text), got


async def test_seed_access_recipe_with_postmap(start_mta, tmp_path):
    access = tmp_path / "access"
    access.write_text("# seed: check_recipient_access hash:/etc/postfix/access\n"
                      "gw.example OK\nspammer@outside.example REJECT\noutside.example 550 go away\n")
    assert trimail("postmap", str(access)).returncode == 0
    # the seed's era: relay control and access checks both in smtpd_recipient_restrictions
    srv = await start_mta(ZONE, mynetworks="127.0.0.1/32", master_service_disable="qmgr", mydestination="",
                          smtpd_relay_restrictions="",
                          smtpd_recipient_restrictions=f"check_recipient_access hash:{access}, reject")
    port = srv.addresses[0].port
    results = [await trio.to_thread.run_sync(converse, port, "127.0.0.2", "c.good.example", "a@good.example",
                                             rcpt, False)
               for rcpt in ["x@gw.example", "spammer@outside.example", "x@sub.outside.example", "x@else.example"]]
    assert results == [
        (250, ""),
        (554, "5.7.1 <spammer@outside.example>: Recipient address rejected: Access denied"),
        (550, "5.7.1 <x@sub.outside.example>: Recipient address rejected: go away"),
        (554, "5.7.1 <x@else.example>: Recipient address rejected: Access denied"),
    ]


async def test_unauth_pipelining_is_refused_at_data(start_mta):
    srv = await start_mta(ZONE, master_service_disable="qmgr", smtpd_data_restrictions="reject_unauth_pipelining")

    def rude() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            sock.recv(1024)
            sock.sendall(b"HELO x.example\r\nMAIL FROM:<a@good.example>\r\nRCPT TO:<r@good.example>\r\n"
                         b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            got = b""
            while chunk := sock.recv(4096):
                got += chunk
            return got

    got = await trio.to_thread.run_sync(rude)
    assert b"503 5.5.0 Error: improper use of SMTP command pipelining" in got
    assert Store.open(srv.config.queue_directory, readonly=True).list_messages() == []


async def test_hold_and_discard_actions(start_mta):
    srv = await start_mta(ZONE, master_service_disable="qmgr", smtpd_recipient_restrictions=(
        "check_recipient_access inline:{ { held@good.example=HOLD suspicious }, dropped@good.example=DISCARD }"))
    port = srv.addresses[0].port
    for rcpt in ["held@good.example", "dropped@good.example"]:
        assert await trio.to_thread.run_sync(converse, port, "127.0.0.1", "c.good.example", "a@good.example",
                                             rcpt, True) == (250, "")
    [held] = Store.open(srv.config.queue_directory, readonly=True).list_messages()
    assert held.state == "hold" and held.recipients[0].address == "held@good.example"


def test_unknown_restriction_is_reported_by_check_and_stops_serve(tmp_path):
    from tests.conftest import write_main_cf

    config_path = write_main_cf(tmp_path, smtpd_recipient_restrictions="permit_mynetworks, reject_evil_clients")
    checked = trimail("check", "-c", str(config_path))
    assert f"{config_path}, line " in checked.stderr and "unknown restriction 'reject_evil_clients'" in checked.stderr
    served = trimail("serve", "-c", str(config_path))
    assert served.returncode == 2 and "unknown restriction 'reject_evil_clients'" in served.stderr


def null_sender_to(port: int, rcpts: list[str], data: bool) -> list[tuple[int, str]]:
    """Every reply of a bounce (MAIL FROM:<>) to *rcpts*, then DATA when *data*."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.good.example")
        replies.append(client.docmd("MAIL", "FROM:<>"))
        for rcpt in rcpts:
            replies.append(client.docmd("RCPT", f"TO:<{rcpt}>"))
        if data:
            replies.append(client.docmd("DATA"))
            if replies[-1][0] == 354:
                client.send(b"Subject: bounce\r\n\r\nx\r\n.\r\n")
                client.getreply()
    return [(code, text.decode()) for code, text in replies]


async def test_multi_recipient_bounce_is_refused_at_the_second_rcpt(start_mta):
    srv = await start_mta(ZONE, master_service_disable="qmgr", mynetworks="127.0.0.1/32",
                          smtpd_recipient_restrictions="reject_multi_recipient_bounce, permit_mynetworks")
    got = await trio.to_thread.run_sync(null_sender_to, srv.addresses[0].port,
                                        ["a@good.example", "b@good.example"], False)
    assert got[1][0] == 250
    assert got[2] == (550, "5.5.3 <b@good.example>: Recipient address rejected: Multi-recipient bounce")


async def test_multi_recipient_bounce_is_refused_at_data(start_mta):
    srv = await start_mta(ZONE, master_service_disable="qmgr", mynetworks="127.0.0.1/32",
                          multi_recipient_bounce_reject_code="554",
                          smtpd_data_restrictions="reject_multi_recipient_bounce")
    got = await trio.to_thread.run_sync(null_sender_to, srv.addresses[0].port,
                                        ["a@good.example", "b@good.example"], True)
    assert [code for code, _ in got[:3]] == [250, 250, 250]
    assert got[3] == (554, "5.5.3 <DATA>: Data command rejected: Multi-recipient bounce")
    one = await trio.to_thread.run_sync(null_sender_to, srv.addresses[0].port, ["a@good.example"], True)
    assert one[2][0] == 354


async def test_plaintext_session_passes_after_starttls(start_mta, cert, ca):
    srv = await start_mta(ZONE, master_service_disable="qmgr", smtpd_tls_cert_file=str(cert),
                          smtpd_recipient_restrictions="reject_plaintext_session, permit")

    def over_tls() -> tuple[int, bytes]:
        import ssl

        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.starttls(context=context)
            client.ehlo("client.good.example")
            client.docmd("MAIL", "FROM:<a@good.example>")
            return client.docmd("RCPT", "TO:<r@good.example>")

    code, _ = await trio.to_thread.run_sync(over_tls)
    assert code == 250


async def test_warn_if_reject_logs_the_reject_it_turns_into_a_warning(start_mta, caplog):
    caplog.set_level(logging.INFO, logger="trimail.smtpd")
    srv = await start_mta(ZONE, master_service_disable="qmgr",
                          smtpd_client_restrictions="warn_if_reject, reject_unknown_reverse_client_hostname")
    got = await trio.to_thread.run_sync(lambda: converse(srv.addresses[0].port, **{**D, "source": "127.0.0.4"}))
    assert got == (250, "")
    assert any("reject_warning: RCPT from unknown[127.0.0.4]: 450 4.7.1 Client host rejected: cannot find your "
               "reverse hostname, [127.0.0.4]" in r.getMessage() for r in caplog.records), caplog.text


async def test_sleep_pauses_before_the_next_restriction(start_mta):
    srv = await start_mta(ZONE, master_service_disable="qmgr", smtpd_client_restrictions="sleep 1, permit")
    started = trio.current_time()
    assert await trio.to_thread.run_sync(lambda: converse(srv.addresses[0].port, **D)) == (250, "")
    assert trio.current_time() - started >= 1.0


@pytest.mark.parametrize("params, message", [
    ({"smtpd_recipient_restrictions": "permit_mynetworks, reject_evil_clients"},
     "smtpd_recipient_restrictions: unknown restriction 'reject_evil_clients'"),
    ({"smtpd_delay_reject": "no", "smtpd_client_restrictions": "check_recipient_access inline:{a=OK}"},
     "smtpd_client_restrictions: check_recipient_access cannot be used here"),
    ({"smtpd_data_restrictions": "sleep 1"}, "smtpd_data_restrictions: sleep cannot be used here"),
    ({"smtpd_client_restrictions": "sleep soon"}, "smtpd_client_restrictions: sleep needs a number of seconds"),
])
def test_misplaced_or_unknown_restriction_is_refused_by_check_and_serve(tmp_path, params, message):
    from tests.conftest import write_main_cf

    config_path = write_main_cf(tmp_path, **params)
    checked = trimail("check", "-c", str(config_path))
    assert checked.returncode != 0 and message in checked.stderr, checked.stderr
    served = trimail("serve", "-c", str(config_path))
    assert served.returncode == 2 and message in served.stderr, served.stderr
