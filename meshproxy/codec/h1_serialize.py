"""Hand-written HTTP/1.1 serialization for the fast codec: one bytes join per message head."""

from __future__ import annotations

from http import HTTPStatus

from meshproxy.codec.events import Headers

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def last_chunk(trailers: Headers) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"
