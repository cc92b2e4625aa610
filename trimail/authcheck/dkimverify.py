"""DKIM verification (RFC 6376, RFC 8463) with dkimpy, the keys fetched asynchronously.

``verify_dkim(resolver, message)`` reads the message's DKIM-Signature fields (at
most ``SIGNATURE_LIMIT``), fetches each one's key record
(``selector._domainkey.domain`` TXT) through trimail's trio resolver, and only then
lets dkimpy check the signature with a ``dnsfunc`` that answers from what was
fetched, in a worker thread (the hashing of a big body would stall the event
loop).  Each signature gives a ``DkimResult``: pass, fail (the signature or the
body hash does not match), neutral (none of ours), permerror (a broken signature
or key record, no key), temperror (DNS failure).

ed25519-sha256 signatures are checked here with the ``cryptography`` package:
dkimpy needs pynacl for them, which trimail does not depend on.

Security notes: the message and the key records come from strangers; every
dkimpy exception becomes a result, never an error of the session; RSA keys under
1024 bits fail (dkimpy's minkey), as RFC 8301 asks.  dkimpy checks RSA in pure
Python, ``pow(signature, e, n)`` with the key record's own ``e`` and ``n``: one C
call that holds the GIL, so a 16384-bit modulus with a 16384-bit exponent stalled
the whole daemon for 9 s per signature.  A key over OpenSSL's limits (modulus over
``MAX_MODULUS_BITS``, public exponent over ``MAX_EXPONENT_BITS``, a ``p=`` over
``MAX_KEY_CHARS``) is a permerror before any arithmetic, and the check runs in a
thread the time budget can abandon.  dkimpy looks up each ``h=`` name by scanning
the header section from the bottom: 7,000 names against 9,000 fields (an 86 kB
message) cost 4 s of CPU per signature, so a signature naming more than
``MAX_SIGNED_FIELDS`` fields is a permerror before that scan, and so is a ``b=``
longer than a ``MAX_MODULUS_BITS`` signature (dkimpy turns it into an integer byte
by byte, quadratic: 0.75 s for a 93 kB one).  dkimpy split the whole message into
lines and canonicalized and hashed its body again for every signature: five
signatures on a 10 MB body cost 7 s of CPU, the GIL held most of it.  A
``SignedMessage`` splits the message once and keeps each canonical body and each
body hash for the signatures after it.

Parameters: none read (see trimail/authcheck/inbound.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import re

import dkim
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.crypto import parse_public_key
from dkim.util import parse_tag_value

from trimail.net.dns import DnsError, Resolver

SIGNATURE_LIMIT = 5  # signatures checked per message; the others are not reported
MAX_MODULUS_BITS = 16384  # OpenSSL's OPENSSL_RSA_MAX_MODULUS_BITS
MAX_EXPONENT_BITS = 64  # OpenSSL's RSA_MAX_PUBEXP_BITS (real keys: 65537)
MAX_KEY_CHARS = 4096  # base64 of p=: a 16384-bit key's SubjectPublicKeyInfo is about 2,800
MAX_SIGNED_FIELDS = 256  # names in h= (real signatures: 10 to 40, oversigned twice that)
log = logging.getLogger("trimail.smtpd")
_null_log = logging.getLogger("trimail.authcheck.dkimpy")
_HEADER_END = re.compile(rb"\n\r?\n")  # the empty line after the header, as dkimpy splits lines
_null_log.disabled = True  # dkimpy's own error lines: the result says it


@dataclasses.dataclass(frozen=True, slots=True)
class DkimResult:
    result: str  # pass, fail, neutral, permerror, temperror
    domain: str  # d=
    selector: str  # s=
    signature: str = ""  # the first characters of b= (RFC 6008 header.b)
    algorithm: str = ""
    reason: str = ""


class SignedMessage:
    """A message whose signatures are checked one after another, each in a worker
    thread: split once into its header section and its body, each canonical body
    made once (at most two: simple and relaxed) and each body hash computed once per
    (canonicalization, algorithm, l=).  The checks of one message never overlap (an
    abandoned one is the last); if they did, a value would only be computed twice."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parts: tuple[bytes, bytes] | None = None  # not a cached_property: its lock (3.11) is per class
        self._canonical: dict[bytes, bytes] = {}
        self._hashes: dict[tuple[bytes, bytes, bytes | None], bytes] = {}

    def parts(self) -> tuple[bytes, bytes]:
        """(the header section with its empty line, the body with CRLF line ends):
        dkimpy's rfc822_parse split, without making a list of the body's lines."""
        if self._parts is None:
            end = _HEADER_END.search(self.raw)
            self._parts = (self.raw, b"") if end is None else (
                self.raw[:end.end()], self.raw[end.end():].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        return self._parts

    def body_hash(self, sig: dict[bytes, bytes]) -> bytes:
        """The hash of the body as signature *sig* (its tags) canonicalizes, hashes and
        limits it (c=, a=, l=): dkimpy's verify_sig_process, once per combination."""
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc}") from None
        key = (canon.body_algorithm.name, sig[b"a"], sig.get(b"l"))
        if key not in self._hashes:
            name = canon.body_algorithm.name
            if name not in self._canonical:
                self._canonical[name] = canon.canonicalize_body(self.parts()[1])
            body = self._canonical[name]
            if b"l" in sig:
                body = body[:int(sig[b"l"])]
            self._hashes[key] = dkim.HASH_ALGORITHMS[sig[b"a"]](body).digest()
        return self._hashes[key]

    def check_body_hash(self, sig: dict[bytes, bytes]) -> None:
        """ValidationError("body hash mismatch") when the body is not what *sig* signed."""
        if self.body_hash(sig) != base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"])):
            raise dkim.ValidationError("body hash mismatch")


