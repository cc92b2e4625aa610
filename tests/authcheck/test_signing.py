"""Outbound DKIM signing: keys made by ``trimail dkim keygen``, the tables in OpenDKIM's
SigningTable/KeyTable model, mail from mynetworks signed before the commit, and the
signature checked by two verifiers that are not trimail's: dkimpy, and OpenDKIM's
``opendkim-testmsg`` (libopendkim), which looks the key up in DNS through
/etc/resolv.conf -- so it runs in a private mount namespace whose resolv.conf
names this test's DNS server (on port 53 of its own loopback address).

Loopback addresses of this test module: serve on 127.0.47.30, the DNS server
on 127.0.47.31 (a random port) and 127.0.47.32 (port 53, for libopendkim);
clients 127.0.47.33 (mynetworks) and 127.0.47.34 (outside)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import smtplib
import socket
import ssl
import stat
import subprocess
import sys

import dkim
import dns.message
import pytest
import trio

from tests.authcheck.keys import MESSAGE as SUBDOMAIN_MESSAGE
from tests.conftest import trimail, write_main_cf
from tests.dnsserver import answer, run_dns_server
from trimail import config as configuration
from trimail.config import ConfigError
from trimail.master import serve
from trimail.queue.store import Store

MESSAGE = SUBDOMAIN_MESSAGE.replace(b"alice@mail.sender.example", b"alice@sender.example")


def keygen(directory, domain: str, selector: str, kind: str) -> str:
    """The TXT record text (quoted strings) ``trimail dkim keygen`` prints for a new key."""
    done = trimail("dkim", "keygen", domain, selector, "--type", kind, "--directory", str(directory))
    assert done.returncode == 0, done.stderr
    return re.search(r"IN TXT \( (.*) \)", done.stdout).group(1)


@pytest.fixture(scope="module")
def made_keys(tmp_path_factory):
    """The module's keys, made once (three ``trimail dkim keygen`` runs, an interpreter
    and an RSA key each: most of this module's time when made for every test)."""
    directory = tmp_path_factory.mktemp("keys")
    zone = {f"{sel}._domainkey.sender.example": {"TXT": [keygen(directory, "sender.example", sel, kind)]}
            for sel, kind in (("rsa1", "rsa"), ("ed1", "ed25519"))}
    zone["rsa1._domainkey.other.example"] = {"TXT": [keygen(directory, "other.example", "rsa1o", "rsa")]}
    return directory, zone


@pytest.fixture
def keys(made_keys, tmp_path):
    """A copy of the module's keys (modes kept) and zone of this test's own: a test may
    change either (an unreadable key) without the next test seeing it."""
    made, zone = made_keys
    directory = tmp_path / "keys"
    shutil.copytree(made, directory)
    return directory, copy.deepcopy(zone)


def tables(tmp_path, directory, signing: str) -> dict[str, str]:
    (tmp_path / "signing").write_text(signing)
    (tmp_path / "keys.table").write_text(
        f"rsa1._domainkey.sender.example  sender.example:rsa1:{directory}/rsa1.private\n"
        f"ed1._domainkey.sender.example   sender.example:ed1:{directory}/ed1.private\n"
        f"missing                         sender.example:gone:{directory}/gone.private\n")
    return {"dkim_signing_table": f"texthash:{tmp_path / 'signing'}",
            "dkim_key_table": f"texthash:{tmp_path / 'keys.table'}"}


@pytest.fixture
def start(nursery, tmp_path):
    async def start(zone: dict, **params):
        port = await nursery.start(run_dns_server, zone, "127.0.47.31")
        settings = {"smtpd_listen": "127.0.47.30:0", "dns_nameservers": f"127.0.47.31:{port}",
                    "mynetworks": "127.0.47.33/32", "relay_domains": "rcpt.example",
                    "smtpd_peername_lookup": "no"}
        settings.update(params)
        return await nursery.start(serve, configuration.load(write_main_cf(tmp_path, **settings)))

    return start


def send(port: int, message: bytes, client: str = "127.0.47.33") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.47.30", port, local_hostname="client.example", timeout=30,
                      source_address=(client, 0)) as smtp:
        smtp.mail("alice@sender.example")
        smtp.rcpt("bob@rcpt.example")
        return smtp.data(message)


async def sent(srv, message: bytes = MESSAGE, **kwargs) -> tuple[tuple[int, bytes], bytes | None]:
    reply = await trio.to_thread.run_sync(lambda: send(srv.addresses[0].port, message, **kwargs))
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        queued = [store.read_content(m.id) for m in store.list_messages()]
    finally:
        store.close()
    return reply, (queued[-1] if queued else None)


def dnsfunc(zone: dict):
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        entry = zone.get(name.decode().rstrip(".").lower())
        if not isinstance(entry, dict):
            return None
        return "".join(re.findall(r'"([^"]*)"', entry["TXT"][0])).encode()

    return lookup


