"""PeerAuthentication at the door of inbound connections: STRICT, PERMISSIVE or DISABLE.

STRICT starts a TLS handshake (client certificate required) at once, with the event loop's
own TLS (uvloop's, in C: nothing was read yet). PERMISSIVE looks at the first byte (0x16
opens a TLS record, as Envoy's tls_inspector decides) and takes either path, the TLS one over
memory BIOs because the byte it looked at is already read. DISABLE goes straight to plaintext.
The protocol that follows (`make_app`) is told who the peer is (None for plaintext) and sees
the same bytes whichever way they came.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import cast

from meshproxy._tasks import spawn
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.tls import HANDSHAKE_TIMEOUT, PeerInfo, TlsServerProtocol
from meshproxy.security.spiffe import spiffe_of

logger = logging.getLogger(__name__)

TLS_HANDSHAKE_RECORD = 0x16
AppFactory = Callable[[PeerInfo | None], asyncio.Protocol]


class _Pending(asyncio.Protocol):
    """Holds what arrives decrypted between the end of the handshake and the hand-over."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def replay(self, transport: asyncio.Transport) -> None:
        app = transport.get_protocol()
        if not isinstance(app, asyncio.Protocol):
            return
        for chunk in self.data:
            app.data_received(chunk)
        if self.eof and not app.eof_received():
            transport.close()
        if self.lost is not None:
            app.connection_lost(self.lost[0])


class MtlsGate(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, mode: str, make_app: AppFactory) -> None:
        self.ctx = ctx
        self.mode = mode
        self.make_app = make_app
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.mode == "STRICT":
            identity = self.ctx.identity
            if identity is None:
                self._no_identity()
                return
            self.transport.pause_reading()  # the event loop's TLS reads the handshake
            self._handshake = spawn(self._native_tls(identity.server_context), name="tls")
        elif self.mode == "DISABLE":
            self._plain(b"")
        else:
            timeout = self.ctx.snapshot.settings.request_headers_timeout
            self._timer = asyncio.get_running_loop().call_later(timeout, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.mode == "STRICT":
            # Bytes came before the loop's TLS took over (uvloop may deliver one read despite
            # pause_reading): its task has not started, so the memory-BIO engine takes them.
            if self._handshake is not None:
                self._handshake.cancel()
                self._handshake = None
            if self.transport is not None:
                self.transport.resume_reading()
            if data[0] != TLS_HANDSHAKE_RECORD:
                self.ctx.metrics.tls_failed("plaintext on a STRICT port")
                if self.transport is not None:
                    self.transport.abort()
                return
            self._tls(data)
        elif data[0] == TLS_HANDSHAKE_RECORD:
            self._tls(data)
        else:
            self._plain(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._handshake is not None:
            self._handshake.cancel()

    def close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _plain(self, first: bytes) -> None:
        self._switch(self.make_app(None), first)

    def _no_identity(self) -> None:
        self.ctx.metrics.tls_failed("no workload certificate")
        logger.warning("inbound TLS refused: no workload certificate is loaded")
        if self.transport is not None:
            self.transport.abort()

    async def _native_tls(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        pending = _Pending()
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport,
                pending,
                context,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.ctx.metrics.tls_failed(str(getattr(exc, "reason", None) or exc or "timeout"))
            transport.abort()
            return
        if tls is None or tls.is_closing():
            return
        sslobj = tls.get_extra_info("ssl_object")
        peer = PeerInfo(
            spiffe_of(tls.get_extra_info("peercert")),
            (sslobj.getpeercert(binary_form=True) if sslobj is not None else None) or b"",
            sslobj.selected_alpn_protocol() if sslobj is not None else None,
        )
        app = self.make_app(peer)
        tls.set_protocol(app)
        app.connection_made(tls)
        pending.replay(tls)

    def _tls(self, first: bytes) -> None:
        identity = self.ctx.identity
        if identity is None:
            self._no_identity()
            return
        tls = TlsServerProtocol(
            identity.server_context, self.make_app, self.ctx.metrics.tls_failed, first
        )
        self._switch(tls, b"")

    def _switch(self, proto: asyncio.Protocol, first: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if first:
            # `proto` may have handed over to another protocol in connection_made.
            current = transport.get_protocol()
            if isinstance(current, asyncio.Protocol):
                current.data_received(first)
