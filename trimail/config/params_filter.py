"""Parameters of the after-queue content filter (Postfix's FILTER_README): where
mail received here goes first (``content_filter``), what the SMTP server and
cleanup leave out (``receive_override_options``) and the listener the filter
gives the mail back to (``reinject_listen``, with ``reinject_overrides``: what
Postfix writes as ``127.0.0.1:10025 inet ... smtpd -o name=value`` in master.cf).

The parsers are here because only these parameters use them: a content filter is
``transport:nexthop`` with an SMTP or LMTP transport (``smtp:[127.0.0.1]:10024``;
``smtp:`` alone keeps each recipient's own nexthop), the override options are
Postfix's four names, and the listener's overrides are master.cf's ``-o`` words.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

import re

from trimail.config.param import P, Param, T
from trimail.config.values import parse_listen, parse_maps, parse_size, register_kind, split_list

TITLE = "The after-queue content filter (FILTER_README)"

FILTER_TRANSPORTS = frozenset({"smtp", "relay", "lmtp"})  # trimail's SMTP/LMTP delivery agents
# transport(5)'s nexthop: [host]:port or [host] (no MX lookup), host:port or host (MX lookup).
# The host is at most 255 printable characters without white space (a DNS name's
# bound; CR/LF would end up in log lines and in the bounce's Diagnostic-Code) and
# the port 0-65535 (99999 reached the socket layer and deferred as "internal error").
_HOST = r"[^\s\x00-\x1f\x7f:\[\]]{1,255}"
_BRACKETED = r"[^\s\x00-\x1f\x7f\[\]]{1,255}"  # an IPv6 address has colons
_PORT = r"(?::(0*(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|\d{1,4})))?"
NEXTHOP = re.compile(rf"\[({_BRACKETED})\]{_PORT}|({_HOST}){_PORT}")

# input_transp.c's names (postconf(5) receive_override_options)
RECEIVE_OVERRIDE_OPTIONS = ("no_unknown_recipient_checks", "no_address_mappings", "no_header_body_checks",
                            "no_milters")


def filter_problem(text: str) -> str:
    """Why *text* cannot be a content filter (``""`` when it can): it must be
    ``transport:nexthop`` with an SMTP or LMTP transport and a nexthop that parses,
    or ``transport:`` (each recipient's own nexthop)."""
    transport, colon, nexthop = text.strip().partition(":")
    if not colon:
        return "needs transport:destination"
    if transport.lower() not in FILTER_TRANSPORTS:
        return f"unknown transport {transport!r} (use one of {', '.join(sorted(FILTER_TRANSPORTS))})"
    if nexthop.strip() and not NEXTHOP.fullmatch(nexthop.strip()):
        return f"bad nexthop {nexthop!r}"
    return ""


def parse_content_filter(text: str) -> str:
    """``transport:nexthop`` or empty (no filter)."""
    value = text.strip()
    if value and (problem := filter_problem(value)):
        raise ValueError(f"{value}: {problem}")
    return value


def parse_receive_override_options(text: str) -> frozenset[str]:
    """Postfix's names, separated by commas or white space; an unknown one is fatal
    (Postfix's name_mask)."""
    names = frozenset(name.lower() for name in split_list(text))
    unknown = sorted(names.difference(RECEIVE_OVERRIDE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} (use: {', '.join(RECEIVE_OVERRIDE_OPTIONS)})")
    return names


def parse_overrides(text: str) -> dict[str, str]:
    """master.cf's ``-o`` words: ``name=value`` separated by white space (the value
    may hold commas: ``smtpd_recipient_restrictions=permit_mynetworks,reject``), or
    Postfix 3.0's ``{ name = value with spaces }``; ``name=`` makes a value empty.
    Whether each name is a parameter is checked where the overrides are applied."""
    try:
        words = split_list(text, commas=False)
    except ValueError:
        raise ValueError(f"missing '}}' in {text.strip()!r}") from None
    overrides: dict[str, str] = {}
    for word in words:
        if word.startswith("{") and word.endswith("}"):
            word = word[1:-1]
        name, equals, value = word.partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"bad override {word!r} (use name=value, or {{ name = value }})")
        overrides[name] = value.strip()
    return overrides


register_kind(parse_content_filter, "transport:nexthop")
register_kind(parse_receive_override_options, "list of: " + ", ".join(RECEIVE_OVERRIDE_OPTIONS))
register_kind(parse_overrides, "name=value words, as master.cf -o")

REINJECT_OVERRIDES = (
    "content_filter= receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters"
    " smtpd_client_restrictions= smtpd_helo_restrictions= smtpd_sender_restrictions="
    " smtpd_relay_restrictions=permit_mynetworks,reject smtpd_recipient_restrictions=permit_mynetworks,reject"
    " smtpd_data_restrictions= smtpd_end_of_data_restrictions= mynetworks=127.0.0.0/8,[::1]/128"
    " smtpd_error_sleep_time=0 smtpd_soft_error_limit=1001 smtpd_hard_error_limit=1000"
)

PARAMS: list[Param] = [
    P("content_filter", "", parse_content_filter,
      "after-queue content filter, transport:nexthop (smtp:[127.0.0.1]:10024): every message received"
      " goes there instead of its destination; stored with the message when it is queued"),
    P("receive_override_options", "", parse_receive_override_options,
      "what the SMTP server and cleanup leave out for mail received here: no_unknown_recipient_checks,"
      " no_address_mappings, no_header_body_checks, no_milters"),
    P("header_checks", "", parse_maps,
      "tables that each primary header of a message received is looked up in (header_checks(5):"
      " REJECT, WARN, INFO, HOLD, DISCARD, IGNORE, PREPEND, REPLACE, REDIRECT, BCC, FILTER, DUNNO)"),
    P("mime_header_checks", "$header_checks", parse_maps,
      "header_checks for MIME headers (Content-*, MIME-Version) and the headers of multipart parts"),
    P("nested_header_checks", "$header_checks", parse_maps,
      "header_checks for the headers of an attached message (message/rfc822)"),
    P("body_checks", "", parse_maps,
      "tables that each body line of a message received is looked up in (header_checks(5) actions)"),
    P("body_checks_size_limit", "51200", parse_size, "how many bytes of each body part body_checks inspect"),
    T("reinject_listen", "", parse_listen,
      "listener for mail coming back from the content filter, host:port (Postfix's 127.0.0.1:10025"
      " smtpd in master.cf); its parameters are main.cf's with reinject_overrides"),
    T("reinject_overrides", REINJECT_OVERRIDES, parse_overrides,
      "parameters that differ on reinject_listen, as master.cf's -o name=value"
      " (content_filter is always empty there unless set here)"),
]
