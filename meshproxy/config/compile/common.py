"""What every compile step shares: the naming rules (FQDNs, cluster names, protocols) and
the context a compilation carries (services by host, rules, clusters built, problems found)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshproxy.config.reader import Reader
from meshproxy.config.resources import (
    ConnectionPool,
    DestinationRule,
    Origin,
    ProxySettings,
    ServiceEntry,
    ServicePort,
)
from meshproxy.config.snapshot import (
    L7,
    ClusterSpec,
    UpstreamProtocol,
)
from meshproxy.errors import ConfigIssue

CLUSTER_SUFFIX = ".svc.cluster.local"
INBOUND_SOURCE_ADDRESS = "127.0.0.6"
MESH_GATEWAY = "mesh"  # Istio's reserved gateway name: every sidecar
PASSTHROUGH = "PassthroughCluster"  # Istio's names for "wherever it was going"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"


def fqdn(host: str, namespace: str) -> str:
    """Istio's short-name expansion: `reviews` in namespace ns → reviews.ns.svc.cluster.local."""
    host = host.lower().rstrip(".")
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}{CLUSTER_SUFFIX}"


def host_matches(pattern: str, host: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return pattern == host


HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})  # Istio's Protocol.IsHTTP2()


def l7_of(protocol: str) -> L7:
    return L7.HTTP if protocol == "HTTP" or protocol in HTTP2_PROTOCOLS else L7.TCP


def upstream_protocol_of(protocol: str, pool: ConnectionPool | None) -> UpstreamProtocol:
    """HTTP2/GRPC ports speak h2 upstream; HTTP ports h1 unless the DestinationRule says so."""
    if pool is not None and pool.use_client_protocol:
        return UpstreamProtocol.CLIENT
    if protocol in HTTP2_PROTOCOLS:
        return UpstreamProtocol.HTTP2
    if pool is not None and pool.h2_upgrade_policy == "UPGRADE":
        return UpstreamProtocol.HTTP2
    return UpstreamProtocol.HTTP1


def cluster_name(direction: str, port: int, subset: str, host: str) -> str:
    return f"{direction}|{port}|{subset}|{host}"


@dataclass(slots=True)
class Service:
    host: str
    entry: ServiceEntry
    ports: dict[int, ServicePort]


@dataclass(slots=True)
class CompileContext:
    settings: ProxySettings
    issues: list[ConfigIssue]
    services: dict[str, Service] = field(default_factory=dict)
    rules: dict[str, DestinationRule] = field(default_factory=dict)
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rate_limited_routes: set[str] = field(default_factory=set)  # localRateLimits names used

    def reader(self, origin: Origin) -> Reader:
        return Reader(origin.doc, origin.label, self.issues)

    def find_service(self, host: str) -> Service | None:
        svc = self.services.get(host)
        if svc is not None:
            return svc
        for pattern, svc in self.services.items():
            if pattern.startswith("*") and host_matches(pattern, host):
                return svc
        return None


def vip_ips(addr: str) -> list[str]:
    try:
        net = ipaddress.ip_network(addr, strict=False)
    except ValueError:
        return []
    if net.num_addresses == 1:
        return [str(net.network_address)]
    return []  # CIDR ranges: matched by port only (not expanded)
