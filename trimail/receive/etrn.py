"""ETRN (RFC 1985, Postfix's flush(8) as smtpd uses it): smtpd_etrn_restrictions, then
the deferred mail of a site listed in fast_flush_domains is made due now and the
queue manager woken.

Parameters: fast_flush_domains, parent_domain_matches_subdomains (through ReceiveContext),
smtpd_etrn_restrictions (through the policy).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trimail import rewrite
from trimail.queue import admin
from trimail.smtp import replies
from trimail.smtp.replies import Reply
from trimail.smtp.server import ServerConnection

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession

log = logging.getLogger("trimail.smtpd")


async def etrn(session: SmtpdSession, site: str, conn: ServerConnection) -> Reply | None:
    """ETRN (RFC 1985, Postfix's flush(8)): the deferred mail for an eligible
    site is made due now and the queue manager woken."""
    ctx = session.ctx
    refused = await session._restrict("etrn", "ETRN", conn, etrn=site)
    if refused is not None:
        return refused
    if not rewrite.domain_listed(site, ctx.fast_flush_domains, ctx.fast_flush_subdomains):
        log.warning("reject: ETRN %s... from %s", site, session.client)
        return replies.etrn_refused(site)
    try:
        count = await ctx.writer.run(admin.flush_site, site)
    except Exception as exc:  # noqa: BLE001 - this request's boundary: 458, the session goes on
        log.warning("ETRN %s from %s: %s", site, session.client, exc)
        return replies.ETRN_UNABLE
    if ctx.scheduler is not None:
        if count:  # flush(8) tells qmgr to forget dead sites (QMGR_REQ_FLUSH_DEAD) when it has mail
            ctx.scheduler.forget_dead()  # for the site: an ETRN for nothing revives nothing
        ctx.scheduler.wake()
    log.info("ETRN %s from %s: %d message(s) made due", site, session.client, count)
    return None
