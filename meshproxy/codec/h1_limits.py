"""Limits and request-line rules both HTTP/1 codecs enforce identically."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from meshproxy.codec.events import RequestHead
from meshproxy.errors import ProtocolError, ProtocolSide

_DOWN: Final = ProtocolSide.DOWNSTREAM  # a compiled constant (read per request)
# Bytes as ints: `_SPACE in host` is a memchr, `b" " in host` a buffer export (~10x more).
_SPACE: Final = ord(" ")
_AT: Final = ord("@")
_SLASH: Final = ord("/")


# The methods llhttp (the default codec) parses, less CONNECT and the RTSP ones.
KNOWN_METHODS: Final = frozenset(
    b"GET HEAD POST PUT DELETE OPTIONS TRACE PATCH COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE NOTIFY SUBSCRIBE "
    b"UNSUBSCRIBE PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split()
)


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy max_request_headers_kb default (431 beyond)
    max_headers: int = 100  # Envoy max_headers_count default
    max_response_headers: int = 200


def check_request_head(head: RequestHead, host: bytes) -> None:
    """Request-line and Host rules a sidecar enforces (Envoy's defaults; 400 otherwise)."""
    side = _DOWN
    if head.http_version != b"1.1":
        # Envoy rejects HTTP/1.0 unless accept_http_10 is set; it answers 426.
        raise ProtocolError(f"HTTP/{head.http_version.decode()} is not supported", side, 426)
    method = head.method
    if not method.isupper() or not method.isalpha():
        # Methods are case-sensitive; `get` must not slip past a rule on GET (Istio rejects it).
        raise ProtocolError("invalid method", side)
    if method == b"CONNECT":
        raise ProtocolError("CONNECT is not supported", side, 403)
    if method not in KNOWN_METHODS:
        # llhttp knows these and refuses the rest: h11 must refuse the same ones.
        raise ProtocolError("unknown method", side)
    target = head.target
    if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
        raise ProtocolError("request target must be origin-form (/path)", side)
    if not valid_authority(host):
        raise ProtocolError("invalid Host header", side)


_COLON: Final = ord(":")
_OPEN_BRACKET: Final = ord("[")


def valid_authority(host: bytes) -> bool:
    """Host (or :authority) as RFC 3986 has it: a host and an optional numeric port; no
    userinfo, path or whitespace, a bracketed IPv6 literal closed. Refusing the rest keeps
    routing and authorization from reading a host the upstream would read differently."""
    if not host or _SPACE in host or _AT in host or _SLASH in host:
        return False
    if host[0] == _OPEN_BRACKET:
        end = host.find(b"]")
        if end < 2:
            return False
        rest = host[end + 1 :]
        return not rest or (rest[0] == _COLON and _valid_port(rest[1:]))
    if _COLON in host:
        name, _, port = host.rpartition(b":")
        return bool(name) and _COLON not in name and _valid_port(port)
    return True


def _valid_port(port: bytes) -> bool:
    return 0 < len(port) <= 5 and port.isdigit() and int(port) <= 65535


# Chunk extensions (`5;name=value\r\n`) carry nothing a proxy uses, and neither parser reports
# them, so an endless one would be read forever: cap them per message, as Node does since
# CVE-2024-22019 (16 KiB). Measured as what a read consumed beyond its data, its heads, its
# trailers and a bare size line per chunk (hex digits and CRLFs: at most 24 bytes).
MAX_CHUNK_EXTENSION_BYTES: Final = 16 * 1024
_CHUNK_FRAMING: Final = 24


class ChunkExtensionBudget:
    """The chunk-extension bytes one chunked message has spent so far."""

    __slots__ = ("_side", "_status", "spent")

    def __init__(self, side: ProtocolSide, status: int) -> None:
        self._side = side
        self._status = status
        self.spent = 0

    def charge(self, consumed: int, explained: int, chunks: int) -> None:
        """`consumed` bytes were read, of which `explained` were data, heads and trailers."""
        extra = consumed - explained - _CHUNK_FRAMING * (chunks + 1)
        if extra > 0:
            self.spent += extra
            if self.spent > MAX_CHUNK_EXTENSION_BYTES:
                self._refuse()

    def check_pending(self, pending: int) -> None:
        """A parser holding `pending` bytes of a chunk line it cannot end yet."""
        if self.spent + pending - _CHUNK_FRAMING > MAX_CHUNK_EXTENSION_BYTES:
            self._refuse()

    def _refuse(self) -> None:
        raise ProtocolError(
            f"chunk extensions over {MAX_CHUNK_EXTENSION_BYTES} bytes", self._side, self._status
        )


def fields_size(headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of header (or trailer) lines as `name: value\\r\\n`."""
    return sum(len(k) + len(v) + 4 for k, v in headers)


def request_head_size(head: RequestHead) -> int:
    """Bytes of a request head as sent without optional whitespace."""
    return len(head.method) + len(head.target) + 13 + fields_size(head.headers)
