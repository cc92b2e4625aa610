"""The restriction engine (smtpd_*_restrictions) with Postfix's evaluation rules.

``Policy.check(stage, request)`` evaluates, for a stage, the lists Postfix would:
with ``smtpd_delay_reject = yes`` (default) the client, HELO and sender lists run
at RCPT time together with the relay and recipient lists -- again, whole, at every
RCPT, as Postfix's smtpd_check_rcpt() calls smtpd_check_client/helo/mail each time
(nothing but a defer_if_permit is kept between stages), so a ``sleep`` there pauses
once per RCPT, never at HELO or MAIL (the session's smtpd_session_deadline bounds
the sum); with ``smtpd_delay_reject = no`` the client list runs at connect, the HELO
list at HELO and the sender list at MAIL, once each; ``data`` and ``end_of_data`` run at DATA and at
the final dot.  Within a list the first
``permit``-like result ends that list and evaluation goes on with the next list;
the first reject or defer ends everything and becomes the reply; the end of a
list is "dunno".  Access-table actions (HOLD, DISCARD, REDIRECT, FILTER, BCC,
PREPEND, WARN) are collected in the verdict and evaluation goes on.

Names, arguments and where each restriction may be used live in one registry
(``trimail/policy/engine.py``); the handlers in ``checks_generic``,
``checks_client``, ``checks_address``, ``relay`` and ``verify``.  Postfix's three
pseudo-decisions are kept per check: ``warn_if_reject`` turns the next
restriction's reject into a logged ``reject_warning``; ``defer_if_reject``
remembers a 4xx that replaces a later 5xx; ``defer_if_permit`` (also a
temporary DNS failure where Postfix uses it) remembers a 4xx that is answered
only if the rest of the lists do not reject (an RBL reject after it wins).

Reply texts and codes are Postfix's: ``554 5.7.1 <x@y>: Relay access denied``,
``450 4.1.8 <s@d>: Sender address rejected: Domain not found``, ...  DNS answers
are cached per session; a temporary DNS failure always gives a 4xx.

Closed relay: ``reject_unauth_destination``/``defer_unauth_destination`` decide on
the one resolution of the address (``trimail/rewrite.py``, Postfix's
trivial-rewrite), the same one smtpd stores and the router routes: only a local
or relay class is authorized, and an invalid address never is (smtpd refuses it
with ``501 5.1.3`` before the restrictions run).

FILTER ``transport:nexthop`` is validated when the table answers (an unknown
transport or bad nexthop is ``451 4.3.5 Server configuration error``, logged);
REDIRECT's and BCC's address must be user@domain without control or bidi characters
and must resolve; any other target is logged and ignored, as Postfix ignores a
target without ``@`` (its smtpd_check.c returns DUNNO), and the mail goes to its
own recipients.  With
``smtpd_delay_reject = no`` the client and HELO lists run before any transaction, so
HOLD, DISCARD, REDIRECT, FILTER and BCC found there have no message to act on: they
are skipped with a warning in the log, as Postfix does, never silently.

Parameters: smtpd_*_restrictions, smtpd_delay_reject, mynetworks, relay_domains, myorigin,
parent_domain_matches_subdomains, smtpd_policy_service_timeout,
smtpd_policy_service_default_action, table_lookup_timeout, smtpd_sender_login_maps,
the ``*_reject_code`` parameters, relay_clientcerts, and the address_verify_*
parameters (``verify.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from trimail import rewrite
from trimail.config import Config
from trimail.config.params_filter import filter_problem  # the one check of transport:nexthop
from trimail.log import printable
from trimail.maps import Table, TableError, off_loop, open_table
from trimail.net.addresses import client_ip
from trimail.net.dns import Resolver
from trimail.policy.access import AccessResult, parse_result
from trimail.policy.dnschecks import DnsChecks
from trimail.policy.engine import (  # noqa: F401 (re-exported: smtpd and tests import them from here)
    DELAYED,
    DUNNO,
    PERMIT,
    REGISTRY,
    STAGE_LISTS,
    Permit,
    Request,
    RestrictionError,
    Result,
    Verdict,
    kind_of,
    names,
    parse_list,
    restriction_lists,
)
from trimail.smtp.address import _CONTROL
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.verify import Verifier

log = logging.getLogger("trimail.smtpd")

SUBJECT_TEXT = {
    "client": "Client host rejected",
    "helo": "Helo command rejected",
    "sender": "Sender address rejected",
    "recipient": "Recipient address rejected",
    "data": "Data command rejected",
    "end_of_data": "End-of-data rejected",
    "etrn": "Etrn command rejected",
}
MESSAGE_ACTIONS = frozenset({"hold", "discard", "redirect", "filter", "bcc"})  # act on the message


LIST_PARAMETERS = tuple(name for stage in STAGE_LISTS.values() for name in stage)  # smtpd_*_restrictions

# the earlier stages whose remembered defer_if_permit each stage starts from, nearest first
_CARRIED_FROM = {"client": (), "helo": ("client",), "sender": ("helo", "client"),
                 "recipient": ("sender", "helo", "client")}


def _carried(request: Request, stage: str) -> Reply | None:
    for earlier in _CARRIED_FROM[stage]:
        key = ("defer_if_permit", earlier)
        if key in request.cache:
            return request.cache[key]
    return None


class Policy(DnsChecks):
    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        self.lists = config.memo("restriction_lists", lambda: restriction_lists(config),  # read only
                                 keeps=LIST_PARAMETERS)
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
        self.verifier: Verifier | None = None  # made on first use of reject_unverified_recipient
        self.own_addresses = config.memo("listen_addresses", lambda: _listen_addresses(config))  # addresses only
        if any(name == "permit_tls_clientcerts" for items in self.lists.values() for name, _ in items):
            log.warning("permit_tls_clientcerts is requested, but trimail does not ask clients for certificates "
                        "(Postfix's smtpd_tls_ask_ccert = no): it never permits")

    def table(self, ref: str) -> Table:
        """The table *ref*, opened once; lazily, so opening it here reads nothing."""
        if ref not in self._tables:
            self._tables[ref] = open_table(ref, lazy=True)
        return self._tables[ref]

    async def lookup(self, table: Table, keys: list[str]) -> str | None:
        """The value of the first of *keys* in *table*, off the event loop when the
        table may block (TableError when it fails or table_lookup_timeout passes)."""
        return await off_loop([table], _first_key, table, keys, timeout=self.lookup_timeout)

    # -- entry points ---------------------------------------------------------

    def lists_for(self, stage: str) -> list[str]:
        """The lists to run at *stage*.  With smtpd_delay_reject the client, HELO and
        sender lists wait for RCPT; without it each runs at its own stage, the client
        list at connect (Postfix's smtpd_proto(): the refusal is the greeting)."""
        if self.delay_reject:
            if stage == "recipient":
                return [*DELAYED, *STAGE_LISTS["recipient"]]
            if stage == "etrn":  # Postfix's smtpd_check_etrn: the delayed client and HELO lists first
                return [*STAGE_LISTS["client"], *STAGE_LISTS["helo"], *STAGE_LISTS["etrn"]]
            if stage in ("client", "helo", "sender"):
                return []
        return STAGE_LISTS[stage]

    async def check(self, stage: str, request: Request) -> Verdict:
        verdict = Verdict()
        request.stage = stage
        # smtpd_delay_reject = no: a defer_if_permit raised by the client, HELO or sender
        # list is answered only at RCPT, if nothing rejects there (Postfix's
        # defer_if_permit_client/_helo/_sender, restored at each later stage)
        staged = not self.delay_reject and stage in _CARRIED_FROM
        if staged:
            verdict.defer_if_permit = _carried(request, stage)
        for name in self.lists_for(stage):
            result = await self.run(self.lists[name], request, kind_of(name), verdict)
            if isinstance(result, Reply):
                verdict.reply = result
                return verdict
        if staged and stage != "recipient":
            request.cache[("defer_if_permit", stage)] = verdict.defer_if_permit
            return verdict
        if verdict.defer_if_permit is not None:  # nothing rejected: the remembered deferral answers
            verdict.reply = verdict.defer_if_permit
        return verdict

    # -- evaluation -------------------------------------------------------------

    async def run(self, items: list[tuple[str, str | None]], request: Request, kind: str,
                  verdict: Verdict) -> Result:
        for name, argument in items:
            warn, verdict.warn_next = verdict.warn_next, False
            verdict.warn_only = warn
            try:
                result = await REGISTRY[name].handler(self, request, kind, argument, verdict)
            finally:
                verdict.warn_only = False
            if isinstance(result, Reply):
                if warn and not _server_error(result):
                    verdict.reject_warnings.append(result)  # warn_if_reject: log it, go on
                    continue
                if result.code >= 500 and verdict.defer_if_reject is not None:
                    return verdict.defer_if_reject  # defer_if_reject: an earlier doubt wins over a reject
                return result
            if result is not DUNNO:
                return result
        return DUNNO

    def reply(self, code: int, enhanced: str, kind: str, req: Request, text: str) -> Reply:
        return Reply(code, enhanced, f"{self.subject(kind, req)}: {SUBJECT_TEXT[kind]}: {text}")

    @staticmethod
    def subject(kind: str, req: Request) -> str:
        if kind == "client":
            return f"<{req.client_name}[{req.client_address}]>"
        if kind == "helo":
            return f"<{req.helo}>"
        if kind == "sender":
            return f"<{req.sender or ''}>"
        if kind == "recipient":
            return f"<{req.recipient or ''}>"
        if kind == "etrn":
            return f"<{req.etrn}>"
        return "<DATA>" if kind == "data" else "<END-OF-MESSAGE>"

    @staticmethod
    def defer_if_permit(verdict: Verdict, reply: Reply) -> Result:
        """Postfix's DEFER_IF_PERMIT: remember *reply* (the first one) and go on; under
        warn_if_reject it is answered (and so becomes a warning) at once."""
        if verdict.warn_only:
            return reply
        if verdict.defer_if_permit is None:
            verdict.defer_if_permit = reply
        return DUNNO

    @staticmethod
    def defer_if_reject(verdict: Verdict, reply: Reply) -> Result:
        if verdict.defer_if_reject is None:
            verdict.defer_if_reject = reply
        return DUNNO

    def in_mynetworks(self, address: str) -> bool:
        known = self._mynetworks_cache.get(address)
        if known is None:
            ip = client_ip(address)
            if ip is None:
                return False
            known = any(ip.version == n.version and ip in n for n in self.mynetworks)
            if len(self._mynetworks_cache) > 10_000:  # bounded: forget everything now and then
                self._mynetworks_cache.clear()
            self._mynetworks_cache[address] = known
        return known

    def authorized_destination(self, address: str) -> bool:
        """Local or a domain we relay for; an invalid address never is."""
        return rewrite.resolve(address, self.rewrite).klass in rewrite.AUTHORIZED

    # -- access tables ------------------------------------------------------------

    async def access(self, req: Request, kind: str, ref: str, keys: list[str], verdict: Verdict) -> Result:
        try:
            value = await self.lookup(self.table(ref), keys)
        except TableError as exc:
            log.warning("access table %s: %s", ref, exc)
            return self.reply(451, "4.3.0", kind, req, "Temporary lookup failure")
        if value is None:
            return DUNNO
        return await self.access_result(parse_result(value), req, kind, verdict, source=ref)

    async def access_result(self, result: AccessResult, req: Request, kind: str, verdict: Verdict,
                            depth: int = 0, source: str = "") -> Result:
        action = result.action
        if action == "ok":
            return PERMIT
        if action == "dunno":
            return DUNNO
        if action == "reject":
            return self.reply(554, "5.7.1", kind, req, result.text or "Access denied")
        if action == "defer":
            return self.reply(450, "4.7.1", kind, req, result.text or "Access denied")
        if action in ("defer_if_permit", "defer_if_reject"):
            maybe = self.reply(450, "4.7.1", kind, req, result.text or "Service unavailable")
            if action == "defer_if_permit":
                return self.defer_if_permit(verdict, maybe)
            return self.defer_if_reject(verdict, maybe)
        if action == "code":
            return self.reply(result.code, result.enhanced, kind, req, result.text or "Access denied")
        if action in MESSAGE_ACTIONS and req.stage in ("client", "helo"):
            # smtpd_delay_reject = no: no mail transaction yet, nothing to act on (Postfix's
            # not_in_client_helo); said in the log, never dropped without a word
            log.warning("access table %s: with smtpd_delay_reject=no, action %s is always skipped in client or "
                        "helo restrictions", source or "(policy)", action.upper())
            return DUNNO
        # what Postfix's smtpd_check.c logs for each action (log_whatsup), e.g.
        # "<x@y>: Recipient address triggers HOLD action"
        named = f"{self.subject(kind, req)}: {SUBJECT_TEXT[kind].removesuffix(' rejected')}"
        if action == "hold":
            verdict.hold = verdict.hold or f"{self.subject(kind, req)}: {result.text or 'held'}"
            verdict.logged.append(("hold", f"{named} {result.text or 'triggers HOLD action'}"))
        elif action == "discard":
            verdict.discard = verdict.discard or f"{self.subject(kind, req)}: {result.text or 'discarded'}"
            verdict.logged.append(("discard", f"{named} {result.text or 'triggers DISCARD action'}"))
        elif action == "redirect":
            address = result.text.strip()
            if self._bad_target(req, "REDIRECT", address, source):
                return DUNNO
            verdict.redirect = address  # the last REDIRECT wins (Postfix)
            verdict.logged.append(("redirect", f"{named} triggers REDIRECT {address}"))
        elif action == "filter":
            problem = filter_problem(result.text)
            if problem:
                log.warning("%s: access table %s: FILTER %s: %s", req.queue_id or "NOQUEUE", source or "(policy)",
                            result.text, problem)
                return self.reply(451, "4.3.5", kind, req, "Server configuration error")
            verdict.filter = result.text.strip()  # the last FILTER wins (Postfix)
            verdict.logged.append(("filter", f"{named} triggers FILTER {verdict.filter}"))
        elif action == "bcc":
            address = result.text.strip()
            if not self._bad_target(req, "BCC", address, source):
                verdict.bcc = address  # the last BCC wins (Postfix 3.0)
                verdict.logged.append(("bcc", f"{named} triggers BCC {address}"))
        elif action == "prepend":
            verdict.prepend.append(result.text)
        elif action in ("warn", "info"):  # Postfix logs the action's text alone
            verdict.logged.append((action, result.text))
        elif action == "restriction":
            if depth > 10:
                return self.reply(451, "4.3.5", kind, req, "Server configuration error")
            try:
                items = parse_list(result.text.split(), "access table result")
            except RestrictionError as exc:
                log.warning("%s", exc)
                return self.reply(451, "4.3.5", kind, req, "Server configuration error")
            return await self.run(items, req, kind, verdict)
        return DUNNO

    def _bad_target(self, req: Request, action: str, address: str, source: str) -> bool:
        """A REDIRECT or BCC target that cannot be used, logged: not user@domain (Postfix
        "requires user@domain target", and then ignores the action), a control or
        bidi character, or an address the resolver cannot resolve."""
        if "@" in address and not _CONTROL.search(address) \
                and rewrite.resolve(address, self.rewrite).klass != "invalid":
            return False
        log.warning("%s: access table %s: %s %s is not a valid address; ignored",
                    req.queue_id or "NOQUEUE", source or "(policy)", action, printable(repr(address)))
        return True


def _server_error(reply: Reply) -> bool:
    """Configuration and lookup failures are never turned into warnings (Postfix)."""
    return reply.code == 451 and reply.enhanced.startswith("4.3.")


def _listen_addresses(config: Config) -> tuple[frozenset[str], bool]:
    """The addresses serve listens on (permit_inet_interfaces: Postfix's
    $inet_interfaces), every interface address when a listener is a wildcard; and
    whether one is (then all of 127/8 is this host too)."""
    wildcard = any((ip := client_ip(address.host.strip("[]"))) is not None and ip.is_unspecified
                   for parameter in ("smtpd_listen", "submission_listen", "smtps_listen")
                   for address in config.get(parameter))
    return rewrite.own_addresses(config, proxies=False), wildcard


def _first_key(table: Table, keys: list[str]) -> str | None:
    for key in keys:
        value = table.lookup(key)
        if value is not None:
            return value
    return None


async def _never_unlisted(address: str) -> None:
    return None
