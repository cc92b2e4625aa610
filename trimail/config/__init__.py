"""main.cf configuration: the parser, ``$name`` expansion and the parameter registry.

The registry (``PARAMETERS``) is the single place where every parameter is named,
typed, given its default and documented in one line; ``trimail config`` and the
docs are generated from it.  Values are stored raw, exactly as written, and
expanded only when used (Postfix's lazy expansion), so ``mydestination =
$myhostname`` follows a later ``-o myhostname=...``.

Syntax (postconf(5)): ``name = value`` logical lines; a line that starts with
white space continues the previous logical line; blank lines and lines whose first
non-blank character is ``#`` are comments.  ``$name``, ``${name}`` and
``$(name)`` expand recursively with loop detection; ``${name?text}`` is *text*
when *name* is non-empty and ``${name:text}`` when it is empty; Postfix 3.0's
``${name?{text1}:{text2}}`` is *text1* when *name* is non-empty, else *text2*,
and ``${{text} == {text} ? {a} : {b}}`` compares (``trimail/config/syntax.py``).
That form makes values depend on ``stress``, which serve sets for sessions that
run while the SMTP service is under stress (``smtpd_timeout =
${stress?{10}:{300}}s``, Postfix's STRESS_README).

Errors name the file and line as Postfix does (``/etc/trimail/main.cf, line 12:
...``), in Postfix's words for numbers, times and booleans (``bad numerical
configuration: message_size_limit = 10MB``; ``invalid NAME parameter value -1 <
0`` below a parameter's minimum).  A parameter that is not in the registry and
not referenced by another value only warns, and so does a ``$name`` that nothing
defines (``main.cf: undefined parameter: NAME``), as postconf(1) does.

Security notes: the file is parsed as plain text; no value is ever evaluated or
passed to a shell.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from trimail.config import syntax
from trimail.config.syntax import ConfigError, Setting, parse_main_cf, parse_override
from trimail.config.values import (
    TIME_UNIT,
    BadValue,
    choice,
    parse_5xx,
    parse_addresses,
    parse_bool,
    parse_count,
    parse_domain_names,
    parse_feedback,
    parse_int,
    parse_listen,
    parse_lock_methods,
    parse_maps,
    parse_nameservers,
    parse_networks,
    parse_reject_code,
    parse_size,
    parse_text,
    parse_workers,
    reply_code_parser,
    split_list,
    time_parser,
)

DEFAULT_CONFIG_FILE = Path("/etc/trimail/main.cf")


# ---------------------------------------------------------------------------
# the registry


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """One parameter.  *minimum* and *maximum* bound a number or a time (seconds):
    every number has a minimum of at least 0 (a negative limit is fatal), and
    Postfix's own bounds apply where Postfix has them (``LIMITS``)."""

    name: str
    default: str
    parse: Callable[[str], Any]
    doc: str
    minimum: float | None = None
    maximum: float | None = None




def _derived_hostname() -> str:
    """Postfix's default ``myhostname``: gethostname(), with ``.localdomain``
    appended when it is not fully qualified (mail_params.c, check_myhostname)."""
    name = socket.gethostname().lower().rstrip(".") or "localhost"
    return name if "." in name else name + ".localdomain"


def _derived_domain(hostname: str) -> str:
    """myhostname without its first label; ``localdomain`` when that leaves no dot."""
    _, _, rest = hostname.partition(".")
    return rest if "." in rest else "localdomain"


