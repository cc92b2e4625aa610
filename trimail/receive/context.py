"""What every SMTP session of one listener shares: the protocol settings made from
main.cf (``trimail.receive.protocol``; master.cf's submission/smtps defaults, or
reinject_overrides for the content filter's way back, make the listener's
configuration here), the policy, the recipient tables, the queue writer
and the scheduler to hand mail to.  receive_override_options (Postfix's
input_transp flags) are kept here for whoever honours them: the unknown-recipient
checks and virtual alias expansion here, masquerading at delivery (through the
message's params), the milters (``no_milters``).

Parameters: myhostname, mail_name, smtpd_banner, message_size_limit,
line_length_limit, smtpd_recipient_limit, smtpd_hard_error_limit,
smtpd_forbid_bare_newline, smtpd_forbid_bare_newline_reject_code,
cleanup_replace_stray_cr_lf, smtpd_forbidden_commands, smtpd_delay_reject,
smtpd_client_restrictions, smtputf8_enable, disable_vrfy_command, fast_flush_domains,
smtpd_helo_required, smtpd_tls_cert_file, smtpd_tls_security_level, smtpd_tls_auth_only,
smtpd_sasl_auth_enable, smtpd_sasl_password_file, smtpd_auth_failure_limit,
smtpd_tls_handshake_timeout, smtpd_reject_unlisted_recipient, hopcount_limit, duplicate_filter_limit,
header_size_limit, queue_directory, queue_minfree, table_lookup_timeout, smtpd_milters,
parent_domain_matches_subdomains, dns_nameservers, content_filter, receive_override_options
(the milters' switch among them), reinject_overrides, and trimail/authcheck/inbound.py's.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from trimail import rewrite
from trimail.anvil import AuthFailures
from trimail.authcheck.inbound import AuthChecks
from trimail.cleanup.checks import content_checks
from trimail.cleanup.rewrite import virtual_expand
from trimail.config import Config, ConfigError
from trimail.config.registry import PARAMETERS, suggest
from trimail.maps import Table, off_loop
from trimail.metrics import Metrics
from trimail.net.dns import Resolver
from trimail.net.tls import server_tls_context
from trimail.passwords import PasswordError, prepare
from trimail.policy.restrictions import Policy
from trimail.queue.space import QueueSpace, unused_bytes
from trimail.queue.writer import QueueWriter
from trimail.receive.milters import SmtpdMilters
from trimail.receive.protocol import PROTOCOL_TEXTS, _reads_no_file, milters_of, protocol_settings
from trimail.rewrite import Resolved
from trimail.unlisted import RecipientTables, Unlisted

if TYPE_CHECKING:
    from trimail.receive.hooks import SessionHooks
    from trimail.receive.session import SmtpdSession
    from trimail.scheduler import Scheduler


def listener_config(config: Config, kind: str) -> Config:
    """The parameters of one listener kind: main.cf's with master.cf's defaults of
    the service (submission, smtps) or, for the content filter's way back
    (reinject_listen), ``content_filter`` empty and ``reinject_overrides`` (master.cf's
    ``-o``).  An override that names no parameter, or a bad value, is a ConfigError."""
    if kind in ("submission", "smtps"):
        # Postfix's master.cf submission defaults: TLS first, and only logins may send
        return config.with_overrides({
            "smtpd_tls_security_level": "encrypt" if kind == "submission" else "may",
            "smtpd_client_restrictions": "permit_sasl_authenticated, reject",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject",
            # the client list above needs AUTH first: never at connect (smtpd_delay_reject = no)
            "smtpd_delay_reject": "yes",
        })
    if kind != "reinject":
        return config
    overrides: dict[str, str] = config.reinject_overrides
    for name in overrides:
        if name not in PARAMETERS:  # a typo such as content_filer= would send mail round in a loop
            raise ConfigError(f"{config.where('reinject_overrides')}: reinject_overrides: unknown parameter "
                              f"{name}{suggest(name)}")
        if name in ("reinject_listen", "reinject_overrides"):
            raise ConfigError(f"{config.where('reinject_overrides')}: reinject_overrides: {name} cannot be "
                              "overridden for the listener it makes")
    listener = config.with_overrides({"content_filter": "", **overrides},
                                     origin=f"{config.where('reinject_overrides')}: reinject_overrides")
    for name in overrides:
        listener.get(name)  # a bad value fails now, at start or reload, naming the override
    return listener


class ReceiveContext:
    """What every session of one serve shares: configuration and the queue writer."""

    def __init__(self, config: Config, writer: QueueWriter, scheduler: Scheduler | None = None,
                 resolver: Resolver | None = None, kind: str = "smtp",
                 auth_failures: AuthFailures | None = None) -> None:
        config = listener_config(config, kind)
        self.kind = kind
        self.config = config
        # Postfix's input_transp flags: what this listener leaves out (receive_override_options);
        # "no_milters" in it means smtpd_milters are not run for its mail
        self.receive_override_options: frozenset[str] = config.receive_override_options
        self.content_filter: str = config.content_filter  # stored with each message (route.FILTER_PARAM)
        self.writer = writer
        self.scheduler = scheduler  # woken for new mail, or takes it straight into active when it has room
        self.tls_context = server_tls_context(config) if config.smtpd_tls_cert_file else None
        self.password_file: str = config.smtpd_sasl_password_file
        self.auth_failure_limit: int = config.smtpd_auth_failure_limit
        self.tls_handshake_timeout: float = config.smtpd_tls_handshake_timeout
        self.hooks: SessionHooks | None = None
        self.metrics: Metrics | None = None
        self.auth_failures = auth_failures if auth_failures is not None else AuthFailures()
        self.policy = Policy(config, resolver or Resolver(config.dns_nameservers))
        self.authcheck = AuthChecks(config, self.policy.resolver)  # SPF, DKIM, DMARC; DKIM signing
        self.recipients = RecipientTables(config)
        this = weakref.ref(self)  # the policy it owns holds it weakly: no cycle outlives a stopped serve

        async def unlisted(recipient: str) -> Unlisted | None:
            context = this()
            return None if context is None else await context.unlisted(recipient)

        self.policy.unlisted = unlisted
        self.reject_unlisted_recipient: bool = config.smtpd_reject_unlisted_recipient
        self.fast_flush_domains = frozenset(d.lower().rstrip(".") for d in config.fast_flush_domains)
        self.fast_flush_subdomains = "fast_flush_domains" in config.parent_domain_matches_subdomains
        self.settings = (config.memo(f"protocol_settings {kind}", lambda: protocol_settings(config, kind),
                                     keeps=PROTOCOL_TEXTS)
                         if _reads_no_file(config) else protocol_settings(config, kind))
        if self.settings.auth:
            try:  # the dummy hash for unknown users, made now rather than at the first one
                prepare(self.password_file)
            except PasswordError:
                pass  # each AUTH attempt reports it
        self.hostname: str = config.myhostname
        self.mail_name: str = config.mail_name
        self.hopcount_limit: int = config.hopcount_limit
        self.duplicate_filter_limit: int = config.duplicate_filter_limit
        self.header_size_limit: int = config.header_size_limit
        self.spool_directory: str = config.queue_directory
        self.queue_space = QueueSpace(self.spool_directory, config.queue_minfree, config.message_size_limit,
                                      unused=lambda: writer.read(unused_bytes))
        self.lookup_timeout: float = config.table_lookup_timeout
        self.milter_names: list[str] = milters_of(config)
        self.content_checks = content_checks(config)  # header_checks, body_checks (None: none set)

    def session_milters(self, session: SmtpdSession) -> SmtpdMilters:
        """smtpd_milters for one session (trimail/receive/milters.py)."""
        return SmtpdMilters(session, self.milter_names)

    def virtual_tables(self) -> list[Table]:
        return self.recipients.tables("virtual_alias_maps")

    async def unlisted(self, recipient: str, resolved: Resolved | None = None) -> Unlisted | None:
        """Whether the table of *recipient*'s address class lacks it (``trimail/unlisted.py``:
        local_recipient_maps, virtual_alias_maps, virtual_mailbox_maps, relay_recipient_maps),
        read off the event loop within table_lookup_timeout; TableError when a table cannot answer.
        Never with receive_override_options = no_unknown_recipient_checks (Postfix: neither
        smtpd_reject_unlisted_recipient nor reject_unlisted_recipient/sender then)."""
        if "no_unknown_recipient_checks" in self.receive_override_options:
            return None
        resolved = resolved or rewrite.resolve(recipient, self.policy.rewrite)
        if resolved.klass == "invalid":
            return None
        return await self.recipients.unlisted(resolved)

    async def expand_virtual(self, recipients: list[str]) -> list[str]:
        """virtual_alias_maps applied to *recipients*, off the event loop when a table
        may block (TableError, ValueError as virtual_expand); nothing with
        receive_override_options = no_address_mappings."""
        if "no_address_mappings" in self.receive_override_options:
            return recipients
        tables = self.virtual_tables()
        return await off_loop(tables, virtual_expand, recipients, tables, timeout=self.lookup_timeout)

    async def expand_virtual_each(self, recipients: list[str]) -> list[list[str]]:
        """``expand_virtual`` of each of *recipients* on its own, in one lookup request
        (one hand-over to a lookup thread, not one per recipient)."""
        if "no_address_mappings" in self.receive_override_options:
            return [[recipient] for recipient in recipients]
        tables = self.virtual_tables()
        return await off_loop(tables, _expand_each, recipients, tables, timeout=self.lookup_timeout)


def _expand_each(recipients: list[str], tables: list[Table]) -> list[list[str]]:
    return [virtual_expand([recipient], tables) for recipient in recipients]
