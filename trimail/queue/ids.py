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

_lock = threading.Lock()
_counter = itertools.count(secrets.randbelow(_BASE**_SEQ_DIGITS))
_last_us = 0


def _new_process() -> None:
    """A forked process (the fork server's workers) starts a random part of its own:
    two workers forked from one parent counted alike and, in the same microsecond,
    gave two messages one ID (the second commit failed: 451)."""
    global _counter, _lock
    _lock = threading.Lock()
    _counter = itertools.count(secrets.randbelow(_BASE**_SEQ_DIGITS))


os.register_at_fork(after_in_child=_new_process)


def _encode(value: int, digits: int) -> str:
    chars = []
    for _ in range(digits):
        value, rem = divmod(value, _BASE)
        chars.append(ALPHABET[rem])
    return "".join(reversed(chars))


def new_queue_id() -> str:
    global _last_us
    with _lock:
        now = max(time.time_ns() // 1000, _last_us)
        _last_us = now
        seq = next(_counter) % (_BASE**_SEQ_DIGITS)
    return _encode(now, _TIME_DIGITS) + _encode(seq, _SEQ_DIGITS)


def is_queue_id(text: str) -> bool:
    return len(text) == _TIME_DIGITS + _SEQ_DIGITS and all(c in ALPHABET for c in text)
