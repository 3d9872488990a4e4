"""Robustness catalog cases where header parsing meets authorization, over the wire: B03
whitespace trimming, B07 multi-valued headers, F01 X-Forwarded-For / -Proto spoofing. A real
proxy with an inbound listener and AuthorizationPolicies in front of a raw upstream that records
the bytes it receives (no HTTP library to normalize them), both HTTP/1.1 codecs."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_http_proxy import raw
from tests.robustness.test_catalog_ab import status_of
from tests.support.proxy import ProxyProcess, free_port, running_proxy


class RecordingUpstream:
    """Answers every request 200 'ok' and closes; keeps each request head byte-exact."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            conn.settimeout(5)
            try:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                self.heads.append(buffer.partition(b"\r\n\r\n")[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            except OSError:
                return

    def header(self, name: bytes) -> list[bytes]:
        """The values of `name` in the last request head, as received."""
        lines = self.heads[-1].split(b"\r\n")[1:]
        return [v for k, _, v in (line.partition(b":") for line in lines) if k.lower() == name]

    def stop(self) -> None:
        self._srv.close()


POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-tenant]", values: [admin]}]
  - when: [{key: "request.headers[x-role]", values: [admin]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/open/*"]}}]
  - from: [{source: {ipBlocks: [10.0.0.1/32]}}]
    to: [{operation: {paths: ["/ip/*"]}}]
  - from: [{source: {remoteIpBlocks: [10.0.0.1/32]}}]
    to: [{operation: {paths: ["/remote/*"]}}]
"""


class Inbound:
    def __init__(self, proxy: ProxyProcess, port: int, app: RecordingUpstream) -> None:
        self.proxy, self.port, self.app = proxy, port, app

    def send(self, path: bytes, *headers: bytes) -> int | None:
        head = (
            b"GET " + path + b" HTTP/1.1\r\nHost: app\r\n" + b"".join(h + b"\r\n" for h in headers)
        )
        return status_of(raw(self.port, head + b"Connection: close\r\n\r\n", wait=3))


@contextlib.contextmanager
def inbound_listener(directory: Path, policies: str, codec: str) -> Iterator[Inbound]:
    """A proxy with one inbound HTTP listener and `policies`, before a RecordingUpstream."""
    app = RecordingUpstream()
    port = free_port()
    sidecar = f"""---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress: [{{port: {{number: {port}, protocol: HTTP, name: http}}, bind: 127.0.0.1,
             captureMode: NONE, defaultEndpoint: "127.0.0.1:{app.port}"}}]
"""
    try:
        with running_proxy(directory, free_port(), policies + sidecar, http1Codec=codec) as proxy:
            yield Inbound(proxy, port, app)
    finally:
        app.stop()


@pytest.fixture(scope="module", params=["httptools", "h11"])
def inbound(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Inbound]:
    with inbound_listener(tmp_path_factory.mktemp("authz"), POLICIES, request.param) as listener:
        yield listener


def test_B03_only_space_and_tab_are_trimmed(inbound: Inbound) -> None:
    """Trailing SP/HTAB go (so `admin ` is denied as `admin`); other bytes that look like
    space are part of the value: never trimmed into `admin`, forwarded byte-exact."""
    assert inbound.send(b"/open/a", b"X-Tenant: admin ") == 403
    assert inbound.send(b"/open/a", b"X-Tenant:\t admin\t") == 403
    before = len(inbound.app.heads)
    assert inbound.send(b"/open/a", b"Host-Note: x", b"X-Tenant: \x85admin\xa0") == 200
    assert len(inbound.app.heads) == before + 1
    assert inbound.app.header(b"x-tenant") == [b" \x85admin\xa0"]  # after the colon's SP
    # A vertical tab is a control byte: refused outright (B01), or kept; never trimmed away.
    status = inbound.send(b"/open/a", b"X-Role: \x0badmin")
    assert status in (400, 200), status
    if status == 200:
        assert inbound.app.header(b"x-role") == [b" \x0badmin"]


def test_B03_host_with_trailing_space_is_trimmed(inbound: Inbound) -> None:
    reply = raw(
        inbound.port, b"GET /open/h HTTP/1.1\r\nHost: app \r\nConnection: close\r\n\r\n", wait=3
    )
    assert status_of(reply) == 200, reply[:200]
    assert inbound.app.header(b"host") == [b" app"]


@pytest.mark.parametrize(
    "headers",
    [
        (b"X-Role: user", b"X-Role: admin"),
        (b"X-Role: admin", b"X-Role: user"),
        (b"X-Role: user,admin",),
        (b"X-Role: user, admin",),
    ],
    ids=["two-lines", "two-lines-first", "joined", "joined-space"],
)
def test_B07_every_value_of_a_repeated_header_is_matched(
    inbound: Inbound, headers: tuple[bytes, ...]
) -> None:
    before = len(inbound.app.heads)
    assert inbound.send(b"/open/b", *headers) == 403
    assert len(inbound.app.heads) == before  # nothing reached the app
    assert inbound.send(b"/open/b", b"X-Role: user", b"X-Role: administrator") == 200


def test_F01_forwarded_for_never_decides_authorization(inbound: Inbound) -> None:
    """The allowed source is 10.0.0.1; the client (127.0.0.1) claims it in X-Forwarded-For."""
    for xff in (b"10.0.0.1", b"192.0.2.7, 10.0.0.1", b"10.0.0.1, 10.0.0.1"):
        for path in (b"/ip/a", b"/remote/a"):
            assert inbound.send(path, b"X-Forwarded-For: " + xff) == 403, (path, xff)
    assert inbound.send(b"/ip/a") == 403


def test_F01_forwarded_headers_from_outside_the_mesh(inbound: Inbound) -> None:
    """A plaintext client's X-Forwarded-Proto: https is replaced by the connection's scheme;
    the real peer is appended to its X-Forwarded-For."""
    assert (
        inbound.send(b"/open/f", b"X-Forwarded-Proto: https", b"X-Forwarded-For: 10.0.0.1") == 200
    )
    assert inbound.app.header(b"x-forwarded-proto") == [b" http"]
    assert inbound.app.header(b"x-forwarded-for") == [b" 10.0.0.1,127.0.0.1"]
