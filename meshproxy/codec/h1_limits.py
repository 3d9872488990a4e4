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
    target = head.target
    if target[:1] != b"/":
        if method == b"CONNECT":
            raise ProtocolError("CONNECT is not supported", side, 403)
        if not (target == b"*" and method == b"OPTIONS"):
            raise ProtocolError("request target must be origin-form (/path)", side)
    if not host or _SPACE in host or _AT in host or _SLASH in host:
        raise ProtocolError("invalid Host header", side)
