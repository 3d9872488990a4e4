"""Telemetry configuration as Istio spells it: MeshConfig's extensionProviders and
defaultProviders (here in ProxyConfig), and the Telemetry kind (telemetry.istio.io)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # resources.py imports this module
    from meshproxy.config.resources import Origin

DEFAULT_SAMPLING_PERCENT = 1.0  # Istio's, when tracing is on and no Telemetry says otherwise


@dataclass(frozen=True, slots=True)
class OtelProvider:
    """extensionProviders[].opentelemetry: OTLP/gRPC to service:port, or OTLP/HTTP when
    `http` is given (to http://service:port + path)."""

    service: str
    port: int
    http_path: str | None = None  # None: gRPC
    http_timeout: float = 10.0
    http_headers: tuple[tuple[str, str], ...] = ()

    @property
    def endpoint(self) -> str:
        if self.http_path is None:
            return f"{self.service}:{self.port}"
        return f"http://{self.service}:{self.port}{self.http_path}"


@dataclass(frozen=True, slots=True)
class FileAccessLogProvider:
    """extensionProviders[].envoyFileAccessLog: a path and a text or labels (JSON) format."""

    path: str
    text: str | None = None
    labels: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str
    kind: str  # "opentelemetry" | "envoyFileAccessLog" | "prometheus"
    opentelemetry: OtelProvider | None = None
    file_access_log: FileAccessLogProvider | None = None


# The provider every mesh has without declaring it (Istio's built-in Prometheus stats).
PROMETHEUS_PROVIDER = ExtensionProvider("prometheus", "prometheus")


@dataclass(frozen=True, slots=True)
class DefaultProviders:
    tracing: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("prometheus",)
    access_logging: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CustomTag:
    """A span attribute from a literal, an environment variable or a request header."""

    name: str
    kind: str  # "literal" | "environment" | "header"
    value: str = ""  # the literal, the variable's or the header's name
    default: str = ""


@dataclass(frozen=True, slots=True)
class TracingRule:
    """One Telemetry.tracing[] entry; a field left out is inherited from a wider level."""

    providers: tuple[str, ...] | None = None
    sampling_percent: float | None = None
    disable_span_reporting: bool | None = None
    custom_tags: tuple[CustomTag, ...] | None = None


@dataclass(frozen=True, slots=True)
class AccessLoggingRule:
    """One Telemetry.accessLogging[] entry; a field left out is inherited."""

    providers: tuple[str, ...] | None = None
    disabled: bool | None = None
    filter: str | None = None  # CEL, checked when the config is read
    mode: str | None = None  # CLIENT_AND_SERVER | CLIENT (outbound) | SERVER (inbound)


# Telemetry metrics[].overrides[].match.metric, in the order MetricsPolicy views are kept:
# the HTTP families, the TCP families, then Istio's gRPC message counts (not exported here).
METRICS: Final = (
    "REQUEST_COUNT",
    "REQUEST_DURATION",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "TCP_OPENED_CONNECTIONS",
    "TCP_CLOSED_CONNECTIONS",
    "TCP_SENT_BYTES",
    "TCP_RECEIVED_BYTES",
    "GRPC_REQUEST_MESSAGES",
    "GRPC_RESPONSE_MESSAGES",
)
HTTP_METRICS: Final = range(0, 4)
TCP_METRICS: Final = range(4, 8)


@dataclass(frozen=True, slots=True)
class TagOverride:
    """tagOverrides.NAME: REMOVE the label, or UPSERT it with a CEL expression's value."""

    name: str
    value: str | None  # CEL; None: REMOVE


@dataclass(frozen=True, slots=True)
class MetricOverride:
    """One metrics[].overrides[] entry."""

    metrics: tuple[int, ...]  # indexes into METRICS (ALL_METRICS: every one)
    mode: str = "CLIENT_AND_SERVER"
    disabled: bool | None = None
    tags: tuple[TagOverride, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricsRule:
    """One Telemetry.metrics[] entry; providers left out are inherited, overrides add up."""

    providers: tuple[str, ...] | None = None
    overrides: tuple[MetricOverride, ...] = ()
    reporting_interval: float | None = None  # TCP byte reports (Istio: TCP only)


@dataclass(frozen=True, slots=True)
class Telemetry:
    origin: Origin
    selector: tuple[tuple[str, str], ...] | None  # matchLabels; None: namespace/mesh wide
    tracing: tuple[TracingRule, ...] = ()
    access_logging: tuple[AccessLoggingRule, ...] = ()
    metrics: tuple[MetricsRule, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessLogSpec:
    """One access log this sidecar writes: where, in which format, for which streams."""

    path: str
    text: str | None = None  # Envoy command operators; None with labels None: Istio's format
    labels: tuple[tuple[str, str], ...] | None = None  # JSON object
    filter: str | None = None  # CEL over Istio's attributes (Telemetry filter.expression)
    source: str = "accessLogFile"  # where it was configured, for messages
    mode: str = "CLIENT_AND_SERVER"  # CLIENT: outbound streams only, SERVER: inbound only


@dataclass(frozen=True, slots=True)
class MetricView:
    """How one metric family is exported in one direction: off, or with labels removed
    and added (each added one's value is expressions[index] of its direction)."""

    disabled: bool = False
    removed: frozenset[str] = frozenset()
    upserts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class DirectionMetrics:
    """The overrides of one direction (CLIENT: outbound, SERVER: inbound). Plain data,
    hashable and picklable: it travels with the series it shaped to the admin worker."""

    views: tuple[MetricView, ...]  # by METRICS index (HTTP, then TCP)
    expressions: tuple[str, ...] = ()  # the CEL sources the upserts read, each once
    # Computed once, as each request reads them: the generated __hash__ walked every view
    # (about 1 µs a request with overrides configured), and http_off, were it a property,
    # would walk the HTTP views in interpreted Python (0.7 µs a request with metrics off).
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    http_off: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.views, self.expressions)))
        http_off = all(self.views[i].disabled for i in HTTP_METRICS)
        object.__setattr__(self, "http_off", http_off)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through __init__ in the receiving process, whose string hashes may differ.
        return (DirectionMetrics, (self.views, self.expressions))


@dataclass(frozen=True, slots=True)
class MetricsPolicy:
    """What Telemetry metrics resolved to; None for a direction: Istio's standard series."""

    outbound: DirectionMetrics | None = None
    inbound: DirectionMetrics | None = None
    reporting_interval: float | None = None  # overrides ProxyConfig tcpReportingDuration


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What this sidecar does for tracing, resolved from providers and Telemetry resources."""

    provider_name: str
    provider: OtelProvider
    sampling_percent: float = DEFAULT_SAMPLING_PERCENT
    disable_span_reporting: bool = False
    custom_tags: tuple[CustomTag, ...] = ()
