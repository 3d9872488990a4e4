"""ClientHello peeking: SNI and ALPN from the bytes a real TLS client sends."""

from __future__ import annotations

import ssl

import pytest

from meshproxy.proxy.client_hello import NotClientHello, parse


def hello(alpn: list[str], sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = sni is not None
    if alpn:
        ctx.set_alpn_protocols(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_mesh_and_app_tls_told_apart_by_alpn() -> None:
    mesh = parse(hello(["istio-h2", "h2"], "outbound_.80_._.svc"))
    assert mesh is not None and mesh.from_mesh
    assert mesh.sni == "outbound_.80_._.svc" and mesh.alpn == ("istio-h2", "h2")
    app = parse(hello(["h2", "http/1.1"], "app.example"))
    assert app is not None and not app.from_mesh and app.alpn == ("h2", "http/1.1")
    bare = parse(hello([], None))
    assert bare is not None and bare.sni == "" and bare.alpn == ()


def test_partial_hello_waits_and_garbage_is_refused() -> None:
    data = hello(["istio"], "x")
    for cut in (1, 4, 5, 40, len(data) - 1):
        assert parse(data[:cut]) is None
    with pytest.raises(NotClientHello):
        parse(b"GET / HTTP/1.1\r\n")
    with pytest.raises(NotClientHello):
        parse(b"\x16\x03\x01\xff\xff")  # longer than one TLS record may be
    with pytest.raises(NotClientHello):
        parse(b"\x16\x03\x01\x00\x04\x01\x00\x00\x09")  # a length running past the record
