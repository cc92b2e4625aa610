"""A real DNS server on loopback (UDP, trio) answering exactly the records a test sets.

    zone = {"example.com": {"MX": ["10 mx1.example.com.", "20 mx2.example.com."]},
            "mx1.example.com": {"A": ["127.0.0.2"]},
            "gone.example": "NXDOMAIN", "sick.example": "SERVFAIL"}
    port = await nursery.start(run_dns_server, zone)
"""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import trio


async def run_dns_server(zone: dict, host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED):
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            data, peer = await sock.recvfrom(4096)
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            await sock.sendto(answer(zone, query).to_wire(), peer)


def answer(zone: dict, query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    rdtype = dns.rdatatype.to_text(question.rdtype)
    entry = zone.get(name)
    if entry == "SERVFAIL":
        response.set_rcode(dns.rcode.SERVFAIL)
    elif entry == "NXDOMAIN" or entry is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif entry == "TIMEOUT":
        response.set_rcode(dns.rcode.REFUSED)
    else:
        records = entry.get(rdtype, [])
        if records:
            response.answer.append(dns.rrset.from_text(question.name, 60, "IN", rdtype, *records))
    return response
