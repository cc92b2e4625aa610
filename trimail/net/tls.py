"""TLS contexts.  The server's (``server_tls_context``: smtpd_tls_cert_file and
smtpd_tls_key_file, TLS 1.2 or newer, the certificate loaded at start kept when it
cannot be read again later) and the SMTP client's TLS policy
(smtp_tls_security_level, smtp_tls_CAfile): one ``ssl.SSLContext`` per policy, TLS
1.2 or newer; certificates are checked only at the levels that say so (verify,
secure).

``close_within`` ends a TLS connection: its close_notify is sent shielded from a
stop, but within CLOSE_WITHIN seconds, since it waits for a peer that has stopped
reading; past that the connection is closed at once.

Parameters: smtpd_tls_cert_file, smtpd_tls_key_file, smtp_tls_security_level, smtp_tls_CAfile.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import ssl

import trio

from trimail.config import Config, ConfigError

log = logging.getLogger("trimail.smtpd")
CLOSE_WITHIN = 5.0  # seconds for a TLS connection's close_notify


async def close_within(stream: trio.abc.AsyncResource, seconds: float = CLOSE_WITHIN) -> None:
    """``stream.aclose()`` shielded from a stop but bounded: an SSLStream's close sends
    close_notify, which waits while the peer does not read (the send buffer full);
    shielded without a bound, a stop waited for it for ever (red team 33a's lead).
    trio's SSLStream closes its transport at once when its close is cancelled."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + seconds):
        await stream.aclose()


@dataclasses.dataclass(slots=True)
class TlsPolicy:
    """smtp_tls_security_level: may (opportunistic), encrypt (no clear text, no
    certificate check), verify/secure (certificate checked against smtp_tls_CAfile
    and the host name)."""

    level: str
    ca_file: str = ""
    _context: ssl.SSLContext | None = None

    @property
    def required(self) -> bool:
        return self.level in ("encrypt", "verify", "secure")

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.level in ("verify", "secure"):
                ctx.check_hostname = True
                ctx.verify_mode = ssl.CERT_REQUIRED
                if self.ca_file:
                    ctx.load_verify_locations(cafile=self.ca_file)
                else:
                    ctx.load_default_certs()
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._context = ctx
        return self._context


# The last certificate loaded from each (cert, key) path.  serve loads it at start, as root and
# outside any chroot jail (startup.preflight); when the path cannot be opened later (the jail, or a
# root-only key after the switch to mail_owner), reload keeps that one instead of failing.
_loaded: dict[tuple[str, str], ssl.SSLContext] = {}
_kept_warned: set[tuple[str, str]] = set()


def server_tls_context(config: Config) -> ssl.SSLContext:
    """TLS 1.2 or newer with the configured certificate (ConfigError when unusable).
    A certificate that cannot be opened any more but was loaded before is kept,
    with one warning (restart serve to load a new one)."""
    key = (config.smtpd_tls_cert_file, config.smtpd_tls_key_file)
    try:
        ctx = loaded_chain(config.smtpd_tls_cert_file, config.smtpd_tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        if not isinstance(exc, ssl.SSLError) and key in _loaded:
            if key not in _kept_warned:
                _kept_warned.add(key)
                log.warning("cannot read %s now (%s): keeping the certificate loaded at start; restart serve "
                            "to load a new one", config.smtpd_tls_cert_file, exc.strerror or exc)
            return _loaded[key]
        raise ConfigError(f"{config.where('smtpd_tls_cert_file')}: cannot load certificate "
                          f"{config.smtpd_tls_cert_file} / key {config.smtpd_tls_key_file}: {exc}") from None
    _loaded[key] = ctx
    return ctx


# Server contexts by the content of their certificate and key files: the start-up check, the
# preflight and every listener of a start (and every test MTA of a process, each with its own
# copy of one test certificate) parse and check a chain once; a renewed certificate is new content.
_by_content: dict[tuple[bytes, bytes], ssl.SSLContext] = {}
_BY_CONTENT_LIMIT = 16
_FILE_LIMIT = 1 << 20  # bytes of a certificate or key file at most (they are a few kB)


def loaded_chain(cert_file: str, key_file: str = "") -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer, no renegotiation) with this certificate chain and key;
    raises what ``load_cert_chain`` raises.  Never changed once made: callers share it."""
    content = (_digest(cert_file), _digest(key_file) if key_file else b"")
    ctx = _by_content.get(content)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # a client's TLS 1.2 renegotiations each cost the server a handshake: refused, as
    # Postfix's tls_ssl_options NO_RENEGOTIATION does
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file or None)
    if len(_by_content) >= _BY_CONTENT_LIMIT:
        del _by_content[next(iter(_by_content))]
    _by_content[content] = ctx
    return ctx


def _digest(path: str) -> bytes:
    """SHA-256 of the file's content.  Anything but a regular file is an OSError:
    opening a FIFO waits for a writer, and that froze serve (start, or a reload in
    the event loop) for good.  So is a file over 1 MiB (certificate chains and keys
    are a few kB): OpenSSL would read all of it in the event loop at a reload."""
    import hashlib
    import stat

    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with open(descriptor, "rb") as source:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        data = source.read(_FILE_LIMIT + 1)
    if len(data) > _FILE_LIMIT:
        raise OSError(errno.EFBIG, f"larger than {_FILE_LIMIT >> 20} MiB: not a certificate or key file", path)
    return hashlib.sha256(data).digest()
