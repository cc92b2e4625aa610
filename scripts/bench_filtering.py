"""``scripts/bench --mode filtering``: what filtering costs a message, in CPU seconds
per 1,000 messages of ``trimail serve``, beside the unfiltered figure.

One ``trimail serve`` (``smtpd_workers = 0``, the queue manager off: receiving
only) per case, a loopback DNS server in this process publishing the sender's SPF,
DKIM and DMARC records, and smtplib sending *messages* 4 KiB messages, one per
connection, from a client outside ``mynetworks`` (127.0.48.20) unless the case
says otherwise.  The cases:

- ``unfiltered``: ``smtpd_authentication_checks =`` (empty), no milter;
- ``checks``: the default ``spf, dkim, dmarc`` on mail signed rsa-sha256 (2048 bits)
  by the sender's domain: SPF at MAIL FROM, DKIM verification, DMARC, the
  ``Authentication-Results`` header;
- ``checks-ed25519``: the same, signed ed25519-sha256;
- ``milter``: no native checks, ``smtpd_milters`` = a real OpenDKIM (Debian's
  ``opendkim``) verifying the same signed mail: one milter round trip per stage.
  OpenDKIM's own CPU is reported beside trimail's;
- ``signing``: a client inside ``mynetworks`` (127.0.48.10) whose mail trimail
  signs (``dkim_signing_table``, rsa-sha256 2048 bits).

Each figure is the median of ``--runs`` runs (alternating between the cases), the
CPU time of the serve process (user + system, from /proc) divided by the messages,
and its difference from ``unfiltered`` (or, for ``signing``, from the same client
unfiltered).  The DNS answers are cached for their TTL, so the figures are the
steady state of a gateway that sees the same senders again.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_conn import cpu_seconds
from bench_mtas import free_port

HOST = "127.0.48.1"
DNS_HOST = "127.0.48.2"
OUTSIDE = "127.0.48.20"
INSIDE = "127.0.48.10"
DOMAIN = "sender.example"
CASES = ("unfiltered", "checks", "checks-ed25519", "milter", "inside-unfiltered", "signing")
BODY = b"".join(b"line %04d of a message body that is about four kilobytes long....\r\n" % i for i in range(60))
MESSAGE = (b"From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\nSubject: bench\r\n"
           b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\n" + BODY)


def _txt(record: str) -> str:
    return " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))


class _Dns:
    """The tests' loopback DNS answers (tests/dnsserver.py) on DNS_HOST port 53, in a
    thread of its own: port 53 because OpenDKIM's ``Nameservers`` takes addresses only."""

    port = 53

    def __init__(self, zone: dict) -> None:
        from tests.dnsserver import answer

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((DNS_HOST, self.port))

        def serve() -> None:
            import dns.message

            while True:
                data, peer = self.sock.recvfrom(4096)
                try:
                    self.sock.sendto(answer(zone, dns.message.from_wire(data)).to_wire(), peer)
                except Exception:  # noqa: BLE001 - a query it cannot parse: no answer, as a server drops it
                    continue

        threading.Thread(target=serve, daemon=True).start()


class _OpenDkim:
    """opendkim -f verifying (Mode v); its resolver (libunbound in Debian's build)
    forwards to DNS_HOST (``Nameservers``)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.port = free_port(HOST)
        (directory / "opendkim.conf").write_text(
            f"Syslog no\nMode v\nSocket inet:{self.port}@{HOST}\nPidFile {directory}/opendkim.pid\n"
            f"Nameservers {DNS_HOST}\n")
        self.proc = subprocess.Popen([shutil.which("opendkim") or "/usr/sbin/opendkim", "-f", "-x",
                                      str(directory / "opendkim.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex((HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        self.close()
        raise SystemExit("bench: opendkim did not start")

    @property
    def name(self) -> str:
        return f"inet:{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        """opendkim's own pid."""
        return self.proc.pid

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _keys(directory: Path) -> dict[str, Any]:
    """rsa (2048) and ed25519 keys for DOMAIN, the zone publishing them with SPF and DMARC."""
    from trimail.authcheck.signing import generate_key, public_record

    rsa, ed = generate_key("rsa", 2048), generate_key("ed25519", 0)
    (directory / "rsa.private").write_bytes(rsa)
    (directory / "ed.private").write_bytes(ed)
    zone = {DOMAIN: {"TXT": [_txt(f"v=spf1 ip4:{OUTSIDE} ip4:{INSIDE} -all")]},
            f"_dmarc.{DOMAIN}": {"TXT": [_txt("v=DMARC1; p=reject")]},
            f"rsa._domainkey.{DOMAIN}": {"TXT": [_txt(public_record(rsa))]},
            f"ed._domainkey.{DOMAIN}": {"TXT": [_txt(public_record(ed))]}}
    (directory / "signing").write_text(f"{DOMAIN} rsa._domainkey.{DOMAIN}\n")
    (directory / "keys.table").write_text(f"rsa._domainkey.{DOMAIN} {DOMAIN}:rsa:{directory}/rsa.private\n")
    from trimail.authcheck.signing import SigningKey, _KeyCache, sign_message

    signed = {kind: sign_message(MESSAGE, SigningKey(DOMAIN, kind, str(directory / f"{kind}.private")), _KeyCache())
              + MESSAGE for kind in ("rsa", "ed")}
    return {"zone": zone, "signed": signed}


