"""HTTP/1.1 codec on httptools (llhttp): the fast path, strict by llhttp's defaults.

Kept deliberately flat: every callback and method here runs once or more per request, so
state lives in slots and the output is a plain list joined once per write.
"""

from __future__ import annotations

from typing import Final

import httptools

from meshproxy.codec.events import (
    Data,
    EndOfMessage,
    Headers,
    ParseFailure,
    ReceivedEvent,
    RequestHead,
    ResponseHead,
)
from meshproxy.codec.h1_limits import (
    ChunkExtensionBudget,
    Limits,
    check_request_head,
    fields_size,
    request_head_size,
)
from meshproxy.codec.h1_serialize import last_chunk, reason_phrase
from meshproxy.codec.headers import framing, is_websocket_upgrade, request_fields
from meshproxy.errors import ProtocolError, ProtocolSide

_DOWN: Final = ProtocolSide.DOWNSTREAM
_UP: Final = ProtocolSide.UPSTREAM
_HTTP11: Final = b"1.1"


def _version(parser: httptools.HttpRequestParser) -> bytes:
    """The request's HTTP version, asked of llhttp only when keep-alive cannot tell: without a
    Connection header an HTTP/1.0 request is never keep-alive and an HTTP/1.1 one always is
    (llhttp accepts no other 1.x version), which spares the str llhttp would format per request."""
    version = parser.get_http_version()
    return _HTTP11 if version == "1.1" else version.encode()


_END: Final = EndOfMessage()


def _callback_error(exc: BaseException) -> ProtocolError | None:
    """Our own ProtocolError raised inside a parser callback, which httptools wraps."""
    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, ProtocolError):
            return inner
    return None


class _Side:
    """State both directions share: the parse in progress, and the bytes waiting to be written
    with the framing of the message being sent."""

    __slots__ = (
        "_began",
        "_chunk_len",
        "_chunked",
        "_events",
        "_head_bytes",
        "_head_upper",
        "_headers",
        "_in_head",
        "_limits",
        "_out",
        "_upgrade_rest",
        "failed",
    )

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._events: list[ReceivedEvent] = []
        self._headers: Headers = []
        self._head_bytes = 0  # of an unfinished head: at least this many bytes (the limit)
        self._head_upper = 0  # ... and at most this many (when to measure it exactly)
        self._in_head = False
        self._began = False  # a message began during the current feed
        self._upgrade_rest = b""
        self._chunk_len = 0
        self.failed = False
        self._out: list[bytes] = []
        self._chunked = False

    def _count_unfinished_head(self, data: bytes) -> None:
        """Bound what llhttp buffers for a head that has not ended after this read.

        Only a head that was already in progress before this read owns all of `data`; one
        that began inside it (after pipelined messages, or a body) owns an unknown tail of
        it, so it is counted from the next read on: at most one read's worth goes uncounted.
        """
        if self._began:
            self._head_bytes = 0
            self._head_upper = len(data)
        else:
            self._head_bytes += len(data)
            self._head_upper += len(data)

    def send_data(self, data: bytes) -> None:
        if data:
            self._out.append(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def send_end(self, trailers: Headers) -> None:
        if self._chunked:
            self._out.append(last_chunk(trailers))
            self._chunked = False

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)


def _without_trailing_whitespace(value: bytes) -> bytes:
    """llhttp keeps a value's trailing whitespace; RFC 9110 5.5 excludes it (catalog B03:
    `admin ` must match a rule on `admin`). Only SP and HTAB, never \x85 or \xa0."""
    if value and (value[-1] == 32 or value[-1] == 9):
        return value.rstrip(b" \t")
    return value


