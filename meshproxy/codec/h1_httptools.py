"""HTTP/1.1 codec on httptools (llhttp): the fast path, strict by llhttp's defaults."""

from __future__ import annotations

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
from meshproxy.codec.h1_limits import Limits, check_request_head
from meshproxy.codec.h1_serialize import (
    chunk,
    last_chunk,
    request_head_bytes,
    response_head_bytes,
)
from meshproxy.codec.headers import framing, request_fields
from meshproxy.errors import ProtocolError, ProtocolSide

_DOWN = ProtocolSide.DOWNSTREAM
_UP = ProtocolSide.UPSTREAM


def _callback_error(exc: BaseException) -> ProtocolError | None:
    """Our own ProtocolError raised inside a parser callback, which httptools wraps."""
    for inner in (exc.__cause__, exc.__context__):
        if isinstance(inner, ProtocolError):
            return inner
    return None


class _Writer:
    """Framing state for the message we are sending: chunked or not, and the output buffer."""

    __slots__ = ("_chunked", "_out", "close_after")

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._chunked = False
        self.close_after = False

    def head(self, data: bytes, chunked: bool) -> None:
        self._chunked = chunked
        self._out.append(data)

    def body(self, data: bytes) -> None:
        if data:
            self._out.append(chunk(data) if self._chunked else data)

    def end(self, trailers: Headers) -> None:
        if self._chunked:
            self._out.append(last_chunk(trailers))
            self._chunked = False

    def take(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)


class HttptoolsServerCodec:
    """Downstream side: parses requests, serializes responses."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[ReceivedEvent] = []
        self._headers: Headers = []
        self._url = b""
        self._head_bytes = 0
        self._in_head = False
        self._chunk_len = 0
        self._writer = _Writer()
        self.failed = False

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
        try:
            self._parser.feed_data(data)
            if self._in_head:
                # A head still incomplete after this read: bound what llhttp buffers for it.
                self._head_bytes += len(data)
                if self._head_bytes > self._limits.max_header_bytes:
                    raise ProtocolError("request headers too large", _DOWN, 431)
        except httptools.HttpParserUpgrade as exc:
            # Upgrades are not tunnelled yet: the request goes on as plain HTTP with its
            # Upgrade header stripped (hop-by-hop), as h11 does when no 101 comes back. What
            # follows the head is parsed as the next request, by a fresh parser.
            self._events = []
            self._parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0] :] if exc.args and isinstance(exc.args[0], int) else b""
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

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._headers = []
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Kept minimal: llhttp already validated the bytes; sizes are checked in receive().
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        headers = self._headers
        limits = self._limits
        if len(headers) > limits.max_headers:
            raise ProtocolError("too many request headers", _DOWN, 431)
        if self._head_bytes + self._chunk_len > limits.max_header_bytes:
            # Only a head this large can be over the limit: measure it exactly.
            size = len(self._url) + sum(len(k) + len(v) + 4 for k, v in headers)
            if size > limits.max_header_bytes:
                raise ProtocolError("request headers too large", _DOWN, 431)
        chunked, length, host, expect = request_fields(headers)
        head = RequestHead(
            method=p.get_method(),
            target=self._url,
            headers=headers,
            http_version=b"1.1" if p.get_http_version() == "1.1" else p.get_http_version().encode(),
            keep_alive=p.should_keep_alive(),
            has_body=chunked or bool(length),
            content_length=length,
            expect_continue=expect,
        )
        check_request_head(head, host)
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(EndOfMessage())

    def start_next(self) -> list[ReceivedEvent]:
        """Ready for the next request; llhttp already parsed any pipelined one."""
        return []

    # -- sending ---------------------------------------------------------------------------
    def send_head(self, head: ResponseHead, request_method: bytes, keep_alive: bool) -> None:
        bodyless = request_method == b"HEAD" or head.status in (204, 304) or head.status < 200
        chunked = head.has_body and head.content_length is None and not bodyless
        self._writer.head(response_head_bytes(head, chunked, not keep_alive), chunked)
        self._writer.close_after = not keep_alive

    def send_data(self, data: bytes) -> None:
        self._writer.body(data)

    def send_end(self, trailers: Headers) -> None:
        self._writer.end(trailers)

    def data_to_send(self) -> bytes:
        return self._writer.take()


class HttptoolsClientCodec:
    """Upstream side: serializes requests, parses responses."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[ReceivedEvent] = []
        self._headers: Headers = []
        self._head_bytes = 0
        self._in_head = False
        self._writer = _Writer()
        self._request_method = b"GET"
        self._eof_ends_message = False
        self.failed = False

    def receive(self, data: bytes) -> list[ReceivedEvent]:
        if self.failed:
            return []
        try:
            self._parser.feed_data(data)
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > self._limits.max_header_bytes:
                    raise ProtocolError("response headers too large", _UP, 502)
        except httptools.HttpParserError as exc:
            self._events.append(
                ParseFailure(
                    _callback_error(exc) or ProtocolError(f"malformed response: {exc}", _UP, 502)
                )
            )
            self.failed = True
        except ProtocolError as exc:
            self._events.append(ParseFailure(exc))
            self.failed = True
        events = self._events
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
        self._head_bytes = 0
        self._headers = []

    def on_status(self, status: bytes) -> None:
        self._head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) >= self._limits.max_response_headers:
            raise ProtocolError("too many response headers", _UP, 502)
        if self._head_bytes > self._limits.max_header_bytes:
            raise ProtocolError("response headers too large", _UP, 502)
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        status = p.get_status_code()
        chunked, length = framing(self._headers, _UP)
        bodyless = self._request_method == b"HEAD" or status in (204, 304) or status < 200
        has_body = not bodyless and (chunked or length is None or length > 0)
        self._eof_ends_message = has_body and not chunked and length is None
        self._events.append(
            ResponseHead(
                status=status,
                headers=self._headers,
                http_version=p.get_http_version().encode(),
                keep_alive=p.should_keep_alive() and not self._eof_ends_message,
                has_body=has_body,
                content_length=length,
            )
        )
        if self._request_method == b"HEAD" and status >= 200:
            # llhttp cannot be told the request was HEAD; the message ends with its head.
            self._events.append(EndOfMessage())
            self._parser = httptools.HttpResponseParser(self)

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._eof_ends_message = False
        self._events.append(EndOfMessage())

    def start_next(self) -> list[ReceivedEvent]:
        return []

    def send_head(self, head: RequestHead) -> None:
        self._request_method = head.method
        chunked = head.has_body and head.content_length is None
        self._writer.head(request_head_bytes(head, chunked), chunked)

    def send_data(self, data: bytes) -> None:
        self._writer.body(data)

    def send_end(self, trailers: Headers) -> None:
        self._writer.end(trailers)

    def data_to_send(self) -> bytes:
        return self._writer.take()
