"""Debian's Postfix as a peer on loopback, from a configuration directory of its own.

Used by scripts/bench (side-by-side figures) and by the interoperability tests.
Needs root and the ``postfix`` package; smtpd listens on a loopback port only,
with Debian's master.cf minus chroot, and everything else in a temporary tree.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def available() -> bool:
    return shutil.which("postfix") is not None and os.geteuid() == 0 and Path("/etc/postfix/master.cf").exists()


class Postfix:
    """Debian's Postfix in a configuration directory of its own, loopback only."""

    name = "postfix"

    def __init__(self, workdir: Path, port: int, sink_port: int | None, extra: str = "") -> None:
        self.dir = workdir / "postfix"
        (self.dir / "conf").mkdir(parents=True)
        (self.dir / "queue").mkdir()
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix")
        for path in (workdir, self.dir, self.dir / "conf"):
            path.chmod(0o755)
        self.port = port
        (self.dir / "conf" / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {self.dir / 'queue'}\n"
            f"data_directory = {self.dir / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"
            "myhostname = bench-postfix.example\nmydestination =\nmynetworks = 127.0.0.0/8\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject\n"
            f"maillog_file_prefixes = {workdir}\nmaillog_file = {self.dir / 'maillog'}\n"
            + (f"relayhost = [127.0.0.1]:{sink_port}\n" if sink_port else "master_service_disable = qmgr\n")
            + extra
        )
        (self.dir / "conf" / "master.cf").write_text(postfix_master_cf(f"127.0.0.1:{port}"))
        subprocess.run(["postfix", "-c", str(self.dir / "conf"), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _listening(port):
            if time.monotonic() > deadline:
                raise SystemExit("bench: postfix did not start")
            time.sleep(0.05)

    def queue_size(self) -> int:
        count = 0
        for sub in ("maildrop", "incoming", "active", "deferred"):
            for _, _, files in os.walk(self.dir / "queue" / sub):
                count += len(files)
        return count

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.dir / "conf"), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)


def postfix_master_cf(listen: str, chroot_smtpd: bool = False) -> str:
    """Debian's master.cf with smtpd on *listen* (``address:port``, loopback) and no
    service chrooted, or only smtpd with *chroot_smtpd* (tests/differential: its
    resolv.conf in the queue directory points at the test's DNS server)."""
    out = []
    for line in Path("/etc/postfix/master.cf").read_text().splitlines():
        if line.startswith("#") or not line.strip() or line[0].isspace():
            out.append(line)
            continue
        fields = line.split()
        smtpd = fields[:2] == ["smtp", "inet"]
        if smtpd:
            fields[0] = listen
        if len(fields) >= 8:
            fields[4] = "y" if smtpd and chroot_smtpd else "n" if fields[4] == "y" else fields[4]
        out.append("  ".join(fields))
    return "\n".join(out) + "\n"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