class HttptoolsServerCodec(_Side):
    """Downstream side: parses requests, serializes responses."""

    __slots__ = (
        "_chunk_budget",
        "_chunked_body",
        "_chunked_seen",
        "_chunks",
        "_first_chunked",
        "_parser",
        "_trailer_bytes",
        "_url",
    )

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        # Chunked bodies only: what bounds their extensions (see _charge_chunk_framing).
        self._chunk_budget = ChunkExtensionBudget(_DOWN, 400)
        self._chunked_body = False  # a chunked body is being received
        self._chunked_seen = False  # one started during the current read
        self._chunks = 0
        self._first_chunked = -1  # index in this read's events of its first chunked message
        self._trailer_bytes = 0

    @property
    def head_pending(self) -> bool:
        """True while part of a request head has arrived (the header timeout runs then)."""
        return self._in_head

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[ReceivedEvent]:
        if self.failed:
            return []
        events = self._events
        self._chunk_len = len(data)
        self._began = False
        in_chunked_body = self._chunked_body
        self._first_chunked = 0 if in_chunked_body else -1
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._count_unfinished_head(data)
                if self._head_bytes > self._limits.max_header_bytes:
                    raise ProtocolError("request headers too large", _DOWN, 431)
            if in_chunked_body or self._chunked_seen:
                self._charge_chunk_framing(data, events)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :] if exc.args and isinstance(exc.args[0], int) else b""
            self._events = []
            head = events[-2] if len(events) >= 2 else None
            if (
                isinstance(head, RequestHead)
                and head.method == b"GET"
                and is_websocket_upgrade(head.headers)
            ):
                # A WebSocket upgrade: what follows the head is tunnel data, never a request.
                head.upgrade = True
                events.pop()  # its EndOfMessage: the request lasts as long as the tunnel
                self._upgrade_rest = rest
                self.failed = True  # no more parsing on this connection
                return events
            # Any other upgrade (h2c, ...) is served as plain HTTP with Upgrade stripped
            # (hop-by-hop), as h11 does when no 101 comes back. What follows the head is
            # parsed as the next request, by a fresh parser.
            self._parser = httptools.HttpRequestParser(self)
            return events + (self.receive(rest) if rest else [])
        except httptools.HttpParserError as exc:
            error = _callback_error(exc) or ProtocolError(f"malformed request: {exc}", _DOWN, 400)
            events.append(ParseFailure(error))
            self.failed = True
        except ProtocolError as exc:
            events.append(ParseFailure(exc))
            self.failed = True
        self._events = []
        return events

    def _charge_chunk_framing(self, data: bytes, events: list[ReceivedEvent]) -> None:
        """Charge this read's unexplained bytes to the chunked message's extension budget."""
        explained = self._trailer_bytes
        for ev in events:
            if type(ev) is Data:
                explained += len(ev.data)
            elif type(ev) is RequestHead:
                explained += request_head_size(ev)
        if self._in_head and self._began:
            explained += self._limits.max_header_bytes  # a next head's unknown first part
        if self._chunked_body:
            explained += fields_size(self._headers)  # trailers so far
        try:
            self._chunk_budget.charge(len(data), explained, self._chunks)
        except ProtocolError:
            del events[self._first_chunked :]  # none of the offending message goes onward
            raise
        self._chunked_seen = False
        self._chunks = 0
        self._trailer_bytes = 0

    def on_message_begin(self) -> None:
        self._in_head = True
        self._began = True
        self._head_bytes = self._head_upper = 0
        self._headers = []
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept minimal: llhttp already validated the bytes; sizes are checked in receive().
        self._headers.append((name.lower(), _without_trailing_whitespace(value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        headers = self._headers
        limits = self._limits
        if len(headers) > limits.max_headers:
            raise ProtocolError("too many request headers", _DOWN, 431)
        if self._head_upper + self._chunk_len > limits.max_header_bytes:
            # Only a head this large can be over the limit: measure it exactly.
            size = len(self._url) + sum(len(k) + len(v) + 4 for k, v in headers)
            if size > limits.max_header_bytes:
                raise ProtocolError("request headers too large", _DOWN, 431)
        chunked, length, host, expect, has_connection = request_fields(headers)
        keep_alive = p.should_keep_alive()
        head = RequestHead(
            p.get_method(),
            self._url,
            headers,
            _HTTP11 if keep_alive and not has_connection else _version(p),
            keep_alive,
            chunked or bool(length),
            length,
            expect,
            1,
            host,
        )
        check_request_head(head, host)
        self._events.append(head)
        # Trailers (llhttp reports them as headers) go to a list of their own and are
        # dropped: never merged into the head above, which is not yet sent (catalog B08).
        self._headers = []
        if chunked:
            self._chunked_body = self._chunked_seen = True
            self._chunk_budget.spent = 0
            if self._first_chunked < 0:
                self._first_chunked = len(self._events) - 1

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        if self._chunked_body:
            self._chunked_body = False
            self._trailer_bytes += fields_size(self._headers)
        self._events.append(_END)

    def start_next(self) -> list[ReceivedEvent]:
        """Ready for the next request; llhttp already parsed any pipelined one."""
        return []

    def take_upgrade_bytes(self) -> bytes:
        rest, self._upgrade_rest = self._upgrade_rest, b""
        return rest

    # -- sending ---------------------------------------------------------------------------
    def send_head(self, head: ResponseHead, request_method: bytes, keep_alive: bool) -> None:
        status = head.status
        bodyless = status < 200 or status == 204 or status == 304 or request_method == b"HEAD"
        chunked = head.has_body and head.content_length is None and not bodyless
        parts = [b"HTTP/1.1 %d %b\r\n" % (status, head.reason or reason_phrase(status))]
        for k, v in head.headers:  # four appends: compiled, cheaper than a tuple per line
            parts.append(k)
            parts.append(b": ")
            parts.append(v)
            parts.append(b"\r\n")
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._out.append(b"".join(parts))
        self._chunked = chunked


class HttptoolsClientCodec(_Side):
    """Upstream side: serializes requests, parses responses."""

    __slots__ = ("_eof_ends_message", "_parser", "_request_method")

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self._parser = httptools.HttpResponseParser(self)
        self._request_method = b"GET"
        self._eof_ends_message = False

    def receive(self, data: bytes) -> list[ReceivedEvent]:
        if self.failed:
            return []
        events = self._events
        self._chunk_len = len(data)
        self._began = False
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._count_unfinished_head(data)
                if self._head_bytes > self._limits.max_header_bytes:
                    raise ProtocolError("response headers too large", _UP, 502)
        except httptools.HttpParserUpgrade as exc:
            # A 101: what follows its head belongs to the tunnel (the connection decides).
            self._upgrade_rest = data[exc.args[0] :] if exc.args else b""
        except httptools.HttpParserError as exc:
            error = _callback_error(exc) or ProtocolError(f"malformed response: {exc}", _UP, 502)
            events.append(ParseFailure(error))
            self.failed = True
        except ProtocolError as exc:
            events.append(ParseFailure(exc))
            self.failed = True
        self._events = []
        return events

    def receive_eof(self) -> list[ReceivedEvent]:
        """The upstream closed: that ends a close-delimited body, anything else is a failure."""
        if self._eof_ends_message:
            self._eof_ends_message = False
            return [EndOfMessage()]
        return []

    def on_message_begin(self) -> None:
        self._in_head = True
        self._began = True
        self._head_bytes = self._head_upper = 0
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), _without_trailing_whitespace(value)))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        headers = self._headers
        limits = self._limits
        if len(headers) > limits.max_response_headers:
            raise ProtocolError("too many response headers", _UP, 502)
        if self._head_upper + self._chunk_len > limits.max_header_bytes:
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if size > limits.max_header_bytes:
                raise ProtocolError("response headers too large", _UP, 502)
        status = p.get_status_code()
        chunked, length = framing(headers, _UP)
        head_request = self._request_method == b"HEAD"
        bodyless = status < 200 or status == 204 or status == 304 or head_request
        has_body = not bodyless and (chunked or length is None or length > 0)
        eof_ends = has_body and not chunked and length is None
        self._eof_ends_message = eof_ends
        self._events.append(
            ResponseHead(
                status,
                headers,
                b"",
                p.should_keep_alive() and not eof_ends,  # llhttp knows HTTP/1.0's default
                has_body,
                length,
            )
        )
        self._headers = []  # trailers, dropped: never merged into the head above
        if head_request and status >= 200:
            # llhttp cannot be told the request was HEAD; the message ends with its head.
            self._events.append(_END)
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._eof_ends_message = False
        self._events.append(_END)

    def start_next(self) -> list[ReceivedEvent]:
        return []

    def take_upgrade_bytes(self) -> bytes:
        rest, self._upgrade_rest = self._upgrade_rest, b""
        return rest

    def send_head(self, head: RequestHead) -> None:
        self._request_method = head.method
        chunked = head.has_body and head.content_length is None
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
        for k, v in head.headers:  # four appends: compiled, cheaper than a tuple per line
            parts.append(k)
            parts.append(b": ")
            parts.append(v)
            parts.append(b"\r\n")
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        self._out.append(b"".join(parts))
        self._chunked = chunked
