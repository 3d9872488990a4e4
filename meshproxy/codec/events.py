"""The codec events: one small vocabulary shared by HTTP/1 (and later HTTP/2) codecs."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]  # names lower-case; order and duplicates kept


# Plain classes with written-out __init__s, not dataclasses: these are made once or more per
# request, and mypyc compiles a written __init__ but leaves a dataclass's generated one
# interpreted (it cost ~7% of the proxy's CPU).


class RequestHead:
    __slots__ = (
        "authority",
        "content_length",
        "expect_continue",
        "has_body",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "stream_id",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        http_version: bytes = b"1.1",
        keep_alive: bool = True,
        has_body: bool = False,
        content_length: int | None = None,  # None with has_body: chunked
        expect_continue: bool = False,
        stream_id: int = 1,
        authority: bytes = b"",  # the Host header (":authority" in HTTP/2)
        # A WebSocket upgrade (HTTP/1.1 Upgrade, or HTTP/2 extended CONNECT): after a 101 the
        # bytes both ways are a tunnel; the codec emits no EndOfMessage for such a request.
        upgrade: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.stream_id = stream_id
        self.authority = authority
        self.upgrade = upgrade

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.headers!r})"


class ResponseHead:
    __slots__ = (
        "content_length",
        "has_body",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "stream_id",
    )

    def __init__(
        self,
        status: int,
        headers: Headers,
        reason: bytes = b"",
        keep_alive: bool = True,
        has_body: bool = True,
        content_length: int | None = None,
        stream_id: int = 1,
    ) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.content_length = content_length
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, {self.headers!r})"


class Data:
    __slots__ = ("data", "stream_id")

    def __init__(self, data: bytes, stream_id: int = 1) -> None:
        self.data = data
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"Data({self.data!r}, stream_id={self.stream_id})"


class EndOfMessage:
    __slots__ = ("stream_id", "trailers")

    def __init__(self, trailers: Headers | None = None, stream_id: int = 1) -> None:
        self.trailers: Headers = trailers if trailers is not None else []
        self.stream_id = stream_id

    def __repr__(self) -> str:
        return f"EndOfMessage({self.trailers!r}, stream_id={self.stream_id})"


Event = RequestHead | ResponseHead | Data | EndOfMessage


class ParseFailure:
    """The peer broke the protocol after the events before it; nothing after it is valid."""

    # A plain slotted class, not a dataclass: mypyc cannot resolve `Exception` in a
    # dataclass annotation under `from __future__ import annotations`.
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


ReceivedEvent = Event | ParseFailure