_P = Param
PARAMETERS: dict[str, Param] = {
    p.name: p
    for p in [
        # identity
        _P("myhostname", "", parse_text, "fully qualified name of this host (default: from gethostname())"),
        _P("mydomain", "", parse_text, "internet domain of this host (default: myhostname minus first label)"),
        _P("myorigin", "$myhostname", parse_text, "domain appended to unqualified sender addresses"),
        _P("mydestination", "$myhostname, localhost.$mydomain, localhost", split_list,
           "domains delivered locally"),
        _P("mail_name", "trimail", parse_text, "mail system name in the SMTP greeting and Received header"),
        _P("smtpd_banner", "$myhostname ESMTP $mail_name", parse_text, "text after 220 in the greeting"),
        # networks and relaying
        _P("mynetworks", "127.0.0.0/8 [::1]/128", parse_networks, "trusted client networks"),
        _P("relay_domains", "", split_list, "domains this gateway relays mail to"),
        _P("fast_flush_domains", "$relay_domains", split_list,
           "sites whose deferred mail a client may have sent at once with ETRN (Postfix's flush(8)); "
           "ETRN is offered only when this names a site"),
        _P("relay_recipient_maps", "", parse_maps,
           "tables of the known users of relay_domains (user@domain or @domain keys); when set, other "
           "recipients there are refused at RCPT (550 ... User unknown in relay recipient table); "
           "empty: any user"),
        _P("relay_transport", "relay", parse_text, "transport for relay_domains (Postfix's default: relay)"),
        _P("local_transport", "local:$myhostname", parse_text, "transport for mydestination"),
        _P("relayhost", "", parse_text, "default nexthop for non-local mail, e.g. [mail.example.com]:25"),
        _P("default_transport", "smtp", parse_text, "transport for non-local mail"),
        _P("transport_maps", "", parse_maps, "lookup tables mapping recipients to transport:nexthop"),
        _P("dns_nameservers", "", parse_nameservers,
           "(trimail) resolvers to use instead of /etc/resolv.conf, ip or ip:port"),
        _P("dns_concurrency_limit", "100", parse_int,
           "(trimail) most DNS queries in flight at once (delivery's MX and address lookups, smtpd's "
           "restrictions); more wait for a turn"),
        # local delivery and aliases
        _P("alias_maps", "hash:/etc/aliases", parse_maps, "alias tables for local delivery"),
        _P("alias_database", "hash:/etc/aliases", parse_maps, "alias tables newaliases rebuilds"),
        _P("virtual_alias_maps", "", parse_maps, "address rewriting for any domain"),
        _P("virtual_alias_domains", "", parse_domain_names,
           "domains whose users exist only in virtual_alias_maps (names; Postfix's default "
           "$virtual_alias_maps, tables in the list, is not supported)"),
        _P("virtual_mailbox_domains", "", parse_domain_names,
           "domains delivered by virtual_transport to the mailboxes of virtual_mailbox_maps (names)"),
        _P("virtual_mailbox_maps", "", parse_maps,
           "user@domain -> mailbox path under virtual_mailbox_base (ends in / for Maildir)"),
        _P("virtual_transport", "virtual", parse_text, "transport for virtual_mailbox_domains"),
        _P("virtual_mailbox_base", "", parse_text, "directory every virtual mailbox path is relative to"),
        _P("virtual_uid_maps", "", parse_maps, "user@domain -> uid that owns the virtual mailbox (static:N)"),
        _P("virtual_gid_maps", "", parse_maps, "user@domain -> gid of the virtual mailbox (static:N)"),
        _P("virtual_minimum_uid", "100", parse_int, "lowest uid virtual delivery accepts from virtual_uid_maps"),
        _P("smtpd_reject_unlisted_recipient", "yes", parse_bool,
           "refuse at RCPT a recipient of a local, virtual or relay domain that its class's table does "
           "not list, after the recipient restrictions (as reject_unlisted_recipient)"),
        _P("unknown_local_recipient_reject_code", "550", parse_reject_code,
           "reply code for a user local_recipient_maps does not list"),
        _P("unknown_virtual_alias_reject_code", "550", parse_reject_code,
           "reply code for a user of a virtual alias domain virtual_alias_maps does not list"),
        _P("unknown_virtual_mailbox_reject_code", "550", parse_reject_code,
           "reply code for a user of a virtual mailbox domain virtual_mailbox_maps does not list"),
        _P("unknown_relay_recipient_reject_code", "550", parse_reject_code,
           "reply code for a user of a relay domain relay_recipient_maps does not list"),
        _P("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps", split_list,
           "tables of known local recipients (empty: accept any)"),
        _P("recipient_delimiter", "", parse_text, "separator of address extensions, e.g. + for user+tag"),
        _P("mail_spool_directory", "$queue_directory/mailboxes", parse_text, "where local mail homes live"),
        _P("home_mailbox", "Maildir/", parse_text, "mailbox relative to the mail home; ends in / for Maildir"),
        _P("append_at_myorigin", "yes", parse_bool, "qualify bare local submissions with @$myorigin"),
        _P("append_dot_mydomain", "no", parse_bool, "qualify user@host as user@host.$mydomain"),
        _P("allow_mail_to_commands", "", split_list,
           "where |command targets may come from: alias, include (empty: nowhere)"),
        _P("allow_mail_to_files", "alias, include", split_list, "where /file targets may come from"),
        _P("command_time_limit", "1000s", time_parser(), "time limit for delivery to a command"),
        _P("default_privs", "nobody", parse_text, "the unprivileged account local delivery uses for |command and "
           "/file targets from the alias table (never root, never mail_owner); those from an :include: file "
           "run as the file's owner (a serve running as mail_owner has them run by its root helper)"),
        _P("local_destination_concurrency_limit", "2", parse_int, "parallel local deliveries"),
        _P("mailbox_delivery_lock", "fcntl, dotlock", parse_lock_methods,
           "how an mbox file is locked for delivery: fcntl, flock and/or dotlock (FILE.lock)"),
        _P("deliver_lock_attempts", "20", parse_int,
           "attempts to lock an mbox file (and to create its dotlock) before the delivery is deferred"),
        _P("deliver_lock_delay", "1s", time_parser(), "time between attempts to lock an mbox file"),
        _P("stale_lock_time", "500s", time_parser(), "age after which a dotlock file is removed as stale"),
        _P("table_lookup_timeout", "20s", time_parser(),
           "(trimail) time limit for a lookup that may block (a file reload, hash:, unix:passwd.byname); "
           "a lookup that takes longer is a temporary failure (451 4.3.0)"),
        _P("masquerade_domains", "", split_list, "domains to strip subdomains from"),
        _P("masquerade_exceptions", "", split_list, "local parts exempt from masquerading"),
        _P("masquerade_classes", "envelope_sender, header_sender, header_recipient", split_list,
           "which addresses masquerading rewrites"),
        _P("local_header_rewrite_clients", "permit_inet_interfaces", split_list,
           "clients whose mail has its header addresses rewritten and masqueraded as local mail: "
           "permit_inet_interfaces, permit_mynetworks, permit_sasl_authenticated, permit_tls_clientcerts, "
           "permit_tls_all_clientcerts, check_address_map type:table (or type:table alone)"),
        _P("remote_header_rewrite_domain", "", parse_text,
           "when set, the header addresses of other clients' mail are rewritten too (incomplete ones "
           "completed with this domain) and masqueraded; empty: left as they came"),
        # queue
        _P("queue_directory", "/var/spool/trimail", parse_text, "directory of the queue database"),
        _P("queue_busy_timeout", "30s", time_parser(), "how long a queue write waits while another process (an "
           "operator's tool) holds the database's write lock; past it the write fails temporarily (451, deferral)"),
        _P("queue_minfree", "0", parse_size,
           "free bytes the queue file system needs for smtpd to accept MAIL FROM; it also needs "
           "more than 1.5 * message_size_limit"),
        _P("mail_owner", "trimail", parse_text, "unprivileged account serve runs as"),
        _P("allow_root", "no", parse_bool,
           "(trimail) stay root instead of becoming mail_owner: development and test suites only"),
        _P("chroot", "no", parse_bool, "(trimail) confine serve to queue_directory after start (see docs/security.md)"),
        _P("minimal_backoff_time", "300s", time_parser(), "shortest retry interval for deferred mail"),
        _P("maximal_backoff_time", "4000s", time_parser(), "longest retry interval for deferred mail"),
        _P("maximal_queue_lifetime", "5d", time_parser("d"), "how long deferred mail is retried"),
        _P("bounce_queue_lifetime", "5d", time_parser("d"), "how long deferred bounces are retried"),
        _P("bounce_size_limit", "50000", parse_size,
           "largest original message a non-delivery notification returns whole; a larger one is "
           "returned as its headers only (0: no limit)"),
        _P("queue_run_delay", "300s", time_parser(), "how often the deferred queue is scanned"),
        _P("qmgr_message_active_limit", "20000", parse_int, "most messages in the active queue"),
        _P("qmgr_message_recipient_limit", "20000", parse_int,
           "most recipients of active messages held in memory by the queue manager; claims stop there"),
        _P("qmgr_destination_active_share", "25", parse_int,
           "(trimail) percent of qmgr_message_active_limit one destination's jobs of new mail (waiting and in "
           "delivery) may hold, and its retries as much again (never less than its concurrency limit); a "
           "message whose jobs all go to destinations at their share waits in the deferred queue without a "
           "delivery attempt, paced back at the destination's delivery rate (at most queue_run_delay)"),
        _P("default_destination_recipient_limit", "50", parse_int,
           "most recipients per message delivery"),
        _P("smtp_destination_recipient_limit", "$default_destination_recipient_limit", parse_int,
           "most recipients per message delivery with the smtp transport"),
        _P("relay_destination_recipient_limit", "$default_destination_recipient_limit", parse_int,
           "most recipients per message delivery with the relay transport"),
        _P("default_process_limit", "100", parse_int,
           "most delivery agents at once (trimail: delivery worker tasks holding a slot)"),
        _P("default_destination_concurrency_limit", "20", parse_int,
           "most parallel deliveries to one destination"),
        _P("smtp_destination_concurrency_limit", "$default_destination_concurrency_limit", parse_int,
           "most parallel deliveries to one destination with the smtp transport"),
        _P("relay_destination_concurrency_limit", "$default_destination_concurrency_limit", parse_int,
           "most parallel deliveries to one destination with the relay transport"),
        _P("initial_destination_concurrency", "5", parse_int,
           "initial number of parallel deliveries to a new destination (its concurrency window starts "
           "there and moves with feedback between 1 and <transport>_destination_concurrency_limit)"),
        _P("default_destination_concurrency_positive_feedback", "1", parse_feedback,
           "window increase per connection that gets its greeting and EHLO reply: a number, "
           "number/number or number/concurrency in 0..1 (0: none); the window grows by 1 each time "
           "this adds up to 1"),
        _P("default_destination_concurrency_negative_feedback", "1", parse_feedback,
           "window decrease per failed connection attempt (connect, greeting or EHLO failure), in "
           "the same forms; never below 1"),
        _P("default_destination_concurrency_failed_cohort_limit", "1", parse_count,
           "failed pseudo-cohorts (a window's worth of failed connection attempts, no success in "
           "between) after which a destination with no connection up is dead: its queued mail is "
           "deferred and new mail for it is deferred at once for minimal_backoff_time (0: never)"),
        *(_P(f"{transport}_{name}", f"${default}", parser,
             f"{default} for the {transport} transport")
          for transport in ("smtp", "relay")
          for name, default, parser in (
              ("initial_destination_concurrency", "initial_destination_concurrency", parse_int),
              ("destination_concurrency_positive_feedback",
               "default_destination_concurrency_positive_feedback", parse_feedback),
              ("destination_concurrency_negative_feedback",
               "default_destination_concurrency_negative_feedback", parse_feedback),
              ("destination_concurrency_failed_cohort_limit",
               "default_destination_concurrency_failed_cohort_limit", parse_count))),
        _P("delay_warning_time", "0h", time_parser("h"), "when to tell the sender mail is delayed (0: never)"),
        _P("hopcount_limit", "50", parse_int, "most Received: headers before a mail loop bounce"),
        # SMTP server
        _P("smtpd_listen", "0.0.0.0:25, [::]:25", parse_listen,
           "(trimail) addresses the SMTP listener binds, host:port"),
        _P("submission_listen", "", parse_listen, "(trimail) optional submission listener, host:port"),
        _P("smtps_listen", "", parse_listen, "(trimail) optional implicit-TLS listener, host:port"),
        _P("metrics_listen", "", parse_listen, "(trimail) optional Prometheus endpoint, host:port"),
        _P("message_size_limit", "10240000", parse_size, "largest message accepted, in bytes"),
        _P("line_length_limit", "2048", parse_int, "longest SMTP command line, in bytes"),
        _P("smtpd_recipient_limit", "1000", parse_int, "most recipients per message"),
        _P("smtpd_timeout", "${stress?{10}:{300}}s", time_parser(),
           "time limit for each read from an SMTP client (10s under stress)"),
        _P("smtpd_per_record_deadline", "${stress?{yes}:{no}}", parse_bool,
           "smtpd_timeout limits the time to receive a whole command or content line, not each read "
           "(yes under stress: a client trickling a byte at a time is cut off)"),
        _P("smtpd_hard_error_limit", "${stress?{1}:{20}}", parse_int,
           "errors after which the session is closed (1 under stress)"),
        _P("smtpd_junk_command_limit", "${stress?{1}:{100}}", parse_int,
           "HELO, EHLO, NOOP, VRFY and RSET commands after which each one counts as an error (1 under stress)"),
        _P("stress", "", parse_text,
           "set to yes by serve while the SMTP service is under stress; use as ${stress?{value}:{value}}"
           " (setting it in main.cf forces stress values everywhere)"),
        _P("smtpd_stress_threshold", "80", parse_int,
           "(trimail) stress mode starts when this percentage of smtpd_process_limit sessions are open"
           " and ends below half of that; open sessions then get the stress limits too (0: never)"),
        _P("smtpd_soft_error_limit", "10", parse_int, "errors after which replies are delayed"),
        _P("smtpd_error_sleep_time", "1s", time_parser(), "delay per reply once the soft limit is passed"),
        _P("smtpd_forbid_bare_newline", "normalize", choice("normalize", "note", "yes", "reject", "no"),
           "bare <LF> from a client: normalize (yes, note and no are accepted as the same) stores it as"
           " <CR><LF>; reject refuses a command line with one (ending the session) or a message with one"
           " (after its real end). DATA ends only at <CR><LF>.<CR><LF>, even with no (unlike Postfix)"),
        _P("smtpd_forbid_bare_newline_reject_code", "550", parse_5xx,
           "reply code for smtpd_forbid_bare_newline = reject (5XX; 521 also disconnects)"),
        _P("smtpd_forbid_bare_newline_exclusions", "$mynetworks", parse_networks,
           "clients for which smtpd_forbid_bare_newline = reject acts as normalize"),
        _P("cleanup_replace_stray_cr_lf", "yes", parse_bool,
           "replace each <CR> or <LF> in received message content that is not part of a <CR><LF> pair"
           " with a space, so no stray one is ever relayed (outbound SMTP smuggling)"),
        _P("smtpd_forbidden_commands", "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}", split_list,
           "commands that end the session at once with 221 (HTTP proxies and browsers; a table entry matches "
           "the first word of an unknown command: Postfix's default, one not starting with a letter); "
           "a message header sent as a command always does"),
        _P("smtpd_client_connection_count_limit", "50", parse_int,
           "most simultaneous sessions from one client address (0: no limit)"),
        _P("smtpd_process_limit", "1000", parse_int, "(trimail) most simultaneous SMTP sessions"),
        _P("smtpd_workers", "auto", parse_workers,
           "(trimail) smtpd worker processes under one master, each accepting on every listener"
           " (auto: one per core; 0: smtpd and qmgr in one process, as trimail.testing runs)"),
        _P("master_service_disable", "", split_list,
           "services not to run: qmgr (keep mail queued, deliver nothing), smtpd"),
        _P("smtpd_session_deadline", "3600s", time_parser(),
           "(trimail) hard limit on a whole SMTP session, however busy the client is"),
        _P("smtpd_client_connection_rate_limit", "0", parse_int,
           "most connections per client address per minute (0: no limit)"),
        _P("smtpd_greet_pause", "0s", time_parser(),
           "(trimail) wait this long before the banner; a client that talks first is refused"
           " (no pause under stress)"),
        _P("header_size_limit", "102400", parse_size, "largest header section of a message"),
        _P("maillog_file", "", parse_text, "mail log file (reopened after logrotate); syslog: to syslog; empty: stderr"),
        _P("syslog_facility", "mail", parse_text, "syslog facility when maillog_file = syslog"),
        _P("graceful_timeout", "10s", time_parser(),
           "(trimail) on stop, how long open sessions may finish before 421"),
        _P("disable_vrfy_command", "no", parse_bool, "refuse VRFY (502) instead of answering 252"),
        _P("smtputf8_enable", "yes", parse_bool, "announce and accept SMTPUTF8"),
        # restrictions (consulted by the policy layer)
        _P("smtpd_client_restrictions", "", split_list, "restrictions at connect time"),
        _P("smtpd_helo_restrictions", "", split_list, "restrictions on HELO/EHLO"),
        _P("smtpd_sender_restrictions", "", split_list, "restrictions on MAIL FROM"),
        _P("smtpd_relay_restrictions",
           "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", split_list,
           "relay control restrictions on RCPT TO"),
        _P("smtpd_recipient_restrictions", "", split_list, "spam restrictions on RCPT TO"),
        _P("smtpd_data_restrictions", "", split_list, "restrictions on DATA"),
        _P("smtpd_end_of_data_restrictions", "", split_list, "restrictions after the end of DATA"),
        _P("smtpd_etrn_restrictions", "", split_list, "restrictions on the ETRN command (and its site)"),
        _P("smtpd_delay_reject", "yes", parse_bool, "apply client, HELO and sender restrictions at RCPT"),
        _P("smtpd_helo_required", "no", parse_bool, "require HELO/EHLO before MAIL"),
        # trimail/peername.py: the verified client name, looked up at connect (bounded, cached)
        _P("smtpd_peername_lookup", "yes", parse_bool,
           "look up the client's verified host name (reverse, then forward) for the log, Received: and replies"),
        _P("smtpd_recipient_overshoot_limit", "1000", parse_int,
           "recipients past smtpd_recipient_limit counted as errors"),
        _P("parent_domain_matches_subdomains",
           "debug_peer_list, fast_flush_domains, mynetworks, permit_mx_backup_networks, qmqpd_authorized_clients,"
           " relay_domains, smtpd_access_maps", split_list,
           "where a parent domain also matches its subdomains (else use .domain)"),
        _P("allow_percent_hack", "no", parse_bool, "rewrite user%domain as user@domain (off here; Postfix's default is yes)"),
        _P("swap_bangpath", "yes", parse_bool, "rewrite site!user as user@site"),
        _P("resolve_dequoted_address", "yes", parse_bool,
           "resolve \"user@remote\"@local by its dequoted form (user@remote), as Postfix does"),
        _P("resolve_null_domain", "no", parse_bool,
           "resolve user@ (an empty domain) as a local address instead of refusing it as invalid"),
        _P("smtpd_policy_service_timeout", "100s", time_parser(), "time limit for a policy service answer"),
        _P("smtpd_policy_service_default_action", "451 4.3.5 Server configuration problem", parse_text,
           "action when a policy service cannot be reached"),
        _P("plaintext_reject_code", "450", reply_code_parser("45"), "reply code of reject_plaintext_session"),
        _P("unknown_client_reject_code", "450", reply_code_parser("45"),
           "reply code of reject_unknown_client_hostname and reject_unknown_reverse_client_hostname when "
           "the lookup failed for good (a temporary failure is always 450)"),
        _P("unknown_hostname_reject_code", "450", reply_code_parser("45"),
           "reply code of reject_unknown_helo_hostname when the name has no A, AAAA or MX record"),
        _P("multi_recipient_bounce_reject_code", "550", reply_code_parser("45"),
           "reply code of reject_multi_recipient_bounce"),
        _P("relay_clientcerts", "", parse_maps,
           "tables of client certificate fingerprints permit_tls_clientcerts accepts (client certificates "
           "are not requested yet, so nothing matches)"),
        _P("address_verify_sender", "double-bounce", parse_text,
           "MAIL FROM of address verification probes (reject_unverified_recipient); unqualified gets "
           "@$myorigin, empty means the null sender"),
        _P("address_verify_positive_expire_time", "31d", time_parser("d"),
           "how long a verified (deliverable) address stays in the verification cache"),
        _P("address_verify_negative_expire_time", "3d", time_parser("d"),
           "how long an undeliverable address stays in the verification cache"),
        _P("address_verify_negative_cache", "yes", parse_bool, "cache undeliverable addresses too"),
        _P("address_verify_negative_refresh_time", "3h", time_parser("h"),
           "how long a temporary verification failure (the probe got a 4xx or no answer) is remembered "
           "before the address is probed again (with address_verify_negative_cache)"),
        _P("address_verify_poll_count", "${stress?{1}:{3}}", parse_int,
           "how many times smtpd looks for a probe's answer before it replies 'verification in progress'"),
        _P("address_verify_poll_delay", "3s", time_parser(), "the wait between two such looks"),
        _P("address_verify_cache_size", "10000", parse_int,
           "(trimail) addresses the in-memory verification cache holds (the oldest go first)"),
        _P("unverified_recipient_reject_code", "450", reply_code_parser("45"),
           "reply code when a verification probe says the recipient is undeliverable"),
        _P("unverified_recipient_defer_code", "450", reply_code_parser("45"),
           "reply code when a recipient could not be verified yet (probe deferred or still running)"),
        _P("unverified_recipient_tempfail_action", "defer_if_permit", choice("defer_if_permit", "defer"),
           "what a temporary verification failure does: defer only if the rest would permit, or defer"),
        _P("unverified_recipient_reject_reason", "", parse_text,
           "reply text instead of the probe's own reason (empty: the probe's reason)"),
        # SMTP client
        _P("smtp_connect_timeout", "30s", time_parser(), "time limit for a TCP connection to a mail host"),
        _P("smtp_helo_timeout", "300s", time_parser(), "time limit for the greeting and the EHLO reply"),
        _P("smtp_mail_timeout", "300s", time_parser(), "time limit for the MAIL FROM reply"),
        _P("smtp_rcpt_timeout", "300s", time_parser(), "time limit for each RCPT TO reply"),
        _P("smtp_data_init_timeout", "120s", time_parser(), "time limit for the DATA reply"),
        _P("smtp_data_xfer_timeout", "180s", time_parser(), "time limit for sending content (per MiB)"),
        _P("smtp_data_done_timeout", "600s", time_parser(), "time limit for the end-of-data reply"),
        _P("smtp_quit_timeout", "300s", time_parser(), "time limit for the QUIT reply"),
        _P("smtp_connection_cache_time_limit", "2s", time_parser(),
           "how long a delivery connection with nothing to send is kept open for the next message"),
        _P("smtp_connection_reuse_time_limit", "300s", time_parser(),
           "how long one delivery connection may be used for message after message"),
        _P("smtp_mx_address_limit", "5", parse_count,
           "most MX IP addresses tried in one delivery attempt, in MX preference order (0: no limit)"),
        _P("smtp_mx_session_limit", "2", parse_count,
           "most SMTP sessions (connections that got past greeting and EHLO) in one delivery attempt "
           "(0: no limit, trimail stops at 10): recipients soft-failed in one session (4xx, lost "
           "connection) go to the next mail host while sessions are left"),
        _P("disable_mime_output_conversion", "no", parse_bool,
           "send 8-bit MIME entities as they are to a server that does not offer 8BITMIME, instead of "
           "converting them to quoted-printable"),
        _P("proxy_interfaces", "", parse_addresses,
           "IP addresses of proxies or NAT devices that forward port 25 to this host: an MX or relay "
           "host at one of them, port 25, is this host (mail for it loops back to myself)"),
        # TLS and AUTH
        _P("smtpd_tls_cert_file", "", parse_text, "server certificate (PEM)"),
        _P("smtpd_sasl_auth_enable", "no", parse_bool, "offer AUTH on smtpd_listen (always on submission)"),
        _P("smtpd_tls_auth_only", "yes", parse_bool, "offer AUTH only under TLS (Postfix's default is no)"),
        _P("smtpd_sasl_password_file", "$queue_directory/sasl_passwd", parse_text,
           "(trimail) AUTH logins with salted scrypt hashes, managed by trimail passwd"),
        _P("smtpd_auth_failure_limit", "5", parse_int,
           "(trimail) failed AUTH attempts per client address in 10 minutes before AUTH is refused"),
        _P("smtpd_sender_login_maps", "", parse_maps, "tables: sender address -> logins that may use it"),
        _P("smtpd_tls_handshake_timeout", "${stress?{10}:{60}}s", time_parser(),
           "(trimail) time limit for the TLS handshake (10s under stress)"),
        _P("smtpd_tls_key_file", "$smtpd_tls_cert_file", parse_text, "server private key (PEM)"),
        _P("smtpd_tls_security_level", "", choice("", "none", "may", "encrypt"),
           "SMTP server TLS: may or encrypt"),
        _P("smtp_tls_security_level", "may", choice("", "none", "may", "encrypt", "verify", "secure"),
           "SMTP client TLS: may (opportunistic), encrypt, verify or secure (never in clear)"),
        _P("smtp_tls_CAfile", "", parse_text, "CA certificates for verifying servers (PEM)"),
    ]
}
del _P

