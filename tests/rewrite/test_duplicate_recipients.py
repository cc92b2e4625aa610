"""Duplicate recipients (Postfix's cleanup_out_recipient and its been_here filter of
duplicate_filter_limit addresses): a message is queued with each recipient once,
however often the envelope names it, compared without case; over SMTP, from
sendmail's arguments and -t, and (tests/milter/test_smtpd_milters.py) a milter's
SMFIR_ADDRCPT.  Before this, 30,000 copies of one address in one submission were
queued as 30,000 recipients, each delivered."""

from __future__ import annotations

import logging
import subprocess
import sys

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


def test_sendmail_queues_each_recipient_once(tmp_path):
    config_path = write_main_cf(tmp_path)
    message = b"From: root@here.example\nTo: Bob@far.example, dave@far.example\nSubject: x\n\nbody\n"
    done = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), "-t",
                           "bob@far.example", "carol@far.example", "bob@far.example"],
                          input=message, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    store = Store.open(tmp_path / "queue", readonly=True)
    try:
        [queued] = store.list_messages()
    finally:
        store.close()
    assert [r.address for r in queued.recipients] == ["bob@far.example", "carol@far.example", "dave@far.example"]
