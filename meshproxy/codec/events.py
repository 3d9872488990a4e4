"""The codec events: one small vocabulary shared by HTTP/1 (and later HTTP/2) codecs."""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = list[tuple[bytes, bytes]]  # names lower-case; order and duplicates kept


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    has_body: bool = False
    content_length: int | None = None  # None with has_body: chunked
    expect_continue: bool = False
    stream_id: int = 1
    authority: bytes = b""  # the Host header (":authority" in HTTP/2)
    # A WebSocket upgrade (HTTP/1.1 Upgrade, or HTTP/2 extended CONNECT): after a 101 the
    # bytes both ways are a tunnel; the codec emits no EndOfMessage for such a request.
    upgrade: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: Headers
    reason: bytes = b""
    http_version: bytes = b"1.1"
    keep_alive: bool = True
    has_body: bool = True
    content_length: int | None = None
    stream_id: int = 1


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes
    stream_id: int = 1


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: Headers = field(default_factory=list)
    stream_id: int = 1


Event = RequestHead | ResponseHead | Data | EndOfMessage


class ParseFailure:
    """The peer broke the protocol after the events before it; nothing after it is valid."""

    # A plain slotted class, not a dataclass: mypyc cannot resolve `Exception` in a
    # dataclass annotation under `from __future__ import annotations`.
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


ReceivedEvent = Event | ParseFailure
