"""Per-endpoint HTTP/2 connections: one multiplexed connection, more only when it is full."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.upstream.h2connection import Http2Exchange, UpstreamHttp2Connection
from meshproxy.upstream.pool import open_connection
from meshproxy.upstream.tls import UpstreamTls


class Http2Pool:
    """Hands out exchanges (streams) on connections with room for them.

    Requests that arrive while a connection is being opened wait for it instead of each
    opening their own, so a burst of N requests to a cold endpoint opens one connection,
    not N (what a per-request connect would do to a server's accept queue).
    """

    def __init__(
        self,
        address: str,
        port: int,
        *,
        connect_timeout: float,
        idle_timeout: float,
        bind_source: str | None,
        on_change: Callable[[int], None] | None = None,
        tls: Callable[[], UpstreamTls | None] | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.bind_source = bind_source
        self.connections: list[UpstreamHttp2Connection] = []
        self.closed = False
        self.connects = 0
        self.connect_failures = 0
        self._connecting: asyncio.Future[UpstreamHttp2Connection] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._on_change = on_change
        self._tls = tls

    @property
    def idle(self) -> list[UpstreamHttp2Connection]:
        return [c for c in self.connections if not c.exchanges]

    def take_idle(self) -> Http2Exchange | None:
        """An exchange on an open connection with a free stream, if any (no waiting)."""
        for conn in self.connections:
            if conn.capacity > 0:
                return conn.new_exchange()
        return None

    async def acquire(self) -> tuple[Http2Exchange, bool]:
        while True:
            ex = self.take_idle()
            if ex is not None:
                return ex, True
            pending = self._connecting
            if pending is None:
                return await self.connect(), False
            try:
                await asyncio.shield(pending)
            except UpstreamError:
                raise
            # The new connection may already be full with earlier waiters: look again.

    async def connect(self) -> Http2Exchange:
        loop = asyncio.get_running_loop()
        conn = UpstreamHttp2Connection(self)
        future: asyncio.Future[UpstreamHttp2Connection] = loop.create_future()
        if self._connecting is None:
            self._connecting = future
        self.connects += 1
        try:
            async with asyncio.timeout(self.connect_timeout):
                tls = self._tls() if self._tls is not None else None
                conn.peer_principal = await open_connection(
                    conn, self.address, self.port, self.bind_source, self.connect_timeout, tls
                )
                await conn.ready  # the server's SETTINGS: its stream limit
        except TimeoutError:
            self.connect_failures += 1
            conn.close_gracefully()
            err = UpstreamError(
                FailureKind.CONNECT_TIMEOUT,
                "no HTTP/2 SETTINGS from upstream",
                flag="UF",
                request_bytes_sent=False,
            )
            if not future.done():
                future.set_exception(err)
                future.exception()
            raise err from None
        except UpstreamError as err:
            self.connect_failures += 1
            if not future.done():
                future.set_exception(err)
                future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            if self._connecting is future:
                self._connecting = None
        self.connections.append(conn)
        if self._on_change:
            self._on_change(1)
        self._arm_sweeper()
        ex = conn.new_exchange()  # ours first, before the waiters wake up
        if not future.done():
            future.set_result(conn)
        return ex

    def forget(self, conn: UpstreamHttp2Connection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            if self._on_change:
                self._on_change(-1)

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and not self.closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.idle_timeout
        for conn in list(self.connections):
            if not conn.exchanges and not conn.reserved and conn.idle_since <= deadline:
                conn.close_gracefully()
        if self.connections:
            self._arm_sweeper()

    def close(self) -> None:
        """Close idle connections now; busy ones once their streams are done."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.close_gracefully()
