"""What an HttpStream needs from the downstream side, whichever HTTP version carries it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from meshproxy.codec.events import Headers, ResponseHead
from meshproxy.config.snapshot import ListenerKind, PortBinding, Snapshot
from meshproxy.observe.accesslog import AccessLogs
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.tls import PeerInfo

if TYPE_CHECKING:
    from meshproxy.proxy.stream import HttpStream


class ConnectionFacts:
    """A downstream connection as its streams read it, fixed once the connection is made.

    A compiled class: a compiled stream reads each field at C speed, where the same reads
    through the Downstream protocol were Python attribute lookups (about 45 per request)."""

    def __init__(
        self,
        ctx: ProxyContext,
        loop: asyncio.AbstractEventLoop,
        inbound: bool,
        local_port: int,
        original_dst: tuple[str, int] | None,
        peer_ip: str,
        access_log: AccessLogs | None,
        http2: bool,
        peer: PeerInfo | None,
    ) -> None:
        self.ctx = ctx
        self.loop = loop
        self.inbound = inbound
        self.local_port = local_port
        self.original_dst = original_dst
        self.peer_ip = peer_ip
        self.access_log = access_log
        self.http2 = http2
        self.peer = peer  # the mTLS client, when the connection came over mesh TLS


class Downstream(Protocol):
    """An HTTP/1.1 connection (one stream at a time) or one HTTP/2 stream's channel."""

    facts: ConnectionFacts

    def current_binding(self, snapshot: Snapshot) -> PortBinding | None: ...
    def send_interim(self, status: int) -> None: ...
    def send_response_head(self, head: ResponseHead, stream: HttpStream) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: Headers) -> None: ...
    def send_local_reply(
        self, status: int, body: bytes, stream: HttpStream, headers: Headers | None = None
    ) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...
    def stream_finished(self, stream: HttpStream) -> None: ...
    def log_addresses(self) -> tuple[str, str]: ...  # (remote, local) ip:port, for logs


def transport_addresses(
    transport: asyncio.BaseTransport | None, original_dst: tuple[str, int] | None
) -> tuple[str, str]:
    """A connection's (remote, local) as ip:port; the local one is the original destination
    of a captured connection (what the client dialled)."""
    if transport is None:
        return "", ""
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    remote = f"{peer[0]}:{peer[1]}" if peer else ""
    if original_dst is not None:
        return remote, f"{original_dst[0]}:{original_dst[1]}"
    return remote, f"{local[0]}:{local[1]}" if local else ""


class BindingLookup:
    """A listener's binding under the current snapshot, computed once per snapshot."""

    __slots__ = ("_cached", "_snapshot", "accepted", "kind", "listener_key", "original_dst")

    def __init__(
        self,
        kind: ListenerKind,
        listener_key: tuple[str, int],
        original_dst: tuple[str, int] | None,
        accepted: PortBinding | None,
    ) -> None:
        self.kind = kind
        self.listener_key = listener_key
        self.original_dst = original_dst
        self.accepted = accepted  # as of accept: a listener removed by a reload keeps it
        self._snapshot: Snapshot | None = None
        self._cached: PortBinding | None = None

    def get(self, snapshot: Snapshot) -> PortBinding | None:
        if snapshot is self._snapshot:
            return self._cached
        binding = snapshot.binding_for(self.kind, self.listener_key, self.original_dst)
        if binding is None and self.original_dst is None:
            binding = self.accepted
        self._snapshot = snapshot
        self._cached = binding
        return binding
