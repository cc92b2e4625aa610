"""``trimail postmap``, ``postalias`` and ``newaliases``: compile lookup tables
and aliases(5) files into their indexed databases, query one key (``-q``) or
list every entry (``-s``), as Postfix's postmap(1), postalias(1) and
newaliases(1) do.  The compiling is ``trimail.maps`` and
``trimail.delivery.local.aliases``; this module is their command line.

Exit status: ``-q`` of a key not found is 1 with nothing printed (postmap's);
a table that cannot be read or written is one line and status 1.

Parameters: alias_database.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from trimail import maps
from trimail.cli import ConfigOption, Failure, Overrides, app, load_config
from trimail.delivery.local.aliases import postalias
from trimail.maps import TableError, open_table


def _query_or_dump(ref: str, key: str | None, dump: bool, separator: str) -> bool:
    """``-q KEY`` (print the value; False when not found) or ``-s`` (print every
    entry, ``key<separator>value``), as postmap(1)/postalias(1) do; True when done."""
    if key is not None and dump:
        raise Failure("specify only one of -q or -s")
    if key is not None:
        value = open_table(ref).lookup(key)
        if value is None:
            raise SystemExit(1)  # not found: postmap's status 1, nothing printed
        print(value)
        return True
    if dump:
        for name, value in open_table(ref).entries():
            print(f"{name}{separator}{value}")
        return True
    return False


QueryOption = Annotated[str | None, Parameter(name=["-q"], help="look up KEY and print its value")]


DumpFlag = Annotated[bool, Parameter(name=["-s"], help="print every key and value")]


@app.command(name="postmap")
def postmap_command(table: str, *, q: QueryOption = None, s: DumpFlag = False,
                    config: ConfigOption = None, o: Overrides = None) -> None:
    """Compile a lookup table source into its indexed database, query it (-q) or
    list it (-s), as postmap does."""
    load_config(config, o)
    ref = table if ":" in table else f"hash:{table}"
    try:
        if _query_or_dump(ref, q, s, "\t"):
            return
        kind, _, name = ref.partition(":")
        if kind not in ("hash", "btree"):
            raise Failure(f"{ref}: only hash: and btree: tables are compiled")
        _count, warnings = maps.postmap(Path(name))
    except TableError as exc:
        raise Failure(str(exc)) from None
    for warning in warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)


def _postalias(path: Path) -> None:
    try:
        _count, warnings = postalias(path)
    except TableError as exc:
        raise Failure(str(exc)) from None
    for warning in warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)


@app.command(name="postalias")
def postalias_command(file: str, *, q: QueryOption = None, s: DumpFlag = False,
                      config: ConfigOption = None, o: Overrides = None) -> None:
    """Compile an aliases(5) file into its indexed database, query it (-q) or list
    it (-s, ``name:<TAB>value``), as postalias does."""
    load_config(config, o)
    ref = file if ":" in file else f"hash:{file}"
    try:
        if _query_or_dump(ref, q, s, ":\t"):
            return
    except TableError as exc:
        raise Failure(str(exc)) from None
    kind, _, name = ref.partition(":")
    if kind not in ("hash", "btree"):
        raise Failure(f"{ref}: only hash: and btree: alias databases are compiled")
    _postalias(Path(name))


@app.command(name="newaliases")
def newaliases_command(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Rebuild every alias database named by alias_database (newaliases)."""
    cfg = load_config(config, o)
    if not cfg.alias_database:
        print("trimail: alias_database is empty: nothing to rebuild", file=sys.stderr)
    for ref in cfg.alias_database:
        kind, _, name = ref.partition(":")
        if kind not in ("hash", "btree"):
            raise Failure(f"{ref}: newaliases rebuilds hash: and btree: tables only")
        _postalias(Path(name))
