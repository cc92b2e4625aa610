"""Retry timing as a pure function (Postfix's exponential backoff, with jitter)."""

from __future__ import annotations

import random


def retry_delay(attempts: int, minimal: float, maximal: float, rand: random.Random | None = None) -> float:
    """Seconds until the next attempt after *attempts* failed ones (1, 2, ...):
    ``minimal * 2**(attempts-1)`` capped at ``maximal``, then spread by +-10% so
    that mail deferred together is not retried in one burst."""
    base = min(maximal, minimal * 2 ** min(max(0, attempts - 1), 64))  # 2**64: beyond any maximal
    jitter = (rand or random).uniform(0.9, 1.1)
    return max(minimal * 0.9, min(maximal * 1.1, base * jitter))
