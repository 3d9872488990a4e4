"""Downstream HTTP/2 connection: h2 frames ↔ many concurrent HttpStreams, with flow control.

Each HTTP/2 stream gets an `H2Channel`, which is what its HttpStream sees as "the
downstream" (the same interface an HTTP/1.1 connection offers), so routing, upstream
attempts, timeouts and metrics are shared with HTTP/1.1.

Backpressure per stream: request DATA is acknowledged (WINDOW_UPDATE) only once it went
onward, so a stream whose upstream is slow stops only its own sender; the connection window
is made larger than all stream windows together so a paused stream never stalls siblings.
Response data waits for the client's window in the channel, and past a high-water mark the
stream's upstream is paused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import h2.errors
import h2.events
import h2.exceptions
from h2.connection import H2Connection

from meshproxy.codec.events import Headers, ResponseHead
from meshproxy.codec.h2 import (
    FloodGuard,
    OutboundData,
    count_frames,
    goaway_frame,
    keep_open_after_goaway,
    new_connection,
    request_head,
    response_block,
    trailer_fields,
)
from meshproxy.config.snapshot import ListenerKind, PortBinding, Snapshot
from meshproxy.errors import ProtocolError
from meshproxy.observe.accesslog import AccessLogs
from meshproxy.observe.lograte import RateLimitedLog
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.deadlines import stream_idle_check_interval
from meshproxy.proxy.downstream import BindingLookup, ConnectionFacts, transport_addresses
from meshproxy.proxy.stream import HttpStream
from meshproxy.proxy.tls import PeerInfo

logger = logging.getLogger(__name__)
remote_caused = RateLimitedLog(logger)  # lines a client can cause: a few per interval

STREAM_HIGH_WATER = 256 * 1024  # response bytes waiting for the client's window, per stream
STREAM_LOW_WATER = 64 * 1024
MAX_WRITE_BUFFER = 4 * 1024 * 1024  # bytes the client has not read: past this it is flooding us
MAX_QUEUED_FRAMES = 10_000  # frames written while the client reads nothing (Envoy's
# max_outbound_frames): resets and acks are small, so bytes alone would allow ~300,000
SOCKET_HIGH_WATER = 256 * 1024


class H2Channel:
    """One HTTP/2 stream as the Downstream of its HttpStream."""

    def __init__(self, conn: DownstreamHttp2, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.loop = conn.loop
        self.facts = conn.facts  # what its HttpStream reads of the connection
        self.stream: HttpStream | None = None
        self.request_trailers: Headers = []
        self.out = OutboundData(STREAM_HIGH_WATER, STREAM_LOW_WATER)
        self.reset = False  # RST_STREAM sent or received: nothing more may be sent
        self._reading_paused = False
        self._unacked = 0
        self._held_head: Headers | None = None
        self.last_activity = conn.loop.time()  # bytes moved for this stream (stream idle)

    def log_addresses(self) -> tuple[str, str]:
        return self.conn.log_addresses()

    def _headers(self, block: Headers, end_stream: bool = False) -> None:
        """Send a header block; a stream the client closed meanwhile just ends here."""
        try:
            self.conn.h2.send_headers(self.stream_id, block, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.reset = True
            self.out.discard()

    @property
    def finished(self) -> bool:
        """END_STREAM sent."""
        return self.out.ended

    # -- Downstream --------------------------------------------------------------------
    def current_binding(self, snapshot: Snapshot) -> PortBinding | None:
        return self.conn.bindings.get(snapshot)

    def send_interim(self, status: int) -> None:
        if not self.reset:
            self._headers([(b":status", b"%d" % status)])
            self.conn.flush()

    def send_response_head(self, head: ResponseHead, stream: HttpStream) -> None:
        if self.reset:
            return
        if head.status == 101:
            # RFC 8441: an accepted extended CONNECT is a 200; the stream is the tunnel.
            block = response_block(head)
            block[0] = (b":status", b"200")
            block = [h for h in block if h[0] != b"sec-websocket-accept"]
            self._headers(block)
            self.conn.flush()
            return
        if not head.has_body:
            # Held for the end: a bodiless response must be one HEADERS frame with
            # END_STREAM (gRPC's trailers-only form, which clients insist on).
            self._held_head = response_block(head)
            return
        self._headers(response_block(head))
        self.conn.flush()

    def _release_head(self, end_stream: bool) -> None:
        block, self._held_head = self._held_head, None
        if block is not None:
            self._headers(block, end_stream)
            if end_stream:
                self.out.ended = True

    def send_data(self, data: bytes) -> None:
        if self.reset or not data:
            return
        self.last_activity = self.loop.time()
        if self._held_head is not None:
            self._release_head(False)
        self.out.add(data)
        self.push()

    def send_end(self, trailers: Headers) -> None:
        if self.reset:
            return
        if self._held_head is not None:
            self._release_head(not trailers and not self.out.pending)
        self.out.end = trailers
        self.push()

    def send_local_reply(
        self, status: int, body: bytes, stream: HttpStream, headers: Headers | None = None
    ) -> None:
        if self.reset:
            return
        fields: Headers = [(b":status", b"%d" % status)]
        if headers:
            fields.extend(headers)
        else:
            fields.append((b"content-length", b"%d" % len(body)))
            if body:
                fields.append((b"content-type", b"text/plain"))
        if body and stream.head.method != b"HEAD":
            self._headers(fields)
            self.send_data(body)
            self.send_end([])
        else:
            self._headers(fields, end_stream=True)
            self.out.ended = True
            self.conn.flush()

    def cork(self) -> None:
        self.conn.cork()

    def uncork(self) -> None:
        self.conn.uncork()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._unacked:
            unacked, self._unacked = self._unacked, 0
            self.conn.acknowledge(unacked, self.stream_id)

    def abort(self) -> None:
        """The response cannot be completed: the client must see a reset, not an end."""
        if not self.reset and not self.finished:
            self.reset = True
            self.conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.out.discard()

    def stream_finished(self, stream: HttpStream) -> None:
        self.conn.stream_finished(self)

    def idle_expired(self) -> None:
        """Nothing moved for the stream idle timeout: the exchange answers 408 or resets the
        stream (HttpStream.stream_idle_expired); a finished exchange whose data the client
        never took is reset here."""
        stream = self.stream
        if stream is not None:
            stream.stream_idle_expired()
            return
        self.abort()
        self.conn.forget(self)

    def shed(self) -> None:
        """The overload action: reset this stream and drop what it holds for the client."""
        self.abort()
        self.conn.channels.pop(self.stream_id, None)
        stream = self.stream
        if stream is not None:
            stream.downstream_gone("OM")

    # -- used by the connection --------------------------------------------------------
    def request_data(self, data: bytes, flow_controlled: int) -> None:
        self.last_activity = self.loop.time()
        stream = self.stream
        if stream is not None and not stream.request_done:
            stream.request_data(data)
        if not flow_controlled:
            return
        if self._reading_paused:
            self._unacked += flow_controlled
        else:
            self.conn.acknowledge(flow_controlled, self.stream_id)

    @property
    def idle(self) -> bool:
        """Nothing left to do for this stream: the exchange ended and all was sent."""
        return self.stream is None and (self.reset or self.finished or not self.out.pending)

    def push(self) -> None:
        """Send what the client's flow-control window allows; end the stream when all is out."""
        conn = self.conn
        try:
            sent = self.out.push(conn.h2, self.stream_id)
            if sent:
                conn.flood.data_frames_sent += sent
                self.last_activity = self.loop.time()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The client reset or closed the stream meanwhile; what is left has no reader.
            self.reset = True
            self.out.discard()
        stream = self.stream
        if stream is not None:
            writable = self.out.backpressure()
            if writable is False or (writable and not conn.write_paused):
                stream.downstream_writable(writable)
        conn.flush()
        if self.stream is None and self.idle:
            conn.forget(self)


