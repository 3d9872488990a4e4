"""Compile validated resources into a Snapshot: resolve every reference, build route tables.

A pure function: the same resources always give the same snapshot (apart from `version`).
Problems found here (dangling hosts and subsets, port clashes) are reported like parse errors,
with the resource and field they come from.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshproxy.codec.grpc import GRPC_RETRY_ON
from meshproxy.config.delegate import expand_delegates
from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    ANY_SOURCE,
    AuthorizationPolicy,
    ClientTls,
    ConnectionPool,
    CorsPolicy,
    Destination,
    DestinationRule,
    HeaderOperations,
    HTTPFault,
    HTTPMatch,
    HTTPRetry,
    LocalRateLimit,
    Origin,
    OutlierDetection,
    PeerAuthentication,
    ProxyConfigResource,
    ProxySettings,
    Resource,
    ServiceEntry,
    ServicePort,
    Sidecar,
    SourceMatch,
    StringMatch,
    TrafficPolicy,
    VirtualService,
    selects,
)
from meshproxy.config.schema.virtual_service import GRPC_STATUS_NAMES
from meshproxy.config.snapshot import (
    L7,
    ClusterSpec,
    Endpoint,
    LbPolicy,
    ListenerKind,
    ListenerSpec,
    MtlsPolicy,
    OutlierSpec,
    PortBinding,
    Resolution,
    Snapshot,
    UpstreamProtocol,
)
from meshproxy.config.telemetry import Telemetry
from meshproxy.config.telemetry_resolve import (
    resolve_access_logs,
    resolve_metrics,
    resolve_tracing,
)
from meshproxy.errors import ConfigIssue
from meshproxy.routing.cors import Cors
from meshproxy.routing.match import RequestMatcher, StringMatcher
from meshproxy.routing.regex import Regex
from meshproxy.routing.table import (
    INBOUND_DEFAULT_RETRY,
    NO_HEADER_OPS,
    NO_RETRY,
    OUTBOUND_DEFAULT_RETRY,
    DirectReply,
    Fault,
    HeaderOps,
    Mirror,
    RateLimit,
    RetryPolicy,
    Route,
    RouteTable,
    RouteTarget,
    VirtualHost,
)
from meshproxy.security.authz import Authorizer, applicable

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
class _Service:
    host: str
    entry: ServiceEntry
    ports: dict[int, ServicePort]


@dataclass(slots=True)
class _Context:
    settings: ProxySettings
    issues: list[ConfigIssue]
    services: dict[str, _Service] = field(default_factory=dict)
    rules: dict[str, DestinationRule] = field(default_factory=dict)
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rate_limited_routes: set[str] = field(default_factory=set)  # localRateLimits names used

    def reader(self, origin: Origin) -> Reader:
        return Reader(origin.doc, origin.label, self.issues)

    def find_service(self, host: str) -> _Service | None:
        svc = self.services.get(host)
        if svc is not None:
            return svc
        for pattern, svc in self.services.items():
            if pattern.startswith("*") and host_matches(pattern, host):
                return svc
        return None


def compile_snapshot(
    resources: Iterable[Resource],
    settings: ProxySettings,
    version: int,
    source: dict[str, str],
    issues: list[ConfigIssue],
) -> Snapshot | None:
    """Build the snapshot, or None with `issues` extended by everything that is wrong."""
    resources = list(resources)
    ctx = _Context(settings, issues)
    entries = [r for r in resources if isinstance(r, ServiceEntry)]
    rules = [r for r in resources if isinstance(r, DestinationRule)]
    services_vs = [r for r in resources if isinstance(r, VirtualService) and _for_sidecars(r)]
    services_vs = expand_delegates(services_vs, ctx.reader, ctx.warnings)
    sidecars = [r for r in resources if isinstance(r, Sidecar)]
    peer_authns = [r for r in resources if isinstance(r, PeerAuthentication)]
    authz_policies = [r for r in resources if isinstance(r, AuthorizationPolicy)]
    telemetries = [r for r in resources if isinstance(r, Telemetry)]
    before = len(issues)
    tracing = resolve_tracing(settings, telemetries, issues)

    _index_services(ctx, entries)
    _index_rules(ctx, rules)
    _build_clusters(ctx)
    sidecar = sidecars[0] if sidecars else None
    registry_only = settings.outbound_traffic_policy == "REGISTRY_ONLY"
    if sidecar is not None and sidecar.outbound_mode is not None:
        registry_only = sidecar.outbound_mode == "REGISTRY_ONLY"
    visible = _visible_hosts(ctx, sidecar)
    tables = _route_tables(ctx, services_vs, visible)
    tcp_vs = _tcp_virtual_services(services_vs)

    outbound_by_vip: dict[tuple[str, int], PortBinding] = {}
    outbound_by_port: dict[int, PortBinding] = {}
    for port, table in tables.items():
        outbound_by_port[port] = PortBinding(L7.HTTP, table, None)
    tcp_by_port: dict[int, list[_Service]] = defaultdict(list)
    for svc in ctx.services.values():
        if svc.host not in visible:
            continue
        for number, sp in svc.ports.items():
            binding = _service_binding(ctx, svc, sp, tables, tcp_vs)
            for addr in svc.entry.addresses:
                for ip in _vip_ips(addr):
                    outbound_by_vip[(ip, number)] = binding
            if binding.protocol is L7.TCP:
                tcp_by_port[number].append(svc)
    for number, svcs in tcp_by_port.items():
        if number in outbound_by_port:
            continue
        no_vip = [s for s in svcs if not s.entry.addresses]
        if len(no_vip) == 1:
            svc = no_vip[0]
            outbound_by_port[number] = _service_binding(ctx, svc, svc.ports[number], tables, tcp_vs)

    for name, inbound in ((PASSTHROUGH, False), (INBOUND_PASSTHROUGH, True)):
        bind = INBOUND_SOURCE_ADDRESS if inbound else None
        ctx.clusters[name] = ClusterSpec(
            name,
            name,
            0,
            L7.TCP,
            Resolution.LOCAL_APP if inbound else Resolution.ORIGINAL_DST,
            (),
            LbPolicy.ROUND_ROBIN,
            settings.connect_timeout,
            settings.upstream_idle_timeout,
            0,
            bind,
        )
    listeners = _listeners(ctx, sidecar, tables, tcp_vs, visible)
    proxy_configs = [r for r in resources if isinstance(r, ProxyConfigResource)]
    port_rate_limits = _port_rate_limits(
        ctx, services_vs, proxy_configs[0] if proxy_configs else None
    )
    inbound_by_port = _inbound_bindings(ctx, sidecar)

    if len(issues) > before:
        return None
    return Snapshot(
        version=version,
        settings=settings,
        listeners=tuple(listeners),
        clusters=MappingProxyType(dict(ctx.clusters)),
        outbound_by_vip=MappingProxyType(outbound_by_vip),
        outbound_by_port=MappingProxyType(outbound_by_port),
        inbound_by_port=MappingProxyType(inbound_by_port),
        registry_only=registry_only,
        source=MappingProxyType(source),
        warnings=tuple(ctx.warnings),
        explicit_bindings=MappingProxyType(
            {spec.key: spec.binding for spec in listeners if spec.binding is not None}
        ),
        mtls=_mtls_policy(settings, peer_authns),
        authz=_authorizer(settings, authz_policies),
        port_rate_limits=MappingProxyType(port_rate_limits),
        rate_limits=frozenset(_bucket(limit) for limit in settings.local_rate_limits),
        service_hosts=frozenset(ctx.services),
        tracing=tracing,
        access_logs=resolve_access_logs(settings, telemetries, issues),
        metrics=resolve_metrics(settings, telemetries),
    )


def _authorizer(settings: ProxySettings, policies: list[AuthorizationPolicy]) -> Authorizer | None:
    mine = applicable(policies, settings.namespace, dict(settings.labels), settings.root_namespace)
    return Authorizer(mine) if mine else None


def _mtls_policy(settings: ProxySettings, policies: list[PeerAuthentication]) -> MtlsPolicy:
    """Istio's precedence: workload selector > namespace > mesh (root namespace); UNSET
    inherits; portLevelMtls (workload policies only) overrides per port; default PERMISSIVE."""
    labels = dict(settings.labels)
    by_name = sorted(policies, key=lambda p: p.origin.name)
    mesh = next(
        (
            p
            for p in by_name
            if p.origin.namespace == settings.root_namespace and p.selector is None
        ),
        None,
    )
    namespace = next(
        (p for p in by_name if p.origin.namespace == settings.namespace and p.selector is None),
        None,
    )
    workload = next(
        (
            p
            for p in by_name
            if p.origin.namespace == settings.namespace
            and p.selector is not None
            and p.selector
            and selects(p.selector, labels)
        ),
        None,
    )
    mode = "PERMISSIVE"
    for level in (mesh, namespace, workload):
        if level is not None and level.mode is not None:
            mode = level.mode
    ports = dict(workload.port_modes) if workload is not None else {}
    return MtlsPolicy(mode, MappingProxyType(ports))


def _vip_ips(addr: str) -> list[str]:
    try:
        net = ipaddress.ip_network(addr, strict=False)
    except ValueError:
        return []
    if net.num_addresses == 1:
        return [str(net.network_address)]
    return []  # CIDR ranges: matched by port only (not expanded)


# ---- services and destination rules --------------------------------------------------------------


def _index_services(ctx: _Context, entries: list[ServiceEntry]) -> None:
    for se in entries:
        r = ctx.reader(se.origin)
        for i, host in enumerate(se.hosts):
            name = fqdn(host, se.origin.namespace)
            if name in ctx.services:
                other = ctx.services[name].entry.origin
                r.error(
                    ("spec", "hosts", i),
                    f"host {name!r} is already declared by ServiceEntry {other.name} "
                    f"({other.doc.file})",
                )
                continue
            ctx.services[name] = _Service(name, se, {p.number: p for p in se.ports})
        for i, addr in enumerate(se.addresses):
            try:
                ipaddress.ip_network(addr, strict=False)
            except ValueError:
                r.error(("spec", "addresses", i), f"{addr!r} is not an IP address or CIDR")


def _index_rules(ctx: _Context, rules: list[DestinationRule]) -> None:
    for dr in rules:
        r = ctx.reader(dr.origin)
        host = fqdn(dr.host, dr.origin.namespace)
        if host in ctx.rules:
            r.error(
                ("spec", "host"),
                f"host {host!r} already has DestinationRule {ctx.rules[host].origin.name}",
            )
            continue
        if ctx.find_service(host) is None:
            r.error(
                ("spec", "host"),
                f"no ServiceEntry declares host {host!r}{did_you_mean(host, ctx.services)}",
            )
            continue
        ctx.rules[host] = dr


def _policy_for(rule: DestinationRule | None, subset: str, port: int) -> TrafficPolicy | None:
    """Istio's MergeTrafficPolicy: the DR policy (its settings for this port replacing all of
    it), then each field the subset's policy sets, then the subset's settings for this port
    replacing all (port-level settings never inherit: what they leave out is default)."""
    if rule is None:
        return None
    policy = _at_port(rule.traffic_policy, port)
    for s in rule.subsets:
        if s.name == subset and s.traffic_policy is not None:
            sub = s.traffic_policy
            base = policy or TrafficPolicy()
            policy = _at_port(
                TrafficPolicy(
                    sub.load_balancer or base.load_balancer,
                    sub.connection_pool or base.connection_pool,
                    sub.outlier_detection or base.outlier_detection,
                    sub.tls or base.tls,
                    sub.port_level,
                    sub.retry_budget or base.retry_budget,
                ),
                port,
            )
    return policy


def _at_port(policy: TrafficPolicy | None, port: int) -> TrafficPolicy | None:
    if policy is not None:
        for number, port_policy in policy.port_level:
            if number == port:
                return port_policy
    return policy


def _endpoints(svc: _Service, sp: ServicePort, labels: dict[str, str]) -> tuple[Endpoint, ...]:
    out = []
    default_port = sp.target_port or sp.number
    for ep in svc.entry.endpoints:
        if any(ep.labels.get(k) != v for k, v in labels.items()):
            continue
        port = ep.ports.get(sp.name, default_port)
        out.append(Endpoint(ep.address, port, ep.weight, tuple(sorted(ep.labels.items()))))
    return tuple(out)


def _make_cluster(
    ctx: _Context, svc: _Service, sp: ServicePort, subset: str, labels: dict[str, str]
) -> ClusterSpec:
    rule = ctx.rules.get(svc.host)
    policy = _policy_for(rule, subset, sp.number)
    entry = svc.entry
    endpoints = _endpoints(svc, sp, labels)
    if entry.resolution in ("DNS", "DNS_ROUND_ROBIN"):
        resolution = Resolution.DNS
        if not entry.endpoints:
            endpoints = (Endpoint(svc.host, sp.target_port or sp.number),)
    elif entry.resolution == "STATIC" or entry.endpoints:
        resolution = Resolution.STATIC
    else:
        resolution = Resolution.ORIGINAL_DST
    lb = LbPolicy.LEAST_REQUEST
    connect_timeout = ctx.settings.connect_timeout
    idle_timeout = ctx.settings.upstream_idle_timeout
    max_per_conn = 0
    limits: tuple[int | None, int | None, int | None, int | None] = (None, None, None, None)
    upstream = upstream_protocol_of(sp.protocol, policy.connection_pool if policy else None)
    tls = _origination(policy, endpoints)
    outlier = _outlier(policy.outlier_detection if policy is not None else None)
    balancer = policy.load_balancer if policy is not None else None
    if balancer is not None and balancer.locality_setting:
        ctx.warnings.append(
            f"DestinationRule for {svc.host}: localityLbSetting is not applied (meshproxy "
            "does not weigh endpoints by locality)"
        )
    if policy is not None:
        if balancer is not None and balancer.simple in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"):
            lb = LbPolicy(balancer.simple)
        pool = policy.connection_pool
        if pool is not None:
            connect_timeout = pool.connect_timeout or connect_timeout
            idle_timeout = pool.idle_timeout or idle_timeout
            max_per_conn = pool.max_requests_per_connection or 0
            # Istio sets a threshold only for values > 0.
            limits = (
                pool.max_connections or None,
                pool.http1_max_pending_requests or None,
                pool.http2_max_requests or None,
                pool.max_retries or None,
            )
    name = cluster_name("outbound", sp.number, subset, svc.host)
    return ClusterSpec(
        name,
        svc.host,
        sp.number,
        l7_of(sp.protocol),
        resolution,
        endpoints,
        lb,
        connect_timeout,
        idle_timeout,
        max_per_conn,
        None,
        subset,
        upstream,
        tls,
        outlier,
        *limits,
        balancer.consistent_hash if balancer else None,
        balancer.warmup if balancer else None,
        _budget(policy),
    )


def _budget(policy: TrafficPolicy | None) -> tuple[float, int] | None:
    budget = policy.retry_budget if policy is not None else None
    return None if budget is None else (budget.percent, budget.min_retry_concurrency)


def _outlier(od: OutlierDetection | None) -> OutlierSpec | None:
    """Istio's defaults: consecutive5xxErrors 5, gateway errors off, interval 10 s, base
    ejection 30 s, maxEjectionPercent 10, minHealthPercent 0."""
    if od is None:
        return None
    d = OutlierSpec()
    spec = OutlierSpec(
        od.consecutive_5xx_errors if od.consecutive_5xx_errors is not None else d.consecutive_5xx,
        od.consecutive_gateway_errors or 0,
        od.interval or d.interval,
        od.base_ejection_time or d.base_ejection_time,
        od.max_ejection_percent if od.max_ejection_percent is not None else d.max_ejection_percent,
        od.min_health_percent or 0,
    )
    return spec if spec.consecutive_5xx or spec.consecutive_gateway else None


AUTO_MTLS_LABEL = ("security.istio.io/tlsMode", "istio")


def _origination(policy: TrafficPolicy | None, endpoints: tuple[Endpoint, ...]) -> ClientTls | None:
    """The DestinationRule's tls; without one, Istio's auto mTLS: ISTIO_MUTUAL to endpoints
    labelled security.istio.io/tlsMode=istio (those that run a sidecar)."""
    if policy is not None and policy.tls is not None:
        return policy.tls if policy.tls.mode != "DISABLE" else None
    if endpoints and all(AUTO_MTLS_LABEL in e.labels for e in endpoints):
        return ClientTls("ISTIO_MUTUAL")
    return None


def _build_clusters(ctx: _Context) -> None:
    for svc in ctx.services.values():
        rule = ctx.rules.get(svc.host)
        for sp in svc.ports.values():
            c = _make_cluster(ctx, svc, sp, "", {})
            ctx.clusters[c.name] = c
            for subset in rule.subsets if rule else ():
                c = _make_cluster(ctx, svc, sp, subset.name, subset.labels)
                ctx.clusters[c.name] = c
                if not c.endpoints and c.resolution is Resolution.STATIC:
                    ctx.warnings.append(
                        f"DestinationRule {rule.origin.name if rule else ''}: subset "
                        f"{subset.name!r} selects no endpoint of {svc.host}"
                    )


# ---- routing ----------------------------------------------------------------------


def _visible_hosts(ctx: _Context, sidecar: Sidecar | None) -> set[str]:
    """Hosts the outbound side may reach: all, or those a port-less Sidecar egress names."""
    all_hosts = set(ctx.services)
    if sidecar is None:
        return all_hosts
    portless = [e for e in sidecar.egress if e.port is None]
    if not portless:
        return all_hosts
    return {
        h
        for h in all_hosts
        if any(_egress_allows(p, h, ctx.services[h], sidecar) for e in portless for p in e.hosts)
    }


def _egress_allows(pattern: str, host: str, svc: _Service, sidecar: Sidecar) -> bool:
    ns, _, dns = pattern.partition("/")
    svc_ns = svc.entry.origin.namespace
    if ns == ".":
        ns = sidecar.origin.namespace
    if ns not in ("*", "~") and ns != svc_ns:
        return False
    if ns == "~":
        return False
    return host_matches(dns.lower(), host) or dns == "*"


def _string_matcher(sm: StringMatch | None, ignore_case: bool = False) -> StringMatcher | None:
    if sm is None:
        return None
    return StringMatcher.build(sm.kind, sm.value, ignore_case)


def _request_matcher(m: HTTPMatch) -> RequestMatcher:
    return RequestMatcher(
        uri=_string_matcher(m.uri, m.ignore_uri_case),
        method=_string_matcher(m.method),
        authority=_string_matcher(m.authority),
        scheme=_string_matcher(m.scheme),
        headers=tuple((k, StringMatcher.build(v.kind, v.value)) for k, v in m.headers),
        without_headers=tuple(
            (k, StringMatcher.build(v.kind, v.value)) for k, v in m.without_headers
        ),
        query_params=tuple((k, StringMatcher.build(v.kind, v.value)) for k, v in m.query_params),
        port=m.port,
    )


def _ops(ops: HeaderOperations) -> HeaderOps:
    if not (ops.set or ops.add or ops.remove):
        return NO_HEADER_OPS
    return HeaderOps(
        tuple((k.encode(), v.encode()) for k, v in ops.set),
        tuple((k.encode(), v.encode()) for k, v in ops.add),
        frozenset(k.encode() for k in ops.remove),
    )


def _resolve_destination(
    ctx: _Context, r: Reader, dest: Destination, namespace: str, listener_port: int | None
) -> str | None:
    """The cluster a VirtualService destination names, or None after reporting why not."""
    host = fqdn(dest.host, namespace)
    svc = ctx.find_service(host)
    if svc is None:
        r.error(
            (*dest.path, "host"),
            f"no ServiceEntry declares host {host!r}{did_you_mean(host, ctx.services)}",
        )
        return None
    if dest.port is not None:
        if dest.port not in svc.ports:
            r.error(
                (*dest.path, "port", "number"),
                f"service {svc.host} has no port {dest.port} "
                f"(ports: {', '.join(str(p) for p in sorted(svc.ports))})",
            )
            return None
        port = dest.port
    elif listener_port is not None and listener_port in svc.ports:
        port = listener_port
    elif len(svc.ports) == 1:
        port = next(iter(svc.ports))
    else:
        r.error(
            (*dest.path, "port"),
            f"service {svc.host} has several ports; name one with destination.port.number",
        )
        return None
    subset = dest.subset or ""
    if subset:
        rule = ctx.rules.get(svc.host)
        names = [s.name for s in rule.subsets] if rule else []
        if subset not in names:
            where = (
                f"DestinationRule {rule.origin.name}"
                if rule
                else f"any DestinationRule (none exists for host {svc.host})"
            )
            r.error(
                (*dest.path, "subset"),
                f'no subset "{subset}" in {where}{did_you_mean(subset, names)}',
            )
            return None
    return cluster_name("outbound", port, subset, svc.host)


def _from_here(source: SourceMatch, settings: ProxySettings) -> bool:
    """Whether this sidecar's own workload is the caller a match's source conditions name."""
    if source is ANY_SOURCE:
        return True
    if source.gateways and MESH_GATEWAY not in source.gateways:
        return False
    if source.namespace is not None and source.namespace != settings.namespace:
        return False
    return selects(source.labels, dict(settings.labels))


def _for_sidecars(vs: VirtualService) -> bool:
    """A VirtualService bound to gateways only (no "mesh" among them) configures those
    gateways, not sidecars: Istio leaves it out of every sidecar's routes."""
    return not vs.gateways or MESH_GATEWAY in vs.gateways


