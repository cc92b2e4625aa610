"""A small shop's mail, the example application of trimail.testing (docs/testing.md).

- accounts.py: the password-reset mail, sent with smtplib (blocking code);
- newsletter.py: the monthly newsletter, sent with aiosmtplib (asyncio), and an
  outbox that sends from a background task so a request never waits for SMTP;
- invoice.py: the PDF attached to the newsletter, made by hand.

Both senders take the SMTP server to use as a ``Smtp(host, port)``: production
passes the real relay, the tests pass the test MTA's address.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Smtp:
    host: str
    port: int
