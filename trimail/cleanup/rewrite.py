"""cleanup's address rewriting (Postfix's cleanup(8)): qualification, virtual aliases,
masquerading and the header rewriting context.

- Local submissions (``trimail sendmail``) get missing ``From:``, ``Date:`` and
  ``Message-ID:`` headers, CRLF line ends, and bare addresses qualified with
  ``myorigin`` (``append_at_myorigin``) or ``mydomain`` (``append_dot_mydomain``).
- ``virtual_alias_maps`` rewrites envelope recipients, for any domain: the full
  address is looked up, then ``@domain``; results expand recursively (bounded),
  a result equal to its key stops the recursion, duplicates are dropped.
- Duplicate recipients (``unique``): one message never holds the same recipient
  twice, whatever brought it (RCPT TO, ``sendmail`` arguments, ``-t``, a milter's
  SMFIR_ADDRCPT, an access BCC, alias expansion); compared as addresses
  (``recipient_key``: without case, the local part's quoting, the domain's final
  dots or IDN spelling), as Postfix's cleanup_out_recipient() with its been_here
  filter of ``duplicate_filter_limit`` addresses.
- Masquerading (``masquerade_domains``, ``masquerade_exceptions``,
  ``masquerade_classes``) strips subdomains: ``joe@host.sub.example.com`` becomes
  ``joe@example.com`` for ``masquerade_domains = example.com``; ``!domain`` stops it
  for that domain; the first entry that names the domain or a parent of it decides
  (Postfix's cleanup_masquerade.c); an entry with a leading dot (``.example.com``)
  never matches anything, as in Postfix; the classes say which addresses it applies to.
- The header rewriting context (Postfix's smtpd_check_rewrite and cleanup's
  ``hdr_rewrite_context``): the envelope is masqueraded for all mail, the message
  headers only for mail in the ``local`` context: local submissions (sendmail,
  ``sendmail -bs``, bounces) and SMTP clients that ``local_header_rewrite_clients``
  names (default ``permit_inet_interfaces``: the client connects from an address
  serve listens on).  Other clients' mail is in the ``remote`` context: its headers
  are left as they came, unless ``remote_header_rewrite_domain`` is set.  smtpd
  decides at MAIL FROM (``rewrite_context``) and the queue keeps the answer in the
  message's params (``RWR_PARAM``); a message forwarded by an alias keeps the
  context of the message it came from (Postfix's local(8) passes it on), so
  Internet mail forwarded to a remote target keeps its headers.

All functions here are pure (text in, text out) except the table lookups.

Parameters: masquerade_domains, masquerade_exceptions, masquerade_classes,
local_header_rewrite_clients, remote_header_rewrite_domain, myorigin, mydomain,
append_at_myorigin, append_dot_mydomain, virtual_alias_maps, duplicate_filter_limit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trimail import rewrite
from trimail.maps import Table, TableError, lookup_first
from trimail.smtp.address import dns_name
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.policy.engine import Request
    from trimail.policy.restrictions import Policy

from trimail.cleanup.headers import rewrite_headers

log = logging.getLogger("trimail.smtpd")

VIRTUAL_DEPTH = 100
VIRTUAL_MAX = 1000

# Postfix's header_opts.c: the headers with HDR_OPT_SENDER and HDR_OPT_RECIP
_HEADER_CLASSES = {
    "header_sender": ("from", "sender", "reply-to", "errors-to", "resent-from", "resent-sender", "return-path",
                      "return-receipt-to", "disposition-notification-to", "mail-followup-to"),
    "header_recipient": ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc", "resent-reply-to",
                         "apparently-to"),
}


LOCAL = "local"  # Postfix's MAIL_ATTR_RWR_LOCAL
REMOTE = "remote"  # MAIL_ATTR_RWR_REMOTE
RWR_PARAM = "_RWR"  # message params key of the rewrite context ("_" is not in an esmtp-keyword); absent: local
NOMAP_PARAM = "_NOMAP"  # message params key: received with receive_override_options = no_address_mappings

# local_header_rewrite_clients: the names Postfix's smtpd_check_rewrite() knows
_REWRITE_CLIENT_CHECKS = ("permit_inet_interfaces", "permit_mynetworks", "permit_sasl_authenticated",
                          "permit_tls_clientcerts", "permit_tls_all_clientcerts")


async def rewrite_context(policy: Policy, request: Request, clients: list[str]) -> str | Reply:
    """``local`` when the client matches *clients* (local_header_rewrite_clients),
    else ``remote``; a Reply (451) when a table cannot answer.  As Postfix's
    smtpd_check_rewrite(): the first entry that matches decides, a ``type:table``
    entry (or ``check_address_map type:table``) matches when the table has the client
    address as a key (``static:all`` matches every client), an unknown name is
    warned about and skipped."""
    from trimail.policy.engine import PERMIT, REGISTRY, Verdict

    items = iter(clients)
    for item in items:
        name = item.lower()
        table = item if ":" in item else next(items, None) if name == "check_address_map" else None
        if name == "check_address_map" and table is None:
            log.warning("parameter local_header_rewrite_clients: missing table after check_address_map")
            break
        if table is not None:
            try:
                if await policy.lookup(policy.table(table), [request.client_address]) is not None:
                    return LOCAL
            except (TableError, ValueError) as exc:
                log.warning("local_header_rewrite_clients: %s: lookup of %s failed: %s",
                            table, request.client_address, exc)
                return Reply(451, "4.3.0", "Temporary lookup error")
            continue
        restriction = REGISTRY.get(name) if name in _REWRITE_CLIENT_CHECKS else None
        if restriction is None:
            log.warning("parameter local_header_rewrite_clients: invalid request: %s", item)
            continue
        result = await restriction.handler(policy, request, "client", None, Verdict())
        if isinstance(result, Reply):  # a table behind the check could not answer
            return Reply(451, "4.3.0", "Temporary lookup error")
        if result is PERMIT:
            return LOCAL
    return REMOTE


def header_context(params: dict[str, str | None], remote_header_rewrite_domain: str) -> str | None:
    """The context a queued message's headers are rewritten in, or None when they are
    left alone (cleanup's hdr_rewrite_context): remote mail only with
    remote_header_rewrite_domain; a message without the record is local (what
    cleanup assumes for pickup, bounces and mail queued before the record existed)."""
    context = params.get(RWR_PARAM) or LOCAL
    if context == REMOTE:
        return REMOTE if remote_header_rewrite_domain else None
    return LOCAL


def masquerade(address: str, domains: list[str], exceptions: list[str]) -> str:
    """*address* with the subdomains below a masquerade domain stripped (Postfix's
    cleanup_masquerade_external): the first entry equal to the domain or to a parent
    of it decides; ``!`` in front turns the stripping off (each ``!`` toggles); an
    entry with a leading dot never matches."""
    local, at, domain = address.rpartition("@")
    if not at or not domains or local.lower() in {e.lower() for e in exceptions}:
        return address
    lowered = domain.lower()
    for entry in domains:
        name = entry.lstrip("!")
        truncate = (len(entry) - len(name)) % 2 == 0
        name = name.lower()
        if not name:
            continue
        if lowered == name:
            return address
        if lowered.endswith(name) and lowered[-len(name) - 1:-len(name)] == ".":
            return f"{local}@{name}" if truncate else address
    return address


def header_rewriter(config: object, context: str | None) -> Callable[[bytes], bytes]:
    """What cleanup does to the headers of a message in *context* (``header_context``):
    nothing without one; else each sender and recipient address is completed as
    trivial-rewrite does in that context (``local``: ``@$myorigin`` and
    ``.$mydomain``; ``remote``: both ``remote_header_rewrite_domain``, with
    append_at_myorigin / append_dot_mydomain saying whether) and masqueraded for the
    classes of masquerade_classes."""
    if context is None:
        return lambda content: content
    get = config.get  # type: ignore[attr-defined]
    origin, domain = (get("myorigin"), get("mydomain")) if context == LOCAL else \
        (get("remote_header_rewrite_domain"),) * 2
    settings = rewrite.Settings(local_domains=frozenset(), swap_bangpath=get("swap_bangpath"),
                                percent_hack=get("allow_percent_hack"),
                                origin=origin if get("append_at_myorigin") else "",
                                mydomain=domain if get("append_dot_mydomain") else "")
    domains, exceptions, classes = get("masquerade_domains"), get("masquerade_exceptions"), get("masquerade_classes")

    def rewriter(masq: bool) -> Callable[[str], str]:
        def one(address: str) -> str:
            address = rewrite.canonical(address, settings)
            return masquerade(address, domains, exceptions) if masq else address
        return one

    plain, masked = rewriter(False), rewriter(bool(domains))
    rewrites = {name: masked if klass in classes else plain
                for klass, names in _HEADER_CLASSES.items() for name in names}
    return lambda content: rewrite_headers(content, rewrites)


def qualify(address: str, myorigin: str, mydomain: str, append_at_myorigin: bool, append_dot_mydomain: bool) -> str:
    """user -> user@myorigin; user@host -> user@host.mydomain (Postfix's canonicalisation)."""
    if not address or address.startswith("@"):
        return address
    if "@" not in address:
        return f"{address}@{myorigin}" if append_at_myorigin else address
    local, _, domain = address.rpartition("@")
    if append_dot_mydomain and "." not in domain and not domain.startswith("["):
        return f"{local}@{domain}.{mydomain}"
    return address


def qualified(address: str, config: Any) -> str:
    """``qualify`` with the configuration's myorigin, mydomain, append_at_myorigin and
    append_dot_mydomain (sendmail, ``sendmail -bs`` and serve's pickup), less the
    domain's final dots, as smtpd stores it (red team 35a: ``bob@x.`` went out so)."""
    if "@" in address and address.endswith(".") and not address.endswith("@."):
        address = address.rstrip(".")
    return qualify(address, config.myorigin, config.mydomain, config.append_at_myorigin,
                   config.append_dot_mydomain)


_QUOTING = re.compile(r'\\(.)|"', re.DOTALL)


def recipient_key(address: str) -> tuple[str, str]:
    """What the duplicate filter compares of *address*: the local part without its
    quoting (``"bob"@x`` and ``"b\\ob"@x`` are ``bob@x`` on the wire and to any
    mailbox; Postfix compares the unquoted internal form), the domain without final
    dots and as DNS names it (an IDN's U-labels and A-labels are one domain), both
    without case.  Red team 35a: a client that spelled one mailbox in each of these
    ways had it delivered once per spelling."""
    local, at, domain = address.rpartition("@")
    if not at or '"' in domain:  # no domain, or an "@" inside a quoted local part
        local, domain = address, ""
    local = _QUOTING.sub(lambda m: m.group(1) or "", local) if '"' in local or "\\" in local else local
    domain = domain.rstrip(".")
    if not domain.isascii():
        domain = (dns_name(domain) or domain.encode()).decode("utf-8", "replace")
    return local.lower(), domain.lower()


def unique(recipients: list[str], limit: int) -> list[str]:
    """*recipients* without repeats, the first of each kept (``recipient_key``: not
    case, quoting, final dots or IDN spelling).  As Postfix's been_here filter: at
    most *limit* addresses are remembered (0: no limit), and those past it are kept
    as they come, each as often as it comes."""
    seen: set[tuple[str, str]] = set()
    out: list[str] = []
    for address in recipients:
        key = recipient_key(address)
        if key in seen:
            continue
        if not limit or len(seen) < limit:
            seen.add(key)
        out.append(address)
    return out


def virtual_expand(recipients: list[str], tables: list[Table]) -> list[str]:
    """Rewrite recipients through virtual_alias_maps (recursively, bounded)."""
    if not tables:
        return recipients
    out: list[str] = []
    seen: set[str] = set()

    def expand(address: str, depth: int) -> None:
        key = address.lower()
        if depth > VIRTUAL_DEPTH:
            raise ValueError(f"virtual alias expansion of {address} is deeper than {VIRTUAL_DEPTH}")
        value = lookup_first(tables, key)
        if value is None and "@" in key:
            value = lookup_first(tables, "@" + key.rpartition("@")[2])
        if value is None:
            if key not in seen:
                seen.add(key)
                out.append(address)
            return
        for target in re.split(r"[,\s]+", value.strip()):
            if not target:
                continue
            if target.lower() == key:  # "a@x a@x, b@y": keep a@x itself
                if key not in seen:
                    seen.add(key)
                    out.append(target)
                continue
            expand(target, depth + 1)
        if len(out) > VIRTUAL_MAX:
            raise ValueError(f"virtual alias expansion has more than {VIRTUAL_MAX} recipients")

    for recipient in recipients:
        expand(recipient, 0)
    return out


