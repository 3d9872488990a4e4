"""Listeners and port bindings: the explicit and capture listeners, and what each inbound
or outbound port leads to (route table, TCP cluster or passthrough)."""

from __future__ import annotations

from types import MappingProxyType

from meshproxy.config.compile.common import (
    INBOUND_SOURCE_ADDRESS,
    CompileContext,
    cluster_name,
    l7_of,
    upstream_protocol_of,
)
from meshproxy.config.compile.routes import TcpVirtualServices, egress_allows, tcp_cluster
from meshproxy.config.resources import (
    Sidecar,
)
from meshproxy.config.snapshot import (
    L7,
    ClusterSpec,
    Endpoint,
    LbPolicy,
    ListenerKind,
    ListenerSpec,
    PortBinding,
    Resolution,
)
from meshproxy.errors import ConfigIssue
from meshproxy.routing.table import (
    INBOUND_DEFAULT_RETRY,
    Route,
    RouteTable,
    RouteTarget,
    VirtualHost,
)


def build_listeners(
    ctx: CompileContext,
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
                if any(egress_allows(p, h, ctx.services[h], sidecar) for p in eg.hosts)
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
                cluster = tcp_cluster(ctx, svc, number, tcp_vs)
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
    ctx: CompileContext, port: int, protocol: str, default_endpoint: str | None
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


def inbound_bindings(ctx: CompileContext, sidecar: Sidecar | None) -> dict[int, PortBinding]:
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
