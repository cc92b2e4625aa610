"""``trimail sendmail``: local submission (sendmail(1) compatible), through the maildrop queue.

Flags: ``-t`` (recipients from To:/Cc:/Bcc:, added to those on the command line;
``Bcc:`` is removed), ``-i``/``-oi`` (a lone ``.`` does not end the input),
``-f SENDER``/``-r SENDER`` (``-f <>`` for the null sender), ``-F NAME`` (full name for a
missing ``From:``), ``-R hdrs|full``, ``-N never|success,failure,delay`` and ``-V envid``
(RFC 3461's RET, NOTIFY for every recipient and ENVID: ``cleanup/dsnflags.py``),
``-B 7BIT|8BITMIME`` (the body type), ``-c``/``-C PATH`` and ``-o NAME=VALUE``; other
legacy flags (``-oX``, ``-bm``, ``-odi``, ``-L label``,
``-h hops``, ``-O option=value``, ``-q`` *interval*, ``-bh``/``-bH``) are accepted and
ignored, as Postfix does.

Modes, as Postfix's sendmail(1) chooses them (each refuses recipient arguments):

- ``-bp``: the mail queue (``trimail queue list``, what ``mailq`` prints);
- ``-q``: deliver deferred mail now (``trimail queue flush``); ``-qR`` *site* the mail
  for one site (``trimail queue flush -d``, Postfix's ``postqueue -s``), ``-qI`` *id* one
  message; ``-qS`` is refused as "not implemented", as Postfix does;
- ``-bi``/``-I``: rebuild the alias databases (``trimail newaliases``); ``-oA`` *path* one
  alias file instead of ``alias_database``;
- ``-bs``: stand-alone SMTP on standard input and output (``trimail/standalone.py``:
  the real smtpd state machine; mail goes into the queue as ``-t`` mail does);
- ``-bv``: verify the recipients instead of delivering: each one is resolved and
  routed (virtual aliases, the address class, transport_maps, relayhost) and a
  report is printed and mailed to the sender (Postfix's address verification report;
  see ``verify_report``).

These call the functions of the CLI's own commands (``trimail.cli.main``), so output,
errors and exit statuses are theirs.

The full name of a missing ``From:`` is ``-F``, else ``$NAME``, else the user's
password entry (GECOS) up to the first ``,``, ``;`` or ``%``, with ``&`` replaced by
the login name capitalised (Postfix's fullname()).

The message goes through cleanup (missing From:/Date:/Message-ID:, CRLF line ends,
qualified addresses, virtual aliases; masquerading happens when mail leaves) into the
``maildrop`` state; exit status 0 only after the commit (fsync).  serve picks it up
(maildrop -> incoming) at once if it runs (the control socket wakes it), else at its start.

Addresses: a recipient or ``-f`` sender whose domain is not a usable mail domain
(RFC 5321 syntax, and a name DNS can express: labels up to 63 octets, 255
octets in wire form after IDNA, no empty label) is refused before anything is
queued, with ``bad address syntax`` and exit status 65 (EX_DATAERR), so such a
name never sits in the queue.

Unprivileged users: a user other than root and the queue's owner (``mail_owner``)
never writes the queue; serve takes the message on its public socket and queues it
(``cleanup/pickup.py``, with the uid it sees), so serve must run (else exit 75).

Parameters: queue_directory, myhostname, mydomain, myorigin, mail_name,
append_at_myorigin, append_dot_mydomain, virtual_alias_maps, duplicate_filter_limit,
authorized_submit_users, message_size_limit, receive_override_options (its option for address mappings: no virtual aliases, no
masquerading; and the switch for milters), non_smtpd_milters (``milter/local.py``: run
before the commit; a refusal is sendmail's error, exit status 69 or 75), dkim_signing_table
and dkim_key_table (DKIM signing, after the milters: trimail/authcheck/signing.py).
"""

from __future__ import annotations

import email.utils
import getpass
import os
import pwd
import re
import sys
import time
from pathlib import Path
from typing import NoReturn

