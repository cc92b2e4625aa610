"""Milters for the tests: OpenDKIM and rspamd as Debian installs them, each started
by the test on a loopback port of 127.0.45.0/24 with a configuration the test writes,
and ``FakeMilter``, a small milter server written here that answers from a script
(and misbehaves on request: silent, garbage, closing)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.ports import free_port
from trimail.milter import protocol as p

OPENDKIM = "/usr/sbin/opendkim"
OPENDKIM_GENKEY = "/usr/sbin/opendkim-genkey"
RSPAMD = "/usr/bin/rspamd"
HOST = "127.0.45.1"


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait (with a deadline) until *proc* accepts connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {host}:{port}")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class OpenDkim:
    """opendkim -f with a key made by opendkim-genkey, signing mail for *domain*
    from InternalHosts 127.0.0.0/8."""

    def __init__(self, directory: Path, domain: str = "example.com", selector: str = "test") -> None:
        for binary in (OPENDKIM, OPENDKIM_GENKEY):
            if not os.path.exists(binary):
                pytest.skip(f"{binary} is not installed (Debian package opendkim/opendkim-tools)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.domain, self.selector = domain, selector
        subprocess.run([OPENDKIM_GENKEY, "-b", "1024", "-d", domain, "-s", selector, "-D", str(directory)],
                       check=True)
        text = (directory / f"{selector}.txt").read_text()
        self.record = "".join(part for part in text.split('"')[1::2]).encode()
        self.port = free_port()
        conf = directory / "opendkim.conf"
        conf.write_text(f"""Syslog no
Mode sv
Socket inet:{self.port}@{HOST}
Domain {domain}
Selector {selector}
KeyFile {directory}/{selector}.private
InternalHosts 127.0.0.0/8
Canonicalization relaxed/simple
PidFile {directory}/opendkim.pid
UMask 002
RequireSafeKeys false
""")
        self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_listening(HOST, self.port, self.proc)

    @property
    def name(self) -> str:
        return f"inet:{HOST}:{self.port}"

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{self.selector}._domainkey.{self.domain}.".encode(), name
        return self.record

    def close(self) -> None:
        stop(self.proc, grace=0.2)  # opendkim takes 5 s to stop its threads; it keeps no state


class Rspamd:
    """rspamd in the foreground with its own configuration directory: the normal
    worker and rspamd_proxy in milter mode on a loopback port, no redis."""

    def __init__(self, directory: Path) -> None:
        if not os.path.exists(RSPAMD):
            pytest.skip(f"{RSPAMD} is not installed (Debian package rspamd)")
        self.dir = directory
        self.port = free_port()
        normal = free_port()
        local = directory / "local.d"
        override = directory / "override.d"
        for d in (local, override, directory / "db", directory / "run"):
            d.mkdir(parents=True)
        (override / "worker-proxy.inc").write_text(f"""bind_socket = "{HOST}:{self.port}";
milter = yes;
timeout = 120s;
upstream "local" {{ default = yes; self_scan = yes; }}
count = 1;
""")
        (override / "worker-normal.inc").write_text(f'bind_socket = "{HOST}:{normal}";\ncount = 1;\n')
        (override / "worker-controller.inc").write_text(f'bind_socket = "{HOST}:{free_port()}";\ncount = 1;\n')
        (override / "logging.inc").write_text(f'type = "file";\nfilename = "{directory}/rspamd.log";\n'
                                              'level = "notice";\n')
        (local / "options.inc").write_text('dns { nameserver = ["127.0.45.254:53"]; timeout = 0.2s; '
                                           'retransmits = 1; }\n')
        (local / "milter_headers.conf").write_text('use = ["x-spamd-result", "x-rspamd-server", '
                                                   '"x-rspamd-queue-id"];\n'
                                                   'skip_local = false;\nskip_authenticated = false;\n')
        (local / "greylist.conf").write_text("enabled = false;\n")
        variables = {"LOCAL_CONFDIR": directory, "DBDIR": directory / "db", "RUNDIR": directory / "run",
                     "LOGDIR": directory}
        self.proc = subprocess.Popen([RSPAMD, "-f", "-c", "/etc/rspamd/rspamd.conf", "-u", "root", "-g", "root",
                                      "-i", *(f"--var={k}={v}" for k, v in variables.items())],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(HOST, self.port, self.proc, timeout=60)

    @property
    def name(self) -> str:
        return f"inet:{HOST}:{self.port}"

    def log(self) -> str:
        path = self.dir / "rspamd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        stop(self.proc)


# -- a milter written here ------------------------------------------------------

Script = Callable[[bytes, bytes, "FakeMilter"], list[bytes] | None]


def reply(command: bytes, data: bytes = b"") -> bytes:
    return p.frame(command, data)


class FakeMilter:
    """A milter server on 127.0.45.x: negotiates *actions*/*protocol* and answers each
    command through *script(command, data, self)* -- a list of frames to send (None:
    continue; [] nothing at all).  Records every command it got."""

    def __init__(self, script: Script | None = None, *, actions: int = p.ALL_ACTIONS, protocol: int = 0,
                 host: str = "127.0.45.2", optneg: bytes | None = None, unix: str | None = None) -> None:
        self.script = script or (lambda command, data, m: None)
        self.actions, self.protocol = actions, protocol
        self.host = host
        self.optneg = optneg
        self.unix = unix
        self.commands: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.listener: trio.SocketListener | None = None

    @property
    def name(self) -> str:
        assert self.listener is not None
        if self.unix:
            return f"unix:{self.unix}"
        return f"inet:{self.host}:{self.listener.socket.getsockname()[1]}"

    def got(self, command: bytes) -> list[bytes]:
        return [data for c, data in self.commands if c == command]

    def macros(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for data in self.got(p.SMFIC_MACRO):
            parts = data[1:].split(b"\0")[:-1]
            out.update({parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 1, 2)})
        return out

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.unix:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(self.unix)
            sock.listen(16)
            listeners = [trio.SocketListener(sock)]
        else:
            listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.listener = listeners[0]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        reader = p.FrameReader()
        try:
            while True:
                frame = reader.next_frame()
                if frame is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    reader.receive_data(data)
                    continue
                command, data = frame
                self.commands.append(frame)
                if command == p.SMFIC_OPTNEG:
                    answer = self.script(command, data, self)
                    if answer is None:
                        answer = [self.optneg or reply(p.SMFIC_OPTNEG, struct.pack(">III", 6, self.actions,
                                                                                 self.protocol))]
                elif command in (p.SMFIC_MACRO, p.SMFIC_ABORT):
                    continue
                elif command == p.SMFIC_QUIT:
                    return
                else:
                    answer = self.script(command, data, self)
                    if answer is None:
                        answer = [reply(p.SMFIR_CONTINUE)]
                for item in answer:
                    if item == b"SLEEP":
                        await trio.sleep_forever()
                    if item == b"CLOSE":
                        return
                    await stream.send_all(item)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
