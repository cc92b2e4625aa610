"""The milter protocol core without I/O: frames, values, negotiation, legal replies,
and the message edits.  Property tests: whatever bytes a filter sends, only
MilterProtocolError comes out; byte at a time reads the same frames as all at once."""

from __future__ import annotations

import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.milter import protocol as p
from trimail.milter.edit import Content, apply, split_header
from trimail.milter.machine import Conversation, parse_endpoint, parse_protocol
from trimail.milter.protocol import Decision, FrameReader, MilterProtocolError, Modification, OptNeg
from trimail.queue.spool import Spool

frames = st.lists(st.tuples(st.sampled_from(list(p.NAMES)), st.binary(max_size=64)), max_size=8)


def read_all(reader: FrameReader) -> list[tuple[bytes, bytes]]:
    out = []
    while (got := reader.next_frame()) is not None:
        out.append(got)
    return out


@given(frames)
def test_byte_at_a_time_reads_the_same_frames_as_all_at_once(items):
    wire = b"".join(p.frame(c, d) for c, d in items)
    whole = FrameReader()
    whole.receive_data(wire)
    single = FrameReader()
    got = []
    for i in range(len(wire)):
        single.receive_data(wire[i:i + 1])
        got += read_all(single)
    assert read_all(whole) == got == items


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_any_bytes_give_frames_or_a_protocol_error(data):
    reader = FrameReader(max_size=100)
    reader.receive_data(data)
    try:
        for command, payload in read_all(reader):
            try:
                p.parse_response(command, payload)
            except MilterProtocolError:
                pass
    except MilterProtocolError:
        pass


@given(st.sampled_from(list(p.NAMES)), st.binary(max_size=64),
       st.sampled_from(["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom"]))
def test_any_reply_after_any_event_is_a_value_or_a_protocol_error(command, data, event):
    conv = Conversation()
    conv.negotiated(OptNeg(6, p.SMFIF_ADDHDRS, 0))
    try:
        conv.check(event, p.parse_response(command, data))
    except MilterProtocolError:
        pass


def test_a_frame_longer_than_the_bound_is_refused_before_it_is_buffered():
    reader = FrameReader(max_size=1000)
    reader.receive_data(struct.pack(">I", 1001))
    with pytest.raises(MilterProtocolError, match="unreasonable packet length: 1001 > 1000"):
        reader.next_frame()


def test_responses_parse_into_values():
    assert p.parse_response(b"y", b"554 5.7.1 no\0") == Decision("replycode", "554 5.7.1 no")
    assert p.parse_response(b"m", struct.pack(">I", 2) + b"Subject\0new\0") == \
        Modification("chgheader", name="Subject", value="new", index=2)
    assert p.parse_response(b"e", b"<a@b>\0SIZE=10\0") == Modification("chgfrom", value="<a@b>", args="SIZE=10")
    assert p.parse_response(b"e", b"<a@b>\0") == Modification("chgfrom", value="<a@b>")
    optneg = p.parse_response(b"O", struct.pack(">IIII", 6, 1, 2, 1) + b"{client_addr} j\0")
    assert optneg == OptNeg(6, 1, 2, {"helo": ("{client_addr}", "j")})
    with pytest.raises(MilterProtocolError):
        p.parse_response(b"h", b"X-A\0")  # one string where two are needed


def test_negotiation_and_event_flags():
    conv = Conversation("6")
    assert conv.open() == p.frame(b"O", struct.pack(">III", 6, p.ALL_ACTIONS, p.V6_MASK))
    conv.negotiated(OptNeg(6, p.SMFIF_ADDHDRS, p.SMFIP_NOHELO | p.SMFIP_NR_RCPT))
    data, reply = conv.event("helo", b"HELO", [("j", "mx")])
    assert data == p.encode_macros(p.SMFIC_HELO, [("j", "mx")]) and not reply  # macros, not the event
    assert conv.event("rcpt", b"RCPT", []) == (b"RCPT", False)
    assert conv.event("mail", b"MAIL", []) == (b"MAIL", True)
    conv.check("body", Decision("skip"))
    assert conv.event("body", b"BODY", []) == (b"", False)
    assert conv.event("eom", b"EOM", []) == (b"EOM", True)
    with pytest.raises(MilterProtocolError):
        conv.check("helo", Decision("discard"))
    with pytest.raises(MilterProtocolError, match="chgfrom was not negotiated"):
        conv.check("eom", Modification("chgfrom", value="<a@b>"))