from trimail import userlists
from trimail.cleanup import expanded, headers, loglines
from trimail.cleanup import rewrite as cleanup_rewrite
from trimail.cleanup.dsnflags import check_flags, submission_params
from trimail.cleanup.inspection import ContentRefused, inspect_local
from trimail.config import Config, ConfigError, load
from trimail.maps import TableError, open_table
from trimail.net.controlclient import send_command
from trimail.queue.database import QueueError, works_the_queue_itself
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.queue.transitions import PICKUP_HOLD_PARAM
from trimail.smtp.address import AddressError, check_mailbox

READ_PIECE = 1 << 16  # bytes of standard input read at a time, a line or part of one
IGNORED_FLAGS = {"-bm", "-odi", "-odb", "-oem", "-oep", "-oeq", "-om", "-U", "-v", "-n", "-G", "-m", "-x",
                 "-bh", "-bH", "-Am", "-Ac", "-o7", "-o8"}
VALUE_FLAGS = {"-f": "f", "-r": "f", "-F": "F", "-c": "config", "-C": "config", "--config": "config",
               "-R": "ret", "-B": "body", "-N": "notify", "-V": "envid", "-L": None, "-h": None, "-O": None, "-A": None,
               "-e": None, "-p": None}
MODES = {"-bp": "mailq", "-bi": "newaliases", "-I": "newaliases", "-bs": "smtp", "-bv": "verify", "-q": "flush"}


class SendmailError(Exception):
    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.status = status


def parse_args(argv: list[str]) -> dict:
    opts: dict = {"t": False, "i": False, "f": None, "F": None, "config": None, "overrides": [], "rcpts": [],
                  "mode": "enqueue", "site": None, "flush_id": None, "ret": None, "body": None, "alias_db": None,
                  "notify": None, "envid": None}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts["rcpts"] += args
            break
        if not arg.startswith("-") or arg == "-":
            opts["rcpts"].append(arg)
        elif arg == "-t":
            opts["t"] = True
        elif arg in ("-i", "-oi"):
            opts["i"] = True
        elif arg in MODES:
            opts["mode"] = MODES[arg]
        elif arg in ("-bd", "-bl"):
            raise SendmailError(f"{arg} (daemon mode) is not supported: run trimail serve", 2)
        elif arg.startswith("-b"):
            raise SendmailError(f"unsupported: {arg}", 2)
        elif arg.startswith("-q"):
            _queue_flag(arg[2:], opts)
        elif arg == "-o" and args and "=" in args[0]:
            opts["overrides"].append(args.pop(0))
        elif arg.startswith("-oA"):
            if len(arg) == 3:
                raise SendmailError("-oA requires pathname", 2)
            opts["alias_db"] = arg[3:]
        elif arg in VALUE_FLAGS:
            if not args:
                raise SendmailError(f"option {arg} needs a value", 2)
            value = args.pop(0)
            if VALUE_FLAGS[arg]:
                opts[VALUE_FLAGS[arg]] = value
        elif arg[:2] in VALUE_FLAGS and arg[:2] not in ("-c", "-C"):
            if VALUE_FLAGS[arg[:2]]:
                opts[VALUE_FLAGS[arg[:2]]] = arg[2:]
        elif arg in IGNORED_FLAGS or arg.startswith(("-o", "-X")):
            continue
        else:
            raise SendmailError(f"unknown option {arg}", 2)
    check_flags(opts)  # -R, -N, -V: a bad value is a warning (Postfix)
    if opts["body"] is not None and opts["body"] not in ("7BIT", "8BITMIME"):
        raise SendmailError("-B option needs 8BITMIME or 7BIT", 2)
    if opts["t"] and opts["mode"] != "enqueue":
        raise SendmailError("-t can be used only in delivery mode" if opts["mode"] != "verify"
                            else "-t option cannot be used with -bv", 2)
    if opts["mode"] == "verify" and opts["ret"]:
        raise SendmailError("-R option cannot be used with -bv", 2)
    return opts


