"""The one registry of restriction names: name -> handler, argument, where it may be used.

Every name ``smtpd_*_restrictions`` accepts is registered here by the module that
implements it (``checks_generic``, ``checks_client``, ``checks_address``,
``verify``), with its handler, whether it takes an argument, and which lists may
use it.  There is no other list of names: a name without a handler cannot be
parsed, so ``serve`` refuses it at start (ConfigError, exit 2) and ``trimail
check`` reports it, naming the parameter and the restriction.

Where a restriction may be used (Postfix's rules, made strict): a restriction
that looks at the HELO name, the sender or the recipient is allowed only in the
lists that see that information.  With ``smtpd_delay_reject = yes`` (default) the
client, HELO and sender lists run at RCPT and see everything; without it the
client and HELO lists run at HELO (no sender, no recipient) and the sender list at
MAIL (no recipient).  The DATA and end-of-data lists never see a single recipient.
Postfix silently skips such a restriction; trimail refuses it, because a
restriction that can never fire is a silent hole in the policy.  ``sleep`` is
allowed in the client, HELO, sender and recipient lists only.

Also here: the values restrictions exchange with the engine (``Request``,
``Verdict``, ``PERMIT``/``DUNNO``).

Security: parsing is the only gate between main.cf and the handlers; an argument
is validated here (a table reference must be ``type:name``, ``sleep`` takes a
bounded number of seconds) before anything opens or waits on it.

Parameters: smtpd_*_restrictions (read by name), smtpd_delay_reject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from trimail.config import Config, ConfigError
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

STAGE_LISTS = {
    "client": ["smtpd_client_restrictions"],
    "helo": ["smtpd_helo_restrictions"],
    "sender": ["smtpd_sender_restrictions"],
    "recipient": ["smtpd_relay_restrictions", "smtpd_recipient_restrictions"],
    "data": ["smtpd_data_restrictions"],
    "end_of_data": ["smtpd_end_of_data_restrictions"],
    "etrn": ["smtpd_etrn_restrictions"],
}
DELAYED = ["smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions"]
ALL_KINDS = frozenset(STAGE_LISTS)
ENVELOPE_KINDS = frozenset({"client", "helo", "sender", "recipient"})
SLEEP_LIMIT = 60  # seconds: a longer pause only ties up a session slot


class Permit:
    """The list ends with a positive answer."""


PERMIT = Permit()
DUNNO = None

Result = Permit | Reply | None


@dataclasses.dataclass(slots=True)
class Request:
    """What the restrictions may look at; one per check, sharing the session cache."""

    client_address: str
    client_name: str
    helo: str
    protocol: str
    sender: str | None = None
    recipient: str | None = None
    queue_id: str = ""  # "" until the first accepted RCPT (Postfix assigns the queue ID there)
    instance: str = ""  # one mail transaction, from MAIL on (the policy protocol's instance)
    recipient_count: int = 0  # recipients accepted so far in this transaction
    size: int = 0
    pipelined: bool = False
    sasl_username: str = ""
    tls: bool = False  # the session is encrypted (STARTTLS or smtps)
    client_cert_fingerprint: str = ""  # smtpd_tls_fingerprint_digest of the client certificate, if any
    stage: str = ""  # the protocol stage being checked: recipient, data, end_of_data, ...
    etrn: str = ""  # the site of an ETRN command
    cache: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class Verdict:
    reply: Reply | None = None  # None: accept
    hold: str | None = None
    discard: str | None = None
    redirect: str | None = None
    filter: str | None = None  # FILTER transport:nexthop (the last one wins)
    bcc: str | None = None  # BCC address (the first one wins)
    checks_bcc: list[str] = dataclasses.field(default_factory=list)  # header/body checks' BCCs: all
    passed: bool = False  # header/body checks' PASS: no milter sees the message
    prepend: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # access actions for the mail log, as Postfix's log_whatsup: (action, text), e.g.
    # ("hold", "<x@y>: Recipient address triggers HOLD action"); smtpd writes the lines
    logged: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reject_warnings: list[Reply] = dataclasses.field(default_factory=list)  # what warn_if_reject let pass
    # evaluation state of one check (Postfix's defer_if_permit / defer_if_reject / warn_if_reject)
    defer_if_permit: Reply | None = None
    defer_if_reject: Reply | None = None
    warn_next: bool = False  # warn_if_reject was the last restriction
    warn_only: bool = False  # the restriction running now may only warn


Handler = Callable[["Policy", Request, str, "str | None", Verdict], Awaitable[Result]]


@dataclasses.dataclass(frozen=True, slots=True)
class Restriction:
    name: str
    handler: Handler
    argument: str = ""  # "" none, "table" type:name, "domain" a DNS list, "seconds", "service"
    needs: str = ""  # "", "helo", "sender" or "recipient": what the restriction looks at
    kinds: frozenset[str] = ALL_KINDS  # the lists (by kind) it may appear in at all


REGISTRY: dict[str, Restriction] = {}


def register(name: str, *, argument: str = "", needs: str = "",
             kinds: frozenset[str] = ALL_KINDS) -> Callable[[Handler], Handler]:
    def add(handler: Handler) -> Handler:
        if name in REGISTRY:
            raise RuntimeError(f"restriction {name} registered twice")
        REGISTRY[name] = Restriction(name, handler, argument, needs, kinds)
        return handler
    return add


class RestrictionError(Exception):
    """A restriction list that cannot be used (unknown name, missing or bad argument)."""


def _check_argument(restriction: Restriction, value: str, where: str) -> None:
    kind = restriction.argument
    if kind == "table" and ":" not in value:
        raise RestrictionError(f"{where}: {restriction.name} needs a type:table argument, not {value!r}")
    if kind == "service" and ":" not in value:
        raise RestrictionError(f"{where}: {restriction.name} needs a transport:server argument, not {value!r}")
    if kind == "seconds" and not (value.isascii() and value.isdigit() and int(value) <= SLEEP_LIMIT):
        raise RestrictionError(f"{where}: {restriction.name} needs a number of seconds (0 to {SLEEP_LIMIT}), "
                               f"not {value!r}")
    if kind == "domain" and (not value or value.startswith((".", "=")) or ":" in value):
        raise RestrictionError(f"{where}: {restriction.name} needs a DNS list domain, not {value!r}")


def parse_list(tokens: list[str], where: str) -> list[tuple[str, str | None]]:
    """*tokens* as (name, argument) pairs; RestrictionError names *where* and the restriction."""
    _load_handlers()
    out: list[tuple[str, str | None]] = []
    items = list(tokens)
    while items:
        name = items.pop(0)
        restriction = REGISTRY.get(name.lower())
        if restriction is None:
            raise RestrictionError(f"{where}: unknown restriction {name!r}")
        if restriction.argument:
            if not items:
                raise RestrictionError(f"{where}: {restriction.name} needs an argument")
            argument = items.pop(0)
            _check_argument(restriction, argument, where)
            out.append((restriction.name, argument))
        else:
            out.append((restriction.name, None))
    return out


def kind_of(list_name: str) -> str:
    kind = list_name.removeprefix("smtpd_").removesuffix("_restrictions")
    return "recipient" if kind == "relay" else kind


def sees(kind: str, delay_reject: bool) -> set[str]:
    """What a list of *kind* can look at, given smtpd_delay_reject."""
    if kind in ("recipient",) or (delay_reject and kind in ENVELOPE_KINDS):
        return {"", "helo", "sender", "recipient"}
    if kind in ("client", "helo", "etrn"):  # ETRN is outside any mail transaction
        return {"", "helo"}
    return {"", "helo", "sender"}  # sender (at MAIL), data, end_of_data


def check_placement(items: list[tuple[str, str | None]], list_name: str, delay_reject: bool) -> None:
    kind = kind_of(list_name)
    for name, _ in items:
        restriction = REGISTRY[name]
        if kind not in restriction.kinds:
            allowed = ", ".join(sorted(n for k in restriction.kinds for n in STAGE_LISTS[k]))
            raise RestrictionError(f"{list_name}: {name} cannot be used here (only in {allowed})")
        if restriction.needs not in sees(kind, delay_reject):
            why = f"it needs the {restriction.needs}, which {list_name} does not see"
            if kind in ENVELOPE_KINDS:
                why += " with smtpd_delay_reject = no"
            raise RestrictionError(f"{list_name}: {name} cannot be used here ({why})")


def restriction_lists(config: Config) -> dict[str, list[tuple[str, str | None]]]:
    """Every smtpd_*_restrictions list parsed and placed; a bad one is a ConfigError
    naming the file, line, parameter and restriction."""
    lists = {}
    delay_reject = bool(config.smtpd_delay_reject)
    for names in STAGE_LISTS.values():
        for name in names:
            try:
                lists[name] = parse_list(config.get(name), name)
                check_placement(lists[name], name, delay_reject)
            except RestrictionError as exc:
                raise ConfigError(f"{config.where(name)}: {exc}") from None
    return lists


def _load_handlers() -> None:
    """Import the handler modules (they register themselves; a module imported before,
    say verify, must not make the others look loaded: import is idempotent)."""
    from trimail.policy import checks_address, checks_client, checks_generic, relay, verify  # noqa: F401


def names() -> dict[str, Restriction]:
    _load_handlers()
    return dict(REGISTRY)
