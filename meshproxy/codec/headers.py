"""Header rules shared by the codecs: hop-by-hop removal, syntax checks, framing checks."""

from __future__ import annotations

import re
from typing import Final

from meshproxy.codec.events import Headers
from meshproxy.errors import ProtocolError, ProtocolSide

# RFC 9110 §7.6.1 plus the legacy names every proxy strips; framing is re-done per hop.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_MAX_DIGITS: Final = 18  # a Content-Length that still fits an int64
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


# Istio's metadata exchange between sidecars (observe/workload.py): never passed on as is.
PEER_METADATA: Final = b"x-envoy-peer-metadata"
PEER_METADATA_ID: Final = b"x-envoy-peer-metadata-id"
_DROP: Final = HOP_BY_HOP | {PEER_METADATA, PEER_METADATA_ID}


def strip_hop_by_hop(headers: Headers) -> tuple[Headers, bytes | None]:
    """Drop hop-by-hop headers and any header the Connection header names (RFC 9110 §7.6.1),
    and in the same one pass Istio's metadata exchange headers, returning the
    x-envoy-peer-metadata value it removed (whether to trust it is the caller's decision).

    Returns `headers` itself when there is nothing to drop (the common case on a hot path).
    """
    drop: frozenset[bytes] | set[bytes] | None = None
    metadata: bytes | None = None
    for k, v in headers:
        if k in _DROP:
            if drop is None:
                drop = _DROP
            if k == b"connection":
                lowered = v.lower()
                if lowered != b"keep-alive" and lowered != b"close":
                    drop = set(drop)
                    drop.update(t.strip() for t in lowered.split(b","))
            elif k == PEER_METADATA:
                metadata = v
    if drop is None:
        return headers, None
    return [h for h in headers if h[0] not in drop], metadata


def check_field_syntax(headers: Headers, side: ProtocolSide) -> None:
    """Reject names that are not tokens and values with CTLs (NUL, CR, LF and friends)."""
    for k, v in headers:
        if not _TOKEN.fullmatch(k):
            raise ProtocolError(f"invalid header name {k[:40]!r}", side)
        if not _FIELD_VALUE.fullmatch(v):
            raise ProtocolError(f"invalid character in header {k.decode()!r}", side)


def framing(headers: Headers, side: ProtocolSide) -> tuple[bool, int | None]:
    """(chunked, content_length) with every ambiguity rejected, as request smuggling needs.

    Content-Length with Transfer-Encoding, several Content-Length values, a Content-Length that
    is not plain digits, or a Transfer-Encoding other than a single "chunked" is an error.
    """
    cl: bytes | None = None
    te: bytes | None = None
    for k, v in headers:
        if k == b"content-length":
            cl = _single(cl, v, "Content-Length", side)
        elif k == b"transfer-encoding":
            te = _single(te, v, "Transfer-Encoding", side)
    return framing_values(cl, te, side)


def _single(previous: bytes | None, value: bytes, name: str, side: ProtocolSide) -> bytes:
    """`value`, unless the header already appeared: a repeated framing header is ambiguous."""
    if previous is not None:
        raise ProtocolError(f"duplicate {name}", side)
    return value


def framing_values(
    cl: bytes | None, te: bytes | None, side: ProtocolSide
) -> tuple[bool, int | None]:
    """Resolve the Content-Length / Transfer-Encoding values, rejecting every ambiguity."""
    if te is not None:
        if cl is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding", side)
        if te.strip(b" \t").lower() != b"chunked":
            raise ProtocolError(f"unsupported Transfer-Encoding {te[:40]!r}", side, status=501)
        return True, None
    if cl is not None:
        cl = cl.strip(b" \t")
        if not (cl.isdigit() and len(cl) <= _MAX_DIGITS):  # bytes.isdigit: ASCII 0-9 only
            raise ProtocolError(f"invalid Content-Length {cl[:40]!r}", side)
        return False, int(cl)
    return False, None


def check_head_bytes(head: bytes, side: ProtocolSide) -> None:
    """Raw checks for parsers that are lenient: bare LF/CR and obs-fold line folding."""
    lines = head.split(b"\r\n")
    lengths = 0
    for i, line in enumerate(lines):
        if b"\n" in line or b"\r" in line:
            raise ProtocolError("bare CR or LF in message head", side)
        if i > 0 and line[:1] in (b" ", b"\t"):
            raise ProtocolError("obsolete line folding in message head", side)
        if i > 0 and line:
            colon = line.find(b":")
            if colon > 0 and line[colon - 1 : colon] in (b" ", b"\t"):
                raise ProtocolError("whitespace before the colon of a header", side)
            if colon > 0 and line[:colon].lower() == b"content-length":
                lengths += 1
                if lengths > 1 or b"," in line[colon:]:
                    # h11 merges equal duplicates (and `5, 5`) where llhttp refuses them:
                    # refuse in both.
                    raise ProtocolError("more than one Content-Length", side)


def is_websocket_upgrade(headers: Headers) -> bool:
    """`Connection: upgrade` with `Upgrade: websocket`: the one upgrade Istio tunnels."""
    connection_upgrade = websocket = False
    for k, v in headers:
        if k == b"connection":
            if b"upgrade" in (t.strip() for t in v.lower().split(b",")):
                connection_upgrade = True
        elif k == b"upgrade":
            websocket = v.strip().lower() == b"websocket"
    return connection_upgrade and websocket


_DOWN: Final = ProtocolSide.DOWNSTREAM  # a compiled constant (read per request)
_ZERO: Final = ord("0")
_REQUEST_SPECIAL: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"expect", b"connection"}
)


def request_fields(headers: Headers) -> tuple[bool, int | None, bytes, bool, bool]:
    """One pass over request headers: (chunked, content_length, host, expect_continue,
    has_connection); the last says whether keep-alive alone tells the HTTP version.

    Framing is checked as `framing` does; exactly one Host is required.
    """
    cl: bytes | None = None
    te: bytes | None = None
    host: bytes | None = None
    expect = False
    connection = False
    side = _DOWN
    for k, v in headers:
        if k in _REQUEST_SPECIAL:
            if k == b"host":
                if host is not None:
                    raise ProtocolError("exactly one Host header is required", side)
                host = v
            elif k == b"content-length":
                cl = _single(cl, v, "Content-Length", side)
            elif k == b"transfer-encoding":
                te = _single(te, v, "Transfer-Encoding", side)
            elif k == b"connection":
                connection = True
            elif v.lower() == b"100-continue":
                expect = True
    if host is None:
        raise ProtocolError("exactly one Host header is required", side)
    if te is None and cl is None:
        return False, None, host, expect, connection
    chunked, length = framing_values(cl, te, side)
    if length is not None and cl is not None and len(cl) > 1 and cl[0] == _ZERO:
        # `010` is ten (RFC 9110 digits are decimal): forwarded as `10`, never verbatim,
        # since an upstream reading it as octal would take 8 bytes and see the rest as a
        # second request.
        for i, (k, _) in enumerate(headers):
            if k == b"content-length":
                headers[i] = (k, b"%d" % length)
    return chunked, length, host, expect, connection
