"""One upstream HTTP/2 connection carrying many requests at once, each an Http2Exchange."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from meshproxy.codec.events import Headers, RequestHead
from meshproxy.codec.h2 import (
    FloodGuard,
    OutboundData,
    keep_open_after_goaway,
    new_connection,
    request_block,
    response_head,
    trailer_fields,
)
from meshproxy.errors import FailureKind, ProtocolError, UpstreamError
from meshproxy.upstream.connection import (
    MAX_INTERIM_RESPONSES,
    ResponseSink,
    local_address_of,
)

if TYPE_CHECKING:
    from meshproxy.upstream.h2pool import Http2Pool

logger = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024  # request bytes waiting for the upstream's window, per stream
LOW_WATER = 64 * 1024
MAX_STREAMS_PER_CONNECTION = 1000  # until the server's SETTINGS say otherwise
LAST_USABLE_STREAM_ID = 2**31 - 1000  # then a new connection takes over


class Http2Exchange:
    """One request/response on a shared HTTP/2 connection (an UpstreamExchange)."""

    def __init__(self, conn: UpstreamHttp2Connection) -> None:
        self.conn = conn
        self.peer_principal = conn.peer_principal
        self.local_address = conn.local_address
        self.stream_id = 0
        self.sink: ResponseSink | None = None
        self.request_done = False
        self.response_done = False
        self.response_started = False
        self.out = OutboundData(HIGH_WATER, LOW_WATER)
        self._reading_paused = False
        self._unacked = 0
        self._trailers: Headers = []
        self._interim = 0
        self.closed = False  # reset, failed or both directions ended

    # -- UpstreamExchange ------------------------------------------------------------------
    def start(self, head: RequestHead, sink: ResponseSink, grpc: bool = False) -> None:
        self.sink = sink
        end = not head.has_body
        if not self.conn.start_stream(self, request_block(head, b"http", grpc), end):
            return
        if end:
            self.request_done = True

    def send_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.out.add(data)
        self.push()

    def end_request(self, trailers: Headers) -> None:
        if self.closed or self.request_done:
            return
        self.out.end = trailers
        self.push()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._unacked:
            unacked, self._unacked = self._unacked, 0
            self.conn.acknowledge(unacked, self.stream_id)

    def abort(self) -> None:
        """The stream gave up on this request: cancel it upstream; the connection stays."""
        self.sink = None
        if not self.closed:
            self.closed = True
            self.conn.cancel(self)

    # -- flow control ----------------------------------------------------------------------
    def push(self) -> None:
        conn = self.conn
        out = self.out
        try:
            out.push(conn.h2, self.stream_id)
            if out.ended:
                self.request_done = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            out.discard()
            self.request_done = True  # the server closed its side; the response decides
        sink = self.sink
        if sink is not None:
            writable = out.backpressure()
            if writable is False or (writable and not conn.write_paused):
                sink.on_upstream_writable(writable)
        conn.flush()

    # -- from the connection -------------------------------------------------------------
    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        try:
            head = response_head(headers, self.stream_id, end_stream)
        except (ProtocolError, ValueError) as exc:
            self.fail(FailureKind.PROTOCOL, str(exc), "UPE")
            return
        self.response_started = True
        sink.on_response_head(head)

    def on_interim(self) -> None:
        self._interim += 1
        if self._interim > MAX_INTERIM_RESPONSES:
            self.fail(FailureKind.PROTOCOL, "too many 1xx responses", "UPE")

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        sink = self.sink
        if sink is not None and data:
            sink.on_response_data(data)
        if flow_controlled:
            if self._reading_paused:
                self._unacked += flow_controlled
            else:
                self.conn.acknowledge(flow_controlled, self.stream_id)

    def on_trailers(self, headers: Headers) -> None:
        self._trailers = trailer_fields(headers)

    def on_end(self) -> None:
        self.response_done = True
        sink = self.sink
        self.sink = None
        if self.request_done:
            self.closed = True
        self.conn.exchange_done(self)
        if sink is not None:
            sink.on_response_end(self._trailers)

    def fail(
        self, kind: FailureKind, message: str, flag: str, *, unprocessed: bool = False
    ) -> None:
        sink = self.sink
        self.sink = None
        if not self.closed:
            self.closed = True
            if kind is FailureKind.PROTOCOL:
                self.conn.cancel(self)
        self.conn.exchange_done(self)
        if sink is not None:
            sink.on_upstream_failure(
                UpstreamError(
                    kind,
                    message,
                    flag=flag,
                    reused_connection=self.conn.streams_started > 1,
                    response_started=self.response_started,
                    unprocessed=unprocessed,
                )
            )


class UpstreamHttp2Connection(asyncio.Protocol):
    """Multiplexes exchanges; full when the server's MAX_CONCURRENT_STREAMS is reached."""

    def __init__(self, pool: Http2Pool) -> None:
        self.pool = pool
        self.h2 = new_connection(client_side=True)
        self.transport: asyncio.Transport | None = None
        self.exchanges: dict[int, Http2Exchange] = {}
        self.reserved = 0  # exchanges handed out, not started yet
        self.streams_started = 0
        self.closed = False
        self.goaway = False  # no new streams on this connection
        self.write_paused = False
        self.idle_since = time.monotonic()
        self.peer_principal = ""  # set by the pool after a verified ISTIO_MUTUAL handshake
        self.local_address = ""
        self._flood = FloodGuard()
        self._cork = 0
        self._flush_scheduled = False
        # Set by the server's preface SETTINGS: only then is its stream limit known (a server
        # allowing fewer streams than we assumed would refuse or drop the excess).
        self.ready: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    # -- capacity --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        if self.closed or self.goaway or not self.ready.done():
            return 0
        limit = min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS_PER_CONNECTION)
        return limit - len(self.exchanges) - self.reserved

    def new_exchange(self) -> Http2Exchange:
        self.reserved += 1
        return Http2Exchange(self)

    def start_stream(self, ex: Http2Exchange, block: Headers, end_stream: bool) -> bool:
        self.reserved -= 1
        if self.closed or self.goaway:
            ex.fail(FailureKind.RESET, "connection closing", "UC", unprocessed=True)
            return False
        h2c = self.h2
        sid = h2c.get_next_available_stream_id()
        ex.stream_id = sid
        self.exchanges[sid] = ex
        self.streams_started += 1
        h2c.send_headers(sid, block, end_stream=end_stream)
        if sid >= LAST_USABLE_STREAM_ID:
            self.goaway = True
        self.flush()
        return True

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self.local_address = local_address_of(transport)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail_all(FailureKind.PROTOCOL, f"protocol error: {exc}", "UPE")
            self._close()
            return
        held: list[ResponseSink] = []
        self._cork += 1
        try:
            for ev in events:
                sid = getattr(ev, "stream_id", 0)
                ex = self.exchanges.get(sid) if sid else None
                if ex is not None and ex.sink is not None and ex.sink not in held:
                    # Everything this read produces for a downstream goes in one write.
                    ex.sink.hold_writes()
                    held.append(ex.sink)
                self._handle(ev, ex)
        finally:
            self._cork -= 1
            for sink in held:
                sink.release_writes()
        self.flush()

    def _handle(self, ev: h2.events.Event, ex: Http2Exchange | None) -> None:
        t = type(ev)
        if t is h2.events.DataReceived:
            ev = cast(h2.events.DataReceived, ev)
            size = ev.flow_controlled_length
            if ex is not None:
                ex.on_data(ev.data, size)
            elif size:
                self.acknowledge(size, ev.stream_id)
        elif t is h2.events.ResponseReceived:
            if ex is not None:
                ev = cast(h2.events.ResponseReceived, ev)
                ex.on_headers(ev.headers, ev.stream_ended is not None)
        elif t is h2.events.StreamEnded:
            if ex is not None:
                ex.on_end()
        elif t is h2.events.TrailersReceived:
            if ex is not None:
                ex.on_trailers(cast(h2.events.TrailersReceived, ev).headers)
        elif t is h2.events.InformationalResponseReceived:
            if ex is not None:
                ex.on_interim()
        elif t is h2.events.StreamReset:
            if ex is not None:
                code = cast(h2.events.StreamReset, ev).error_code
                refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                ex.closed = True
                ex.fail(
                    FailureKind.RESET,
                    "remote refused stream reset" if refused else f"remote reset: {code!r}",
                    "UR",
                    unprocessed=refused,
                )
        elif t is h2.events.WindowUpdated:
            sid = cast(int, ev.stream_id)  # type: ignore[attr-defined]
            if ex is not None:
                ex.push()
            elif not sid:
                for other in list(self.exchanges.values()):
                    other.push()
        elif t is h2.events.RemoteSettingsChanged:
            changed = cast(h2.events.RemoteSettingsChanged, ev).changed_settings
            if not self.ready.done():
                self.ready.set_result(None)
            if self._flood.note_settings():
                self._abuse("settings flood")
            elif h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                for other in list(self.exchanges.values()):
                    other.push()
        elif t is h2.events.PingReceived:
            if self._flood.note_ping():
                self._abuse("ping flood")
        elif t is h2.events.ConnectionTerminated:
            self._goaway(cast(h2.events.ConnectionTerminated, ev))

    def _goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        """Streams above last_stream_id were never processed: they may go elsewhere."""
        self.goaway = True
        keep_open_after_goaway(self.h2)  # streams up to last_stream_id may still finish
        last = ev.last_stream_id if ev.last_stream_id is not None else 0
        for sid, ex in list(self.exchanges.items()):
            if sid > last:
                ex.closed = True
                ex.fail(FailureKind.RESET, "upstream GOAWAY", "UC", unprocessed=True)
        if not self.exchanges:
            self._close()

    def _abuse(self, what: str) -> None:
        logger.warning("upstream %s:%s: %s, closing", self.pool.address, self.pool.port, what)
        self._fail_all(FailureKind.PROTOCOL, what, "UPE")
        self._close(abort=True)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(
                UpstreamError(
                    FailureKind.RESET, "closed before SETTINGS", flag="UC", request_bytes_sent=False
                )
            )
            self.ready.exception()
        self.pool.forget(self)
        reason = "connection termination" if exc is None else f"connection failure: {exc}"
        self._fail_all(FailureKind.RESET, reason, "UC")

    def pause_writing(self) -> None:
        self._socket_writable(False)

    def resume_writing(self) -> None:
        self._socket_writable(True)

    def _socket_writable(self, writable: bool) -> None:
        """The server's socket buffer filled or drained: every exchange's downstream follows."""
        self.write_paused = not writable
        for ex in list(self.exchanges.values()):
            if ex.sink is not None:
                ex.sink.on_upstream_writable(writable)

    # -- used by exchanges -----------------------------------------------------------------
    def acknowledge(self, size: int, stream_id: int) -> None:
        if not self.closed:
            self.h2.acknowledge_received_data(size, stream_id)
            self.flush()

    def cancel(self, ex: Http2Exchange) -> None:
        if not self.closed and ex.stream_id:
            try:
                self.h2.reset_stream(ex.stream_id, h2.errors.ErrorCodes.CANCEL)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self.flush()
        self.exchange_done(ex)

    def exchange_done(self, ex: Http2Exchange) -> None:
        if self.exchanges.get(ex.stream_id) is ex and (ex.closed or ex.response_done):
            del self.exchanges[ex.stream_id]
            if not self.exchanges:
                self.idle_since = time.monotonic()
                if self.goaway or self.pool.closed:
                    self._close()

    def flush(self) -> None:
        """Write what h2 queued once per event-loop pass (many streams' frames, one write)."""
        if self._cork or self._flush_scheduled:
            return
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)

    # -- ending ----------------------------------------------------------------------------
    def _fail_all(self, kind: FailureKind, message: str, flag: str) -> None:
        exchanges = list(self.exchanges.values())
        self.exchanges.clear()
        for ex in exchanges:
            ex.closed = True
            ex.fail(kind, message, flag)

    def close_gracefully(self) -> None:
        """No new streams; close once the open ones are done."""
        self.goaway = True
        if not self.exchanges and not self.reserved:
            self._close()

    def _close(self, abort: bool = False) -> None:
        if self.closed and (self.transport is None or self.transport.is_closing()):
            return
        self.closed = True
        self.goaway = True
        transport = self.transport
        if transport is not None:
            if not abort:
                try:
                    self.h2.close_connection()  # data_to_send() has all that was queued
                    data = self.h2.data_to_send()
                    if data:
                        transport.write(data)
                except h2.exceptions.ProtocolError:
                    pass
                transport.close()
            else:
                transport.abort()
