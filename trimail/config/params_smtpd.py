"""Parameters of the SMTP server (smtpd(8)): listeners, limits, stress, restriction
lists and their reply codes, address verification, TLS and AUTH.

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param, T
from trimail.config.values import (
    choice,
    parse_5xx,
    parse_bool,
    parse_int,
    parse_listen,
    parse_maps,
    parse_networks,
    parse_size,
    parse_text,
    parse_workers,
    register_kind,
    reply_code_parser,
    split_list,
    time_parser,
)
from trimail.queue.verifycache import parse_map as parse_verify_map

register_kind(parse_verify_map, "verification cache (btree:/path, a file, or empty)")

TITLE = "The SMTP server (smtpd(8))"

PARAMS: list[Param] = [
    # SMTP server
    T("smtpd_listen", "0.0.0.0:25, [::]:25", parse_listen,
       "addresses the SMTP listener binds, host:port"),
    T("submission_listen", "", parse_listen, "optional submission listener, host:port"),
    T("smtps_listen", "", parse_listen, "optional implicit-TLS listener, host:port"),
    T("metrics_listen", "", parse_listen, "optional Prometheus endpoint, host:port"),
    P("message_size_limit", "10240000", parse_size, "largest message accepted, in bytes"),
    P("line_length_limit", "2048", parse_int, "longest SMTP command line, in bytes"),
    P("smtpd_recipient_limit", "1000", parse_int, "most recipients per message"),
    P("smtpd_timeout", "${stress?{10}:{300}}s", time_parser(),
       "time limit for each read from an SMTP client (10s under stress)"),
    P("smtpd_per_record_deadline", "${stress?{yes}:{no}}", parse_bool,
       "smtpd_timeout limits the time to receive a whole command or content line, not each read "
       "(yes under stress: a client trickling a byte at a time is cut off)"),
    P("smtpd_hard_error_limit", "${stress?{1}:{20}}", parse_int,
       "errors after which the session is closed (1 under stress)"),
    P("smtpd_junk_command_limit", "${stress?{1}:{100}}", parse_int,
       "HELO, EHLO, NOOP, VRFY and RSET commands after which each one counts as an error (1 under stress)"),
    P("stress", "", parse_text,
       "set to yes by serve while the SMTP service is under stress; use as ${stress?{value}:{value}}"
       " (setting it in main.cf forces stress values everywhere)"),
    T("smtpd_stress_threshold", "80", parse_int,
       "stress mode starts when this percentage of smtpd_process_limit sessions are open"
       " and ends below half of that; open sessions then get the stress limits too (0: never)"),
    P("smtpd_soft_error_limit", "10", parse_int, "errors after which replies are delayed"),
    P("smtpd_error_sleep_time", "1s", time_parser(), "delay per reply once the soft limit is passed"),
    P("smtpd_forbid_bare_newline", "normalize", choice("normalize", "note", "yes", "reject", "no"),
       "bare <LF> from a client: normalize (yes, note and no are accepted as the same) stores it as"
       " <CR><LF>; reject refuses a command line with one (ending the session) or a message with one"
       " (after its real end). DATA ends only at <CR><LF>.<CR><LF>, even with no (unlike Postfix)"),
    P("smtpd_forbid_bare_newline_reject_code", "550", parse_5xx,
       "reply code for smtpd_forbid_bare_newline = reject (5XX; 521 also disconnects)"),
    P("smtpd_forbid_bare_newline_exclusions", "$mynetworks", parse_networks,
       "clients for which smtpd_forbid_bare_newline = reject acts as normalize"),
    P("cleanup_replace_stray_cr_lf", "yes", parse_bool,
       "replace each <CR> or <LF> in received message content that is not part of a <CR><LF> pair"
       " with a space, so no stray one is ever relayed (outbound SMTP smuggling)"),
    P("smtpd_forbidden_commands", "CONNECT GET POST regexp:{{/^[^A-Z]/ Bogus}}", split_list,
       "commands that end the session at once with 221 (HTTP proxies and browsers; a table entry matches "
       "the first word of an unknown command: Postfix's default, one not starting with a letter); "
       "a message header sent as a command always does"),
    P("smtpd_client_connection_count_limit", "50", parse_int,
       "most simultaneous sessions from one client address (0: no limit)"),
    T("smtpd_process_limit", "1000", parse_int, "most simultaneous SMTP sessions"),
    T("smtpd_workers", "auto", parse_workers,
       "smtpd worker processes under one master, each accepting on every listener"
       " (auto: one per core; 0: smtpd and qmgr in one process, as trimail.testing runs)"),
    P("master_service_disable", "", split_list,
       "services not to run: qmgr (keep mail queued, deliver nothing), smtpd"),
    T("smtpd_session_deadline", "3600s", time_parser(),
       "hard limit on a whole SMTP session, however busy the client is"),
    P("smtpd_client_connection_rate_limit", "0", parse_int,
       "most connections per client address per minute (0: no limit)"),
    T("smtpd_greet_pause", "0s", time_parser(),
       "wait this long before the banner; a client that talks first is refused"
       " (no pause under stress)"),
    P("header_size_limit", "102400", parse_size, "largest header section of a message"),
    P("maillog_file", "", parse_text, "mail log file (reopened after logrotate); syslog: to syslog; empty: stderr"),
    P("syslog_facility", "mail", parse_text, "syslog facility when maillog_file = syslog"),
    T("graceful_timeout", "10s", time_parser(),
       "on stop, how long open sessions may finish before 421, then SMTP deliveries in progress"),
    P("disable_vrfy_command", "no", parse_bool, "refuse VRFY (502) instead of answering 252"),
    P("smtputf8_enable", "yes", parse_bool, "announce and accept SMTPUTF8"),
    P("smtpd_discard_ehlo_keywords", "", split_list,
       "EHLO keywords not announced, case-insensitive (dsn: the DSN parameters are refused too; "
       "chunking: BDAT is answered 521 and ends the session; "
       "silent-discard: accepted and ignored, nothing here is logged)"),
    # restrictions (consulted by the policy layer)
    P("smtpd_client_restrictions", "", split_list, "restrictions at connect time"),
    P("smtpd_helo_restrictions", "", split_list, "restrictions on HELO/EHLO"),
    P("smtpd_sender_restrictions", "", split_list, "restrictions on MAIL FROM"),
    P("smtpd_relay_restrictions",
       "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", split_list,
       "relay control restrictions on RCPT TO"),
    P("smtpd_recipient_restrictions", "", split_list, "spam restrictions on RCPT TO"),
    P("smtpd_data_restrictions", "", split_list, "restrictions on DATA"),
    P("smtpd_end_of_data_restrictions", "", split_list, "restrictions after the end of DATA"),
    P("smtpd_etrn_restrictions", "", split_list, "restrictions on the ETRN command (and its site)"),
    P("smtpd_delay_reject", "yes", parse_bool, "apply client, HELO and sender restrictions at RCPT"),
    P("smtpd_helo_required", "no", parse_bool, "require HELO/EHLO before MAIL"),
    # trimail/peername.py: the verified client name, looked up at connect (bounded, cached)
    P("smtpd_peername_lookup", "yes", parse_bool,
       "look up the client's verified host name (reverse, then forward) for the log, Received: and replies"),
    P("smtpd_recipient_overshoot_limit", "1000", parse_int,
       "recipients past smtpd_recipient_limit counted as errors"),
    P("parent_domain_matches_subdomains",
       "debug_peer_list, fast_flush_domains, mynetworks, permit_mx_backup_networks, qmqpd_authorized_clients,"
       " relay_domains, smtpd_access_maps", split_list,
       "where a parent domain also matches its subdomains (else use .domain)"),
    P("allow_percent_hack", "no", parse_bool, "rewrite user%domain as user@domain (off here; Postfix's default is yes)"),
    P("swap_bangpath", "yes", parse_bool, "rewrite site!user as user@site"),
    P("resolve_dequoted_address", "yes", parse_bool,
       "resolve \"user@remote\"@local by its dequoted form (user@remote), as Postfix does"),
    P("resolve_null_domain", "no", parse_bool,
       "resolve user@ (an empty domain) as a local address instead of refusing it as invalid"),
    P("smtpd_policy_service_timeout", "100s", time_parser(), "time limit for a policy service answer"),
    P("smtpd_policy_service_default_action", "451 4.3.5 Server configuration problem", parse_text,
       "action when a policy service cannot be reached"),
    P("plaintext_reject_code", "450", reply_code_parser("45"), "reply code of reject_plaintext_session"),
    P("unknown_client_reject_code", "450", reply_code_parser("45"),
       "reply code of reject_unknown_client_hostname and reject_unknown_reverse_client_hostname when "
       "the lookup failed for good (a temporary failure is always 450)"),
    P("unknown_hostname_reject_code", "450", reply_code_parser("45"),
       "reply code of reject_unknown_helo_hostname when the name has no A, AAAA or MX record"),
    P("multi_recipient_bounce_reject_code", "550", reply_code_parser("45"),
       "reply code of reject_multi_recipient_bounce"),
    P("relay_clientcerts", "", parse_maps,
       "tables of client certificate fingerprints permit_tls_clientcerts accepts (client certificates "
       "are not requested yet, so nothing matches)"),
    P("address_verify_sender", "double-bounce", parse_text,
       "MAIL FROM of address verification probes (reject_unverified_recipient); unqualified gets "
       "@$myorigin, empty means the null sender"),
    P("address_verify_map", "btree:$queue_directory/verify_cache", parse_verify_map,
       "the address verification cache every smtpd worker shares, kept across restarts: a SQLite file "
       "(btree:/path/name is /path/name.db; or an absolute file name); empty: each process's memory"),
    P("address_verify_positive_expire_time", "31d", time_parser("d"),
       "how long a verified (deliverable) address stays in the verification cache"),
    P("address_verify_positive_refresh_time", "7d", time_parser("d"),
       "after this a deliverable answer is still used, but probed again in the background (a failed "
       "probe does not replace it)"),
    P("address_verify_negative_expire_time", "3d", time_parser("d"),
       "how long an undeliverable or temporarily failing address stays in the verification cache"),
    P("address_verify_negative_cache", "yes", parse_bool, "cache undeliverable addresses too"),
    P("address_verify_negative_refresh_time", "3h", time_parser("h"),
       "after this a failed answer (undeliverable, or the probe got a 4xx or no answer) is still used, "
       "but probed again in the background"),
    P("address_verify_cache_cleanup_interval", "12h", time_parser(),
       "time between runs that remove expired entries from the verification cache (0: never)"),
    P("address_verify_poll_count", "${stress?{1}:{3}}", parse_int,
       "how many times smtpd looks for a probe's answer before it replies 'verification in progress'"),
    P("address_verify_poll_delay", "3s", time_parser(), "the wait between two such looks"),
    T("address_verify_cache_size", "100000", parse_int,
       "addresses the verification cache holds (the oldest answers go first)"),
    P("unverified_recipient_reject_code", "450", reply_code_parser("45"),
       "reply code when a verification probe says the recipient is undeliverable"),
    P("unverified_recipient_defer_code", "450", reply_code_parser("45"),
       "reply code when a recipient could not be verified yet (probe deferred or still running)"),
    P("unverified_recipient_tempfail_action", "defer_if_permit", choice("defer_if_permit", "defer"),
       "what a temporary verification failure does: defer only if the rest would permit, or defer"),
    P("unverified_recipient_reject_reason", "", parse_text,
       "reply text instead of the probe's own reason (empty: the probe's reason)"),
    # TLS and AUTH
    P("smtpd_tls_cert_file", "", parse_text, "server certificate (PEM)"),
    P("smtpd_sasl_auth_enable", "no", parse_bool, "offer AUTH on smtpd_listen (always on submission)"),
    P("smtpd_tls_auth_only", "yes", parse_bool, "offer AUTH only under TLS (Postfix's default is no)"),
    T("smtpd_sasl_password_file", "$queue_directory/sasl_passwd", parse_text,
       "AUTH logins with salted scrypt hashes, managed by trimail passwd"),
    T("smtpd_auth_failure_limit", "5", parse_int,
       "failed AUTH attempts per client address in 10 minutes before AUTH is refused"),
    P("smtpd_sender_login_maps", "", parse_maps, "tables: sender address -> logins that may use it"),
    T("smtpd_tls_handshake_timeout", "${stress?{10}:{60}}s", time_parser(),
       "time limit for the TLS handshake (10s under stress)"),
    P("smtpd_tls_key_file", "$smtpd_tls_cert_file", parse_text, "server private key (PEM)"),
    P("smtpd_tls_security_level", "", choice("", "none", "may", "encrypt"),
       "SMTP server TLS: may or encrypt"),
]
