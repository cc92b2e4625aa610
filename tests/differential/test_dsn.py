"""Bounces compared with Postfix 3.7's: the same message, relayed from inside to one
recipient the sink refuses (``550 5.1.1``, harness.SinkHandler) and one it takes, makes
each MTA send a non-delivery notification to the sender, which the shared sink
receives too.  Compared: the notification's header fields, its multipart/report parts,
the message/delivery-status fields (Reporting-MTA, Final-Recipient, Action, Status,
Remote-MTA, Diagnostic-Code), the explanation line of the human part and the returned
message (without trace headers).  Not compared: dates, queue ids, the boundary and the
Message-Id; the vendor fields (X-Postfix-*, X-Trimail-*) by name only.
"""

from __future__ import annotations

import email
import email.policy
import re

from tests.differential import harness
from tests.differential.sessions import INSIDE, message, send
from tests.differential.test_sessions import without_trace

SESSION = send("dsn-bounce", "a@client.test", ["bounce-me@far.test", "ok@far.test"])
FIELDS = ("From", "Subject", "To", "Auto-Submitted", "MIME-Version", "Content-Transfer-Encoding")


def _notification(messages: list[harness.Arrived]) -> bytes | None:
    found = [m.content for m in messages if m.sender in ("", "<>") and b"multipart/report" in m.content]
    return found[0] if found else None


def _unfold(text: str) -> str:
    return " ".join(text.split())


def summary(raw: bytes) -> dict:
    """What must be the same in two notifications about the same failure."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    out: dict = {name: _unfold(str(message[name])) for name in FIELDS}
    out["Content-Type"] = (message.get_content_type(), message.get_param("report-type"))
    parts = message.get_payload()
    out["parts"] = [(p.get_content_type(), p["Content-Description"], p["Content-Transfer-Encoding"]) for p in parts]
    human = parts[0].get_payload(decode=True).decode()
    out["explanation"] = _unfold(human.split("The mail system", 1)[1])
    report = parts[1].get_payload()
    blocks = [dict(block.items()) for block in report]
    vendor = re.compile(r"^X-(Postfix|Trimail)-", re.IGNORECASE)
    out["per-message"] = {vendor.sub("X-MTA-", k): (_unfold(v) if k in ("Reporting-MTA",) else "...")
                          for k, v in blocks[0].items()}
    out["per-recipient"] = [{k: _unfold(v) for k, v in block.items()} for block in blocks[1:]]
    returned = parts[2].get_payload()[0] if parts[2].is_multipart() else parts[2].get_payload()
    out["returned"] = without_trace(returned.as_bytes().replace(b"\n", b"\r\n")) if not isinstance(returned, str) \
        else without_trace(returned.encode())  # headers only (RET=HDRS, a success notice)
    return out


def test_a_bounce_has_postfixs_structure_and_fields(pair):
    for host, port in ((harness.POSTFIX_HOST, pair.postfix.port), (harness.TRIMAIL_HOST, pair.trimail.port)):
        harness.run_session(host, port, INSIDE, SESSION)
    harness.wait_until(lambda: _notification(pair.sink.postfix_messages()) and _notification(
        pair.sink.trimail_messages()), "both notifications at the sink", 60)
    theirs = summary(_notification(pair.sink.postfix_messages()))
    ours = summary(_notification(pair.sink.trimail_messages()))
    different = {key: (theirs[key], ours.get(key)) for key in theirs if theirs[key] != ours.get(key)}
    assert different == {}, "\n".join(f"{k}:\n    Postfix: {p!r}\n    trimail: {t!r}" for k, (p, t) in
                                      different.items())


# RFC 3461 parameters: the bounce (RET=HDRS, ENVID, ORCPT, NOTIFY=FAILURE), no report
# for NOTIFY=NEVER, and the success notice for NOTIFY=SUCCESS relayed to the sink (which
# does not offer DSN: Action relayed)
DSN_PARAMS_SESSION = [
    "EHLO client.test", "MAIL FROM:<a@client.test> RET=HDRS ENVID=QQ+2B42",
    "RCPT TO:<bounce-dsn1@far.test> NOTIFY=FAILURE ORCPT=rfc822;first+2Bone@far.test",
    "RCPT TO:<bounce-dsn2@far.test> NOTIFY=NEVER", "RCPT TO:<ok-dsn@far.test> NOTIFY=SUCCESS ORCPT=rfc822;second@far.test",
    "DATA", message("dsn-params", "ok-dsn@far.test"), "QUIT"]


def _reports(messages: list[harness.Arrived], subject: bytes) -> list[bytes]:
    return [m.content for m in messages if m.sender in ("", "<>") and b"differential dsn-params" in m.content
            and b"Subject: " + subject in m.content]


def test_dsn_parameters_give_postfixs_bounce_and_success_notice(pair):
    for host, port in ((harness.POSTFIX_HOST, pair.postfix.port), (harness.TRIMAIL_HOST, pair.trimail.port)):
        harness.run_session(host, port, INSIDE, DSN_PARAMS_SESSION)
    for subject in (b"Undelivered Mail Returned to Sender", b"Successful Mail Delivery Report"):
        harness.wait_until(lambda s=subject: _reports(pair.sink.postfix_messages(), s) and _reports(
            pair.sink.trimail_messages(), s), f"both {subject.decode()} notifications at the sink", 60)
        [theirs_raw] = _reports(pair.sink.postfix_messages(), subject)
        [ours_raw] = _reports(pair.sink.trimail_messages(), subject)
        theirs, ours = summary(theirs_raw), summary(ours_raw)
        different = {key: (theirs[key], ours.get(key)) for key in theirs if theirs[key] != ours.get(key)}
        assert different == {}, "\n".join(f"{k}:\n    Postfix: {p!r}\n    trimail: {t!r}" for k, (p, t) in
                                          different.items())
        assert re.search(rb"Original-Envelope-Id: QQ\+42\r?\n", ours_raw), ours_raw
