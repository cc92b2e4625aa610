"""TLS contexts.  The SMTP client's TLS policy (smtp_tls_security_level,
smtp_tls_CAfile): one ``ssl.SSLContext`` per policy, TLS 1.2 or newer; certificates
are checked only at the levels that say so (verify, secure).  (The server's context,
smtpd_tls_cert_file, is still built by ``trimail.smtpd.server_tls_context``.)

Parameters: smtp_tls_security_level, smtp_tls_CAfile.
"""

from __future__ import annotations

import dataclasses
import ssl


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
