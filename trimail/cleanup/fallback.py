"""Local submission for a user who may not write the queue (trimail sendmail): the
message goes to serve's first smtpd listener on loopback, all or nothing.

Every recipient must be accepted before DATA, else the transaction is reset and
nothing is queued: sendmail's exit 0 means every recipient was queued (smtplib's
``sendmail()`` returns the refused recipients and goes on, and before this module
they were dropped with exit 0).  A refusal or failure is one line; the exit status
is EX_TEMPFAIL (75) when the condition is temporary (serve not running, a 4xx),
so a caller that retries on it does, and EX_UNAVAILABLE (69) when not.

Whoever listens there gets the message only if its end of the connection belongs
to root or to the queue's owner (``/proc/net/tcp``): with a port above 1023, any
user could bind it while serve was down and receive other users' mail, their
sendmail saying it was sent (red team 33b).

Parameters: smtpd_listen (the first listener; a wildcard address is reached on its
family's loopback), queue_directory (its owner), mail_owner.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import smtplib
import socket

from trimail.cleanup.submit import SendmailError
from trimail.config import Config
from trimail.log import printable


def submit_smtp(cfg: Config, sender: str, rcpts: list[str], content: bytes) -> int:
    """*content* from *sender* to *rcpts* through serve's smtpd (see the module); 0, or
    SendmailError.  Once DATA has its 250 the message is serve's: how the session then
    ends changes nothing (smtplib's ``with`` raised when QUIT got no 221, and a caller
    retrying on that sent the message twice)."""
    listen = cfg.smtpd_listen[0]
    # a wildcard is reached on its own family's loopback: serve's [::] socket is IPv6 only
    # (red team 33e: 127.0.0.1 was refused, and free for another user to take)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    try:
        client = smtplib.SMTP(host, listen.port, timeout=60)
    except (OSError, smtplib.SMTPException) as exc:
        raise _failed(listen, exc) from None
    polite = True  # QUIT at the end (not to a listener that is not serve)
    try:
        owner = _server_uid(client.sock)
        if owner is not None and owner not in _trusted(cfg):
            polite = False
            whose = f"its socket belongs to uid {owner}" if owner >= 0 else "its socket is not in /proc/net"
            raise SendmailError(f"what listens on {listen} is not serve ({whose}): not submitted", os.EX_TEMPFAIL)
        _transaction(client, listen, sender, rcpts, content)
    except (OSError, smtplib.SMTPException) as exc:
        raise _failed(listen, exc) from None
    finally:
        if polite:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                client.quit()
        client.close()
    return 0


def _transaction(client: smtplib.SMTP, listen: object, sender: str, rcpts: list[str], content: bytes) -> None:
    client.ehlo_or_helo_if_needed()
    options = [f"SIZE={len(content)}"] if client.has_extn("size") else []
    if not content.isascii() and client.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if not all(address.isascii() for address in (sender, *rcpts)):
        if not client.has_extn("smtputf8"):
            raise SendmailError(f"serve at {listen} does not offer SMTPUTF8, which the addresses need",
                                os.EX_UNAVAILABLE)
        client.command_encoding = "utf-8"
        options.append("SMTPUTF8")
    code, reply = client.mail(sender or "<>", options)
    refused = [(f"<{sender}>", code, reply)] if code != 250 else []
    for rcpt in rcpts if not refused else []:
        code, reply = client.rcpt(rcpt)
        if code not in (250, 251):
            refused.append((f"<{rcpt}>", code, reply))
            if code == 421:  # serve is closing the session
                break
    if not refused:
        try:
            code, reply = client.data(content)
        except smtplib.SMTPDataError as exc:  # DATA itself refused
            code, reply = exc.smtp_code, exc.smtp_error
        refused = [("the message", code, reply)] if code != 250 else []
    if refused:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            client.rset()
        raise _refusal(listen, refused, len(rcpts))


def _failed(listen: object, exc: Exception) -> SendmailError:
    return SendmailError(f"cannot write the queue and cannot submit over SMTP to {listen}: "
                         f"{printable(str(exc), 300)}", os.EX_TEMPFAIL)


def _refusal(listen: object, refused: list[tuple[str, int, bytes]], recipients: int) -> SendmailError:
    """One line for what serve refused over SMTP (nothing was queued)."""
    shown = "; ".join(f"{what}: {code} {printable(reply.decode('utf-8', 'replace'), 200)}"
                      for what, code, reply in refused[:3])
    more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
    # a 452 4.5.3 (smtpd_recipient_limit) would come again at every try: not temporary
    # for this message (red team 33c: a caller retrying on 75 retried for ever)
    too_many = any(code == 452 and reply.startswith(b"4.5.3") for _, code, reply in refused)
    if too_many:
        more += " (more recipients than serve takes in one message, smtpd_recipient_limit: send it in parts)"
    temporary = not too_many and all(400 <= code < 500 for _, code, _ in refused)
    return SendmailError(f"serve at {listen} refused the message over SMTP and nothing was sent "
                         f"({len(refused)} refusals, {recipients} recipients): {shown}{more}",
                         os.EX_TEMPFAIL if temporary else os.EX_UNAVAILABLE)


def _trusted(cfg: Config) -> set[int]:
    """Who may own serve's sockets: root, the queue's owner, mail_owner."""
    uids = {0}
    with contextlib.suppress(OSError):
        uids.add(os.stat(cfg.queue_directory).st_uid)
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(cfg.mail_owner).pw_uid)
    return uids


def _server_uid(sock: socket.socket) -> int | None:
    """The uid that owns the other end of *sock* (a TCP connection on this host), as
    /proc/net/tcp and tcp6 list it (an IPv4 connection to an IPv6 socket is there as
    ::ffff:a.b.c.d: red team 33d); None when the tables cannot be read, -1 when the
    other end is in neither (then nobody can say whose it is)."""
    try:
        local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    except OSError:
        return None
    wanted = {(_proc_address(sock.family, peer), _proc_address(sock.family, local))}
    if sock.family == socket.AF_INET:
        wanted.add((_proc_address(socket.AF_INET6, (f"::ffff:{peer[0]}", peer[1])),
                    _proc_address(socket.AF_INET6, (f"::ffff:{local[0]}", local[1]))))
    read = False
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{table}") as lines:
                read = True
                for line in lines:
                    fields = line.split()
                    if len(fields) > 7 and (fields[1], fields[2]) in wanted:
                        return int(fields[7])
        except (OSError, ValueError):
            continue
    return -1 if read else None


def _proc_address(family: int, address: tuple) -> str:
    """``ADDR:PORT`` as the kernel prints it: each 32-bit word of the address in host
    (little-endian) order, in hex, then the port."""
    packed = socket.inet_pton(family, address[0])
    words = b"".join(packed[i:i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{words.hex().upper()}:{address[1]:04X}"
