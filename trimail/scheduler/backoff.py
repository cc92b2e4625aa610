"""Retry timing as a pure function (Postfix's exponential backoff, with jitter).

Postfix's qmgr doubles the time a message has spent in the queue and clamps it
to ``[minimal_backoff_time, maximal_backoff_time]`` (qmgr_active.c).  trimail
doubles per failed attempt and spreads the result by up to 10% either way, so
mail deferred together is not retried in one burst; the clamp comes after the
jitter, so a retry is never earlier than ``minimal_backoff_time`` nor later than
``maximal_backoff_time``.  When an operator sets minimal above maximal, minimal
wins, as in Postfix (its lower clamp is applied last).

Parameters: minimal_backoff_time, maximal_backoff_time (read by the caller).
"""

from __future__ import annotations

import random


def retry_delay(attempts: int, minimal: float, maximal: float, rand: random.Random | None = None) -> float:
    """Seconds until the next attempt after *attempts* failed ones (1, 2, ...):
    ``minimal * 2**(attempts-1)`` capped at ``maximal``, spread by +-10%, and
    always within ``[minimal, maximal]``."""
    base = min(maximal, minimal * 2 ** min(max(0, attempts - 1), 64))  # 2**64: beyond any maximal
    jitter = (rand or random).uniform(0.9, 1.1)
    return max(minimal, min(maximal, base * jitter))
