"""Debian's Postfix as trimail's after-queue content filter: trimail hands every
message to Postfix's smtpd on 127.0.46.2, Postfix's header_checks PREPEND a header
and its smtp client gives the message back to trimail's reinjection listener,
which delivers it to the final destination once.  Needs root and the postfix
package (tests/postfix_peer.py)."""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.conftest import wait_for
from tests.filter.mtas import FILTER, FINAL, GATEWAY, send, start, wait_empty
from tests.peers import Sink
from tests.ports import free_port
from tests.postfix_peer import available, postfix_master_cf

pytestmark = pytest.mark.skipif(not available(), reason="needs root and Debian's postfix package")


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@pytest.fixture
def postfix_filter() -> Iterator:
    """Start Postfix as a filter listening on FILTER:port that relays to GATEWAY:reinject_port
    (in a directory of its own under /tmp: pytest's is closed to the postfix user)."""
    started: list[Path] = []
    workdir = Path(tempfile.mkdtemp(prefix="trimail-filter-"))

    def run(port: int, reinject_port: int) -> Path:
        root = workdir / "postfix"
        conf = root / "conf"
        for sub in (conf, root / "queue", root / "data"):
            sub.mkdir(parents=True)
        shutil.chown(root / "data", "postfix")
        for path in (workdir, root, conf):
            path.chmod(0o755)
        (conf / "header_checks").write_text("/^Subject:/ PREPEND X-Filtered-By: postfix-filter\n")
        (conf / "main.cf").write_text(
            "compatibility_level = 3.6\n"
            f"queue_directory = {root / 'queue'}\ndata_directory = {root / 'data'}\n"
            "mail_owner = postfix\nsetgid_group = postdrop\n"
            # master.cf's smtpd binds FILTER:port itself; Postfix refuses an inet_interfaces address that
            # no interface has, and 127.0.46.2 is only reachable through lo's 127/8
            f"inet_interfaces = loopback-only\ninet_protocols = ipv4\nsmtp_bind_address = {FILTER}\n"
            "myhostname = postfix-filter.test.example\nmydestination =\nmynetworks = 127.0.0.0/8\n"
            "smtpd_relay_restrictions = permit_mynetworks, reject\n"
            f"relayhost = [{GATEWAY}]:{reinject_port}\n"
            f"header_checks = regexp:{conf / 'header_checks'}\n"
            f"maillog_file_prefixes = {workdir}\nmaillog_file = {root / 'maillog'}\n")
        (conf / "master.cf").write_text(postfix_master_cf(f"{FILTER}:{port}"))
        subprocess.run(["postfix", "-c", str(conf), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(conf)
        deadline = time.monotonic() + 30
        while not _listening(FILTER, port):
            assert time.monotonic() < deadline, "postfix did not start"
            time.sleep(0.05)
        return root

    yield run
    for conf in started:
        subprocess.run(["postfix", "-c", str(conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(workdir, ignore_errors=True)


async def test_postfix_as_the_content_filter_adds_its_header_and_the_message_arrives_once(
        nursery, tmp_path, postfix_filter):
    filter_port, reinject_port = free_port(FILTER), free_port(GATEWAY)
    with Sink(FINAL) as sink:
        gw = await start(nursery, tmp_path / "gateway", myhostname="mx.test.example", smtpd_listen=f"{GATEWAY}:0",
                         reinject_listen=f"{GATEWAY}:{reinject_port}", relayhost=f"[{FINAL}]:{sink.port}",
                         content_filter=f"smtp:[{FILTER}]:{filter_port}")
        await trio.to_thread.run_sync(postfix_filter, filter_port, reinject_port)
        await trio.to_thread.run_sync(send, GATEWAY, gw.addresses_by_kind["smtp"][0].port, "a@client.example",
                                      ["r@remote.example"], "Subject: filtered\r\n\r\nhello\r\n")
        await wait_for(lambda: len(sink.messages) >= 1, 60)
        await wait_empty(gw)
        [(sender, recipients, raw)] = sink.messages
        assert (sender, recipients) == ("a@client.example", ["r@remote.example"])
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert message["X-Filtered-By"] == "postfix-filter"
        assert any("postfix-filter.test.example" in value for value in message.get_all("Received"))
