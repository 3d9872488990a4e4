"""Opaque L4 relay between two transports: backpressure both ways and half-close."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from meshproxy.errors import UpstreamError
from meshproxy.observe.accesslog import AccessLogs
from meshproxy.observe.lograte import RateLimitedLog
from meshproxy.observe.metric_shape import Extra, tag_values
from meshproxy.observe.metrics import TcpSeries
from meshproxy.observe.recorder import ConnRecord, StreamRecord
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.downstream import transport_addresses
from meshproxy.proxy.peer_exchange import (
    PEER_EXCHANGE_ALPN,
    ExchangeError,
    FrameReader,
    frame,
)
from meshproxy.upstream.cluster import Cluster, bind_source_for
from meshproxy.upstream.connection import local_address_of
from meshproxy.upstream.hash_lb import hash64
from meshproxy.upstream.pool import open_connection

logger = logging.getLogger(__name__)
remote_caused = RateLimitedLog(logger)  # lines a client can cause: a few per interval
HIGH_WATER = 64 * 1024
EXCHANGE_WAIT = 1.0  # how long a connection's series waits for the peer's exchange frame


def _alpn(transport: asyncio.BaseTransport) -> str | None:
    sslobj = transport.get_extra_info("ssl_object")
    return sslobj.selected_alpn_protocol() if sslobj is not None else None


def _half_close(transport: asyncio.Transport) -> None:
    """Pass an end-of-stream on: a half-close where the transport has one (plain TCP); TLS
    here has none (Python's TLS transports cannot send close_notify and keep reading), so the
    other side is closed after what was written is flushed. Leaving it open instead kept
    every mTLS connection whose client closed first, on both sidecars, for good."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, relay: TcpRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.relay.from_upstream(data)

    def eof_received(self) -> bool:
        self.relay.upstream_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.relay.downstream_pause(True)

    def resume_writing(self) -> None:
        self.relay.downstream_pause(False)


class TcpRelay(asyncio.Protocol):
    """The downstream protocol of an L4 connection; owns its upstream side."""

    def __init__(
        self,
        ctx: ProxyContext,
        cluster: Cluster | None,
        record: ConnRecord,
        original_dst: tuple[str, int] | None,
        access_log: AccessLogs | None = None,
        peer_exchange: bool = False,
    ) -> None:
        """`peer_exchange`: the downstream negotiated Istio's TCP metadata exchange."""
        self.ctx = ctx
        self.access_log = access_log
        self._started = time.monotonic()
        self.cluster = cluster
        self.record = record
        self.original_dst = original_dst
        self.transport: asyncio.Transport | None = None
        self.upstream: _UpstreamSide | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._closed = False
        self._unreported_sent = 0
        self._unreported_received = 0
        self._connect_task: asyncio.Task[None] | None = None
        self._down_eof = False
        self._up_eof = False
        self._holds_slot = False  # counted in the cluster's connections (maxConnections)
        self._series: TcpSeries | None = None
        self._report_timer: asyncio.TimerHandle | None = None
        self._report_every = 15.0
        # Istio's TCP metadata exchange (proxy/peer_exchange.py), with the downstream (an
        # inbound mesh connection) or the upstream (an outbound ISTIO_MUTUAL one).
        self._down_frame: FrameReader | None = FrameReader() if peer_exchange else None
        self._up_frame: FrameReader | None = None
        self._exchange_wait: asyncio.TimerHandle | None = None

    def _source_hash(self, cluster: Cluster) -> int | None:
        """Istio gives the TCP proxy a hash policy only for useSourceIp; others pick randomly."""
        hashing = cluster.hashing
        if hashing is None or hashing.key != "source_ip":
            return None
        return hash64(self.record.downstream_remote.encode())  # the peer IP

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        transport.pause_reading()
        if self._down_frame is not None:
            transport.write(frame(self.ctx.peer_metadata, self.ctx.peer_metadata_id))
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        cluster = self.cluster
        try:
            if cluster is None:
                raise OSError("no cluster")
            self._holds_slot = cluster.reserve_tcp_connection()  # UO past maxConnections
            host = await cluster.pick(self.original_dst, (), self._source_hash(cluster))
            side = _UpstreamSide(self)
            self.record.upstream_principal = await open_connection(
                side,
                host.address,
                host.port,
                bind_source_for(cluster.spec, host.address),
                cluster.spec.connect_timeout,
                cluster.tls_for_tcp(host.address),
            )
            self.record.upstream_host = host.host_port
            if side.transport is not None:
                self.record.upstream_local_address = local_address_of(side.transport)
                if _alpn(side.transport) == PEER_EXCHANGE_ALPN:
                    # Our frame goes before any byte of the client's.
                    side.transport.write(frame(self.ctx.peer_metadata, self.ctx.peer_metadata_id))
                    self._up_frame = FrameReader()
        except (OSError, TimeoutError, UpstreamError) as exc:
            cluster_name = self.record.cluster
            remote_caused.info(
                cluster_name, "tcp %s: upstream connect failed: %s", cluster_name, exc
            )
            self.record.response_flags = "UF" if not isinstance(exc, UpstreamError) else exc.flag
            self._open_series()
            self._release_slot()
            self._close_downstream()
            return
        if self._closed:
            side.transport.close() if side.transport else None
            return
        self.upstream = side
        self._open_series_once_exchanged()
        assert side.transport is not None
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            side.transport.write(data)
        if self._pending_eof:
            _half_close(side.transport)
        if self.transport is not None:
            self.transport.resume_reading()

    def _open_series_once_exchanged(self) -> None:
        """The series names the peer, so it waits for the peer's exchange frame, a moment
        at most (a peer that never writes first is counted without its facts)."""
        if self._exchange_pending():
            loop = asyncio.get_running_loop()
            self._exchange_wait = loop.call_later(EXCHANGE_WAIT, self._open_series)
        else:
            self._open_series()

    def _exchange_pending(self) -> bool:
        for reader in (self._down_frame, self._up_frame):
            if reader is not None and not reader.done:
                return True
        return False

    def _strip_frame(self, reader: FrameReader, data: bytes) -> bytes | None:
        """`data` without the peer's exchange frame; None while the frame is incomplete (or
        broken: the connection is then closed)."""
        try:
            rest = reader.feed(data)
        except ExchangeError as exc:
            remote_caused.info("exchange", "tcp %s: %s", self.record.cluster, exc)
            self.record.response_flags = "UPE" if reader is self._up_frame else "DPE"
            self._abort_both()
            return None
        if rest is not None:
            self.record.peer_metadata = reader.metadata
            if self.upstream is not None and not self._exchange_pending():
                self._open_series()
        return rest

    def _abort_both(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    # -- downstream events -----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        reader = self._down_frame
        if reader is not None and not reader.done:
            rest = self._strip_frame(reader, data)
            if not rest:
                return
            data = rest
        self._unreported_received += len(data)
        up = self.upstream
        if up is None or up.transport is None:
            # uvloop may deliver data even though reading was paused in connection_made.
            self._pending.append(data)
            return
        up.transport.write(data)

    def eof_received(self) -> bool:
        reader = self._down_frame
        if reader is not None and not reader.done:
            held = reader.abandon()  # the client ended inside what looked like a frame
            if held:
                self.data_received(held)
        self._down_eof = True
        if self._up_eof:
            self._close_both()
            return True
        up = self.upstream
        if up is None or up.transport is None:
            self._pending_eof = True
        else:
            _half_close(up.transport)
        return True

    def _release_slot(self) -> None:
        if self._holds_slot and self.cluster is not None:
            self._holds_slot = False
            self.cluster.release_tcp_connection()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._release_slot()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        up = self.upstream
        if up is not None and up.transport is not None:
            if exc is not None:
                up.transport.abort()
            else:
                up.transport.close()
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        if self._exchange_wait is not None:
            self._exchange_wait.cancel()
        series = self._open_series()  # closed before the upstream answered: still counted
        self._report()
        self.ctx.metrics.tcp_closed(series)
        if self.access_log is not None:
            self.access_log(self._log_entry(exc))

    def _log_entry(self, exc: Exception | None) -> StreamRecord:
        """The connection as an access-log entry (HTTP's fields stay empty: `-`)."""
        rec = self.record
        duration = time.monotonic() - self._started
        entry = StreamRecord(
            rec.reporter,
            rec.destination_service,
            0,
            rec.response_flags,
            duration * 1000.0,
            rec.received_bytes,
            rec.sent_bytes,
        )
        entry.cluster = rec.cluster
        entry.upstream_host = rec.upstream_host
        entry.start_time = time.time() - duration
        entry.request_protocol = ""
        entry.requested_server_name = rec.requested_server_name
        entry.upstream_local_address = rec.upstream_local_address
        entry.downstream_peer_uri_san = (
            "spiffe://" + rec.source_principal if rec.source_principal else ""
        )
        remote, local = transport_addresses(self.transport, self.original_dst)
        entry.downstream_remote_address, entry.downstream_local_address = remote, local
        if exc is not None:
            entry.connection_termination_details = str(exc)[:200]
        return entry

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    # -- upstream events -------------------------------------------------------------------
    def from_upstream(self, data: bytes) -> None:
        reader = self._up_frame
        if reader is not None and not reader.done:
            rest = self._strip_frame(reader, data)
            if not rest:
                return
            data = rest
        self._unreported_sent += len(data)
        if self.transport is not None:
            self.transport.write(data)

    def upstream_eof(self) -> None:
        reader = self._up_frame
        if reader is not None and not reader.done:
            held = reader.abandon()
            if held:
                self.from_upstream(held)
        self._up_eof = True
        if self._down_eof:
            self._close_both()
            return
        if self.transport is not None:
            _half_close(self.transport)

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.transport is not None:
            self.transport.abort()  # an upstream RST must not look like a clean end
        else:
            self._close_downstream()

    def downstream_pause(self, paused: bool) -> None:
        if self.transport is None or self._closed:
            return
        if paused:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _close_both(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()
        self._close_downstream()

    def _close_downstream(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _open_series(self) -> TcpSeries:
        """Count the connection as opened, in the one series its bytes and close go to. Done
        once the upstream outcome is known, so a refused one (UF, UO) carries its flag."""
        series = self._series
        if series is None:
            snapshot = self.ctx.snapshot
            policy = snapshot.metrics
            direction = policy.inbound if self.record.reporter == "destination" else policy.outbound
            extra: Extra | None = None
            if direction is not None:
                values = (
                    tag_values(direction, self._log_entry(None)) if direction.expressions else ()
                )
                extra = (direction, values)
            series = self._series = self.ctx.metrics.tcp_opened(self.record, extra)
            if not self._closed:
                # Bytes are reported while the connection lives (Istio's
                # tcp_reporting_duration, or Telemetry's reportingInterval), not only when
                # it closes.
                interval = policy.reporting_interval
                self._report_every = interval or snapshot.settings.tcp_reporting_duration
                loop = asyncio.get_running_loop()
                self._report_timer = loop.call_later(self._report_every, self._report_periodically)
        return series

    def _report_periodically(self) -> None:
        self._report()
        if not self._closed:
            loop = asyncio.get_running_loop()
            self._report_timer = loop.call_later(self._report_every, self._report_periodically)

    def _report(self) -> None:
        if self._unreported_sent or self._unreported_received:
            self.record.sent_bytes += self._unreported_sent
            self.record.received_bytes += self._unreported_received
            if self._series is not None:
                self.ctx.metrics.tcp_bytes(
                    self._series, self._unreported_sent, self._unreported_received
                )
            self._unreported_sent = self._unreported_received = 0