# Postfix's bounds (the min/max columns of its parameter tables, e.g. smtpd.c),
# where they are more than "0 or more".  A time with a minimum of 1 second refuses
# only 0, since trimail takes fractions of a second.  virtual_minimum_uid keeps 0
# (Postfix: 1): uid 0 is refused by the virtual agent whatever it says; and
# smtp_connection_cache_time_limit = 0 turns the connection cache off (Postfix has
# smtp_connection_cache_on_demand for that).
LIMITS: dict[str, tuple[float, float | None]] = {
    **dict.fromkeys((
        "command_time_limit", "deliver_lock_attempts", "deliver_lock_delay", "stale_lock_time",
        "minimal_backoff_time", "maximal_backoff_time", "queue_run_delay", "qmgr_message_active_limit",
        "qmgr_message_recipient_limit", "default_process_limit", "initial_destination_concurrency",
        "smtp_initial_destination_concurrency", "relay_initial_destination_concurrency", "hopcount_limit",
        "smtpd_recipient_limit", "smtpd_timeout", "smtpd_hard_error_limit", "smtpd_junk_command_limit",
        "smtpd_soft_error_limit", "header_size_limit", "smtpd_recipient_overshoot_limit",
        "smtpd_policy_service_timeout", "address_verify_positive_expire_time",
        "address_verify_negative_expire_time", "address_verify_negative_refresh_time",
        "address_verify_poll_count", "address_verify_poll_delay", "smtp_helo_timeout", "smtp_mail_timeout",
        "smtp_rcpt_timeout", "smtp_data_init_timeout", "smtp_data_xfer_timeout", "smtp_data_done_timeout",
        "smtp_quit_timeout", "smtp_connection_reuse_time_limit",
    ), (1, None)),
    "line_length_limit": (512, None),
    "maximal_queue_lifetime": (0, 8640000),
    "bounce_queue_lifetime": (0, 8640000),
}
_WHOLE_NUMBERS = {parse_int, parse_count, parse_size}
for _name, _param in PARAMETERS.items():
    if _param.parse in _WHOLE_NUMBERS or _param.parse in TIME_UNIT:
        _low, _high = LIMITS.get(_name, (0, None))
        PARAMETERS[_name] = dataclasses.replace(_param, minimum=_low, maximum=_high)
