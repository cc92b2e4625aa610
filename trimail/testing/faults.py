"""Fault injection for the test MTA: refuse, defer, drop, slow down or greylist at a
chosen stage of the SMTP dialogue (``connect``, ``auth``, ``mail``, ``rcpt``,
``data``, ``end``), hang up after N bytes of a message, fail STARTTLS,
each matched on a pattern (sender, recipient, AUTH user or client address), a number
of times, or at random with a seed.  ``FaultInjection`` is the part of the test
MTA's API that arms the faults; ``_Hooks`` (hooks.py) is what the sessions call."""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import random
import ssl
import threading
from typing import Any

from trimail.smtp.replies import Reply

STAGES = ("connect", "auth", "mail", "rcpt", "data", "end")
# the enhanced code's subject.detail when none is given, per stage
_DETAIL = {"connect": "3.2", "auth": "7.8", "mail": "1.0", "rcpt": "1.1", "data": "7.1", "end": "7.1"}


@dataclasses.dataclass(slots=True)
class Fault:
    """One armed fault.  ``hits``: how many times it fired."""

    stage: str
    reply: Reply | None  # None: drop the connection (or, with delay, answer late)
    pattern: str | None = None  # fnmatch pattern: sender (mail), recipient (rcpt), user (auth), client (connect)
    remaining: int | None = None  # None: every time
    delay: float | None = None  # slow(): answer this many seconds late (0 too), instead of dropping
    after_bytes: int | None = None  # stage "data": hang up once this many content bytes arrived
    tls: str | None = None  # stage "starttls": "handshake", "expired" or "untrusted"
    probability: float = 1.0
    rng: random.Random | None = None  # the seeded draw of a probabilistic fault
    hits: int = 0

    def fires(self) -> bool:
        """Count one firing, unless used up or (probabilistic) the draw says no."""
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.rng is not None and self.rng.random() >= self.probability:
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.hits += 1
        return True


def _chance(probability: float, seed: int | None) -> dict[str, Any]:
    if not 0.0 <= probability <= 1.0:
        raise ValueError("probability must be between 0 and 1")
    return {"probability": probability, "rng": random.Random(seed)} if probability < 1.0 else {}


def _refusal(code: int) -> None:
    """A fault's reply is a refusal: ``code=250`` told the client its recipient was
    accepted while the MTA dropped it, and 99 or 700 went out as malformed replies."""
    if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
        raise ValueError(f"code must be a 4xx or 5xx reply code, not {code!r}")


def _stage(stage: str, allowed: tuple[str, ...] = STAGES) -> str:
    if stage not in allowed:
        raise ValueError(f"stage must be one of {allowed}")
    return stage


