"""``trimail serve`` with worker processes: the master's start-up and run.

The start-up steps are the single process's (trimail.startup.opened_queue): the
descriptor limit, the queue lock, the warnings, the queue database (opened,
migrated, recovered) and the certificate; then every listener, the control
socket and the metrics endpoint; then, started as root, the queue directory is
given to ``mail_owner`` once; then the Master runs its workers
(trimail.processes.supervisor) until it is stopped.

Parameters: queue_directory, mail_owner, allow_root (plus what
trimail.processes.supervisor and the listeners read).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

from trimail import config as configuration
from trimail.config import Config
from trimail.privileges import hand_over, owner_ids
from trimail.processes.forkserver import ForkServer
from trimail.processes.reload import read_main_cf, text_memfd
from trimail.processes.supervisor import Master
from trimail.startup import open_endpoints, opened_queue

log = logging.getLogger("trimail.master")


def hand_queue_over(config: Config, queue_directory: str) -> None:
    """Started as root: the queue directory goes to mail_owner once, here, before
    any worker runs (each worker then only enters the jail and drops root); an
    unusable mail_owner ends serve now with one line, as in one process."""
    if os.geteuid() != 0 or config.allow_root:
        return
    uid, gid = owner_ids(config.mail_owner)
    hand_over(Path(queue_directory), uid, gid)


async def serve_processes(config: Config, fork_server: ForkServer | None = None, *,
                          task_status: trio.TaskStatus[Master] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the master until ``Master.stop()``; readiness is reported with the Master.
    Workers are forked by *fork_server* when there is one (``trimail serve`` starts
    it before anything else: trimail.processes.forkserver)."""
    main_cf = read_main_cf(config.path)  # the text every worker loads (trimail.processes.reload)
    if main_cf is not None:
        config = configuration.load(config.path, config.overrides, text=main_cf)
    try:
        async with opened_queue(config) as queue:
            listeners, control, metrics_listeners = await open_endpoints(config, queue.directory)
            assert control is not None  # only a test queue has none, and no test MTA runs worker processes
            hand_queue_over(config, queue.directory)
            master = Master(config, queue.writer, queue.lock, listeners, fork_server)
            master.main_cf = text_memfd(main_cf)
            master.queue_directory = queue.directory
            master.queue_index = queue.index  # mapped by the master's own connection
            async with trio.open_nursery() as nursery:
                if fork_server is not None:
                    nursery.start_soon(fork_server.run)
                try:
                    await master.run(control, metrics_listeners, task_status=task_status)
                finally:
                    master._send_trigger.close()
                    master._receive_trigger.close()
                    if fork_server is not None:  # every worker has exited: it exits too, and run() returns
                        with trio.CancelScope(shield=True):
                            await fork_server.shut()
            log.info("terminating on stop request")
    finally:
        if fork_server is not None:
            fork_server.abandon()
