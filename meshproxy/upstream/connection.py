"""One upstream HTTP/1.1 connection: an asyncio.Protocol driving a client codec."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, Protocol, cast

from meshproxy.codec.events import (
    Data,
    EndOfMessage,
    Headers,
    ParseFailure,
    RequestHead,
    ResponseHead,
)
from meshproxy.codec.h1 import ClientCodec
from meshproxy.errors import FailureKind, UpstreamError

if TYPE_CHECKING:
    from meshproxy.upstream.pool import Pool

logger = logging.getLogger(__name__)
MAX_INTERIM_RESPONSES: Final = 10


class ResponseSink(Protocol):
    """Where an upstream connection delivers the response of the request it carries."""

    def on_response_head(self, head: ResponseHead) -> None: ...
    def on_response_data(self, data: bytes) -> None: ...
    def on_response_end(self, trailers: Headers) -> None: ...
    def on_upstream_failure(self, error: UpstreamError) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
    def hold_writes(self) -> None: ...
    def release_writes(self) -> None: ...


def local_address_of(transport: asyncio.BaseTransport) -> str:
    """The socket's local ip:port (%UPSTREAM_LOCAL_ADDRESS%), "" when it has none."""
    name = transport.get_extra_info("sockname")
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) and len(name) >= 2 else ""


class UpstreamExchange(Protocol):
    """One request's use of an upstream connection (HTTP/1.1) or stream (HTTP/2)."""

    request_done: bool
    response_done: bool
    peer_principal: str  # the upstream's verified SPIFFE ID (ISTIO_MUTUAL), else ""
    local_address: str  # this proxy's end of the upstream connection, ip:port

    def start(self, head: RequestHead, sink: ResponseSink, grpc: bool = False) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def end_request(self, trailers: Headers) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...