async def dns_on_port_53(zone: dict, *, task_status=trio.TASK_STATUS_IGNORED):
    """The loopback DNS server's answers on 127.0.47.32:53 (resolv.conf has no port)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.47.32", 53))
    task_status.started()
    with sock:
        while True:
            data, peer = await sock.recvfrom(4096)
            await sock.sendto(answer(zone, dns.message.from_wire(data)).to_wire(), peer)


def opendkim_verify(content: bytes, tmp_path) -> subprocess.CompletedProcess:
    """opendkim-testmsg in verify mode, its DNS pointed at 127.0.47.32 by a private resolv.conf."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.47.32\noptions attempts:1 timeout:2\n")
    script = f"mount --bind {resolv} /etc/resolv.conf && exec opendkim-testmsg"
    return subprocess.run(["unshare", "--mount", "sh", "-c", script], input=content.replace(b"\r\n", b"\n"), check=False,
                          capture_output=True, timeout=60)


needs_opendkim = pytest.mark.skipif(not shutil.which("opendkim-testmsg") or os.geteuid() != 0,
                                    reason="opendkim-testmsg (opendkim-tools) and root for unshare --mount")


@needs_opendkim
@pytest.mark.parametrize(("selector", "algorithm"), [("rsa1", b"rsa-sha256"), ("ed1", b"ed25519-sha256")])
async def test_mail_from_mynetworks_is_signed_and_verifies_with_dkimpy_and_opendkim(
        start, keys, tmp_path, nursery, selector, algorithm):
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, f"sender.example  {selector}._domainkey.sender.example\n"))
    reply, content = await sent(srv)
    assert reply[0] == 250
    names = [line.split(b":")[0] for line in content.split(b"\r\n\r\n")[0].split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:2] == [b"Received", b"DKIM-Signature"]
    tags = dict(re.findall(rb"(\w+)=([^;]*)", content.split(b"DKIM-Signature:")[1].split(b"\r\nFrom:")[0]))
    assert (tags[b"a"], tags[b"d"], tags[b"s"]) == (algorithm, b"sender.example", selector.encode())
    if algorithm == b"rsa-sha256":  # dkimpy needs pynacl for ed25519, which is not installed
        assert dkim.verify(content, dnsfunc=dnsfunc(zone))
    await nursery.start(dns_on_port_53, zone)
    verified = await trio.to_thread.run_sync(opendkim_verify, content, tmp_path)
    assert verified.returncode == 0, verified.stderr
    # and the check can fail: a changed body does not verify
    broken = await trio.to_thread.run_sync(opendkim_verify, content.replace(b"this is signed", b"changed"), tmp_path)
    assert broken.returncode != 0


async def test_the_signing_table_is_looked_up_by_address_then_domain_then_parent(start, keys, tmp_path):
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, "alice@mail.sender.example  ed1._domainkey.sender.example\n"
                                                          ".sender.example  rsa1._domainkey.sender.example\n"))
    _, content = await sent(srv, SUBDOMAIN_MESSAGE)  # From: alice@mail.sender.example
    assert b"a=ed25519-sha256" in content
    _, content = await sent(srv, SUBDOMAIN_MESSAGE.replace(b"alice@", b"carol@"))  # .sender.example: the parent
    assert b"a=rsa-sha256" in content and dkim.verify(content, dnsfunc=dnsfunc(zone))
    _, content = await sent(srv)  # From: alice@sender.example: ".sender.example" is for subdomains only
    assert b"DKIM-Signature" not in content


async def test_mail_of_a_domain_without_a_key_and_mail_from_outside_are_not_signed(start, keys, tmp_path):
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, "elsewhere.example  rsa1._domainkey.sender.example\n"))
    _, content = await sent(srv)
    assert b"DKIM-Signature" not in content
    srv2 = await start(zone, **tables(tmp_path, directory, "sender.example  rsa1._domainkey.sender.example\n"),
                       queue_directory=str(tmp_path / "queue2"))
    _, content = await sent(srv2, client="127.0.47.34")
    assert b"DKIM-Signature" not in content and b"Authentication-Results: mx.test.example" in content


async def test_a_from_field_after_64_kb_of_header_is_signed_for_its_own_domain(start, keys, tmp_path):
    """The signer looked for From: in the session's copy of the header, its first 64 kB
    only: a From: after 64 kB of other fields (still under header_size_limit) was not
    found and the envelope sender chose the key (here: none, the mail went unsigned).
    From: is now read from the whole header section."""
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, "mail.sender.example  rsa1._domainkey.sender.example\n"))
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"x" * 60) for i in range(1000))
    assert 64 * 1024 < len(padding) < 90 * 1024
    reply, content = await sent(srv, padding + SUBDOMAIN_MESSAGE)  # From: alice@mail.sender.example
    assert reply[0] == 250
    names = [line.split(b":")[0] for line in content.split(b"\r\n\r\n")[0].split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:3] == [b"Received", b"DKIM-Signature", b"X-Pad-0"]
    assert b"d=sender.example" in content and b"s=rsa1" in content
    assert dkim.verify(content, dnsfunc=dnsfunc(zone))