del _name, _param, _low, _high


def _xdg_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path.home() / ".local" / "state") / "trimail"


def development_defaults() -> dict[str, str]:
    """The built-in configuration used when no main.cf exists: runs without root."""
    return {
        "smtpd_listen": "127.0.0.1:2525",
        "queue_directory": str(_xdg_state_dir()),
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "mail_owner": getpass.getuser(),
        "allow_root": "yes",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
    }


# ---------------------------------------------------------------------------
# the effective configuration

class Config:
    """An immutable effective configuration: raw settings over registry defaults."""

    def __init__(self, settings: Mapping[str, Setting], source: str, warnings: Iterable[str] = ()):
        self._settings = dict(settings)
        self.source = source
        self.path: Path | None = None  # the main.cf read, for reload
        self.overrides: list[str] = []  # the -o options given, for reload
        self.warnings = list(warnings)
        self._expanded: dict[str, str] = {}
        self._typed: dict[str, Any] = {}
        self._undefined: dict[str, None] = {}  # $names expanded that nothing defines, in order
        hostname = self._settings.get("myhostname")
        self._derived = {"myhostname": _derived_hostname()}
        self._derived["mydomain"] = _derived_domain(
            self._expand_text(hostname.value, ("myhostname",)) if hostname else self._derived["myhostname"]
        )
        self._expanded.clear()  # made while mydomain was not derived yet

    # -- raw and expanded text

    def is_set(self, name: str) -> bool:
        return name in self._settings

    def explicit_names(self) -> list[str]:
        return sorted(self._settings)

    def where(self, name: str) -> str:
        setting = self._settings.get(name)
        return setting.where if setting else "default"

    def is_defined(self, name: str) -> bool:
        """Set in main.cf or with -o, derived (myhostname, mydomain) or in the registry."""
        return name in self._settings or name in self._derived or name in PARAMETERS

    def raw(self, name: str) -> str:
        """The value as written (or the default), before ``$name`` expansion."""
        if name in self._settings:
            return self._settings[name].value
        if name in self._derived:
            return self._derived[name]
        param = PARAMETERS.get(name)
        return param.default if param else ""

    def expand(self, name: str) -> str:
        return self._expand_name(name, ())

    def _expand_name(self, name: str, stack: tuple[str, ...]) -> str:
        if name in self._expanded:  # a value does not depend on who refers to it
            return self._expanded[name]
        if name in stack:
            chain = " -> ".join((*stack, name))
            raise ConfigError(f"{self.where(stack[0])}: parameter {stack[0]}: expansion loop: {chain}")
        if len(stack) >= syntax.MAX_NESTING:
            raise ConfigError(f"{self.where(stack[0])}: parameter {stack[0]}: unreasonable macro call nesting: "
                              f"{' -> '.join(stack[:3])} -> ...")
        if not self.is_defined(name):
            self._undefined[name] = None
            return ""
        value = self._expand_text(self.raw(name), (*stack, name))
        self._expanded[name] = value
        return value

    def _expand_text(self, text: str, stack: tuple[str, ...]) -> str:
        """*text* (the value of ``stack[-1]``) expanded; a syntax error in it is fatal
        with that parameter's file and line."""
        if "$" not in text:
            return text
        try:
            return syntax.expand(text, lambda name: self._expand_name(name, stack))
        except syntax.MacroError as exc:
            raise ConfigError(f"{self.where(stack[-1])}: parameter {stack[-1]}: {exc}") from None

    # -- typed values

    def get(self, name: str) -> Any:
        if name not in self._typed:
            param = PARAMETERS.get(name)
            text = self.expand(name)
            if param is None:
                self._typed[name] = text
            else:
                try:
                    value = param.parse(text)
                except BadValue as exc:
                    raise ConfigError(f"{self.where(name)}: {exc.render(name)}") from None
                except ValueError as exc:
                    raise ConfigError(f"{self.where(name)}: parameter {name}: {exc}") from None
                self._check_bounds(param, value)
                self._typed[name] = value
        return self._typed[name]

    def _check_bounds(self, param: Param, value: Any) -> None:
        """Postfix's check_mail_conf_int/_long/_time, in its words."""
        where, name = self.where(param.name), param.name
        is_time = param.parse in TIME_UNIT
        low, high = param.minimum, param.maximum
        if low is not None and value < low and not (is_time and value > 0):
            raise ConfigError(f"{where}: invalid {name}: {_num(value)} (min {_num(low)})" if is_time
                              else f"{where}: invalid {name} parameter value {value} < {_num(low)}")
        if high is not None and value > high:
            raise ConfigError(f"{where}: invalid {name}: {_num(value)} (max {_num(high)})" if is_time
                              else f"{where}: invalid {name} parameter value {value} > {_num(high)}")

    __getitem__ = get

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in PARAMETERS:
            raise AttributeError(name)
        return self.get(name)

    def validate(self) -> None:
        """Expand and convert every parameter so bad values fail now, with file:line
        (the settings in file order first, so the first bad line is the one named)."""
        for name in [*self._settings, *PARAMETERS]:
            self.get(name)
        referenced: dict[str, Setting | None] = {}
        for setting in self._settings.values():
            for name in self._references(setting):
                referenced.setdefault(name, setting)
        for param in PARAMETERS.values():
            referenced.update((name, None) for name in syntax.references(param.default)
                              if name not in referenced)
        for name, setting in self._settings.items():
            if name not in PARAMETERS and name not in referenced:
                self.warnings.append(f"{setting.where}: unused parameter: {name}={setting.value}")
        # Postfix's postconf: a $name in any branch of any value that nothing defines
        undefined = [name for name, setting in referenced.items()
                     if setting is not None and not self.is_defined(name)]
        for name in dict.fromkeys([*undefined, *self._undefined]):  # in file order, each once
            self.warnings.append(f"{self._file_of(referenced.get(name))}: undefined parameter: {name}")

    def _references(self, setting: Setting) -> list[str]:
        try:
            return syntax.references(setting.value)
        except syntax.MacroError:
            return []  # a value that is used was expanded above and is fine; an unused one stays unused

    def _file_of(self, setting: Setting | None) -> str:
        """Where an undefined-parameter warning points: the file (Postfix names no
        line), or the -o option."""
        if setting is not None and setting.where.startswith("-o "):
            return setting.where
        return self.source

    def with_overrides(self, overrides: Mapping[str, str]) -> Config:
        settings = dict(self._settings)
        for name, value in overrides.items():
            settings[name] = Setting(value, f"-o {name}")
        config = Config(settings, self.source, self.warnings)
        config.path = self.path
        config.overrides = self.overrides
        return config


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Which main.cf to read: -c, then $TRIMAIL_CONFIG, then /etc/trimail/main.cf."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("TRIMAIL_CONFIG")
    if env:
        return Path(env)
    if DEFAULT_CONFIG_FILE.exists():
        return DEFAULT_CONFIG_FILE
    return None