def _queue_flag(rest: str, opts: dict) -> None:
    """``-q``, ``-q`` *interval* (ignored), ``-qR`` *site*, ``-qI`` *id*; ``-qS`` and the
    rest are refused (Postfix: "-qS is not implemented")."""
    if not rest:
        opts["mode"] = "flush"
    elif rest[0].isdigit():
        opts["mode"] = "ignore"  # a queue run interval: serve's queue_run_delay
    elif rest[0] == "R":
        if not rest[1:]:
            raise SendmailError("specify: -qRsitename", 2)
        opts["site"] = rest[1:]
    elif rest[0] == "I":
        if not rest[1:]:
            raise SendmailError("specify: -qIqueueid", 2)
        opts["flush_id"] = rest[1:]
    else:
        raise SendmailError(f"-q{rest[0]} is not implemented", 2)


def read_message(stream, dot_ends: bool, limit: int) -> bytes:
    """Standard input to its end (or a lone ``.`` line), at most *limit* bytes: read in
    pieces of at most READ_PIECE, so a line without end costs no more memory than the
    limit (red team 33b: 1.5 GB without a newline took 2 GiB before the check)."""
    data = bytearray()
    at_start = True  # the next piece begins a line
    while piece := stream.readline(READ_PIECE):
        if dot_ends and at_start and piece.rstrip(b"\r\n") == b".":
            break
        data += piece
        at_start = piece.endswith(b"\n")
        if limit and len(data) > limit:
            raise SendmailError(f"message is larger than message_size_limit ({limit} bytes)")
    return bytes(data)


def recipients_from_headers(header: bytes) -> list[str]:
    values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in headers.header_fields(header)
              if headers.field_name(f) in ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def build(cfg: Config, opts: dict, raw: bytes, queue_id: str, *,
          expand: bool = True) -> tuple[str, list[str], bytes]:
    """Envelope and cleaned-up content for one submission; virtual_alias_maps only
    when *expand* (not for a user who may not read them: serve expands theirs)."""
    content = headers.normalize_newlines(raw)
    if content.startswith(b"From "):  # an mbox From_ line is not a header
        content = content.split(b"\r\n", 1)[1] if b"\r\n" in content else b""
    header, rest = headers.split_header(content)
    rcpts = list(opts["rcpts"])
    if opts["t"]:
        rcpts += recipients_from_headers(header)
        fields = [f for f in headers.header_fields(header) if headers.field_name(f) != "bcc"]
        header = b"".join(f + b"\r\n" for f in fields)
    if not rcpts:
        raise SendmailError("no recipient addresses found in message header" if opts["t"]
                            else "no recipients specified", 2 if not opts["t"] else 1)
    sender = opts["f"] if opts["f"] is not None else getpass.getuser()
    sender = "" if sender in ("<>", "") else cleanup_rewrite.qualified(sender.strip("<>"), cfg)
    rcpts = [cleanup_rewrite.qualified(r.strip().strip("<>"), cfg) for r in rcpts]
    if expand and "no_address_mappings" not in cfg.receive_override_options:  # as pickup passes it to cleanup
        tables = [open_table(ref) for ref in cfg.virtual_alias_maps]
        rcpts, opts["dsn_expanded"] = expanded.expand(rcpts, tables, opts["notify"])  # sendmail -N success
    for address in ([sender] if sender else []) + rcpts:
        check_domain(address)
    full_name = opts["F"] if opts["F"] is not None else full_name_of_user()
    content = headers.complete_headers(header + rest, sender=sender, full_name=full_name,
                                       hostname=cfg.myhostname, queue_id=queue_id)
    return sender, rcpts, content


def check_domain(address: str) -> None:
    """SendmailError (EX_DATAERR) unless *address* is a mailbox SMTP can carry: RFC 5321
    syntax (no CR, LF or other control character, no stray ``<>``; a sender such as
    ``a@x>\r\nRCPT TO:<injected@evil.example>`` would otherwise add a recipient
    downstream) and a domain mail can be routed to."""
    try:
        check_mailbox(address, utf8=True)
    except AddressError:
        shown = address.encode("ascii", "backslashreplace").decode("ascii")[:600]
        raise SendmailError(f"<{shown}>: bad address syntax", os.EX_DATAERR) from None


