"""ServiceEntries and DestinationRules into clusters: endpoints, load balancing, connection
pool limits, outlier detection and TLS origination, merged as Istio merges traffic policies."""

from __future__ import annotations

import ipaddress

from meshproxy.config.compile.common import (
    CompileContext,
    Service,
    cluster_name,
    fqdn,
    l7_of,
    upstream_protocol_of,
)
from meshproxy.config.reader import did_you_mean
from meshproxy.config.resources import (
    ClientTls,
    DestinationRule,
    OutlierDetection,
    ServiceEntry,
    ServicePort,
    TrafficPolicy,
)
from meshproxy.config.snapshot import (
    ClusterSpec,
    Endpoint,
    LbPolicy,
    OutlierSpec,
    Resolution,
)


def index_services(ctx: CompileContext, entries: list[ServiceEntry]) -> None:
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
            ctx.services[name] = Service(name, se, {p.number: p for p in se.ports})
        for i, addr in enumerate(se.addresses):
            try:
                ipaddress.ip_network(addr, strict=False)
            except ValueError:
                r.error(("spec", "addresses", i), f"{addr!r} is not an IP address or CIDR")


def index_rules(ctx: CompileContext, rules: list[DestinationRule]) -> None:
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


def _endpoints(svc: Service, sp: ServicePort, labels: dict[str, str]) -> tuple[Endpoint, ...]:
    out = []
    default_port = sp.target_port or sp.number
    for ep in svc.entry.endpoints:
        if any(ep.labels.get(k) != v for k, v in labels.items()):
            continue
        port = ep.ports.get(sp.name, default_port)
        out.append(Endpoint(ep.address, port, ep.weight, tuple(sorted(ep.labels.items()))))
    return tuple(out)


def _make_cluster(
    ctx: CompileContext, svc: Service, sp: ServicePort, subset: str, labels: dict[str, str]
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


def build_clusters(ctx: CompileContext) -> None:
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
