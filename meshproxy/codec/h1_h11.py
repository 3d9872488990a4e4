"""HTTP/1.1 codec on h11: the strict reference implementation, slower than httptools.

h11 tolerates a few things a proxy must not pass on (bare LF, obs-fold, Content-Length with
Transfer-Encoding, CTL bytes other than NUL/CR/LF), so the raw head is checked before h11 sees it.
"""

from __future__ import annotations

from typing import Any

import h11

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
from meshproxy.codec.h1_serialize import reason_phrase
from meshproxy.codec.headers import (
    check_field_syntax,
    check_head_bytes,
    framing,
    is_websocket_upgrade,
    request_fields,
)
from meshproxy.errors import ProtocolError, ProtocolSide

_DOWN = ProtocolSide.DOWNSTREAM
_UP = ProtocolSide.UPSTREAM
MAX_CHUNK_SIZE = 2**64 - 1  # llhttp's limit (an unsigned 64-bit length)


def _head_end(buf: bytes) -> int:
    """Index just past the blank line ending a head (CRLF or bare LF forms), or -1."""
    ends = [
        at + len(blank)
        for blank in (b"\r\n\r\n", b"\n\n", b"\n\r\n")  # h11 reads all three as the end
        if (at := buf.find(blank)) >= 0
    ]
    return min(ends) if ends else -1


class _HeadScanner:
    """Collects the bytes of a message head so they can be checked before h11 parses them."""

    def __init__(self, side: ProtocolSide, limit: int) -> None:
        self._buf = b""
        self._side = side
        self._limit = limit
        self.active = True

    def feed(self, data: bytes) -> None:
        if not self.active:
            return
        self._buf += data
        end = _head_end(self._buf)
        if end < 0:
            if len(self._buf) > self._limit:
                raise ProtocolError(
                    "headers too large", self._side, 431 if self._side is _DOWN else 502
                )
            return
        if end > self._limit:
            raise ProtocolError(
                "headers too large", self._side, 431 if self._side is _DOWN else 502
            )
        check_head_bytes(self._buf[: end - 2], self._side)
        self._buf = b""
        self.active = False

    def restart(self, pending: bytes) -> None:
        self._buf = b""
        self.active = True
        if pending:
            self.feed(pending)


def _headers(h: Any) -> Headers:
    return [(k, v) for k, v in h]