def _routes_for(ctx: _Context, vs: VirtualService, port: int | None) -> list[Route]:
    r = ctx.reader(vs.origin)
    ns = vs.origin.namespace
    routes = []
    for http in vs.http:
        matchers = tuple(
            _request_matcher(m)
            for m in http.matches
            if (m.port is None or m.port == port) and _from_here(m.source, ctx.settings)
        )
        if http.matches and not matchers:
            continue  # every match entry names another port or another caller
        targets = []
        for wd in http.route:
            cluster = _resolve_destination(ctx, r, wd.destination, ns, port)
            if cluster is None:
                continue
            weight = wd.weight if wd.weight is not None else 100
            targets.append(
                RouteTarget(cluster, weight, _ops(wd.headers.request), _ops(wd.headers.response))
            )
        direct = _direct_reply(http.direct)
        if not targets and direct is None:
            continue
        mirrors = []
        for mirror in http.mirrors:
            cluster = _resolve_destination(ctx, r, mirror.destination, ns, port)
            if cluster is not None:
                mirrors.append(Mirror(cluster, mirror.percent))
        routes.append(
            Route(
                name=http.name,
                matchers=matchers,
                targets=tuple(targets),
                timeout=http.timeout,
                rewrite_uri=http.rewrite_uri,
                rewrite_authority=http.rewrite_authority,
                request_headers=_ops(http.headers.request),
                response_headers=_ops(http.headers.response),
                retry=retry_policy(http.retries, http.timeout),
                fault=_route_fault(http.fault, vs.origin.name, http.name, ctx.warnings),
                direct=direct,
                mirrors=tuple(mirrors),
                cors=_cors(http.cors),
                rate_limit=_route_rate_limit(ctx, vs, http.name),
                rewrite_regex=_regex_rewrite(http.rewrite_regex),
            )
        )
    return routes


