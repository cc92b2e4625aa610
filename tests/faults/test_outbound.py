"""What the outside world can do to the sending side, against a real ``trimail serve``:
hostile DNS zones (300 MX records, numeric and garbage exchange names), peers that
answer EHLO oddly, and MIME built to make the 8-bit conversion work hard.  serve keeps
answering, the fan-out stays bounded and every message ends delivered or deferred."""

from __future__ import annotations

from tests.delivery.outbound_peer import ScriptedPeer
from tests.dnsserver import run_dns_server
from tests.faults.conftest import (
    assert_serving,
    integrity_ok,
    send,
    trimail_cmd,
    trio_thread,
    wait_until,
)


def deep_mime(depth: int) -> bytes:
    head = b"MIME-Version: 1.0\r\n"
    out = bytearray()
    for level in range(depth):
        out += (b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                b"--b%d\r\n" % (level, level))
    out += b"Content-Type: text/plain\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    out += b"\xff" * 200_000 + b"\r\n"  # one long 8-bit line
    for level in reversed(range(depth)):
        out += b"--b%d--\r\n" % level
    return head + bytes(out)


def queued(d) -> list[dict]:
    import json

    result = trimail_cmd("queue", "list", "--json", "-c", str(d.config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_hostile_zones_odd_peers_and_deep_mime_leave_serve_running(daemon):
    busy = ScriptedPeer(greeting=b"421 4.3.2 busy")
    odd = ScriptedPeer(ehlo_name="", extensions=("PIPELINING",))  # "250 " and nothing else
    plain = ScriptedPeer(extensions=())  # no 8BITMIME: the deep MIME is converted
    zone: dict = {"fan.example": {"MX": [f"{i % 7} mx{i}.fan.example." for i in range(300)]},
                  "numeric.example": {"MX": ["10 127.0.0.1.", "20 [127.0.0.1].", "30 a\\000b.numeric.example.",
                                             "40 -bad-.numeric.example."]}}
    zone.update({f"mx{i}.fan.example": {"A": ["127.0.0.1"]} for i in range(300)})
    with trio_thread((busy.run,), (odd.run,), (plain.run,)) as (busy_port, odd_port, plain_port):
        zone["odd.example"] = {"A": ["127.0.0.1"]}
        with trio_thread((run_dns_server, zone)) as (dns_port,):
            d = daemon(dns_nameservers=f"127.0.0.1:{dns_port}", smtp_connect_timeout="5s",
                       transport_maps=f"inline:{{ fan.example=smtp:fan.example:{busy_port}, "
                                      f"numeric.example=smtp:numeric.example:{plain_port}, "
                                      f"odd.example=smtp:odd.example:{odd_port}, "
                                      f"deep.example=smtp:[127.0.0.1]:{plain_port}, "
                                      f"deeper.example=smtp:[127.0.0.1]:{plain_port} }}")
            send(d.port, ["r@fan.example"])
            send(d.port, ["r@numeric.example"])
            send(d.port, ["r@odd.example"])
            send(d.port, ["r@deep.example"], body=deep_mime(30))
            send(d.port, ["r@deeper.example"], body=deep_mime(40))
            wait_until(lambda: len(plain.received) == 2 and len(odd.received) == 1, timeout=30)
            wait_until(lambda: {r["address"]: r["status"] for m in queued(d) for r in m["recipients"]}
                       == {"r@fan.example": "deferred", "r@numeric.example": "deferred"}, timeout=30)
            assert busy.connections == 5  # smtp_mx_address_limit, in one attempt
            got = {r.rcpts[0]: r.data for r in plain.received}  # and nothing for numeric.example
            assert set(got) == {b"RCPT TO:<r@deep.example>", b"RCPT TO:<r@deeper.example>"}
            converted = got[b"RCPT TO:<r@deep.example>"]
            assert converted.isascii() and converted.count(b"Content-Transfer-Encoding: 7bit") == 30
            # past MAX_DEPTH the conversion stops: the rest goes as it came (as with
            # disable_mime_output_conversion), the 8-bit line intact
            # (lines past smtp_line_length_limit go out broken with CRLF SPACE)
            assert b"\r\n" + b"\xff" * 200_000 + b"\r\n" in got[b"RCPT TO:<r@deeper.example>"].replace(b"\r\n ", b"")
            assert_serving(d)
            assert integrity_ok(d.queue_directory) == "ok"
