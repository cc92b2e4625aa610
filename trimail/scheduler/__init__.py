"""The queue manager (Postfix's qmgr): ``qmgr.py`` (rounds, hand-over, limits),
``destination.py`` (jobs, workers, connection cache), ``results.py`` (outcome ->
record, expiry, DSNs, delay warnings), ``backoff.py`` (retry times)."""

from trimail.scheduler.qmgr import Scheduler

__all__ = ["Scheduler"]
