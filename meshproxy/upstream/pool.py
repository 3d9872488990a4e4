"""Per-endpoint pool of upstream HTTP/1.1 connections: reuse idle ones, open new on demand."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable

from meshproxy._native import as_protocol
from meshproxy.codec.h1 import client_codec
from meshproxy.codec.h1_limits import Limits
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.upstream.breaker import CircuitBreaker
from meshproxy.upstream.connection import UpstreamHttp1Connection
from meshproxy.upstream.own_sources import OWN_SOURCES, connected
from meshproxy.upstream.tls import UpstreamTls


def _overflow(what: str) -> UpstreamError:
    return UpstreamError(
        FailureKind.OVERFLOW, f"overflow: {what}", flag="UO", request_bytes_sent=False
    )


async def open_connection(
    protocol: asyncio.Protocol,
    address: str,
    port: int,
    bind_source: str | None,
    timeout: float,
    tls: UpstreamTls | None = None,
) -> str:
    """Connect `protocol` to address:port (TCP_NODELAY, TLS when asked), as an UpstreamError
    on failure; a TLS peer whose certificate is not the expected one is refused here. The
    verified peer's SPIFFE ID (ISTIO_MUTUAL), or "", is returned (destination_principal)."""
    loop = asyncio.get_running_loop()
    context = tls.context if tls is not None else None
    hostname = tls.server_hostname if tls is not None else None
    handshake_timeout = timeout if tls is not None else None
    sock: socket.socket | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                # Registered before the loop runs again: a pod that captures our own traffic
                # sends this connection back to us, and the listener must know it (L05).
                sock = OWN_SOURCES.connecting_socket(address, port, bind_source)
                if sock is not None:
                    await connected(sock)
                    transport, _ = await loop.create_connection(
                        lambda: protocol,
                        sock=sock,
                        ssl=context,
                        server_hostname=hostname,
                        ssl_handshake_timeout=handshake_timeout,
                    )
                else:  # a host name: resolved and connected by the loop
                    transport, _ = await loop.create_connection(
                        lambda: protocol,
                        address,
                        port,
                        local_addr=(bind_source, 0) if bind_source else None,
                        ssl=context,
                        server_hostname=hostname,
                        ssl_handshake_timeout=handshake_timeout,
                    )
        except BaseException:
            if sock is not None:
                sock.close()  # not handed to a transport, or its transport failed
            raise
    except ssl.SSLError as exc:
        raise UpstreamError(
            FailureKind.TLS,
            f"TLS error: {exc.reason or exc}",
            flag="UF",
            request_bytes_sent=False,
        ) from None
    except TimeoutError:
        raise UpstreamError(
            FailureKind.CONNECT_TIMEOUT,
            "connection timeout",
            flag="UF",
            request_bytes_sent=False,
        ) from None
    except OSError as exc:
        raise UpstreamError(
            FailureKind.CONNECT_REFUSED,
            f"delayed connect error: {exc.errno or exc}",
            flag="UF",
            request_bytes_sent=False,
        ) from None
    peer = ""
    if tls is not None:
        sslobj = transport.get_extra_info("ssl_object")
        der = (sslobj.getpeercert(binary_form=True) if sslobj is not None else None) or b""
        peercert = transport.get_extra_info("peercert")
        problem = tls.check_peer(peercert, der)
        if problem is not None:
            transport.abort()
            raise UpstreamError(
                FailureKind.TLS, f"TLS error: {problem}", flag="UF", request_bytes_sent=False
            )
        peer = tls.peer_identity(peercert)
    raw = transport.get_extra_info("socket")
    if raw is not None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    return peer


