"""A message's chunks cut into the lines the header and body checks take
(trimail.cleanup.checks), a long line in pieces so that it is never held whole."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def message_lines(chunks: Iterable[bytes], longest: int = 0) -> Iterator[bytes]:
    """The lines of a message given in *chunks*, each with its LF (a bare CR is no line
    end; the last line may have none); a line longer than a chunk is gathered in one
    buffer, never copied again per chunk.  With *longest*, a line longer than that
    comes in pieces of *longest* bytes (its last piece the rest, with the LF): a piece
    without an LF is followed by more of its line."""
    carry = bytearray()
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if carry:
                carry += chunk[start:end + 1]
                yield from _pieces(carry, longest, whole=True)
            elif longest and end + 1 - start > longest:
                yield from _pieces(bytearray(chunk[start:end + 1]), longest, whole=True)
            else:
                yield chunk[start:end + 1]
            start = end + 1
        carry += chunk[start:]
        if longest and len(carry) > longest:
            yield from _pieces(carry, longest, whole=False)
    if carry:
        yield bytes(carry)


def _pieces(carry: bytearray, longest: int, whole: bool) -> Iterator[bytes]:
    """*carry*'s bytes in pieces of *longest* (0: one piece), taken out of it: all of
    them when it holds the *whole* rest of a line, else every full piece (a line's
    pieces are cut at multiples of *longest* from its start)."""
    size = len(carry)
    if not longest or (whole and size <= longest):
        yield bytes(carry)
        carry.clear()
        return
    taken = size if whole else size - size % longest
    with memoryview(carry) as view:
        pieces = [bytes(view[at:min(at + longest, taken)]) for at in range(0, taken, longest)]
    del carry[:taken]
    yield from pieces
