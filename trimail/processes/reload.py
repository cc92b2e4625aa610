"""Reload by generations: the master's ``trimail reload`` and SIGHUP.

main.cf is read and checked (its restriction lists, its tables) and the new
listeners are bound before anything changes; a configuration that fails keeps the
running one (``reload refused, keeping the running configuration: ...``).  Then a
new generation of smtpd workers starts with the new configuration; only when all
of them are ready are the old ones told to retire (close their listeners, let
every session run to its end), and listeners no longer configured are closed.  If
the new workers cannot start, the old ones go on as they were.  The qmgr worker
takes the new configuration in place, main.cf's text coming with the request (a
qmgr in the jail needs no access to the file); ``master_service_disable = qmgr``
retires it, and removing that starts one.  A new ``queue_directory`` is refused:
it takes a stop and a start (``config.RESTART_ONLY``).

The configuration serve runs is main.cf's text as the master last loaded it
(at start, or at the last reload it took), kept in a sealed in-memory file that
every worker started from then on inherits and loads (``text_memfd``): a worker
restarted after a crash runs what the others run, never an edit of main.cf that
was not reloaded, nor one a reload refused.  (Its tables, aliases and
certificates are read from their files when it starts, as a reload reads them.)

One reload at a time, none once stopping: the caller (``Master.reload``) holds
the lock.

Parameters: smtpd_workers, master_service_disable, smtpd_listen,
submission_listen, smtps_listen (plus everything the new workers read).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trimail import __version__
from trimail import config as configuration
from trimail.config import Config, ConfigError, refuse_restart_only_changes
from trimail.maps import TableError
from trimail.net.listener import ListenError, close_now, open_listeners
from trimail.policy.restrictions import restriction_lists
from trimail.processes.channel import ChannelClosed
from trimail.processes.slot import WorkerStartError
from trimail.startup import LISTENERS, Endpoint
from trimail.supervise import describe

if TYPE_CHECKING:
    from trimail.processes.supervisor import Master

log = logging.getLogger("trimail.master")


async def apply_reload(master: Master) -> str:
    """The new configuration, applied by generations; ``ok`` or ``error: ...``."""
    opened: list[Endpoint] = []
    try:
        text = read_main_cf(master.config.path)
        fresh = configuration.load(master.config.path, master.config.overrides, text=text)
        refuse_restart_only_changes(master.config, fresh)
        restriction_lists(fresh)
        wanted = {(kind, str(address)): address for kind, parameter in LISTENERS for address in fresh.get(parameter)}
        for key, address in wanted.items():
            if key not in master.listening:
                opened += [(listener, key[0], address) for listener in await open_listeners([address])]
    except (ConfigError, TableError, OSError, ListenError) as exc:
        for listener, _, _ in opened:
            await listener.aclose()
        log.error("reload refused, keeping the running configuration: %s", exc)
        return f"error: {exc}"
    except BaseException:  # cancelled by a stop: nothing changed yet but these
        for listener, _, _ in opened:
            close_now(listener)
        raise
    previous, master.config = master.config, fresh
    previous_text, master.main_cf = master.main_cf, text_memfd(text)  # what the new workers (and any restarted) load
    removed = {key: entries for key, entries in master.listening.items() if key not in wanted}
    for key in removed:
        del master.listening[key]
    for endpoint in opened:
        master.listening.setdefault((endpoint[1], str(endpoint[2])), []).append(endpoint)
    old = [slot for slot in master.slots if slot.role == "smtpd"]
    try:
        master.generation += 1
        await master._start_slots("smtpd", workers_wanted(fresh), master.generation)
    except BaseException as exc:  # the new workers cannot run: the old ones go on as they were
        # (undone whatever ended it, without a checkpoint: a stop's cancellation too)
        master.config = previous
        close_memfd(master.main_cf)
        master.main_cf = previous_text
        for endpoint in opened:
            master.listening[(endpoint[1], str(endpoint[2]))].remove(endpoint)
        master.listening = {key: entries for key, entries in master.listening.items() if entries}
        master.listening.update(removed)
        for listener, _, _ in opened:
            close_now(listener)
        if not isinstance(exc, WorkerStartError):
            raise
        log.error("reload refused, keeping the running configuration: %s", exc)
        return f"error: {exc}"
    close_memfd(previous_text)
    master.retired += old
    await master._retire(old, command="retire")  # they close their listeners and finish their sessions
    for entries in removed.values():
        for listener, _, _ in entries:
            await listener.aclose()
    await _reload_qmgr(master, fresh, text)
    master.reloads += 1
    log.info("reload -- version %s, configuration %s", __version__, fresh.source)
    return "ok"


async def _reload_qmgr(master: Master, fresh: Config, text: str | None) -> None:
    """The qmgr worker takes the new configuration in place (its deliveries in
    flight finish as they began); main.cf's text comes with the request, so a
    qmgr in the jail needs no access to the file."""
    qmgr = [slot for slot in master.slots if slot.role == "qmgr"]
    if "qmgr" in fresh.master_service_disable:
        await master._retire(qmgr, wait=True)
        return
    if not qmgr:
        await master._start_slots("qmgr", 1, master.generation)
        return
    for worker in master._live("qmgr"):
        try:
            await worker.request("reload", addresses=[str(a) for a in master.addresses], main_cf=text)
        except (ChannelClosed, trio.TooSlowError, RuntimeError) as exc:
            log.warning("qmgr worker pid %d did not take the reload: %s", worker.pid, describe(exc))


def text_memfd(text: str | None) -> int | None:
    """A sealed in-memory file holding main.cf's *text* (None: no file, the built-in
    defaults), inherited by every worker started from now on, which loads it
    (``worker.run``): a worker restarted after a crash runs the configuration serve
    runs, not whatever main.cf says by then (an edit not yet reloaded, or one a
    reload refused)."""
    if text is None:
        return None
    fd = os.memfd_create("trimail-main.cf", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = text.encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    return fd


def read_memfd(fd: int) -> str:
    """The text of a ``text_memfd`` (a worker's side); the descriptor is closed."""
    try:
        size = os.fstat(fd).st_size
        chunks, offset = [], 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def close_memfd(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def read_main_cf(path: Path | None) -> str | None:
    """main.cf's text, read once by the master for itself and for the qmgr worker."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None


def workers_wanted(config: Config) -> int:
    if config.smtpd_workers == 0:
        log.warning("smtpd_workers = 0 takes effect when serve starts again; keeping one smtpd worker")
    return max(1, config.smtpd_workers)
