"""Robustness catalog A13, untrusted upstream response framing: a scripted upstream answers
each case's bytes off the wire (no HTTP library in between), both HTTP/1.1 codecs. Expected:
502 with flag UPE, no byte of the bad answer (nor of a response smuggled behind it) reaches
the client, the upstream connection is discarded, never pooled, and the client's next
request on the same connection gets its own correct response from a fresh connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.metrics import scrape, value
from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    running_proxy,
    service_entry,
)

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON"
CASES: dict[str, bytes] = {
    # (a) both framing headers: which body is it?
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 11\r\n\r\nhello" + SMUGGLED,
    # (c) a 101 to a request that asked for no upgrade
    "upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n" + SMUGGLED,
    # (d) a bare CR inside a header value
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
    "bad-status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "no-status": b"HTTP/1.1\r\nContent-Length: 2\r\n\r\nok",
    # headers that never end, far past the header limit
    "endless-headers": b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 1000 + b"\r\n" * 1,
    # (e) a flood of interim responses before the final one
    "1xx-flood": b"HTTP/1.1 100 Continue\r\n\r\n" * 10_000 + b"HTTP/1.1 200 OK\r\n"
    b"Content-Length: 2\r\n\r\nok",
}
ENDLESS_LINES = 400  # "endless-headers": this many more 1 KB lines (400 KB of head)


@dataclass
class ScriptedUpstream:
    """Answers a request for /case/NAME with that case's bytes, any other correctly with
    'second'; records the request lines each connection carried."""

    port: int = 0
    connections: list[list[str]] = field(default_factory=list)  # request lines per connection

    def start(self) -> ScriptedUpstream:
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        requests: list[str] = []
        self.connections.append(requests)
        buffer = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buffer += chunk
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    line = head.split(b"\r\n")[0].decode()
                    requests.append(line)
                    case = line.split(" ")[1].removeprefix("/case/")
                    if case in CASES:
                        conn.sendall(CASES[case])
                        if case == "endless-headers":
                            for _ in range(ENDLESS_LINES):
                                conn.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
                    else:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            except OSError:
                return


@dataclass
class Setup:
    proxy: ProxyProcess
    port: int
    upstream: ScriptedUpstream


@pytest.fixture(scope="module", params=["httptools", "h11"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    upstream = ScriptedUpstream().start()
    port, admin = free_port(), free_port()
    resources = service_entry("hostile.test", port, [upstream.port]) + egress_sidecar(port)
    directory: Path = tmp_path_factory.mktemp("a13")
    try:
        # No retries: each case is one attempt, so one upstream connection.
        vs = (
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            "metadata: {name: hostile}\nspec:\n  hosts: [hostile.test]\n  http:\n"
            "  - route: [{destination: {host: hostile.test}}]\n    retries: {attempts: 0}\n"
        )
        with running_proxy(directory, admin, resources + vs, http1Codec=request.param) as proxy:
            yield Setup(proxy, port, upstream)
    finally:
        upstream.stop()


def exchange(port: int, first: bytes, second: bytes) -> tuple[bytes, bytes]:
    """Two requests on one client connection; what came back for each."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(first)
        one = _response(s, bodiless=first.startswith(b"HEAD "))
        s.sendall(second)
        two = _response(s)
    return one, two


def _response(s: socket.socket, bodiless: bool = False) -> bytes:
    """One response with a Content-Length body (all the proxy sends here), read exactly;
    `bodiless`: the answer to a HEAD (its Content-Length announces no body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, text = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(text)
    if bodiless and not head.startswith(b"HTTP/1.1 502 "):  # the proxy's own 502 has one
        length = 0
    deadline = time.monotonic() + 10
    while len(body) < length and time.monotonic() < deadline:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def assert_discarded(setup: Setup, case: str) -> None:
    """The connection that carried the case carried nothing after it (never pooled)."""
    (carrier,) = [c for c in setup.upstream.connections if any(f"/case/{case} " in r for r in c)]
    assert carrier[-1].split(" ")[1] == f"/case/{case}", carrier


@pytest.mark.parametrize("case", list(CASES))
def test_A13_hostile_upstream_framing(setup: Setup, case: str) -> None:
    flagged = value(
        scrape(setup.proxy.admin), "istio_requests_total", response_code="502", response_flags="UPE"
    )
    host = b"Host: hostile.test\r\n"
    one, two = exchange(
        setup.port,
        b"GET /case/" + case.encode() + b" HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /next HTTP/1.1\r\n" + host + b"\r\n",
    )
    assert one.startswith(b"HTTP/1.1 502 "), one[:300]
    for leaked in (b"POISON", b"hello", b"X-Pad", b"Continue", b"Upgrade"):
        assert leaked not in one + two, (leaked, one, two)
    assert two.startswith(b"HTTP/1.1 200 ") and two.endswith(b"\r\n\r\nsecond"), two[:300]
    assert_discarded(setup, case)
    after = value(
        scrape(setup.proxy.admin), "istio_requests_total", response_code="502", response_flags="UPE"
    )
    assert (after or 0) == (flagged or 0) + 1


def test_A13_a_body_on_a_head_response_is_not_the_next_response(setup: Setup) -> None:
    """(b) A 5-byte body after a HEAD's headers (with a smuggled response behind it): the
    client gets the HEAD's 200 (the llhttp codec) or a 502 (h11 refuses the extra bytes), and
    its next request its own answer, never those bytes."""
    CASES["head-body"] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" + SMUGGLED
    host = b"Host: hostile.test\r\n"
    one, two = exchange(
        setup.port,
        b"HEAD /case/head-body HTTP/1.1\r\n" + host + b"\r\n",
        b"GET /next HTTP/1.1\r\n" + host + b"\r\n",
    )
    assert one.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 502 ")), one
    assert one.endswith(b"\r\n\r\n") or one.startswith(b"HTTP/1.1 502 "), one
    assert two.startswith(b"HTTP/1.1 200 ") and two.endswith(b"\r\n\r\nsecond"), two
    assert b"POISON" not in one + two and b"hello" not in one + two
    assert_discarded(setup, "head-body")


def test_A13_a_broken_body_after_a_good_head_is_cut_not_completed(setup: Setup) -> None:
    """The head was fine, the chunked body is not: the response has started (Envoy has sent
    the head on), so the client's connection is closed without a complete response, never
    given the bytes as a body; the upstream connection goes too; the flag is UPE."""
    CASES["bad-chunk"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n"
    )
    flagged = value(
        scrape(setup.proxy.admin), "istio_requests_total", response_code="200", response_flags="UPE"
    )
    with socket.create_connection(("127.0.0.1", setup.port), timeout=10) as s:
        s.sendall(b"GET /case/bad-chunk HTTP/1.1\r\nHost: hostile.test\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert b"hello" not in got and (got == b"" or got.startswith(b"HTTP/1.1 502 ")), got
    assert_discarded(setup, "bad-chunk")
    # Counted with the status the upstream gave, as Envoy does once a response has begun.
    after = value(
        scrape(setup.proxy.admin), "istio_requests_total", response_code="200", response_flags="UPE"
    )
    assert (after or 0) == (flagged or 0) + 1