async def test_an_unreadable_key_defers_the_message_instead_of_sending_it_unsigned(start, keys, tmp_path, caplog):
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, "sender.example  missing\n"))
    reply, content = await sent(srv)
    assert reply == (451, b"4.3.0 Error: queue file write error")
    assert content is None
    assert any("DKIM signing failed" in r.getMessage() and "gone.private" in r.getMessage() for r in caplog.records)


async def test_a_message_whose_header_cannot_be_parsed_goes_unsigned_with_a_warning(start, keys, tmp_path, caplog):
    directory, zone = keys
    srv = await start(zone, **tables(tmp_path, directory, "sender.example  rsa1._domainkey.sender.example\n"))
    broken = MESSAGE.replace(b"Subject: hello\r\n", b"Subject: hello\r\nthis line is no header field\r\n")
    reply, content = await sent(srv, broken)
    assert reply[0] == 250
    assert b"DKIM-Signature" not in content
    assert any("not DKIM-signed" in r.getMessage() for r in caplog.records)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    record = keygen(tmp_path, "Example.ORG", "s2026", "rsa")
    assert record.startswith('"v=DKIM1; k=rsa; p=')
    key = tmp_path / "s2026.private"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "s2026.txt").read_text().startswith("s2026._domainkey.example.org. IN TXT (")
    before = key.read_bytes()
    again = trimail("dkim", "keygen", "example.org", "s2026", "--directory", str(tmp_path))
    assert again.returncode == 1 and "exists already" in again.stderr
    assert key.read_bytes() == before


def test_local_submission_is_signed_by_sendmail(keys, tmp_path):
    directory, zone = keys
    config_path = write_main_cf(tmp_path, smtpd_listen="127.0.47.30:0", alias_maps="", alias_database="",
                                **tables(tmp_path, directory, "sender.example  rsa1._domainkey.sender.example\n"))
    message = b"From: Alice <alice@sender.example>\nTo: bob@rcpt.example\nSubject: local\n\nsigned locally\n"
    done = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), "-f",
                           "alice@sender.example", "bob@rcpt.example"], input=message, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    store = Store.open(tmp_path / "queue", readonly=True)
    try:
        [queued] = store.list_messages()
        content = store.read_content(queued.id)
    finally:
        store.close()
    names = [line.split(b":")[0] for line in content.split(b"\r\n\r\n")[0].split(b"\r\n") if line[:1] not in b" \t"]
    assert names[:2] == [b"Received", b"DKIM-Signature"]
    assert dkim.verify(content, dnsfunc=dnsfunc(zone))


async def test_mail_from_an_authenticated_client_outside_mynetworks_is_signed_not_checked(
        nursery, keys, tmp_path, ca):
    directory, zone = keys
    cert = tmp_path / "cert.pem"
    ca.issue_cert("mx.test.example", "127.0.47.30").private_key_and_cert_chain_pem.write_to_path(str(cert))
    port = await nursery.start(run_dns_server, zone, "127.0.47.31")
    path = write_main_cf(tmp_path, smtpd_listen="127.0.47.30:0", dns_nameservers=f"127.0.47.31:{port}",
                         mynetworks="127.0.47.33/32", smtpd_tls_cert_file=str(cert), smtpd_sasl_auth_enable="yes",
                         smtpd_sasl_password_file=str(tmp_path / "sasl_passwd"), smtpd_peername_lookup="no",
                         **tables(tmp_path, directory, "sender.example  rsa1._domainkey.sender.example\n"))
    added = await trio.run_process([sys.executable, "-m", "trimail", "passwd", "add", "alice", "-c", str(path)],
                                   stdin=b"correct horse\n", capture_stdout=True, capture_stderr=True, check=False)
    assert added.returncode == 0, added.stderr
    srv = await nursery.start(serve, configuration.load(path))

    def submit() -> tuple[int, bytes]:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP("127.0.47.30", srv.addresses[0].port, local_hostname="laptop.example", timeout=30,
                          source_address=("127.0.47.34", 0)) as smtp:  # outside mynetworks
            smtp.starttls(context=context)
            smtp.login("alice", "correct horse")
            smtp.mail("alice@sender.example")
            smtp.rcpt("bob@far.example")  # relayed: permit_sasl_authenticated
            return smtp.data(MESSAGE)

    reply = await trio.to_thread.run_sync(submit)
    assert reply[0] == 250
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        [queued] = store.list_messages()
        content = store.read_content(queued.id)
    finally:
        store.close()
    assert b"Authentication-Results" not in content
    assert dkim.verify(content, dnsfunc=dnsfunc(zone))


async def test_a_signing_table_without_a_key_table_is_a_configuration_error(nursery, tmp_path):
    path = write_main_cf(tmp_path, smtpd_listen="127.0.47.30:0", dkim_signing_table="inline:{ a.example=k }")
    with pytest.raises(ConfigError, match="dkim_signing_table needs dkim_key_table"):
        await nursery.start(serve, configuration.load(path))
