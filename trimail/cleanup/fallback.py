"""Local submission for a user who may not write the queue (trimail sendmail): the
message goes to serve's first smtpd listener on loopback, all or nothing.

Every recipient must be accepted before DATA, else the transaction is reset and
nothing is queued: sendmail's exit 0 means every recipient was queued (smtplib's
``sendmail()`` returns the refused recipients and goes on, and before this module
they were dropped with exit 0).  A refusal or failure is one line; the exit status
is EX_TEMPFAIL (75) when the condition is temporary (serve not running, a 4xx),
so a caller that retries on it does, and EX_UNAVAILABLE (69) when not.

Parameters: smtpd_listen (the first listener; a wildcard address is reached on
127.0.0.1).
"""

from __future__ import annotations

import contextlib
import smtplib

from trimail.cleanup.submit import SendmailError
from trimail.config import Config
from trimail.log import printable

EX_UNAVAILABLE = 69  # sysexits.h: a service is unavailable
EX_TEMPFAIL = 75  # sysexits.h: temporary failure, try again later


def submit_smtp(cfg: Config, sender: str, rcpts: list[str], content: bytes) -> int:
    """*content* from *sender* to *rcpts* through serve's smtpd (see the module); 0, or
    SendmailError."""
    listen = cfg.smtpd_listen[0]
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
    try:
        with smtplib.SMTP(host, listen.port, timeout=60) as client:
            client.ehlo_or_helo_if_needed()
            options = [f"SIZE={len(content)}"] if client.has_extn("size") else []
            if not content.isascii() and client.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")
            if not all(address.isascii() for address in (sender, *rcpts)):
                if not client.has_extn("smtputf8"):
                    raise SendmailError(f"serve at {listen} does not offer SMTPUTF8, which the addresses need",
                                        EX_UNAVAILABLE)
                client.command_encoding = "utf-8"
                options.append("SMTPUTF8")
            code, reply = client.mail(sender or "<>", options)
            refused = [(f"<{sender}>", code, reply)] if code != 250 else []
            for rcpt in rcpts if not refused else []:
                code, reply = client.rcpt(rcpt)
                if code not in (250, 251):
                    refused.append((f"<{rcpt}>", code, reply))
                    if code == 421:  # serve is closing the session
                        break
            if not refused:
                try:
                    code, reply = client.data(content)
                except smtplib.SMTPDataError as exc:  # DATA itself refused
                    code, reply = exc.smtp_code, exc.smtp_error
                refused = [("the message", code, reply)] if code != 250 else []
            if refused:
                with contextlib.suppress(OSError, smtplib.SMTPException):
                    client.rset()
                raise _refusal(listen, refused, len(rcpts))
    except (OSError, smtplib.SMTPException) as exc:
        raise SendmailError(f"cannot write the queue and cannot submit over SMTP to {listen}: "
                            f"{printable(str(exc), 300)}", EX_TEMPFAIL) from None
    return 0


def _refusal(listen: object, refused: list[tuple[str, int, bytes]], recipients: int) -> SendmailError:
    """One line for what serve refused over SMTP (nothing was queued)."""
    shown = "; ".join(f"{what}: {code} {printable(reply.decode('utf-8', 'replace'), 200)}"
                      for what, code, reply in refused[:3])
    more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
    temporary = all(400 <= code < 500 for _, code, _ in refused)
    return SendmailError(f"serve at {listen} refused the message over SMTP and nothing was sent "
                         f"({len(refused)} refusals, {recipients} recipients): {shown}{more}",
                         EX_TEMPFAIL if temporary else EX_UNAVAILABLE)
