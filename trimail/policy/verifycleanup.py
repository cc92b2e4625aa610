"""The address-verification cache's cleanup task (``clean_cache``): expired answers
and lapsed probe marks removed from the shared cache every
address_verify_cache_cleanup_interval, in one process of a serve (the qmgr
worker, or a single-process serve); the cache itself (trimail.queue.verifycache)
records when the last run completed, as Postfix's dict_cache does.  The probes
and the cache's readers are trimail.policy.verify.

Parameters: address_verify_cache_cleanup_interval, address_verify_map,
address_verify_positive_expire_time, address_verify_negative_expire_time,
queue_busy_timeout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import trio

from trimail.config import Config
from trimail.queue.verifycache import VerifyCache, cache_file
from trimail.supervise import describe

log = logging.getLogger("trimail.verify")

CLEANUP_LOOK_AGAIN = 600.0  # seconds: how often the cleanup task re-reads a reloaded configuration


async def clean_cache(current: Callable[[], Config]) -> None:
    """address_verify_cache_cleanup_interval: remove expired entries and lapsed
    probe marks from the shared cache, in one process of a serve (the qmgr worker,
    or a single-process serve); *current* gives the configuration in force.  A run
    is due that interval after the last one completed, which the cache itself
    records (Postfix's dict_cache), so a restart neither repeats nor postpones it.
    Nothing is done while the cache file does not exist (no worker verified
    anything yet) or when it is in memory.  The error boundary of the task: a
    failure is one warning, tried again later."""
    cache: VerifyCache | None = None
    try:
        while True:
            config = current()
            interval: float = config.address_verify_cache_cleanup_interval
            path = cache_file(config.address_verify_map)
            if interval <= 0 or path is None:
                await trio.sleep(CLEANUP_LOOK_AGAIN)
                continue
            if not os.path.exists(path):
                await trio.sleep(min(interval, CLEANUP_LOOK_AGAIN))
                continue
            if cache is None or cache.path != path:
                if cache is not None:
                    cache.close()
                cache = VerifyCache(path, busy_timeout=config.queue_busy_timeout)
            try:
                wait = await trio.to_thread.run_sync(cache.cleanup_due, time.time(), interval)
                if wait > 0:
                    await trio.sleep(min(wait, CLEANUP_LOOK_AGAIN))
                    continue
                retained, dropped = await trio.to_thread.run_sync(
                    cache.cleanup, time.time(), config.address_verify_positive_expire_time,
                    config.address_verify_negative_expire_time)
                log.info("cache %s full cleanup: retained=%d dropped=%d entries", config.address_verify_map,
                         retained, dropped)
            except Exception as exc:  # noqa: BLE001 (the boundary: VerifyCacheError, or a bug)
                log.warning("address verification cache cleanup failed: %s", describe(exc))
                await trio.sleep(min(interval, CLEANUP_LOOK_AGAIN))
    finally:
        if cache is not None:
            cache.close()
