"""Sidecar (networking.istio.io): this workload's ingress and egress listeners."""

from __future__ import annotations

from typing import Any

from meshproxy.config.reader import Reader
from meshproxy.config.resources import (
    EgressListener,
    IngressListener,
    Origin,
    Sidecar,
    SidecarPort,
)
from meshproxy.config.schema.common import (
    parse_protocol,
)
from meshproxy.config.source import Path_


def _sidecar_port(r: Reader, value: Any, path: Path_) -> SidecarPort | None:
    m = r.mapping(value, path, ("number", "protocol", "name", "targetPort"), required=("number",))
    if m is None:
        return None
    number = r.port(m, "number", path)
    name = r.string(m, "name", path) or ""
    protocol = parse_protocol(r, m, path, name)
    if number is None:
        return None
    return SidecarPort(number, protocol, name or f"{protocol.lower()}-{number}")


def parse_sidecar(r: Reader, origin: Origin, spec: Any) -> Sidecar | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec,
        path,
        ("workloadSelector", "ingress", "egress", "outboundTrafficPolicy", "inboundConnectionPool"),
    )
    if m is None:
        return None
    ingress = []
    for item_path, item in r.items(m, "ingress", path):
        im = r.mapping(
            item,
            item_path,
            ("port", "bind", "captureMode", "defaultEndpoint", "tls", "connectionPool"),
            required=("port",),
        )
        if im is None:
            continue
        port = _sidecar_port(r, im.get("port"), (*item_path, "port"))
        mode = (
            r.choice(im, "captureMode", item_path, ("DEFAULT", "IPTABLES", "NONE"), "DEFAULT")
            or "DEFAULT"
        )
        default_endpoint = r.string(im, "defaultEndpoint", item_path)
        if default_endpoint is not None and not valid_endpoint(default_endpoint):
            r.error(
                (*item_path, "defaultEndpoint"),
                f"{default_endpoint!r} must look like 127.0.0.1:PORT, 0.0.0.0:PORT, "
                "[::1]:PORT or unix:///path",
            )
        if port is not None:
            ingress.append(
                IngressListener(
                    item_path, port, r.string(im, "bind", item_path), mode, default_endpoint
                )
            )
    egress = []
    for item_path, item in r.items(m, "egress", path):
        em = r.mapping(
            item, item_path, ("port", "bind", "captureMode", "hosts"), required=("hosts",)
        )
        if em is None:
            continue
        port = _sidecar_port(r, em["port"], (*item_path, "port")) if em.get("port") else None
        hosts = r.strings(em, "hosts", item_path)
        for i, h in enumerate(hosts):
            if "/" not in h:
                r.error(
                    (*item_path, "hosts", i),
                    f'{h!r} must be namespace/dnsName (for example "*/{h}" or "./{h}")',
                )
        mode = (
            r.choice(em, "captureMode", item_path, ("DEFAULT", "IPTABLES", "NONE"), "DEFAULT")
            or "DEFAULT"
        )
        egress.append(EgressListener(item_path, port, r.string(em, "bind", item_path), mode, hosts))
    outbound_mode = None
    if m.get("outboundTrafficPolicy") is not None:
        op = (*path, "outboundTrafficPolicy")
        om = r.mapping(m["outboundTrafficPolicy"], op, ("mode", "egressProxy"))
        if om:
            outbound_mode = r.choice(om, "mode", op, ("REGISTRY_ONLY", "ALLOW_ANY"))
    return Sidecar(origin, tuple(ingress), tuple(egress), outbound_mode)


def valid_endpoint(text: str) -> bool:
    if text.startswith("unix://"):
        return False  # not supported yet; reported as invalid with the accepted forms
    host, sep, port = text.rpartition(":")
    return bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)
