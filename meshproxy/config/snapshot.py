"""The compiled, immutable configuration the data plane reads: one object, swapped whole."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshproxy.config.resources import ClientTls, ConsistentHash, ProxySettings, Warmup
from meshproxy.config.telemetry import AccessLogSpec, MetricsPolicy, TracingConfig
from meshproxy.routing.table import RateLimit, RouteTable
from meshproxy.security.authz import Authorizer


class LbPolicy(enum.Enum):
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"


class Resolution(enum.Enum):
    STATIC = "STATIC"
    DNS = "DNS"
    ORIGINAL_DST = "ORIGINAL_DST"  # connect where the intercepted connection was going
    # The app in this pod, on loopback at the port the intercepted connection was for
    # (the inbound passthrough: never the pod IP, which the proxy's own rules would capture).
    LOCAL_APP = "LOCAL_APP"


class L7(enum.Enum):
    HTTP = "http"
    TCP = "tcp"
    SNIFF = "sniff"  # decide from the first bytes


class UpstreamProtocol(enum.Enum):
    """The HTTP version spoken to a cluster's endpoints (Istio: port protocol + h2UpgradePolicy)."""

    HTTP1 = "HTTP/1.1"
    HTTP2 = "HTTP/2"
    CLIENT = "client"  # useClientProtocol: the downstream's version


class ListenerKind(enum.Enum):
    OUTBOUND_CAPTURE = "outbound-capture"
    INBOUND_CAPTURE = "inbound-capture"
    EGRESS = "egress"
    INGRESS = "ingress"

    @property
    def inbound(self) -> bool:
        return self in (ListenerKind.INBOUND_CAPTURE, ListenerKind.INGRESS)

    @property
    def captures(self) -> bool:
        return self in (ListenerKind.OUTBOUND_CAPTURE, ListenerKind.INBOUND_CAPTURE)


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str  # IP (STATIC) or host name (DNS)
    port: int
    weight: int = 1
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class OutlierSpec:
    """outlierDetection with Istio's defaults filled in."""

    consecutive_5xx: int = 5  # 0: off
    consecutive_gateway: int = 0  # 0: off (Istio's default)
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    min_health_percent: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """An upstream cluster. Hashable: an unchanged spec keeps its pools across reloads."""

    name: str  # Istio's form: outbound|9080|v1|reviews.default.svc.cluster.local
    service: str  # destination_service label
    port: int
    protocol: L7
    resolution: Resolution
    endpoints: tuple[Endpoint, ...]
    lb: LbPolicy = LbPolicy.LEAST_REQUEST
    connect_timeout: float = 10.0
    idle_timeout: float = 4.0
    max_requests_per_connection: int = 0  # 0: unlimited
    bind_source: str | None = None  # inbound clusters bind 127.0.0.6 (Istio's loop guard)
    subset: str = ""
    upstream_protocol: UpstreamProtocol = UpstreamProtocol.HTTP1
    tls: ClientTls | None = None  # TLS origination (DestinationRule tls, or auto mTLS)
    outlier: OutlierSpec | None = None  # DestinationRule outlierDetection
    # connectionPool thresholds (Istio: unset = 2^32-1); None: no limit
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None
    max_retries: int | None = None
    consistent_hash: ConsistentHash | None = None  # DestinationRule consistentHash
    warmup: Warmup | None = None  # DestinationRule loadBalancer.warmup (slow start)
    retry_budget: tuple[float, int] | None = None  # (percent, min concurrency): retryBudget


