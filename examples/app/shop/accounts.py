"""Password reset: a one-time code and a link, as text and as HTML (smtplib)."""

from __future__ import annotations

import secrets
import smtplib
from email.message import EmailMessage

from shop import Smtp

SENDER = "Shop <no-reply@shop.example>"


def send_password_reset(smtp: Smtp, email: str, *, site: str = "https://shop.example") -> str:
    """Mail *email* a reset link and a six-digit code; return the link's token."""
    token = secrets.token_urlsafe(16)
    code = f"{secrets.randbelow(10**6):06d}"
    link = f"{site}/reset?token={token}"
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = SENDER, email, "Reset your password"
    mail.set_content(f"Hello,\n\nyour code is {code}, or follow this link: {link}\n\n"
                     "It expires in one hour.\n")
    mail.add_alternative(f'<p>Hello,</p><p>Your code is <b>{code}</b>, or '
                         f'<a href="{link}">reset your password</a>.</p><p>It expires in one hour.</p>',
                         subtype="html")
    with smtplib.SMTP(smtp.host, smtp.port, timeout=30) as client:
        client.send_message(mail)
    return token
