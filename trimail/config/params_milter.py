"""Parameters of the milter client (Postfix's MILTER_README): which filters
smtpd and local submission use, the protocol, the timeouts, the default action, and
the macros each stage sends.

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation.  ``trimail.config.registry`` puts the tables
together.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param
from trimail.config.values import choice, parse_text, register_kind, split_list, time_parser
from trimail.milter.machine import parse_endpoint, parse_protocol

TITLE = "Milters (smtpd_milters, non_smtpd_milters)"


def parse_milters(text: str) -> list[str]:
    """A list of ``inet:host:port`` / ``unix:/path`` milter endpoints."""
    names = split_list(text)
    for name in names:
        parse_endpoint(name)
    return names


def parse_milter_protocol(text: str) -> str:
    """``6`` (or 4, 3, 2), optionally with ``no_header_reply``."""
    parse_protocol(text)
    return text.strip()


register_kind(parse_milters, "milter endpoints")
register_kind(parse_milter_protocol, "milter protocol")

PARAMS: list[Param] = [
    P("smtpd_milters", "", parse_milters,
      "mail filters (inet:host:port, unix:/path) that the SMTP server asks at every stage, in order"),
    P("non_smtpd_milters", "", parse_milters,
      "mail filters for mail submitted locally (trimail sendmail), in order"),
    P("milter_protocol", "6", parse_milter_protocol,
      "the milter protocol version trimail announces (6, 4, 3 or 2; no_header_reply)"),
    P("milter_default_action", "tempfail", choice("accept", "reject", "tempfail", "quarantine", "shutdown"),
      "what a filter that is down, too slow or broke the protocol answers: accept (go on without it), "
      "reject (550), tempfail (451), quarantine (accept and hold), shutdown (421)"),
    P("milter_connect_timeout", "30s", time_parser(), "time limit for connecting to a filter"),
    P("milter_command_timeout", "30s", time_parser(),
      "time limit for a filter's answer to a connect, HELO, MAIL, RCPT or DATA event"),
    P("milter_content_timeout", "300s", time_parser(),
      "time limit for a filter's answer to message content (headers, body, end of message)"),
    P("milter_macro_daemon_name", "$myhostname", parse_text, "the {daemon_name} macro"),
    P("milter_macro_v", "$mail_name", parse_text, "the v macro (Postfix: $mail_name $mail_version)"),
    P("milter_connect_macros", "j {daemon_name} {daemon_addr} v _", split_list,
      "macros sent with the connect event"),
    P("milter_helo_macros", "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}", split_list,
      "macros sent with the HELO event"),
    P("milter_mail_macros", "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
      split_list, "macros sent with the MAIL FROM event"),
    P("milter_rcpt_macros", "i {rcpt_addr} {rcpt_host} {rcpt_mailer}", split_list,
      "macros sent with the RCPT TO event"),
    P("milter_data_macros", "i", split_list, "macros sent with the DATA event"),
    P("milter_end_of_header_macros", "i", split_list, "macros sent with the headers and end of headers"),
    P("milter_end_of_data_macros", "i", split_list, "macros sent with the body and end of message"),
]
