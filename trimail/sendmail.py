"""``trimail sendmail``: local submission (sendmail(1) compatible), through the maildrop queue.

Flags: ``-t`` (recipients from To:/Cc:/Bcc:, added to those on the command line;
``Bcc:`` is removed), ``-i``/``-oi`` (a lone ``.`` does not end the input),
``-f SENDER`` (``-f <>`` for the null sender), ``-F NAME`` (full name for a
missing ``From:``), ``-c``/``-C PATH`` and ``-o NAME=VALUE``; other legacy
``-oX``/``-bm``/``-odi`` flags are accepted and ignored, as Postfix does.

The message goes through cleanup (missing From:/Date:/Message-ID:, CRLF line
ends, qualified addresses, virtual aliases; masquerading happens when mail leaves) and is committed into
the ``maildrop`` state of the queue database; the exit status is 0 only after the
commit (fsync).  serve picks it up (maildrop -> incoming) when it runs, at once if
it is running (the control socket wakes it), else at its next start.

Addresses: a recipient or ``-f`` sender whose domain is not a usable mail domain
(RFC 5321 syntax, and a name DNS can express: labels up to 63 octets, 255
octets in wire form after IDNA, no empty label) is refused before anything is
queued, with ``bad address syntax`` and exit status 65 (EX_DATAERR), so such a
name never sits in the queue.

Unprivileged users: the queue database is 0600 and owned by ``mail_owner``, so a
user who cannot open it for writing submits over SMTP to serve's first loopback
``smtpd_listen`` address instead (a submission socket in all but name): users
never get write access to other people's queued mail.  That path needs serve
running.
"""

from __future__ import annotations

import email.utils
import getpass
import os
import smtplib
import sys
import time
from pathlib import Path

from trimail import cleanup
from trimail.config import Config, ConfigError, load
from trimail.maps import open_table
from trimail.net.control import send_command
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, QueueError, Store
from trimail.smtp.address import AddressError, check_mailbox

EX_DATAERR = 65  # sysexits.h: the input data was incorrect
IGNORED_FLAGS = {"-bm", "-odi", "-odb", "-oem", "-oep", "-oeq", "-om", "-U", "-v", "-n"}


class SendmailError(Exception):
    def __init__(self, text: str, status: int = 1) -> None:
        super().__init__(text)
        self.status = status


def parse_args(argv: list[str]) -> dict:
    opts: dict = {"t": False, "i": False, "f": None, "F": None, "config": None, "overrides": [], "rcpts": []}
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
        elif arg in ("-f", "-F", "-c", "-C", "--config", "-r"):
            if not args:
                raise SendmailError(f"option {arg} needs a value", 2)
            value = args.pop(0)
            opts[{"-f": "f", "-r": "f", "-F": "F"}.get(arg, "config")] = value
        elif arg.startswith(("-f", "-r")) and len(arg) > 2:
            opts["f"] = arg[2:]
        elif arg.startswith("-F") and len(arg) > 2:
            opts["F"] = arg[2:]
        elif arg == "-o" and args and "=" in args[0]:
            opts["overrides"].append(args.pop(0))
        elif arg in IGNORED_FLAGS or arg.startswith(("-o", "-B", "-N", "-R", "-V", "-X")):
            continue
        elif arg == "-bs":
            raise SendmailError("-bs (SMTP on standard input) is not supported; use SMTP to serve", 2)
        else:
            raise SendmailError(f"unknown option {arg}", 2)
    return opts


def read_message(stream, dot_ends: bool, limit: int) -> bytes:
    data = bytearray()
    for line in stream:
        if dot_ends and line.rstrip(b"\r\n") == b".":
            break
        data += line
        if limit and len(data) > limit:
            raise SendmailError(f"message is larger than message_size_limit ({limit} bytes)")
    return bytes(data)


