"""Server TLS contexts are made once per certificate content: the start-up check,
the preflight and each listener share one, and so do test MTAs with copies of one
test certificate; a renewed certificate (new content) gets a new context."""

from __future__ import annotations

import ssl

import trustme

from trimail.net.tls import loaded_chain


def test_one_context_per_content_and_a_new_one_for_new_content(tmp_path):
    ca = trustme.CA()
    first, copy, renewed = tmp_path / "first.pem", tmp_path / "copy.pem", tmp_path / "renewed.pem"
    ca.issue_cert("mx.example").private_key_and_cert_chain_pem.write_to_path(str(first))
    copy.write_bytes(first.read_bytes())
    ca.issue_cert("mx.example").private_key_and_cert_chain_pem.write_to_path(str(renewed))
    context = loaded_chain(str(first))
    assert isinstance(context, ssl.SSLContext) and context.minimum_version == ssl.TLSVersion.TLSv1_2
    # a client's renegotiations would each cost a handshake (OpenSSL 3 refuses them by
    # default; 1.1.1 did not): refused whatever the library
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert loaded_chain(str(copy)) is context
    assert loaded_chain(str(renewed)) is not context
    first.write_bytes(renewed.read_bytes())  # renewed in place
    assert loaded_chain(str(first)) is loaded_chain(str(renewed))


def test_a_broken_file_still_fails_after_a_good_one_was_loaded(tmp_path):
    good, broken = tmp_path / "good.pem", tmp_path / "broken.pem"
    trustme.CA().issue_cert("mx.example").private_key_and_cert_chain_pem.write_to_path(str(good))
    loaded_chain(str(good))
    broken.write_bytes(good.read_bytes()[:200])
    try:
        loaded_chain(str(broken))
    except ssl.SSLError:
        pass
    else:
        raise AssertionError("a truncated certificate must not load")


def test_a_file_over_1_mib_is_refused_before_openssl_reads_it(tmp_path):
    """A certificate chain is a few kB; OpenSSL would read a multi-GB file whole, in
    the event loop at a reload."""
    good = tmp_path / "good.pem"
    trustme.CA().issue_cert("mx.example").private_key_and_cert_chain_pem.write_to_path(str(good))
    huge = tmp_path / "huge.pem"
    huge.write_bytes(good.read_bytes() + b"\n" * (1 << 20))
    try:
        loaded_chain(str(huge))
    except OSError as exc:
        assert "larger than 1 MiB" in str(exc)
    else:
        raise AssertionError("a 1 MiB certificate file must be refused")