class _Verifier(dkim.DKIM):
    """dkimpy's DKIM for one signature of *message*: given only the header section
    (the body hash is the ``SignedMessage``'s), with ed25519-sha256 checked by
    ``cryptography``."""

    def __init__(self, message: SignedMessage) -> None:
        super().__init__(message.parts()[0], logger=_null_log, minkey=1024)
        self.message = message

    def verify_sig_process(self, sig: dict, include_headers: list[bytes], sig_header: tuple, dnsfunc) -> bool:
        """dkimpy's check of an RSA signature, the body hash compared first by the
        ``SignedMessage``; dkimpy gets the tags without bh= and so skips the body."""
        if self.seqtlsrpt:  # a key for TLS reports only: dkimpy refuses it before looking at the body
            return super().verify_sig_process(sig, include_headers, sig_header, dnsfunc)
        self.message.check_body_hash(sig)
        return super().verify_sig_process({tag: value for tag, value in sig.items() if tag != b"bh"},
                                          include_headers, sig_header, dnsfunc)

    def check_ed25519(self, sig: dict, include_headers: list[bytes], sig_header: tuple, public: bytes) -> bool:
        try:
            canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as exc:
            raise dkim.MessageFormatError(f"invalid c= value: {exc}") from None
        self.message.check_body_hash(sig)
        if b"from" in include_headers:
            include_headers.append(b"from")
        h = dkim.HashThrough(dkim.HASH_ALGORITHMS[b"ed25519-sha256"](), False)
        dkim.hash_headers(h, canon, canon.canonicalize_headers(self.headers), include_headers, sig_header, sig)
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(
                base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"])), h.digest())
        except (InvalidSignature, ValueError):
            return False
        return True


def _signature_tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(value)
    except Exception:  # noqa: BLE001 - a stranger's header: anything unparsable is just unparsable
        return {}


def _key_tags(record: bytes) -> dict[bytes, bytes]:
    try:
        return parse_tag_value(record)
    except Exception:  # noqa: BLE001 - as above, for a stranger's key record
        return {}


def _rsa_key_problem(record: bytes) -> str | None:
    """Why an RSA key record is refused before dkimpy's arithmetic sees it, or None."""
    key = _key_tags(record)
    text = re.sub(rb"\s+", b"", key.get(b"p", b""))
    if len(text) > MAX_KEY_CHARS:
        return f"key record over {MAX_KEY_CHARS} characters"
    try:
        public = parse_public_key(base64.b64decode(text))
    except Exception:  # noqa: BLE001 - dkimpy's own parse says what is wrong below
        return None
    if public["modulus"].bit_length() > MAX_MODULUS_BITS:
        return f"RSA key over {MAX_MODULUS_BITS} bits"
    if public["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
        return f"RSA public exponent over {MAX_EXPONENT_BITS} bits"
    return None


def _verify_one(message: SignedMessage, index: int, record: bytes) -> tuple[str, str]:
    """Check signature *index* against key *record* (a worker thread); (result, reason)."""
    try:
        verifier = _Verifier(message)
        prep = verifier.verify_headerprep(index)
        if not prep:
            return "permerror", "no signature"
        sig, include_headers, sigheaders = prep
        if len(include_headers) > MAX_SIGNED_FIELDS:
            return "permerror", f"h= names over {MAX_SIGNED_FIELDS} header fields"
        if len(re.sub(rb"\s+", b"", sig.get(b"b", b""))) > MAX_MODULUS_BITS // 6 + 4:
            # longer than any key's signature: dkimpy's byte-by-byte str2int() is quadratic
            return "permerror", f"b= longer than a {MAX_MODULUS_BITS}-bit signature"
        if sig.get(b"a") == b"ed25519-sha256":
            key = _key_tags(record)
            if key.get(b"k") != b"ed25519" or not key.get(b"p"):
                return "permerror", "key record is not an ed25519 key"
            public = base64.b64decode(re.sub(rb"\s+", b"", key[b"p"]))
            ok = verifier.check_ed25519(sig, include_headers, sigheaders[index], public)
        else:
            problem = _rsa_key_problem(record)
            if problem is not None:
                return "permerror", f"bad key record: {problem}"
            dkim.evaluate_pk(b"key", record)  # a bad key record is permerror (dkimpy would say fail)
            ok = verifier.verify(index, dnsfunc=lambda name, timeout=5: record)
    except dkim.ValidationError as exc:
        text = str(exc)
        if "body hash mismatch" in text:
            return "fail", "body hash did not verify"
        return "permerror", text[:100]
    except (dkim.KeyFormatError, binascii.Error) as exc:
        return "permerror", f"bad key record: {str(exc)[:80]}"
    except Exception as exc:  # noqa: BLE001 - dkimpy's edge: any surprise is this signature's permerror
        return "permerror", f"{type(exc).__name__}: {str(exc)[:80]}"
    return ("pass", "") if ok else ("fail", "signature did not verify")


def signatures(message: bytes) -> list[DkimResult]:
    """The message's DKIM signatures (up to SIGNATURE_LIMIT, top first), each as a
    permerror result naming its d=, s=, a= and b= until it is checked.  Only the
    header section is parsed (this runs in the event loop: dkimpy splitting a 9 MB
    body into lines held it 0.6 s for every message from outside, signed or not)."""
    if message.startswith((b"\r\n", b"\n")):
        return []
    end = _HEADER_END.search(message)
    try:
        headers = dkim.DKIM(message if end is None else message[:end.end()], logger=_null_log).headers
    except Exception:  # noqa: BLE001 - a message dkimpy cannot split: nothing to verify
        return []
    found = []
    for value in [v for name, v in headers if name.lower() == b"dkim-signature"][:SIGNATURE_LIMIT]:
        tags = _signature_tags(value)
        domain = tags.get(b"d", b"").decode("ascii", "replace").strip().lower()
        selector = tags.get(b"s", b"").decode("ascii", "replace").strip()
        algorithm = tags.get(b"a", b"").decode("ascii", "replace").strip()
        header_b = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
        found.append(DkimResult("permerror", domain, selector, header_b, algorithm, "bad signature field"))
    return found


async def check_signature(resolver: Resolver, message: SignedMessage, index: int, found: DkimResult,
                          threads: trio.CapacityLimiter | None = None) -> DkimResult:
    """Signature *index* of *message* (*found*: what signatures() said of it) checked;
    the signatures of one message share one ``SignedMessage``.  *threads*: the limiter
    of the thread that checks it (an abandoned thread keeps its place until it ends)."""
    if not found.domain or not found.selector:
        return found
    name = f"{found.selector}._domainkey.{found.domain}"
    try:
        records = await resolver.lookup(name, "TXT")
    except DnsError:
        return dataclasses.replace(found, result="temperror", reason="key unavailable")
    if not records:
        return dataclasses.replace(found, result="permerror", reason="no key for signature")
    # abandoned when the time budget runs out (the thread finishes on its own; bounded work)
    outcome, reason = await trio.to_thread.run_sync(_verify_one, message, index, records[0].encode(),
                                                    abandon_on_cancel=True, limiter=threads)
    return dataclasses.replace(found, result=outcome, reason=reason)


async def verify_dkim(resolver: Resolver, message: bytes) -> list[DkimResult]:
    """One result per DKIM-Signature (up to SIGNATURE_LIMIT), top first; [] when unsigned."""
    signed = SignedMessage(message)
    return [await check_signature(resolver, signed, index, found)
            for index, found in enumerate(signatures(message))]
