"""The SMTP protocol settings one listener's sessions share, made from main.cf
(``protocol_settings``: the state machine's ``trimail.smtp.server.Settings``), and the
parts of it that other modules need too (``milters_of``, ``forbidden_tables``).

Apart from ``trimail.receive.context`` (serve's listeners), ``sendmail -bs``
(``trimail.standalone``) makes its session's settings here: this module imports
nothing of serve's (no trio, no DNS, no queue writer), so that a local SMTP
session starts as fast as ``sendmail`` does.

Parameters: myhostname, smtpd_banner, message_size_limit, line_length_limit,
smtpd_recipient_limit, smtpd_hard_error_limit, smtpd_forbid_bare_newline,
smtpd_forbid_bare_newline_reject_code, cleanup_replace_stray_cr_lf,
smtpd_forbidden_commands, smtpd_delay_reject, smtpd_client_restrictions,
smtputf8_enable, disable_vrfy_command, fast_flush_domains, smtpd_helo_required,
smtpd_tls_cert_file, smtpd_tls_security_level, smtpd_tls_auth_only,
smtpd_sasl_auth_enable, smtpd_milters, receive_override_options, smtpd_discard_ehlo_keywords.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trimail.config import Config, ConfigError
from trimail.maps import TableError
from trimail.maps.patterns import _parse_pattern, match_regexp, parse_regexp
from trimail.smtp.server import Settings

log = logging.getLogger("trimail.smtpd")


def milters_of(config: Config) -> list[str]:
    """smtpd_milters, unless receive_override_options has no_milters (a reinjection
    listener: the mail was filtered before it went to the content filter)."""
    return [] if "no_milters" in config.receive_override_options else config.smtpd_milters


# the parameters whose text protocol_settings keeps (Config.memo's keeps); the others
# it reads become flags and numbers
PROTOCOL_TEXTS = ("myhostname", "smtpd_banner", "smtpd_forbidden_commands")


def protocol_settings(config: Config, kind: str = "smtp") -> Settings:
    tls = bool(config.smtpd_tls_cert_file) and config.smtpd_tls_security_level != "none"
    discard = frozenset(k.upper() for k in config.smtpd_discard_ehlo_keywords) - {"SILENT-DISCARD"}
    return Settings(
        dsn="DSN" not in discard,
        chunking="CHUNKING" not in discard,
        discard_ehlo=discard,
        starttls=tls and kind != "smtps",
        tls_required=tls and config.smtpd_tls_security_level == "encrypt",
        auth=kind in ("submission", "smtps") or config.smtpd_sasl_auth_enable,
        auth_tls_only=config.smtpd_tls_auth_only,
        hostname=config.myhostname,
        banner=config.smtpd_banner,
        message_size_limit=config.message_size_limit,
        line_length_limit=config.line_length_limit,
        recipient_limit=config.smtpd_recipient_limit,
        hard_error_limit=config.smtpd_hard_error_limit,
        # Postfix: yes and note are normalize; trimail never ends DATA at a bare LF, so no is too
        bare_newline="reject" if config.smtpd_forbid_bare_newline == "reject" else "normalize",
        bare_newline_code=config.smtpd_forbid_bare_newline_reject_code,
        replace_stray_cr_lf=config.cleanup_replace_stray_cr_lf,
        forbidden_commands=frozenset(c.upper() for c in config.smtpd_forbidden_commands if ":" not in c),
        forbidden_match=forbidden_tables(config),
        # Postfix: smtpd_delay_reject = no runs smtpd_client_restrictions at connect
        connect_check=not config.smtpd_delay_reject and bool(config.smtpd_client_restrictions)
        or bool(milters_of(config)),  # the filters hear of the connection before the greeting
        smtputf8=config.smtputf8_enable,
        vrfy=not config.disable_vrfy_command,
        etrn=bool(config.fast_flush_domains),
        helo_required=config.smtpd_helo_required,
    )


def _reads_no_file(config: Config) -> bool:
    """Whether ``protocol_settings`` reads no file (every smtpd_forbidden_commands
    table is inline), so that it may be made once per configuration (``Config.memo``)."""
    return all(entry.partition(":")[2].startswith("{") for entry in config.smtpd_forbidden_commands
               if ":" in entry)


def forbidden_tables(config: Config):
    """A matcher for the ``type:table`` entries of smtpd_forbidden_commands (Postfix's
    default ``regexp:{{/^[^A-Z]/ Bogus}}``): inline ``regexp:{{/re/ result}, ...}`` and
    ``pcre:`` entries, or regexp/pcre files, read once here; other table types are not
    consulted (a warning).  None when there are no entries."""
    rules: list = []
    for entry in config.smtpd_forbidden_commands:
        kind, sep, name = entry.partition(":")
        if not sep:
            continue
        if kind not in ("regexp", "pcre"):
            log.warning("%s: %s: only regexp: and pcre: tables are consulted here; ignored",
                        config.where("smtpd_forbidden_commands"), entry)
            continue
        try:
            if name.startswith("{"):
                for number, text in enumerate(_inline_rules(name), 1):
                    pattern, negated, result = _parse_pattern(Path("smtpd_forbidden_commands"), number, text,
                                                              pcre=kind == "pcre")
                    if not result:
                        raise TableError(f"{entry}: no result after the pattern")
                    rules.append(([(pattern, negated)], result))
            else:
                rules += parse_regexp(Path(name), pcre=kind == "pcre")
        except (TableError, ValueError) as exc:
            raise ConfigError(f"{config.where('smtpd_forbidden_commands')}: {exc}") from None
    if not rules:
        return None
    return lambda word: match_regexp(rules, word) is not None


def _inline_rules(text: str) -> list[str]:
    """The rules of an inline table ``{ {rule}, {rule} }`` (or ``{rule}``)."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise ValueError(f"bad inline table {text!r}")
    body = body[1:-1].strip()
    if not body.startswith("{"):
        return [body] if body else []
    rules, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
            if depth == 1:
                start = i + 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                rules.append(body[start:i].strip())
            elif depth < 0:
                raise ValueError(f"bad inline table {text!r}")
    if depth:
        raise ValueError(f"bad inline table {text!r}")
    return rules
