"""A real ``python -m trimail catch`` subprocess on 127.0.44.x (ports chosen by the
kernel, read from its first output line), real SMTP (smtplib) and real HTTP
(urllib) clients."""

from __future__ import annotations

import itertools
import json
import os
import re
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import pytest

READY = re.compile(r"smtp (\S+):(\d+) http http://(\S+):(\d+)/")
_hosts = itertools.cycle(f"127.0.44.{n}" for n in range(1, 200))


class Catch:
    """One ``trimail catch`` process."""

    def __init__(self, *args: str, host: str | None = None) -> None:
        self.host = host or next(_hosts)
        command = [sys.executable, "-m", "trimail", "catch", "--smtp", f"{self.host}:0",
                   "--listen", f"{self.host}:0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
        line = self._first_line(30.0)
        m = READY.search(line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"trimail catch did not start: {line!r} {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
        self.smtp_port, self.http_port = int(m.group(2)), int(m.group(4))
        self.base = f"http://{self.host}:{self.http_port}"

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data and time.monotonic() < deadline:
            if selector.select(deadline - time.monotonic()):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                data += chunk
        return data.decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    # -- clients -------------------------------------------------------------------

    def send(self, message: EmailMessage | bytes, sender: str = "alice@example.org",
             recipients: list[str] | None = None) -> None:
        with smtplib.SMTP(self.host, self.smtp_port, timeout=30) as client:
            if isinstance(message, bytes):
                client.sendmail(sender, recipients or ["bob@example.com"], message)
            else:
                client.send_message(message, sender, recipients)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def raw(self, data: bytes, timeout: float = 15.0) -> bytes:
        """Send *data* on a fresh HTTP connection and read the answer until the server closes."""
        with socket.create_connection((self.host, self.http_port), timeout=timeout) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer

    def json(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        status, _, content = self.request(method, path, data, {"Content-Type": "application/json"} if data else None)
        assert status == 200, (status, content)
        return json.loads(content)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The message summaries once *count* messages are listed (a deadline, no sleeps as sync)."""
        deadline = time.monotonic() + timeout
        while True:
            listed = self.json("/api/v1/messages")["messages"]
            if len(listed) >= count or time.monotonic() > deadline:
                return listed
            time.sleep(0.02)


def message(subject: str = "Hello", to: str = "Bob <bob@example.com>", text: str = "plain body\n",
            html: str | None = None, attachments: list[tuple[str, str, bytes]] = ()) -> EmailMessage:  # type: ignore[assignment]
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@example.org>"
    msg["Date"] = "Wed, 27 Jul 2022 15:44:41 +1200"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, content_type, data in attachments:
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


@pytest.fixture
def catch() -> Iterator[Any]:
    """Start ``trimail catch`` with extra arguments: ``catch("--enable-chaos")``."""
    started: list[Catch] = []

    def start(*args: str) -> Catch:
        process = Catch(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def shared_catch() -> Iterator[Catch]:
    """One catcher for a module whose tests only read or delete everything first."""
    process = Catch()
    yield process
    process.stop()
