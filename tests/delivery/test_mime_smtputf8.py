"""content_needs_smtputf8: the header lines of every MIME entity count, bodies do not,
and the answer does not depend on how the content is chunked."""

from __future__ import annotations

import itertools

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.delivery.mime import content_needs_smtputf8

MULTIPART = (b"Subject: plain\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\ncaf\xc3\xa9 preamble\r\n"
             b"--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"caf\xc3\xa9 body\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
             b"Subject: nested%s\r\n\r\ncaf\xc3\xa9\r\n--b--\r\ncaf\xc3\xa9 epilogue\r\n")


def needs(content: bytes, cuts: list[int] = (), sender: str = "a@x", rcpt: str = "b@y") -> bool:
    points = sorted({0, len(content), *[c % (len(content) + 1) for c in cuts]})

    async def chunks():
        for start, end in itertools.pairwise(points):
            yield content[start:end]

    return trio.run(content_needs_smtputf8, sender, [rcpt], chunks)


def test_bodies_do_not_count_headers_of_every_entity_do():
    assert not needs(MULTIPART % b"")
    assert needs(MULTIPART % b" caf\xc3\xa9")  # a nested message's header
    assert needs(b"Subject: x\r\n\r\n", rcpt="ren\u00e9@y")
    assert needs(b"Subject: x\r\n" + b"X: " + b"y" * 70_000 + b"\r\nX-Late: \xc3\xa9\r\n\r\n")  # past MAX_LINE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0), max_size=6), st.booleans())
def test_any_chunking_gives_the_same_answer(cuts, utf8):
    content = MULTIPART % (b" caf\xc3\xa9" if utf8 else b"")
    assert needs(content, cuts) is utf8


PIECES = st.sampled_from([b"\r\n", b"--b\r\n", b"--b--\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
                          b"Content-Type: message/rfc822\r\n", b"X: \xc3\xa9\r\n", b" fold\r\n", b"\xff",
                          b"Content-Transfer-Encoding: 8bit\r\n", b"body line\r\n", b"(((", b"\r", b"\n"])


@settings(max_examples=150, deadline=None)
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(min_value=0), max_size=5))
def test_any_content_is_scanned_without_error_and_chunking_does_not_matter(pieces, cuts):
    content = b"".join(pieces)
    assert needs(content, cuts) is needs(content)