class Pool:
    """Idle connections are kept LIFO (warm ones first) and closed after `idle_timeout`.

    The idle timeout is meant to be shorter than the upstream application's keep-alive timeout,
    so the proxy, not the app, closes idle connections and the 503-UC race stays rare.
    """

    def __init__(
        self,
        address: str,
        port: int,
        *,
        codec: str,
        limits: Limits,
        connect_timeout: float,
        idle_timeout: float,
        max_requests: int,
        bind_source: str | None,
        on_change: Callable[[int], None] | None = None,
        tls: Callable[[], UpstreamTls | None] | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self._codec = codec
        self._limits = limits
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self.bind_source = bind_source
        self.idle: list[UpstreamHttp1Connection] = []
        self.connections: set[UpstreamHttp1Connection] = set()
        self.closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.connect_failures = 0
        self.connects = 0
        self._on_change = on_change
        self._tls = tls
        self.breaker = breaker
        self._waiters: deque[asyncio.Future[UpstreamHttp1Connection | None]] = deque()

    async def acquire(self) -> tuple[UpstreamHttp1Connection, bool]:
        """A connection ready for one request, and whether it was reused.

        At the cluster's maxConnections the request waits, as one of at most
        http1MaxPendingRequests, for a connection another request releases; beyond that it
        overflows at once (503 UO)."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
        b = self.breaker
        while b is not None and not b.may_connect():
            if b.pending >= b.max_pending:
                b.overflows["pending"] += 1
                raise _overflow("pending requests")
            future: asyncio.Future[UpstreamHttp1Connection | None]
            future = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            b.pending += 1
            try:
                handed = await future
            finally:
                b.pending -= 1
            if handed is not None:
                return handed, True
            conn = self.take_idle()
            if conn is not None:
                return conn, True
        return await self.connect(), False

    def wake_one(self) -> bool:
        """A connection slot freed up: let one waiting request try again."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return True
        return False

    def take_idle(self) -> UpstreamHttp1Connection | None:
        """The most recently used live idle connection, if any (no waiting)."""
        idle = self.idle
        if not idle:
            return None
        deadline = time.monotonic() - self.idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > deadline:
                return conn
            conn.abort()
        return None

    async def connect(self) -> UpstreamHttp1Connection:
        conn = UpstreamHttp1Connection(client_codec(self._codec, self._limits), self)
        self.connects += 1
        on_change = self._on_change
        if on_change:
            on_change(1)  # counted from the connect on: a burst cannot pass maxConnections
        try:
            tls = self._tls() if self._tls is not None else None
            conn.peer_principal = await open_connection(
                as_protocol(conn),
                self.address,
                self.port,
                self.bind_source,
                self.connect_timeout,
                tls,
            )
        except BaseException as exc:  # a failure or a cancelled connect gives the slot back
            if isinstance(exc, UpstreamError):
                self.connect_failures += 1
            if on_change:
                on_change(-1)
            raise
        if conn.closed:  # lost before it could be pooled: its close was never counted
            if on_change:
                on_change(-1)
            raise UpstreamError(
                FailureKind.RESET,
                "connection closed after connect",
                flag="UF",
                request_bytes_sent=False,
            )
        self.connections.add(conn)
        return conn

    def release(self, conn: UpstreamHttp1Connection, reusable: bool) -> None:
        if (
            not reusable
            or self.closed
            or conn.closed
            or (self.max_requests and conn.requests >= self.max_requests)
        ):
            if not conn.closed:
                conn.abort()
            return
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(conn)  # straight to a waiting request
                return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than idle_timeout; one timer per pool, not per
        request (a timer per release costs more than the rest of the pool bookkeeping)."""
        self._sweeper = None
        deadline = time.monotonic() - self.idle_timeout
        idle = self.idle
        while idle and (idle[0].closed or idle[0].idle_since <= deadline):
            idle.pop(0).abort()
        if idle and not self.closed:
            delay = idle[0].idle_since - deadline
            self._sweeper = asyncio.get_running_loop().call_later(max(delay, 0.01), self._sweep)

    def forget(self, conn: UpstreamHttp1Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            if self._on_change:
                self._on_change(-1)
        if conn in self.idle:
            self.idle.remove(conn)

    def close(self) -> None:
        """Close idle connections now; busy ones close when their request ends."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.idle):
            conn.abort()
        self.idle.clear()
