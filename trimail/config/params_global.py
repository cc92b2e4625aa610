"""Parameters of the whole system: identity (mail_params.c), networks, relaying and
routing (trivial-rewrite(8)), DNS.

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param, T
from trimail.config.values import (
    parse_int,
    parse_maps,
    parse_nameservers,
    parse_networks,
    parse_text,
    split_list,
)

TITLE = "Whole system: identity, networks, relaying, routing, DNS"

PARAMS: list[Param] = [
    # identity
    P("myhostname", "", parse_text, "fully qualified name of this host (default: from gethostname())"),
    P("mydomain", "", parse_text, "internet domain of this host (default: myhostname minus first label)"),
    P("myorigin", "$myhostname", parse_text, "domain appended to unqualified sender addresses"),
    P("mydestination", "$myhostname, localhost.$mydomain, localhost", split_list,
       "domains delivered locally"),
    P("mail_name", "trimail", parse_text, "mail system name in the SMTP greeting and Received header"),
    P("smtpd_banner", "$myhostname ESMTP $mail_name", parse_text, "text after 220 in the greeting"),
    # networks and relaying
    P("mynetworks", "127.0.0.0/8 [::1]/128", parse_networks, "trusted client networks"),
    P("relay_domains", "", split_list, "domains this gateway relays mail to"),
    P("fast_flush_domains", "$relay_domains", split_list,
       "sites whose deferred mail a client may have sent at once with ETRN (Postfix's flush(8)); "
       "ETRN is offered only when this names a site"),
    P("relay_recipient_maps", "", parse_maps,
       "tables of the known users of relay_domains (user@domain or @domain keys); when set, other "
       "recipients there are refused at RCPT (550 ... User unknown in relay recipient table); "
       "empty: any user"),
    P("relay_transport", "relay", parse_text, "transport for relay_domains (Postfix's default: relay)"),
    P("local_transport", "local:$myhostname", parse_text, "transport for mydestination"),
    P("relayhost", "", parse_text, "default nexthop for non-local mail, e.g. [mail.example.com]:25"),
    P("default_transport", "smtp", parse_text, "transport for non-local mail"),
    P("transport_maps", "", parse_maps, "lookup tables mapping recipients to transport:nexthop"),
    T("dns_nameservers", "", parse_nameservers,
       "resolvers to use instead of /etc/resolv.conf, ip or ip:port"),
    T("dns_concurrency_limit", "100", parse_int,
       "most DNS queries in flight at once (delivery's MX and address lookups, smtpd's "
       "restrictions); more wait for a turn, given to the zones in turn (one zone never "
       "takes the last quarter)"),
]
