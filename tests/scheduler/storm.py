"""A retry storm for queue-manager tests: many due deferred messages written
straight into a queue database before serve starts, and SMTP sessions that time
each end-of-data -> 250 while serve works through them."""

from __future__ import annotations

import smtplib
import statistics
import threading
import time
from pathlib import Path
from typing import Self

from aiosmtpd.controller import Controller

from tests.peers import Recorder
from tests.ports import free_port as _free_port
from trimail.queue.store import Store


def queue_due_retries(queue_directory: Path, count: int, domain: str = "retry.example",
                      now: float | None = None, prefix: str = "R") -> None:
    """*count* deferred messages, all due, one recipient each (``rN@domain``), each
    with a Subject naming it (``retry N``), tried once before."""
    queue_messages(queue_directory, [f"r{i}@{domain}" for i in range(count)], retry=True, now=now, prefix=prefix)


def queue_messages(queue_directory: Path, recipients: list[str], *, retry: bool = False,
                   now: float | None = None, prefix: str = "M") -> None:
    """One message per recipient written straight into the queue: due retries
    (deferred, tried once) or new mail (incoming), each with a Subject naming it
    (``retry N`` / ``new N``)."""
    now = time.time() if now is None else now
    kind = "retry" if retry else "new"
    state, status, attempts = ("deferred", "deferred", 1) if retry else ("incoming", "pending", 0)
    ids = [f"{prefix}{i:09d}" for i in range(len(recipients))]
    store = Store.open(queue_directory)
    try:
        with store.transaction():
            db = store.db
            db.executemany(
                "INSERT INTO message (id, state, sender, arrival_time, next_attempt, size, params)"
                " VALUES (?, ?, 'storm@client.example', ?, ?, ?, '{}')",
                ((ids[i], state, now - 600, now - 1 - (i % 7) if retry else None, len(_body(kind, i)))
                 for i in range(len(ids))))
            db.executemany(
                "INSERT INTO recipient (message_id, seq, address, status, attempts, next_attempt, last_reply)"
                " VALUES (?, 0, ?, ?, ?, ?, ?)",
                ((ids[i], address, status, attempts, now - 1 if retry else None,
                  "451 4.3.0 try again" if retry else None) for i, address in enumerate(recipients)))
            db.executemany("INSERT INTO body (message_id, content) VALUES (?, ?)",
                           ((ids[i], _body(kind, i)) for i in range(len(ids))))
    finally:
        store.close()


def _body(kind: str, n: int) -> bytes:
    return f"Subject: {kind} {n}\r\nFrom: storm@client.example\r\n\r\n{kind} {n}\r\n".encode()


def subject_of(content: bytes) -> str:
    for line in content.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"Subject: "):
            return line.decode().removeprefix("Subject: ")
        if not line:
            break
    return ""


class Sessions:
    """*sessions* SMTP clients in threads, each sending *per_session* messages over
    one connection (``new N`` subjects); ``latencies`` holds end-of-data -> 250 in
    seconds, ``sent_at`` the time each message was acknowledged (``time.monotonic()``,
    the clock of the sinks' and the fleet's arrival times)."""

    def __init__(self, port: int, sessions: int, per_session: int, domain: str = "new.example") -> None:
        self.port, self.domain = port, domain
        self.latencies: list[float] = []
        self.sent_at: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._session, args=(s, per_session), daemon=True)
                         for s in range(sessions)]

    def start(self) -> Sessions:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 60) -> None:
        for thread in self._threads:
            thread.join(timeout)
        assert not self.errors, self.errors

    def _session(self, s: int, count: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                client.ehlo("client.example")
                for k in range(count):
                    n = s * 1000 + k
                    assert client.mail("new@client.example")[0] == 250
                    assert client.rcpt(f"n{n}@{self.domain}")[0] == 250
                    assert client.docmd("DATA")[0] == 354
                    body = _body("new", n).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                    began = time.monotonic()
                    client.send(body + b".\r\n")
                    code, _ = client.getreply()
                    took = time.monotonic() - began
                    assert code == 250
                    with self._lock:
                        self.latencies.append(took)
                        self.sent_at[f"new {n}"] = time.monotonic()
        except Exception as exc:  # noqa: BLE001  (reported by join())
            self.errors.append(exc)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def describe(values: list[float]) -> str:
    return (f"n={len(values)} p50={statistics.median(values) * 1000:.1f} ms "
            f"p99={percentile(values, 99) * 1000:.1f} ms max={max(values) * 1000:.1f} ms")



class TimedRecorder(Recorder):
    """Records when each message arrived (``time.monotonic()``), by its subject."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[float, str]] = []

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        with self.lock:
            self.arrivals.append((time.monotonic(), subject_of(envelope.original_content)))
        return reply


class TimedSink:
    """An aiosmtpd sink on *host* that timestamps every message it receives."""

    def __init__(self, host: str) -> None:
        self.recorder = TimedRecorder()
        self.host = host
        self.port = _free_port(host)
        self.controller = Controller(self.recorder, hostname=host, port=self.port,
                                     server_hostname="sink.test", ready_timeout=10)

    def __enter__(self) -> Self:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def arrivals(self) -> list[tuple[float, str]]:
        with self.recorder.lock:
            return list(self.recorder.arrivals)
