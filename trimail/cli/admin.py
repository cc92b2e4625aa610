"""The operator's other commands: ``trimail config`` (postconf: effective
parameter values, ``-n``, ``-d``, ``-h``, ``-H``, ``-x``, the annotated sample
main.cf), ``trimail check`` (postfix check: the configuration, the files it
names and the addresses serve would listen on, read from /proc, never bound;
the checks themselves are ``trimail.check``) and ``trimail passwd add|delete``
(the AUTH logins, ``trimail.passwords``).

Security: ``passwd add`` reads the password from standard input or the terminal
(never the command line, which other users can see in ps); the table holds
salted scrypt hashes only.

Parameters: queue_directory, smtpd_sasl_password_file (and every parameter, for
``config``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from cyclopts import App, Parameter

from trimail.cli import PERMISSION_DENIED, ConfigOption, Failure, Overrides, app, load_config
from trimail.config import Config, generate
from trimail.config.registry import PARAMETERS


@app.command(name="config")
def show_config(
    names: list[str] | None = None,
    *,
    n: Annotated[bool, Parameter(name=["-n"], help="only parameters set explicitly")] = False,
    d: Annotated[bool, Parameter(name=["-d"], help="the default values, not main.cf's")] = False,
    h: Annotated[bool, Parameter(name=["-h"], help="values only, without 'name = '")] = False,
    hide_values: Annotated[bool, Parameter(name=["-H"], help="names only, without ' = value'")] = False,
    x: Annotated[bool, Parameter(name=["-x"], help="expand $name references")] = False,
    sample: Annotated[bool, Parameter(name=["--sample"], help="print an annotated main.cf")] = False,
    config: ConfigOption = None,
    o: Overrides = None,
) -> None:
    """Print effective parameter values (postconf; -n, -d, -h, -H and -x as postconf's)."""
    if sample:
        print(generate.sample_main_cf())
        return
    for first, second in (("-d", "-n"), ("-d", "-o"), ("-h", "-H")):  # postconf's incompatible pairs
        given = {"-d": d, "-n": n, "-o": bool(o), "-h": h, "-H": hide_values}
        if given[first] and given[second]:
            print(f"trimail: fatal: specify one of {first} {second}", file=sys.stderr)
            raise SystemExit(2)
    if d:  # postconf -d reads no main.cf: the built-in values, derived ones (myhostname) included
        cfg = Config({}, "defaults")
    else:
        cfg = load_config(config, o)
    if names:
        wanted = names
    elif n:
        wanted = cfg.explicit_names()
    else:
        wanted = sorted(set(PARAMETERS) | set(cfg.explicit_names()))
    unknown = [name for name in wanted if name not in PARAMETERS and not cfg.is_set(name)]
    for name in wanted:
        if name in unknown:
            print(f"trimail: warning: {name}: unknown parameter", file=sys.stderr)
            continue
        if hide_values:
            print(name)
            continue
        value = cfg.expand(name) if x else cfg.raw(name)
        print(value if h else f"{name} = {value}".rstrip())
    if unknown:
        raise SystemExit(2)


@app.command(name="check")
def check_command(*, config: ConfigOption = None, o: Overrides = None) -> None:
    """Validate the configuration and the files it names (postfix check); report the
    addresses serve would listen on, without binding them."""
    from trimail.check import listeners_in_use, planned_listeners, resolver_reachable, warnings
    from trimail.queue.lock import running_pid

    cfg = load_config(config, o)
    problems = warnings(cfg) + resolver_reachable(cfg)
    try:
        pid = running_pid(Path(cfg.queue_directory))
    except PermissionError:
        pid = -1  # cannot tell: do not report serve's own listeners as taken
        problems.append(f"{cfg.queue_directory}: {PERMISSION_DENIED}; the queue was not checked")
    if pid is None:
        report, taken = listeners_in_use(cfg)
        problems += taken
    else:
        held = f"serve (pid {pid})" if pid > 0 else "serve, if it runs"
        report = [f"{parameter}: listens on {address} ({held})" for parameter, address in planned_listeners(cfg)]
    for line in report:
        print(f"trimail: {line}")
    errors = 0
    for problem in problems:
        if problem.startswith("error: "):
            errors += 1
            print(f"trimail: {problem}", file=sys.stderr)
        else:
            print(f"trimail: warning: {problem}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


passwd_app = App(name="passwd", help="Manage AUTH logins (salted scrypt hashes, never plaintext).")
app.command(passwd_app)


@passwd_app.command(name="add")
def passwd_add(user: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Add or change a login; the password is read from standard input (or prompted for)."""
    from trimail import passwords

    cfg = load_config(config, o)
    try:
        passwords.check_user(user)
    except passwords.PasswordError as exc:
        raise Failure(str(exc)) from None
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {user}: ")
        if getpass.getpass("again: ") != password:
            raise Failure("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        raise Failure("empty password")
    path = Path(cfg.smtpd_sasl_password_file)
    table = passwords.read_table(path)
    table[user] = passwords.hash_password(password)
    passwords.write_table(path, table)


@passwd_app.command(name="delete")
def passwd_delete(user: str, *, config: ConfigOption = None, o: Overrides = None) -> None:
    """Remove a login."""
    from trimail import passwords

    cfg = load_config(config, o)
    path = Path(cfg.smtpd_sasl_password_file)
    table = passwords.read_table(path)
    if table.pop(user, None) is None:
        raise Failure(f"{user}: no such login in {path}")
    passwords.write_table(path, table)