class _Serve:
    """``trimail serve`` with *params*, receiving only."""

    def __init__(self, directory: Path, dns_port: int, **params: str) -> None:
        self.port = free_port(HOST)
        settings = {"queue_directory": str(directory / "queue"), "allow_root": "yes", "smtpd_workers": "0",
                    "master_service_disable": "qmgr", "smtpd_listen": f"{HOST}:{self.port}",
                    "mynetworks": f"{INSIDE}/32", "relay_domains": "rcpt.example", "smtpd_peername_lookup": "no",
                    "dns_nameservers": f"{DNS_HOST}:{dns_port}", "maillog_file": str(directory / "log"),
                    "smtpd_client_connection_rate_limit": "0", "smtpd_client_connection_count_limit": "0",
                    **params}
        (directory / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self.proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(directory / "main.cf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                smtplib.SMTP(HOST, self.port, timeout=5).quit()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"bench: trimail serve did not start (see {directory / 'log'})")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _send(port: int, message: bytes, client: str, count: int) -> None:
    for _ in range(count):
        with smtplib.SMTP(HOST, port, local_hostname="mail.sender.example", timeout=60,
                          source_address=(client, 0)) as smtp:
            smtp.sendmail(f"bounce@{DOMAIN}", ["bob@rcpt.example"], message)


def _measure(serve: _Serve, message: bytes, client: str, messages: int,
             other: int | None = None) -> tuple[float, float | None]:
    _send(serve.port, message, client, 20)  # warm: caches, imports, the first key fetch
    started, other_started = cpu_seconds(serve.proc.pid), cpu_seconds(other) if other else 0.0
    _send(serve.port, message, client, messages)
    used = (cpu_seconds(serve.proc.pid) - started) * 1000 / messages
    return used, ((cpu_seconds(other) - other_started) * 1000 / messages) if other else None


def bench_filtering(messages: int, runs: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="trimail-bench-filtering-"))
    keys = _keys(base)
    dns = _Dns(keys["zone"])
    signed_rsa, signed_ed = keys["signed"]["rsa"], keys["signed"]["ed"]
    opendkim = _OpenDkim(base / "opendkim") if shutil.which("opendkim") else None
    tables = {"dkim_signing_table": f"texthash:{base / 'signing'}",
              "dkim_key_table": f"texthash:{base / 'keys.table'}"}
    cases: dict[str, tuple[dict[str, str], bytes, str]] = {
        "unfiltered": ({"smtpd_authentication_checks": ""}, signed_rsa, OUTSIDE),
        "checks": ({}, signed_rsa, OUTSIDE),
        "checks-ed25519": ({}, signed_ed, OUTSIDE),
        "inside-unfiltered": ({"smtpd_authentication_checks": ""}, MESSAGE, INSIDE),
        "signing": (tables, MESSAGE, INSIDE),
    }
    if opendkim is not None:
        cases["milter"] = ({"smtpd_authentication_checks": "", "smtpd_milters": opendkim.name}, signed_rsa, OUTSIDE)
    else:
        print("bench: opendkim is not installed: no milter figure", file=sys.stderr)
    figures: dict[str, list[float]] = {name: [] for name in cases}
    milter_own: list[float] = []
    try:
        for run in range(runs):
            for name, (params, message, client) in cases.items():
                began = time.monotonic()
                directory = base / f"{name}-{run}"
                directory.mkdir()
                serve = _Serve(directory, dns.port, **params)
                try:
                    used, other = _measure(serve, message, client, messages,
                                           opendkim.pid if name == "milter" and opendkim else None)
                finally:
                    serve.stop()
                shutil.rmtree(directory, ignore_errors=True)
                figures[name].append(used)
                if other is not None:
                    milter_own.append(other)
                print(f"run {run + 1}/{runs} {name}: {used:.2f} CPU s per 1,000 ({time.monotonic() - began:.0f} s)",
                      file=sys.stderr)
    finally:
        if opendkim is not None:
            opendkim.close()
        shutil.rmtree(base, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    _print(medians, statistics.median(milter_own) if milter_own else None, messages, runs)
    return {"messages": messages, "runs": runs, "cpu_s_per_1000": figures, "medians": medians,
            "opendkim_cpu_s_per_1000": milter_own}


def _print(medians: dict[str, float], opendkim: float | None, messages: int, runs: int) -> None:
    label: dict[str, tuple[str, Callable[[], str]]] = {
        "unfiltered": ("outside client, no checks, no milter", lambda: ""),
        "checks": ("SPF + DKIM (rsa-sha256, 2048) + DMARC + A-R header",
                   lambda: f"{medians['checks'] - medians['unfiltered']:+.2f}"),
        "checks-ed25519": ("the same, ed25519-sha256",
                           lambda: f"{medians['checks-ed25519'] - medians['unfiltered']:+.2f}"),
        "milter": ("one milter (OpenDKIM verifying), no native checks",
                   lambda: f"{medians['milter'] - medians['unfiltered']:+.2f}"),
        "inside-unfiltered": ("mynetworks client, nothing signed", lambda: ""),
        "signing": ("mynetworks client, DKIM signing (rsa-sha256, 2048)",
                    lambda: f"{medians['signing'] - medians['inside-unfiltered']:+.2f}"),
    }
    print(f"\ntrimail serve (smtpd_workers = 0, receiving only), {messages} messages of 4 KiB, one per "
          f"connection; medians of {runs} runs\n")
    print("| case | CPU s per 1,000 messages | cost of the filtering |")
    print("|---|---|---|")
    for name in CASES:
        if name in medians:
            print(f"| {label[name][0]} | {medians[name]:.2f} | {label[name][1]()} |")
    if opendkim is not None:
        print(f"\nOpenDKIM's own CPU for the milter case: {opendkim:.2f} s per 1,000 messages")
