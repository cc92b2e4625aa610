"""SMTPUTF8 addresses never carry control characters, line or paragraph separators or
bidirectional overrides (docs/security.md): C0 and C1 controls, DEL, U+2028, U+2029
and the bidi embedding/override/isolate marks are refused in MAIL and RCPT, so
nothing downstream (a log line, a header, a terminal, a file name) can be split,
reordered or injected through an address."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail.smtp.address import AddressError, check_mailbox, parse_path

FORBIDDEN = [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)] + [
    "\u2028", "\u2029", "\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
    "\u2066", "\u2067", "\u2068", "\u2069"]

_text = st.text(alphabet=st.characters(min_codepoint=0x61, max_codepoint=0x7a) | st.sampled_from("éü中"),
                min_size=1, max_size=10)


@given(_text, st.sampled_from(FORBIDDEN), _text, st.booleans())
def test_forbidden_characters_are_refused_anywhere_in_an_address(left, bad, right, in_domain):
    address = f"{left}@{right}{bad}.example" if in_domain else f"{left}{bad}{right}@d.example"
    with pytest.raises(AddressError):
        check_mailbox(address, utf8=True)
    with pytest.raises(AddressError):
        parse_path(f"<{address}> SMTPUTF8", "FROM:", utf8_allowed=False)


@given(_text, _text)
def test_ordinary_utf8_addresses_are_still_accepted(local, domain):
    assert check_mailbox(f"{local}@{domain}.example", utf8=True)


@pytest.mark.parametrize("bad", ["\u2028", "\u2029", "\x85", "\u202e", "\x9b"])
def test_machine_refuses_separators_and_c1_controls_under_smtputf8(bad):
    d = Driver().feed(f"EHLO c.example\r\nMAIL FROM:<a@c.example> SMTPUTF8\r\n"
                      f"RCPT TO:<bo{bad}b@d.example>\r\nMAIL FROM:<x{bad}@c.example> SMTPUTF8\r\n".encode())
    assert d.replies()[-2:] == ["501 5.1.3 Bad recipient address syntax", "503 5.5.1 Error: nested MAIL command"]
    d = Driver().feed(f"EHLO c.example\r\nMAIL FROM:<x{bad}@c.example> SMTPUTF8\r\n".encode())
    assert d.replies()[-1] == "501 5.1.7 Bad sender address syntax"



@given(st.text(st.sampled_from(list('<>"\\ab@ ')), max_size=40).map(lambda rest: "<" + rest))
def test_the_closing_bracket_of_a_path_honours_quotes_and_escapes(text):
    """The short way (no quote in the text: the first '>') agrees with the scan of every character."""
    from trimail.smtp.address import _closing_bracket, _scan_closing_bracket

    assert _closing_bracket(text) == _scan_closing_bracket(text)