def _bucket(limit: LocalRateLimit) -> RateLimit:
    return RateLimit(
        limit.name, limit.max_tokens, limit.tokens_per_fill, limit.fill_interval, limit.status
    )


def _route_rate_limit(ctx: _Context, vs: VirtualService, route: str) -> RateLimit | None:
    for limit in ctx.settings.local_rate_limits:
        if (
            limit.route == route
            and limit.virtual_service == vs.origin.name
            and (limit.namespace or ctx.settings.namespace) == vs.origin.namespace
        ):
            ctx.rate_limited_routes.add(limit.name)
            return _bucket(limit)  # equal specs compare equal: one bucket per limit
    return None


def _port_rate_limits(
    ctx: _Context, services: list[VirtualService], proxy_config: ProxyConfigResource | None
) -> dict[tuple[bool, int], RateLimit]:
    """Port buckets by (inbound, port); a route selector that names no route is an error."""
    out: dict[tuple[bool, int], RateLimit] = {}
    for i, limit in enumerate(ctx.settings.local_rate_limits):
        if limit.port is not None:
            out[(limit.inbound, limit.port)] = _bucket(limit)
        elif limit.name not in ctx.rate_limited_routes:
            namespace = limit.namespace or ctx.settings.namespace
            routes = sorted(
                h.name
                for vs in services
                if (vs.origin.name, vs.origin.namespace) == (limit.virtual_service, namespace)
                for h in vs.http
            )
            assert proxy_config is not None  # limits only come from a ProxyConfig
            ctx.reader(proxy_config.origin).error(
                ("spec", "localRateLimits", i, "route"),
                f"no route {limit.route!r} in VirtualService {limit.virtual_service!r}"
                + (f" (its routes: {', '.join(routes)})" if routes else " (none found)"),
            )
    return out


