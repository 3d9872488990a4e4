"""ServiceEntry (networking.istio.io): the services and endpoints this proxy knows."""

from __future__ import annotations

from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    Origin,
    ServiceEntry,
    ServicePort,
    WorkloadEndpoint,
)
from meshproxy.config.schema.common import (
    check_host,
    parse_protocol,
)
from meshproxy.config.source import Path_


def parse_service_entry(r: Reader, origin: Origin, spec: Any) -> ServiceEntry | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec,
        path,
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        ),
        required=("hosts",),
    )
    if m is None:
        return None
    hosts = r.strings(m, "hosts", path)
    for i, h in enumerate(hosts):
        check_host(r, h, (*path, "hosts", i))
    addresses = r.strings(m, "addresses", path)
    ports = []
    seen_ports: set[int] = set()
    for item_path, item in r.items(m, "ports", path):
        pm = r.mapping(
            item,
            item_path,
            ("number", "protocol", "name", "targetPort"),
            required=("number", "name"),
        )
        if pm is None:
            continue
        number = r.port(pm, "number", item_path)
        name = r.string(pm, "name", item_path) or ""
        protocol = parse_protocol(r, pm, item_path, name)
        target = r.port(pm, "targetPort", item_path)
        if number is None:
            continue
        if number in seen_ports:
            r.error((*item_path, "number"), f"port {number} is declared twice")
        seen_ports.add(number)
        ports.append(ServicePort(number, protocol, name, target))
    resolution = (
        r.choice(m, "resolution", path, ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"), "NONE")
        or "NONE"
    )
    location = (
        r.choice(m, "location", path, ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_EXTERNAL")
        or "MESH_EXTERNAL"
    )
    endpoints = []
    port_names = {p.name for p in ports}
    for item_path, item in r.items(m, "endpoints", path):
        em = r.mapping(
            item,
            item_path,
            ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount"),
            required=("address",),
        )
        if em is None:
            continue
        address = r.string(em, "address", item_path) or ""
        if address.startswith("unix://"):
            r.error((*item_path, "address"), "unix domain socket endpoints are not supported")
            continue
        eports: dict[str, int] = {}
        raw_ports = em.get("ports")
        if raw_ports is not None:
            if not isinstance(raw_ports, dict):
                r.error((*item_path, "ports"), "expected a mapping of port name to number")
            else:
                for pname in raw_ports:
                    n = r.port(raw_ports, pname, (*item_path, "ports"))
                    if pname not in port_names:
                        r.error(
                            (*item_path, "ports", pname),
                            f"no port named {pname!r} in spec.ports"
                            f"{did_you_mean(pname, port_names)}",
                        )
                    elif n is not None:
                        eports[pname] = n
        weight = r.integer(em, "weight", item_path, default=1, minimum=1) or 1
        endpoints.append(
            WorkloadEndpoint(
                address,
                eports,
                r.string_map(em, "labels", item_path),
                weight,
                r.string(em, "serviceAccount", item_path),
            )
        )
    if resolution == "STATIC" and not endpoints:
        r.error((*path, "resolution"), "resolution STATIC needs at least one endpoint")
    if resolution == "STATIC":
        import ipaddress

        for i, ep in enumerate(endpoints):
            try:
                ipaddress.ip_address(ep.address)
            except ValueError:
                r.error(
                    (*path, "endpoints", i, "address"),
                    f"{ep.address!r} is not an IP address (resolution STATIC); "
                    "use resolution DNS for host names",
                )
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not endpoints:
        for i, h in enumerate(hosts):
            if h.startswith("*"):
                r.error(
                    (*path, "hosts", i),
                    "resolution DNS with no endpoints needs hosts without wildcards",
                )
    if not ports:
        r.error((*path, "ports"), "at least one port is required")
    return ServiceEntry(
        origin, hosts, addresses, tuple(ports), tuple(endpoints), resolution, location
    )
