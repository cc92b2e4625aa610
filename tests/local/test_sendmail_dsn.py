"""sendmail's DSN flags, as Postfix's sendmail(1) reads them: -N (NOTIFY for every
recipient), -V (ENVID), with warnings for bad values; the envelope a user's sendmail
hands to serve keeps only the DSN params the SMTP server would take; -bs refuses
the DSN parameters rather than take and drop them."""

from __future__ import annotations

import functools

import trio

from tests.conftest import wait_for
from tests.delivery.test_delivery import parse_dsn, queue
from tests.delivery.test_dsn_notify import notices, status_fields
from tests.local.test_sendmail import config, sendmail
from tests.peers import Sink
from trimail.cleanup.pickup import envelope
from trimail.config import load

HOST = "127.0.40.11"  # this module's loopback addresses
SENDERS = "127.0.40.12"
FAR = "127.0.40.13"


async def test_N_and_V_ask_for_a_success_notice_that_names_the_envelope_id(start_mta):
    with Sink(SENDERS) as senders, Sink(FAR, rules={"gone": "550 5.1.1 no such user"}) as far:
        srv = await start_mta(smtpd_listen=f"{HOST}:0", transport_maps=(
            f"inline:{{ client.example=smtp:[{SENDERS}]:{senders.port}, far.example=smtp:[{FAR}]:{far.port} }}"))
        run = functools.partial(sendmail, srv.config.source, "-N", "success,delay", "-V", "order 42",
                                "-f", "alice@client.example", "bob@far.example", "gone@far.example",
                                data=b"Subject: with dsn\n\nbody\n")
        result = await trio.to_thread.run_sync(run)
        assert result.returncode == 0 and result.stderr == b"", result.stderr
        await wait_for(lambda: not queue(srv) and len(notices(senders)) == 1, 20)
        [notice] = notices(senders)  # a success notice for bob; no bounce for gone (NOTIFY lacks FAILURE)
        message, recipients, _ = parse_dsn(notice)
        assert message["Subject"] == "Successful Mail Delivery Report"
        assert recipients == [("rfc822; bob@far.example", "relayed", "2.0.0")]
        assert status_fields(notice)[0]["Original-Envelope-Id"] == "order 42"


def test_bad_N_and_V_values_are_warned_about_and_ignored(tmp_path):
    config_path = config(tmp_path)
    result = sendmail(config_path, "-N", "never,success", "-V", "x" * 101, "bob@far.example", data=b"Subject: x\n\nx\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().splitlines() == ["sendmail: warning: bad -N option value: 'never,success' -- ignored",
                                                   "sendmail: warning: too long -V option value -- ignored"]
    result = sendmail(config_path, "-V", "tab\tok but not\x01this", "bob@far.example", data=b"Subject: x\n\nx\n")
    assert result.stderr.decode().splitlines() == ["sendmail: warning: bad syntax in -V option value -- ignored"]


def test_a_users_envelope_keeps_only_dsn_params_smtpd_would_take(tmp_path):
    cfg = load(config(tmp_path), [])
    request = {"sender": "a@client.example", "recipients": ["b@far.example"], "size": 10,
               "params": {"RET": "HDRS", "NOTIFY": "SUCCESS", "ENVID": "a+0D+0Ab", "_DSN_RCPT": "{}",
                          "_NOTIFY_NEVER": '["b@far.example"]'}}
    assert envelope(request, cfg)[3] == {"RET": "HDRS", "NOTIFY": "SUCCESS"}
    request["params"] = {"NOTIFY": "NEVER,SUCCESS", "ENVID": "ok+2B1"}
    assert envelope(request, cfg)[3] == {"ENVID": "ok+2B1"}


def test_bs_refuses_the_dsn_parameters(tmp_path):
    session = (b"EHLO me.example\r\nMAIL FROM:<alice@client.example> RET=HDRS\r\n"
               b"MAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@far.example> NOTIFY=NEVER\r\nQUIT\r\n")
    result = sendmail(config(tmp_path), "-bs", data=session)
    out = result.stdout.decode()
    assert "250-DSN" not in out
    assert out.count("501 5.7.1 DSN support is disabled") == 2
