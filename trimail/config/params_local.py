"""Parameters of local delivery (local(8): aliases, mailboxes, commands and files),
virtual(8), the unlisted-recipient checks and address rewriting (cleanup(8):
qualification, masquerading).

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param, T
from trimail.config.values import (
    parse_bool,
    parse_domain_names,
    parse_int,
    parse_lock_methods,
    parse_maps,
    parse_reject_code,
    parse_text,
    split_list,
    time_parser,
)

TITLE = "Local delivery, virtual delivery and address rewriting (local(8), virtual(8), cleanup(8))"

PARAMS: list[Param] = [
    # local delivery and aliases
    P("alias_maps", "hash:/etc/aliases", parse_maps, "alias tables for local delivery"),
    P("alias_database", "hash:/etc/aliases", parse_maps, "alias tables newaliases rebuilds"),
    P("virtual_alias_maps", "", parse_maps, "address rewriting for any domain"),
    P("virtual_alias_domains", "", parse_domain_names,
       "domains whose users exist only in virtual_alias_maps (names; Postfix's default "
       "$virtual_alias_maps, tables in the list, is not supported)"),
    P("virtual_mailbox_domains", "", parse_domain_names,
       "domains delivered by virtual_transport to the mailboxes of virtual_mailbox_maps (names)"),
    P("virtual_mailbox_maps", "", parse_maps,
       "user@domain -> mailbox path under virtual_mailbox_base (ends in / for Maildir)"),
    P("virtual_transport", "virtual", parse_text, "transport for virtual_mailbox_domains"),
    P("virtual_mailbox_base", "", parse_text, "directory every virtual mailbox path is relative to"),
    P("virtual_uid_maps", "", parse_maps, "user@domain -> uid that owns the virtual mailbox (static:N)"),
    P("virtual_gid_maps", "", parse_maps, "user@domain -> gid of the virtual mailbox (static:N)"),
    P("virtual_minimum_uid", "100", parse_int, "lowest uid virtual delivery accepts from virtual_uid_maps"),
    P("smtpd_reject_unlisted_recipient", "yes", parse_bool,
       "refuse at RCPT a recipient of a local, virtual or relay domain that its class's table does "
       "not list, after the recipient restrictions (as reject_unlisted_recipient)"),
    P("unknown_local_recipient_reject_code", "550", parse_reject_code,
       "reply code for a user local_recipient_maps does not list"),
    P("unknown_virtual_alias_reject_code", "550", parse_reject_code,
       "reply code for a user of a virtual alias domain virtual_alias_maps does not list"),
    P("unknown_virtual_mailbox_reject_code", "550", parse_reject_code,
       "reply code for a user of a virtual mailbox domain virtual_mailbox_maps does not list"),
    P("unknown_relay_recipient_reject_code", "550", parse_reject_code,
       "reply code for a user of a relay domain relay_recipient_maps does not list"),
    P("local_recipient_maps", "proxy:unix:passwd.byname $alias_maps", split_list,
       "tables of known local recipients (empty: accept any)"),
    P("recipient_delimiter", "", parse_text, "separator of address extensions, e.g. + for user+tag"),
    P("mail_spool_directory", "$queue_directory/mailboxes", parse_text, "where local mail homes live"),
    P("home_mailbox", "Maildir/", parse_text, "mailbox relative to the mail home; ends in / for Maildir"),
    P("append_at_myorigin", "yes", parse_bool, "qualify bare local submissions with @$myorigin"),
    P("append_dot_mydomain", "no", parse_bool, "qualify user@host as user@host.$mydomain"),
    P("allow_mail_to_commands", "", split_list,
       "where |command targets may come from: alias, include (empty: nowhere)"),
    P("allow_mail_to_files", "alias, include", split_list, "where /file targets may come from"),
    P("command_time_limit", "1000s", time_parser(), "time limit for delivery to a command"),
    P("default_privs", "nobody", parse_text, "the unprivileged account local delivery uses for |command and "
       "/file targets from the alias table (never root, never mail_owner); those from an :include: file "
       "run as the file's owner (a serve running as mail_owner has them run by its root helper)"),
    P("local_destination_concurrency_limit", "2", parse_int, "parallel local deliveries"),
    P("mailbox_delivery_lock", "fcntl, dotlock", parse_lock_methods,
       "how an mbox file is locked for delivery: fcntl, flock and/or dotlock (FILE.lock)"),
    P("deliver_lock_attempts", "20", parse_int,
       "attempts to lock an mbox file (and to create its dotlock) before the delivery is deferred"),
    P("deliver_lock_delay", "1s", time_parser(), "time between attempts to lock an mbox file"),
    P("stale_lock_time", "500s", time_parser(), "age after which a dotlock file is removed as stale"),
    T("table_lookup_timeout", "20s", time_parser(),
       "time limit for a lookup that may block (a file reload, hash:, unix:passwd.byname); "
       "a lookup that takes longer is a temporary failure (451 4.3.0)"),
    P("masquerade_domains", "", split_list, "domains to strip subdomains from"),
    P("masquerade_exceptions", "", split_list, "local parts exempt from masquerading"),
    P("masquerade_classes", "envelope_sender, header_sender, header_recipient", split_list,
       "which addresses masquerading rewrites"),
    P("local_header_rewrite_clients", "permit_inet_interfaces", split_list,
       "clients whose mail has its header addresses rewritten and masqueraded as local mail: "
       "permit_inet_interfaces, permit_mynetworks, permit_sasl_authenticated, permit_tls_clientcerts, "
       "permit_tls_all_clientcerts, check_address_map type:table (or type:table alone)"),
    P("remote_header_rewrite_domain", "", parse_text,
       "when set, the header addresses of other clients' mail are rewritten too (incomplete ones "
       "completed with this domain) and masqueraded; empty: left as they came"),
]