class DownstreamHttp2(asyncio.Protocol):
    """A client's HTTP/2 connection (prior knowledge h2c, or `h2` by ALPN)."""

    def __init__(
        self,
        ctx: ProxyContext,
        kind: ListenerKind,
        binding: PortBinding | None,
        listener_key: tuple[str, int],
        local_port: int,
        original_dst: tuple[str, int] | None = None,
        access_log: AccessLogs | None = None,
        *,
        peer: PeerInfo | None = None,
    ) -> None:
        self.ctx = ctx
        self.peer = peer  # the mTLS client (None: plaintext)
        self.inbound = kind.inbound
        self.bindings = BindingLookup(kind, listener_key, original_dst, binding)
        self.local_port = local_port
        self.original_dst = original_dst
        self.access_log = access_log
        self.h2: H2Connection = new_connection(client_side=False, enable_connect=True)
        self.transport: asyncio.Transport | None = None
        self._addresses: tuple[str, str] | None = None  # for access logs, read once
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.peer_ip = ""
        self.channels: dict[int, H2Channel] = {}
        self.flood = FloodGuard()
        self.frames_while_paused = 0  # frames written since the socket buffer filled
        self.write_paused = False
        self._cork = 0
        self._closing = False
        self._goaway_sent = False
        self._flush_scheduled = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_active = 0.0
        self._stream_idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def log_addresses(self) -> tuple[str, str]:
        addresses = self._addresses
        if addresses is None:
            addresses = self._addresses = transport_addresses(self.transport, self.original_dst)
        return addresses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=SOCKET_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else ""
        self.facts = ConnectionFacts(
            self.ctx,
            self.loop,
            self.inbound,
            self.local_port,
            self.original_dst,
            self.peer_ip,
            self.access_log,
            True,
            self.peer,
        )
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.metrics.downstream_cx_active += 1
        ctx.metrics.downstream_cx_total += 1
        self.flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._connection_error(exc)
            return
        self._cork += 1
        try:
            for ev in events:
                self._handle(ev)
                if self._closing:
                    return
        finally:
            self._cork -= 1
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for timer in (self._idle_timer, self._stream_idle_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._stream_idle_timer = None
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.metrics.downstream_cx_active -= 1
        channels = list(self.channels.values())
        self.channels.clear()
        for ch in channels:
            ch.reset = True
            if ch.stream is not None:
                ch.stream.downstream_gone()

    def pause_writing(self) -> None:
        self._socket_writable(False)

    def resume_writing(self) -> None:
        self._socket_writable(True)

    def _socket_writable(self, writable: bool) -> None:
        """The client's socket buffer filled or drained: every stream's upstream follows."""
        self.write_paused = not writable
        self.frames_while_paused = 0
        for ch in list(self.channels.values()):
            if ch.stream is not None:
                ch.stream.downstream_writable(writable)

    # -- frames ----------------------------------------------------------------------------
    def _handle(self, ev: h2.events.Event) -> None:
        t = type(ev)
        if t is h2.events.DataReceived:
            ev = cast(h2.events.DataReceived, ev)
            sid = ev.stream_id
            data = ev.data
            flooded = self.flood.note_data(len(data), ev.stream_ended is not None)
            if flooded:
                self._flooded(flooded)
                return
            ch = self.channels.get(sid)
            if ch is None:
                if ev.flow_controlled_length:
                    self.acknowledge(ev.flow_controlled_length, sid)
                return
            ch.request_data(data, ev.flow_controlled_length)
        elif t is h2.events.RequestReceived:
            self._new_stream(cast(h2.events.RequestReceived, ev))
        elif t is h2.events.StreamEnded:
            ch = self.channels.get(cast(int, ev.stream_id))  # type: ignore[attr-defined]
            if ch is not None and ch.stream is not None:
                ch.stream.request_end(ch.request_trailers)
        elif t is h2.events.TrailersReceived:
            ev = cast(h2.events.TrailersReceived, ev)
            ch = self.channels.get(ev.stream_id)
            if ch is not None:
                ch.request_trailers = trailer_fields(ev.headers)
        elif t is h2.events.WindowUpdated:
            flooded = self.flood.note_window_update()
            if flooded:
                self._flooded(flooded)
                return
            sid = cast(int, ev.stream_id)  # type: ignore[attr-defined]
            if sid:
                ch = self.channels.get(sid)
                if ch is not None:
                    ch.push()
            else:
                for ch in list(self.channels.values()):
                    ch.push()
        elif t is h2.events.StreamReset:
            self._stream_reset(cast(int, ev.stream_id))  # type: ignore[attr-defined]
        elif t is h2.events.PriorityUpdated:
            flooded = self.flood.note_priority()
            if flooded:
                self._flooded(flooded)
        elif t is h2.events.PingReceived:
            flooded = self.flood.note_ping()
            if flooded:
                self._flooded(flooded)
        elif t is h2.events.RemoteSettingsChanged:
            flooded = self.flood.note_settings()
            if flooded:
                self._flooded(flooded)
                return
            changed = cast(h2.events.RemoteSettingsChanged, ev).changed_settings
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed:
                for ch in list(self.channels.values()):
                    ch.push()
        elif t is h2.events.ConnectionTerminated:
            self._goaway_sent = True  # the client is done: finish what is open, then close
            keep_open_after_goaway(self.h2)
            if not self.channels:
                self._close()

    def _new_stream(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        self.flood.note_stream()
        self._last_active = self.loop.time()
        if self._goaway_sent or self.ctx.draining:
            self.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = request_head(ev.headers, sid, ev.stream_ended is not None)
        except ProtocolError as exc:
            self.ctx.metrics.downstream_rejected(str(exc.status))
            if exc.status == 431:
                try:
                    self.h2.send_headers(sid, [(b":status", b"431")], end_stream=True)
                except h2.exceptions.ProtocolError:
                    pass
            else:
                self.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        ch = H2Channel(self, sid)
        self.channels[sid] = ch
        if self._stream_idle_timer is None:
            self._arm_stream_idle()
        stream = HttpStream(ch, head)
        ch.stream = stream
        stream.start()

    def _stream_reset(self, sid: int) -> None:
        ch = self.channels.pop(sid, None)
        if ch is None:
            return
        ch.reset = True
        stream = ch.stream
        if stream is not None:
            flooded = self.flood.note_premature_reset()
            stream.downstream_gone()
            if flooded:
                self._flooded(flooded)

    # -- used by channels ------------------------------------------------------------------
    def acknowledge(self, size: int, stream_id: int) -> None:
        # h2 gives the connection window back even when the stream is already closed.
        self.h2.acknowledge_received_data(size, stream_id)
        self.flush()

    def reset_stream(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def stream_finished(self, ch: H2Channel) -> None:
        ch.stream = None
        self._last_active = self.loop.time()
        if ch.idle:
            self.forget(ch)

    def forget(self, ch: H2Channel) -> None:
        if self.channels.get(ch.stream_id) is ch:
            del self.channels[ch.stream_id]
        if self._goaway_sent and not self.channels:
            self._close()

    def cork(self) -> None:
        self._cork += 1

    def uncork(self) -> None:
        self._cork -= 1
        if self._cork == 0:
            self.flush()

    def flush(self) -> None:
        """Write what h2 queued, once per event-loop pass: responses of many streams (each
        arriving in its own upstream read) leave in one write, not one syscall each."""
        if self._cork or self._flush_scheduled:
            return
        self._flush_scheduled = True
        self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None:
            return
        data = self.h2.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
            if self.write_paused:
                # The client makes us write (PING/SETTINGS acks, resets, 404s) and never reads.
                self.frames_while_paused += count_frames(data)
                if (
                    self.frames_while_paused > MAX_QUEUED_FRAMES
                    or transport.get_write_buffer_size() > MAX_WRITE_BUFFER
                ):
                    self._flooded("outbound_flood")

    # -- ending ----------------------------------------------------------------------------
    def _connection_error(self, exc: h2.exceptions.ProtocolError) -> None:
        self.ctx.metrics.downstream_rejected("h2_protocol_error")
        code = getattr(exc, "error_code", None) or h2.errors.ErrorCodes.PROTOCOL_ERROR
        if isinstance(exc, h2.exceptions.DenialOfServiceError):
            self.ctx.metrics.h2_flood("header_flood")
        elif "continuation frames" in str(exc).lower():
            # h2's frame buffer refuses a header block in more than 64 CONTINUATION frames
            # (CVE-2024-27316's class): a flood, counted as one (catalog D03).
            self.ctx.metrics.h2_flood("continuation_flood")
        try:
            self.h2.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self._cork = 0
        self.flush_now()
        self._close()

    def _flooded(self, kind: str) -> None:
        remote_caused.warning(kind, "closing HTTP/2 connection from %s: %s", self.peer_ip, kind)
        self.ctx.metrics.h2_flood(kind)
        try:
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            data = self.h2.data_to_send()
            if self.transport is not None and data and not self.write_paused:
                self.transport.write(data)
        except h2.exceptions.ProtocolError:
            pass
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self.transport is not None and not self._closing:
            self.flush_now()
            self._closing = True
            self.transport.close()

    def shed_buffered(self, min_bytes: int) -> int:
        """Reset the streams holding `min_bytes` or more for a client that does not take
        them (Envoy's reset_high_memory_stream overload action); how many."""
        heavy = [ch for ch in self.channels.values() if ch.out.size >= min_bytes]
        for ch in heavy:
            ch.shed()
        if heavy:
            self.flush()
        return len(heavy)

    def close_idle(self) -> None:
        """Draining: GOAWAY now (streams in flight finish), close once none is left."""
        if self._closing or self.transport is None:
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            # Written around h2, which would otherwise refuse to finish the open streams.
            self.flush_now()
            self.transport.write(goaway_frame(self.h2.highest_inbound_stream_id))
        if not self.channels:
            self._close()

    def _arm_stream_idle(self) -> None:
        timeout = self.ctx.snapshot.settings.stream_idle_timeout
        if timeout > 0 and not self._closing:
            self._stream_idle_timer = self.loop.call_later(
                stream_idle_check_interval(timeout), self._expire_idle_streams
            )

    def _expire_idle_streams(self) -> None:
        """One timer per connection, not per stream: streams silent for the stream idle
        timeout (checked every quarter of it) are answered 408 or reset."""
        self._stream_idle_timer = None
        timeout = self.ctx.snapshot.settings.stream_idle_timeout
        if self._closing or timeout <= 0 or not self.channels:
            return
        deadline = self.loop.time() - timeout
        expired = [ch for ch in self.channels.values() if ch.last_activity <= deadline]
        for ch in expired:
            ch.idle_expired()
        if expired:
            self.flush()
        if self.channels:
            self._arm_stream_idle()

    def _arm_idle(self) -> None:
        self._last_active = self.loop.time()
        timeout = self.ctx.snapshot.settings.idle_timeout
        self._idle_timer = self.loop.call_later(timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self._closing or self.transport is None:
            return
        timeout = self.ctx.snapshot.settings.idle_timeout
        left = self._last_active + timeout - self.loop.time()
        if self.channels or left > 0:
            self._idle_timer = self.loop.call_later(max(left, 0.05), self._idle)
            return
        self.close_idle()