def load(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (), *,
         text: str | None = None) -> Config:
    """Load and validate the effective configuration (raises ConfigError).  With
    *text*, that is main.cf's content as read by someone else (a worker in the jail
    gets it from the master), and *path* only names it."""
    chosen = config_path(path)
    if chosen is not None and text is not None:
        settings, warnings = parse_main_cf(text, str(chosen))
        source = str(chosen)
    elif chosen is None:
        settings = {k: Setting(v, "built-in development default") for k, v in development_defaults().items()}
        warnings: list[str] = []
        source = "built-in development default"
    else:
        try:
            text = chosen.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot read configuration: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{chosen}: not UTF-8 text: {exc.reason}") from None
        settings, warnings = parse_main_cf(text, str(chosen))
        source = str(chosen)
    for item in overrides:
        name, setting = parse_override(item)
        settings[name] = setting
    config = Config(settings, source, warnings)
    config.path = chosen
    config.overrides = list(overrides)
    config.validate()
    return config


def sample_main_cf() -> str:
    """An annotated main.cf: every parameter trimail knows, commented out at its default."""
    lines = [
        "# trimail main.cf -- every parameter with its default and a one-line explanation.",
        "# Syntax as Postfix: name = value; continuation lines start with white space;",
        "# $name expands another parameter when the value is used.  Generated by",
        "# `trimail config --sample` from the parameter registry (trimail/config/).",
        "",
    ]
    for param in PARAMETERS.values():
        lines.append(f"# {param.doc}")
        default = param.default or ("(derived from gethostname())" if param.name in ("myhostname", "mydomain")
                                    else "")
        lines.append(f"#{param.name} = {default}".rstrip())
        lines.append("")
    return "\n".join(lines)