def test_an_older_filter_gets_only_its_versions_events():
    conv = Conversation("6")
    conv.negotiated(OptNeg(2, 0, 0))
    assert conv.event("data", b"DATA", []) == (b"", False)  # SMFIC_DATA is version 4
    assert conv.event("mail", b"MAIL", []) == (b"MAIL", True)


def test_milter_protocol_and_endpoint_syntax():
    assert parse_protocol("6") == (6, p.V6_MASK)
    assert parse_protocol("2 no_header_reply") == (2, p.V2_MASK | p.SMFIP_NR_HDR)
    for bad in ("", "5", "6 4", "fast"):
        with pytest.raises(ValueError):
            parse_protocol(bad)
    assert parse_endpoint("inet:127.0.0.1:8891") == ("inet", "127.0.0.1", 8891)
    assert parse_endpoint("inet:[::1]:8891") == ("inet", "::1", 8891)
    assert parse_endpoint("inet:8891@localhost") == ("inet", "localhost", 8891)
    assert parse_endpoint("unix:/run/opendkim.sock") == ("unix", "/run/opendkim.sock", 0)
    for bad in ("127.0.0.1:8891", "tcp:host:1", "inet:host:0", "inet:host"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def content(message: bytes) -> Content:
    spool = Spool()
    spool.write(message)
    _, offset = split_header(message)
    return Content(spool, message[:offset], offset, own_first=True, sender="a@x", recipients=["b@y"])


def test_edits_follow_postfixs_header_indexes():
    c = content(b"Received: ours\r\nReceived: theirs\r\nSubject: s\r\n\r\nbody\r\n")
    assert c.visible_headers() == [("Received", " theirs"), ("Subject", " s")]
    apply(c, [Modification("chgheader", name="Received", value="changed", index=1),
              Modification("insheader", name="X-Top", value="t", index=0)], leading_space=False)
    built = trio.run(c.build).getvalue()
    assert built == b"X-Top: t\r\nReceived: ours\r\nReceived: changed\r\nSubject: s\r\n\r\nbody\r\n"


@given(st.text(max_size=40))
def test_no_header_value_can_end_the_header_section(value):
    c = content(b"Subject: s\r\n\r\nbody\r\n")
    apply(c, [Modification("addheader", name="X-V", value=value)], leading_space=False)
    built = trio.run(c.build).getvalue()
    fields, offset = split_header(built)
    assert len(fields) == 2 and built[offset:] == b"body\r\n"


def test_a_bad_header_name_is_refused():
    with pytest.raises(ValueError):
        apply(content(b"A: b\r\n\r\n"), [Modification("addheader", name="Bad Name", value="v")], False)


def test_a_replaced_body_gets_crlf_line_ends_and_a_bound():
    c = content(b"Subject: s\r\n\r\nold\r\n")
    apply(c, [Modification("replbody", data=b"one\ntwo\r"), Modification("replbody", data=b"\nthree")], False)
    assert trio.run(c.build).getvalue() == b"Subject: s\r\n\r\none\r\ntwo\r\nthree\r\n"
    c = content(b"Subject: s\r\n\r\nold\r\n")
    c.size_limit = 10
    with pytest.raises(ValueError, match="body replacement exceeds 10 bytes"):
        apply(c, [Modification("replbody", data=b"x" * 11)], False)


def test_the_protocol_core_imports_no_io_library():
    import ast
    from pathlib import Path

    import trimail.milter.machine
    import trimail.milter.protocol

    for module in (trimail.milter.protocol, trimail.milter.machine):
        tree = ast.parse(Path(module.__file__).read_text())
        names = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        names |= {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names}
        assert not names & {"trio", "socket", "apsw", "dns", "asyncio", "logging"}, module.__name__
