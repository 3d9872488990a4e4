"""gRPC over HTTP/2 as a proxy sees it: detection, grpc-timeout, statuses, trailers-only replies."""

from __future__ import annotations

import re

from meshproxy.codec.events import Headers, RequestHead

GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

# Retry conditions by name, as Envoy's retry_on / Istio's retries.retryOn spell them.
GRPC_RETRY_ON = {
    "cancelled": GRPC_CANCELLED,
    "deadline-exceeded": GRPC_DEADLINE_EXCEEDED,
    "internal": GRPC_INTERNAL,
    "resource-exhausted": GRPC_RESOURCE_EXHAUSTED,
    "unavailable": GRPC_UNAVAILABLE,
}

# TimeoutValue is at most 8 digits (gRPC over HTTP/2 spec); anything else is ignored.
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNIT_SECONDS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def is_grpc(head: RequestHead) -> bool:
    for k, v in head.headers:
        if k == b"content-type":
            return v[:16] == b"application/grpc"
    return False


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout value, or None when it is not a valid TimeoutValue."""
    m = _TIMEOUT.fullmatch(value.strip())
    if m is None:
        return None
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)[0]]


def grpc_deadline(head: RequestHead, route_timeout: float | None) -> float | None:
    """Istio's gRPC timeout: grpc-timeout, capped by the route timeout when one is set."""
    value = head.header(b"grpc-timeout")
    timeout = parse_grpc_timeout(value) if value is not None else None
    if timeout is None:
        return route_timeout
    if route_timeout is not None:
        return min(timeout, route_timeout)
    return timeout


def grpc_status_of(headers: Headers, default: str) -> str:
    for k, v in headers:
        if k == b"grpc-status":
            return v.decode("latin-1")
    return default


def grpc_status_for_http(status: int) -> int:
    """Envoy's (and gRPC's) mapping of an HTTP status to the gRPC status a client sees."""
    if status == 400:
        return GRPC_INTERNAL
    if status == 401:
        return GRPC_UNAUTHENTICATED
    if status == 403:
        return GRPC_PERMISSION_DENIED
    if status == 404:
        return GRPC_UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return GRPC_UNAVAILABLE
    return GRPC_UNKNOWN


def _percent_encode(message: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2 spec)."""
    out = bytearray()
    for b in message.encode():
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def grpc_reply_headers(code: int, message: str) -> Headers:
    """Headers of a trailers-only response (HTTP 200, the status in the headers block)."""
    headers: Headers = [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
    ]
    if message:
        headers.append((b"grpc-message", _percent_encode(message)))
    return headers


def format_grpc_timeout(seconds: float) -> bytes:
    """The finest TimeoutValue (≤ 8 digits) that does not shorten `seconds`."""
    for unit, scale in ((b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        value = -int(-seconds * scale // 1)  # ceiling
        if value < 100_000_000:
            return b"%d" % max(value, 0) + unit
    return b"99999999H"


def with_grpc_timeout(headers: Headers, timeout: float | None) -> Headers:
    """Headers with grpc-timeout replaced by the deadline the proxy enforces (as Envoy
    rewrites it), or removed when there is none: an invalid value must not reach a server
    that would fail the call over it."""
    out = [h for h in headers if h[0] != b"grpc-timeout"]
    if timeout is not None:
        out.append((b"grpc-timeout", format_grpc_timeout(timeout)))
    return out
