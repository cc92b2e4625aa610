"""The parts of the differential suite: a DNS server, a sink, a private Postfix and a
trimail given the same main.cf lines and table sources, and a scripted SMTP client.

Addresses (all loopback, this suite's own ranges):

- 127.0.45.53:53  the DNS server both MTAs ask (trimail through ``dns_nameservers``,
  Postfix through ``resolv.conf`` in its smtpd's chroot, the queue directory: the one
  per-instance resolver setting Postfix has);
- 127.0.45.2      the sink both MTAs relay to (``relayhost``); it tells the two apart
  by the client address (Postfix's ``smtp_bind_address`` is 127.0.45.11);
- 127.0.45.10     Postfix's smtpd, 127.0.45.20 trimail's;
- clients bind 127.0.45.x (inside ``mynetworks = 127.0.45.0/24``) or 127.0.46.x
  (outside).

``TRIMAIL_DIFF_NET`` moves the two blocks (net.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.rdatatype
from aiosmtpd.controller import Controller

from tests.differential import net
from tests.dnsserver import answer
from tests.ports import free_port
from tests.postfix_peer import postfix_master_cf

DNS_HOST = net.inside(53)
SINK_HOST = net.inside(2)
POSTFIX_HOST = net.inside(10)
POSTFIX_OUT = net.inside(11)
TRIMAIL_HOST = net.inside(20)


def available() -> bool:
    return (shutil.which("postfix") is not None and os.geteuid() == 0
            and Path("/etc/postfix/master.cf").exists() and Path("/usr/sbin/postalias").exists())


def wait_until(predicate, what: str, timeout: float = 30.0, state=lambda: ""):
    """Poll *predicate* until it is true or the deadline passes (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {state()}")
        time.sleep(0.02)


# -- DNS -------------------------------------------------------------------------------


class DnsServer:
    """tests/dnsserver.py's answers on UDP port 53 of DNS_HOST, in a thread (port 53 because
    resolv.conf cannot name another port)."""

    def __init__(self, zone: dict) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((DNS_HOST, 53))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # not a query: no answer, as a real server
            q = query.question[0]
            self.queries.append((q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
            try:
                self.sock.sendto(answer(self.zone, query).to_wire(), peer)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


# -- the sink --------------------------------------------------------------------------


@dataclass
class Arrived:
    peer: str
    sender: str
    recipients: list[str]
    content: bytes


class SinkHandler:
    def __init__(self) -> None:
        self.messages: list[Arrived] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        """A recipient named ``bounce-...`` does not exist here (both MTAs then bounce)."""
        if address.lower().startswith("bounce-"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append(Arrived(session.peer[0], envelope.mail_from, list(envelope.rcpt_tos),
                                         envelope.original_content))
        return "250 2.0.0 Ok: queued as SINK"


class Sink:
    """One aiosmtpd sink for both MTAs on SINK_HOST."""

    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.port = free_port(SINK_HOST)
        self.controller = Controller(self.handler, hostname=SINK_HOST, port=self.port,
                                     server_hostname="sink.test.example", ready_timeout=10)
        self.controller.start()

    def postfix_messages(self) -> list[Arrived]:
        with self.handler.lock:
            return [m for m in self.handler.messages if m.peer == POSTFIX_OUT]

    def trimail_messages(self) -> list[Arrived]:
        with self.handler.lock:
            return [m for m in self.handler.messages if m.peer != POSTFIX_OUT]

    def close(self) -> None:
        self.controller.stop()


# -- the two MTAs ------------------------------------------------------------------------


def compile_tables(tables: dict[str, str], directory: Path, postmap: list[str], postalias: list[str],
                   sink_port: int = 0) -> None:
    """Write each table source into *directory* (``@SINK@`` expanded) and compile it
    with the MTA's own tools (``aliases`` with postalias, ``*.regexp`` not at all, the
    others with postmap)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    for name, text in tables.items():
        path = directory / name
        path.write_text(expand(text, directory, sink_port))
        if name.endswith(".regexp"):
            continue
        tool = postalias if name == "aliases" else postmap
        done = subprocess.run([*tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{tool} {path}: {done.stderr}"


def expand(main_cf: str, tables: Path, sink_port: int) -> str:
    return main_cf.replace("@TABLES@", str(tables)).replace("@SINK@", f"[{SINK_HOST}]:{sink_port}")


class PrivatePostfix:
    """Debian's Postfix from a configuration directory of its own: smtpd on POSTFIX_HOST
    only, chrooted to its own queue directory so that its resolv.conf there points at
    our DNS server; every other service unchrooted."""

    def __init__(self, workdir: Path, main_cf: str, tables: dict[str, str], sink_port: int) -> None:
        self.dir = workdir
        for sub in ("conf", "queue", "data"):
            (workdir / sub).mkdir(parents=True)
        shutil.chown(workdir / "data", "postfix")
        for path in (workdir.parent, workdir, workdir / "conf"):
            path.chmod(0o755)
        etc = workdir / "queue" / "etc"
        etc.mkdir()
        (etc / "resolv.conf").write_text(f"nameserver {DNS_HOST}\noptions timeout:2 attempts:1\n")
        (etc / "nsswitch.conf").write_text("hosts: files dns\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        for name in ("services", "localtime", "host.conf"):
            if Path("/etc", name).exists():
                shutil.copy(Path("/etc", name), etc / name)
        self.port = free_port(POSTFIX_HOST)
        (workdir / "conf" / "master.cf").write_text(postfix_master_cf(f"{POSTFIX_HOST}:{self.port}", chroot_smtpd=True))
        (workdir / "conf" / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {workdir / 'queue'}\ndata_directory = {workdir / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"  # master.cf names the address
            
            f"smtp_bind_address = {POSTFIX_OUT}\n"
            f"maillog_file_prefixes = {workdir}\nmaillog_file = {workdir / 'maillog'}\n"
            + expand(main_cf, workdir / "tables", sink_port))
        compile_tables(tables, workdir / "tables", ["postmap", "-c", str(workdir / "conf")],
                       ["postalias", "-c", str(workdir / "conf")], sink_port)
        self.postfix("start")
        try:
            wait_until(lambda: _listening(POSTFIX_HOST, self.port), "Postfix to listen")
        except AssertionError:
            self.stop()
            raise

    def postfix(self, *args: str, tool: str = "postfix") -> str:
        done = subprocess.run([tool, "-c", str(self.dir / "conf"), *args], capture_output=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.decode()

    def queue_empty(self) -> bool:
        """Nothing left to deliver (held mail stays)."""
        return not any(files for sub in ("maildrop", "incoming", "active", "deferred")
                       for _, _, files in os.walk(self.dir / "queue" / sub))

    def held(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.dir / "queue" / "hold"))

    def log(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.dir / "conf"), "stop"], capture_output=True, timeout=60,
                       check=False)
        wait_until(lambda: not _listening(POSTFIX_HOST, self.port), "Postfix to stop")




def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Trimail:
    """``trimail serve`` as a child process with the same main.cf lines and tables."""

    def __init__(self, workdir: Path, main_cf: str, tables: dict[str, str], sink_port: int) -> None:
        from tests.conftest import ServeProcess

        self.dir = workdir
        workdir.mkdir(parents=True)
        trimail = [sys.executable, "-m", "trimail"]
        compile_tables(tables, workdir / "tables", [*trimail, "postmap"], [*trimail, "postalias"], sink_port)
        self.port = free_port(TRIMAIL_HOST)
        self.config = workdir / "main.cf"
        self.config.write_text(
            f"queue_directory = {workdir / 'queue'}\nallow_root = yes\ngraceful_timeout = 5s\n"
            f"smtpd_listen = {TRIMAIL_HOST}:{self.port}\ndns_nameservers = {DNS_HOST}:53\n"
            # Postfix here runs no policyd-spf or OpenDMARC: the same without trimail's own checks
            "smtpd_authentication_checks =\n"
            + expand(main_cf, workdir / "tables", sink_port))
        self.proc = ServeProcess(self.config)

    def queue(self) -> list[dict]:
        done = subprocess.run([sys.executable, "-m", "trimail", "queue", "list", "--json", "-c", str(self.config)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout or "[]")

    def held(self) -> int:
        return sum(1 for m in self.queue() if m["state"] == "hold")

    def queue_empty(self) -> bool:
        """Nothing left to deliver (held mail stays)."""
        return all(m["state"] == "hold" for m in self.queue())

    def log(self) -> str:
        return "\n".join(self.proc.log)

    def stop(self) -> None:
        self.proc.stop()


# -- the scripted client ---------------------------------------------------------------


@dataclass
class Exchange:
    """One command (or message content, or the greeting: ``None``) and its reply lines."""

    command: str | None
    reply: list[str] = field(default_factory=list)


def run_session(host: str, port: int, source: str, commands: list[str], timeout: float = 20.0) -> list[Exchange]:
    """Connect from *source*, read the greeting, send each command and read its reply.

    A command starting with ``DATA:`` is message content: sent as it is (CRLF line
    ends, the final ``.`` added) and answered with the end-of-data reply.  ``CHUNKS:``
    is sent as it is (BDAT commands, each with its bytes, and any other commands): one
    reply per command line (``chunk_commands``).  Stops at
    the end of the list or when the server closes; after a 221/421 the next exchange
    records whether the server closed (``<EOF>``).
    """
    with socket.create_connection((host, port), timeout=timeout, source_address=(source, 0)) as sock:
        stream = sock.makefile("rb")

        def reply() -> list[str]:
            lines = []
            while True:
                try:
                    line = stream.readline()
                except ConnectionResetError:
                    line = b""
                if not line:
                    return [*lines, "<EOF>"]
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text)
                if text[3:4] != "-":
                    return lines

        out = [Exchange(None, reply())]
        for command in commands:
            last = out[-1].reply[-1]
            if last == "<EOF>" or last[:3] in ("221", "421"):
                break
            if command.startswith("DATA:") and not last.startswith("354"):
                continue  # DATA was refused: a client sends no content
            if command.startswith("DATA:"):
                body = command[5:].replace("\r\n", "\n").replace("\n", "\r\n")
                sock.sendall(body.encode() + (b"" if body.endswith("\r\n") else b"\r\n") + b".\r\n")
            elif command.startswith("CHUNKS:"):  # BDAT commands with their content, in one write
                sock.sendall(command[7:].encode())
                for line in chunk_commands(command[7:]):
                    out.append(Exchange(line, reply()))
                    if out[-1].reply[-1] == "<EOF>":
                        break
                continue
            elif command.startswith("PIPE:"):
                group = command[5:].split("|")
                sock.sendall("".join(f"{c}\r\n" for c in group).encode())
                for c in group:
                    out.append(Exchange(c, reply()))
                continue
            else:
                sock.sendall(command.encode() + b"\r\n")
            out.append(Exchange(command, reply()))
        last = out[-1].reply[-1]
        if last[:3] in ("221", "421"):
            out.append(Exchange("<close?>", reply()))
        return out


def chunk_commands(wire: str) -> list[str]:
    """The command lines of *wire*, where a well-formed ``BDAT <n>`` is followed by n
    characters of content (ASCII: characters are bytes)."""
    lines, at = [], 0
    while at < len(wire):
        end = wire.find("\r\n", at)
        end = len(wire) if end < 0 else end
        line = wire[at:end]
        lines.append(line)
        at = end + 2
        words = line.split()
        if len(words) in (2, 3) and words[0].upper() == "BDAT" and words[1].isdigit():
            at += int(words[1])
    return lines


QUEUE_ID = re.compile(r"(queued as )\S+")


def normalise(line: str) -> str:
    """What must differ between two MTAs taken out: queue ids, the MTA's name."""
    line = QUEUE_ID.sub(r"\1QID", line)
    return line.replace("Postfix", "MTA").replace("trimail", "MTA")
