"""Limits and request-line rules both HTTP/1 codecs enforce identically."""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy.codec.events import RequestHead
from meshproxy.errors import ProtocolError, ProtocolSide


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 60 * 1024  # Envoy max_request_headers_kb default (431 beyond)
    max_headers: int = 100  # Envoy max_headers_count default
    max_response_headers: int = 200


def check_request_head(head: RequestHead, host: bytes) -> None:
    """Request-line and Host rules a sidecar enforces (Envoy's defaults; 400 otherwise)."""
    side = ProtocolSide.DOWNSTREAM
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
    if not host or b" " in host or b"@" in host or b"/" in host:
        raise ProtocolError("invalid Host header", side)
