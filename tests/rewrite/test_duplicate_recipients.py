"""Duplicate recipients (Postfix's cleanup_out_recipient and its been_here filter of
duplicate_filter_limit addresses): a message is queued with each recipient once,
however often the envelope names it, compared as addresses (not case, quoting,
a domain's final dots or IDN spelling: red team 35a); over SMTP, from
sendmail's arguments and -t, and (tests/milter/test_smtpd_milters.py) a milter's
SMFIR_ADDRCPT.  Before this, 30,000 copies of one address in one submission were
queued as 30,000 recipients, each delivered."""

from __future__ import annotations

import logging
import smtplib
import subprocess
import sys

import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import write_main_cf
from tests.delivery.test_delivery import send, wait_empty
from tests.peers import Sink
from trimail.cleanup.rewrite import unique
from trimail.queue.store import Store


def test_the_first_of_each_address_is_kept_in_order_without_case():
    assert unique(["b@x.example", "A@x.example", "a@X.EXAMPLE", "b@x.example", "c@x.example"], 1000) == [
        "b@x.example", "A@x.example", "c@x.example"]


def test_past_the_limit_addresses_are_no_longer_remembered():
    # as been_here: the first *limit* addresses are still filtered, later ones are not
    assert unique(["a@x", "b@x", "b@x", "a@x", "c@x", "c@x"], 1) == ["a@x", "b@x", "b@x", "c@x", "c@x"]
    assert unique(["a@x", "a@x"] * 3, 0) == ["a@x"]  # 0: no limit


@given(st.lists(st.sampled_from(["a@x", "A@x", "b@y", "B@Y", "c@z", "d@z"]), max_size=30),
       st.integers(min_value=0, max_value=5))
def test_unique_is_an_ordered_sub_list_that_names_every_address(addresses, limit):
    out = unique(addresses, limit)
    assert {a.lower() for a in out} == {a.lower() for a in addresses}
    position = 0
    for address in out:  # a sub-list: same order
        position = addresses.index(address, position) + 1
    if limit == 0 or len({a.lower() for a in addresses}) <= limit:
        assert len(out) == len({a.lower() for a in out})


async def test_recipients_given_twice_over_smtp_are_queued_and_delivered_once(start_mta, caplog):
    caplog.set_level(logging.INFO)
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
        queue_id = await send(srv, "alice@client.example",
                              ["bob@far.example", "BOB@far.example", "carol@far.example", "bob@far.example"])
        await wait_empty(srv)
        assert [rcpts for _, rcpts, _ in sink.messages] == [["bob@far.example", "carol@far.example"]]
    assert f"{queue_id}: from=<alice@client.example>, size=" in caplog.text
    assert "nrcpt=2 (queue active)" in caplog.text


async def test_duplicate_filter_limit_bounds_what_is_remembered(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", duplicate_filter_limit="1")
        await send(srv, "alice@client.example",
                   ["bob@far.example", "carol@far.example", "bob@far.example", "carol@far.example"])
        await wait_empty(srv)
        assert [rcpts for _, rcpts, _ in sink.messages] == [["bob@far.example", "carol@far.example",
                                                             "carol@far.example"]]


def sendmail_queued(tmp_path, *args: str, message: bytes = b"Subject: x\n\nbody\n"):
    """Root's ``trimail sendmail ARGS`` (it writes the queue itself); the one message queued."""
    config_path = write_main_cf(tmp_path)
    done = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), *args],
                          input=message, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    store = Store.open(tmp_path / "queue", readonly=True)
    try:
        [queued] = store.list_messages()
    finally:
        store.close()
    return queued


def test_sendmail_queues_each_recipient_once(tmp_path):
    message = b"From: root@here.example\nTo: Bob@far.example, dave@far.example\nSubject: x\n\nbody\n"
    queued = sendmail_queued(tmp_path, "-t", "bob@far.example", "carol@far.example", "bob@far.example",
                             message=message)
    assert [r.address for r in queued.recipients] == ["bob@far.example", "carol@far.example", "dave@far.example"]


def test_spellings_of_one_mailbox_are_one_recipient():
    # red team 35a: quoting, a final dot and an IDN's two spellings named one mailbox
    # each, and each spelling was queued and delivered: the filter compares addresses
    spellings = ['bob@far.example', '"bob"@far.example', '"b\\ob"@far.example', 'BOB@far.example.',
                 "ü@bücher.example", "ü@xn--bcher-kva.example", "Ü@BÜCHER.example."]
    assert unique(spellings, 1000) == ["bob@far.example", "ü@bücher.example"]
    # what differs stays apart: a quoted space, an "@" inside quotes, another domain
    assert unique(['"a b"@x.example', "ab@x.example", '"ab@x.example"', "ab@x.example.org"], 1000) == [
        '"a b"@x.example', "ab@x.example", '"ab@x.example"', "ab@x.example.org"]


def smtp_transaction(port: int, recipients: list[str]) -> list[int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        codes = []
        for line in ["MAIL FROM:<alice@client.example> SMTPUTF8", *(f"RCPT TO:<{rcpt}>" for rcpt in recipients)]:
            client.send(f"{line}\r\n".encode())  # UTF-8: smtplib's commands are ASCII
            codes.append(client.getreply()[0])
        codes.append(client.data(b"Subject: x\r\n\r\nbody\r\n")[0])
    return codes


async def test_one_mailbox_spelled_many_ways_over_smtp_is_delivered_once(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", smtputf8_enable="yes")
        spellings = ['bob@far.example', '"bob"@far.example', '"b\\ob"@far.example', '"\\b\\o\\b"@far.example',
                     "bob@far.example.", "ü@bücher.example", "ü@xn--bcher-kva.example"]
        codes = await trio.to_thread.run_sync(smtp_transaction, srv.addresses[0].port, spellings)
        assert codes == [250] * 8 + [250]
        await wait_empty(srv)
        assert [rcpts for _, rcpts, _ in sink.messages] == [["bob@far.example", "ü@bücher.example"]]


def test_sendmail_queues_a_domain_with_a_final_dot_once(tmp_path):
    queued = sendmail_queued(tmp_path, "bob@far.example", "bob@far.example.", '"bob"@far.example')
    assert [r.address for r in queued.recipients] == ["bob@far.example"]


def test_sendmail_drops_a_domains_final_dot_as_smtp_does(tmp_path):
    # red team 35a: sendmail kept "bob@far.example." (smtpd stores it without the dot),
    # sent it so, and a strict nexthop refused it; the filter kept that spelling first
    queued = sendmail_queued(tmp_path, "-f", "me@here.example.", "bob@far.example.", "bob@far.example",
                             "carol@far.example..")
    assert queued.sender == "me@here.example"
    assert [r.address for r in queued.recipients] == ["bob@far.example", "carol@far.example"]