class H11ServerCodec:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._scan = _HeadScanner(_DOWN, limits.max_header_bytes)
        self._out: list[bytes] = []
        self._head: RequestHead | None = None
        self.failed = False
        # Chunked bodies: h11 discards extensions, so what a read consumed beyond data, head
        # and trailers is charged to the message's budget (h1_limits.ChunkExtensionBudget).
        self._chunk_budget = ChunkExtensionBudget(_DOWN, 400)
        self._chunked_body = False
        self._chunks = 0
        self._explained = 0

    @property
    def head_pending(self) -> bool:
        return self._conn.their_state is h11.IDLE and bool(self._conn.trailing_data[0])

    def _buffered(self) -> int:
        return len(self._conn._receive_buffer)  # type: ignore[attr-defined]  # h11's own buffer

    def _drain_charged(self, events: list[ReceivedEvent]) -> None:
        """_drain, then charge a chunked body's unexplained bytes to its extension budget."""
        before = self._buffered()
        in_chunked_body = self._chunked_body
        self._chunks = self._explained = 0
        try:
            self._drain(events)
            self._check_chunk_size()
        except h11.RemoteProtocolError as exc:
            if self._chunked_body and exc.error_status_hint == 431:
                # h11's line limit met a chunk line: that is an extension too long, not a head.
                events.clear()
                self._chunk_budget.check_pending(self._buffered())
            raise
        if in_chunked_body or self._chunked_body or self._chunks:
            pending = self._buffered()
            try:
                self._chunk_budget.charge(before - pending, self._explained, self._chunks)
                if self._chunked_body:
                    self._chunk_budget.check_pending(pending)
            except ProtocolError:
                events.clear()  # h11 parses one request per cycle: all of it is the offender
                raise

    def _skip_blank_lines(self) -> None:
        """Drop CR and LF bytes before a request line, as llhttp does (RFC 9112 §2.2: a
        server SHOULD ignore empty lines there); h11 would refuse them, and the two codecs
        must read the same bytes the same way."""
        buffered = self._conn._receive_buffer  # type: ignore[attr-defined]  # h11's own buffer
        blank = len(buffered) - len(bytes(buffered).lstrip(b"\r\n"))
        if blank:
            buffered._extract(blank)

    def _check_chunk_size(self) -> None:
        """A chunk size past 2^64 - 1 is refused, as llhttp refuses it ("overflow"): h11
        accepts 20 hex digits (2^80), and the two codecs must read the same bytes alike."""
        reader = self._conn._reader  # type: ignore[attr-defined]  # h11's body reader
        if getattr(reader, "_bytes_in_chunk", 0) > MAX_CHUNK_SIZE:
            raise ProtocolError("chunk size overflow", _DOWN)

    def receive(self, data: bytes) -> list[ReceivedEvent]:
        if self.failed:
            return []
        events: list[ReceivedEvent] = []
        try:
            if self._conn.their_state is h11.IDLE and not self._buffered():
                data = data.lstrip(b"\r\n")
                if not data:
                    return events
            if self._conn.their_state is h11.IDLE:
                self._scan.feed(data)
            self._conn.receive_data(data)
            self._drain_charged(events)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            events.append(ParseFailure(ProtocolError(f"malformed request: {exc}", _DOWN, status)))
            self.failed = True
        except ProtocolError as exc:
            events.append(ParseFailure(exc))
            self.failed = True
        return events

    def _drain(self, events: list[ReceivedEvent]) -> None:
        while True:
            ev = self._conn.next_event()
            if ev is h11.PAUSED:
                self._maybe_upgrade(events)
                return
            if ev is h11.NEED_DATA:
                return
            if isinstance(ev, h11.Request):
                headers = _headers(ev.headers)
                if len(headers) > self._limits.max_headers:
                    raise ProtocolError("too many request headers", _DOWN, 431)
                check_field_syntax(headers, _DOWN)
                chunked, length, host, expect, _ = request_fields(headers)
                head = RequestHead(
                    method=ev.method,
                    target=ev.target,
                    headers=headers,
                    http_version=ev.http_version,
                    keep_alive=not any(
                        k == b"connection" and b"close" in v.lower() for k, v in headers
                    ),
                    has_body=chunked or bool(length),
                    content_length=length,
                    expect_continue=expect,
                    authority=host,
                )
                check_request_head(head, host)
                self._head = head
                events.append(head)
                if chunked:
                    self._chunked_body = True
                    self._chunk_budget.spent = 0
                    self._explained += request_head_size(head)
            elif isinstance(ev, h11.Data):
                events.append(Data(bytes(ev.data)))
                self._explained += len(ev.data)
                self._chunks += ev.chunk_start
            elif isinstance(ev, h11.EndOfMessage):
                events.append(EndOfMessage())  # h1 request trailers are dropped (Envoy default)
                self._explained += fields_size(_headers(ev.headers))
                self._chunked_body = False
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def _maybe_upgrade(self, events: list[ReceivedEvent]) -> None:
        """h11 pauses after a request that may switch protocols; a WebSocket one becomes a
        tunnel (its EndOfMessage dropped: the request lasts as long as the tunnel)."""
        head = self._head
        if (
            head is not None
            and self._conn.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
            and head.method == b"GET"
            and is_websocket_upgrade(head.headers)
            and events
            and isinstance(events[-1], EndOfMessage)
        ):
            head.upgrade = True
            events.pop()
            self.failed = True  # no more parsing on this connection

    def take_upgrade_bytes(self) -> bytes:
        return bytes(self._conn.trailing_data[0])

    def start_next(self) -> list[ReceivedEvent]:
        """Start the next request cycle and return the events of any pipelined request."""
        conn = self._conn
        events: list[ReceivedEvent] = []
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            try:
                self._skip_blank_lines()
                self._scan.restart(conn.trailing_data[0])
                self._drain_charged(events)
            except h11.RemoteProtocolError as exc:
                events.append(
                    ParseFailure(
                        ProtocolError(f"malformed request: {exc}", _DOWN, exc.error_status_hint)
                    )
                )
                self.failed = True
            except ProtocolError as exc:
                events.append(ParseFailure(exc))
                self.failed = True
        return events

    def send_head(self, head: ResponseHead, request_method: bytes, keep_alive: bool) -> None:
        headers = list(head.headers)
        bodyless = request_method == b"HEAD" or head.status in (204, 304) or head.status < 200
        if head.has_body and head.content_length is None and not bodyless:
            headers.append((b"transfer-encoding", b"chunked"))
        if not keep_alive:
            headers.append((b"connection", b"close"))
        if head.status < 200:
            self._out.append(
                self._conn.send(h11.InformationalResponse(status_code=head.status, headers=headers))
                or b""
            )
            return
        self._out.append(
            self._conn.send(
                h11.Response(
                    status_code=head.status,
                    headers=headers,
                    reason=head.reason or reason_phrase(head.status),
                )
            )
            or b""
        )

    def send_data(self, data: bytes) -> None:
        if data:
            self._out.append(self._conn.send(h11.Data(data=data)) or b"")

    def send_end(self, trailers: Headers) -> None:
        self._out.append(self._conn.send(h11.EndOfMessage(headers=trailers)) or b"")

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out = []
        return out


