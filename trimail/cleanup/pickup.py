"""A user's local submission, taken by serve on its public socket (trimail.public):
Postfix's postdrop and pickup in one, for a user who may not write the queue.

The user's sendmail (cleanup/submit.py) builds the message as it would for the
queue (headers completed, addresses qualified and checked) and sends the envelope
and the message (``trimail.postqueue.ask``).  serve then does what only it can
be trusted with, as Postfix's pickup and cleanup do: the ``Received:`` line with
the user's uid from the socket's credentials (``SO_PEERCRED``), never the user's
own; virtual_alias_maps (tables the user may not read); non_smtpd_milters and
DKIM signing (``enqueue``); the commit into ``maildrop`` (fsynced before the
answer: ``ok`` and the queue ID); and the log line ``QUEUEID: uid=N from=<...>``,
as pickup writes it.  Of the envelope's params only RET, BODY and the DSN requests
sendmail's ``-V`` and ``-N`` make (ENVID, NOTIFY) are kept, and those only when the
SMTP server would take them.  No smtpd restriction and no smtpd_recipient_limit apply, as
none applies to Postfix's local submission.

Bounds: the envelope is one line of at most ``ENVELOPE_LIMIT`` bytes (about
30,000 recipients); the message is at most message_size_limit bytes (or
``SIZE_LIMIT`` when that is 0) and must arrive within ``BODY_TIMEOUT`` seconds.  It
is held in memory while it is queued (about three copies), so at most
``BIG_AT_ONCE`` messages over ``BIG`` bytes are read at a time; the others wait.

Parameters: message_size_limit, myhostname, mail_name, myorigin, mydomain,
append_at_myorigin, append_dot_mydomain, virtual_alias_maps, receive_override_options,
authorized_submit_users (plus what cleanup/submit.enqueue reads).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from trimail import userlists
from trimail.cleanup import expanded, rewrite
from trimail.cleanup.headers import local_received
from trimail.cleanup.submit import SendmailError, check_domain, enqueue
from trimail.config import Config
from trimail.errors import TrimailError
from trimail.log import printable
from trimail.maps import TableError, open_table
from trimail.net.reading import request_read
from trimail.queue.ids import new_queue_id
from trimail.smtp import dsn

log = logging.getLogger("trimail.pickup")

ENVELOPE_LIMIT = 1 << 20  # bytes of the envelope's line
SIZE_LIMIT = 1 << 30  # bytes of a message when message_size_limit is 0 (no limit)
BODY_TIMEOUT = 60.0  # seconds for the whole message to arrive
BIG = 1 << 20  # bytes: a message over this size is held in memory only ...
BIG_AT_ONCE = 2  # ... this many at a time (red team 34e: 16 users' 10 MB took serve to 593 MB)


def envelope(request: dict[str, Any], config: Config) -> tuple[str, list[str], int, dict[str, str | None]]:
    """The sender, recipients, size and params of a submission request; SendmailError
    (EX_DATAERR, EX_USAGE) when they are not what sendmail sends."""
    sender, rcpts, size = request.get("sender"), request.get("recipients"), request.get("size")
    params = request.get("params") or {}
    if not (isinstance(sender, str) and isinstance(rcpts, list) and rcpts and isinstance(size, int)
            and all(isinstance(r, str) for r in rcpts) and isinstance(params, dict)):
        raise SendmailError("bad submission request", os.EX_USAGE)
    limit = config.message_size_limit or SIZE_LIMIT
    if not 0 <= size <= limit:
        raise SendmailError(f"message file too big (more than message_size_limit, {limit} bytes)", os.EX_DATAERR)
    kept = {key: params[key] for key in ("RET", "BODY") if isinstance(params.get(key), str)}
    # sendmail's -V and -N (RFC 3461), kept only when they are what the SMTP server would take
    kept |= {key: value for key, check in (("ENVID", dsn.check_envid), ("NOTIFY", dsn.check_notify))
             if isinstance(value := params.get(key), str) and check(value) is None}
    return sender, rcpts, size, kept


async def receive(stream: trio.SocketStream, first: bytes, uid: int, config: Config,
                  request: dict[str, Any], big: trio.Semaphore) -> bytes:
    """Read the message of a submission whose envelope is *request* (*first*: its first
    bytes, read with the envelope) and queue it; the answer's bytes.  A message over
    ``BIG`` bytes is read and queued only while it holds *big* (serve's, shared by
    all its submissions)."""
    refused = await trio.to_thread.run_sync(userlists.judged_by_serve, config, "authorized_submit_users", uid)
    if refused is not None:  # as postdrop: before the message is read
        return _error(os.EX_NOPERM, refused)
    try:
        sender, rcpts, size, params = envelope(request, config)
    except SendmailError as exc:
        return _error(exc.status, str(exc))
    if size <= BIG:
        return await _receive(stream, first, uid, config, sender, rcpts, size, params)
    async with big:
        return await _receive(stream, first, uid, config, sender, rcpts, size, params)


async def _receive(stream: trio.SocketStream, first: bytes, uid: int, config: Config, sender: str,
                   rcpts: list[str], size: int, params: dict[str, str | None]) -> bytes:
    content = bytearray(first[:size])
    with trio.move_on_after(BODY_TIMEOUT):
        while len(content) < size:
            chunk = await stream.receive_some(min(1 << 16, size - len(content)))
            if not chunk:
                break
            content += chunk
    if len(content) < size:
        return _error(os.EX_TEMPFAIL, "the message did not arrive whole: nothing was queued")
    request_read()  # in whole: no newcomer cuts it off while it is queued (its answer would be lost)
    try:
        queue_id = await trio.to_thread.run_sync(queue, config, uid, sender, rcpts, content, params)
    except SendmailError as exc:
        return _error(exc.status, str(exc))
    except (TrimailError, TableError) as exc:  # the queue or a table: try again later
        log.warning("local submission by uid %d: %s", uid, exc)
        return _error(os.EX_TEMPFAIL, str(exc))
    return f"ok\n{queue_id}\n".encode()


def queue(config: Config, uid: int, sender: str, rcpts: list[str], content: bytes | bytearray,
          params: dict[str, str | None]) -> str:
    """(On a thread) the message into maildrop as pickup and cleanup would have it;
    its queue ID once committed."""
    # sendmail qualified them; the socket does not say it was sendmail (red team 34e)
    sender, rcpts = rewrite.qualified(sender, config), [rewrite.qualified(r, config) for r in rcpts]
    for address in ([sender] if sender else []) + rcpts:
        check_domain(address)
    if "no_address_mappings" not in config.receive_override_options:
        try:
            rcpts, more = expanded.expand(rcpts, [open_table(ref) for ref in config.virtual_alias_maps],
                                          params.get("NOTIFY"))  # sendmail -N success: cleanup.expanded
            params = {**params, **more}
        except ValueError as exc:  # an alias loop deeper than VIRTUAL_DEPTH: for good
            raise SendmailError(str(exc), os.EX_UNAVAILABLE) from None
        for address in rcpts:
            check_domain(address)
    queue_id = new_queue_id()
    received = local_received(config.myhostname, config.mail_name, uid, queue_id)
    enqueue(config, queue_id, sender, rcpts, received + content, params=params, in_serve=True, uid=uid)
    return queue_id


def _error(status: int, text: str) -> bytes:
    return f"error {status}: {printable(text, 500)}\n".encode()
