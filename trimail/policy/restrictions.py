"""Restriction lists with Postfix's vocabulary (smtpd_*_restrictions).

``Policy.check(stage, request)`` evaluates, for a stage, the lists Postfix would:
with ``smtpd_delay_reject = yes`` (default) the client, HELO and sender lists run
at RCPT time together with the relay and recipient lists; ``data`` and
``end_of_data`` run at DATA and at the final dot.  Within a list the first
``permit``-like result ends that list and evaluation goes on with the next list;
the first reject or defer ends everything and becomes the reply; the end of a
list is "dunno".  Access-table actions (HOLD, DISCARD, REDIRECT, PREPEND, WARN)
are collected in the verdict and evaluation goes on.

Reply texts and codes are Postfix's: ``554 5.7.1 <x@y>: Relay access denied``,
``450 4.1.8 <s@d>: Sender address rejected: Domain not found``, ...  DNS answers
are cached per session; a temporary DNS failure always gives a 4xx.

Closed relay: ``reject_unauth_destination``/``defer_unauth_destination`` decide on
the one resolution of the address (``trimail/rewrite.py``, Postfix's
trivial-rewrite), the same one smtpd stores and the router routes: only a local
or relay class is authorized, and an invalid address never is (smtpd refuses it
with ``501 5.1.3`` before the restrictions run).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable

from trimail import rewrite
from trimail.config import Config, ConfigError
from trimail.delivery.dns import DnsError, DnsTemporary, Resolver
from trimail.log import printable
from trimail.maps import Table, TableError, off_loop, open_table
from trimail.policy.access import AccessResult, address_keys, client_keys, parse_result
from trimail.policy.delegation import PolicyServiceError, ask_policy_service
from trimail.smtp.replies import Reply

log = logging.getLogger("trimail.smtpd")

STAGE_LISTS = {
    "client": ["smtpd_client_restrictions"],
    "helo": ["smtpd_helo_restrictions"],
    "sender": ["smtpd_sender_restrictions"],
    "recipient": ["smtpd_relay_restrictions", "smtpd_recipient_restrictions"],
    "data": ["smtpd_data_restrictions"],
    "end_of_data": ["smtpd_end_of_data_restrictions"],
}
DELAYED = ["smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions"]

TAKES_ARGUMENT = {
    "check_client_access", "check_reverse_client_hostname_access", "check_helo_access",
    "check_sender_access", "check_recipient_access", "reject_rbl_client", "reject_rhsbl_sender",
    "reject_rhsbl_helo", "reject_rhsbl_client", "reject_rhsbl_recipient", "check_policy_service",
    "permit_dnswl_client",
}
SIMPLE = {
    "permit", "reject", "defer", "defer_if_permit", "defer_if_reject", "warn_if_reject",
    "permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination",
    "defer_unauth_destination", "permit_auth_destination", "reject_unauth_pipelining",
    "reject_unknown_sender_domain", "reject_unknown_recipient_domain", "reject_non_fqdn_sender",
    "reject_non_fqdn_recipient", "reject_non_fqdn_helo_hostname", "reject_invalid_helo_hostname",
    "reject_unknown_helo_hostname", "reject_unknown_client_hostname",
    "reject_unknown_reverse_client_hostname", "reject_unlisted_recipient", "reject_unlisted_sender",
    "reject_multi_recipient_bounce", "permit_inet_interfaces", "reject_plaintext_session",
    "reject_sender_login_mismatch", "permit_tls_clientcerts", "sleep",
}

SUBJECT_TEXT = {
    "client": "Client host rejected",
    "helo": "Helo command rejected",
    "sender": "Sender address rejected",
    "recipient": "Recipient address rejected",
    "data": "Data command rejected",
    "end_of_data": "End-of-data rejected",
}


class Permit:
    """The list ends with a positive answer."""


PERMIT = Permit()
DUNNO = None


@dataclasses.dataclass(slots=True)
class Request:
    """What the restrictions may look at; one per check, sharing the session cache."""

    client_address: str
    client_name: str
    helo: str
    protocol: str
    sender: str | None = None
    recipient: str | None = None
    queue_id: str = ""
    recipient_count: int = 0
    size: int = 0
    pipelined: bool = False
    sasl_username: str = ""
    cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Verdict:
    reply: Reply | None = None  # None: accept
    hold: str | None = None
    discard: str | None = None
    redirect: str | None = None
    prepend: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


class RestrictionError(Exception):
    """A restriction list that cannot be used (unknown name, missing argument)."""


def parse_list(tokens: list[str], where: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    items = list(tokens)
    while items:
        name = items.pop(0)
        lowered = name.lower()
        if lowered in TAKES_ARGUMENT:
            if not items:
                raise RestrictionError(f"{where}: {name} needs an argument")
            out.append((lowered, items.pop(0)))
        elif lowered in SIMPLE:
            out.append((lowered, None))
        else:
            raise RestrictionError(f"{where}: unknown restriction {name!r}")
    return out


def restriction_lists(config: Config) -> dict[str, list[tuple[str, str | None]]]:
    """Every smtpd_*_restrictions list parsed; a bad one is a ConfigError with file:line."""
    lists = {}
    for names in STAGE_LISTS.values():
        for name in names:
            try:
                lists[name] = parse_list(config.get(name), name)
            except RestrictionError as exc:
                raise ConfigError(f"{config.where(name)}: {exc}") from None
    return lists


class Policy:
    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self.lists = restriction_lists(config)
        self.delay_reject: bool = config.smtpd_delay_reject
        self.mynetworks = config.mynetworks
        self._mynetworks_cache: dict[str, bool] = {}
        self.relay_domains = {d.lower() for d in config.relay_domains}
        self.parent_matches = set(config.parent_domain_matches_subdomains)
        self.rewrite = rewrite.Settings.from_config(config)
        self.myorigin: str = config.myorigin
        self.policy_timeout: float = config.smtpd_policy_service_timeout
        self.policy_default: str = config.smtpd_policy_service_default_action
        self._tables: dict[str, Table] = {}
        self.lookup_timeout: float = config.table_lookup_timeout
        self.unlisted: Callable[[str], Awaitable[object]] = _never_unlisted  # an Unlisted or None

    def table(self, ref: str) -> Table:
        """The table *ref*, opened once; lazily, so opening it here reads nothing."""
        if ref not in self._tables:
            self._tables[ref] = open_table(ref, lazy=True)
        return self._tables[ref]

    async def _lookup(self, table: Table, keys: list[str]) -> str | None:
        """The value of the first of *keys* in *table*, off the event loop when the
        table may block (TableError when it fails or table_lookup_timeout passes)."""
        return await off_loop([table], _first_key, table, keys, timeout=self.lookup_timeout)

    # -- entry points ---------------------------------------------------------

    def lists_for(self, stage: str) -> list[str]:
        """The lists to run at *stage*.  With smtpd_delay_reject the client, HELO and
        sender lists wait for RCPT; without it the client list runs with HELO."""
        if self.delay_reject:
            if stage == "recipient":
                return [*DELAYED, *STAGE_LISTS["recipient"]]
            if stage in ("client", "helo", "sender"):
                return []
        elif stage == "helo":
            return [*STAGE_LISTS["client"], *STAGE_LISTS["helo"]]
        return STAGE_LISTS[stage]

    async def check(self, stage: str, request: Request) -> Verdict:
        verdict = Verdict()
        for name in self.lists_for(stage):
            kind = name.removeprefix("smtpd_").removesuffix("_restrictions")
            if kind == "relay":
                kind = "recipient"
            result = await self._run(self.lists[name], request, kind, verdict)
            if isinstance(result, Reply):
                verdict.reply = result
                return verdict
        return verdict

    # -- evaluation -------------------------------------------------------------

    async def _run(self, items: list[tuple[str, str | None]], request: Request, kind: str,
                   verdict: Verdict) -> Permit | Reply | None:
        for name, argument in items:
            result = await self._apply(name, argument, request, kind, verdict)
            if result is not DUNNO:
                return result
        return DUNNO

    async def _apply(self, name: str, argument: str | None, req: Request, kind: str,
                     verdict: Verdict) -> Permit | Reply | None:
        handler = getattr(self, "_r_" + name, None)
        if handler is not None:
            return await handler(req, kind, argument, verdict)
        return DUNNO  # known to the parser but without effect here (e.g. no SASL, no TLS yet)

    def _reply(self, code: int, enhanced: str, kind: str, req: Request, text: str) -> Reply:
        return Reply(code, enhanced, f"{self._subject(kind, req)}: {SUBJECT_TEXT[kind]}: {text}")

    @staticmethod
    def _subject(kind: str, req: Request) -> str:
        if kind == "client":
            return f"<{req.client_name}[{req.client_address}]>"
        if kind == "helo":
            return f"<{req.helo}>"
        if kind == "sender":
            return f"<{req.sender or ''}>"
        if kind == "recipient":
            return f"<{req.recipient or ''}>"
        return "<DATA>" if kind == "data" else "<END-OF-MESSAGE>"

    # generic
    async def _r_permit(self, req, kind, arg, verdict):
        return PERMIT

    async def _r_reject(self, req, kind, arg, verdict):
        return self._reply(554, "5.7.1", kind, req, "Access denied")

    async def _r_defer(self, req, kind, arg, verdict):
        return self._reply(450, "4.7.1", kind, req, "Access denied")

    _r_defer_if_permit = _r_defer

    async def _r_permit_mynetworks(self, req, kind, arg, verdict):
        return PERMIT if self.in_mynetworks(req.client_address) else DUNNO

    def in_mynetworks(self, address: str) -> bool:
        known = self._mynetworks_cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            known = any(ip.version == n.version and ip in n for n in self.mynetworks)
            if len(self._mynetworks_cache) > 10_000:  # bounded: forget everything now and then
                self._mynetworks_cache.clear()
            self._mynetworks_cache[address] = known
        return known

    async def _r_permit_sasl_authenticated(self, req, kind, arg, verdict):
        return PERMIT if req.sasl_username else DUNNO

    # relay control
    def resolve(self, address: str) -> rewrite.Resolved:
        """Where mail for *address* goes: the one resolver (``trimail/rewrite.py``)."""
        return rewrite.resolve(address, self.rewrite)

    def authorized_destination(self, address: str) -> bool:
        """Local or a domain we relay for; an invalid address never is."""
        return self.resolve(address).klass in rewrite.AUTHORIZED

    async def _r_reject_unauth_destination(self, req, kind, arg, verdict):
        if req.recipient is None or self.authorized_destination(req.recipient):
            return DUNNO
        return Reply(554, "5.7.1", f"<{req.recipient}>: Relay access denied")

    async def _r_defer_unauth_destination(self, req, kind, arg, verdict):
        if req.recipient is None or self.authorized_destination(req.recipient):
            return DUNNO
        return Reply(450, "4.7.1", f"<{req.recipient}>: Relay access denied")

    async def _r_permit_auth_destination(self, req, kind, arg, verdict):
        if req.recipient is not None and self.authorized_destination(req.recipient):
            return PERMIT
        return DUNNO

    async def _r_reject_unauth_pipelining(self, req, kind, arg, verdict):
        if req.pipelined:
            return Reply(503, "5.5.0", "Error: improper use of SMTP command pipelining")
        return DUNNO

    # address syntax
    async def _r_reject_non_fqdn_sender(self, req, kind, arg, verdict):
        if req.sender and not _fqdn(req.sender.rpartition("@")[2]):
            return self._reply(504, "5.5.2", "sender", req, "need fully-qualified address")
        return DUNNO

    async def _r_reject_non_fqdn_recipient(self, req, kind, arg, verdict):
        if req.recipient and not _fqdn(req.recipient.rpartition("@")[2]):
            return self._reply(504, "5.5.2", "recipient", req, "need fully-qualified address")
        return DUNNO

    async def _r_reject_non_fqdn_helo_hostname(self, req, kind, arg, verdict):
        if req.helo and not _address_literal(req.helo) and not _fqdn(req.helo):
            return self._reply(504, "5.5.2", "helo", req, "need fully-qualified hostname")
        return DUNNO

    async def _r_reject_invalid_helo_hostname(self, req, kind, arg, verdict):
        if req.helo and not (_address_literal(req.helo) or _hostname(req.helo)):
            return self._reply(501, "5.5.2", "helo", req, "Invalid name")
        return DUNNO

    # DNS
    async def _domain_state(self, req: Request, domain: str) -> str:
        """"ok", "missing" or "temp" for a mail domain (MX, else A/AAAA); cached per session."""
        key = ("domain", domain)
        if key not in req.cache:
            try:
                mx = await self.resolver.lookup(domain, "MX")
                if mx is None:
                    state = "missing"
                elif mx:
                    state = "ok"
                else:
                    state = "ok" if (await self.resolver.lookup(domain, "A") or
                                     await self.resolver.lookup(domain, "AAAA")) else "missing"
            except DnsError:
                state = "temp"
            req.cache[key] = state
        return req.cache[key]

    async def _r_reject_unknown_sender_domain(self, req, kind, arg, verdict):
        domain = (req.sender or "").rpartition("@")[2].lower().rstrip(".")
        if not req.sender or not domain or domain in self.rewrite.local_domains or domain.startswith("["):
            return DUNNO
        state = await self._domain_state(req, domain)
        if state == "missing":
            return self._reply(450, "4.1.8", "sender", req, "Domain not found")
        if state == "temp":
            return self._reply(450, "4.1.8", "sender", req, "Domain not found (temporary DNS failure)")
        return DUNNO

    async def _r_reject_unknown_recipient_domain(self, req, kind, arg, verdict):
        domain = (req.recipient or "").rpartition("@")[2].lower().rstrip(".")
        if not domain or domain in self.rewrite.local_domains or domain.startswith("["):
            return DUNNO
        state = await self._domain_state(req, domain)
        if state == "missing":
            return self._reply(450, "4.1.2", "recipient", req, "Domain not found")
        if state == "temp":
            return self._reply(450, "4.1.2", "recipient", req, "Domain not found (temporary DNS failure)")
        return DUNNO

    async def _reverse_names(self, req: Request) -> list[str] | None | str:
        key = ("ptr", req.client_address)
        if key not in req.cache:
            try:
                req.cache[key] = await self.resolver.reverse(req.client_address)
            except DnsTemporary:
                req.cache[key] = "temp"
        return req.cache[key]

    async def client_hostname(self, req: Request) -> str | None:
        """The forward-confirmed name of the client, or None."""
        key = ("fcrdns", req.client_address)
        if key not in req.cache:
            names = await self._reverse_names(req)
            confirmed = None
            if isinstance(names, list):
                for name in names:
                    try:
                        if req.client_address in await self.resolver.addresses(name):
                            confirmed = name
                            break
                    except DnsError:
                        continue
            req.cache[key] = confirmed
        return req.cache[key]

    async def _r_reject_unknown_reverse_client_hostname(self, req, kind, arg, verdict):
        names = await self._reverse_names(req)
        if names == "temp" or not names:
            return Reply(450, "4.7.1", f"Client host rejected: cannot find your reverse hostname, "
                                       f"[{req.client_address}]")
        return DUNNO

    async def _r_reject_unknown_client_hostname(self, req, kind, arg, verdict):
        if await self.client_hostname(req) is None:
            return Reply(450, "4.7.1", f"Client host rejected: cannot find your hostname, [{req.client_address}]")
        return DUNNO

    async def _listed(self, req: Request, name: str, zone_arg: str) -> tuple[bool, str] | None:
        """(listed, TXT) for *name* in the DNS list ``zone[=a.b.c.d]``; None on trouble."""
        zone, _, wanted = zone_arg.partition("=")
        key = ("dnsbl", name, zone_arg)
        if key not in req.cache:
            try:
                records = await self.resolver.lookup(f"{name}.{zone}", "A")
            except DnsError:
                req.cache[key] = None
                return None
            hits = [r for r in (records or []) if not wanted or _matches_filter(r, wanted)]
            text = ""
            if hits:
                try:
                    # the list's own words go into our reply and the log: printable, bounded
                    text = printable(" ".join(await self.resolver.lookup(f"{name}.{zone}", "TXT") or []), 200)
                except DnsError:
                    pass
            req.cache[key] = (bool(hits), text)
        return req.cache[key]

    async def _rbl_reply(self, req: Request, what: str, value: str, name: str, zone: str) -> Reply | None:
        listed = await self._listed(req, name, zone)
        if not listed or not listed[0]:
            return DUNNO
        text = f"Service unavailable; {what} [{value}] blocked using {zone.partition('=')[0]}"
        if listed[1]:
            text += f"; {listed[1]}"
        return Reply(554, "5.7.1", text)

    async def _r_reject_rbl_client(self, req, kind, arg, verdict):
        try:
            ip = ipaddress.ip_address(req.client_address)
        except ValueError:
            return DUNNO
        reversed_name = ".".join(reversed(str(ip).split("."))) if ip.version == 4 else \
            ".".join(reversed(ip.exploded.replace(":", "")))
        return await self._rbl_reply(req, "Client host", req.client_address, reversed_name, arg)

    async def _r_reject_rhsbl_sender(self, req, kind, arg, verdict):
        domain = (req.sender or "").rpartition("@")[2].lower()
        return await self._rbl_reply(req, "Sender address", req.sender, domain, arg) if domain else DUNNO

    async def _r_reject_rhsbl_recipient(self, req, kind, arg, verdict):
        domain = (req.recipient or "").rpartition("@")[2].lower()
        return await self._rbl_reply(req, "Recipient address", req.recipient, domain, arg) if domain else DUNNO

    async def _r_reject_rhsbl_helo(self, req, kind, arg, verdict):
        if not req.helo or _address_literal(req.helo):
            return DUNNO
        return await self._rbl_reply(req, "Helo command", req.helo, req.helo.lower(), arg)

    async def _r_reject_rhsbl_client(self, req, kind, arg, verdict):
        name = await self.client_hostname(req)
        return await self._rbl_reply(req, "Client host", name, name, arg) if name else DUNNO

    # local recipients
    async def _r_reject_unlisted_recipient(self, req, kind, arg, verdict):
        return await self._unlisted(req, "recipient", req.recipient, "5.1.1")

    async def _r_reject_unlisted_sender(self, req, kind, arg, verdict):
        return await self._unlisted(req, "sender", req.sender, "5.1.0")

    async def _unlisted(self, req: Request, kind: str, address: str | None, dsn: str) -> Reply | None:
        if not address:
            return DUNNO
        try:
            unknown = await self.unlisted(address)
        except (TableError, ValueError) as exc:
            log.warning("%s: %s lookup failed: %s", req.queue_id or "NOQUEUE", kind, exc)
            return self._reply(451, "4.3.0", kind, req, "Temporary lookup failure")
        if unknown:  # an Unlisted (trimail/unlisted.py): its class's table and reject code
            return self._reply(unknown.code, f"{unknown.code // 100}{dsn[1:]}", kind, req,
                               f"User unknown in {unknown.table} table")
        return DUNNO

    # SASL
    async def _r_reject_sender_login_mismatch(self, req, kind, arg, verdict):
        """smtpd_sender_login_maps: who may use a sender address (Postfix's rules)."""
        if not req.sender:
            return DUNNO
        owners: list[str] = []
        keys = [req.sender.lower(), "@" + req.sender.rpartition("@")[2].lower()]
        try:
            for ref in self.config.smtpd_sender_login_maps:
                value = await self._lookup(self.table(ref), keys)
                if value:
                    owners = [o.strip().lower() for o in re.split(r"[,\s]+", value) if o.strip()]
                    break
        except TableError as exc:
            log.warning("smtpd_sender_login_maps: %s", exc)
            return self._reply(451, "4.3.0", "sender", req, "Temporary lookup failure")
        if req.sasl_username:
            if req.sasl_username.lower() not in owners:
                return self._reply(553, "5.7.1", "sender", req, f"not owned by user {req.sasl_username}")
        elif owners:
            return self._reply(553, "5.7.1", "sender", req, "not logged in")
        return DUNNO

    # access tables
    async def _access(self, req: Request, kind: str, ref: str, keys: list[str],
                      verdict: Verdict, depth: int = 0) -> Permit | Reply | None:
        try:
            value = await self._lookup(self.table(ref), keys)
        except TableError as exc:
            log.warning("access table %s: %s", ref, exc)
            return self._reply(451, "4.3.0", kind, req, "Temporary lookup failure")
        if value is None:
            return DUNNO
        return await self.access_result(parse_result(value), req, kind, verdict, depth)

    async def access_result(self, result: AccessResult, req: Request, kind: str, verdict: Verdict,
                            depth: int = 0) -> Permit | Reply | None:
        action = result.action
        if action == "ok":
            return PERMIT
        if action == "dunno":
            return DUNNO
        if action == "reject":
            return self._reply(554, "5.7.1", kind, req, result.text or "Access denied")
        if action == "defer":
            return self._reply(450, "4.7.1", kind, req, result.text or "Access denied")
        if action == "code":
            return self._reply(result.code, result.enhanced, kind, req, result.text or "Access denied")
        if action == "hold":
            verdict.hold = verdict.hold or f"{self._subject(kind, req)}: {result.text or 'held'}"
        elif action == "discard":
            verdict.discard = verdict.discard or f"{self._subject(kind, req)}: {result.text or 'discarded'}"
        elif action == "redirect":
            verdict.redirect = result.text
        elif action == "prepend":
            verdict.prepend.append(result.text)
        elif action in ("warn", "info"):
            verdict.warnings.append(f"{self._subject(kind, req)}: {result.text}")
        elif action == "restriction":
            if depth > 10:
                return self._reply(451, "4.3.5", kind, req, "Server configuration error")
            try:
                items = parse_list(result.text.split(), "access table result")
            except RestrictionError as exc:
                log.warning("%s", exc)
                return self._reply(451, "4.3.5", kind, req, "Server configuration error")
            return await self._run(items, req, kind, verdict)
        return DUNNO

    async def _r_check_client_access(self, req, kind, arg, verdict):
        parent = "smtpd_access_maps" in self.parent_matches
        # cidr: tables match addresses only; other tables also see the client's (verified) name
        name = None if arg.startswith("cidr:") else await self.client_hostname(req)
        return await self._access(req, "client", arg, client_keys(req.client_address, name, parent), verdict)

    async def _r_check_helo_access(self, req, kind, arg, verdict):
        if not req.helo:
            return DUNNO
        labels = req.helo.lower().rstrip(".").split(".")
        parent = "smtpd_access_maps" in self.parent_matches
        keys = [".".join(labels)] + [(".".join(labels[i:]) if parent else "." + ".".join(labels[i:]))
                                     for i in range(1, len(labels))]
        return await self._access(req, "helo", arg, keys, verdict)

    async def _r_check_sender_access(self, req, kind, arg, verdict):
        if req.sender is None:
            return DUNNO
        keys = address_keys(req.sender, "smtpd_access_maps" in self.parent_matches) if req.sender else ["<>"]
        return await self._access(req, "sender", arg, keys, verdict)

    async def _r_check_recipient_access(self, req, kind, arg, verdict):
        if not req.recipient:
            return DUNNO
        return await self._access(req, "recipient", arg,
                                  address_keys(req.recipient, "smtpd_access_maps" in self.parent_matches), verdict)

    async def _r_check_policy_service(self, req, kind, arg, verdict):
        attributes = {
            "request": "smtpd_access_policy",
            "protocol_state": {"recipient": "RCPT", "data": "DATA", "end_of_data": "END-OF-MESSAGE",
                               "client": "CONNECT", "helo": "EHLO", "sender": "MAIL"}[kind],
            "protocol_name": req.protocol,
            "helo_name": req.helo,
            "queue_id": req.queue_id,
            "sender": req.sender or "",
            "recipient": req.recipient or "",
            "recipient_count": str(req.recipient_count),
            "client_address": req.client_address,
            "client_name": req.client_name,
            "reverse_client_name": req.client_name,
            "instance": req.queue_id,
            "sasl_username": req.sasl_username,
            "size": str(req.size),
        }
        try:
            action = await ask_policy_service(arg, attributes, self.policy_timeout)
        except PolicyServiceError as exc:
            log.warning("policy service %s: %s; using smtpd_policy_service_default_action", arg, exc)
            action = self.policy_default
        return await self.access_result(parse_result(action), req, kind, verdict)


def _first_key(table: Table, keys: list[str]) -> str | None:
    for key in keys:
        value = table.lookup(key)
        if value is not None:
            return value
    return None


async def _never_unlisted(address: str) -> bool:
    return False


def _fqdn(domain: str) -> bool:
    return "." in domain.strip(".") or _address_literal(domain)


def _address_literal(text: str) -> bool:
    return text.startswith("[") and text.endswith("]")


def _hostname(text: str) -> bool:
    return len(text) <= 255 and all(
        re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|[A-Za-z0-9_]", label)
        for label in text.rstrip(".").split("."))


def _matches_filter(address: str, wanted: str) -> bool:
    """``127.0.0.[2..11]``-style filters of reject_rbl_client zone=filter."""
    parts = address.split(".")
    patterns = re.findall(r"\[[^\]]*\]|[^.]+", wanted)
    if len(parts) != 4 or len(patterns) != 4:
        return address == wanted
    for part, pattern in zip(parts, patterns, strict=True):
        if pattern.startswith("["):
            allowed = set()
            for item in pattern[1:-1].split(";"):
                lo, _, hi = item.partition("..")
                allowed |= set(range(int(lo), int(hi or lo) + 1))
            if int(part) not in allowed:
                return False
        elif pattern != part:
            return False
    return True

