"""Parameters of the SMTP client (smtp(8)): timeouts, connection reuse, MX limits
and TLS.

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param
from trimail.config.values import (
    choice,
    parse_addresses,
    parse_bool,
    parse_count,
    parse_text,
    time_parser,
)

TITLE = "The SMTP client (smtp(8))"

PARAMS: list[Param] = [
    # SMTP client
    P("smtp_connect_timeout", "30s", time_parser(), "time limit for a TCP connection to a mail host"),
    P("smtp_helo_timeout", "300s", time_parser(), "time limit for the greeting and the EHLO reply"),
    P("smtp_mail_timeout", "300s", time_parser(), "time limit for the MAIL FROM reply"),
    P("smtp_rcpt_timeout", "300s", time_parser(), "time limit for each RCPT TO reply"),
    P("smtp_data_init_timeout", "120s", time_parser(), "time limit for the DATA reply"),
    P("smtp_data_xfer_timeout", "180s", time_parser(), "time limit for sending content (per MiB)"),
    P("smtp_data_done_timeout", "600s", time_parser(), "time limit for the end-of-data reply"),
    P("smtp_quit_timeout", "300s", time_parser(), "time limit for the QUIT reply"),
    P("smtp_connection_cache_time_limit", "2s", time_parser(),
       "how long a delivery connection with nothing to send is kept open for the next message"),
    P("smtp_connection_reuse_time_limit", "300s", time_parser(),
       "how long one delivery connection may be used for message after message"),
    P("smtp_mx_address_limit", "5", parse_count,
       "most MX IP addresses tried in one delivery attempt, in MX preference order (0: no limit)"),
    P("smtp_mx_session_limit", "2", parse_count,
       "most SMTP sessions (connections that got past greeting and EHLO) in one delivery attempt "
       "(0: no limit, trimail stops at 10): recipients soft-failed in one session (4xx, lost "
       "connection) go to the next mail host while sessions are left"),
    P("smtp_line_length_limit", "998", parse_count,
      "longest message header or body line sent over SMTP, without its CRLF; a longer one is broken "
      "by inserting CRLF SPACE (0: no limit)"),
    P("disable_mime_output_conversion", "no", parse_bool,
       "send 8-bit MIME entities as they are to a server that does not offer 8BITMIME, instead of "
       "converting them to quoted-printable"),
    P("proxy_interfaces", "", parse_addresses,
       "IP addresses of proxies or NAT devices that forward port 25 to this host: an MX or relay "
       "host at one of them, port 25, is this host (mail for it loops back to myself)"),
    # SMTP client TLS
    P("smtp_tls_security_level", "may", choice("", "none", "may", "encrypt", "verify", "secure"),
       "SMTP client TLS: may (opportunistic), encrypt, verify or secure (never in clear)"),
    P("smtp_tls_CAfile", "", parse_text, "CA certificates for verifying servers (PEM)"),
]
