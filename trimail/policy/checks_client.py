"""Client restrictions: who is connecting (address, names, TLS certificate, DNS lists).

``check_client_access`` sees the forward-confirmed client name and the address;
``check_reverse_client_hostname_access`` sees the PTR name even when it does not
verify (Postfix's reverse_client_name), which is what catches dynamic-pool names
that forge nothing; because that name is the client's own claim, an OK (any permit)
from that table is refused as Postfix refuses it (``forbid_allowlist``: three
warnings, ``451 4.3.5 Server configuration error``): a table entry meant as an
exception must say DUNNO, or anyone could relay by naming their PTR after it.
``permit_dnswl_client`` never permits a recipient we are not
authorized to accept (Postfix's safety rule: an allow-list cannot open the
relay); its temporary failure is a defer_if_reject.  ``permit_tls_clientcerts``
permits a client whose certificate fingerprint is in ``relay_clientcerts``;
trimail does not ask clients for certificates yet, so in practice nothing
matches (as Postfix with ``smtpd_tls_ask_ccert = no``, and smtpd logs it once).

Parameters: mynetworks, smtpd_listen/submission_listen/smtps_listen
(permit_inet_interfaces), relay_clientcerts, parent_domain_matches_subdomains,
unknown_client_reject_code (reject_unknown_client_hostname: 4.7.25, RFC 7372).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from trimail.maps import TableError
from trimail.net.addresses import client_ip
from trimail.policy.access import client_keys
from trimail.policy.dnschecks import reversed_ip
from trimail.policy.engine import DUNNO, PERMIT, Request, Result, Verdict, register
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

log = logging.getLogger("trimail.smtpd")


@register("permit_mynetworks")
async def permit_mynetworks(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    return PERMIT if policy.in_mynetworks(req.client_address) else DUNNO


@register("permit_sasl_authenticated")
async def permit_sasl_authenticated(policy: Policy, req: Request, kind: str, arg: str | None,
                                    verdict: Verdict) -> Result:
    return PERMIT if req.sasl_username else DUNNO


@register("permit_inet_interfaces")
async def permit_inet_interfaces(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    """The client is this host: an address serve listens on; with a wildcard
    listener, any interface address of this host or any loopback address."""
    ip = client_ip(req.client_address)
    if ip is None:
        return DUNNO
    own, wildcard = policy.own_addresses
    return PERMIT if str(ip) in own or (wildcard and ip.is_loopback) else DUNNO


@register("permit_tls_clientcerts")
async def permit_tls_clientcerts(policy: Policy, req: Request, kind: str, arg: str | None,
                                 verdict: Verdict) -> Result:
    fingerprint = req.client_cert_fingerprint
    if not fingerprint:
        return DUNNO
    try:
        for ref in policy.config.relay_clientcerts:
            if await policy.lookup(policy.table(ref), [fingerprint, fingerprint.upper(), fingerprint.lower()]):
                return PERMIT
    except TableError as exc:
        log.warning("relay_clientcerts: lookup error for fingerprint %s: %s", fingerprint, exc)
        return policy.reply(451, "4.3.0", "client", req, "Temporary lookup failure")
    return DUNNO


@register("reject_unknown_reverse_client_hostname")
async def reject_unknown_reverse_client_hostname(policy: Policy, req: Request, kind: str, arg: str | None,
                                                 verdict: Verdict) -> Result:
    names = await policy.reverse_names(req)
    if names == "temp" or not names:  # Postfix: 4.7.1 here, unknown_client_reject_code unless temporary
        code = 450 if names == "temp" else policy.config.unknown_client_reject_code
        return Reply(code, f"{str(code)[0]}.7.1", f"Client host rejected: cannot find your reverse hostname, "
                                    f"[{req.client_address}]")
    return DUNNO


@register("reject_unknown_client_hostname")
async def reject_unknown_client_hostname(policy: Policy, req: Request, kind: str, arg: str | None,
                                         verdict: Verdict) -> Result:
    if await policy.client_hostname(req) is None:
        # RFC 7372 (Email Authentication Status Codes): 4.7.25/5.7.25, as Postfix 3
        temporary = await policy.reverse_names(req) == "temp"
        code = 450 if temporary else policy.config.unknown_client_reject_code
        return Reply(code, f"{str(code)[0]}.7.25",
                     f"Client host rejected: cannot find your hostname, [{req.client_address}]")
    return DUNNO


@register("check_client_access", argument="table")
async def check_client_access(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    parent = "smtpd_access_maps" in policy.parent_matches
    # cidr: tables match addresses only; other tables also see the client's (verified) name
    name = None if arg.startswith("cidr:") else await policy.client_hostname(req)
    return await policy.access(req, "client", arg, client_keys(req.client_address, name, parent), verdict)


@register("check_reverse_client_hostname_access", argument="table")
async def check_reverse_client_hostname_access(policy: Policy, req: Request, kind: str, arg: str | None,
                                               verdict: Verdict) -> Result:
    """Like check_client_access, with the PTR name whether or not it verifies; the
    reply names that name (Postfix: ``<name>: Client host rejected: ...``)."""
    assert arg is not None
    parent = "smtpd_access_maps" in policy.parent_matches
    name = None if arg.startswith("cidr:") else await policy.reverse_name(req)
    shown = dataclasses.replace(req, client_name=name or "unknown")
    result = await policy.access(shown, "client", arg, client_keys(req.client_address, name, parent), verdict)
    if isinstance(result, Reply) and result.text.startswith(f"<{shown.client_name}[{req.client_address}]>"):
        result = Reply(result.code, result.enhanced,
                       f"<{shown.client_name}>" + result.text[len(f"<{shown.client_name}[{req.client_address}]>"):])
    if result is PERMIT and verdict.discard is None:
        # the PTR name is the client's own claim: an OK would let anyone permit
        # themselves (open the relay) by naming their PTR after a listed host
        return forbid_allowlist("check_reverse_client_hostname_access", name or req.client_address)
    return result


def forbid_allowlist(restriction: str, target: str) -> Reply:
    """Postfix's forbid_allowlist: OK from a table keyed by a name the client controls
    is refused as a configuration error, with the three warnings Postfix logs."""
    log.warning("restriction %s returns OK for %s", restriction, target)
    log.warning("this is not allowed for security reasons")
    log.warning("use DUNNO instead of OK if you want to make an exception")
    return Reply(451, "4.3.5", "Server configuration error")


@register("reject_rbl_client", argument="domain")
async def reject_rbl_client(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    name = reversed_ip(req.client_address)
    if name is None:
        return DUNNO
    return await policy.rbl_reply(req, "Client host", req.client_address, name, arg)


@register("reject_rhsbl_client", argument="domain")
async def reject_rhsbl_client(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    assert arg is not None
    name = await policy.client_hostname(req)
    return await policy.rbl_reply(req, "Client host", name, name, arg) if name else DUNNO


@register("permit_dnswl_client", argument="domain")
async def permit_dnswl_client(policy: Policy, req: Request, kind: str, arg: str | None, verdict: Verdict) -> Result:
    """Permit a client listed in the DNS allow-list *arg*; never for a recipient we
    may not accept (an allow-list must not open the relay)."""
    assert arg is not None
    if req.stage == "recipient" and req.recipient is not None and \
            not policy.authorized_destination(req.recipient):
        return DUNNO
    name = reversed_ip(req.client_address)
    if name is None:
        return DUNNO
    listed = await policy.listed(req, name, arg)
    if listed is None:  # temporary trouble: a later reject becomes a deferral
        return policy.defer_if_reject(verdict, Reply(450, "4.7.1", f"<{req.client_address}>: Client host rejected: "
                                                                   "Service unavailable"))
    return PERMIT if listed[0] else DUNNO
