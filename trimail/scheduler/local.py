"""Local and virtual jobs: local(8) and virtual(8) deliveries on threads of their own,
and the new messages an alias makes for its remote targets.

A local destination's worker (``local_worker``) takes its jobs until none is left;
each runs on a pool of 20 threads of its own (a slow command, a locked mbox or a
busy root helper never takes the threads the queue needs).  The content the agents
get is what the SMTP agent would send: masqueraded and with its headers rewritten
in the message's rewrite context (``transfer``).  Forwarded copies (``.forward``,
aliases with remote targets) are queued as new messages that carry the original
recipient and the rewrite context (``queue_forward``), and the alias's line says
``forwarded as ID``.

Parameters: none read here (the agents read theirs; masquerade_domains,
masquerade_exceptions and masquerade_classes through ``transfer``).

Security notes: an agent's failure defers only its job's recipients (4.3.0), the
message stays queued; content that is not whole is never delivered (``ContentError``).
"""

from __future__ import annotations

import time

import trio

from trimail.cleanup.rewrite import RWR_PARAM
from trimail.delivery.local.agent import ORIG_TO_PARAM, Expanded, Forward
from trimail.delivery.outcome import Outcome, sent
from trimail.queue import transitions
from trimail.queue.ids import new_queue_id
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.scheduler import transfer
from trimail.scheduler.destination import Destination, Job, Qmgr
from trimail.scheduler.transfer import ContentError
from trimail.supervise import thread_pool

# local(8) and virtual(8) run on threads of their own: one may wait long (a command,
# an mbox lock, the root helper), and must not take the threads the queue and the spool need
agent_threads = thread_pool("local and virtual delivery", 20)


async def local_worker(q: Qmgr, dest: Destination) -> None:
    dest.busy += 1  # a local worker takes jobs only while there are some
    try:
        while dest.jobs:
            job = dest.jobs.popleft()
            started = time.time()
            try:
                outcomes = await deliver_local(q, job)
            except Exception as exc:  # the job's boundary: defer its recipients, keep the message
                outcomes = q.job_failed(job, exc)
            await q.complete(job, outcomes, job.route.transport, started)
    finally:
        dest.busy -= 1
        dest.workers -= 1
        if q.metrics is not None:
            q.metrics.delivery_worker(str(dest.route), -1)
        if not dest.jobs and dest.workers == 0 and q.destinations.get(dest.key) is dest:
            del q.destinations[dest.key]


async def deliver_local(q: Qmgr, job: Job) -> list[Outcome]:
    content = job.message.content
    if content is None:
        content = await q.writer.read(transitions.read_content, job.message.id)
        if content is None or len(content) != job.message.size:
            raise ContentError(f"content {'missing' if content is None else len(content)} "
                               f"of {job.message.size} bytes")
    # what Postfix's cleanup did before queueing (masquerading, header rewriting in the
    # message's rewrite context) is what local mailboxes see too, as the SMTP agent sends it
    content = transfer.local_content(q, job, content)
    sender = transfer.masquerade_address(q, job.message.sender, "envelope_sender")
    if job.route.transport == "virtual":  # virtual(8): mailboxes only, nothing to forward
        return await trio.to_thread.run_sync(
            q.virtual.deliver, sender, [r.address for r in job.recipients], content,
            limiter=agent_threads())
    result = await trio.to_thread.run_sync(
        q.local.deliver, sender, [r.address for r in job.recipients], content,
        limiter=agent_threads())
    outcomes = result.outcomes
    for forward in result.forwards:
        # the original recipient travels with the copy (Postfix's ORCP record): a copy of a
        # copy keeps the first one, list mail (owner-<alias>) starts afresh
        orig_to = "" if forward.list_mail else job.message.params.get(ORIG_TO_PARAM) or forward.orig_to
        with trio.CancelScope(shield=True):
            new_id = await q.writer.run(queue_forward, forward, content, orig_to,
                                        job.message.params.get(RWR_PARAM), durable=False)
        q.wake()  # the forwarded copy waits in incoming for a round
        outcome = outcomes[forward.index]  # Postfix's local(8): "to=<alias>, ... (forwarded as ID)"
        lines = outcome.lines if isinstance(outcome, Expanded) else ()
        outcomes[forward.index] = Expanded(outcome.status, outcome.dsn, outcome.text,
                                           (*lines, (forward.orig_to, sent(f"forwarded as {new_id}"))))
    return outcomes


def queue_forward(store: Store, forward: Forward, content: bytes, orig_to: str = "",
                  context: str | None = None) -> str:
    """The new message an alias makes for its remote targets: it carries the original
    recipient (*orig_to*) and keeps the rewrite *context* of the message it came from
    (Postfix's local(8) forward passes both on)."""
    spool = Spool()
    for address in forward.delivered_to:
        spool.write(f"Delivered-To: {address}\r\n".encode())
    spool.write(content)
    new_id = new_queue_id()
    params: dict[str, str | None] = {ORIG_TO_PARAM: orig_to} if orig_to else {}
    if context:
        params[RWR_PARAM] = context
    store.insert_message(NewMessage(new_id, forward.sender, forward.recipients, spool, protocol="local",
                                    params=params))
    return new_id
