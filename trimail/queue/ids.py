"""Queue IDs: short, unique and sortable, after Postfix's long queue IDs.

An ID is 10 characters of microseconds since the epoch followed by 4 characters
that are random within one process start (or fork) and then count up, all in an alphabet
whose ASCII order is its numeric order, so IDs sort by arrival.  The random part
keeps IDs from two processes (serve and sendmail) apart; the database's primary
key is the final guard.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time

ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjkmnpqrstvwxyz"  # no vowels: no words
_BASE = len(ALPHABET)
_TIME_DIGITS = 10  # 51**10 microseconds is about 3.8 million years
_SEQ_DIGITS = 4

_PAIRS = [first + second for first in ALPHABET for second in ALPHABET]  # two digits at once
_PAIR = _BASE**2
_LOW = _BASE**4  # the time's last 4 digits: the first 6 change once in 6.8 s

_lock = threading.Lock()
_counter = itertools.count(secrets.randbelow(_BASE**_SEQ_DIGITS))
_last_us = 0
_high: tuple[int, str] = (-1, "")  # the time's first 6 digits, and as text


def _new_process() -> None:
    """A forked process (the fork server's workers) starts a random part of its own:
    two workers forked from one parent counted alike and, in the same microsecond,
    gave two messages one ID (the second commit failed: 451)."""
    global _counter, _lock
    _lock = threading.Lock()
    _counter = itertools.count(secrets.randbelow(_BASE**_SEQ_DIGITS))


os.register_at_fork(after_in_child=_new_process)


def _encode(value: int, digits: int) -> str:
    """*value* in *digits* (an even number) digits of ALPHABET, the first the highest."""
    pairs = []
    for _ in range(digits // 2):
        value, rem = divmod(value, _PAIR)
        pairs.append(_PAIRS[rem])
    return "".join(reversed(pairs))


def new_queue_id() -> str:
    global _last_us
    with _lock:
        now = max(time.time_ns() // 1000, _last_us)
        seq = next(_counter) % (_BASE**_SEQ_DIGITS)
        if seq == 0 and now == _last_us:  # the count wrapped within a microsecond: the next one keeps IDs sorted
            now += 1
        _last_us = now
    global _high
    high, low = divmod(now, _LOW)
    known = _high
    if known[0] != high:
        known = _high = (high, _encode(high, _TIME_DIGITS - 4))
    return known[1] + _PAIRS[low // _PAIR] + _PAIRS[low % _PAIR] + _PAIRS[seq // _PAIR] + _PAIRS[seq % _PAIR]


def is_queue_id(text: str) -> bool:
    return len(text) == _TIME_DIGITS + _SEQ_DIGITS and all(c in ALPHABET for c in text)
