"""Error kinds: what a failure means for the daemon, not where it came from.

Every library's exceptions (apsw, dnspython, ssl, OS calls) are mapped to one of
these at the edge of the module that calls the library, so the code above decides
by kind, never by a foreign class:

* ``ConfigurationError``: the operator must fix a file or a parameter.  At start it
  ends ``serve`` (exit 2) with one line naming the file, line and parameter; on
  reload the old configuration stays.
* ``OperationalError``: the world failed us for a while (disk full, queue locked,
  a peer reset, a corrupt row).  It costs one session, one delivery attempt or one
  scheduler round, is logged and counted, and the daemon goes on.
* ``LookupFailure``: a table, DNS or policy lookup failed; it carries whether the
  failure is temporary (retry: 4xx) or permanent (5xx) and the RFC 3463 status.

The rule (docs/architecture.md, "Failure model"): only configuration errors at
start and an explicit stop end ``serve``.
"""

from __future__ import annotations


class TrimailError(Exception):
    """Base of trimail's own errors; ``str()`` is the one line an operator sees."""

    kind = "operational"


class ConfigurationError(TrimailError):
    """A file or parameter the operator must fix (exit status 2 at start)."""

    kind = "configuration"


class OperationalError(TrimailError):
    """A failure of the world around us, contained where it happened."""


class StorageError(OperationalError):
    """The queue cannot be written or read right now (disk full, locked, I/O
    error); ``temporary`` is false for damage that retrying will not cure."""

    def __init__(self, text: str, *, temporary: bool = True, no_space: bool = False) -> None:
        super().__init__(text)
        self.temporary = temporary
        self.no_space = no_space  # the file system is full: a client gets 452 4.3.1


class LookupFailure(OperationalError):
    """A lookup that could not be answered: temporary (try again later, 4xx) or
    permanent (5xx), with the RFC 3463 enhanced status for the DSN or reply."""

    def __init__(self, text: str, *, temporary: bool = True, dsn: str = "") -> None:
        super().__init__(text)
        self.temporary = temporary
        self.dsn = dsn or ("4.3.0" if temporary else "5.3.0")


class ListenError(Exception):
    """A listening socket could not be opened (address in use, not ours, refused);
    here rather than beside the listeners so that the command line can name it
    without importing trio."""