class H11ClientCodec:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_header_bytes)
        self._scan = _HeadScanner(_UP, limits.max_header_bytes)
        self._out: list[bytes] = []
        self.failed = False

    def receive(self, data: bytes) -> list[ReceivedEvent]:
        if self.failed:
            return []
        events: list[ReceivedEvent] = []
        try:
            if self._scan.active:
                self._scan.feed(data)
            self._conn.receive_data(data)
            self._drain(events)
        except h11.RemoteProtocolError as exc:
            events.append(ParseFailure(ProtocolError(f"malformed response: {exc}", _UP, 502)))
            self.failed = True
        except ProtocolError as exc:
            events.append(ParseFailure(exc))
            self.failed = True
        return events

    def receive_eof(self) -> list[ReceivedEvent]:
        if self.failed:
            return []
        events: list[ReceivedEvent] = []
        try:
            self._conn.receive_data(b"")
            self._drain(events)
        except h11.RemoteProtocolError:
            return []
        return [e for e in events if isinstance(e, EndOfMessage)]

    def _drain(self, events: list[ReceivedEvent]) -> None:
        while True:
            ev = self._conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.InformationalResponse | h11.Response):
                headers = _headers(ev.headers)
                if len(headers) > self._limits.max_response_headers:
                    raise ProtocolError("too many response headers", _UP, 502)
                check_field_syntax(headers, _UP)
                chunked, length = framing(headers, _UP)
                status = ev.status_code
                informational = status < 200
                has_body = (
                    not informational
                    and status not in (204, 304)
                    and self._method != b"HEAD"
                    and (chunked or length is None or length > 0)
                )
                keep = not any(k == b"connection" and b"close" in v.lower() for k, v in headers)
                events.append(
                    ResponseHead(
                        status=status,
                        headers=headers,
                        reason=ev.reason,
                        keep_alive=keep and (chunked or length is not None or not has_body),
                        has_body=has_body,
                        content_length=length,
                    )
                )
                if informational:
                    self._scan.restart(b"")
                    events.append(EndOfMessage())
            elif isinstance(ev, h11.Data):
                events.append(Data(bytes(ev.data)))
            elif isinstance(ev, h11.EndOfMessage):
                events.append(EndOfMessage(_headers(ev.headers)))
            elif isinstance(ev, h11.ConnectionClosed):
                return

    _method = b"GET"

    def take_upgrade_bytes(self) -> bytes:
        return bytes(self._conn.trailing_data[0])

    def start_next(self) -> list[ReceivedEvent]:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            if conn.trailing_data[0]:
                # Bytes of a response nobody asked for yet (a body after a HEAD's head, a
                # smuggled response): the next request must not get them as its answer.
                self.failed = True
                return []
            self._scan.restart(conn.trailing_data[0])
        return []

    def send_head(self, head: RequestHead) -> None:
        self._method = head.method
        headers = list(head.headers)
        if head.has_body and head.content_length is None:
            headers.append((b"transfer-encoding", b"chunked"))
        self._out.append(
            self._conn.send(h11.Request(method=head.method, target=head.target, headers=headers))
            or b""
        )

    def send_data(self, data: bytes) -> None:
        if data:
            self._out.append(self._conn.send(h11.Data(data=data)) or b"")

    def send_end(self, trailers: Headers) -> None:
        self._out.append(self._conn.send(h11.EndOfMessage(headers=trailers)) or b"")

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out = []
        return out
