"""sendmail's DSN flags (RFC 3461), as Postfix's sendmail(1) reads them: ``-R ret``
(``full`` or ``hdrs``), ``-N notify`` (``never``, or a comma list of ``success``,
``failure``, ``delay``; for every recipient) and ``-V envid`` (at most 100
printable characters).  A bad value is a warning and is ignored, as in Postfix.
What is kept goes into the message's params in the form the SMTP server stores
(``trimail.delivery.notify``): RET and NOTIFY in upper case, ENVID xtext-encoded.

Parameters: none.
"""

from __future__ import annotations

import sys

from trimail.smtp import dsn


def check_flags(opts: dict) -> None:
    """Drop a bad ``-R``, ``-N`` or ``-V`` value from *opts* with Postfix's warning."""
    if opts["ret"] is not None and opts["ret"].lower() not in ("hdrs", "full"):
        _warn("bad -R option value -- ignored")
        opts["ret"] = None
    if opts["notify"] is not None and dsn.notify_words(opts["notify"]) is None:
        _warn(f"bad -N option value: '{opts['notify']}' -- ignored")
        opts["notify"] = None
    if opts["envid"] is not None:
        if len(opts["envid"]) > dsn.MAX_ENVID:
            _warn("too long -V option value -- ignored")
            opts["envid"] = None
        elif not all(" " <= ch <= "~" or ch == "\t" for ch in opts["envid"]):
            _warn("bad syntax in -V option value -- ignored")
            opts["envid"] = None


def submission_params(opts: dict) -> dict[str, str | None]:
    """The params of a message submitted with *opts* (``-R``, ``-B``, ``-N``, ``-V``)."""
    params: dict[str, str | None] = {}
    if opts["ret"]:
        params["RET"] = opts["ret"].upper()
    if opts["body"]:
        params["BODY"] = opts["body"]
    if opts["notify"]:
        params["NOTIFY"] = ",".join(dsn.notify_words(opts["notify"]) or ())
    if opts["envid"]:
        params["ENVID"] = dsn.xtext_encode(opts["envid"])
    return {**params, **opts.get("dsn_expanded", {})}  # the addresses an alias made (cleanup.expanded)


def _warn(text: str) -> None:
    print(f"sendmail: warning: {text}", file=sys.stderr)