def _cors(policy: CorsPolicy | None) -> Cors | None:
    """Istio's translation: lists joined with ",", maxAge in whole seconds."""
    if policy is None:
        return None
    return Cors(
        tuple(StringMatcher.build(o.kind, o.value) for o in policy.allow_origins),
        ",".join(policy.allow_methods).encode(),
        ",".join(policy.allow_headers).encode(),
        ",".join(policy.expose_headers).encode(),
        b"%d" % int(policy.max_age) if policy.max_age is not None else b"",
        bool(policy.allow_credentials),
        policy.forward_unmatched_preflights,
    )


def _regex_rewrite(rewrite: tuple[str, str] | None) -> tuple[Regex, str] | None:
    """RE2's substitution syntax (\\0 … \\9) in Python's: \\0 is the whole match."""
    if rewrite is None:
        return None
    pattern, replacement = rewrite
    return Regex(pattern), re.sub(r"\\0(?!\d)", r"\\g<0>", replacement)


def retry_policy(retries: HTTPRetry | None, route_timeout: float | None) -> RetryPolicy:
    """Istio's translation: no `retries` → the default policy; attempts 0 → none; a retryOn
    keeps Envoy's names and turns status codes into retriable-status-codes; no retryOn →
    the default conditions; a perTryTimeout not below the route timeout is ignored."""
    if retries is None:
        return OUTBOUND_DEFAULT_RETRY
    attempts = retries.attempts if retries.attempts is not None else 2
    if attempts == 0:
        return NO_RETRY
    on: set[str] = set(OUTBOUND_DEFAULT_RETRY.on)
    codes: set[int] = set()
    if retries.retry_on is not None:
        on = set()
        for item in retries.retry_on:
            if item.isdigit():
                codes.add(int(item))
                on.add("retriable-status-codes")
            else:
                on.add(item)
    per_try = retries.per_try_timeout
    if per_try is not None and route_timeout is not None and per_try >= route_timeout:
        per_try = None
    return RetryPolicy(
        attempts,
        per_try,
        frozenset(on),
        frozenset(codes),
        frozenset(GRPC_RETRY_ON[n] for n in on if n in GRPC_RETRY_ON),
        retries.retry_ignore_previous_hosts,
    )