def full_name_of_user() -> str | None:
    """Postfix's fullname(): ``$NAME``, else the name in the password entry (see
    ``gecos_name``); None without a password entry."""
    name = os.environ.get("NAME")
    if name is not None:
        return name
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return None
    return gecos_name(entry.pw_gecos, entry.pw_name)


def gecos_name(gecos: str, login: str) -> str:
    """The full name in a GECOS field: up to the first ``,``, ``;`` or ``%``, each
    ``&`` replaced by *login* with its first letter in capitals (Postfix's fullname())."""
    name = re.split(r"[,;%]", gecos, maxsplit=1)[0]
    return name.replace("&", login[:1].upper() + login[1:])


def _tool(opts: dict, *command: str) -> None:
    """Run one of the CLI's own commands (mailq, flush, newaliases) with this
    invocation's -c and -o; it ends with SystemExit and its exit status."""
    from trimail import cli

    args = list(command)
    if opts["config"]:
        args += ["-c", opts["config"]]
    for override in opts["overrides"]:
        args += ["-o", override]
    cli.main(args)
    raise SystemExit(0)


def main(argv: list[str]) -> NoReturn:
    """``trimail sendmail ARGS`` (and the binary through a link named sendmail:
    trimail.entry): its exit status, and every error one ``sendmail: fatal:`` line."""
    try:
        raise SystemExit(submit(argv))
    except SendmailError as exc:
        print(f"sendmail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(exc.status) from None
    except (QueueError, TableError) as exc:
        print(f"sendmail: fatal: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def submit(argv: list[str], stdin=None, stdout=None) -> int:
    opts = parse_args(argv)
    mode = opts["mode"]
    if mode != "enqueue" and mode != "verify" and opts["rcpts"]:
        raise SendmailError({"mailq": "display queue mode", "flush": "flush queue mode", "smtp": "stand-alone mode",
                             "newaliases": "alias initialization mode", "ignore": "this mode"}[mode]
                            + " requires no recipient", 2)
    if mode == "ignore":
        return 0
    if mode == "mailq":
        _tool(opts, "queue", "list")
    if mode == "flush":
        _tool(opts, "queue", "flush")
    if opts["site"] is not None or opts["flush_id"] is not None:
        if opts["rcpts"]:
            raise SendmailError("flush site requires no recipient" if opts["site"] is not None
                                else "flush queue_id requires no recipient", 2)
        if opts["site"] is not None:
            _tool(opts, "queue", "flush", "-d", opts["site"])
        _tool(opts, "queue", "flush", opts["flush_id"])
    if mode == "newaliases":
        if opts["alias_db"]:
            _tool(opts, "postalias", opts["alias_db"])
        _tool(opts, "newaliases")
    try:
        cfg = load(opts["config"], opts["overrides"])
    except ConfigError as exc:
        raise SendmailError(str(exc), 2) from None
    own_queue = works_the_queue_itself(Path(cfg.queue_directory))  # else serve judges the user, and expands
    if own_queue and (refused := userlists.refusal(cfg, "authorized_submit_users", os.getuid())):
        raise SendmailError(refused, os.EX_NOPERM)  # before the message (or -bs) is read, as Postfix's sendmail
    if mode == "smtp":
        from trimail.standalone import serve_stdio

        return serve_stdio(cfg, stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    raw = read_message(stdin or sys.stdin.buffer, not opts["i"], cfg.message_size_limit)
    sender, rcpts, content = build(cfg, opts, raw, queue_id := new_queue_id(), expand=mode == "verify" or own_queue)
    if mode == "verify":
        from trimail.verify_report import verify_report

        received = headers.local_received(cfg.myhostname, cfg.mail_name, os.getuid(), queue_id)
        return verify_report(cfg, sender, rcpts, received + content, stdout or sys.stdout.buffer)
    return enqueue(cfg, queue_id, sender, rcpts, content, params=submission_params(opts), received=True)


def enqueue(cfg: Config, queue_id: str, sender: str, rcpts: list[str], content: bytes, *,
            params: dict[str, str | None] | None = None, protocol: str = "sendmail", helo_name: str = "",
            received: bool = False, in_serve: bool = False, uid: int | None = None) -> int:
    """Commit one message into the maildrop state and wake serve; 0 once it is durable.
    A user who cannot write the queue, or a message this process cannot sign, goes to
    serve as submitted (cleanup/pickup.py calls this *in_serve* with the user's *uid*);
    *received*: this process adds its ``Received:``.  Log lines: ``cleanup.loglines``."""
    queue_directory = Path(cfg.queue_directory)
    submitted = (sender, rcpts, content, params)  # serve checks and rewrites it again: before our own
    if not in_serve and not works_the_queue_itself(queue_directory):
        return _through_serve(cfg, *submitted)  # serve judges authorized_submit_users
    if received:
        content = headers.local_received(cfg.myhostname, cfg.mail_name, os.getuid(), queue_id) + content
    try:  # header and body checks, non_smtpd_milters
        sender, rcpts, content, state, params, actions = inspect_local(cfg, queue_id, sender, rcpts, content,
            params or {}, protocol=protocol, helo_name=helo_name, keep_log=not in_serve)
    except ContentRefused as exc:
        raise SendmailError(str(exc), exc.status) from None
    lines = loglines.submission_lines(queue_id, os.getuid() if uid is None else uid, sender, actions, content)
    params = loglines.settle(lines if protocol != "bounce" else [], params, now=in_serve or state == "discard")
    if state == "discard":
        return 0
    if state == "hold" and not in_serve:  # held when serve picks it up (its lines logged then)
        state, params = "maildrop", {**params, PICKUP_HOLD_PARAM: None}
    try:
        store = Store.open(queue_directory)
    except QueueError as exc:
        raise SendmailError(str(exc), os.EX_TEMPFAIL if in_serve else 1) from None
    if "no_address_mappings" in cfg.receive_override_options:
        # not masqueraded on its way to the content filter (scheduler/transfer.py)
        params = {**(params or {}), cleanup_rewrite.NOMAP_PARAM: None}
    rcpts = cleanup_rewrite.unique(rcpts, 0 if in_serve else cfg.duplicate_filter_limit)  # (a user's: all, 35a)
    if cfg.dkim_signing_table:  # DKIM signing; a key this user may not read: serve signs it
        from trimail.authcheck.signing import SigningError, sign_local

        try:
            content = sign_local(cfg, content)
        except SigningError as exc:
            store.close()
            if in_serve:  # serve cannot read its own key either: its operator's to fix
                raise SendmailError(f"{exc}: try again later", os.EX_TEMPFAIL) from None
            print(f"sendmail: warning: {exc}; submitting it through serve", file=sys.stderr)
            return _through_serve(cfg, *submitted)  # (not checked twice, one Received: line: red team 37)
    spool = Spool(memory_limit=len(content))  # read into memory already: no temporary file
    spool.write(content)
    try:
        with store.transaction():
            expanded.insert(store, NewMessage(queue_id, sender, rcpts, spool, state=state,
                                              arrival_time=time.time(), protocol=protocol, helo_name=helo_name,
                                              client_name="localhost", client_address="127.0.0.1",
                                              params=params or {}), cfg.myhostname)
    finally:
        spool.close()
        store.close()
    if not in_serve:
        send_command(queue_directory, "wake", timeout=2)  # a new round; never "flush" (it forgets dead sites)
    return 0


def _through_serve(cfg: Config, sender: str, rcpts: list[str], content: bytes,
                   params: dict[str, str | None] | None) -> int:
    from trimail.postqueue import Refused, submit_through_serve

    try:
        return submit_through_serve(cfg, sender, rcpts, content, params or {})
    except Refused as exc:
        raise SendmailError(str(exc) if exc.status == os.EX_NOPERM else f"serve did not queue the message: {exc}",
                            exc.status) from None
