"""The control socket's commands of a single-process serve (``trimail flush``,
``reload``, ``stop``, ``status``, ``queue summary``'s dead destinations, and the
queue tools' wake-up) and the status it reports, for one ``Server``: what
master.serve hands to trimail.net.control.serve_control.  A serve with worker
processes answers them in trimail.processes.supervisor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trimail.delivery.local import privileged
from trimail.qshape import dead_destinations

if TYPE_CHECKING:
    from trimail.service import Server


def command_table(*, flush: Callable[[], object], wake: Callable[[], object], stop: Callable[[], object],
                  reload: Callable[[], Any], status: Callable[[], Any], dead: Callable[[], Any],
                  ) -> dict[str, Callable[[], Any]]:
    """The control socket's commands, for either process model: *flush* (dead sites
    tried again), *wake* (hold/release/delete/requeue: no flush, as postsuper never
    unthrottles) and *stop* answer "ok"; the others answer what they return."""
    def done(action: Callable[[], object]) -> Callable[[], str]:
        def run() -> str:
            action()
            return "ok"
        return run

    return {"flush": done(flush), "wake": done(wake), "ping": lambda: "ok", "reload": reload, "stop": done(stop),
            "status": status, "dead": dead}


def control_commands(server: Server) -> dict[str, Callable[[], Any]]:
    def flush() -> None:
        server.scheduler.dead.flush()  # a flush tries dead sites again (Postfix's QMGR_REQ_FLUSH_DEAD)
        server.scheduler.wake()

    return command_table(flush=flush, wake=lambda: server.scheduler.wake(), stop=server.stop, reload=server.reload,
                         status=lambda: status(server), dead=lambda: json.dumps(dead(server)))


def dead(server: Server) -> dict[str, Any]:
    """The destinations the queue manager holds dead now (``trimail queue summary``,
    ``trimail status``): ``{"total": N, "dead": [...]}``, bounded (trimail.qshape)."""
    return dead_destinations(server.dead_now())


def status(server: Server) -> str:
    held = dead(server)
    return json.dumps({
        "pid": os.getpid(),
        "uptime": round(time.monotonic() - server.started, 3),
        "listeners": [str(a) for a in server.addresses],
        "sessions": len(server.sessions),
        "stress": server.anvil.stress,
        "reloads": server.reloads,
        "configuration": server.config.source,
        "delivery_helper": privileged.state(),
        "dead_destinations": held["dead"],
        "dead_destinations_total": held["total"],
    })
