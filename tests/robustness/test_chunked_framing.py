"""Chunked request bodies through the real proxy: extensions capped (CVE-2024-22019's class),
trailers never promoted to headers (catalog B08)."""

from __future__ import annotations

import hashlib
import json

from tests.integration.conftest import MeshFactory
from tests.integration.test_http_proxy import raw

HEAD = b"POST /upload HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_a_256_kib_chunk_extension_gets_400_and_nothing_reaches_the_app(
    make_mesh: MeshFactory, codec: str
) -> None:
    mesh = make_mesh(codec)
    body = b"5;" + b"x" * (256 * 1024) + b"\r\nhello\r\n0\r\n\r\n"
    out = raw(mesh.http_port, HEAD + body, wait=5)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"chunk extensions over 16384 bytes" in out
    assert not mesh.v1.state.requests and not mesh.v2.state.requests


def test_modest_chunk_extensions_pass(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    body = b"5;name=value\r\nhello\r\n6;" + b"e" * 4096 + b"\r\n world\r\n0\r\n\r\n"
    out = raw(
        mesh.http_port,
        HEAD + body + b"GET /next HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n",
        wait=5,
    )
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    upload = json.loads(out.partition(b"\r\n\r\n")[2].partition(b"HTTP/1.1")[0])
    assert upload == {"size": 11, "sha256": hashlib.sha256(b"hello world").hexdigest()}
    assert [r.path for r in mesh.v1.state.requests] == ["/upload", "/next"]


def test_B08_trailers_never_become_request_headers(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    body = b"5\r\nhello\r\n0\r\nHost: evil.test\r\nX-Trailer: 1\r\n\r\n"
    head = HEAD.replace(b"/upload", b"/echo").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    out = raw(mesh.http_port, head + body, wait=5)
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    echoed = json.loads(out.partition(b"\r\n\r\n")[2])
    assert echoed["headers"]["host"] == "hello.test"
    assert "x-trailer" not in echoed["headers"]
