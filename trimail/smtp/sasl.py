"""SASL PLAIN (RFC 4616) and LOGIN decoding for AUTH (RFC 4954), without I/O.

``SaslExchange`` is fed the client's base64 lines and says what to send next: a
``334`` challenge, or the decoded (authzid, username, password).  Decoding errors
are peer errors (``501 5.5.2``).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

MECHANISMS = ("PLAIN", "LOGIN")
MAX_RESPONSE = 12288  # RFC 4954: at least 12288 octets must be accepted


class SaslError(Exception):
    """The client's response is not valid for the mechanism; str() is the reply text."""


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    authzid: str
    username: str
    password: str


def _b64(line: str) -> bytes:
    if len(line) > MAX_RESPONSE:
        raise SaslError("Authentication response too long")
    try:
        return base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("Cannot decode response") from None


def _text(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("Cannot decode response") from None
    if any(ord(ch) < 32 for ch in text):
        raise SaslError("Invalid characters in response")
    return text


class SaslExchange:
    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        self._username: str | None = None

    def start(self, initial: str | None) -> str | Credentials:
        """A challenge (base64 text for 334) or the credentials when complete."""
        if self.mechanism == "PLAIN":
            if initial is None:
                return ""
            return self.step(initial)
        if initial is not None:
            self._username = _text(_b64(initial)) if initial != "=" else ""
            return base64.b64encode(b"Password:").decode()
        return base64.b64encode(b"Username:").decode()

    def step(self, line: str) -> str | Credentials:
        data = _b64(line) if line.strip() != "=" else b""
        if self.mechanism == "PLAIN":
            parts = data.split(b"\x00")
            if len(parts) != 3 or not parts[1]:
                raise SaslError("Invalid authentication response")
            authzid, username, password = (_text(p) for p in parts)
            return Credentials(authzid, username, password)
        if self._username is None:
            self._username = _text(data)
            return base64.b64encode(b"Password:").decode()
        return Credentials("", self._username, _text(data))
