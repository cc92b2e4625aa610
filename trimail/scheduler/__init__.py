"""The queue manager (Postfix's qmgr): ``qmgr.py`` (rounds, hand-over, limits),
``dispatch.py`` (a message's recipients routed and split into jobs),
``destination.py`` (a destination's jobs and window), ``workers.py`` (its workers,
connection cache, feedback), ``local.py`` (local and virtual jobs), ``results.py`` (outcome ->
record, expiry, DSNs, delay warnings), ``backoff.py`` (retry times)."""

from trimail.scheduler.qmgr import Scheduler

__all__ = ["Scheduler"]
