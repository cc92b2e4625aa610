"""HELO, sender and recipient restrictions: syntax, DNS, DNS lists, access tables,
local users and SASL ownership.

``reject_unknown_helo_hostname``: a HELO name (not an address literal) with no A,
AAAA or MX record is refused with ``unknown_hostname_reject_code`` (450)
``<name>: Helo command rejected: Host not found``; a temporary DNS failure is a
defer_if_permit with the same text (Postfix).  An address literal must hold a
valid address.

Parameters: unknown_hostname_reject_code, smtpd_sender_login_maps,
parent_domain_matches_subdomains, mydestination (through the resolver).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import TYPE_CHECKING

from trimail import rewrite
from trimail.maps import TableError
from trimail.policy.access import address_keys
from trimail.policy.dnschecks import address_literal, fqdn, hostname
from trimail.policy.engine import DUNNO, Request, Result, Verdict, register
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

log = logging.getLogger("trimail.smtpd")


# -- HELO ------------------------------------------------------------------------

@register("check_helo_access", argument="table", needs="helo")
async def check_helo_access(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    if not req.helo:
        return DUNNO
    labels = req.helo.lower().rstrip(".").split(".")
    parent = "smtpd_access_maps" in policy.parent_matches
    keys = [".".join(labels)] + [(".".join(labels[i:]) if parent else "." + ".".join(labels[i:]))
                                 for i in range(1, len(labels))]
    return await policy.access(req, "helo", arg, keys, verdict)


@register("check_etrn_access", argument="table", kinds=frozenset({"etrn"}))
async def check_etrn_access(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """The ETRN site and its parent domains in an access(5) table (smtpd_etrn_restrictions only)."""
    assert arg is not None
    labels = req.etrn.lower().rstrip(".").split(".")
    parent = "smtpd_access_maps" in policy.parent_matches
    keys = [".".join(labels)] + [(".".join(labels[i:]) if parent else "." + ".".join(labels[i:]))
                                 for i in range(1, len(labels))]
    return await policy.access(req, "etrn", arg, keys, verdict)


@register("reject_non_fqdn_helo_hostname", needs="helo")
async def reject_non_fqdn_helo_hostname(policy: Policy, req: Request, kind: str, arg: str | None,
                                        verdict: Verdict) -> Result:
    if req.helo and not address_literal(req.helo) and not fqdn(req.helo):
        return policy.reply(504, "5.5.2", "helo", req, "need fully-qualified hostname")
    return DUNNO


@register("reject_invalid_helo_hostname", needs="helo")
async def reject_invalid_helo_hostname(policy: Policy, req: Request, kind: str, arg: str | None,
                                       verdict: Verdict) -> Result:
    if req.helo and not (address_literal(req.helo) or hostname(req.helo)):
        return policy.reply(501, "5.5.2", "helo", req, "Invalid name")
    return DUNNO


@register("reject_unknown_helo_hostname", needs="helo")
async def reject_unknown_helo_hostname(policy: Policy, req: Request, kind: str, arg: str | None,
                                       verdict: Verdict) -> Result:
    if not req.helo:
        return DUNNO
    if address_literal(req.helo):
        literal = req.helo[1:-1]
        try:
            ipaddress.ip_address(literal.removeprefix("IPv6:").removeprefix("ipv6:"))
        except ValueError:
            return policy.reply(501, "5.5.2", "helo", req, "Invalid ip address")
        return DUNNO
    state = await policy.host_state(req, req.helo.rstrip(".").lower())
    if state == "missing":
        return policy.reply(policy.config.unknown_hostname_reject_code, "4.7.1", "helo", req, "Host not found")
    if state == "temp":
        return policy.defer_if_permit(verdict, policy.reply(450, "4.7.1", "helo", req, "Host not found"))
    return DUNNO


@register("reject_rhsbl_helo", argument="domain", needs="helo")
async def reject_rhsbl_helo(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    if not req.helo or address_literal(req.helo):
        return DUNNO
    return await policy.rbl_reply(req, "Helo command", req.helo, req.helo.lower(), arg)


# -- sender ------------------------------------------------------------------------

@register("check_sender_access", argument="table", needs="sender")
async def check_sender_access(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    if req.sender is None:
        return DUNNO
    # Postfix looks up the resolved form: a bare name as name@$myorigin
    keys = address_keys(rewrite.canonical(req.sender, policy.rewrite),
                        "smtpd_access_maps" in policy.parent_matches) if req.sender else ["<>"]
    return await policy.access(req, "sender", arg, keys, verdict)


@register("reject_non_fqdn_sender", needs="sender")
async def reject_non_fqdn_sender(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    if req.sender and not fqdn(req.sender.rpartition("@")[2]):
        return policy.reply(504, "5.5.2", "sender", req, "need fully-qualified address")
    return DUNNO


async def _unknown_domain(policy: Policy, req: Request, address: str | None, kind: str, dsn: str) -> Result:
    # Postfix checks the resolved form's domain: a bare name's is $myorigin
    domain = rewrite.canonical(address or "", policy.rewrite).rpartition("@")[2].lower().rstrip(".")
    if not address or not domain or domain in policy.rewrite.local_domains or domain.startswith("["):
        return DUNNO
    state = await policy.domain_state(req, domain)
    if state in ("missing", "temp"):
        # Postfix 3.7 gives the same text for both (smtpd_check.c, reject_unknown_mailhost)
        return policy.reply(450, dsn, kind, req, "Domain not found")
    return DUNNO


@register("reject_unknown_sender_domain", needs="sender")
async def reject_unknown_sender_domain(policy: Policy, req: Request, kind: str, arg: str | None,
                                       verdict: Verdict) -> Result:
    return await _unknown_domain(policy, req, req.sender, "sender", "4.1.8")


@register("reject_rhsbl_sender", argument="domain", needs="sender")
async def reject_rhsbl_sender(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    _, at, domain = (req.sender or "").rpartition("@")
    domain = domain.lower()  # a bare name has no domain to look up (Postfix)
    return await policy.rbl_reply(req, "Sender address", req.sender or "", domain, arg) if at and domain else DUNNO


async def _unlisted(policy: Policy, req: Request, kind: str, address: str | None) -> Result:
    if not address:
        return DUNNO
    try:
        unknown = await policy.unlisted(address)
    except (TableError, ValueError) as exc:
        log.warning("%s: %s lookup failed: %s", req.queue_id or "NOQUEUE", kind, exc)
        return policy.reply(451, "4.3.0", kind, req, "Temporary lookup failure")
    if unknown:  # an Unlisted (trimail/unlisted.py): its class's table, code and Postfix's words
        return Reply(*unknown.text(address, kind.capitalize()))
    return DUNNO


@register("reject_unlisted_sender", needs="sender")
async def reject_unlisted_sender(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    return await _unlisted(policy, req, "sender", req.sender)


@register("reject_sender_login_mismatch", needs="sender")
async def reject_sender_login_mismatch(policy: Policy, req: Request, kind: str, arg: str | None,
                                       verdict: Verdict) -> Result:
    """smtpd_sender_login_maps: who may use a sender address (Postfix's rules)."""
    if not req.sender:
        return DUNNO
    owners: list[str] = []
    keys = [req.sender.lower(), "@" + req.sender.rpartition("@")[2].lower()]
    try:
        for ref in policy.config.smtpd_sender_login_maps:
            value = await policy.lookup(policy.table(ref), keys)
            if value:
                owners = [o.strip().lower() for o in re.split(r"[,\s]+", value) if o.strip()]
                break
    except TableError as exc:
        log.warning("smtpd_sender_login_maps: %s", exc)
        return policy.reply(451, "4.3.0", "sender", req, "Temporary lookup failure")
    if req.sasl_username:
        if req.sasl_username.lower() not in owners:
            return policy.reply(553, "5.7.1", "sender", req, f"not owned by user {req.sasl_username}")
    elif owners:
        return policy.reply(553, "5.7.1", "sender", req, "not logged in")
    return DUNNO


# -- recipient -----------------------------------------------------------------------

@register("check_recipient_access", argument="table", needs="recipient")
async def check_recipient_access(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    assert arg is not None
    if not req.recipient:
        return DUNNO
    keys = address_keys(rewrite.canonical(req.recipient, policy.rewrite), "smtpd_access_maps" in policy.parent_matches)
    return await policy.access(req, "recipient", arg, keys, verdict)


@register("reject_non_fqdn_recipient", needs="recipient")
async def reject_non_fqdn_recipient(policy: Policy, req: Request, kind: str, arg: str | None,
                                    verdict: Verdict) -> Result:
    if req.recipient and not fqdn(req.recipient.rpartition("@")[2]):
        return policy.reply(504, "5.5.2", "recipient", req, "need fully-qualified address")
    return DUNNO


@register("reject_unknown_recipient_domain", needs="recipient")
async def reject_unknown_recipient_domain(policy: Policy, req: Request, kind: str, arg: str | None,
                                          verdict: Verdict) -> Result:
    return await _unknown_domain(policy, req, req.recipient, "recipient", "4.1.2")


@register("reject_rhsbl_recipient", argument="domain", needs="recipient")
async def reject_rhsbl_recipient(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    assert arg is not None
    _, at, domain = (req.recipient or "").rpartition("@")
    domain = domain.lower()
    return await policy.rbl_reply(req, "Recipient address", req.recipient or "", domain, arg) if at and domain else DUNNO


@register("reject_unlisted_recipient", needs="recipient")
async def reject_unlisted_recipient(policy: Policy, req: Request, kind: str, arg: str | None,
                                    verdict: Verdict) -> Result:
    return await _unlisted(policy, req, "recipient", req.recipient)
