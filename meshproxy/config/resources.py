"""Typed, validated Istio resources (and our ProxyConfig), as read from YAML, not yet compiled."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshproxy.config.source import Document, Path_
from meshproxy.config.telemetry import (
    PROMETHEUS_PROVIDER,
    DefaultProviders,
    ExtensionProvider,
    Telemetry,
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a resource came from, for error messages after parsing."""

    doc: Document
    kind: str
    name: str
    namespace: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


# ---- ServiceEntry -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    protocol: str  # upper-case Istio protocol: HTTP, HTTP2, GRPC, TCP, TLS, HTTPS, MONGO, ...
    name: str
    target_port: int | None


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    address: str
    ports: dict[str, int]
    labels: dict[str, str]
    weight: int
    service_account: str | None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    origin: Origin
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServicePort, ...]
    endpoints: tuple[WorkloadEndpoint, ...]
    resolution: str
    location: str


# ---- VirtualService -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # exact | prefix | regex | present
    value: str


@dataclass(frozen=True, slots=True)
class SourceMatch:
    """A match's conditions on the calling workload (Istio's sourceLabels, sourceNamespace,
    gateways). For a sidecar the caller is its own workload, so they are decided once, at
    compile time, against ProxyConfig labels and namespace; "mesh" names all sidecars."""

    labels: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None
    gateways: tuple[str, ...] = ()


ANY_SOURCE = SourceMatch()


def selects(selector: Iterable[tuple[str, str]], labels: Mapping[str, str]) -> bool:
    """Whether a label selector (every pair must match) selects a workload with `labels`."""
    return all(labels.get(k) == v for k, v in selector)


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    path: Path_
    uri: StringMatch | None
    method: StringMatch | None
    authority: StringMatch | None
    scheme: StringMatch | None
    headers: tuple[tuple[str, StringMatch], ...]
    without_headers: tuple[tuple[str, StringMatch], ...]
    query_params: tuple[tuple[str, StringMatch], ...]
    port: int | None
    ignore_uri_case: bool
    source: SourceMatch = ANY_SOURCE


@dataclass(frozen=True, slots=True)
class Destination:
    path: Path_
    host: str
    subset: str | None
    port: int | None


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations = HeaderOperations()
    response: HeaderOperations = HeaderOperations()


@dataclass(frozen=True, slots=True)
class WeightedDestination:
    destination: Destination
    weight: int | None
    headers: Headers


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    """VirtualService http[].retries as written (None fields: Istio's defaults)."""

    attempts: int | None = None
    per_try_timeout: float | None = None
    retry_on: tuple[str, ...] | None = None
    retry_ignore_previous_hosts: bool = True


@dataclass(frozen=True, slots=True)
class HTTPFault:
    delay: float | None = None
    delay_percent: float | None = None  # None: not given, which Istio turns into 0 %
    abort_status: int | None = None
    abort_grpc: str | None = None
    abort_percent: float | None = None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """VirtualService corsPolicy, answered by the proxy as Envoy's CORS filter does."""

    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    forward_unmatched_preflights: bool = True  # unmatchedPreflights: FORWARD (default)


@dataclass(frozen=True, slots=True)
class Delegate:
    """http[].delegate: the routes of another VirtualService (one without hosts)."""

    name: str
    namespace: str | None = None  # None: the root VirtualService's namespace


@dataclass(frozen=True, slots=True)
class HTTPMirror:
    """VirtualService mirror/mirrorPercentage, or one of `mirrors`."""

    destination: Destination
    percent: float = 100.0  # Istio: an absent mirrorPercentage mirrors every request


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    path: Path_
    name: str
    matches: tuple[HTTPMatch, ...]
    route: tuple[WeightedDestination, ...]
    timeout: float | None
    rewrite_uri: str | None
    rewrite_authority: str | None
    headers: Headers
    # redirect and directResponse, validated by the schema and compiled from the raw fields
    direct: dict[str, Any] = field(default_factory=dict)
    retries: HTTPRetry | None = None
    fault: HTTPFault | None = None
    mirrors: tuple[HTTPMirror, ...] = ()
    cors: CorsPolicy | None = None
    rewrite_regex: tuple[str, str] | None = None  # rewrite.uriRegexRewrite {match, rewrite}
    delegate: Delegate | None = None


@dataclass(frozen=True, slots=True)
class TCPMatch:
    port: int | None
    source: SourceMatch = ANY_SOURCE


@dataclass(frozen=True, slots=True)
class TCPRoute:
    path: Path_
    matches: tuple[TCPMatch, ...]
    route: tuple[WeightedDestination, ...]


