"""A tiny driver for the sans-IO server machine used by the protocol tests."""

from __future__ import annotations

from trimail.smtp import replies
from trimail.smtp.events import NEED_DATA, Closed, DataChunk, DataEnd, Event
from trimail.smtp.server import ServerConnection, Settings


class Driver:
    """Feeds bytes, answers decision events (accepting by default), collects output."""

    def __init__(self, settings: Settings = Settings(), decide=None) -> None:
        self.conn = ServerConnection(settings)
        self.decide = decide or (lambda event: None)
        self.events: list[Event] = []
        self.output = bytearray()
        self.queued = 0
        self.closed = False
        self.conn.greet()
        self.output += self.conn.data_to_send()

    def feed(self, data: bytes) -> Driver:
        if data:
            self.conn.receive_data(data)
        self.pump()
        return self

    def eof(self) -> Driver:
        self.conn.receive_data(b"")
        self.pump()
        return self

    def pump(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed = True
                break
            if event.needs_reply:
                reply = self.decide(event)
                if isinstance(event, DataEnd) and reply is None:
                    self.queued += 1
                    reply = replies.queued(f"ID{self.queued}")
                self.conn.respond(reply)
        self.output += self.conn.data_to_send()

    def replies(self) -> list[str]:
        """Final reply lines ("250 2.1.0 Ok"), one per reply, greeting included."""
        lines = bytes(self.output).decode().split("\r\n")
        return [line for line in lines if len(line) > 3 and line[3] == " "]

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.replies()]

    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))

    def of_type(self, kind: type) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]
