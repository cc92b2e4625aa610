"""``sleep`` with smtpd_delay_reject follows Postfix: its smtpd_check_rcpt() runs the
client, HELO and sender lists again, whole, at every RCPT (only a defer_if_permit
is remembered between stages), so a ``sleep`` in them pauses once per RCPT and not
at HELO or MAIL; with smtpd_delay_reject = no they run at their own stage, once
(the client list at connect, as Postfix's smtpd_proto()).
The real engine under trio's MockClock (autojump): deterministic, no real waiting."""

from __future__ import annotations

import pytest
import trio

from tests.conftest import write_main_cf
from trimail import config as configuration
from trimail.net.dns import Resolver
from trimail.policy.restrictions import Policy, Request

LISTS = {"smtpd_client_restrictions": "sleep 1", "smtpd_helo_restrictions": "sleep 2",
         "smtpd_sender_restrictions": "sleep 4", "smtpd_recipient_restrictions": "permit"}


async def _pauses(tmp_path, delay_reject: str) -> list[float]:
    config = configuration.load(write_main_cf(tmp_path, smtpd_delay_reject=delay_reject, **LISTS))
    policy = Policy(config, Resolver([]))
    request = Request(client_address="127.0.0.9", client_name="unknown", helo="client.example",
                      protocol="ESMTP", sender="a@client.example")
    pauses = []
    for stage, recipient in [("client", None), ("helo", None), ("sender", None), ("recipient", "r1@x.example"),
                             ("recipient", "r2@x.example"), ("data", None)]:
        request.recipient = recipient
        started = trio.current_time()
        verdict = await policy.check(stage, request)
        assert verdict.reply is None
        pauses.append(trio.current_time() - started)
    return pauses


@pytest.mark.parametrize("delay_reject, expected", [
    ("yes", [0, 0, 0, 7, 7, 0]),  # client + helo + sender lists at each RCPT
    ("no", [1, 2, 4, 0, 0, 0]),  # client list at connect, helo list at HELO, sender at MAIL
])
async def test_sleep_pauses_where_postfix_runs_its_list(tmp_path, autojump_clock, delay_reject, expected):
    assert await _pauses(tmp_path, delay_reject) == pytest.approx(expected, abs=0.01)
