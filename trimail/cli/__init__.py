"""The ``trimail`` command line (cyclopts): the app, what every command shares,
the personalities and ``main``; the commands themselves live by job in
``daemon`` (serve, reload, stop, status), ``queue`` (queue ..., flush; the mailq
layout in ``mailq``), ``tables`` (postmap, postalias, newaliases), ``admin``
(config, check, passwd) and ``dkimkeys`` (dkim keygen), each registering its own on
``app`` when imported below.

Invoked through a link named ``mailq``, ``newaliases`` or ``sendmail``, the binary
acts as that command (``PERSONALITIES``; ``sendmail`` is ``trimail.cleanup.submit``).

Every command takes ``-c/--config PATH`` and ``-o NAME=VALUE`` (repeatable), after
the command words.  Exit status: 0 ok, 1 operational failure, 2 usage or
configuration error; every error is one line on stderr.  A command whose reader
goes away (``trimail queue list | head``) ends quietly with status 141, as
coreutils and Postfix's mailq do under SIGPIPE.

Parameters: queue_directory; each command module names its own.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

from cyclopts import App, CycloptsError, Parameter

from trimail import __version__
from trimail import config as configuration
from trimail.config import Config
from trimail.errors import ConfigurationError, ListenError, TrimailError
from trimail.privileges import PrivilegeError
from trimail.queue.lock import AlreadyRunning

app = App(name="trimail", help="A secure SMTP gateway MTA.", version=__version__,
          exit_on_error=False, print_error=True)

ConfigOption = Annotated[str | None, Parameter(name=["-c", "--config"], help="main.cf to read")]
Overrides = Annotated[
    list[str] | None,
    Parameter(name=["-o"], help="override one parameter, NAME=VALUE (repeatable)", consume_multiple=False),
]


class Failure(Exception):
    """An operational failure: exit status 1 with this one-line message."""


def load_config(path: str | None, overrides: list[str] | None) -> Config:
    cfg = configuration.load(path, overrides or ())
    for warning in cfg.warnings:
        print(f"trimail: warning: {warning}", file=sys.stderr)
    return cfg


PERMISSION_DENIED = "permission denied: run as root or mail_owner"


def require_access(cfg: Config) -> Path:
    """The queue directory, when this user may look into it (a missing one is
    left to the caller: "not running"); otherwise one clear line, never a
    traceback or a wrong "not running" (the control socket and the database
    are in a 0700 directory that belongs to mail_owner)."""
    directory = Path(cfg.queue_directory)
    try:
        os.stat(directory)
    except FileNotFoundError:
        return directory
    except PermissionError:
        raise Failure(f"{PERMISSION_DENIED} (cannot reach {directory})") from None
    if not os.access(directory, os.R_OK | os.X_OK):
        raise Failure(f"{PERMISSION_DENIED} (cannot read {directory})")
    return directory


# Errors an operator fixes, reported on one line; anything else is a bug and keeps its traceback.
OPERATOR_ERRORS = (TrimailError, Failure, ListenError, AlreadyRunning, PrivilegeError)


def first_known(group: BaseExceptionGroup) -> BaseException:
    """The error an operator should see from a group raised by trio nurseries."""
    matched, _ = group.split((*OPERATOR_ERRORS, KeyboardInterrupt))
    if matched is None:
        return group
    leaf: BaseException = matched
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


# The commands, by job; each module registers its own on ``app``.
from trimail.cli import admin, catch, daemon, dkimkeys, queue, tables  # noqa: F401

# -- entry point -----------------------------------------------------------------


# Invoked through a link with one of these names, the binary acts as that command.
PERSONALITIES = {"sendmail": ["sendmail"], "mailq": ["queue", "list", "--plain"], "newaliases": ["newaliases"]}


def _reader_gone() -> NoReturn:
    """Standard output's reader went away (``trimail queue list | head``): end
    quietly, as coreutils and Postfix's mailq do when SIGPIPE ends them; a shell
    reports them with status 141 (128 + SIGPIPE), and so do we.  The standard
    output becomes /dev/null so that the interpreter's last flush fails no more
    (the recipe in Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no usable stdout at all: nothing left to protect
        pass
    raise SystemExit(128 + signal.SIGPIPE)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_gone()
    except (OSError, ValueError):  # stdout closed or unusable: nothing more can reach it
        pass


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        name = Path(sys.argv[0]).name
        argv = sys.argv[1:]
        if name in PERSONALITIES:
            argv = PERSONALITIES[name] + argv
    if argv[:1] == ["sendmail"]:
        from trimail.cleanup.submit import main as sendmail

        sendmail(argv[1:])
    try:
        try:
            try:
                app(argv)  # cyclopts ends even a successful command with SystemExit
            finally:
                _flush_stdout()  # a reader that left shows here, not at interpreter exit
        except BaseExceptionGroup as group:  # errors from inside serve's nurseries
            raise first_known(group) from None
    except BrokenPipeError:
        _reader_gone()
    except CycloptsError:
        raise SystemExit(2) from None
    except ConfigurationError as exc:
        print(f"trimail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except PermissionError as exc:  # a file of the queue this user may not touch: not a bug, not a traceback
        print(f"trimail: fatal: {PERMISSION_DENIED} ({exc.filename or exc.strerror})", file=sys.stderr)
        raise SystemExit(1) from None
    except OPERATOR_ERRORS as exc:  # e.g. a table serve cannot open at start: one line, as Postfix's fatal:
        print(f"trimail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
