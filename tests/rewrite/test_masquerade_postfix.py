"""Masquerading side by side with a real Postfix given the same main.cf lines.

Both MTAs listen on 127.0.44.1 and relay to a sink; the same message is sent from
127.0.44.1 (in mynetworks, and ``local_header_rewrite_clients = permit_mynetworks``:
the local rewrite context), from 127.0.44.2 (remote), and with each one's sendmail
(a local submission).  The envelope sender and the From:, To:, Cc: and Reply-To:
lines each MTA passes on must be the same.  (The default, permit_inet_interfaces,
cannot be compared here: Postfix refuses an inet_interfaces address that no
interface carries, and only 127.0.0.1 is on lo; the sessions in
test_masquerade.py cover it.)
"""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from tests import postfix_peer
from tests.conftest import wait_for
from tests.delivery.test_delivery import wait_empty
from tests.peers import Sink
from tests.ports import free_port

pytestmark = pytest.mark.skipif(not postfix_peer.available(), reason="needs root and Debian's postfix package")

SERVER, OUTSIDE, SINK = "127.0.44.1", "127.0.44.2", "127.0.44.9"
# a leading dot never matches (client.example stays); far.example and near.example do
SETTINGS = {"masquerade_domains": ".client.example far.example near.example", "mynetworks": f"{SERVER}/32",
            "local_header_rewrite_clients": "permit_mynetworks", "relay_domains": "far.example",
            "myorigin": "origin.example"}
MESSAGE = ("From: Joe <joe@host.client.example>\r\nTo: ann@eng.far.example\r\n"
           "Cc: bob@host.near.example\r\nReply-To: joe, sales (team)\r\nSubject: from {source}\r\n\r\nbody\r\n")


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class PrivatePostfix:
    """Debian's Postfix from a directory of its own, smtpd on SERVER only."""

    def __init__(self, workdir: Path, port: int, sink_port: int) -> None:
        self.dir, self.port = workdir, port
        for sub in ("conf", "queue", "data"):
            (workdir / sub).mkdir(parents=True)
        shutil.chown(workdir / "data", "postfix")
        workdir.chmod(0o755)
        (workdir / "conf").chmod(0o755)
        lines = {"compatibility_level": "3.6", "queue_directory": workdir / "queue",
                 "data_directory": workdir / "data", "mail_owner": "postfix", "setgid_group": "postdrop",
                 "inet_interfaces": "loopback-only", "inet_protocols": "ipv4",
                 "myhostname": "pf.test.example", "mydestination": "", "relayhost": f"[{SINK}]:{sink_port}",
                 "maillog_file_prefixes": workdir, "maillog_file": workdir / "maillog", **SETTINGS}
        (workdir / "conf" / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
        master = postfix_peer.postfix_master_cf(f"{SERVER}:{port}")
        (workdir / "conf" / "master.cf").write_text(master)
        started = subprocess.run(["postfix", "-c", str(workdir / "conf"), "start"], capture_output=True, text=True,
                                 check=False)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 30
        while not listening(SERVER, port):
            assert time.monotonic() < deadline, "postfix did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.dir / "conf"), "stop"], check=False, capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def submit(port: int, source: str) -> None:
    with smtplib.SMTP(SERVER, port, timeout=30, source_address=(source, 0)) as client:
        client.sendmail("joe@host.near.example", ["ann@far.example"], MESSAGE.format(source=source))


def local_submission(command: list[str]) -> None:
    """The same message handed to a sendmail command (a local submission)."""
    text = MESSAGE.format(source="sendmail").replace("\r\n", "\n").encode()
    done = subprocess.run([*command, "-f", "joe@host.near.example", "ann@far.example"], input=text,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def seen(messages) -> dict[str, tuple[str, ...]]:
    """By client (the Subject: names it): the envelope sender and the address lines."""
    out = {}
    for sender, _, content in messages:
        message = email.message_from_bytes(content, policy=email.policy.compat32)
        out[message["Subject"].rpartition(" ")[2]] = (sender, message["From"], message["To"], message["Cc"],
                                                         message["Reply-To"])
    return out


async def test_postfix_and_trimail_masquerade_the_same_addresses(start_mta):
    with Sink(SINK) as pf_sink, Sink(SINK) as tm_sink:
        workdir = Path(tempfile.mkdtemp(prefix="trimail-masq-"))
        peer = await trio.to_thread.run_sync(PrivatePostfix, workdir, free_port(SERVER), pf_sink.port)
        try:
            srv = await start_mta(smtpd_listen=f"{SERVER}:0", relayhost=f"[{SINK}]:{tm_sink.port}", **SETTINGS)
            for source in (SERVER, OUTSIDE):
                await trio.to_thread.run_sync(submit, peer.port, source)
                await trio.to_thread.run_sync(submit, srv.addresses[0].port, source)
            await trio.to_thread.run_sync(local_submission, ["sendmail", "-C", str(workdir / "conf")])
            await trio.to_thread.run_sync(local_submission, [sys.executable, "-m", "trimail", "sendmail", "-c",
                                                             srv.config.source])
            await wait_for(lambda: len(pf_sink.messages) == 3 and len(tm_sink.messages) == 3, 60)
            await wait_empty(srv)
        finally:
            await trio.to_thread.run_sync(peer.stop)
    postfix, trimail = seen(pf_sink.messages), seen(tm_sink.messages)
    assert trimail == postfix
    # what Postfix did, spelled out: the envelope of all mail, the headers of the local client only
    # (completed with $myorigin and masqueraded), and .client.example never matched
    assert postfix[SERVER] == ("joe@near.example", "Joe <joe@host.client.example>", "ann@far.example",
                               "bob@near.example", "joe@origin.example, sales@origin.example (team)")
    assert postfix[OUTSIDE] == ("joe@near.example", "Joe <joe@host.client.example>", "ann@eng.far.example",
                                "bob@host.near.example", "joe, sales (team)")
    assert postfix["sendmail"] == postfix[SERVER]  # a local submission is local
