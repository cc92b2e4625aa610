"""A DNS server in a thread for tests that drive a ``trimail serve`` child process
(tests/dnsserver.py runs in the test's trio run, which those tests do not have):
it answers PTR and A records a test sets, may answer late or never (all names,
the reverse zones of some addresses, or every name of a zone), and counts the
queries it gets (``asked``: per name).  Names are dnspython names, so a label can hold any bytes
(the hostile PTR names of the red team: brackets, spaces, control characters).

    dns = HostileDns("127.0.47.53", ptr={"127.0.48.1": [b"evil[6.6.6.6]"]},
                     a={b"evil[6.6.6.6]": ["127.0.48.1"]}, delay=0.0)
    with dns: ...
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.IN.A
import dns.reversename
import dns.rrset


def name(labels: bytes | str) -> dns.name.Name:
    """A name from raw dotted bytes: every byte but the dots kept as it is."""
    raw = labels.encode() if isinstance(labels, str) else labels
    return dns.name.Name([label for label in raw.split(b".") if label] + [b""])


class HostileDns:
    def __init__(self, host: str, ptr: dict[str, list[bytes | str]] | None = None,
                 a: dict[bytes | str, list[str]] | None = None, delay: float = 0.0,
                 silent: bool = False, silent_for: list[str] | None = None,
                 silent_zone: str | None = None) -> None:
        self.ptr = {dns.reversename.from_address(addr): [name(n) for n in names]
                    for addr, names in (ptr or {}).items()}
        self.a = {name(n): addrs for n, addrs in (a or {}).items()}
        self.delay = delay
        self.silent = silent
        # addresses whose reverse zone never answers (a hostile client's own zone)
        self.silent_for = {dns.reversename.from_address(addr) for addr in silent_for or ()}
        # a zone whose servers never answer (every name at or under it: a silent wildcard zone)
        self.silent_zone = name(silent_zone) if silent_zone else None
        self.queries = 0
        self.asked: dict[str, int] = {}  # queries per name (as text), as they arrive
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        pending: list[tuple[float, bytes, tuple]] = []
        while not self._stop.is_set():
            now = time.monotonic()
            for due, data, peer in [p for p in pending if p[0] <= now]:
                pending.remove((due, data, peer))
                try:
                    self.sock.sendto(data, peer)
                except OSError:
                    pass
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            if self.silent:
                continue
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001, S112 - garbage in: no answer
                continue
            if not query.question:
                continue
            qname = query.question[0].name
            key = qname.to_text(omit_final_dot=True)
            self.asked[key] = self.asked.get(key, 0) + 1
            if qname in self.silent_for or (self.silent_zone is not None and qname.is_subdomain(self.silent_zone)):
                continue
            wire = self.answer(query).to_wire()
            if self.delay:
                pending.append((time.monotonic() + self.delay, wire, peer))
            else:
                self.sock.sendto(wire, peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        qname = question.name
        if question.rdtype == dns.rdatatype.PTR and qname in self.ptr:
            rrset = dns.rrset.RRset(qname, dns.rdataclass.IN, dns.rdatatype.PTR)
            for target in self.ptr[qname]:
                rrset.add(dns.rdtypes.ANY.PTR.PTR(dns.rdataclass.IN, dns.rdatatype.PTR, target), 60)
            response.answer.append(rrset)
        elif question.rdtype == dns.rdatatype.A and qname in self.a:
            rrset = dns.rrset.RRset(qname, dns.rdataclass.IN, dns.rdatatype.A)
            for address in self.a[qname]:
                rrset.add(dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, address), 60)
            response.answer.append(rrset)
        elif qname in self.ptr or qname in self.a:
            pass  # the name exists, no records of this type
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response
