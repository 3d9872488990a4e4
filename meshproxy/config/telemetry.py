"""Telemetry configuration as Istio spells it: MeshConfig's extensionProviders and
defaultProviders (here in ProxyConfig), and the Telemetry kind (telemetry.istio.io)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


@dataclass(frozen=True, slots=True)
class Telemetry:
    origin: Origin
    selector: tuple[tuple[str, str], ...] | None  # matchLabels; None: namespace/mesh wide
    tracing: tuple[TracingRule, ...] = ()
    access_logging: tuple[AccessLoggingRule, ...] = ()


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
class TracingConfig:
    """What this sidecar does for tracing, resolved from providers and Telemetry resources."""

    provider_name: str
    provider: OtelProvider
    sampling_percent: float = DEFAULT_SAMPLING_PERCENT
    disable_span_reporting: bool = False
    custom_tags: tuple[CustomTag, ...] = ()
