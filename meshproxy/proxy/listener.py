"""Listeners: bind sockets, and per connection decide HTTP or TCP and where it goes."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from meshproxy._native import as_protocol
from meshproxy.codec.h2 import PREFACE
from meshproxy.config.compile import INBOUND_PASSTHROUGH, PASSTHROUGH
from meshproxy.config.resources import ProxySettings
from meshproxy.config.snapshot import L7, ListenerKind, ListenerSpec, PortBinding
from meshproxy.observe.accesslog import AccessLogs
from meshproxy.observe.recorder import ConnRecord
from meshproxy.proxy.context import ProxyContext
from meshproxy.proxy.http1 import DownstreamHttp1
from meshproxy.proxy.http2 import DownstreamHttp2
from meshproxy.proxy.inbound_tls import MtlsGate
from meshproxy.proxy.origdst import original_destination
from meshproxy.proxy.peer_exchange import PEER_EXCHANGE_ALPN
from meshproxy.proxy.tcp import TcpRelay
from meshproxy.proxy.tls import PeerInfo
from meshproxy.security.authz import AuthzRequest
from meshproxy.security.identity import H2_ALPN, HTTP_ALPN
from meshproxy.upstream.own_sources import OWN_SOURCES

logger = logging.getLogger(__name__)

HTTP_METHODS = (
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
)
SNIFF_BYTES = 8
SERVER_FIRST_PORTS = frozenset({25, 53, 3306, 27017})  # Istio assumes TCP for these


def ipv6_enabled() -> bool:
    """IPv6 is on in this network namespace (a pod may have it disabled)."""
    try:
        with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def is_h2_preface(data: bytes) -> bool | None:
    """True once the HTTP/2 connection preface is seen, False once it cannot be, else None."""
    if data[: len(PREFACE)] == PREFACE:
        return True
    return None if PREFACE.startswith(data) else False


def looks_like_http1(data: bytes) -> bool | None:
    """True/False once decidable from the first bytes, None while more are needed."""
    for m in HTTP_METHODS:
        if data.startswith(m):
            return True
        if m.startswith(data):
            return None
    return False


def _tcp(
    ctx: ProxyContext,
    kind: ListenerKind,
    cluster_name: str,
    service: str,
    original_dst: tuple[str, int] | None,
    peer: str,
    identity: PeerInfo | None = None,
    port: int = 0,
    access_log: AccessLogs | None = None,
) -> asyncio.Protocol:
    principal = identity.principal if identity is not None else ""
    authz = ctx.snapshot.authz
    if kind.inbound and authz is not None:
        dst_port = original_dst[1] if original_dst else port
        sni = identity.sni if identity is not None else ""
        decision = authz.check(AuthzRequest(principal, peer, dst_port, sni=sni))
        ctx.metrics.rbac(decision.allowed, "tcp")
        if not decision.allowed:
            logger.info(
                "tcp from %s (%s) to port %d denied by %s",
                peer,
                principal or "plaintext",
                dst_port,
                decision.policy or "no matching ALLOW policy",
            )
            return _Refuse()
    record = ConnRecord(
        "destination" if kind.inbound else "source", service or cluster_name, cluster_name, "", peer
    )
    record.source_principal = principal
    record.requested_server_name = identity.sni if identity is not None else ""
    exchange = identity is not None and identity.alpn == PEER_EXCHANGE_ALPN
    cluster = ctx.clusters.get(cluster_name)
    return TcpRelay(ctx, cluster, record, original_dst, access_log, peer_exchange=exchange)


class CaptureEntry(asyncio.Protocol):
    """First protocol of an intercepted connection: reads SO_ORIGINAL_DST, sniffs, hands over."""

    def __init__(
        self,
        ctx: ProxyContext,
        spec: ListenerSpec,
        access_log: AccessLogs | None,
        own_ports: frozenset[int],
        peer: PeerInfo | None = None,
        gated: bool = False,
        silent: bool = False,
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.access_log = access_log
        self.own_ports = own_ports
        self.peer = peer  # the mTLS peer, once PeerAuthentication's gate let it in
        self.gated = gated
        self.silent = silent  # the gate waited out the detection timeout already
        self.transport: asyncio.Transport | None = None
        self.original_dst: tuple[str, int] | None = None
        self.binding: PortBinding | None = None
        self._buffer = b""
        self._peer = ""
        self._detect: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        local = transport.get_extra_info("sockname")
        if self._from_this_host(peer, local) and OWN_SOURCES.is_own(peer):
            # Our own upstream connection, captured again: proxying it would loop.
            self.ctx.metrics.downstream_rejected("proxy_loop")
            if OWN_SOURCES.loop_seen():
                logger.warning(
                    "closed a connection from this proxy's own upstream socket %s: the pod's "
                    "rules capture the proxy's traffic (is it running as the exempt uid?); "
                    'counted in meshproxy_downstream_rq_rejected_total{reason="proxy_loop"}',
                    peer,
                )
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        dst = original_destination(sock) if sock is not None else None
        if (
            dst is None
            or (local is not None and dst == (local[0], local[1]))
            or (dst[1] in self.own_ports and dst[0] in ("127.0.0.1", "::1"))
        ):
            # Not redirected, or redirected to ourselves: proxying would loop (Istio #14242).
            self.ctx.metrics.downstream_rejected("no_original_dst")
            transport.close()
            return
        self.original_dst = dst
        snap = self.ctx.snapshot
        if self.spec.kind is ListenerKind.OUTBOUND_CAPTURE:
            self.binding = snap.outbound_binding(dst[0], dst[1])
        else:
            self.binding = snap.inbound_by_port.get(dst[1])
            mode = snap.mtls.mode_for(dst[1])
            if not self.gated and mode != "DISABLE":
                self._switch(MtlsGate(self.ctx, mode, self._after_gate, self._after_silence))
                return
            binding = self.binding
            if (
                self.peer is not None
                and binding is not None
                and binding.protocol is L7.HTTP
                and self.peer.alpn in HTTP_ALPN
            ):
                # ALPN said which HTTP: no need to sniff inside the tunnel.
                self._hand_over_http(self.peer.alpn in H2_ALPN)
                return
        if self.binding is not None and self.binding.protocol is L7.TCP:
            self._hand_over_tcp(self.binding.tcp_cluster or "", self.binding.service)
        elif self.binding is None and dst[1] in SERVER_FIRST_PORTS:
            self._passthrough_tcp()
        elif self.silent:
            self._not_http()
        else:
            self._start_detection_timer(snap.settings)

    def _from_this_host(self, peer: object, local: object) -> bool:
        """Outbound capture only sees the pod's own sockets; inbound ones come from this host
        only when the peer is the address they reached (a hairpin) or loopback."""
        if self.spec.kind is ListenerKind.OUTBOUND_CAPTURE:
            return True
        if not isinstance(peer, tuple) or not isinstance(local, tuple):
            return False
        return peer[0] == local[0] or peer[0] in ("127.0.0.1", "::1")

    def _start_detection_timer(self, settings: ProxySettings) -> None:
        """A port of unknown protocol: a client silent for the detection timeout is taken to
        speak a server-first protocol and relayed as TCP (0: wait for its first bytes). A
        declared HTTP port has no TCP to fall back to: silence there is closed like a request
        whose headers never come."""
        binding, loop, transport = self.binding, asyncio.get_running_loop(), self.transport
        if binding is None or binding.protocol is not L7.HTTP or binding.tcp_cluster:
            timeout = settings.protocol_detection_timeout
            if timeout > 0:
                self._detect = loop.call_later(timeout, self._not_http)
        elif transport is not None:
            self._detect = loop.call_later(settings.request_headers_timeout, transport.close)

    def _after_gate(self, peer: PeerInfo | None) -> asyncio.Protocol:
        return CaptureEntry(
            self.ctx, self.spec, self.access_log, self.own_ports, peer=peer, gated=True
        )

    def _after_silence(self) -> asyncio.Protocol:
        """For the gate: the client said nothing within the detection timeout."""
        return CaptureEntry(
            self.ctx, self.spec, self.access_log, self.own_ports, gated=True, silent=True
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._detect is not None:
            self._detect.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        h2 = is_h2_preface(self._buffer)
        if h2 is None:
            return
        verdict = True if h2 else looks_like_http1(self._buffer[:SNIFF_BYTES])
        if verdict is None:
            return
        if verdict:
            self._hand_over_http(h2)
        else:
            self._not_http()

    def _not_http(self) -> None:
        """Opaque TCP: the port's TCP fallback, else the passthrough."""
        binding = self.binding
        if binding is not None and binding.protocol is L7.HTTP and binding.tcp_cluster:
            self._hand_over_tcp(binding.tcp_cluster, binding.service)
        else:
            self._passthrough_tcp()

    def eof_received(self) -> bool:
        if self._buffer:
            self._passthrough_tcp()
            return True
        return False

    def _passthrough_tcp(self) -> None:
        if self.spec.kind is ListenerKind.OUTBOUND_CAPTURE and self.ctx.snapshot.registry_only:
            self.ctx.metrics.downstream_rejected("registry_only")
            if self.transport is not None:
                self.transport.close()
            return
        name = (
            PASSTHROUGH if self.spec.kind is ListenerKind.OUTBOUND_CAPTURE else INBOUND_PASSTHROUGH
        )
        self._hand_over_tcp(name, name)

    def _hand_over_tcp(self, cluster: str, service: str) -> None:
        relay = _tcp(
            self.ctx,
            self.spec.kind,
            cluster,
            service,
            self.original_dst,
            self._peer,
            self.peer,
            access_log=self.access_log,
        )
        self._switch(relay)

    def _hand_over_http(self, h2: bool) -> None:
        assert self.original_dst is not None
        factory = DownstreamHttp2 if h2 else DownstreamHttp1
        conn = factory(
            self.ctx,
            self.spec.kind,
            self.binding,
            self.spec.key,
            self.original_dst[1],
            self.original_dst,
            self.access_log,
            peer=self.peer,
        )
        self._switch(as_protocol(conn))

    def _switch(self, proto: asyncio.Protocol) -> None:
        if self._detect is not None:
            self._detect.cancel()
            self._detect = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self._buffer:
            data, self._buffer = self._buffer, b""
            proto.data_received(data)