class FaultInjection:
    """The fault-arming half of the test MTA's API (mixed into ``TestMTABase``).

    Every method returns the ``Fault``; its ``hits`` counts the times it fired.
    ``probability=p`` fires each time with chance p, drawn from ``random.Random(seed)``:
    the same seed gives the same sequence of faults."""

    _lock: threading.Condition
    _faults: list[Fault]
    _greylist: set[tuple[str, str, str]] | None

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def reject(self, *, rcpt: str | None = None, sender: str | None = None, user: str | None = None,
               client: str | None = None, stage: str | None = None, code: int = 550,
               text: str = "Rejected by the test MTA", enhanced: str | None = None, count: int | None = None,
               probability: float = 1.0, seed: int | None = None) -> Fault:
        """Refuse a recipient (``rcpt`` pattern), a sender, an AUTH ``user``, a ``client``
        address at connect (the greeting), or the ``connect``/``auth``/``data``/``end`` stage."""
        _refusal(code)
        chosen = _stage(stage or ("rcpt" if rcpt else "mail" if sender else "auth" if user
                                  else "connect" if client else "data"))
        given = [(name, at) for name, at, value in (("rcpt", "rcpt", rcpt), ("sender", "mail", sender),
                                                     ("user", "auth", user), ("client", "connect", client))
                 if value is not None]
        # one pattern, on what the stage sees: reject(stage="mail", rcpt=...) matched the sender with it,
        # and reject(rcpt=..., sender=...) ignored the sender
        if len(given) > 1 or (given and given[0][1] != chosen):
            raise ValueError(f"{', '.join(f'{name}=' for name, _ in given)} and stage={chosen!r} do not go "
                             "together: one pattern, rcpt= (stage 'rcpt'), sender= ('mail'), user= ('auth') "
                             "or client= ('connect')")
        klass = "4" if code < 500 else "5"
        detail = "7.0" if chosen == "auth" and klass == "4" else _DETAIL[chosen]
        reply = Reply(code, enhanced or f"{klass}.{detail}", text)
        return self._add(Fault(chosen, reply, rcpt or sender or user or client, count, **_chance(probability, seed)))

    def defer(self, *, rcpt: str | None = None, sender: str | None = None, stage: str | None = None,
              code: int = 451, text: str = "Try again later", count: int | None = None,
              probability: float = 1.0, seed: int | None = None) -> Fault:
        return self.reject(rcpt=rcpt, sender=sender, stage=stage, code=code, text=text, count=count,
                           enhanced="4.7.1" if code != 452 else "4.5.3", probability=probability, seed=seed)

    def defer_next(self, count: int = 1, code: int = 451, text: str = "Try again later") -> Fault:
        """The next *count* messages are deferred at the end of DATA."""
        _refusal(code)
        return self._add(Fault("end", Reply(code, "4.3.0", text), None, count))

    def drop(self, stage: str = "data", count: int | None = None, *, after_bytes: int | None = None,
             probability: float = 1.0, seed: int | None = None) -> Fault:
        """Close the connection without a reply at *stage* (``connect``: before the
        greeting, a refused connection); ``after_bytes=n`` (stage ``data``): in the middle
        of DATA, once n bytes of the message arrived."""
        if after_bytes is not None and stage != "data":
            raise ValueError("after_bytes goes with stage='data'")
        return self._add(Fault(_stage(stage), None, None, count, after_bytes=after_bytes,
                               **_chance(probability, seed)))

    def slow(self, seconds: float, stage: str = "rcpt", count: int | None = None, *,
             probability: float = 1.0, seed: int | None = None) -> Fault:
        """Delay the reply at *stage* by *seconds* (``connect``: a slow banner), then answer normally."""
        if not seconds >= 0:  # slow(0) answered at once? it dropped the connection; slow(-1) was a 451
            raise ValueError("seconds must be 0 or more")
        return self._add(Fault(_stage(stage), None, None, count, delay=seconds, **_chance(probability, seed)))

    def fail_tls(self, kind: str = "handshake", count: int | None = None, *, probability: float = 1.0,
                 seed: int | None = None) -> Fault:
        """Make STARTTLS fail after its ``220``: ``handshake`` (the server has no
        certificate to offer and breaks the handshake off), ``expired`` (a certificate from the test CA whose validity
        ended yesterday) or ``untrusted`` (a valid certificate from another CA).  Needs
        ``tls=True``."""
        if kind not in ("handshake", "expired", "untrusted"):
            raise ValueError("kind must be 'handshake', 'expired' or 'untrusted'")
        if getattr(self, "ca", None) is None:
            raise ValueError("STARTTLS faults need a test MTA with tls=True")
        return self._add(Fault("starttls", None, None, count, tls=kind, **_chance(probability, seed)))

    def greylist(self) -> None:
        """Defer the first attempt of each (client, sender, recipient) triple with 450."""
        with self._lock:
            self._greylist = set()

    def _match_fault(self, stage: str, address: str | None, txn_sender: str | None = None,
                     client: str = "") -> Fault | None:
        """The fault that fires now at *stage* for *address*, if any (each fault is
        asked in the order armed; the first that fires wins)."""
        if not self._faults and self._greylist is None:  # nothing armed (most tests): no lock taken
            return None
        with self._lock:
            if stage == "rcpt" and self._greylist is not None and txn_sender is not None:
                triple = (client, txn_sender.lower(), (address or "").lower())
                if triple not in self._greylist:
                    self._greylist.add(triple)
                    return Fault("rcpt", Reply(450, "4.7.1", f"<{address}>: Recipient address rejected: "
                                                             "Greylisted, try again later"))
            for fault in self._faults:
                if fault.stage != stage or fault.after_bytes is not None:
                    continue
                if fault.pattern is not None and not fnmatch.fnmatch((address or "").lower(), fault.pattern.lower()):
                    continue
                if fault.fires():
                    return fault
        return None

    def _cut_after(self, received: int) -> bool:
        """Does a ``drop(after_bytes=n)`` fire, *received* content bytes into a message?"""
        if not self._faults:
            return False
        with self._lock:
            return any(fault.after_bytes is not None and received >= fault.after_bytes and fault.fires()
                       for fault in self._faults)

    @property
    def faults(self) -> list[Fault]:
        """The armed faults, in order (each with its ``hits``)."""
        with self._lock:
            return list(self._faults)


def tls_fault_context(kind: str, ca: Any, hosts: list[str]) -> ssl.SSLContext:
    """A server context whose STARTTLS handshake fails as *kind* says: ``handshake``
    (no certificate at all: no cipher can be agreed), ``expired``
    (signed by the test CA, *ca*, valid until yesterday) or ``untrusted`` (valid, from
    a CA nobody trusts); the certificates name *hosts*, so only the fault fails them."""
    import trustme  # a test dependency, as for tls=True

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    names = list(dict.fromkeys(["127.0.0.1", "localhost", "trimail.test", *hosts]))
    if kind == "expired":
        now = datetime.datetime.now(datetime.UTC)
        ca.issue_cert(*names, not_before=now - datetime.timedelta(days=30),
                      not_after=now - datetime.timedelta(days=1)).configure_cert(ctx)
    elif kind == "untrusted":
        trustme.CA().issue_cert(*names).configure_cert(ctx)
    return ctx
