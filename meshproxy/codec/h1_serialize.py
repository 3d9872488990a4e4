"""Hand-written HTTP/1.1 serialization for the fast codec: one bytes join per message head."""

from __future__ import annotations

from http import HTTPStatus

from meshproxy.codec.events import Headers, RequestHead, ResponseHead

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def request_head_bytes(head: RequestHead, chunked: bool) -> bytes:
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    for k, v in head.headers:
        parts += (k, b": ", v, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head_bytes(head: ResponseHead, chunked: bool, close: bool) -> bytes:
    parts = [b"HTTP/1.1 %d " % head.status, head.reason or reason_phrase(head.status), b"\r\n"]
    for k, v in head.headers:
        parts += (k, b": ", v, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"
