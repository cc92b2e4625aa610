"""Parameters of mail authentication (trimail/authcheck/): SPF, DKIM and DMARC checks
of received mail, the Authentication-Results header, the opt-in rejections, and
outbound DKIM signing.  All are trimail-only: Postfix leaves these jobs to milters
(OpenDKIM, OpenDMARC) and policy services (policyd-spf).

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import Param, T
from trimail.config.values import (
    choice,
    parse_bool,
    parse_maps,
    register_kind,
    split_list,
    time_parser,
)

TITLE = "Mail authentication: SPF, DKIM, DMARC and DKIM signing (trimail)"

CHECKS = ("spf", "dkim", "dmarc")
SPF_RESULTS = ("fail", "softfail", "permerror", "temperror")


def _subset(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.lower() for v in split_list(text)]
        for value in values:
            if value not in allowed:
                raise ValueError(f"bad value {value!r} (use any of: {', '.join(allowed)})")
        return list(dict.fromkeys(values))

    register_kind(parse, "list of: " + ", ".join(allowed))
    return parse


parse_checks = _subset(CHECKS)
parse_spf_results = _subset(SPF_RESULTS)

PARAMS: list[Param] = [
    T("smtpd_authentication_checks", "spf, dkim, dmarc", parse_checks,
      "checks of mail from clients outside mynetworks that did not authenticate, reported in an "
      "Authentication-Results: $myhostname header (RFC 8601); empty: no checks and no header"),
    T("smtpd_authentication_timeout", "20s", time_parser(),
      "time budget of one message's checks (SPF at MAIL FROM, DKIM and DMARC at the end of DATA); "
      "what does not finish in time is temperror"),
    T("smtpd_spf_reject", "", parse_spf_results,
      "SPF results refused at MAIL FROM (fail and softfail: 550 5.7.23, permerror: 550 5.7.24, temperror: "
      "451 4.7.24); empty: SPF is only reported (policyd-spf's HELO_reject/Mail_From_reject)"),
    T("smtpd_dmarc_reject", "no", parse_bool,
      "refuse (550 5.7.1) a message that fails DMARC when its domain's policy is reject (after pct=); "
      "no: only reported (OpenDMARC's RejectFailures)"),
    T("smtpd_dmarc_quarantine", "none", choice("none", "hold"),
      "hold: a message that fails DMARC under a quarantine policy goes to the hold queue; none: only reported"),
    T("dkim_signing_table", "", parse_maps,
      "From: address (then its domain, then .parent domains) -> key name in dkim_key_table; mail from "
      "mynetworks or authenticated clients is signed (OpenDKIM's SigningTable)"),
    T("dkim_key_table", "", parse_maps,
      "key name -> domain:selector:/path/to/private.key (OpenDKIM's KeyTable)"),
]
