"""``sendmail -bv``: the delivery report a sender asks for instead of delivery.

Postfix's ``-bv`` enqueues the message with a "verify" flag; the delivery agents then
say what they would do and bounce(8) mails a "Mail Delivery Status Report" (a
multipart/report with ``Action: deliverable`` or ``undeliverable`` per recipient and
the message headers) to the sender.  trimail decides the same from the route alone,
in the sendmail process: for each recipient (qualified, virtual aliases applied)

- the address class (``trimail/rewrite.py``): ``invalid`` is undeliverable (5.1.3);
- the class's recipient table (``trimail/unlisted.py``: local_recipient_maps,
  relay_recipient_maps, virtual_mailbox_maps): an unlisted user is undeliverable
  with smtpd's text;
- the route (transport_maps, relayhost, the class's transport): ``error:`` is
  undeliverable with its text, ``discard:`` deliverable;
- for ``local``, the alias expansion (alias_maps): where the mail would go, or the
  expansion's error.

It prints one line per recipient on standard output and, unless the sender is null,
queues the report to the sender (from the null sender).  Unlike Postfix it does not
connect to an SMTP nexthop to ask the recipient (Postfix's smtp agent does, up to
RCPT).  The exit status is 0 once the report is queued, whatever it says (Postfix).

Parameters: myhostname, alias_maps, recipient_delimiter, allow_mail_to_commands, default_privs and
those of the resolver, the router and the recipient tables.
"""

from __future__ import annotations

import re
import time

import trio

from trimail import rewrite
from trimail.cleanup.submit import enqueue
from trimail.config import Config
from trimail.delivery.bounce import Failure, build_dsn
from trimail.delivery.local.aliases import AliasError, Expander
from trimail.delivery.route import RouteError, Router
from trimail.maps import TableError, open_table
from trimail.queue.ids import new_queue_id
from trimail.unlisted import RecipientTables


def verify_report(cfg: Config, sender: str, rcpts: list[str], content: bytes, out) -> int:
    """``-bv``: what would happen to each recipient, printed and (unless the sender is
    null) mailed to the sender as a "Mail Delivery Status Report" with the message's
    headers, as Postfix does; nothing is delivered.  Unlike Postfix, nothing is
    probed: the report is the route (virtual aliases, the address class, aliases for
    local names, transport_maps, relayhost), not a test connection to the nexthop."""
    router = Router(cfg)
    verdicts = [_verdict(cfg, router, rcpt) for rcpt in rcpts]
    for failure in verdicts:
        out.write(f"<{failure.recipient}>: {failure.diagnostic}\n".encode("utf-8", "backslashreplace"))
    out.flush()
    if sender:
        report_id = new_queue_id()
        report = build_dsn(hostname=cfg.myhostname, queue_id=report_id, sender=sender, arrival_time=time.time(),
                           failures=verdicts, original=content, requested=True)
        enqueue(cfg, report_id, "", [sender], report, protocol="bounce")
    return 0


def _verdict(cfg: Config, router: Router, rcpt: str) -> Failure:
    def result(text: str, status: str = "2.0.0") -> Failure:
        return Failure(rcpt, status, text, action="deliverable" if status.startswith("2") else "undeliverable")

    try:
        resolved = rewrite.resolve(rcpt, router.rewrite)
        if resolved.klass == "invalid":
            return result("undeliverable: bad address syntax", "5.1.3")
        unlisted = trio.run(RecipientTables(cfg).unlisted, resolved)
        if unlisted is not None:
            _, status, text = unlisted.text(rcpt)
            return result(f"undeliverable: {text}", status)
        route = router.route(rcpt)
    except (RouteError, TableError, ValueError) as exc:
        return result(f"undeliverable: {exc}", "4.3.0")
    if route.transport in ("error", "retry"):
        return result(f"undeliverable: {route.nexthop or 'mail for this address is refused'}", status_of_text(
            route.nexthop, "5.0.0" if route.transport == "error" else "4.0.0"))
    if route.transport == "discard":
        return result(f"delivery via discard: {route.nexthop or 'discarded'}")
    if route.transport != "local":
        return result(f"delivery via {route}: route only, the nexthop was not asked")
    try:
        tables = [open_table(ref, lazy=True) for ref in cfg.alias_maps]
        targets = Expander(tables, router.rewrite, cfg.recipient_delimiter,
                           frozenset(cfg.allow_mail_to_commands), cfg.default_privs).expand(resolved.local)
    except AliasError as exc:
        return result(f"undeliverable: {exc.text}", exc.dsn)
    except TableError as exc:
        return result(f"undeliverable: {exc}", "4.3.0")
    if not targets:
        return result("delivery via local: delivers to mailbox")
    shown = {"mailbox": "mailbox of {}", "remote": "forwarded to <{}>", "file": "file {}", "command": "command {}"}
    return result("delivery via local: delivers to " + ", ".join(shown[t.kind].format(t.value) for t in targets))


def status_of_text(text: str, default: str) -> str:
    match = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", text)
    return match.group(1) if match else default