@dataclass(frozen=True, slots=True)
class VirtualService:
    origin: Origin
    hosts: tuple[str, ...]
    http: tuple[HTTPRoute, ...]
    tcp: tuple[TCPRoute, ...]
    gateways: tuple[str, ...] = ()  # empty or with "mesh": applies to sidecars


# ---- DestinationRule ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    max_connections: int | None = None
    connect_timeout: float | None = None
    tcp_idle_timeout: float | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    h2_upgrade_policy: str | None = None
    use_client_protocol: bool = False


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """DestinationRule trafficPolicy.retryBudget (Envoy's circuit breaker retry_budget):
    concurrent retries may be `percent` % of the requests active and pending, and at least
    `min_retry_concurrency`; it replaces connectionPool.http.maxRetries."""

    percent: float = 20.0
    min_retry_concurrency: int = 3


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ClientTls:
    """DestinationRule trafficPolicy.tls: how to originate TLS to the endpoints."""

    mode: str  # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """DestinationRule loadBalancer.consistentHash: what a request hashes on, and how."""

    key: str  # header | cookie | source_ip | query
    name: str = ""  # the header, cookie or query parameter
    cookie_path: str = ""
    cookie_ttl: float | None = None  # set: a missing cookie is generated (Set-Cookie)
    maglev: bool = False  # else ring hash
    size: int = 1024  # ring: minimum entries; maglev: table size (a prime)


@dataclass(frozen=True, slots=True)
class Warmup:
    """loadBalancer.warmup (or warmupDurationSecs): slow start for new endpoints."""

    duration: float
    minimum_percent: float = 10.0
    aggression: float = 1.0


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    """loadBalancer: Istio's oneof of `simple` and `consistentHash`, and slow start."""

    simple: str | None = None
    consistent_hash: ConsistentHash | None = None
    warmup: Warmup | None = None
    locality_setting: bool = False  # localityLbSetting given (accepted, not applied)


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTls | None = None
    port_level: tuple[tuple[int, TrafficPolicy], ...] = ()
    retry_budget: RetryBudget | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    path: Path_
    name: str
    labels: dict[str, str]
    traffic_policy: TrafficPolicy | None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    origin: Origin
    host: str
    traffic_policy: TrafficPolicy | None
    subsets: tuple[Subset, ...]


# ---- Sidecar ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarPort:
    number: int
    protocol: str
    name: str


@dataclass(frozen=True, slots=True)
class IngressListener:
    path: Path_
    port: SidecarPort
    bind: str | None
    capture_mode: str
    default_endpoint: str | None


@dataclass(frozen=True, slots=True)
class EgressListener:
    path: Path_
    port: SidecarPort | None
    bind: str | None
    capture_mode: str
    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Sidecar:
    origin: Origin
    ingress: tuple[IngressListener, ...]
    egress: tuple[EgressListener, ...]
    outbound_mode: str | None