REDIRECT_CODES = {
    "MOVED_PERMANENTLY": 301,
    "FOUND": 302,
    "SEE_OTHER": 303,
    "TEMPORARY_REDIRECT": 307,
    "PERMANENT_REDIRECT": 308,
}


def _direct_reply(deferred: dict[str, Any]) -> DirectReply | None:
    """directResponse {status, body {string}} or redirect {uri, authority, port, scheme,
    redirectCode}; validated by the schema, compiled here."""
    try:
        return _direct_reply_of(deferred)
    except (TypeError, ValueError, KeyError):
        return None  # the schema reported it; the snapshot will not be used


def _direct_reply_of(deferred: dict[str, Any]) -> DirectReply | None:
    dr = deferred.get("directResponse")
    if isinstance(dr, dict):
        body = dr.get("body") or {}
        text = body.get("string", "") if isinstance(body, dict) else ""
        return DirectReply(int(dr.get("status", 200)), str(text).encode())
    rd = deferred.get("redirect")
    if isinstance(rd, dict):
        code = rd.get("redirectCode", 301)
        return DirectReply(
            int(code),
            b"",
            rd.get("uri"),
            rd.get("authority"),
            rd.get("scheme"),
            int(rd["port"]) if rd.get("port") is not None else None,
        )
    return None


