"""Generic restrictions: permit/reject/defer, Postfix's pseudo-decisions
(warn_if_reject, defer_if_reject, defer_if_permit), sleep, pipelining, the
session's encryption, multi-recipient bounces, and the policy service.

Security: ``sleep`` waits at most engine.SLEEP_LIMIT seconds (checked when the
configuration is read); a policy service answer is parsed as an access-table
result, never executed.

Parameters: plaintext_reject_code, multi_recipient_bounce_reject_code,
smtpd_policy_service_timeout, smtpd_policy_service_default_action.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from trimail.policy.access import parse_result
from trimail.policy.delegation import PolicyServiceError, ask_policy_service
from trimail.policy.engine import (
    DUNNO,
    ENVELOPE_KINDS,
    PERMIT,
    Request,
    Result,
    Verdict,
    register,
)
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

log = logging.getLogger("trimail.smtpd")


@register("permit")
async def permit(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    return PERMIT


@register("reject")
async def reject(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    return policy.reply(554, "5.7.1", kind, req, "Access denied")


@register("defer")
async def defer(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    return policy.reply(450, "4.7.1", kind, req, "Access denied")


@register("defer_if_permit")
async def defer_if_permit(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """Defer only if the rest of the lists would permit: answered by the engine at the end."""
    return policy.defer_if_permit(verdict, policy.reply(450, "4.7.0", kind, req, "defer_if_permit requested"))


@register("defer_if_reject")
async def defer_if_reject(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """A later 5xx reject becomes this 4xx."""
    return policy.defer_if_reject(verdict, policy.reply(450, "4.7.0", kind, req, "defer_if_reject requested"))


@register("warn_if_reject")
async def warn_if_reject(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """The next restriction's reject is logged as reject_warning instead."""
    verdict.warn_next = True
    return DUNNO


@register("sleep", argument="seconds", kinds=ENVELOPE_KINDS)
async def sleep(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """Pause, then go on with the next restriction (stops zombies that talk first).
    Each time its list runs: with smtpd_delay_reject, a client/HELO/sender list runs
    at every RCPT, so the pause repeats per RCPT, as in Postfix."""
    await trio.sleep(int(arg or 0))
    return DUNNO


@register("reject_unauth_pipelining")
async def reject_unauth_pipelining(policy: Policy, req: Request, kind: str, arg: str | None,
                                   verdict: Verdict) -> Result:
    if req.pipelined:
        return Reply(503, "5.5.0", "Error: improper use of SMTP command pipelining")
    return DUNNO


@register("reject_plaintext_session")
async def reject_plaintext_session(policy: Policy, req: Request, kind: str, arg: str | None,
                                   verdict: Verdict) -> Result:
    if req.tls:
        return DUNNO
    return Reply(policy.config.plaintext_reject_code, "4.7.1", "Session encryption is required")


@register("reject_multi_recipient_bounce", needs="sender")
async def reject_multi_recipient_bounce(policy: Policy, req: Request, kind: str, arg: str | None,
                                        verdict: Verdict) -> Result:
    """A null sender with more than one recipient: at RCPT the one being added makes
    it more than one when one is already accepted; at DATA and after, two or more."""
    if req.sender != "":
        return DUNNO
    if req.recipient_count > (0 if req.stage == "recipient" else 1):
        return policy.reply(policy.config.multi_recipient_bounce_reject_code, "5.5.3", kind, req,
                            "Multi-recipient bounce")
    return DUNNO


STATES = {"recipient": "RCPT", "data": "DATA", "end_of_data": "END-OF-MESSAGE", "client": "CONNECT",
          "helo": "EHLO", "sender": "MAIL"}


@register("check_policy_service", argument="service")
async def check_policy_service(policy: Policy, req: Request, kind: str, arg: str | None,
                               verdict: Verdict) -> Result:
    assert arg is not None
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": STATES.get(req.stage, STATES[kind]),
        "protocol_name": req.protocol,
        "helo_name": req.helo,
        "queue_id": req.queue_id,
        "sender": req.sender or "",
        "recipient": req.recipient or "",
        "recipient_count": str(req.recipient_count),
        "client_address": req.client_address,
        "client_name": req.client_name,
        "reverse_client_name": await policy.reverse_name(req) or "unknown",
        "instance": req.instance or req.queue_id,
        "sasl_username": req.sasl_username,
        "size": str(req.size),
    }
    try:
        action = await ask_policy_service(arg, attributes, policy.policy_timeout)
    except PolicyServiceError as exc:
        log.warning("policy service %s: %s; using smtpd_policy_service_default_action", arg, exc)
        action = policy.policy_default
    return await policy.access_result(parse_result(action), req, kind, verdict, source=arg)
