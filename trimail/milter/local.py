"""non_smtpd_milters: the filters for mail submitted locally (``trimail sendmail``,
``sendmail -bs``), as Postfix's cleanup runs them for mail from pickup.  The filters
see a connection from ``localhost [127.0.0.1]``, HELO ``localhost`` (or the -bs
client's), MAIL, each RCPT, DATA and the message; their edits are made before the
message is committed.

A difference from Postfix, on purpose: Postfix filters local mail after ``sendmail``
has exited, so a refused message comes back as a bounce; trimail filters it before
the commit, so ``sendmail`` itself reports the refusal (exit status 69, or 75 for a
temporary one) and nothing is queued.  Mail trimail makes itself (bounces, -bv
reports) is not filtered (Postfix's internal_mail_filter_classes, empty).

Parameters: non_smtpd_milters, milter_* (``trimail.milter.chain``), milter_macro_daemon_name,
milter_macro_v, myhostname, queue_directory.
"""

from __future__ import annotations

import logging
import os

import trio

from trimail.milter import edit
from trimail.milter.chain import Milters, MilterSettings
from trimail.queue.spool import Spool

log = logging.getLogger("trimail.cleanup")


class MilterRefused(Exception):
    """A filter refused the message; *status* is sendmail's exit status."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


def filter_local(cfg, queue_id: str, sender: str, recipients: list[str], content: bytes,
                 helo: str = "") -> tuple[str, list[str], bytes, str]:
    """The filters' verdict on one local submission: (sender, recipients, content,
    state) with state ``maildrop``, ``hold`` or ``discard``; MilterRefused."""
    return trio.run(_filter, cfg, queue_id, sender, recipients, content, helo or "localhost")


async def _filter(cfg, queue_id: str, sender: str, recipients: list[str], content: bytes,
                  helo: str) -> tuple[str, list[str], bytes, str]:
    current: dict[str, str] = {}
    values = {"i": queue_id, "j": cfg.myhostname, "_": "localhost [127.0.0.1]", "daemon_name":
              cfg.milter_macro_daemon_name, "v": cfg.milter_macro_v, "client_addr": "127.0.0.1",
              "client_name": "localhost", "client_ptr": "localhost", "mail_addr": sender}
    chain = Milters(MilterSettings.from_config(cfg, cfg.non_smtpd_milters),
                    lambda name: current.get(name.strip("{}"), values.get(name.strip("{}"))))
    state = "maildrop"

    def verdict(resp: str | None, event: str) -> bool:
        """True when the filters have decided the message's fate."""
        nonlocal state
        if resp is None:
            return False
        whatsup = f"{queue_id}: %s: {event} from localhost[127.0.0.1]: %s; from=<{sender}>"
        if resp[0] == "H":
            if state != "hold":
                log.info(whatsup, "milter-hold", resp[1:] or "milter triggers HOLD action")
            state = "hold"
            return False
        if resp[0] == "D":
            log.info(whatsup, "milter-discard", "milter triggers DISCARD action")
            state = "discard"
            return True
        text = "421 4.7.0 Service unavailable" if resp[0] == "S" else resp
        log.info(whatsup, "milter-reject", text)
        raise MilterRefused(f"message refused by a mail filter: {text}",
                            os.EX_TEMPFAIL if text[0] == "4" else os.EX_UNAVAILABLE)

    try:
        if verdict(await chain.connect("localhost", "127.0.0.1", 0), "CONNECT") \
                or verdict(await chain.helo(helo), "HELO") \
                or verdict(await chain.mail([f"<{sender}>"]), "MAIL"):
            return sender, recipients, content, state
        for recipient in recipients:
            current["rcpt_addr"] = recipient
            if verdict(await chain.rcpt([f"<{recipient}>"]), "RCPT"):
                return sender, recipients, content, state
        current.pop("rcpt_addr", None)
        if verdict(await chain.data(), "DATA"):
            return sender, recipients, content, state
        spool = Spool(memory_limit=len(content))
        spool.write(content)
        _, offset = edit.split_header(content)
        message = edit.Content(spool, content[:offset], offset, own_first=True, sender=sender,
                               recipients=recipients, directory=cfg.queue_directory)
        if verdict(await chain.message(message), "END-OF-MESSAGE"):
            return sender, recipients, content, state
        if message.changed:
            built = await message.build()
            content = built.getvalue() or b"".join(built.chunks(1 << 20))
            built.close()
        if not message.recipients:
            raise MilterRefused("message refused by a mail filter: no recipients left", os.EX_UNAVAILABLE)
        return message.sender, message.recipients, content, state
    finally:
        chain.close()
