"""SASL AUTH for a session: the password table checked on a thread pool of its own
(each check is one scrypt), failures counted per client address
(``smtpd_auth_failure_limit``, anvil's window), Postfix's replies and log lines.

Parameters: smtpd_sasl_password_file, smtpd_auth_failure_limit (through ReceiveContext).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from trimail.log import printable
from trimail.passwords import PasswordError, authenticate
from trimail.smtp.events import Auth
from trimail.smtp.replies import Reply
from trimail.supervise import thread_pool

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession

log = logging.getLogger("trimail.smtpd")


AUTH_THREADS = 2  # scrypt checks at once: an AUTH flood waits for these, never for the threads others need
# Each AUTH check costs a 16 MiB scrypt; on trio's shared pool a flood of bad
# passwords from many addresses crowded out the spool writes and free-space checks
# of every session receiving mail.
_auth_limiter = thread_pool("trimail_auth_checks", AUTH_THREADS)



async def authenticate_session(session: SmtpdSession, event: Auth) -> Reply:
    ctx = session.ctx
    if ctx.hooks is not None and (
            hooked := await ctx.hooks.before("auth", session, event.credentials.username)) is not None:
        return hooked  # trimail.testing's fault injection
    now = time.monotonic()
    failures = ctx.auth_failures.count(session.client_address, now)
    if failures >= ctx.auth_failure_limit:
        log.warning("%s: too many failed AUTH attempts (%d)", session.client, failures)
        return Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
    user = event.credentials.username
    try:
        ok = await trio.to_thread.run_sync(authenticate, ctx.password_file, user, event.credentials.password,
                                           limiter=_auth_limiter())
    except PasswordError as exc:  # Postfix: 454 when the password backend cannot answer
        log.warning("%s: SASL %s authentication failed: cannot read the password table: %s",
                    session.client, event.mechanism, exc)
        return Reply(454, "4.7.0", "Temporary authentication failure")
    if not ok:
        ctx.auth_failures.failed(session.client_address, now)
        log.warning("%s: SASL %s authentication failed: authentication failure, sasl_username=%s",
                    session.client, event.mechanism, printable(user, 64))
        return Reply(535, "5.7.8", "Error: authentication failed: authentication failure")
    session.sasl_username = user
    session.sasl_method = event.mechanism
    session._rewrite_context = None  # permit_sasl_authenticated may say local now
    return Reply(235, "2.7.0", "Authentication successful")
