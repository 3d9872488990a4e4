"""Downstream HTTP/1.1 connection: bytes ↔ server codec, one HttpStream at a time."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Final, cast

from meshproxy.codec.events import (
    Data,
    EndOfMessage,
    Headers,
    ParseFailure,
    ReceivedEvent,
    RequestHead,
    ResponseHead,
)
from meshproxy.codec.h1 import server_codec
from meshproxy.config.snapshot import ListenerKind, PortBinding, Snapshot
from meshproxy.errors import ProtocolError
from meshproxy.observe.accesslog import AccessLogs
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.deadlines import stream_idle_check_interval
from meshproxy.proxy.downstream import BindingLookup, ConnectionFacts, transport_addresses
from meshproxy.proxy.stream import HttpStream
from meshproxy.proxy.tls import PeerInfo

logger = logging.getLogger(__name__)

HIGH_WATER: Final = 64 * 1024
MAX_QUEUED_EVENTS: Final = 64  # pipelined requests waiting for the current response
DISCARD_LIMIT: Final = 64 * 1024  # request body read and dropped after an early response


class DownstreamHttp1:
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
        self.kind = kind
        self.inbound = kind.inbound
        self._bindings = BindingLookup(kind, listener_key, original_dst, binding)
        self.http2 = False
        self.local_port = local_port
        self.original_dst = original_dst
        self.access_log = access_log
        self.codec = server_codec(ctx.codec, ctx.limits)
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.stream: HttpStream | None = None
        self._queue: deque[ReceivedEvent] = deque()
        # Body bytes still accepted from a request whose response ended first (-1: none).
        self._discard_left = -1
        self._reading_paused = False
        self._closing = False
        self._draining = False  # close after the request in flight (a drain reached us)
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._cork = 0
        self._last_active = 0.0
        self._stream_active = 0.0  # bytes last moved for the request in flight (stream idle)
        self._stream_idle_timer: asyncio.TimerHandle | None = None
        self._tunnel: HttpStream | None = None  # a WebSocket upgrade: raw bytes go to it
        self._raw_out = False  # a 101 was sent: responses bytes are written as they are
        self._addresses: tuple[str, str] | None = None  # for access logs, read once

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=HIGH_WATER)
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
            False,
            self.peer,
        )
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.metrics.downstream_cx_active += 1
        ctx.metrics.downstream_cx_total += 1
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._stream_idle_timer is not None:  # the clock is read only when it is watched
            self._stream_active = self.loop.time()
        if self._tunnel is not None:
            self._tunnel.request_data(data)
            return
        events = self.codec.receive(data)
        queue = self._queue
        if queue:
            queue.extend(events)
            if len(queue) > MAX_QUEUED_EVENTS:
                self.pause_reading()
            return
        for i, ev in enumerate(events):
            stream = self.stream
            if stream is not None and (
                type(ev) is RequestHead or (stream.request_done and type(ev) is ParseFailure)
            ):
                # HTTP/1.1 pipelining: the next request waits for this response.
                queue.extend(events[i:])
                if len(queue) > MAX_QUEUED_EVENTS:
                    self.pause_reading()
                return
            self._dispatch(ev)
        if self.stream is None and self._header_timer is None and self.codec.head_pending:
            # Part of a head arrived and no request started: the slow-client clock runs.
            self._arm_header_timer()

    def eof_received(self) -> bool | None:
        tunnel = self._tunnel
        if tunnel is not None and not self._closing:
            tunnel.request_end([])  # half-close passes through the tunnel
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_timers()
        ctx = self.ctx
        ctx.connections.discard(self)
        ctx.metrics.downstream_cx_active -= 1
        stream = self.stream
        if stream is not None:
            stream.downstream_gone()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.stream is not None:
            self.stream.downstream_writable(False)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.stream is not None:
            self.stream.downstream_writable(True)

    # -- events ----------------------------------------------------------------------------
    def _dispatch(self, ev: ReceivedEvent) -> None:
        stream = self.stream
        if stream is None and self._discard_left >= 0:
            self._discarded(ev)
            return
        if isinstance(ev, Data):
            if stream is not None:
                stream.request_data(ev.data)
        elif isinstance(ev, RequestHead):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            stream = HttpStream(self, ev)
            if self._draining or ev.upgrade:
                stream.keep_alive = False
            self.stream = stream
            if self._stream_idle_timer is None:
                self._stream_active = self.loop.time()  # not kept while no timer watches
                self._arm_stream_idle()
            if ev.upgrade:
                self._tunnel = stream
                rest = self.codec.take_upgrade_bytes()
                stream.start()
                if rest and not stream.response_complete:
                    stream.request_data(rest)
                return
            stream.start()
        elif isinstance(ev, EndOfMessage):
            if stream is not None:
                stream.request_end(ev.trailers)
        elif isinstance(ev, ParseFailure):
            self._protocol_failure(ev.error)

    def _protocol_failure(self, error: Exception) -> None:
        status = error.status if isinstance(error, ProtocolError) else 400
        self.ctx.metrics.downstream_rejected(str(status))
        stream = self.stream
        if stream is None:
            self._reply_and_close(status, str(error).encode())
            return
        # Broken framing mid-request: nothing more of it may reach the upstream.
        stream.keep_alive = False
        if stream.task is not None:
            stream.task.cancel()
        if not stream.response_head_sent:
            self._reply_and_close(status, str(error).encode())
        else:
            self.abort()

    def _reply_and_close(self, status: int, body: bytes) -> None:
        self._write_local(status, body, b"GET", keep_alive=False)
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    # -- used by HttpStream ----------------------------------------------------------------
    def current_binding(self, snapshot: Snapshot) -> PortBinding | None:
        return self._bindings.get(snapshot)

    def send_interim(self, status: int) -> None:
        self.codec.send_head(ResponseHead(status, [], has_body=False), b"GET", True)
        self._flush()

    def send_response_head(self, head: ResponseHead, stream: HttpStream) -> None:
        if head.status == 101 and self._tunnel is stream:
            self._switch_protocols(head)
            return
        keep = stream.keep_alive and not self._draining
        stream.keep_alive = keep
        self.codec.send_head(head, stream.head.method, keep)
        if not self._cork:
            self._flush()

    def send_data(self, data: bytes) -> None:
        if self._raw_out:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)
                if self._stream_idle_timer is not None:
                    self._stream_active = self.loop.time()
            return
        self.codec.send_data(data)
        if not self._cork:
            self._flush()

    def send_end(self, trailers: Headers) -> None:
        if self._raw_out:
            return  # the tunnel's end: the connection closes when the stream finishes
        self.codec.send_end(trailers)
        if not self._cork:
            self._flush()

    def _switch_protocols(self, head: ResponseHead) -> None:
        """Write the 101 ourselves: after it the codec has no say over the bytes."""
        self._flush(force=True)
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for k, v in head.headers:
            parts += (k, b": ", v, b"\r\n")
        parts.append(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
        self._raw_out = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(parts))

    def send_local_reply(
        self, status: int, body: bytes, stream: HttpStream, headers: Headers | None = None
    ) -> None:
        self._write_local(status, body, stream.head.method, stream.keep_alive, headers)

    def _write_local(
        self,
        status: int,
        body: bytes,
        method: bytes,
        keep_alive: bool,
        extra: Headers | None = None,
    ) -> None:
        headers = [(b"content-length", b"%d" % len(body))]
        if extra:
            headers.extend(extra)
        elif body:
            headers.append((b"content-type", b"text/plain"))
        self.codec.send_head(
            ResponseHead(status, headers, has_body=bool(body), content_length=len(body)),
            method,
            keep_alive,
        )
        if body and method != b"HEAD":
            self.codec.send_data(body)
        self.codec.send_end([])
        self._flush()

    def cork(self) -> None:
        self._cork += 1

    def uncork(self) -> None:
        self._cork -= 1
        if self._cork == 0:
            self._flush()

    def _flush(self, force: bool = False) -> None:
        if self._cork and not force:
            return
        data = self.codec.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if self._stream_idle_timer is not None:
                self._stream_active = self.loop.time()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._queue:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def stream_finished(self, stream: HttpStream) -> None:
        if self.stream is not stream:
            return
        self.stream = None
        transport = self.transport
        if transport is None or self._closing or transport.is_closing():
            return
        if (
            not stream.keep_alive
            or self._draining
            or not (stream.request_done or self._discard_rest(stream))
        ):
            self._closing = True
            self._flush(force=True)  # the response may still be corked
            transport.close()
            return
        if not stream.request_done:
            return  # the rest of its body is read and dropped first (_dispatch)
        self._next_request()

    def _discard_rest(self, stream: HttpStream) -> bool:
        """The response ended before the request (an upstream that answers without reading
        the body: an error, nginx's `return`). Closing here would break a connection whose
        response announced keep-alive, under a client that may already be reusing it (a
        peer sidecar's pool), so a small remainder is read and dropped instead, with a
        deadline; a large or endless one still closes the connection."""
        length = stream.head.content_length
        if length is not None and length - stream.request_bytes > DISCARD_LIMIT:
            return False
        self._discard_left = DISCARD_LIMIT
        self._header_timer = self.loop.call_later(
            self.ctx.snapshot.settings.request_headers_timeout, self._discard_too_slow
        )
        return True

    def _discard_too_slow(self) -> None:
        self._header_timer = None
        self.abort()

    def _discarded(self, ev: ReceivedEvent) -> None:
        """A body event of a request whose response is already complete."""
        if isinstance(ev, Data):
            self._discard_left -= len(ev.data)
            if self._discard_left < 0:
                self.abort()
        elif isinstance(ev, EndOfMessage):
            self._discard_left = -1
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._next_request()
        else:
            self._dispatch(ev)

    def _next_request(self) -> None:
        """The exchange is over on both sides: go on with a pipelined or the next request."""
        events = self.codec.start_next()
        if events:
            self._queue.extend(events)
        queue = self._queue
        while queue and not self._closing:
            current = self._current_stream()
            if current is not None and (
                type(queue[0]) is RequestHead
                or (current.request_done and type(queue[0]) is ParseFailure)
            ):
                break
            self._dispatch(queue.popleft())
        if self._current_stream() is None and not self._closing:
            self._arm_idle()
            if self.codec.head_pending:
                self._arm_header_timer()
        self.resume_reading()

    def log_addresses(self) -> tuple[str, str]:
        addresses = self._addresses
        if addresses is None:
            addresses = self._addresses = transport_addresses(self.transport, self.original_dst)
        return addresses

    def _current_stream(self) -> HttpStream | None:
        """self.stream, read through a call: after `self.stream = None` mypy narrows the
        attribute to None for the rest of the function, and the compiled code then refused
        the stream a dispatch had just set (a TypeError that killed the upstream connection
        of every pipelined request's predecessor)."""
        return self.stream

    # -- timers ----------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        timeout = self.ctx.snapshot.settings.request_headers_timeout
        self._header_timer = self.loop.call_later(timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.stream is None and not self._closing:
            self.ctx.metrics.downstream_rejected("408")
            self._reply_and_close(408, b"request headers timeout")

    def _arm_idle(self) -> None:
        """Note activity; the one idle timer re-arms itself lazily instead of per request."""
        loop = self.loop
        self._last_active = loop.time()
        if self._idle_timer is None:
            timeout = self.ctx.snapshot.settings.idle_timeout
            self._idle_timer = loop.call_later(timeout, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self.transport is None or self._closing:
            return
        loop = self.loop
        timeout = self.ctx.snapshot.settings.idle_timeout
        left = self._last_active + timeout - loop.time()
        if self.stream is not None or left > 0:
            self._idle_timer = loop.call_later(
                max(left, 0.05) if self.stream is None else timeout, self._idle
            )
            return
        self._closing = True
        self.transport.close()

    def _cancel_timers(self) -> None:
        for t in (self._header_timer, self._idle_timer, self._stream_idle_timer):
            if t is not None:
                t.cancel()
        self._header_timer = self._idle_timer = self._stream_idle_timer = None

    def _arm_stream_idle(self) -> None:
        timeout = self.ctx.snapshot.settings.stream_idle_timeout
        if timeout > 0 and not self._closing:
            self._stream_idle_timer = self.loop.call_later(
                stream_idle_check_interval(timeout), self._expire_idle_stream
            )

    def _expire_idle_stream(self) -> None:
        """The request in flight moved no bytes either way for the stream idle timeout: 408
        before its response, else the connection is aborted (flag SI). The timer lapses
        between requests; the next one arms it."""
        self._stream_idle_timer = None
        stream = self.stream
        timeout = self.ctx.snapshot.settings.stream_idle_timeout
        if stream is None or self._closing or timeout <= 0:
            return
        if self.loop.time() - self._stream_active >= timeout:
            stream.stream_idle_expired()
        else:
            self._arm_stream_idle()

    def shed_buffered(self, min_bytes: int) -> int:
        """The overload action: abort this connection if a response waits in its write
        buffer with `min_bytes` or more the client does not read; 1 if it did."""
        transport, stream = self.transport, self.stream
        if transport is None or stream is None or transport.get_write_buffer_size() < min_bytes:
            return 0
        stream.downstream_gone("OM")
        self.abort()
        return 1

    def close_idle(self) -> None:
        """Draining: close now if no request is in flight, else after the current one."""
        self._draining = True
        stream = self.stream
        if stream is not None:
            stream.keep_alive = False  # its response (a local reply too) says Connection: close
        if self.stream is None and self.transport is not None:
            self._closing = True
            self.transport.close()
