"""Inbound TLS termination on an already accepted connection whose first bytes were read.

The MtlsGate reads the first bytes to tell TLS from plaintext (Envoy's tls_inspector), and
loop.start_tls cannot be given bytes already taken off the socket. So the event loop's own
TLS protocol (uvloop's SSLProtocol, in C; asyncio's otherwise) is put on the transport by hand
and fed those bytes first; from there it reads the socket itself. When the handshake is done,
the application protocol (HTTP/1.1, HTTP/2, TCP relay) is told who the peer is and takes over
the decrypted transport.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import uvloop
import uvloop.loop

from meshproxy.observe.lograte import RateLimitedLog
from meshproxy.security.spiffe import SpiffeId, spiffe_of
from meshproxy.security.svid import svid_violation

logger = logging.getLogger(__name__)
remote_caused = RateLimitedLog(logger)  # lines a client can cause: a few per interval

HANDSHAKE_TIMEOUT = 10.0

# uvloop's TLS protocol runs the record layer in C; it drives only uvloop's own transports.
# Not in uvloop's typed API, hence the lookup.
_UVLOOP_SSL_PROTOCOL: Any = getattr(uvloop.loop, "SSLProtocol", None)


@dataclass(frozen=True, slots=True, eq=False)
class PeerInfo:
    """Who is on the other end of a mesh TLS connection (one per connection: compared and
    hashed by identity, which keeps per-request lookups keyed on it cheap)."""

    spiffe_id: SpiffeId | None
    cert_der: bytes
    alpn: str | None
    sni: str = ""  # the ClientHello's server name (%REQUESTED_SERVER_NAME%, connection.sni)
    principal: str = field(init=False)  # read per request (metrics, authorization)

    def __post_init__(self) -> None:
        principal = self.spiffe_id.principal if self.spiffe_id else ""
        object.__setattr__(self, "principal", principal)


AppFactory = Callable[[PeerInfo], asyncio.Protocol]


class _Handover(asyncio.Protocol):
    """Stands in as the TLS protocol's application until the handshake is done, then puts
    the real application on the decrypted transport (before any data is delivered). A peer
    whose certificate verified but is no well-formed SVID is refused here."""

    def __init__(self, make_app: AppFactory, on_failure: Callable[[str], None], sni: str) -> None:
        self._make_app = make_app
        self._on_failure = on_failure
        self._sni = sni

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = cast(asyncio.Transport, transport)
        sslobj = tls.get_extra_info("ssl_object")
        der = (sslobj.getpeercert(binary_form=True) if sslobj is not None else None) or b""
        problem = svid_violation(der)
        if problem is not None:
            self._on_failure("invalid SVID")
            remote_caused.warning("invalid-svid", "inbound TLS refused: %s", problem)
            tls.abort()
            return
        peer = PeerInfo(
            spiffe_of(tls.get_extra_info("peercert")),
            der,
            sslobj.selected_alpn_protocol() if sslobj is not None else None,
            self._sni,
        )
        app = self._make_app(peer)
        tls.set_protocol(app)
        app.connection_made(tls)


def accept_tls(
    transport: asyncio.Transport,
    context: ssl.SSLContext,
    first: bytes,
    make_app: AppFactory,
    on_failure: Callable[[str], None],
    sni: str = "",
) -> None:
    """Run the server side of a TLS handshake on `transport`, starting with `first` (whose
    ClientHello named `sni`)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    protocol_class: Any = asyncio.sslproto.SSLProtocol
    if _UVLOOP_SSL_PROTOCOL is not None and isinstance(loop, uvloop.Loop):
        protocol_class = _UVLOOP_SSL_PROTOCOL
    protocol = protocol_class(
        loop,
        _Handover(make_app, on_failure, sni),
        context,
        waiter,
        server_side=True,
        call_connection_made=True,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    waiter.add_done_callback(lambda f: _report(f, on_failure))
    transport.pause_reading()  # the read mode changes with the protocol (buffered reads)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    view = memoryview(first)
    while view and not transport.is_closing():
        buf = protocol.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]
    transport.resume_reading()


def _report(done: asyncio.Future[None], on_failure: Callable[[str], None]) -> None:
    if done.cancelled():
        return
    exc = done.exception()
    if exc is not None:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        on_failure(str(reason))
