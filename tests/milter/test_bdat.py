"""smtpd_milters and BDAT (RFC 3030): the filters see a message sent in chunks as they
see it sent with DATA (the DATA stage at the first chunk, the headers and the body
after LAST), and their answers are Postfix's replies to BDAT: a refusal at the DATA
stage after the first chunk's bytes, then the later chunks discarded; a refusal at the
end of the message as the reply to BDAT LAST.  Everything in 127.0.102.0/24."""

from __future__ import annotations

import socket

import trio

from tests.milter.conftest import MESSAGE, stored
from tests.milter.peers import FakeMilter, reply
from trimail.milter import protocol as p

HOST, MILTER = "127.0.102.1", "127.0.102.2"
START = b"EHLO client.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@remote.example>\r\n"


def on(command: bytes, *frames: bytes):
    return lambda c, data, m: list(frames) if c == command else None


async def session(port: int, wire: bytes, count: int) -> list[str]:
    def talk() -> list[str]:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            stream = sock.makefile("rb")
            sock.sendall(wire)
            out = []
            while len(out) < count + 1:
                line = stream.readline()
                if not line:
                    break
                if line[3:4] != b"-":
                    out.append(line.decode().rstrip("\r\n"))
            return out[1:]
    return await trio.to_thread.run_sync(talk)


def chunks(data: bytes, *cuts: int) -> bytes:
    bounds = [0, *cuts, len(data)]
    parts = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return b"".join(b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(parts) - 1 else b"") + c
                    for i, c in enumerate(parts))


async def test_filters_see_a_chunked_message_as_one_sent_with_data(start_serve, nursery):
    milter = await nursery.start(FakeMilter(host=MILTER).run)
    srv = await start_serve(smtpd_listen=f"{HOST}:0", smtpd_milters=milter.name)
    port = srv.addresses[0].port
    got = await session(port, START + chunks(MESSAGE.encode(), 30, 150, 160) + b"QUIT\r\n", 8)
    assert got[3:6] == ["250 2.0.0 Ok: 30 bytes", "250 2.0.0 Ok: 120 bytes", "250 2.0.0 Ok: 10 bytes"]
    assert got[6].startswith("250 2.0.0 Ok: ") and got[7] == "221 2.0.0 Bye"
    assert milter.got(p.SMFIC_DATA)  # the DATA stage, at the first chunk
    headers = [d.split(b"\0")[:2] for d in milter.got(p.SMFIC_HEADER)]
    assert headers[0] == [b"From", b"Alice <alice@example.com>"] and len(headers) == 5
    assert b"".join(milter.got(p.SMFIC_BODY)) == b"Hello Bob,\r\nthis is the body.\r\n"
    _, content = stored(srv, got[6].rsplit(" ", 1)[1])
    assert content.endswith(MESSAGE.encode())


async def test_a_filters_refusal_at_the_data_stage_answers_the_first_chunk(start_serve, nursery):
    at_data = await nursery.start(FakeMilter(on(p.SMFIC_DATA, reply(p.SMFIR_REJECT)), host=MILTER).run)
    srv = await start_serve(smtpd_listen=f"{HOST}:0", smtpd_milters=at_data.name)
    port = srv.addresses[0].port
    got = await session(port, START + chunks(MESSAGE.encode(), 30) + b"NOOP\r\n", 6)
    assert got[3:] == ["550 5.7.1 Command rejected", "551 5.0.0 Discarded %d bytes after earlier error"
                       % (len(MESSAGE) - 30), "250 2.0.0 Ok"]


async def test_a_filters_refusal_at_the_end_answers_bdat_last(start_serve, nursery):
    at_end = await nursery.start(FakeMilter(on(p.SMFIC_BODYEOB, reply(p.SMFIR_REPLYCODE, b"554 5.7.0 Virus found\0")),
                                            host=MILTER).run)
    srv = await start_serve(smtpd_listen=f"{HOST}:0", smtpd_milters=at_end.name)
    port = srv.addresses[0].port
    got = await session(port, START + chunks(MESSAGE.encode(), 30) + b"NOOP\r\n", 6)
    assert got[3:] == ["250 2.0.0 Ok: 30 bytes", "554 5.7.0 Virus found", "250 2.0.0 Ok"]
