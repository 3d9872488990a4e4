"""Catalog group E: path normalisation against authorization, over the wire. A real inbound
listener with a DENY on /admin (and /admin/*), on a URI template and on a host, in front of
an upstream that records each request head byte-exact: whatever form a path takes, what
authorization matches is what the application receives, and nothing denied reaches it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.test_http_proxy import raw
from tests.robustness.test_catalog_ab import status_of
from tests.robustness.test_catalog_authz import Inbound, inbound_listener
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin, /admin/*]}}]
  - to: [{operation: {paths: ["/api/{*}/admin"]}}]
  - to: [{operation: {hosts: [blocked.test]}}]
"""


@pytest.fixture(scope="module", params=["httptools", "h11"])
def inbound(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Inbound]:
    with inbound_listener(tmp_path_factory.mktemp("paths"), POLICY, request.param) as listener:
        yield listener


def refused(inbound: Inbound, target: bytes, statuses: tuple[int, ...] = (403,)) -> None:
    before = len(inbound.app.heads)
    status = inbound.send(target)
    assert status in statuses, (target, status)
    assert len(inbound.app.heads) == before, (target, inbound.app.heads[before:])


def app_path(inbound: Inbound, target: bytes, host: bytes = b"app") -> bytes:
    """The target the application received for `target` (which must be allowed)."""
    before = len(inbound.app.heads)
    reply = raw(
        inbound.port,
        b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
        wait=3,
    )
    assert status_of(reply) == 200, (target, reply[:200])
    assert len(inbound.app.heads) == before + 1
    return inbound.app.heads[-1].split(b" ")[1]


@pytest.mark.parametrize(
    "target",
    [b"/content/../admin", b"/content/./../admin", b"/content/%2e%2e/admin",
     b"/content/%2E%2e/admin", b"/../../admin"],
)  # fmt: skip
def test_E01_dot_segments_are_resolved_before_matching(inbound: Inbound, target: bytes) -> None:
    refused(inbound, target)


def test_E01_the_app_receives_the_path_authorization_matched(inbound: Inbound) -> None:
    assert app_path(inbound, b"/content/../public/./x") == b"/public/x"
    assert app_path(inbound, b"/content/%2e%2e/public") == b"/public"


@pytest.mark.parametrize("target", [b"//admin", b"///admin", b"/content//..//admin"])
def test_E02_repeated_slashes_are_merged(inbound: Inbound, target: bytes) -> None:
    refused(inbound, target)
    assert app_path(inbound, b"//public///x") == b"/public/x"


@pytest.mark.parametrize(
    "target", [b"/admin%2fsecret", b"/content%2F..%2Fadmin", b"/admin%5csecret"]
)
def test_E03_escaped_slashes_are_refused_and_counted(inbound: Inbound, target: bytes) -> None:
    def rejected() -> float:
        samples = scrape(inbound.proxy.admin)
        return value(samples, "meshproxy_downstream_rq_rejected_total", reason="path") or 0.0

    before = rejected()
    refused(inbound, target, (400,))
    assert rejected() == before + 1


def test_E03_a_backslash_is_a_separator_or_refused(inbound: Inbound) -> None:
    refused(inbound, b"/content\\..\\admin", (400, 403))


def test_E04_a_fragment_is_stripped_before_matching(inbound: Inbound) -> None:
    refused(inbound, b"/admin#x", (400, 403))
    assert app_path(inbound, b"/public#x") == b"/public"  # never forwarded with its fragment
    before = len(inbound.app.heads)
    client = H2Client(inbound.port, authority="app")
    try:
        sid = client.request("/admin#frag")
        client.wait(sid, timeout=5)
        assert client.responses[sid].status in (400, 403) or client.responses[sid].reset
    finally:
        client.close()
    assert len(inbound.app.heads) == before


@pytest.mark.parametrize(
    "target", [b"/admin?x=1", b"/admin;jsessionid=1", b"/admin;/x", b"/%61dmin"]
)
def test_E05_query_parameters_and_encodings(inbound: Inbound, target: bytes) -> None:
    refused(inbound, target)


def test_E05_percent_encoding_is_decoded_at_most_once(inbound: Inbound) -> None:
    assert app_path(inbound, b"/%2561dmin") == b"/%2561dmin"
    assert app_path(inbound, b"/public;jsessionid=1") == b"/public;jsessionid=1"  # as sent


def test_E06_path_case_is_significant_host_case_and_form_are_not(inbound: Inbound) -> None:
    """Paths are case-sensitive, as in Istio (a rule that means /ADMIN too lists it);
    hosts compare case-insensitively, without a port or the root's trailing dot."""
    assert app_path(inbound, b"/ADMIN") == b"/ADMIN"
    for host in (b"blocked.test", b"BLOCKED.TEST", b"blocked.test.", b"blocked.test:80"):
        before = len(inbound.app.heads)
        reply = raw(
            inbound.port,
            b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
            wait=3,
        )
        assert status_of(reply) == 403, (host, reply[:100])
        assert len(inbound.app.heads) == before
    assert app_path(inbound, b"/x", host=b"blocked.test.example") == b"/x"


@pytest.mark.parametrize("target", [b"/api/*/admin", b"/api/%2A/admin", b"/api/7/admin"])
def test_E07_a_star_is_an_ordinary_path_character_to_a_template(
    inbound: Inbound, target: bytes
) -> None:
    refused(inbound, target)
    assert app_path(inbound, b"/api/7/admins") == b"/api/7/admins"
