"""Outbound DKIM signing (RFC 6376; rsa-sha256, and ed25519-sha256 after RFC 8463)
per sender domain, with OpenDKIM's SigningTable/KeyTable model.

``dkim_signing_table`` maps the From: address to a key name; it is looked up with
the whole address, then the domain, then each parent domain as ``.parent``
(Postfix's table habits; OpenDKIM's refile ``*@example.com`` is the domain key
here).  ``dkim_key_table`` maps the key name to ``domain:selector:/path/to/key``
(OpenDKIM's KeyTable format).  The key file is PEM (PKCS#1 or PKCS#8; an Ed25519
key as PKCS#8 PEM or dkimpy's base64 seed), read when first used and again when
it changes.  The signature covers dkimpy's default header list (RFC 6376 5.4.1,
From: signed twice so a second one cannot be added) with relaxed/relaxed
canonicalization, and is placed right after trimail's own Received: header.

``trimail dkim keygen`` (``generate_key``) writes a new key, mode 0600, and gives
the DNS TXT record to publish.

Security notes: the private key never leaves this module and is never logged; a
key file that cannot be read or parsed is an error of the message (451 4.3.0,
the mail waits), never mail sent unsigned by accident.  Signing runs in a worker
thread (a big body takes a while to hash).

Parameters: dkim_signing_table, dkim_key_table (here for a local submission, else through the
caller, as table_lookup_timeout is).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from trimail.cleanup.headers import from_field_addresses
from trimail.maps import TableError, lookup_first, off_loop, open_table

if TYPE_CHECKING:
    from trimail.config import Config

CANONICALIZATION = (b"relaxed", b"relaxed")
_FIRST_FIELD = re.compile(rb"[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


class SigningError(Exception):
    """A signing table, key table or key file that cannot be used."""


class UnsignableMessage(Exception):
    """A message dkimpy cannot parse (its header section is broken): sent unsigned."""


@dataclasses.dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str
    selector: str
    path: str


def _ed25519_pem(data: bytes) -> ed25519.Ed25519PrivateKey:
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SigningError("not an Ed25519 private key")
        return key
    return ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip()))


class _KeyAdapter:
    """A ``cryptography`` private key as dkimpy's gen_header uses an ed25519 key
    (pynacl's ``sign(digest).signature``): *digest* is the SHA-256 of the signed
    header data, which Ed25519 signs as such (RFC 8463) and RSA signs as a
    prehashed SHA-256 in PKCS#1 v1.5 -- exactly what rsa-sha256 is (RFC 6376 3.3.1)."""

    def __init__(self, key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> SimpleNamespace:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return SimpleNamespace(signature=self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))
        return SimpleNamespace(signature=self._key.sign(digest))


class _Signer(dkim.DKIM):
    def sign_with(self, selector: bytes, domain: bytes, key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
        """dkimpy's sign(), the key held by ``cryptography``: dkimpy needs pynacl for
        ed25519 and signs RSA in pure Python (7.7 ms a message against 0.5 ms)."""
        import time

        algorithm = b"rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else b"ed25519-sha256"
        canon = CanonicalizationPolicy.from_c_value(b"/".join(CANONICALIZATION))
        include = tuple(x.lower() for x in self.default_sign_headers())
        if b"from" not in include:
            raise dkim.ParameterError("The From header field MUST be signed")
        self.include_headers = include
        self.hasher = dkim.HASH_ALGORITHMS[algorithm]  # SHA-256 for both
        bodyhash = base64.b64encode(self.hasher(canon.canonicalize_body(self.body)).digest())
        fields = [(b"v", b"1"), (b"a", algorithm), (b"c", canon.to_c_value()), (b"d", domain),
                  (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", selector),
                  (b"t", str(int(time.time())).encode()), (b"h", b" : ".join(include)), (b"bh", bodyhash),
                  (b"b", b"0" * 60)]
        # gen_header's ed25519 branch hands the header digest to _KeyAdapter.sign
        self.signature_algorithm = b"ed25519-sha256"
        return b"DKIM-Signature: " + self.gen_header(fields, include, canon, b"DKIM-Signature", _KeyAdapter(key))


class _KeyCache:
    """Key files by path, read again when they change (inode, size, mtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[tuple[int, ...], str, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey]] = {}

    def get(self, path: str) -> tuple[str, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey]:
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._keys.get(path)
            if cached and cached[0] == stamp:
                return cached[1], cached[2]
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SigningError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from None
        kind, key = _load(data, path)
        with self._lock:
            self._keys[path] = (stamp, kind, key)
        return kind, key


def _load(data: bytes, path: str) -> tuple[str, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey]:
    """("rsa" or "ed25519", the private key)."""
    try:
        if b"PRIVATE KEY" not in data:
            return "ed25519", _ed25519_pem(data)
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, SigningError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"DKIM key {path}: not a usable private key ({exc})") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519", key
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise SigningError(f"DKIM key {path}: {key.key_size} bits; RFC 8301 wants at least 1024")
        return "rsa", key
    raise SigningError(f"DKIM key {path}: neither RSA nor Ed25519")


def sign_message(message: bytes, key: SigningKey, cache: _KeyCache) -> bytes:
    """The DKIM-Signature field (CRLF-terminated) for *message*; SigningError."""
    _, private = cache.get(key.path)
    try:
        field = _Signer(message, linesep=b"\r\n").sign_with(key.selector.encode(), key.domain.encode(), private)
    except (dkim.MessageFormatError, dkim.ParameterError) as exc:
        raise UnsignableMessage(str(exc)[:200]) from None
    except dkim.DKIMException as exc:
        raise SigningError(f"cannot sign with {key.path}: {exc}") from None
    return field if field.endswith(b"\r\n") else field + b"\r\n"


class Signer:
    """The signing and key tables of one configuration."""

    def __init__(self, signing_tables: list[str], key_tables: list[str], lookup_timeout: float = 10.0) -> None:
        try:
            self.signing = [open_table(ref, lazy=True) for ref in signing_tables]
            self.keys = [open_table(ref, lazy=True) for ref in key_tables]
        except TableError as exc:
            raise SigningError(str(exc)) from None
        self.lookup_timeout = lookup_timeout
        self.cache = _KeyCache()

    def _find(self, address: str) -> SigningKey | None:
        address = address.lower().strip()
        domain = address.rpartition("@")[2].rstrip(".")
        if not domain:
            return None
        keys = [address, domain] if "@" in address else [domain]
        labels = domain.split(".")
        keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        name = None
        for key in keys:
            if (name := lookup_first(self.signing, key)) is not None:
                break
        if name is None:
            return None
        entry = lookup_first(self.keys, name.strip())
        if entry is None:
            raise SigningError(f"dkim_signing_table names key {name.strip()!r}, which dkim_key_table lacks")
        parts = entry.strip().split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise SigningError(f"dkim_key_table entry {name.strip()!r}: expected domain:selector:/path/to/key")
        return SigningKey(parts[0].strip().lower(), parts[1].strip(), parts[2].strip())

    def find(self, address: str) -> SigningKey | None:
        """The key for *address*; SigningError (a table too: TableError) when unusable."""
        try:
            return self._find(address)
        except TableError as exc:
            raise SigningError(str(exc)) from None

    async def find_async(self, address: str) -> SigningKey | None:
        try:
            return await off_loop([*self.signing, *self.keys], self._find, address, timeout=self.lookup_timeout)
        except TableError as exc:
            raise SigningError(str(exc)) from None


def sign_local(config: Config, content: bytes) -> bytes:
    """A local submission (``trimail sendmail``: its Received: first, then the completed
    header) with the DKIM-Signature its From: address calls for inserted after that
    Received:; unchanged when there is no key for it.  SigningError (for instance a
    key only mail_owner may read): the caller hands the mail to serve instead."""
    if not (config.dkim_signing_table and config.dkim_key_table):
        return content
    signer = Signer(config.dkim_signing_table, config.dkim_key_table)
    cut = _FIRST_FIELD.match(content)
    start = cut.end() if cut else 0
    addresses = from_field_addresses(content[start:content.find(b"\r\n\r\n") + 2])
    key = signer.find(addresses[0]) if len(addresses) == 1 else None
    if key is None:
        return content
    try:
        field = sign_message(content[start:], key, signer.cache)
    except UnsignableMessage:  # a header section dkimpy cannot read: queued as it is, as serve does
        return content
    return content[:start] + field + content[start:]


def public_record(private_pem: bytes) -> str:
    """The DNS TXT record (``v=DKIM1; k=...; p=...``) for a PEM private key."""
    _, key = _load(private_pem, "key")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def generate_key(kind: str = "rsa", bits: int = 2048) -> bytes:
    """A new private key as PEM (PKCS#1 for RSA, which dkimpy and OpenDKIM read;
    PKCS#8 for Ed25519)."""
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())


def dns_txt_zone_line(selector: str, domain: str, record: str) -> str:
    """The record as a zone file line, split into 255-octet strings (RFC 7208 3.3 style)."""
    chunks = [record[i:i + 250] for i in range(0, len(record), 250)]
    quoted = " ".join(f'"{chunk}"' for chunk in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


__all__ = ["Signer", "SigningError", "SigningKey", "UnsignableMessage", "generate_key", "public_record",
           "sign_local", "sign_message"]