# ---- ProxyConfig (meshproxy.io/v1alpha1) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    """ProxyConfig localRateLimits[]: one token bucket (Envoy local_ratelimit) for the HTTP
    requests of a port (and direction) or of one named VirtualService route."""

    name: str
    max_tokens: int
    tokens_per_fill: int = 1
    fill_interval: float = 1.0
    port: int | None = None
    inbound: bool = True
    virtual_service: str | None = None
    namespace: str | None = None  # of the VirtualService; None: the proxy's namespace
    route: str | None = None
    status: int = 429


@dataclass(frozen=True, slots=True)
class OverloadSettings:
    """Envoy's overload manager for the process's memory (ProxyConfig `overload`): at
    `shrink_heap` of the limit free memory goes back to the kernel; at `stop_requests` new
    requests get 503 (flag OM) and idle connections are shed."""

    memory_limit: int = -1  # bytes; -1: the container's memory limit (cgroup), 0: off
    shrink_heap: float = 0.90  # Envoy's shrink_heap action threshold
    stop_requests: float = 0.95  # Envoy's stop_accepting_requests action threshold


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Process settings; names follow Istio's ProxyConfig/MeshConfig where one exists."""

    proxy_admin_port: int = 15000
    admin_bind: str = "127.0.0.1"
    status_port: int = 15021
    # Envoy's Prometheus listener in Istio's sidecars, 0.0.0.0:15090 /stats/prometheus; None:
    # 15090 when capturing (a sidecar), off otherwise (the admin port serves the same).
    stats_port: int | None = None
    tcp_reporting_duration: float = 15.0  # Istio's stats filter tcp_reporting_duration
    proxy_listen_port: int = 15001
    proxy_inbound_listen_port: int = 15006
    interception_mode: str = "REDIRECT"  # REDIRECT | NONE (no capture listeners)
    drain_duration: float = 5.0
    # Istio's terminationDrainDuration: after SIGTERM, inbound drains while outbound keeps
    # serving the app for this long, then the proxy exits.
    termination_drain_duration: float = 5.0
    # MeshConfig protocolDetectionTimeout: how long a connection to a port that declares no
    # protocol may stay silent before it is relayed as opaque TCP (server-first protocols).
    # Istio's current default 0s waits forever, hanging those protocols; Istio documented 5s
    # before, as here. 0 waits forever.
    protocol_detection_timeout: float = 5.0
    concurrency: int = 1
    http1_codec: str = "auto"  # auto | httptools | h11
    connect_timeout: float = 10.0
    upstream_idle_timeout: float = 4.0
    request_headers_timeout: float = 10.0
    idle_timeout: float = 3600.0
    # Envoy's stream_idle_timeout: a stream with no bytes moving either way for this long is
    # reset (408 before a response). Istio's sidecars turn it off (0), for long-lived gRPC
    # streams and long polls; so does this default.
    stream_idle_timeout: float = 0.0
    max_request_headers_kb: int = 60
    max_headers_count: int = 100
    max_connections: int = 10_000
    access_log_file: str = ""
    namespace: str = "default"
    outbound_traffic_policy: str = "ALLOW_ANY"
    trust_domain: str = "cluster.local"
    # Istio's file-mounted workload certificate layout (ProxyConfig spec.certificates).
    cert_chain: str = "/etc/certs/cert-chain.pem"
    private_key: str = "/etc/certs/key.pem"
    root_cert: str = "/etc/certs/root-cert.pem"
    labels: tuple[tuple[str, str], ...] = ()  # this workload's labels (policy selectors)
    root_namespace: str = "istio-system"  # MeshConfig rootNamespace: mesh-wide policies
    path_normalization: str = "MERGE_SLASHES"  # NONE | BASE | MERGE_SLASHES | DECODE_AND_...
    # Envoy's names. Not Envoy's default (ALLOW): `X_User` reaches a CGI/WSGI app as X-User.
    headers_with_underscores_action: str = "DROP_HEADER"  # ALLOW | REJECT_REQUEST | DROP_HEADER
    local_rate_limits: tuple[LocalRateLimit, ...] = ()
    overload: OverloadSettings = OverloadSettings()

    @property
    def prometheus_port(self) -> int:
        if self.stats_port is not None:
            return self.stats_port
        return 15090 if self.interception_mode == "REDIRECT" else 0

    # Istio's workload facts for telemetry: the pod's owner (WORKLOAD_NAME) and cluster id.
    workload_name: str = ""  # "" : the canonical service name, else "unknown"
    cluster_id: str = "Kubernetes"  # Istio's default CLUSTER_ID
    # MeshConfig's extensionProviders and defaultProviders (telemetry backends by name).
    extension_providers: tuple[ExtensionProvider, ...] = ()
    default_providers: DefaultProviders = field(default_factory=DefaultProviders)

    def provider(self, name: str) -> ExtensionProvider | None:
        for p in self.extension_providers:
            if p.name == name:
                return p
        return PROMETHEUS_PROVIDER if name == PROMETHEUS_PROVIDER.name else None


@dataclass(frozen=True, slots=True)
class ProxyConfigResource:
    origin: Origin
    settings: ProxySettings
    explicit: frozenset[str]


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    origin: Origin
    selector: tuple[tuple[str, str], ...] | None  # matchLabels; None: namespace/mesh wide
    mode: str | None  # STRICT | PERMISSIVE | DISABLE; None (UNSET) inherits
    port_modes: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzSource:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    sources: tuple[AuthzSource, ...] = ()  # rules[].from[].source: any may match
    operations: tuple[AuthzOperation, ...] = ()  # rules[].to[].operation: any may match
    conditions: tuple[AuthzCondition, ...] = ()  # rules[].when: all must match


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    origin: Origin
    selector: tuple[tuple[str, str], ...] | None
    action: str  # ALLOW | DENY | AUDIT
    rules: tuple[AuthzRule, ...]


Resource = (
    ServiceEntry
    | VirtualService
    | DestinationRule
    | Sidecar
    | ProxyConfigResource
    | PeerAuthentication
    | AuthorizationPolicy
    | Telemetry
)
