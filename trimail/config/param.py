"""One main.cf parameter as the registry describes it: the record every table holds.

Parameters: none read (this is the shape of a registry entry).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from trimail.config.values import TIME_UNIT, parse_size

POSTFIX = "postfix"
TRIMAIL = "trimail"


@dataclasses.dataclass(frozen=True, slots=True)
class Param:
    """One parameter: its *name*, *default* (main.cf text, may use ``$name``), the
    *parse* function that types it (``trimail.config.values``), a one-line *doc*
    and its *origin*: ``postfix`` when Postfix has a parameter of that name and
    meaning (postconf(5)), ``trimail`` when only trimail has it (Postfix keeps it in
    master.cf, resolv.conf or nowhere).  *minimum* and *maximum* bound a number or
    a time (seconds): every number has a minimum of at least 0 (a negative limit is
    fatal), and Postfix's own bounds apply where Postfix has them
    (``registry.LIMITS``); the registry fills them in."""

    name: str
    default: str
    parse: Callable[[str], Any]
    doc: str
    origin: str = POSTFIX
    minimum: float | None = None
    maximum: float | None = None

    @property
    def unit(self) -> str:
        """What a bare number means: a time's default unit (``s``, ``h``, ``d``;
        the typed value is always seconds), ``bytes`` for a size, else empty."""
        if self.parse is parse_size:
            return "bytes"
        return TIME_UNIT.get(self.parse, "")

    @property
    def is_time(self) -> bool:
        return self.parse in TIME_UNIT


P = Param


def T(name: str, default: str, parse: Callable[[str], Any], doc: str) -> Param:
    """A trimail-only parameter."""
    return Param(name, default, parse, doc, origin=TRIMAIL)
