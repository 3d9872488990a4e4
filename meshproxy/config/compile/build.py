"""compile_snapshot: every step of the compilation, in order, into one Snapshot."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from types import MappingProxyType

from meshproxy.config.compile.clusters import build_clusters, index_rules, index_services
from meshproxy.config.compile.common import (
    INBOUND_PASSTHROUGH,
    INBOUND_SOURCE_ADDRESS,
    PASSTHROUGH,
    CompileContext,
    Service,
    vip_ips,
)
from meshproxy.config.compile.listeners import build_listeners, inbound_bindings
from meshproxy.config.compile.routes import (
    bucket,
    compile_port_rate_limits,
    for_sidecars,
    route_tables,
    service_binding,
    tcp_virtual_services,
    visible_hosts,
)
from meshproxy.config.delegate import expand_delegates
from meshproxy.config.resources import (
    AuthorizationPolicy,
    DestinationRule,
    PeerAuthentication,
    ProxyConfigResource,
    ProxySettings,
    Resource,
    ServiceEntry,
    Sidecar,
    VirtualService,
    selects,
)
from meshproxy.config.snapshot import (
    L7,
    ClusterSpec,
    LbPolicy,
    MtlsPolicy,
    PortBinding,
    Resolution,
    Snapshot,
)
from meshproxy.config.telemetry import Telemetry
from meshproxy.config.telemetry_resolve import (
    resolve_access_logs,
    resolve_metrics,
    resolve_tracing,
)
from meshproxy.errors import ConfigIssue
from meshproxy.security.authz import Authorizer, applicable


def compile_snapshot(
    resources: Iterable[Resource],
    settings: ProxySettings,
    version: int,
    source: dict[str, str],
    issues: list[ConfigIssue],
) -> Snapshot | None:
    """Build the snapshot, or None with `issues` extended by everything that is wrong."""
    resources = list(resources)
    ctx = CompileContext(settings, issues)
    entries = [r for r in resources if isinstance(r, ServiceEntry)]
    rules = [r for r in resources if isinstance(r, DestinationRule)]
    services_vs = [r for r in resources if isinstance(r, VirtualService) and for_sidecars(r)]
    services_vs = expand_delegates(services_vs, ctx.reader, ctx.warnings)
    sidecars = [r for r in resources if isinstance(r, Sidecar)]
    peer_authns = [r for r in resources if isinstance(r, PeerAuthentication)]
    authz_policies = [r for r in resources if isinstance(r, AuthorizationPolicy)]
    telemetries = [r for r in resources if isinstance(r, Telemetry)]
    before = len(issues)
    tracing = resolve_tracing(settings, telemetries, issues)

    index_services(ctx, entries)
    index_rules(ctx, rules)
    build_clusters(ctx)
    sidecar = sidecars[0] if sidecars else None
    registry_only = settings.outbound_traffic_policy == "REGISTRY_ONLY"
    if sidecar is not None and sidecar.outbound_mode is not None:
        registry_only = sidecar.outbound_mode == "REGISTRY_ONLY"
    visible = visible_hosts(ctx, sidecar)
    tables = route_tables(ctx, services_vs, visible)
    tcp_vs = tcp_virtual_services(services_vs)

    outbound_by_vip: dict[tuple[str, int], PortBinding] = {}
    outbound_by_port: dict[int, PortBinding] = {}
    for port, table in tables.items():
        outbound_by_port[port] = PortBinding(L7.HTTP, table, None)
    tcp_by_port: dict[int, list[Service]] = defaultdict(list)
    for svc in ctx.services.values():
        if svc.host not in visible:
            continue
        for number, sp in svc.ports.items():
            binding = service_binding(ctx, svc, sp, tables, tcp_vs)
            for addr in svc.entry.addresses:
                for ip in vip_ips(addr):
                    outbound_by_vip[(ip, number)] = binding
            if binding.protocol is L7.TCP:
                tcp_by_port[number].append(svc)
    for number, svcs in tcp_by_port.items():
        if number in outbound_by_port:
            continue
        no_vip = [s for s in svcs if not s.entry.addresses]
        if len(no_vip) == 1:
            svc = no_vip[0]
            outbound_by_port[number] = service_binding(ctx, svc, svc.ports[number], tables, tcp_vs)

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
    listeners = build_listeners(ctx, sidecar, tables, tcp_vs, visible)
    proxy_configs = [r for r in resources if isinstance(r, ProxyConfigResource)]
    port_rate_limits = compile_port_rate_limits(
        ctx, services_vs, proxy_configs[0] if proxy_configs else None
    )
    inbound_by_port = inbound_bindings(ctx, sidecar)

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
        rate_limits=frozenset(bucket(limit) for limit in settings.local_rate_limits),
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
