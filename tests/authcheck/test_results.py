"""The Authentication-Results field (RFC 8601): what a sender controls cannot add a
method, a property or a header line (hypothesis), and forged fields are recognised
by their authserv-id, comments and quoting included."""

from __future__ import annotations

import authres
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trimail.authcheck.dkimverify import DkimResult
from trimail.authcheck.dmarc import DmarcResult
from trimail.authcheck.results import claims, header_field
from trimail.authcheck.spf import SpfResult

_any = st.text(max_size=80)


@settings(max_examples=400, deadline=None)
@given(sender=_any, reason=_any, domain=_any, selector=_any, header_from=_any)
# found by hypothesis: a bare "@" was written unquoted, and a reader took the next
# property for its domain ("Expected end of text")
@example(sender="", reason="", domain="@", selector=":", header_from="")
@example(sender="a@b.example", reason="", domain="x=y", selector="s/1", header_from="")
def test_client_and_dns_text_cannot_add_methods_properties_or_lines(sender, reason, domain, selector, header_from):
    field = header_field("mx.test.example", SpfResult("fail", "mailfrom", "d.example", sender, reason),
                         [DkimResult("permerror", domain, selector, "abc", "rsa-sha256", reason)],
                         DmarcResult("fail", header_from, "reject", "reject", reason))
    text = field.decode("utf-8")
    lines = text.split("\r\n")
    assert lines[-1] == "" and all(line[:1] == "\t" for line in lines[1:-1])  # one field, folded
    parsed = authres.AuthenticationResultsHeader.parse(text.rstrip("\r\n"))
    assert parsed.authserv_id == "mx.test.example"
    assert [(r.method, r.result) for r in parsed.results] == [("spf", "fail"), ("dkim", "permerror"),
                                                                ("dmarc", "fail")]
    # none added (authres drops a quoted-string value it cannot read, so fewer may come back)
    counts = [len(r.properties) for r in parsed.results]
    assert all(n <= m for n, m in zip(counts, [1, 4 if selector else 3, 1 if header_from else 0], strict=True))


def test_no_method_at_all_is_none():
    assert header_field("mx.test.example", None, None, None) == b"Authentication-Results: mx.test.example; none\r\n"


@pytest.mark.parametrize(("value", "ours"), [
    (" mx.test.example; spf=pass", True),
    (" MX.Test.Example.; spf=pass", True),
    (" (a comment (nested)) mx.test.example; dkim=pass", True),
    (' "mx.test.example"; dkim=pass', True),
    (" mx.test.example 1; none", True),  # with a version
    (" mx.test.example.evil.example; spf=pass", False),
    (" upstream.example; spf=pass smtp.mailfrom=x@mx.test.example", False),
    (" (mx.test.example) upstream.example; spf=pass", False),
])
def test_claims_recognises_our_authserv_id(value, ours):
    assert claims(value, "mx.test.example") is ours