def recipients_from_headers(header: bytes) -> list[str]:
    values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in cleanup.header_fields(header)
              if cleanup.field_name(f) in ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def build(cfg: Config, opts: dict, raw: bytes, queue_id: str) -> tuple[str, list[str], bytes]:
    """Envelope and cleaned-up content for one submission."""
    def qualify(address: str) -> str:
        return cleanup.qualify(address, cfg.myorigin, cfg.mydomain, cfg.append_at_myorigin,
                               cfg.append_dot_mydomain)

    content = cleanup.normalize_newlines(raw)
    if content.startswith(b"From "):  # an mbox From_ line is not a header
        content = content.split(b"\r\n", 1)[1] if b"\r\n" in content else b""
    header, rest = cleanup.split_header(content)
    rcpts = list(opts["rcpts"])
    if opts["t"]:
        rcpts += recipients_from_headers(header)
        fields = [f for f in cleanup.header_fields(header) if cleanup.field_name(f) != "bcc"]
        header = b"".join(f + b"\r\n" for f in fields)
    if not rcpts:
        raise SendmailError("no recipient addresses found in message header" if opts["t"]
                            else "no recipients specified", 2 if not opts["t"] else 1)
    sender = opts["f"] if opts["f"] is not None else getpass.getuser()
    sender = "" if sender in ("<>", "") else qualify(sender.strip("<>"))
    rcpts = [qualify(r.strip().strip("<>")) for r in rcpts]
    tables = [open_table(ref) for ref in cfg.virtual_alias_maps]
    rcpts = cleanup.virtual_expand(rcpts, tables)
    for address in ([sender] if sender else []) + rcpts:
        check_domain(address)
    content = cleanup.complete_headers(header + rest, sender=sender, full_name=opts["F"],
                                       hostname=cfg.myhostname, queue_id=queue_id)
    received = (f"Received: by {cfg.myhostname} ({cfg.mail_name}, from userid {os.getuid()})\r\n"
                f"\tid {queue_id}; {email.utils.formatdate(localtime=True)}\r\n").encode()
    return sender, rcpts, received + content


def check_domain(address: str) -> None:
    """SendmailError (EX_DATAERR) unless *address* is a mailbox SMTP can carry: RFC 5321
    syntax (no CR, LF or other control character, no stray ``<>``; a sender such as
    ``a@x>\r\nRCPT TO:<injected@evil.example>`` would otherwise add a recipient
    downstream) and a domain mail can be routed to."""
    try:
        check_mailbox(address, utf8=True)
    except AddressError:
        shown = address.encode("ascii", "backslashreplace").decode("ascii")[:600]
        raise SendmailError(f"<{shown}>: bad address syntax", EX_DATAERR) from None


def submit(argv: list[str], stdin=None) -> int:
    opts = parse_args(argv)
    try:
        cfg = load(opts["config"], opts["overrides"])
    except ConfigError as exc:
        raise SendmailError(str(exc), 2) from None
    raw = read_message(stdin or sys.stdin.buffer, not opts["i"], cfg.message_size_limit)
    queue_id = new_queue_id()
    sender, rcpts, content = build(cfg, opts, raw, queue_id)
    queue_directory = Path(cfg.queue_directory)
    try:
        store = Store.open(queue_directory)
    except QueueError as exc:
        if "Permission denied" not in str(exc) and "permission" not in str(exc).lower():
            raise SendmailError(str(exc)) from None
        return _submit_smtp(cfg, sender, rcpts, content)
    spool = Spool(memory_limit=len(content))  # read into memory already: no temporary file
    spool.write(content)
    try:
        with store.transaction():
            store.insert_message(NewMessage(queue_id, sender, rcpts, spool, state="maildrop",
                                            arrival_time=time.time(), protocol="sendmail",
                                            client_name="localhost", client_address="127.0.0.1"))
    finally:
        spool.close()
        store.close()
    send_command(queue_directory, "wake", timeout=2)  # a new round; never "flush" (it forgets dead sites)
    return 0


def _submit_smtp(cfg: Config, sender: str, rcpts: list[str], content: bytes) -> int:
    listen = cfg.smtpd_listen[0]
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "::") else listen.host
    try:
        with smtplib.SMTP(host, listen.port, timeout=60) as client:
            client.sendmail(sender or "<>", rcpts, content)
    except (OSError, smtplib.SMTPException) as exc:
        raise SendmailError(f"cannot write the queue and cannot submit over SMTP to {listen}: {exc}") from None
    return 0
