"""Robustness catalog, groups A (HTTP/1.1 framing and smuggling) and B (header and request-line
validation): each test is named by its catalog id and drives the real proxy, both HTTP/1.1
codecs, over real sockets, with real upstreams recording what reached them.

Vocabulary from the catalog: REJ400 = answered 400 (or the status named) and the connection
closed; NOFWD = the upstream saw no request at all; EXACT(n) = it saw exactly n; `/blockedz` is
the canary a smuggled request would carry, and must never reach an upstream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Mesh, MeshFactory
from tests.integration.test_http_proxy import raw

H = b"Host: hello.test\r\n"


def status_of(reply: bytes) -> int | None:
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def seen(mesh: Mesh) -> list[str]:
    return [r.path for r in mesh.v1.state.requests + mesh.v2.state.requests]


def completed(mesh: Mesh) -> list[str]:
    return mesh.v1.state.completed + mesh.v2.state.completed


def assert_rejected(mesh: Mesh, payload: bytes, statuses: tuple[int, ...] = (400,)) -> bytes:
    reply = raw(mesh.http_port, payload, wait=3)
    assert status_of(reply) in statuses, reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # one answer, then the connection closed
    assert seen(mesh) == [], seen(mesh)  # NOFWD
    return reply


@pytest.fixture(scope="module", params=["httptools", "h11"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """One proxy per codec for the whole module (a proxy per case would cost minutes)."""
    factory = MeshFactory(tmp_path_factory.mktemp("catalog"), echo_port=1)
    try:
        yield factory(str(request.param))
    finally:
        factory.close()


@pytest.fixture
def mesh(shared: Mesh) -> Mesh:
    for upstream in (shared.v1, shared.v2):
        upstream.state.requests.clear()
        upstream.state.completed.clear()
    return shared


def test_A01_cl_te_both_framing_headers(mesh: Mesh) -> None:
    assert_rejected(
        mesh,
        b"POST /content/a HTTP/1.1\r\n" + H + b"Content-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
    )


def test_A02_te_cl(mesh: Mesh) -> None:
    assert_rejected(
        mesh,
        b"POST /content/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    )


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 5\r\nContent-Length: 10\r\n\r\nhelloworld",
        b"Content-Length: 0\r\nContent-Length: 1\r\n\r\nZ",
        b"Content-Length: 5, 5\r\n\r\nhello",
        b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["5-then-10", "0-then-1", "list", "two-equal"],
)
def test_A03_duplicate_content_length(mesh: Mesh, fields: bytes) -> None:
    assert_rejected(mesh, b"POST /content/a HTTP/1.1\r\n" + H + fields)


@pytest.mark.parametrize(
    "value",
    [b"+5", b"-1", b"-0", b"1_0", b"0x5", b"5 5", b"", "\u0665".encode(), b"010"],
    ids=["plus", "minus", "minus-zero", "underscore", "hex", "space", "empty", "arabic", "octal"],
)
def test_A04_content_length_grammar(mesh: Mesh, value: bytes) -> None:
    payload = b"POST /content/a HTTP/1.1\r\n" + H + b"Content-Length: " + value + b"\r\n\r\n"
    if value == b"010":
        # Leading zeros are decimal digits: 10, as RFC 9110 reads it (never octal 8).
        close = payload.replace(H, H + b"Connection: close\r\n")
        reply = raw(mesh.http_port, close + b"0123456789", wait=3)
        assert status_of(reply) == 200, reply[:200]
        assert mesh.v1.state.requests[-1:] or mesh.v2.state.requests[-1:]
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert body["headers"]["content-length"] == "10"
        return
    assert_rejected(mesh, payload + b"hello")


@pytest.mark.parametrize(
    "field",
    [
        b"Transfer-Encoding: xchunked",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding: chunked, chunked",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding : chunked",
        b"Transfer_Encoding: chunked",
        b"Transfer-Encoding: \xa0chunked\xa0",
        b"Transfer-\r\nEncoding: chunked",
    ],
    ids=[
        "x",
        "identity",
        "list",
        "twice-listed",
        "two-lines",
        "space-colon",
        "underscore",
        "nbsp",
        "split-name",
    ],
)
def test_A05_transfer_encoding_obfuscation(mesh: Mesh, field: bytes) -> None:
    payload = b"POST /content/a HTTP/1.1\r\n" + H + field + b"\r\nContent-Length: 5\r\n\r\nhello"
    if field == b"Transfer_Encoding: chunked":
        # Not a Transfer-Encoding at all: an underscore header, dropped (B02); CL frames it.
        reply = raw(mesh.http_port, payload.replace(H, H + b"Connection: close\r\n"), wait=3)
        assert status_of(reply) == 200 and completed(mesh) == ["/content/a"], reply[:200]
        return
    assert_rejected(mesh, payload, (400, 501))


CHUNKED = b"POST /content/a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"0_2e\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"-1\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"\r\n\r\n",
        b"Z\r\nZZ\r\n",
    ],
    ids=["underscore", "hex-prefix", "plus", "negative", "space", "empty", "non-hex"],
)
def test_A06_invalid_chunk_size(mesh: Mesh, body: bytes) -> None:
    reply = raw(mesh.http_port, CHUNKED + body, wait=3)
    assert status_of(reply) == 400, reply[:200]
    assert completed(mesh) == []  # the upstream never saw the end of this message


@pytest.mark.parametrize(
    "body",
    [b"FFFFFFFFFFFFFFFFFFFF\r\n" + b"x" * 10, b"1" + b"0" * 40 + b"\r\nx"],
    ids=["20-hex-digits", "1e40"],
)
def test_A07_chunk_size_overflow(mesh: Mesh, body: bytes) -> None:
    reply = raw(mesh.http_port, CHUNKED + body, wait=3)
    assert status_of(reply) in (400, 413), reply[:200]
    assert completed(mesh) == []


@pytest.mark.parametrize(
    "body",
    [
        b"5\nhello\r\n0\r\n\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
    ],
    ids=["lf-size", "lf-in-extension", "cr-cr", "garbage-after-data"],
)
def test_A08_chunk_line_terminators(mesh: Mesh, body: bytes) -> None:
    reply = raw(mesh.http_port, CHUNKED + body, wait=3)
    assert status_of(reply) == 400, reply[:200]
    assert completed(mesh) == []


@pytest.mark.parametrize(
    "payload",
    [
        b"GET /content/a HTTP/1.1\nHost: hello.test\n\n",
        b"GET /content/a HTTP/1.1\r\n" + H + b"Visible: x\rSmuggled: y\r\n\r\n",
        b"GET /content/a HTTP/1.1\r\nHost: a\r\n\rZGET /blockedz HTTP/1.1\r\n" + H + b"\r\n",
        b"GET /content/a HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
        b"GET /content/a HTTP/1.1\r\n\tContent-Length: 1\r\n" + H + b"\r\nX",
        b"POST /content/a HTTP/1.1\r\n" + H + b"Content-Length : 34\r\n\r\n"
        b"GET /blockedz HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=["bare-lf", "bare-cr", "cr-then-request", "obs-fold", "fold-first", "space-colon"],
)
def test_A09_header_line_syntax(mesh: Mesh, payload: bytes) -> None:
    assert_rejected(mesh, payload)


def test_A10_pipelining_after_an_error_or_close(mesh: Mesh) -> None:
    reply = raw(
        mesh.http_port,
        b"GET /content/a HTTP/1.1\r\n" + H + b"\r\nINVALID\r\n\r\n"
        b"GET /blockedz HTTP/1.1\r\n" + H + b"\r\n",
        wait=3,
    )
    assert [status_of(b"HTTP/1.1 " + r) for r in reply.split(b"HTTP/1.1 ")[1:]] == [200, 400]
    reply = raw(
        mesh.http_port,
        b"GET /content/b HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
        b"GET /blockedz HTTP/1.1\r\n" + H + b"\r\n",
        wait=3,
    )
    assert reply.count(b"HTTP/1.1 ") == 1 and status_of(reply) == 200
    assert seen(mesh) == ["/content/a", "/content/b"]  # EXACT(2), never /blockedz


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_A11_body_on_get_or_head(mesh: Mesh, method: bytes) -> None:
    smuggled = b"GET /blockedz HTTP/1.1\r\nHost: a\r\n\r\n"
    payload = (
        method
        + b" /content/a HTTP/1.1\r\n"
        + H
        + b"Connection: close\r\nContent-Length: 34\r\n\r\n"
        + smuggled
    )
    reply = raw(mesh.http_port, payload, wait=3)
    assert status_of(reply) == 200, reply[:200]
    # Forwarded with its body, on the same upstream request: never parsed as a request line.
    assert seen(mesh) == ["/content/a"]
    if method == b"GET":
        echoed = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert echoed["headers"]["content-length"] == "34"


def test_A12_upgrade_abuse(mesh: Mesh) -> None:
    h2c = (
        b"GET /content/a HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    )
    reply = raw(mesh.http_port, h2c, wait=3)
    assert not reply.startswith(b"HTTP/1.1 101"), reply[:200]  # no h2c tunnel
    for request in mesh.v1.state.requests + mesh.v2.state.requests:
        assert "upgrade" not in request.headers and "http2-settings" not in request.headers
    # A WebSocket upgrade the upstream declines (it answers 200, not 101): the bytes after it
    # are never read as a pipelined request.
    ws = (
        b"GET /content/ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"GET /blockedz HTTP/1.1\r\n" + H + b"\r\n"
    )
    reply = raw(mesh.http_port, ws, wait=3)
    assert reply.count(b"HTTP/1.1 ") == 1 and not reply.startswith(b"HTTP/1.1 101"), reply
    assert "/blockedz" not in seen(mesh)


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"v\x00\ralue", b"X-A"),
        (b"test\x00DROPPED", b"X-A"),
        (b"evil\x00", b"X-A"),
        (b"x", b"\xefoo"),
        (b"x", b"Header\x85"),
        (b"x", b"a b"),
        (b"ignored", b""),
        (b"x", b"x(y)"),
        (b"x", b"\x00x"),
    ],
    ids=[
        "nul-cr",
        "nul-mid",
        "nul-end",
        "name-utf8",
        "name-nel",
        "name-space",
        "name-empty",
        "name-parens",
        "name-nul",
    ],
)
def test_B01_illegal_bytes_in_fields(mesh: Mesh, value: bytes, name: bytes) -> None:
    assert_rejected(mesh, b"GET /content/a HTTP/1.1\r\n" + H + name + b": " + value + b"\r\n\r\n")


def test_B02_underscore_headers_are_dropped(mesh: Mesh) -> None:
    reply = raw(
        mesh.http_port,
        b"GET /content/a HTTP/1.1\r\n" + H + b"X_User: admin\r\nContent_Length: 99\r\n"
        b"Connection: close\r\n\r\n",
        wait=3,
    )
    assert status_of(reply) == 200, reply[:200]
    (request,) = mesh.v1.state.requests + mesh.v2.state.requests
    assert not [k for k in request.headers if "_" in k], request.headers


@pytest.mark.parametrize(
    ("payload", "statuses"),
    [
        (b"GET /" + b"a" * 70 * 1024 + b" HTTP/1.1\r\n" + H + b"\r\n", (414, 431)),
        (b"GET /content/a HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 61 * 1024 + b"\r\n\r\n", (431,)),
        (
            b"GET /content/a HTTP/1.1\r\n"
            + H
            + b"".join(b"X-%d: v\r\n" % i for i in range(101))
            + b"\r\n",
            (431,),
        ),
        (b"GET /content/a HTTP/1.1\r\n" + H + b"Cookie: " + b"c" * 64 * 1024 + b"\r\n\r\n", (431,)),
        (b"GET /content/a HTTP/1.1\r\n" + H + b"x:\r\n" * 10_000 + b"\r\n", (431,)),
    ],
    ids=["long-line", "61k-headers", "101-headers", "64k-cookie", "10k-empty"],
)
def test_B04_oversized_or_numerous_headers(
    mesh: Mesh, payload: bytes, statuses: tuple[int, ...]
) -> None:
    assert_rejected(mesh, payload, statuses)


@pytest.mark.parametrize(
    ("line", "statuses"),
    [
        (b"get /content/a HTTP/1.1", (400,)),
        (b'G=":<>(e),[T];?" /get HTTP/1.1', (400,)),
        (b"GET / HTTP/1.32", (400, 505)),
        (b"GET / HTTP/\r\r1.1", (400,)),
        (b"GET /", (400, 426)),
        (b"GET / HTTP/1.0", (426,)),
    ],
    ids=["lower-case", "garbage-method", "version-1.32", "cr-in-version", "http-0.9", "http-1.0"],
)
def test_B05_method_and_version(mesh: Mesh, line: bytes, statuses: tuple[int, ...]) -> None:
    assert_rejected(mesh, line + b"\r\n" + H + b"\r\n", statuses)


@pytest.mark.parametrize(
    ("head", "statuses"),
    [
        (b"GET admin HTTP/1.1\r\n" + H, (400,)),
        (b"GET http://admin.ns/blockedz HTTP/1.1\r\n" + H, (400,)),
        (b"CONNECT app:80 HTTP/1.1\r\n" + H, (400, 403)),
        (b"GET /content/a HTTP/1.1\r\n", (400,)),
        (b"GET /content/a HTTP/1.1\r\nHost: hello.test\r\nHost: other.test\r\n", (400,)),
        (b"GET /content/a HTTP/1.1\r\nHost: hello.test@evil\r\n", (400,)),
        (b"GET /content/a HTTP/1.1\r\nHost: hello.test b\r\n", (400,)),
        (b"GET /content/a HTTP/1.1\r\nHost: hello.test:99999\r\n", (400,)),
    ],
    ids=[
        "no-slash",
        "absolute-form",
        "connect",
        "no-host",
        "two-hosts",
        "userinfo",
        "space",
        "port-99999",
    ],
)
def test_B06_request_target_and_host(mesh: Mesh, head: bytes, statuses: tuple[int, ...]) -> None:
    assert_rejected(mesh, head + b"\r\n", statuses)
