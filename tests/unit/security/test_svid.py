"""X.509-SVID shape checks (SPIFFE X509-SVID §2, §4; catalog G04/G05)."""

from __future__ import annotations

import datetime as dt

import pytest

from meshproxy.config.resources import ClientTls
from meshproxy.security.ca import make_root
from meshproxy.security.svid import svid_violation
from meshproxy.upstream.tls import UpstreamTls
from tests.support.certs import der, leaf

ROOT = make_root("cluster.local", dt.timedelta(days=1))
ID = "spiffe://cluster.local/ns/default/sa/client"


def test_a_mesh_svid_is_valid() -> None:
    assert svid_violation(der(leaf(ROOT, [ID], dns=["client.default.svc"])[0])) is None


@pytest.mark.parametrize(
    ("shape", "reason"),
    [
        ({"uris": [ID, "spiffe://cluster.local/ns/evil/sa/x"]}, "exactly one URI SAN"),
        ({"uris": [ID, "https://example.com"]}, "exactly one URI SAN"),
        ({"uris": [], "dns": ["spiffe.cluster.local"]}, "exactly one URI SAN, this one has 0"),
        ({"uris": ["spiffe://cluster.local"]}, "names a trust domain, not a workload"),
        ({"uris": ["spiffe://Cluster.Local/ns/default/sa/client"]}, "invalid trust domain"),
        ({"uris": [ID + "?x=1"]}, "invalid path"),
        ({"uris": ["http://cluster.local/ns/default/sa/client"]}, "not a SPIFFE ID"),
        ({"uris": [ID], "ca": True}, "must not be a CA"),
        ({"uris": [ID], "key_cert_sign": True}, "must not sign certificates"),
        ({"uris": [ID], "digital_signature": False}, "must allow digitalSignature"),
    ],
)
def test_malformed_svids_say_why(shape: dict[str, object], reason: str) -> None:
    problem = svid_violation(der(leaf(ROOT, **shape)[0]))  # type: ignore[arg-type]
    assert problem is not None and reason in problem, problem


def test_garbage_is_no_certificate() -> None:
    assert "unreadable certificate" in (svid_violation(b"\x30\x03junk") or "")
    assert svid_violation(b"") is not None


def test_origination_refuses_a_server_whose_svid_is_malformed() -> None:
    """ISTIO_MUTUAL: the server's leaf is checked like a client's (catalog G07)."""
    tls = UpstreamTls(None, "", ClientTls(mode="ISTIO_MUTUAL"), "cluster.local")  # type: ignore[arg-type]
    server = "spiffe://cluster.local/ns/default/sa/server"
    good = leaf(ROOT, [server])[0]
    peercert = {"subjectAltName": (("URI", server),)}
    assert tls.check_peer(peercert, der(good)) is None
    bad = leaf(ROOT, [server], ca=True)[0]
    assert "no valid SVID: a leaf SVID must not be a CA" in (
        tls.check_peer(peercert, der(bad)) or ""
    )