def _route_fault(
    f: HTTPFault | None, vs_name: str, route_name: str, warnings: list[str]
) -> Fault | None:
    if f is None:
        return None
    for kind, given, percent in (
        ("delay", f.delay is not None, f.delay_percent),
        ("abort", f.abort_status is not None or f.abort_grpc is not None, f.abort_percent),
    ):
        if given and percent is None:
            warnings.append(
                f"VirtualService {vs_name}: fault.{kind} on route {route_name!r} has no "
                f"percentage, so (as in Istio) no request gets it; set percentage.value: 100"
            )
    grpc = GRPC_STATUS_NAMES.index(f.abort_grpc) if f.abort_grpc is not None else None
    return Fault(f.delay, f.delay_percent or 0.0, f.abort_status, grpc, f.abort_percent or 0.0)


def _domains(host: str, port: int, namespace: str) -> list[str]:
    names = [host]
    if host.endswith(CLUSTER_SUFFIX):
        short = host[: -len(CLUSTER_SUFFIX)]  # name.ns
        name, _, ns = short.partition(".")
        names.append(short)
        names.append(short + ".svc")
        if ns == namespace:
            names.append(name)
    return names + [f"{n}:{port}" for n in names]


def _route_tables(
    ctx: _Context, vss: list[VirtualService], visible: set[str]
) -> dict[int, RouteTable]:
    """One route table per HTTP port, a virtual host per service (Istio's outbound layout)."""
    ports: dict[int, list[_Service]] = defaultdict(list)
    for svc in ctx.services.values():
        for number, sp in svc.ports.items():
            if l7_of(sp.protocol) is L7.HTTP and svc.host in visible:
                ports[number].append(svc)
    vs_by_host: dict[str, VirtualService] = {}
    for vs in vss:
        r = ctx.reader(vs.origin)
        for i, h in enumerate(vs.hosts):
            host = fqdn(h, vs.origin.namespace)
            if host in vs_by_host:
                other = vs_by_host[host].origin
                r.error(
                    ("spec", "hosts", i),
                    f"host {host!r} is already routed by VirtualService {other.name}; "
                    "Istio merges nothing here, so only one may own a host",
                )
                continue
            vs_by_host[host] = vs
    # Check every VirtualService, even one no port uses, so bad references are always seen.
    for vs in vss:
        ns = vs.origin.namespace
        found = {p for h in vs.hosts if (s := ctx.find_service(fqdn(h, ns))) for p in s.ports}
        vs_ports: list[int | None] = [*sorted(found)] or [None]
        for port in vs_ports:
            _routes_for(ctx, vs, port)
    tables = {}
    for port, svcs in ports.items():
        exact: dict[str, VirtualHost] = {}
        wildcard: list[tuple[str, VirtualHost]] = []
        for svc in sorted(svcs, key=lambda s: s.host):
            owner = vs_by_host.get(svc.host)
            routes = _routes_for(ctx, owner, port) if owner is not None else []
            if owner is None or not routes:
                default = cluster_name("outbound", port, "", svc.host)
                routes = [Route("default", (), (RouteTarget(default, 100),))]
            vh = VirtualHost(
                f"{svc.host}:{port}",
                tuple(
                    _domains(svc.host, port, ctx.settings.namespace)
                    + [
                        d
                        for a in svc.entry.addresses
                        for ip in _vip_ips(a)
                        for d in (ip, f"{ip}:{port}")
                    ]
                ),
                tuple(routes),
                svc.host,
            )
            if svc.host.startswith("*."):
                wildcard.append((svc.host[1:], vh))
            else:
                for d in vh.domains:
                    exact.setdefault(d, vh)
        wildcard.sort(key=lambda x: -len(x[0]))
        tables[port] = RouteTable(str(port), MappingProxyType(exact), tuple(wildcard))
    return tables


