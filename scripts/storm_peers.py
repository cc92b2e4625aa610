"""The two processes of ``scripts/bench --mode storm`` that are not MTAs: a recording
sink and a timed client, each in a child process of its own (so neither slows the
other or the orchestrator), talking to the parent over a ``multiprocessing`` pipe.

- ``sink_main``: an asyncio SMTP sink (``asyncio.Protocol``, PIPELINING, no
  content parsing beyond the end-of-data marker): for every message the envelope
  sender, the first recipient and the arrival time (``time.monotonic()``, the
  system-wide CLOCK_MONOTONIC on Linux, so comparable with the client's).  It
  keeps a live count in a shared integer and, asked to stop, returns the arrival
  time of every marked message (sender starting with ``new-``), the count of
  distinct and duplicate messages and the first and last arrival.
- ``client_main``: K messages with marked senders (``new-000042@storm.example``)
  over S concurrent sessions reusing their connections, paced at R messages per
  second overall (0: as fast as accepted); for each, the time the end-of-data
  marker was sent, the time of its ``250``, and the time of its MAIL command.

Both stay within bounded memory: one record per message of a run.
"""

from __future__ import annotations

import asyncio
import time
from multiprocessing.connection import Connection
from typing import Any

MARK = b"new-"


class _SinkState:
    def __init__(self, counter: Any) -> None:
        self.counter = counter  # multiprocessing.Value('q', lock=False): messages received, live
        self.new: dict[str, float] = {}  # marked sender -> first arrival
        self.seen: set[tuple[bytes, bytes]] = set()
        self.duplicates = 0
        self.first: float | None = None
        self.last: float | None = None

    def arrived(self, sender: bytes, recipient: bytes) -> None:
        now = time.monotonic()
        key = (sender, recipient)
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
            self.counter.value = len(self.seen)
        if self.first is None:
            self.first = now
        self.last = now
        if sender.startswith(MARK):
            self.new.setdefault(sender.decode("ascii", "replace"), now)


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, state: _SinkState) -> None:
        self.state = state
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.sender = b""
        self.recipient = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 storm-sink.example ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        close = False
        while True:
            if self.in_data:
                if buf.startswith(b".\r\n"):
                    end = 0
                else:
                    found = buf.find(b"\r\n.\r\n", self.scan)
                    if found < 0:
                        self.scan = max(0, len(buf) - 4)
                        break
                    end = found + 2
                del buf[:end + 3]
                self.in_data, self.scan = False, 0
                self.state.arrived(self.sender, self.recipient)
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > 4096:  # no command is that long: a confused client
                    close = True
                break
            line = bytes(buf[:eol])
            del buf[:eol + 2]
            verb = line[:4].upper()
            if verb == b"MAIL":
                self.sender = _address(line)
                self.recipient = b""
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if not self.recipient:
                    self.recipient = _address(line)
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"EHLO":
                out.append(b"250-storm-sink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                close = True
                break
            else:  # HELO, RSET, NOOP: fine
                out.append(b"250 2.0.0 Ok\r\n")
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()


def _address(line: bytes) -> bytes:
    start, end = line.find(b"<"), line.find(b">")
    return line[start + 1:end].lower() if 0 <= start < end else b""


def sink_main(host: str, port: int, pipe: Connection, counter: Any) -> None:
    """Serve until the parent sends anything on *pipe*; then answer with the records."""

    async def main() -> None:
        state = _SinkState(counter)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _SinkProtocol(state), host, port, reuse_address=True,
                                          backlog=1024)
        stop = asyncio.Event()
        loop.add_reader(pipe.fileno(), stop.set)
        pipe.send("ready")
        await stop.wait()
        loop.remove_reader(pipe.fileno())
        pipe.recv()
        server.close()
        pipe.send({"new": state.new, "distinct": len(state.seen), "duplicates": state.duplicates,
                   "first": state.first, "last": state.last})

    asyncio.run(main())


async def _session(host: str, port: int, numbers: list[int], start: float, rate: float, size: int,
                   records: list[tuple[int, float, float, float]], errors: list[str]) -> None:
    body = b"".join(b"x" * 78 + b"\r\n" for _ in range(max(1, size // 80)))
    reader, writer = await asyncio.open_connection(host, port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return line

    async def command(text: bytes, expect: bytes) -> None:
        writer.write(text)
        line = await reply()
        if not line.startswith(expect):
            raise ConnectionError(f"{text.split()[0].decode()}: {line!r}")

    try:
        line = await reply()
        if not line.startswith(b"220"):
            raise ConnectionError(f"greeting: {line!r}")
        await command(b"EHLO storm-client.example\r\n", b"250")
        for number in numbers:
            if rate:
                delay = start + number / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the load, not synchronisation
            sender = b"new-%06d@storm.example" % number
            began = time.monotonic()
            await command(b"MAIL FROM:<" + sender + b">\r\n", b"250")
            await command(b"RCPT TO:<new@sink.example>\r\n", b"250")
            await command(b"DATA\r\n", b"354")
            writer.write(b"Subject: storm new mail %d\r\nMessage-ID: <%s>\r\n\r\n" % (number, sender) + body
                         + b".\r\n")
            sent = time.monotonic()
            line = await reply()
            done = time.monotonic()
            if not line.startswith(b"250"):
                errors.append(f"{sender.decode()}: {line!r}")
                continue
            records.append((number, began, sent, done))
        await command(b"QUIT\r\n", b"221")
    except (OSError, ConnectionError) as exc:
        errors.append(f"session: {exc}")
    finally:
        writer.close()


def client_main(host: str, port: int, count: int, sessions: int, rate: float, size: int, pipe: Connection) -> None:
    """Wait for the parent's go, send *count* marked messages, answer with the records
    (number, MAIL sent, end of data sent, 250 received) and any errors."""

    async def main() -> dict:
        start = time.monotonic()
        records: list[tuple[int, float, float, float]] = []
        errors: list[str] = []
        async with asyncio.TaskGroup() as group:
            for s in range(sessions):
                group.create_task(_session(host, port, list(range(s, count, sessions)), start, rate, size,
                                           records, errors))
        return {"records": records, "errors": errors, "start": start, "end": time.monotonic()}

    pipe.send("ready")
    pipe.recv()
    pipe.send(asyncio.run(main()))
