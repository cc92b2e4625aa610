"""Test helpers: DKIM keys, their DNS records as the loopback DNS server's zone wants them."""

from __future__ import annotations

from trimail.authcheck.signing import generate_key, public_record


def txt(record: str) -> str:
    """A TXT record's text for dns.rrset.from_text: quoted strings of at most 255 octets."""
    return " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))


def new_key(kind: str = "rsa") -> tuple[bytes, str]:
    """(private key PEM, the TXT record text for the zone)."""
    pem = generate_key(kind, 1024 if kind == "rsa" else 0)
    return pem, txt(public_record(pem))


MESSAGE = (b"From: Alice <alice@mail.sender.example>\r\nTo: bob@rcpt.example\r\nSubject: hello\r\n"
           b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\n"
           b"Hello Bob,\r\nthis is signed.\r\n")