@dataclass(frozen=True, slots=True)
class PortBinding:
    """What a captured or explicit destination port leads to."""

    protocol: L7
    route_table: RouteTable | None  # HTTP
    tcp_cluster: str | None  # TCP: the single service on this port, if there is one
    service: str = ""


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    name: str
    kind: ListenerKind
    address: str
    port: int
    binding: PortBinding | None  # None for the capture listeners (looked up per connection)

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """What PeerAuthentication decides for inbound traffic: STRICT, PERMISSIVE or DISABLE."""

    default: str = "PERMISSIVE"  # Istio's default when no policy says otherwise
    ports: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))

    def mode_for(self, port: int) -> str:
        return self.ports.get(port, self.default)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    settings: ProxySettings
    listeners: tuple[ListenerSpec, ...]
    clusters: Mapping[str, ClusterSpec]
    outbound_by_vip: Mapping[tuple[str, int], PortBinding]
    outbound_by_port: Mapping[int, PortBinding]
    inbound_by_port: Mapping[int, PortBinding]
    registry_only: bool
    source: Mapping[str, str]  # each kind's validated resources as JSON, for /config_dump
    warnings: tuple[str, ...] = ()
    explicit_bindings: Mapping[tuple[str, int], PortBinding] = field(
        default_factory=lambda: MappingProxyType({})
    )
    mtls: MtlsPolicy = field(default_factory=MtlsPolicy)
    authz: Authorizer | None = None  # AuthorizationPolicies selecting this workload
    # ProxyConfig localRateLimits by (inbound, port); route buckets live on their Route
    port_rate_limits: Mapping[tuple[bool, int], RateLimit] = field(
        default_factory=lambda: MappingProxyType({})
    )
    rate_limits: frozenset[RateLimit] = frozenset()  # every bucket, port and route
    service_hosts: frozenset[str] = frozenset()  # every ServiceEntry host (FQDN)
    tracing: TracingConfig | None = None  # None: no tracing (headers pass untouched)
    access_logs: tuple[AccessLogSpec, ...] = ()  # where streams are logged, and how
    metrics: MetricsPolicy = field(default_factory=MetricsPolicy)  # Telemetry overrides

    def inbound_service(self, authority: str) -> str:
        """Istio's destination_service for a request this workload serves: the service its
        Host names (short names expanded in this namespace), when the mesh knows it."""
        host = authority.rpartition(":")[0] if authority.count(":") == 1 else authority
        host = host.lower().rstrip(".")
        if host in self.service_hosts:
            return host
        dots = host.count(".")
        ns = self.settings.namespace
        expanded = f"{host}.{ns}.svc.cluster.local" if dots == 0 else f"{host}.svc.cluster.local"
        return expanded if dots <= 1 and expanded in self.service_hosts else "unknown"

    def is_mesh_cluster(self, name: str) -> bool:
        """Whether requests to cluster `name` go over mesh mTLS (ISTIO_MUTUAL)."""
        spec = self.clusters.get(name)
        return spec is not None and spec.tls is not None and spec.tls.mode == "ISTIO_MUTUAL"

    def uses_mesh_mtls(self) -> bool:
        """Whether the workload certificate matters: a capturing sidecar (its PERMISSIVE ports
        serve mTLS peers), a STRICT port, or ISTIO_MUTUAL origination (explicit or auto)."""
        return self.settings.interception_mode == "REDIRECT" or self.requires_mesh_mtls()

    def requires_mesh_mtls(self) -> bool:
        """Whether some traffic cannot flow without the workload certificate: a STRICT port,
        or ISTIO_MUTUAL origination (explicit or auto). Readiness waits for it then."""
        if self.mtls.default == "STRICT" or "STRICT" in self.mtls.ports.values():
            return True
        return any(
            c.tls is not None and c.tls.mode == "ISTIO_MUTUAL" for c in self.clusters.values()
        )

    def binding_for(
        self, kind: ListenerKind, key: tuple[str, int], original_dst: tuple[str, int] | None
    ) -> PortBinding | None:
        """What a connection on listener `key` leads to under this snapshot."""
        if kind is ListenerKind.OUTBOUND_CAPTURE:
            return self.outbound_binding(*original_dst) if original_dst else None
        if kind is ListenerKind.INBOUND_CAPTURE:
            return self.inbound_by_port.get(original_dst[1]) if original_dst else None
        return self.explicit_bindings.get(key)

    def outbound_binding(self, ip: str, port: int) -> PortBinding | None:
        return self.outbound_by_vip.get((ip, port)) or self.outbound_by_port.get(port)