class UpstreamHttp1Connection:
    """Carries one request at a time; reusable once both directions finished cleanly."""

    def __init__(self, codec: ClientCodec, pool: Pool) -> None:
        self.codec = codec
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.requests = 0
        self.closed = False
        self.response_started = False
        self.request_done = False
        self.response_done = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._paused_by_sink = False
        self._interim = False
        self._interim_count = 0
        self._upgrading = False  # the request asked for a WebSocket upgrade
        self.tunnel = False  # a 101 came: bytes both ways are the tunnel's
        self.peer_principal = ""  # set by the pool after a verified ISTIO_MUTUAL handshake
        self.local_address = ""

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=64 * 1024)
        self.local_address = local_address_of(transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            self._close()  # bytes with no request outstanding: the peer is broken
            return
        if self.tunnel:
            sink.on_response_data(data)
            return
        self.response_started = True
        # Everything this read produces goes downstream in one write (one syscall).
        sink.hold_writes()
        try:
            self._deliver(sink, data)
        finally:
            sink.release_writes()

    def _deliver(self, sink: ResponseSink, data: bytes) -> None:
        events = self.codec.receive(data)
        last = len(events) - 1
        for i, ev in enumerate(events):
            if isinstance(ev, Data):
                sink.on_response_data(ev.data)
            elif isinstance(ev, ResponseHead):
                if ev.status == 101:
                    if not self._upgrading:
                        # A switch nobody asked for: what follows is no HTTP response.
                        self._fail(FailureKind.PROTOCOL, "101 to a plain request", flag="UPE")
                        return
                    self._switch(sink, ev)
                    return
                if ev.status < 200:
                    # 1xx are not forwarded (100-continue is answered downstream by us), and
                    # a flood of them is a broken upstream, not a slow one.
                    self._interim = True
                    self._interim_count += 1
                    if self._interim_count > MAX_INTERIM_RESPONSES:
                        self._fail(FailureKind.PROTOCOL, "too many 1xx responses", flag="UPE")
                        return
                    continue
                self.keep_alive = ev.keep_alive
                sink.on_response_head(ev)
                if self.sink is not sink:
                    return  # the stream dropped this response (to retry): read no further
            elif isinstance(ev, EndOfMessage):
                if self._interim:
                    self._interim = False
                    continue
                if i < last:
                    # More than one response to one request (a body after a HEAD's head, a
                    # smuggled response): never reuse the connection, or a later request
                    # would get those bytes as its answer.
                    self.keep_alive = False
                if self._final_end(ev):
                    return
            elif isinstance(ev, ParseFailure):
                self._fail(FailureKind.PROTOCOL, str(ev.error), flag="UPE")
                return

    def _switch(self, sink: ResponseSink, head: ResponseHead) -> None:
        """The upstream accepted the upgrade: from here on this connection is a byte tunnel,
        never pooled again."""
        self.tunnel = True
        self.keep_alive = False
        sink.on_response_head(head)
        rest = self.codec.take_upgrade_bytes()
        if rest and self.sink is not None:
            self.sink.on_response_data(rest)

    def _final_end(self, ev: EndOfMessage) -> bool:
        sink = self.sink
        if sink is None:
            return True
        self.response_done = True
        self.sink = None
        # Back in the pool first, so a pipelined request the stream's end starts can reuse it.
        self._maybe_release()
        sink.on_response_end(ev.trailers)
        return True

    def eof_received(self) -> bool | None:
        if self.tunnel:
            self._tunnel_closed()
            return None
        for ev in self.codec.receive_eof():
            if isinstance(ev, EndOfMessage):
                self.keep_alive = False
                self._final_end(ev)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.tunnel:
            self._tunnel_closed()
            return
        if self.sink is not None:
            for ev in self.codec.receive_eof():
                if isinstance(ev, EndOfMessage):
                    self._final_end(ev)
        if self.sink is not None:
            reason = "connection termination" if exc is None else f"connection failure: {exc}"
            self._fail(FailureKind.RESET, reason, flag="UC")

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_writable(True)

    # -- used by the stream ----------------------------------------------------------------
    def start(self, head: RequestHead, sink: ResponseSink, grpc: bool = False) -> None:
        self.sink = sink
        self.requests += 1
        self.response_started = self.request_done = self.response_done = False
        self._interim_count = 0
        self.keep_alive = True
        self._upgrading = head.upgrade
        self.tunnel = False
        codec = self.codec
        codec.send_head(head)
        self._write(codec.data_to_send())

    def send_data(self, data: bytes) -> None:
        if self.tunnel:
            self._write(data)
            return
        codec = self.codec
        codec.send_data(data)
        self._write(codec.data_to_send())

    def end_request(self, trailers: Headers) -> None:
        if self.tunnel:
            # The client half-closed the tunnel: pass the FIN on, keep reading.
            transport = self.transport
            if transport is not None and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
            self.request_done = True
            return
        codec = self.codec
        codec.send_end(trailers)
        self._write(codec.data_to_send())
        self.request_done = True
        self._maybe_release()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused_by_sink:
            self._paused_by_sink = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused_by_sink:
            self._paused_by_sink = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection (the stream gave up on it); never reused."""
        self.sink = None
        self.keep_alive = False
        self._close(abort=True)

    # -- internals -------------------------------------------------------------------------
    def _tunnel_closed(self) -> None:
        sink = self.sink
        self.sink = None
        self.response_done = True
        if sink is not None:
            sink.on_response_end([])

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def _maybe_release(self) -> None:
        if not (self.request_done and self.response_done):
            return
        self.resume_reading()
        codec_events = self.codec.start_next()
        reusable = self.keep_alive and not codec_events and not self.codec.failed
        self.pool.release(self, reusable)

    def _fail(self, kind: FailureKind, message: str, flag: str) -> None:
        sink = self.sink
        self.sink = None
        self.keep_alive = False
        error = UpstreamError(
            kind,
            message,
            flag=flag,
            reused_connection=self.requests > 1,
            response_started=self.response_started,
        )
        self._close(abort=True)
        if sink is not None:
            sink.on_upstream_failure(error)

    def _close(self, abort: bool = False) -> None:
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
