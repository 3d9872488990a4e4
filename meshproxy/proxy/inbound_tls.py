"""PeerAuthentication at the door of inbound connections: STRICT, PERMISSIVE or DISABLE.

The first bytes decide (0x16 opens a TLS record, as Envoy's tls_inspector decides). On STRICT
all TLS is terminated and plaintext refused. On PERMISSIVE only mesh TLS is terminated (the
ClientHello offers one of Istio's ALPNs); other TLS is the app's own and, like plaintext,
passes to the app as it came; a client that stays silent for the protocol detection timeout
(a server-first protocol) is handed on as plaintext too. Terminated TLS goes to the event
loop's TLS protocol, fed the bytes already read (proxy/tls.py). The protocol that follows
(`make_app`) is told who the peer is (None for plaintext) and sees the same bytes whichever
way they came.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from meshproxy._native import as_protocol
from meshproxy.observe.lograte import RateLimitedLog
from meshproxy.proxy.client_hello import NotClientHello, parse
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.tls import HANDSHAKE_TIMEOUT, PeerInfo, accept_tls

logger = logging.getLogger(__name__)
remote_caused = RateLimitedLog(logger)  # lines a client can cause: a few per interval

TLS_HANDSHAKE_RECORD = 0x16
AppFactory = Callable[[PeerInfo | None], asyncio.Protocol]
SilentFactory = Callable[[], asyncio.Protocol]


def _sni_of(data: bytes) -> str:
    """The server name of a ClientHello that arrived whole ("" otherwise: the handshake
    itself judges the bytes)."""
    try:
        hello = parse(data)
    except NotClientHello:
        return ""
    return hello.sni if hello is not None else ""


class MtlsGate(asyncio.Protocol):
    def __init__(
        self,
        ctx: ProxyContext,
        mode: str,
        make_app: AppFactory,
        on_silence: SilentFactory | None = None,
    ) -> None:
        self.ctx = ctx
        self.mode = mode
        self.make_app = make_app
        self.on_silence = on_silence  # PERMISSIVE: what a silent client gets (else: closed)
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hello = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        if self.mode == "DISABLE":
            self._plain(b"")
            return
        if self.mode == "STRICT":
            if self.ctx.identity is None:
                self._no_identity()
                return
            self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, t.close)
            return
        detect = self.ctx.snapshot.settings.protocol_detection_timeout
        if self.on_silence is None or detect <= 0:
            detect = self.ctx.snapshot.settings.request_headers_timeout
            self._timer = asyncio.get_running_loop().call_later(detect, t.close)
        else:
            self._timer = asyncio.get_running_loop().call_later(detect, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if self.on_silence is not None:
            self._switch(self.on_silence(), b"")

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._hello:
            data = self._hello + data
        if data[0] == TLS_HANDSHAKE_RECORD:
            if self.mode == "STRICT":
                self._tls(data, _sni_of(data))
                return
            try:
                hello = parse(data)
            except NotClientHello:
                self._plain(data)  # not TLS this proxy could terminate: the app's business
                return
            if hello is None:
                self._hello = data  # the rest of the ClientHello is on its way
                if self.transport is not None:
                    self._timer = asyncio.get_running_loop().call_later(
                        HANDSHAKE_TIMEOUT, self.transport.close
                    )
                return
            self._hello = b""
            if hello.from_mesh:
                self._tls(data, hello.sni)
            else:
                self._plain(data)  # the app's own TLS: passed through as it came
        elif self.mode == "STRICT":
            self.ctx.metrics.tls_failed("plaintext on a STRICT port")
            if self.transport is not None:
                self.transport.abort()
        else:
            self._plain(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _plain(self, first: bytes) -> None:
        self._switch(self.make_app(None), first)

    def _no_identity(self) -> None:
        self.ctx.metrics.tls_failed("no workload certificate")
        remote_caused.warning(
            "no-identity", "inbound TLS refused: no workload certificate is loaded"
        )
        if self.transport is not None:
            self.transport.abort()

    def _tls(self, first: bytes, sni: str) -> None:
        identity = self.ctx.identity
        transport = self.transport
        if identity is None:
            self._no_identity()
            return
        if transport is None or transport.is_closing():
            return
        accept_tls(
            transport,
            identity.server_context,
            first,
            self.make_app,
            self.ctx.metrics.tls_failed,
            sni,
        )

    def _switch(self, proto: asyncio.Protocol, first: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if first:
            # `proto` may have handed over to another protocol in connection_made (ours are
            # all streaming protocols, some native classes that asyncio does not know).
            as_protocol(transport.get_protocol()).data_received(first)