def _service_binding(
    ctx: _Context,
    svc: _Service,
    sp: ServicePort,
    tables: dict[int, RouteTable],
    tcp_vs: TcpVirtualServices,
) -> PortBinding:
    if l7_of(sp.protocol) is L7.HTTP:
        return PortBinding(L7.HTTP, tables.get(sp.number), None, svc.host)
    cluster = _tcp_cluster(ctx, svc, sp.number, tcp_vs)
    return PortBinding(L7.TCP, None, cluster, svc.host)


TcpVirtualServices = dict[str, list[VirtualService]]


def _tcp_virtual_services(vss: list[VirtualService]) -> TcpVirtualServices:
    """The VirtualServices with tcp[] routes, in order, by each host's FQDN: looked up per
    TCP service port, so a config of thousands of services compiles in linear time."""
    out: TcpVirtualServices = defaultdict(list)
    for vs in vss:
        if vs.tcp:
            for host in dict.fromkeys(fqdn(h, vs.origin.namespace) for h in vs.hosts):
                out[host].append(vs)
    return out


def _tcp_cluster(ctx: _Context, svc: _Service, port: int, tcp_vs: TcpVirtualServices) -> str:
    """A VirtualService tcp[] route for this host and port, else the service's own cluster."""
    for vs in tcp_vs.get(svc.host, ()):
        r = ctx.reader(vs.origin)
        for tcp in vs.tcp:
            here = [m for m in tcp.matches if _from_here(m.source, ctx.settings)]
            if tcp.matches and not any(m.port is None or m.port == port for m in here):
                continue
            if tcp.route:
                # Weighted TCP splits pick the heaviest destination (weighted TCP is a later issue).
                best = max(tcp.route, key=lambda d: d.weight or 0)
                cluster = _resolve_destination(ctx, r, best.destination, vs.origin.namespace, port)
                if cluster is not None:
                    return cluster
    return cluster_name("outbound", port, "", svc.host)


# ---- listeners --------------------------------------------------------------------


