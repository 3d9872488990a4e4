"""Read SNI and ALPN from a TLS ClientHello without terminating it (Envoy's tls_inspector).

PERMISSIVE ports see two kinds of TLS: mesh mTLS, which the sidecar terminates, and the
application's own TLS, which must reach the app untouched. Istio tells them apart by ALPN (a
mesh client offers istio, istio-peer-exchange, istio-http/1.0, istio-http/1.1 or istio-h2), so
the first record is parsed just far enough to read the offered protocols.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_CLIENT_HELLO = 16 * 1024 + 5  # one TLS record: a longer hello is refused as TLS
ISTIO_ALPN = frozenset(
    {"istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"}
)
_EXT_SNI = 0
_EXT_ALPN = 16


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str
    alpn: tuple[str, ...]

    @property
    def from_mesh(self) -> bool:
        return any(p in ISTIO_ALPN for p in self.alpn)


class NotClientHello(ValueError):
    """The bytes are not a TLS ClientHello this parser can read."""


def parse(data: bytes) -> ClientHello | None:
    """The ClientHello in the first record of `data`; None while more bytes are needed."""
    if len(data) < 5:
        return None
    if data[0] != 0x16 or data[1] != 3:
        raise NotClientHello("not a TLS handshake record")
    end = 5 + int.from_bytes(data[3:5], "big")
    if end > MAX_CLIENT_HELLO:
        raise NotClientHello("record longer than TLS allows")
    if len(data) < end:
        return None
    r = _Reader(data[5:end])
    if r.u8() != 1:
        raise NotClientHello("first handshake message is not a ClientHello")
    body = _Reader(r.take(r.u24()))
    body.take(2 + 32)  # legacy_version, random
    body.take(body.u8())  # session id
    body.take(body.u16())  # cipher suites
    body.take(body.u8())  # compression methods
    sni = ""
    alpn: tuple[str, ...] = ()
    if body.remaining():
        exts = _Reader(body.take(body.u16()))
        while exts.remaining():
            kind, ext = exts.u16(), _Reader(exts.take(exts.u16()))
            if kind == _EXT_SNI:
                names = _Reader(ext.take(ext.u16()))
                while names.remaining():
                    name_type, name = names.u8(), names.take(names.u16())
                    if name_type == 0:
                        sni = name.decode("ascii", "replace")
            elif kind == _EXT_ALPN:
                protos = _Reader(ext.take(ext.u16()))
                found = []
                while protos.remaining():
                    found.append(protos.take(protos.u8()).decode("ascii", "replace"))
                alpn = tuple(found)
    return ClientHello(sni, alpn)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining():
            raise NotClientHello("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")
