"""VirtualServices into route tables: matches, destinations, retries, faults, CORS, rate
limits and direct replies, for the hosts a Sidecar lets this workload see."""

from __future__ import annotations

import re
from collections import defaultdict
from types import MappingProxyType
from typing import Any

from meshproxy.codec.grpc import GRPC_RETRY_ON
from meshproxy.config.compile.common import (
    CLUSTER_SUFFIX,
    MESH_GATEWAY,
    CompileContext,
    Service,
    cluster_name,
    fqdn,
    host_matches,
    l7_of,
    vip_ips,
)
from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    ANY_SOURCE,
    CorsPolicy,
    Destination,
    HeaderOperations,
    HTTPFault,
    HTTPMatch,
    HTTPRetry,
    LocalRateLimit,
    ProxyConfigResource,
    ProxySettings,
    ServicePort,
    Sidecar,
    SourceMatch,
    StringMatch,
    VirtualService,
    selects,
)
from meshproxy.config.schema.virtual_service import GRPC_STATUS_NAMES
from meshproxy.config.snapshot import (
    L7,
    PortBinding,
)
from meshproxy.routing.cors import Cors
from meshproxy.routing.match import RequestMatcher, StringMatcher
from meshproxy.routing.regex import Regex
from meshproxy.routing.table import (
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


def visible_hosts(ctx: CompileContext, sidecar: Sidecar | None) -> set[str]:
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
        if any(egress_allows(p, h, ctx.services[h], sidecar) for e in portless for p in e.hosts)
    }


def egress_allows(pattern: str, host: str, svc: Service, sidecar: Sidecar) -> bool:
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
    ctx: CompileContext, r: Reader, dest: Destination, namespace: str, listener_port: int | None
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


def for_sidecars(vs: VirtualService) -> bool:
    """A VirtualService bound to gateways only (no "mesh" among them) configures those
    gateways, not sidecars: Istio leaves it out of every sidecar's routes."""
    return not vs.gateways or MESH_GATEWAY in vs.gateways


def _routes_for(ctx: CompileContext, vs: VirtualService, port: int | None) -> list[Route]:
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


def bucket(limit: LocalRateLimit) -> RateLimit:
    return RateLimit(
        limit.name, limit.max_tokens, limit.tokens_per_fill, limit.fill_interval, limit.status
    )


def _route_rate_limit(ctx: CompileContext, vs: VirtualService, route: str) -> RateLimit | None:
    for limit in ctx.settings.local_rate_limits:
        if (
            limit.route == route
            and limit.virtual_service == vs.origin.name
            and (limit.namespace or ctx.settings.namespace) == vs.origin.namespace
        ):
            ctx.rate_limited_routes.add(limit.name)
            return bucket(limit)  # equal specs compare equal: one bucket per limit
    return None


def compile_port_rate_limits(
    ctx: CompileContext, services: list[VirtualService], proxy_config: ProxyConfigResource | None
) -> dict[tuple[bool, int], RateLimit]:
    """Port buckets by (inbound, port); a route selector that names no route is an error."""
    out: dict[tuple[bool, int], RateLimit] = {}
    for i, limit in enumerate(ctx.settings.local_rate_limits):
        if limit.port is not None:
            out[(limit.inbound, limit.port)] = bucket(limit)
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


def route_tables(
    ctx: CompileContext, vss: list[VirtualService], visible: set[str]
) -> dict[int, RouteTable]:
    """One route table per HTTP port, a virtual host per service (Istio's outbound layout)."""
    ports: dict[int, list[Service]] = defaultdict(list)
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
                        for ip in vip_ips(a)
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


def service_binding(
    ctx: CompileContext,
    svc: Service,
    sp: ServicePort,
    tables: dict[int, RouteTable],
    tcp_vs: TcpVirtualServices,
) -> PortBinding:
    if l7_of(sp.protocol) is L7.HTTP:
        return PortBinding(L7.HTTP, tables.get(sp.number), None, svc.host)
    cluster = tcp_cluster(ctx, svc, sp.number, tcp_vs)
    return PortBinding(L7.TCP, None, cluster, svc.host)


TcpVirtualServices = dict[str, list[VirtualService]]


def tcp_virtual_services(vss: list[VirtualService]) -> TcpVirtualServices:
    """The VirtualServices with tcp[] routes, in order, by each host's FQDN: looked up per
    TCP service port, so a config of thousands of services compiles in linear time."""
    out: TcpVirtualServices = defaultdict(list)
    for vs in vss:
        if vs.tcp:
            for host in dict.fromkeys(fqdn(h, vs.origin.namespace) for h in vs.hosts):
                out[host].append(vs)
    return out


def tcp_cluster(ctx: CompileContext, svc: Service, port: int, tcp_vs: TcpVirtualServices) -> str:
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