def _listeners(
    ctx: _Context,
    sidecar: Sidecar | None,
    tables: dict[int, RouteTable],
    tcp_vs: TcpVirtualServices,
    visible: set[str],
) -> list[ListenerSpec]:
    s = ctx.settings
    listeners: list[ListenerSpec] = []
    if s.interception_mode != "NONE":
        listeners.append(
            ListenerSpec(
                "virtualOutbound",
                ListenerKind.OUTBOUND_CAPTURE,
                "0.0.0.0",
                s.proxy_listen_port,
                None,
            )
        )
        listeners.append(
            ListenerSpec(
                "virtualInbound",
                ListenerKind.INBOUND_CAPTURE,
                "0.0.0.0",
                s.proxy_inbound_listen_port,
                None,
            )
        )
    if sidecar is not None:
        r = ctx.reader(sidecar.origin)
        for ing in sidecar.ingress:
            if ing.capture_mode != "NONE":
                continue
            binding = _inbound_binding(
                ctx, ing.port.number, ing.port.protocol, ing.default_endpoint
            )
            address = ing.bind or "0.0.0.0"
            listeners.append(
                ListenerSpec(
                    f"inbound_{address}_{ing.port.number}",
                    ListenerKind.INGRESS,
                    address,
                    ing.port.number,
                    binding,
                )
            )
        for eg in sidecar.egress:
            if eg.port is None:
                continue
            allowed = {
                h
                for h in ctx.services
                if any(_egress_allows(p, h, ctx.services[h], sidecar) for p in eg.hosts)
            }
            number = eg.port.number
            address = eg.bind or "127.0.0.1"
            name = f"outbound_{address}_{number}"
            if l7_of(eg.port.protocol) is L7.HTTP:
                table = tables.get(number)
                if table is not None:
                    table = _filter_table(table, allowed)
                if table is None or (not table.exact and not table.wildcard):
                    r.error(
                        (*eg.path, "hosts"), f"no HTTP service on port {number} matches these hosts"
                    )
                    continue
                binding = PortBinding(L7.HTTP, table, None)
            else:
                matching = [
                    ctx.services[h] for h in sorted(allowed) if number in ctx.services[h].ports
                ]
                if len(matching) != 1:
                    names = ", ".join(m.host for m in matching) or "none"
                    r.error(
                        (*eg.path, "hosts"),
                        f"a TCP egress listener needs exactly one service with port "
                        f"{number}; these hosts match {names}",
                    )
                    continue
                svc = matching[0]
                cluster = _tcp_cluster(ctx, svc, number, tcp_vs)
                binding = PortBinding(L7.TCP, None, cluster, svc.host)
            listeners.append(ListenerSpec(name, ListenerKind.EGRESS, address, number, binding))
    seen: dict[int, str] = {}
    own = {s.proxy_admin_port: "proxyAdminPort"}
    for spec in listeners:
        if spec.port in own or spec.port in seen:
            clash = own.get(spec.port) or seen[spec.port]
            msg = f"listener {spec.name} uses port {spec.port}, already used by {clash}"
            if sidecar is not None:
                ctx.reader(sidecar.origin).error(("spec",), msg)
            else:
                ctx.issues.append(ConfigIssue("<settings>", None, None, None, None, msg))
        seen[spec.port] = spec.name
    return listeners


def _filter_table(table: RouteTable, allowed: set[str]) -> RouteTable:
    exact = {d: vh for d, vh in table.exact.items() if vh.service in allowed}
    wildcard = tuple((sfx, vh) for sfx, vh in table.wildcard if vh.service in allowed)
    return RouteTable(table.name, MappingProxyType(exact), wildcard, table.catch_all)


def _inbound_binding(
    ctx: _Context, port: int, protocol: str, default_endpoint: str | None
) -> PortBinding:
    """Inbound traffic for `port` always goes to the local workload, whatever Host says."""
    if default_endpoint:
        host, _, target = default_endpoint.rpartition(":")
        host = host.strip("[]")
        if host == "0.0.0.0":
            host = "127.0.0.1"
        target_port = int(target)
    else:
        host, target_port = "127.0.0.1", port
    l7 = l7_of(protocol)
    name = cluster_name("inbound", port, "", "")
    bind = (
        INBOUND_SOURCE_ADDRESS
        if ctx.settings.interception_mode != "NONE" and host.startswith("127.")
        else None
    )
    ctx.clusters[name] = ClusterSpec(
        name,
        f"inbound|{port}",
        port,
        l7,
        Resolution.STATIC,
        (Endpoint(host, target_port),),
        LbPolicy.ROUND_ROBIN,
        ctx.settings.connect_timeout,
        ctx.settings.upstream_idle_timeout,
        0,
        bind,
        "",
        upstream_protocol_of(protocol, None),
    )
    if l7 is L7.HTTP:
        vh = VirtualHost(
            f"inbound|http|{port}",
            ("*",),
            (Route("default", (), (RouteTarget(name, 100),), retry=INBOUND_DEFAULT_RETRY),),
            name,
        )
        return PortBinding(L7.HTTP, RouteTable(name, MappingProxyType({}), (), vh), None)
    return PortBinding(L7.TCP, None, name)


def _inbound_bindings(ctx: _Context, sidecar: Sidecar | None) -> dict[int, PortBinding]:
    out: dict[int, PortBinding] = {}
    if sidecar is None:
        return out
    for ing in sidecar.ingress:
        if ing.capture_mode == "NONE":
            continue
        out[ing.port.number] = _inbound_binding(
            ctx, ing.port.number, ing.port.protocol, ing.default_endpoint
        )
    return out
