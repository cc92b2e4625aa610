"""The relay decision as restrictions: ``permit_auth_destination``,
``reject_unauth_destination`` (554 5.7.1 Relay access denied) and
``defer_unauth_destination`` (450 4.7.1).  A destination is authorized when the one
address resolver (``trimail/rewrite.py``, trivial-rewrite(8)) puts the recipient in
a local, virtual or relay class (``Policy.authorized_destination``); an address it
cannot resolve never is (tests/policy/test_relay.py proves this over every address
form trimail knows, from outside ``mynetworks``).

Parameters: mydestination, relay_domains, virtual_alias_domains,
virtual_mailbox_domains, parent_domain_matches_subdomains (through the resolver).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trimail.policy.engine import DUNNO, PERMIT, Request, Result, Verdict, register
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy


def _relay_denied(policy: Policy, req: Request, code: int, dsn: str) -> Result:
    if req.recipient is None or policy.authorized_destination(req.recipient):
        return DUNNO
    return Reply(code, dsn, f"<{req.recipient}>: Relay access denied")


@register("reject_unauth_destination", needs="recipient")
async def reject_unauth_destination(policy: Policy, req: Request, kind: str, arg: str | None,
                                    verdict: Verdict) -> Result:
    return _relay_denied(policy, req, 554, "5.7.1")


@register("defer_unauth_destination", needs="recipient")
async def defer_unauth_destination(policy: Policy, req: Request, kind: str, arg: str | None,
                                   verdict: Verdict) -> Result:
    return _relay_denied(policy, req, 450, "4.7.1")


@register("permit_auth_destination", needs="recipient")
async def permit_auth_destination(policy: Policy, req: Request, kind: str, arg: str | None,
                                  verdict: Verdict) -> Result:
    if req.recipient is not None and policy.authorized_destination(req.recipient):
        return PERMIT
    return DUNNO
