"""A host's link to a portal on plain HTTP makes no CA bundle (its first request was 30-60 ms slower for
it) and can never be talked into trusting a TLS server; one on HTTPS verifies as configured."""

from __future__ import annotations

import ssl

from compute.host.link import tls_for


def test_it_gives_a_plain_http_portal_a_tls_context_that_trusts_nothing() -> None:
    context = tls_for("http://portal.example:8000", True)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0


def test_it_leaves_an_https_portal_and_an_explicit_setting_as_they_are() -> None:
    assert tls_for("https://portal.example", True) is True
    assert tls_for("https://portal.example", "/etc/bulkhead/ca.pem") == "/etc/bulkhead/ca.pem"
    assert tls_for("http://portal.example", False) is False