class Listener:
    """One bound socket; its protocol factory reads the current snapshot per connection."""

    def __init__(
        self,
        ctx: ProxyContext,
        spec: ListenerSpec,
        access_log: AccessLogs | None,
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.access_log = access_log
        self.server: asyncio.Server | None = None
        self.server_v6: asyncio.Server | None = None

    def update(self, spec: ListenerSpec) -> None:
        self.spec = spec

    async def start(self, reuse_port: bool = False) -> None:
        """Bind; with several workers each binds with SO_REUSEPORT and the kernel spreads
        the connections (never set for one worker: a second process on the port must fail).
        Capture listeners also bind :: (IPv6-only) where the pod has IPv6, so ip6tables'
        redirects land too."""
        self.server = await self._bind(self.spec.address, reuse_port)
        if self.spec.kind.captures and self.spec.address == "0.0.0.0" and ipv6_enabled():
            try:
                self.server_v6 = await self._bind("::", reuse_port)
            except OSError as exc:  # IPv6 present but unusable here: IPv4 still works
                logger.warning("listener %s: not on [::]: %s", self.spec.name, exc)

    async def _bind(self, address: str, reuse_port: bool) -> asyncio.Server:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return await asyncio.get_running_loop().create_server(
            self._factory,
            address,
            self.spec.port,
            family=family,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=4096,
        )

    def _factory(self) -> asyncio.Protocol:
        try:
            return self._protocol_for_connection()
        except Exception:  # a bug here must cost one connection, never the listener
            logger.exception("listener %s: cannot set up a connection", self.spec.name)
            return _Refuse()

    def _protocol_for_connection(self) -> asyncio.Protocol:
        ctx = self.ctx
        spec = self.spec
        if len(ctx.connections) >= ctx.snapshot.settings.max_connections:
            ctx.metrics.downstream_rejected("overflow")
            return _Refuse()
        if spec.kind in (ListenerKind.OUTBOUND_CAPTURE, ListenerKind.INBOUND_CAPTURE):
            s = ctx.snapshot.settings
            own = frozenset({s.proxy_listen_port, s.proxy_inbound_listen_port, s.proxy_admin_port})
            return CaptureEntry(ctx, spec, self.access_log, own)
        binding = spec.binding
        assert binding is not None
        if spec.kind is ListenerKind.INGRESS:
            mode = ctx.snapshot.mtls.mode_for(spec.port)
            if mode != "DISABLE":
                return MtlsGate(ctx, mode, lambda peer: self._plain(spec, binding, peer))
        return self._plain(spec, binding, None)

    def _plain(
        self, spec: ListenerSpec, binding: PortBinding, peer: PeerInfo | None
    ) -> asyncio.Protocol:
        if binding.protocol is L7.HTTP:
            return _HttpAuto(self.ctx, spec, binding, self.access_log, peer)
        return _LazyTcp(self.ctx, spec, binding, peer, self.access_log)

    async def close(self) -> None:
        for server in (self.server, self.server_v6):
            if server is not None:
                server.close()
        self.server = self.server_v6 = None


class _HttpAuto(asyncio.Protocol):
    """Envoy's codec AUTO: HTTP/2 if the client opens with the h2 preface, else HTTP/1.1."""

    def __init__(
        self,
        ctx: ProxyContext,
        spec: ListenerSpec,
        binding: PortBinding,
        access_log: AccessLogs | None,
        peer: PeerInfo | None = None,
    ) -> None:
        self.ctx, self.spec, self.binding, self.access_log = ctx, spec, binding, access_log
        self.inbound = spec.kind.inbound
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # A client that connects and says nothing is closed as a slow request head would be.
        timeout = self.ctx.snapshot.settings.request_headers_timeout
        self._timer = asyncio.get_running_loop().call_later(timeout, self.transport.close)
        self.ctx.connections.add(self)  # counts against the connection limit from accept

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def close_idle(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def shed_buffered(self, min_bytes: int) -> int:
        return 0  # nothing is buffered for a client before its protocol is known

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
        h2 = is_h2_preface(data)
        if h2 is None:
            self._buffer = data
            if len(data) > len(PREFACE):  # cannot happen: decided by then
                h2 = False
            else:
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.connections.discard(self)
        spec = self.spec
        factory = DownstreamHttp2 if h2 else DownstreamHttp1
        proto = factory(
            self.ctx,
            spec.kind,
            self.binding,
            spec.key,
            spec.port,
            None,
            self.access_log,
            peer=self.peer,
        )
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.set_protocol(as_protocol(proto))
        proto.connection_made(transport)
        proto.data_received(data)

    def eof_received(self) -> bool | None:
        if self.transport is not None:
            self.transport.close()
        return None


class _LazyTcp(asyncio.Protocol):
    """Explicit TCP listener: builds the relay with the peer address once connected."""

    def __init__(
        self,
        ctx: ProxyContext,
        spec: ListenerSpec,
        binding: PortBinding,
        peer: PeerInfo | None = None,
        access_log: AccessLogs | None = None,
    ) -> None:
        self.ctx, self.spec, self.binding, self.peer = ctx, spec, binding, peer
        self.access_log = access_log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        relay = _tcp(
            self.ctx,
            self.spec.kind,
            self.binding.tcp_cluster or "",
            self.binding.service,
            None,
            str(peer[0]) if peer else "",
            self.peer,
            self.spec.port,
            self.access_log,
        )
        transport.set_protocol(relay)
        relay.connection_made(transport)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]
