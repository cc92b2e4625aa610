"""What the master tells the operator about its workers: ``trimail status``,
the dead destinations, and one ``/metrics`` for all processes.

Each asks the live workers over their channels at once (``Master._ask_all``:
3 s at most each); a worker that does not answer is shown as not answering and
its sessions are still counted, from the session board.  The metrics are the
sum of the master's registry, every live worker's and the last counts of the
workers that are gone (trimail.processes.aggregate).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import trio

from trimail.processes.aggregate import merge
from trimail.processes.channel import ChannelClosed

if TYPE_CHECKING:
    from trimail.processes.supervisor import Master


async def dead(master: Master) -> str:
    for worker, answer in await master._ask_all("dead", "qmgr"):
        if not isinstance(answer, Exception):
            return json.dumps(answer)
    return json.dumps({"total": 0, "dead": []})


async def status(master: Master) -> str:
    workers: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"sessions": 0, "stress": False, "delivery_helper": "", "dead_destinations": [],
                             "dead_destinations_total": 0}
    answered = {worker.pid: answer for worker, answer in await master._ask_all("status")}
    for slot in master.slots + master._retiring():
        entry: dict[str, Any] = {"role": slot.role, "generation": slot.generation, "restarts": slot.restarts}
        worker = slot.worker
        if worker is None:
            entry["state"] = "waiting" if slot.waiting else "starting"  # a restart's back-off, or its start
        elif isinstance(answered.get(worker.pid), dict):
            answer = answered[worker.pid]
            entry.update(state="retiring" if slot.retired else "running", pid=worker.pid,
                         uptime=answer.get("uptime"))
            if slot.role == "smtpd":
                entry["sessions"] = answer.get("sessions", 0)
                facts["stress"] = facts["stress"] or bool(answer.get("stress"))
            else:
                entry["active"] = answer.get("active", 0)
                for key in ("delivery_helper", "dead_destinations", "dead_destinations_total"):
                    facts[key] = answer.get(key, facts[key])
        else:
            entry.update(state="not answering", pid=worker.pid,
                         uptime=round(time.monotonic() - worker.started, 3))
        workers.append(entry)
    facts["sessions"] = master.board.total()  # a worker that does not answer still has its sessions open
    server = master.fork_server
    facts["fork_server"] = server.pid if server is not None and server.alive else None
    return json.dumps({"pid": os.getpid(), "uptime": round(time.monotonic() - master.started, 3),
                       "listeners": [str(a) for a in master.addresses], "reloads": master.reloads,
                       "configuration": master.config.source, "workers": workers, **facts})


async def refresh_metrics(master: Master) -> None:
    """The queue gauges, as a worker reads them (the qmgr's, else an smtpd worker's;
    with none answering they keep their last values).  The master never touches the
    queue database once its workers run: its mapping of the WAL index (``-shm``)
    would make a truncation of that file (by whoever owns the queue directory,
    ``mail_owner`` included) a SIGBUS in the root master, and the end of every worker
    with it; a worker that takes one is restarted."""
    from trimail.processes.supervisor import ASK_TIMEOUT  # (it imports this module)

    facts = None
    deadline = trio.current_time() + ASK_TIMEOUT  # for them all: a scrape waits no longer for stuck workers
    for worker in master._live("qmgr") + master._live("smtpd"):
        left = deadline - trio.current_time()
        if left <= 0:
            break
        try:
            facts = await worker.request("queue", timeout=left)
            break
        except (ChannelClosed, trio.TooSlowError, RuntimeError):
            continue
    if not isinstance(facts, dict):
        return
    master.metrics.set_queue(facts.get("counts", {}), facts.get("oldest"))


async def exposition(master: Master) -> bytes:
    texts = [master.metrics.exposition().decode(), master._departed]
    for worker, answer in await master._ask_all("metrics"):
        if isinstance(answer, str):
            texts.append(answer)
            if worker.process.poll() is None:
                master._scraped[worker.pid] = answer
    return merge(texts)
