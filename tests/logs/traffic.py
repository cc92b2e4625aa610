"""One scripted traffic for two MTAs (a private Postfix and trimail) and pflogsumm's
counts of each one's mail log: the acceptance test of issue 17 item 1.

The traffic covers every count pflogsumm prints in its "Grand Totals": mail received
from inside and outside ``mynetworks``, relayed mail a sink accepts, defers (451)
and refuses (550, so a bounce goes back), alias expansions to files and to remote
addresses (forwarded), access-table HOLD, DISCARD, INFO and WARN, and transactions
whose every recipient is refused (no queue id, so not received).

Loopback addresses: 127.0.43.0/24 (this test's own range): Postfix listens on
127.0.43.2, trimail on 127.0.43.3, the sink on 127.0.43.4; clients connect from
127.0.43.10 (inside mynetworks = 127.0.43.0/28) and 127.0.43.100 (outside).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from tests.postfix_peer import postfix_master_cf

POSTFIX_HOST = "127.0.43.2"
TRIMAIL_HOST = "127.0.43.3"
SINK_HOST = "127.0.43.4"
INSIDE = "127.0.43.10"
OUTSIDE = "127.0.43.100"
HOSTNAME = "mx.test.example"

SINK_RULES = {"later": "451 4.3.0 Try again later", "gone": "550 5.1.1 No such user here"}

# main.cf lines both MTAs get (paths filled in by common_main_cf)
COMMON = """\
myhostname = mx.test.example
mydomain = test.example
mydestination = $myhostname
mynetworks = 127.0.43.0/28
relayhost = [{sink_host}]:{sink_port}
alias_maps = hash:{dir}/aliases
alias_database = hash:{dir}/aliases
local_recipient_maps = $alias_maps
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access texthash:{dir}/access, permit
smtpd_sender_restrictions = check_sender_access texthash:{dir}/access
"""

ACCESS = """\
hold@far.example HOLD
discard@far.example DISCARD
info@far.example INFO noted
warn@far.example WARN watch it
spam@bad.example REJECT
"""

ALIASES = """\
fwd: ok2@far.example
list: l1@far.example, l2@far.example
team: alice, bob
mixed: alice, m1@far.example
alice: {files}/alice.mbox
bob: {files}/bob.mbox
"""

# (client address, MAIL FROM, RCPT TOs): what each session tries; refusals are expected
SESSIONS: list[tuple[str, str, list[str]]] = [
    (INSIDE, "a@client.example", ["ok@far.example"]),  # delivered
    (INSIDE, "a@client.example", ["later@far.example"]),  # deferred
    (INSIDE, "a@client.example", ["gone@far.example"]),  # bounced; the bounce is delivered
    (OUTSIDE, "b@outside.example", ["x@far.example"]),  # rejected: relay access denied, nothing received
    (OUTSIDE, "b@outside.example", ["y@far.example", "fwd@mx.test.example"]),  # a reject, then forwarded
    (OUTSIDE, "b@outside.example", ["list@mx.test.example"]),  # forwarded once, delivered twice
    (OUTSIDE, "b@outside.example", ["team@mx.test.example"]),  # two files, orig_to=<team@...>
    (OUTSIDE, "b@outside.example", ["mixed@mx.test.example"]),  # a file and a forward
    (INSIDE, "a@client.example", ["hold@far.example"]),  # held
    (INSIDE, "a@client.example", ["discard@far.example"]),  # discarded
    (INSIDE, "a@client.example", ["info@far.example", "warn@far.example"]),  # logged, delivered
    (OUTSIDE, "b@outside.example", ["nosuch@mx.test.example"]),  # rejected: unknown user
    (INSIDE, "spam@bad.example", ["ok@far.example"]),  # rejected: sender access
]

# what the traffic must give on both sides (pflogsumm's Grand Totals)
# (Postfix 3.7.11's figures: received counts the held and the discarded message too,
# as Postfix's smtpd opens their queue files; delivered counts the bounce to the sender)
EXPECTED = {"received": 10, "delivered": 11, "forwarded": 3, "deferred": 1, "bounced": 1,
            "rejected": 4, "held": 1, "discarded": 1}


def prepare(directory: Path, sink_port: int) -> tuple[str, Path]:
    """The common main.cf lines and an aliases source file in *directory*; the
    mailbox files the aliases name are created writable by default_privs."""
    files = directory / "files"
    files.mkdir(parents=True, exist_ok=True)
    files.chmod(0o1777)
    for name in ("alice.mbox", "bob.mbox"):
        path = files / name
        path.touch()
        path.chmod(0o666)
    for path in (directory, *directory.parents):
        if path == Path("/tmp") or path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o755)
    (directory / "aliases").write_text(ALIASES.format(files=files))
    (directory / "access").write_text(ACCESS)
    return COMMON.format(sink_host=SINK_HOST, sink_port=sink_port, dir=directory), files


def run_sessions(host: str, port: int) -> list[list[tuple[int, bytes]]]:
    """Every session of SESSIONS against *host*:*port*; the replies, for the record."""
    transcripts = []
    for client, sender, recipients in SESSIONS:
        replies = []
        with smtplib.SMTP(host, port, local_hostname="client.test.example", timeout=30,
                          source_address=(client, 0)) as smtp:
            replies.append(smtp.ehlo())
            replies.append(smtp.mail(sender))
            accepted = 0
            for rcpt in recipients:
                reply = smtp.rcpt(rcpt)
                replies.append(reply)
                accepted += reply[0] == 250
            if accepted:
                replies.append(smtp.data(f"From: <{sender}>\r\nSubject: parity\r\n\r\nbody\r\n"))
            else:
                replies.append(smtp.rset())
        transcripts.append(replies)
    return transcripts


GRAND_TOTALS = ("received", "delivered", "forwarded", "deferred", "bounced", "rejected", "held", "discarded")


def pflogsumm(log: Path, syslog_name: str) -> dict[str, int]:
    """pflogsumm's Grand Totals for the mail log *log*."""
    out = subprocess.run(["pflogsumm", f"--syslog-name={syslog_name}", str(log)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    counts = {}
    for name in GRAND_TOTALS:
        m = re.search(rf"^\s*(\d+)\s+{name}\b", out, re.M)
        counts[name] = int(m.group(1)) if m else -1
    return counts


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def postfix_available() -> bool:
    return (shutil.which("postfix") is not None and shutil.which("pflogsumm") is not None
            and os.geteuid() == 0 and Path("/etc/postfix/master.cf").exists())


class PrivatePostfix:
    """Debian's Postfix from a configuration directory of its own (tests/postfix_peer.py's
    way), smtpd on POSTFIX_HOST only, the mail log in a file of its own."""

    def __init__(self, workdir: Path, port: int, common: str) -> None:
        self.dir = workdir
        self.conf = workdir / "conf"
        self.conf.mkdir(parents=True)
        (workdir / "queue").mkdir()
        (workdir / "data").mkdir()
        shutil.chown(workdir / "data", "postfix")
        self.port = port
        self.maillog = workdir / "maillog"
        (self.conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {workdir / 'queue'}\ndata_directory = {workdir / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            "inet_interfaces = loopback-only\ninet_protocols = ipv4\n"
            f"maillog_file_prefixes = {workdir}\nmaillog_file = {self.maillog}\n"
            + common)
        (self.conf / "master.cf").write_text(postfix_master_cf(f"{POSTFIX_HOST}:{port}"))
        subprocess.run(["postalias", "-c", str(self.conf), str(workdir / "aliases")], check=True)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not listening(POSTFIX_HOST, port):
            assert time.monotonic() < deadline, "postfix did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while listening(POSTFIX_HOST, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
