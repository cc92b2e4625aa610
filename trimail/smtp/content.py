"""Message content normalisation: only CRLF line ends are stored (Postfix's cleanup).

``replace_stray_cr_lf`` is Postfix's ``cleanup_replace_stray_cr_lf``: every CR that
is not followed by LF, and every LF that does not follow a CR, becomes one space.
SMTP allows these characters only as a CRLF pair; a stray one that is stored is
relayed as it is, and a lax downstream that ends DATA at ``<CR>.<CR>`` or
``<LF>.<LF>`` would then take the rest of the message for new commands (outbound
SMTP smuggling).  Replacing them once, on the way in, also makes any signature
made later independent of how other mail systems treat them.  The length never
changes, so size accounting is unaffected.

The DATA reader (``trimail.smtp.dotreader``) applies it to each chunk it emits; its
chunks hold complete lines, except that a very long line is passed on in pieces
whose last byte is never an LF and whose next byte is never an LF either, so a CR
at the very end of a chunk is stray too and the function needs no state.

Performance: the common case (no stray character) costs three ``bytes.count``
calls in general, all in C; the DATA reader's bulk pass counts LF, CRLF and CR
once for both its bare-LF test and this one, and calls ``replace_stray_cr`` (its
output has no bare LF left) only when they disagree.  A stray character costs a
regular-expression substitution for its kind.  Never a per-byte Python loop: this
is on the path of every message.

Pure: bytes in, bytes out; no I/O.  Parameter (through the caller):
cleanup_replace_stray_cr_lf.
"""

from __future__ import annotations

import re

# A line that starts with a dot (dot-stuffing, the end of DATA).  Found with re, not
# bytes.find: sre looks for the LF with memchr, two to three times as fast as find's
# search for a two-byte needle (100 KB of 80-byte lines: about 40 against 100 us).
LINE_DOT = re.compile(rb"\n\.")
_STRAY_CR = re.compile(rb"\r(?!\n)")
_STRAY_LF = re.compile(rb"(?<!\r)\n")


def replace_stray_cr_lf(data: bytes) -> bytes:
    """*data* with each CR or LF that is not part of a CRLF pair replaced by a space."""
    pairs = data.count(b"\r\n")
    if data.count(b"\n") != pairs:
        data = _STRAY_LF.sub(b" ", data)
    if data.count(b"\r") != pairs:
        data = _STRAY_CR.sub(b" ", data)
    return data


def replace_stray_cr(data: bytes) -> bytes:
    """The same for content in which every LF already follows a CR (the DATA
    reader's output): a stray CR is one too many CRs for the LFs."""
    if data.count(b"\r") == data.count(b"\n"):
        return data
    return _STRAY_CR.sub(b" ", data)
