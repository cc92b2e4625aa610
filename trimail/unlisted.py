"""Which recipients exist: Postfix's reject_unlisted_recipient, one table per address class.

smtpd asks this at RCPT (``smtpd_reject_unlisted_recipient = yes``, after the
recipient restrictions) and for the ``reject_unlisted_recipient`` and
``reject_unlisted_sender`` restrictions.  The address class comes from the one
resolver (``trimail/rewrite.py``); the table that lists the users of each class,
as in Postfix's ``smtpd_check.c`` (``check_rcpt_maps``):

- any class: an address that ``virtual_alias_maps`` rewrites exists;
- local: ``local_recipient_maps`` (empty: every local name exists); postmaster and
  MAILER-DAEMON always exist; keys ``user@domain``, ``user``, and both without the
  address extension (``recipient_delimiter``);
- virtual alias: nothing but ``virtual_alias_maps`` lists its users;
- virtual mailbox: ``virtual_mailbox_maps``;
- relay: ``relay_recipient_maps`` (empty: every user exists, Postfix's default);
  keys ``user@domain``, that without the extension, then ``@domain``;
- remote: not ours to know.

The answer names the table and the reply code of its ``unknown_*_reject_code``
parameter: ``550 5.1.1 <addr>: Recipient address rejected: User unknown in relay
recipient table``.  Refusing unknown users at RCPT is what keeps a gateway from
accepting mail it would only bounce to a forged sender (backscatter).

Security notes: tables that may block (a file reload, hash:, unix:passwd.byname) are
read on a lookup thread within ``table_lookup_timeout``; a table that cannot answer
raises ``TableError`` (smtpd answers ``451 4.3.0 Temporary lookup failure``).
Nothing here does I/O on the event loop.

Parameters: local_recipient_maps, virtual_alias_maps, virtual_mailbox_maps,
relay_recipient_maps, recipient_delimiter, table_lookup_timeout,
unknown_local_recipient_reject_code, unknown_virtual_alias_reject_code,
unknown_virtual_mailbox_reject_code, unknown_relay_recipient_reject_code.
"""

from __future__ import annotations

import dataclasses

from trimail.cleanup.rewrite import virtual_expand
from trimail.config import Config
from trimail.maps import Table, lookup_first, off_loop, open_table
from trimail.rewrite import Resolved

ALWAYS_LOCAL = frozenset({"postmaster", "mailer-daemon"})  # Postfix absorbs or generates these
TABLE_OF_CLASS = {"local": "local recipient", "virtual_alias": "virtual alias", "virtual_mailbox": "virtual mailbox",
                  "relay": "relay recipient"}


@dataclasses.dataclass(frozen=True, slots=True)
class Unlisted:
    """A recipient its class's table does not list: the reply code and the table's name."""

    code: int
    table: str  # "local recipient", "virtual alias", "virtual mailbox", "relay recipient"

    def text(self, address: str, kind: str = "Recipient") -> tuple[int, str, str]:
        """(code, enhanced status, text) of the refusal, Postfix's words."""
        detail = "1.0" if kind == "Sender" else "1.1"
        return (self.code, f"{self.code // 100}.{detail}",
                f"<{address}>: {kind} address rejected: User unknown in {self.table} table")


class RecipientTables:
    """The tables of each address class, opened lazily (opening reads nothing)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.delimiter: str = config.recipient_delimiter
        self.timeout: float = config.table_lookup_timeout
        self._tables: dict[str, list[Table]] = {}
        self.codes = {"local recipient": config.unknown_local_recipient_reject_code,
                      "virtual alias": config.unknown_virtual_alias_reject_code,
                      "virtual mailbox": config.unknown_virtual_mailbox_reject_code,
                      "relay recipient": config.unknown_relay_recipient_reject_code}

    def tables(self, param: str) -> list[Table]:
        if param not in self._tables:
            self._tables[param] = [open_table(ref, lazy=True) for ref in self.config.get(param)]
        return self._tables[param]

    def _class_tables(self, resolved: Resolved) -> tuple[str, list[Table]] | None:
        """The table that lists the users of *resolved*'s class; None when any user exists."""
        if resolved.klass == "local":
            if resolved.local.lower() in ALWAYS_LOCAL:
                return None
            table = "local recipient", self.tables("local_recipient_maps")
        elif resolved.klass == "virtual_alias":
            return "virtual alias", []  # only virtual_alias_maps, checked first
        elif resolved.klass == "virtual_mailbox":
            table = "virtual mailbox", self.tables("virtual_mailbox_maps")
        elif resolved.klass == "relay":
            table = "relay recipient", self.tables("relay_recipient_maps")
        else:
            return None
        return table if table[1] else None

    async def unlisted(self, resolved: Resolved) -> Unlisted | None:
        """Whether the class table of *resolved* lacks it (TableError when a table
        cannot answer within table_lookup_timeout; ValueError from a virtual alias
        loop)."""
        found = self._class_tables(resolved)
        if found is None:
            return None
        name, tables = found
        virtual = self.tables("virtual_alias_maps")
        missing = await off_loop([*tables, *virtual], self._missing, resolved, tables, virtual, timeout=self.timeout)
        return Unlisted(self.codes[name], name) if missing else None

    def _missing(self, resolved: Resolved, tables: list[Table], virtual: list[Table]) -> bool:
        address = resolved.address
        if virtual and virtual_expand([address], virtual) != [address]:
            return False  # a virtual alias: rewritten before delivery
        return all(lookup_first(tables, key) is None for key in self.keys(resolved))

    def keys(self, resolved: Resolved) -> list[str]:
        """Postfix's lookup order for a recipient table (mail_addr_find)."""
        local = resolved.local.lower()
        bare = local.split(self.delimiter, 1)[0] if self.delimiter and self.delimiter in local else None
        domain = resolved.domain
        keys = [f"{local}@{domain}" if domain else local]
        if bare is not None:
            keys.append(f"{bare}@{domain}" if domain else bare)
        if resolved.klass == "local":
            keys += [local] + ([bare] if bare is not None else [])
        elif domain:
            keys.append("@" + domain)
        return list(dict.fromkeys(keys))
