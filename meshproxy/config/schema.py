"""Validate YAML documents into typed resources: Istio's kinds and field names, exactly."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    ANY_SOURCE,
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    ClientTls,
    ConnectionPool,
    ConsistentHash,
    CorsPolicy,
    Delegate,
    Destination,
    DestinationRule,
    EgressListener,
    HeaderOperations,
    Headers,
    HTTPFault,
    HTTPMatch,
    HTTPMirror,
    HTTPRetry,
    HTTPRoute,
    IngressListener,
    LoadBalancerSettings,
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
    SidecarPort,
    SourceMatch,
    StringMatch,
    Subset,
    TCPMatch,
    TCPRoute,
    TrafficPolicy,
    VirtualService,
    Warmup,
    WeightedDestination,
    WorkloadEndpoint,
)
from meshproxy.config.source import Document, Path_
from meshproxy.errors import ConfigIssue
from meshproxy.routing.regex import Regex, RegexError

ISTIO_NETWORKING_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
ISTIO_SECURITY_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
MESHPROXY_VERSIONS = ("meshproxy.io/v1alpha1",)

PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS", "MYSQL")
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOST = re.compile(
    r"^(\*|(\*\.)?[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?)*\.?)$"
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

DIRECT_FIELDS = ("redirect", "directResponse")  # compiled from the raw mappings

KINDS = (
    "ServiceEntry",
    "VirtualService",
    "DestinationRule",
    "Sidecar",
    "ProxyConfig",
    "PeerAuthentication",
    "AuthorizationPolicy",
)
_VERSIONS = {
    "ServiceEntry": ISTIO_NETWORKING_VERSIONS,
    "VirtualService": ISTIO_NETWORKING_VERSIONS,
    "DestinationRule": ISTIO_NETWORKING_VERSIONS,
    "Sidecar": ISTIO_NETWORKING_VERSIONS,
    "PeerAuthentication": ISTIO_SECURITY_VERSIONS,
    "AuthorizationPolicy": ISTIO_SECURITY_VERSIONS,
    "ProxyConfig": MESHPROXY_VERSIONS,
}


def parse_resource(doc: Document, issues: list[ConfigIssue]) -> Resource | None:
    """Validate one document into a resource; every problem is appended to `issues`."""
    top = doc.value
    bare = Reader(doc, "", issues)
    if not isinstance(top, dict):
        bare.error((), "a resource must be a mapping with apiVersion, kind, metadata and spec")
        return None
    kind = top.get("kind")
    if not isinstance(kind, str) or not kind:
        bare.error(("kind",), "required field is missing")
        return None
    if kind not in _VERSIONS:
        bare.error(("kind",), f"unknown kind {kind!r}{did_you_mean(kind, KINDS)}")
        return None
    meta = top.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    r = Reader(doc, f"{kind} {name if isinstance(name, str) and name else '<unnamed>'}", issues)
    top_map = r.mapping(top, (), ("apiVersion", "kind", "metadata", "spec", "status"))
    if top_map is None:
        return None
    api = top.get("apiVersion")
    if api not in _VERSIONS[kind]:
        r.error(
            ("apiVersion",), f"{kind} needs apiVersion {' or '.join(_VERSIONS[kind])}, got {api!r}"
        )
    meta_map = r.mapping(
        meta,
        ("metadata",),
        (
            "name",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ),
        required=("name",),
    )
    if meta_map is None or not isinstance(name, str) or not name:
        return None
    if not _DNS_LABEL.match(name) or len(name) > 253:
        r.error(("metadata", "name"), f"{name!r} is not a valid Kubernetes name")
    namespace = r.string(meta_map, "namespace", ("metadata",), "default") or "default"
    origin = Origin(doc, kind, name, namespace)
    spec = top.get("spec")
    parse = _PARSERS[kind]
    resource: Resource | None = parse(r, origin, spec)
    return resource


# ---- shared pieces ------------------------------------------------------------------------------


def _protocol(r: Reader, m: Mapping[str, Any], path: Path_, port_name: str) -> str:
    value = m.get("protocol")
    if value is None:
        # Istio infers the protocol from the port name prefix (http-foo, grpc, tcp-db ...).
        prefix = port_name.split("-", 1)[0].upper()
        return prefix if prefix in PROTOCOLS else "TCP"
    if not isinstance(value, str) or value.upper() not in PROTOCOLS:
        r.error(
            (*path, "protocol"),
            f"must be one of {', '.join(PROTOCOLS)}, got {value!r}"
            f"{did_you_mean(str(value).upper(), PROTOCOLS)}",
        )
        return "TCP"
    return value.upper()


def _host(r: Reader, value: str, path: Path_) -> None:
    if not _HOST.match(value):
        r.error(path, f"{value!r} is not a valid host name")


def _string_match(r: Reader, value: Any, path: Path_) -> StringMatch | None:
    m = r.mapping(value, path, ("exact", "prefix", "regex"))
    if m is None:
        return None
    present = [k for k in ("exact", "prefix", "regex") if m.get(k) is not None]
    if not present:
        return StringMatch("present", "")
    if len(present) > 1:
        r.error(path, f"set only one of exact, prefix, regex (got {', '.join(present)})")
        return None
    kind = present[0]
    text = r.string(m, kind, path)
    if text is None:
        return None
    if kind == "regex":
        try:
            Regex(text)
        except RegexError as exc:
            r.error((*path, kind), f"invalid regular expression (RE2 syntax): {exc}")
            return None
    return StringMatch(kind, text)


def _match_map(
    r: Reader, m: Mapping[str, Any], key: str, path: Path_, lower_keys: bool
) -> tuple[tuple[str, StringMatch], ...]:
    value = m.get(key)
    if value is None:
        return ()
    if not isinstance(value, dict):
        r.error((*path, key), "expected a mapping of name to match")
        return ()
    out = []
    for name, spec in value.items():
        if lower_keys:
            if not _HEADER_NAME.match(name):
                r.error((*path, key, name), f"{name!r} is not a valid header name")
                continue
            if name != name.lower():
                r.error((*path, key, name), "header names must be lower-case")
                continue
            if name in ("uri", "scheme", "method", "authority"):
                continue  # Istio ignores these keys inside headers
        sm = _string_match(r, spec, (*path, key, name))
        if sm is not None:
            out.append((name, sm))
    return tuple(out)


def _header_ops(r: Reader, value: Any, path: Path_) -> HeaderOperations:
    m = r.mapping(value, path, ("set", "add", "remove"))
    if not m:
        return HeaderOperations()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for name, v in r.string_map(m, key, path).items():
            if not _HEADER_NAME.match(name):
                r.error((*path, key, name), f"{name!r} is not a valid header name")
            elif any(c in v for c in "\r\n\0"):
                r.error((*path, key, name), "header values may not contain CR, LF or NUL")
            else:
                out.append((name.lower(), v))
        return tuple(out)

    removes = r.strings(m, "remove", path)
    return HeaderOperations(
        set=pairs("set"), add=pairs("add"), remove=tuple(x.lower() for x in removes)
    )


def _headers(r: Reader, value: Any, path: Path_) -> Headers:
    m = r.mapping(value, path, ("request", "response"))
    if not m:
        return Headers()
    return Headers(
        _header_ops(r, m.get("request"), (*path, "request")),
        _header_ops(r, m.get("response"), (*path, "response")),
    )


def _destination(r: Reader, value: Any, path: Path_) -> Destination | None:
    m = r.mapping(value, path, ("host", "subset", "port"), required=("host",))
    if m is None:
        return None
    host = r.string(m, "host", path)
    if host is None:
        return None
    _host(r, host, (*path, "host"))
    port = None
    if m.get("port") is not None:
        pm = r.mapping(m["port"], (*path, "port"), ("number",), required=("number",))
        if pm:
            port = r.port(pm, "number", (*path, "port"))
    return Destination(path, host, r.string(m, "subset", path), port)


def _weighted(
    r: Reader, m: Mapping[str, Any], key: str, path: Path_
) -> tuple[WeightedDestination, ...]:
    out = []
    for item_path, item in r.items(m, key, path):
        dm = r.mapping(
            item, item_path, ("destination", "weight", "headers"), required=("destination",)
        )
        if dm is None:
            continue
        dest = _destination(r, dm.get("destination"), (*item_path, "destination"))
        weight = r.integer(dm, "weight", item_path, minimum=0)
        headers = _headers(r, dm.get("headers"), (*item_path, "headers"))
        if dest is not None:
            out.append(WeightedDestination(dest, weight, headers))
    if len(out) > 1 and any(d.weight is None for d in out):
        r.error((*path, key), "when a route has several destinations each needs a weight")
    return tuple(out)


# ---- ServiceEntry -------------------------------------------------------------------------------


def _service_entry(r: Reader, origin: Origin, spec: Any) -> ServiceEntry | None:
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
        _host(r, h, (*path, "hosts", i))
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
        protocol = _protocol(r, pm, item_path, name)
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


# ---- VirtualService -----------------------------------------------------------------------------


def _http_match(r: Reader, value: Any, path: Path_) -> HTTPMatch | None:
    m = r.mapping(
        value,
        path,
        (
            "name",
            "uri",
            "scheme",
            "method",
            "authority",
            "headers",
            "port",
            "sourceLabels",
            "gateways",
            "queryParams",
            "ignoreUriCase",
            "withoutHeaders",
            "sourceNamespace",
            "statPrefix",
        ),
    )
    if m is None:
        return None

    def sm(key: str) -> StringMatch | None:
        return _string_match(r, m[key], (*path, key)) if m.get(key) is not None else None

    return HTTPMatch(
        path=path,
        uri=sm("uri"),
        method=sm("method"),
        authority=sm("authority"),
        scheme=sm("scheme"),
        headers=_match_map(r, m, "headers", path, lower_keys=True),
        without_headers=_match_map(r, m, "withoutHeaders", path, lower_keys=True),
        query_params=_match_map(r, m, "queryParams", path, lower_keys=False),
        port=r.port(m, "port", path),
        ignore_uri_case=r.boolean(m, "ignoreUriCase", path),
        source=_source_match(r, m, path),
    )


def _source_match(r: Reader, m: Mapping[str, Any], path: Path_) -> SourceMatch:
    labels = r.string_map(m, "sourceLabels", path)
    namespace = r.string(m, "sourceNamespace", path)
    gateways = r.strings(m, "gateways", path)
    if not labels and namespace is None and not gateways:
        return ANY_SOURCE
    return SourceMatch(tuple(sorted(labels.items())), namespace, gateways)


def _http_route(r: Reader, value: Any, path: Path_, index: int) -> HTTPRoute | None:
    allowed = (
        "name",
        "match",
        "route",
        "timeout",
        "rewrite",
        "headers",
        *DIRECT_FIELDS,
        "retries",
        "fault",
        *MIRROR_FIELDS,
        "corsPolicy",
        "delegate",
    )
    m = r.mapping(value, path, allowed)
    if m is None:
        return None
    matches = []
    for item_path, item in r.items(m, "match", path):
        hm = _http_match(r, item, item_path)
        if hm is not None:
            matches.append(hm)
    route = _weighted(r, m, "route", path)
    delegate = _delegate(r, m, path)
    has_terminal = any(m.get(k) is not None for k in DIRECT_FIELDS) or delegate is not None
    if not route and not has_terminal:
        r.error((*path, "route"), "a route needs at least one destination")
    rewrite_uri = rewrite_authority = None
    rewrite_regex = None
    if m.get("rewrite") is not None:
        rp = (*path, "rewrite")
        rw = r.mapping(m["rewrite"], rp, ("uri", "authority", "uriRegexRewrite"))
        if rw:
            rewrite_uri = r.string(rw, "uri", rp)
            rewrite_authority = r.string(rw, "authority", rp)
            rewrite_regex = _uri_regex_rewrite(r, rw, rp)
            if rewrite_uri is not None and rewrite_regex is not None:
                r.error(rp, "uri and uriRegexRewrite are exclusive")
    timeout = r.duration(m, "timeout", path)
    direct = {k: m[k] for k in DIRECT_FIELDS if m.get(k) is not None}
    retries = _retries(r, m.get("retries"), (*path, "retries")) if "retries" in m else None
    fault = _fault(r, m.get("fault"), (*path, "fault")) if m.get("fault") is not None else None
    _check_direct(r, m, path)
    return HTTPRoute(
        path,
        r.string(m, "name", path) or f"route-{index}",
        tuple(matches),
        route,
        timeout or None,
        rewrite_uri,
        rewrite_authority,
        _headers(r, m.get("headers"), (*path, "headers")),
        direct,
        retries,
        fault,
        _mirrors(r, m, path),
        _cors(r, m, path),
        rewrite_regex,
        delegate,
    )


def _delegate(r: Reader, m: Mapping[str, Any], path: Path_) -> Delegate | None:
    if m.get("delegate") is None:
        return None
    dp = (*path, "delegate")
    dm = r.mapping(m["delegate"], dp, ("name", "namespace"), required=("name",))
    name = r.string(dm, "name", dp) if dm else None
    if name is None:
        return None
    for other in ("route", *DIRECT_FIELDS):
        if m.get(other) is not None:
            r.error((*path, other), "a route with delegate cannot also have " + other)
    return Delegate(name, r.string(dm or {}, "namespace", dp))


def _uri_regex_rewrite(r: Reader, rw: Mapping[str, Any], path: Path_) -> tuple[str, str] | None:
    if rw.get("uriRegexRewrite") is None:
        return None
    rp = (*path, "uriRegexRewrite")
    rm = r.mapping(rw["uriRegexRewrite"], rp, ("match", "rewrite"), required=("match", "rewrite"))
    if rm is None:
        return None
    pattern, replacement = r.string(rm, "match", rp), r.string(rm, "rewrite", rp)
    if pattern is None or replacement is None:
        return None
    try:
        compiled = Regex(pattern)
    except RegexError as exc:
        r.error((*rp, "match"), f"invalid regular expression (RE2 syntax): {exc}")
        return None
    for group in re.findall(r"\\(\d+)", replacement):
        if int(group) > compiled.groups:
            r.error((*rp, "rewrite"), f"\\{group} names no group of the match expression")
            return None
    return pattern, replacement


def _cors(r: Reader, m: Mapping[str, Any], path: Path_) -> CorsPolicy | None:
    if m.get("corsPolicy") is None:
        return None
    cp = (*path, "corsPolicy")
    fields = (
        "allowOrigins",
        "allowOrigin",
        "allowMethods",
        "allowHeaders",
        "exposeHeaders",
        "maxAge",
        "allowCredentials",
        "unmatchedPreflights",
    )
    cm = r.mapping(m["corsPolicy"], cp, fields)
    if cm is None:
        return None
    origins = []
    for item_path, item in r.items(cm, "allowOrigins", cp):
        sm = _string_match(r, item, item_path)
        if sm is not None and sm.kind != "present":
            origins.append(sm)
        elif sm is not None:
            r.error(item_path, "set one of exact, prefix, regex")
    if not origins:  # the deprecated list of exact origins
        origins = [StringMatch("exact", o) for o in r.strings(cm, "allowOrigin", cp)]
    for key in ("allowMethods", "allowHeaders", "exposeHeaders"):
        for i, value in enumerate(r.strings(cm, key, cp)):
            if not _HEADER_NAME.match(value) and not (key == "allowMethods" and value == "*"):
                if key != "allowMethods" and value == "*":
                    continue
                r.error((*cp, key, i), f"not a valid token: {value!r}")
    credentials = cm.get("allowCredentials")
    if credentials is not None and not isinstance(credentials, bool):
        r.error((*cp, "allowCredentials"), "expected true or false")
        credentials = None
    unmatched = r.choice(cm, "unmatchedPreflights", cp, ("UNSPECIFIED", "FORWARD", "IGNORE"))
    return CorsPolicy(
        tuple(origins),
        r.strings(cm, "allowMethods", cp),
        r.strings(cm, "allowHeaders", cp),
        r.strings(cm, "exposeHeaders", cp),
        r.duration(cm, "maxAge", cp),
        credentials,
        unmatched != "IGNORE",
    )


MIRROR_FIELDS = ("mirror", "mirrorPercentage", "mirror_percent", "mirrorPercent", "mirrors")


def _percent(r: Reader, m: Mapping[str, Any], key: str, path: Path_) -> float | None:
    """An Istio `Percent` field (`{value: 0-100}`); None when absent or wrong (reported)."""
    if m.get(key) is None:
        return None
    pm = r.mapping(m[key], (*path, key), ("value",))
    value = pm.get("value") if pm else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100:
        return float(value)
    r.error((*path, key, "value"), "expected a number from 0 to 100")
    return None


def _mirrors(r: Reader, m: Mapping[str, Any], path: Path_) -> tuple[HTTPMirror, ...]:
    """`mirror` with `mirrorPercentage` (absent: 100 %; the deprecated integer
    `mirror_percent` too), or the list `mirrors` — not both, as Istio validates."""
    out = []
    if m.get("mirror") is not None:
        if m.get("mirrors") is not None:
            r.error((*path, "mirrors"), "mirror and mirrors are exclusive")
        dest = _destination(r, m["mirror"], (*path, "mirror"))
        percent = _percent(r, m, "mirrorPercentage", path)
        for legacy in ("mirror_percent", "mirrorPercent"):
            if percent is None and m.get(legacy) is not None:
                percent = r.integer(m, legacy, path, minimum=0, maximum=100)
        if dest is not None:
            out.append(HTTPMirror(dest, 100.0 if percent is None else float(percent)))
    elif any(m.get(k) is not None for k in ("mirrorPercentage", "mirror_percent", "mirrorPercent")):
        r.error((*path, "mirrorPercentage"), "a mirror percentage needs `mirror`")
    for item_path, item in r.items(m, "mirrors", path):
        mm = r.mapping(item, item_path, ("destination", "percentage"), required=("destination",))
        if mm is None or mm.get("destination") is None:
            continue
        dest = _destination(r, mm["destination"], (*item_path, "destination"))
        percent = _percent(r, mm, "percentage", item_path)
        if dest is not None:
            out.append(HTTPMirror(dest, 100.0 if percent is None else percent))
    return tuple(out)


def _check_direct(r: Reader, m: Mapping[str, Any], path: Path_) -> None:
    """directResponse and redirect are compiled from the raw fields: check them here."""
    if m.get("directResponse") is not None:
        dp = (*path, "directResponse")
        dm = r.mapping(m["directResponse"], dp, ("status", "body"), required=("status",))
        if dm is not None:
            r.integer(dm, "status", dp, minimum=200, maximum=599)
            if dm.get("body") is not None:
                bm = r.mapping(dm["body"], (*dp, "body"), ("string",))
                if bm is not None:
                    r.string(bm, "string", (*dp, "body"))
    if m.get("redirect") is not None:
        rp = (*path, "redirect")
        rm = r.mapping(
            m["redirect"], rp, ("uri", "authority", "port", "scheme", "redirectCode", "derivePort")
        )
        if rm is not None:
            for key in ("uri", "authority", "scheme"):
                r.string(rm, key, rp)
            r.port(rm, "port", rp)
            code = rm.get("redirectCode")
            if code is not None and code not in (301, 302, 303, 307, 308):
                r.error((*rp, "redirectCode"), "must be one of 301, 302, 303, 307, 308")
            if rm.get("derivePort") is not None:
                r.error((*rp, "derivePort"), "not supported")


GRPC_STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


def _percentage(r: Reader, m: Mapping[str, Any], path: Path_) -> float | None:
    """`percentage: {value}` (0-100) or the deprecated integer `percent`; None when neither
    is given (Istio then sends Envoy an empty FractionalPercent: no request is faulted)."""
    if m.get("percentage") is not None:
        value = _percent(r, m, "percentage", path)
        return 0.0 if value is None else value
    percent = r.integer(m, "percent", path, minimum=0, maximum=100)
    return float(percent) if percent is not None else None


def _fault(r: Reader, value: Any, path: Path_) -> HTTPFault | None:
    m = r.mapping(value, path, ("delay", "abort"))
    if m is None:
        return None
    fault = HTTPFault()
    if m.get("delay") is not None:
        dp = (*path, "delay")
        dm = r.mapping(m["delay"], dp, ("fixedDelay", "exponentialDelay", "percentage", "percent"))
        if dm is not None:
            if dm.get("exponentialDelay") is not None:
                r.error((*dp, "exponentialDelay"), "not supported (Istio does not either)")
            delay = r.duration(dm, "fixedDelay", dp)
            if delay is None:
                r.error(dp, "a delay needs fixedDelay")
            fault = HTTPFault(delay, _percentage(r, dm, dp))
    if m.get("abort") is not None:
        ap = (*path, "abort")
        am = r.mapping(m["abort"], ap, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        if am is not None:
            status = r.integer(am, "httpStatus", ap, minimum=200, maximum=599)
            grpc = r.choice(am, "grpcStatus", ap, GRPC_STATUS_NAMES)
            if am.get("http2Error") is not None:
                r.error((*ap, "http2Error"), "not supported")
            if status is None and grpc is None:
                r.error(ap, "an abort needs httpStatus or grpcStatus")
            fault = HTTPFault(
                fault.delay, fault.delay_percent, status, grpc, _percentage(r, am, ap)
            )
    return fault


RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "retriable-headers",  # names come from x-envoy-retriable-header-names (Istio has no field)
    "envoy-ratelimited",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)


def _retries(r: Reader, value: Any, path: Path_) -> HTTPRetry | None:
    m = r.mapping(
        value,
        path,
        (
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ),
    )
    if m is None:
        return None
    retry_on = None
    text = r.string(m, "retryOn", path)
    if text is not None:
        items = [t.strip() for t in text.split(",") if t.strip()]
        for t in items:
            if t not in RETRY_ON and not (t.isdigit() and 100 <= int(t) <= 599):
                r.error(
                    (*path, "retryOn"),
                    f"unknown retry condition {t!r}{did_you_mean(t, RETRY_ON)} "
                    "(Envoy's names, or an HTTP status code)",
                )
        retry_on = tuple(items)
    per_try = r.duration(m, "perTryTimeout", path)
    if per_try is not None and per_try <= 0:
        r.error((*path, "perTryTimeout"), "must be greater than zero")
        per_try = None
    if m.get("backoff") is not None:
        r.error((*path, "backoff"), "not supported: Envoy's jittered 25 ms base backoff is used")
    return HTTPRetry(
        r.integer(m, "attempts", path, minimum=0, maximum=100),
        per_try,
        retry_on,
        r.boolean(m, "retryIgnorePreviousHosts", path, True),
    )


def _virtual_service(r: Reader, origin: Origin, spec: Any) -> VirtualService | None:
    path: Path_ = ("spec",)
    # No hosts: a delegate, whose http routes a root VirtualService takes in (compile).
    m = r.mapping(spec, path, ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    if m is None:
        return None
    gateways = r.strings(m, "gateways", path)
    hosts = r.strings(m, "hosts", path)
    for i, h in enumerate(hosts):
        _host(r, h, (*path, "hosts", i))
    if m.get("tls"):
        r.error((*path, "tls"), "TLS (SNI) routes are not supported yet")
    http = []
    for i, (item_path, item) in enumerate(r.items(m, "http", path)):
        route = _http_route(r, item, item_path, i)
        if route is not None:
            http.append(route)
    tcp = []
    for item_path, item in r.items(m, "tcp", path):
        tm = r.mapping(item, item_path, ("match", "route"), required=("route",))
        if tm is None:
            continue
        matches = []
        for mp, mv in r.items(tm, "match", item_path):
            mm = r.mapping(
                mv,
                mp,
                ("port", "destinationSubnets", "sourceLabels", "gateways", "sourceNamespace"),
            )
            if mm:
                matches.append(TCPMatch(r.port(mm, "port", mp), _source_match(r, mm, mp)))
        tcp.append(TCPRoute(item_path, tuple(matches), _weighted(r, tm, "route", item_path)))
    return VirtualService(origin, hosts, tuple(http), tuple(tcp), gateways)


# ---- DestinationRule ----------------------------------------------------------------------------


LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
HASH_KEYS = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
MAX_HASH_TABLE = 1 << 20  # Python builds of larger rings/tables take seconds and gigabytes
MAGLEV_MAX = 5000011  # Istio's bound (exclusive)


def _load_balancer(r: Reader, value: Any, path: Path_) -> LoadBalancerSettings | None:
    lb = r.mapping(
        value,
        path,
        ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"),
    )
    if lb is None:
        return None
    simple = r.choice(lb, "simple", path, LB_SIMPLE)
    if simple == "LEAST_CONN":
        simple = "LEAST_REQUEST"  # deprecated alias in Istio
    if simple == "PASSTHROUGH":
        r.error((*path, "simple"), "PASSTHROUGH is not supported")
    chash = None
    if lb.get("consistentHash") is not None:
        if lb.get("simple") is not None:
            r.error(path, "simple and consistentHash are exclusive (one load balancer)")
        chash = _consistent_hash(r, lb["consistentHash"], (*path, "consistentHash"))
    warmup = _warmup(r, lb, path)
    if warmup is not None and (chash is not None or simple == "RANDOM"):
        r.error(path, "warmup applies to ROUND_ROBIN and LEAST_REQUEST only (as in Istio)")
    return LoadBalancerSettings(simple, chash, warmup, lb.get("localityLbSetting") is not None)


def _warmup(r: Reader, lb: Mapping[str, Any], path: Path_) -> Warmup | None:
    if lb.get("warmup") is not None:
        if lb.get("warmupDurationSecs") is not None:
            r.error(path, "warmup and warmupDurationSecs are exclusive")
        wp = (*path, "warmup")
        wm = r.mapping(
            lb["warmup"], wp, ("duration", "minimumPercent", "aggression"), required=("duration",)
        )
        if wm is None:
            return None
        duration = r.duration(wm, "duration", wp)
        minimum = wm.get("minimumPercent", {"value": 10})
        minimum = minimum.get("value") if isinstance(minimum, dict) else minimum
        if (
            not isinstance(minimum, int | float)
            or isinstance(minimum, bool)
            or not (0 <= minimum <= 100)
        ):
            r.error((*wp, "minimumPercent"), "expected a number from 0 to 100")
            return None
        aggression = wm.get("aggression", {"value": 1.0})
        aggression = aggression.get("value") if isinstance(aggression, dict) else aggression
        if (
            not isinstance(aggression, int | float)
            or isinstance(aggression, bool)
            or (aggression < 1)
        ):
            r.error((*wp, "aggression"), "expected a number of at least 1")
            return None
        return Warmup(duration, float(minimum), float(aggression)) if duration else None
    duration = r.duration(lb, "warmupDurationSecs", path)
    return Warmup(duration) if duration else None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _consistent_hash(r: Reader, value: Any, path: Path_) -> ConsistentHash | None:
    m = r.mapping(value, path, (*HASH_KEYS, "ringHash", "maglev", "minimumRingSize"))
    if m is None:
        return None
    given = [k for k in HASH_KEYS if m.get(k) is not None and m.get(k) is not False]
    if len(given) != 1:
        r.error(
            path,
            f"set exactly one of {', '.join(HASH_KEYS)}"
            + (f" (got {', '.join(given)})" if given else ""),
        )
        return None
    key = given[0]
    chash: ConsistentHash | None = None
    if key == "httpHeaderName":
        name = r.string(m, key, path)
        if name is not None:
            if not name.strip() or any(c in name for c in " :\r\n"):
                r.error((*path, key), f"not a header name: {name!r}")
            chash = ConsistentHash("header", name.lower())
    elif key == "httpQueryParameterName":
        name = r.string(m, key, path)
        if name is not None:
            chash = ConsistentHash("query", name)
    elif key == "useSourceIp":
        if r.boolean(m, key, path):
            chash = ConsistentHash("source_ip")
    else:
        cp = (*path, key)
        cm = r.mapping(m[key], cp, ("name", "path", "ttl", "attributes"), required=("name", "ttl"))
        if cm is not None:
            if cm.get("attributes") is not None:
                r.error((*cp, "attributes"), "cookie attributes are not supported")
            name = r.string(cm, "name", cp)
            ttl = r.duration(cm, "ttl", cp)
            if name is not None and ttl is not None:
                chash = ConsistentHash("cookie", name, r.string(cm, "path", cp) or "", ttl)
    size = 1024
    maglev = False
    algorithms = [k for k in ("ringHash", "maglev", "minimumRingSize") if m.get(k) is not None]
    if len(algorithms) > 1:
        r.error(path, f"{' and '.join(algorithms)} are exclusive")
    elif m.get("maglev") is not None:
        mp = (*path, "maglev")
        mm = r.mapping(m["maglev"], mp, ("tableSize",), required=("tableSize",))
        table = r.integer(mm or {}, "tableSize", mp, minimum=1, maximum=MAGLEV_MAX - 1)
        maglev = True
        size = 65537
        if table is not None:
            if not _is_prime(table):
                r.error((*mp, "tableSize"), f"must be a prime number, got {table}")
            elif table > MAX_HASH_TABLE:
                r.error((*mp, "tableSize"), f"meshproxy builds tables up to {MAX_HASH_TABLE}")
            else:
                size = table
    elif algorithms:
        rp = (*path, "ringHash") if m.get("ringHash") is not None else path
        rm = r.mapping(m["ringHash"], rp, ("minimumRingSize",)) if rp != path else m
        ring = r.integer(rm or {}, "minimumRingSize", rp, minimum=0, maximum=MAX_HASH_TABLE)
        if ring:  # Istio: 0 means Envoy's default, 1024
            size = ring
    if chash is None:
        return None
    return ConsistentHash(chash.key, chash.name, chash.cookie_path, chash.cookie_ttl, maglev, size)


def _traffic_policy(r: Reader, value: Any, path: Path_, top: bool = True) -> TrafficPolicy | None:
    allowed = [
        "loadBalancer",
        "connectionPool",
        "outlierDetection",
        "tls",
        "tunnel",
        "proxyProtocol",
        "retryBudget",
    ]
    if top:
        allowed.append("portLevelSettings")
    else:
        allowed.append("port")
    m = r.mapping(value, path, allowed)
    if m is None:
        return None
    lb = (
        _load_balancer(r, m["loadBalancer"], (*path, "loadBalancer"))
        if m.get("loadBalancer") is not None
        else None
    )
    pool = None
    if m.get("connectionPool") is not None:
        cp_path = (*path, "connectionPool")
        cp = r.mapping(m["connectionPool"], cp_path, ("tcp", "http"))
        if cp is not None:
            tcp = (
                r.mapping(
                    cp.get("tcp"),
                    (*cp_path, "tcp"),
                    (
                        "maxConnections",
                        "connectTimeout",
                        "tcpKeepalive",
                        "maxConnectionDuration",
                        "idleTimeout",
                    ),
                )
                or {}
            )
            http = (
                r.mapping(
                    cp.get("http"),
                    (*cp_path, "http"),
                    (
                        "http1MaxPendingRequests",
                        "http2MaxRequests",
                        "maxRequestsPerConnection",
                        "maxRetries",
                        "idleTimeout",
                        "h2UpgradePolicy",
                        "useClientProtocol",
                        "maxConcurrentStreams",
                    ),
                )
                or {}
            )
            tp, hp = (*cp_path, "tcp"), (*cp_path, "http")
            pool = ConnectionPool(
                max_connections=r.integer(tcp, "maxConnections", tp, minimum=0),
                connect_timeout=r.duration(tcp, "connectTimeout", tp),
                tcp_idle_timeout=r.duration(tcp, "idleTimeout", tp),
                http1_max_pending_requests=r.integer(
                    http, "http1MaxPendingRequests", hp, minimum=0
                ),
                http2_max_requests=r.integer(http, "http2MaxRequests", hp, minimum=0),
                max_requests_per_connection=r.integer(
                    http, "maxRequestsPerConnection", hp, minimum=0
                ),
                max_retries=r.integer(http, "maxRetries", hp, minimum=0),
                idle_timeout=r.duration(http, "idleTimeout", hp),
                h2_upgrade_policy=r.choice(
                    http, "h2UpgradePolicy", hp, ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
                ),
                use_client_protocol=r.boolean(http, "useClientProtocol", hp),
            )
    outlier = None
    if m.get("outlierDetection") is not None:
        op = (*path, "outlierDetection")
        od = r.mapping(
            m["outlierDetection"],
            op,
            (
                "consecutiveErrors",
                "consecutive5xxErrors",
                "consecutiveGatewayErrors",
                "consecutiveLocalOriginFailures",
                "splitExternalLocalOriginErrors",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
                "minHealthPercent",
            ),
        )
        if od is not None:
            outlier = OutlierDetection(
                consecutive_5xx_errors=r.integer(od, "consecutive5xxErrors", op, minimum=0),
                consecutive_gateway_errors=r.integer(od, "consecutiveGatewayErrors", op, minimum=0),
                interval=r.duration(od, "interval", op),
                base_ejection_time=r.duration(od, "baseEjectionTime", op),
                max_ejection_percent=r.integer(
                    od, "maxEjectionPercent", op, minimum=0, maximum=100
                ),
                min_health_percent=r.integer(od, "minHealthPercent", op, minimum=0, maximum=100),
            )
    tls = None
    if m.get("tls") is not None:
        tls_map = r.mapping(
            m["tls"],
            (*path, "tls"),
            (
                "mode",
                "clientCertificate",
                "privateKey",
                "caCertificates",
                "credentialName",
                "subjectAltNames",
                "sni",
                "insecureSkipVerify",
                "caCrl",
            ),
        )
        if tls_map is not None:
            tls = _client_tls(r, tls_map, (*path, "tls"))
    port_level = []
    for item_path, item in r.items(m, "portLevelSettings", path):
        sub = _traffic_policy(r, item, item_path, top=False)
        pm = item.get("port") if isinstance(item, dict) else None
        number = None
        if isinstance(pm, dict):
            number = r.port(pm, "number", (*item_path, "port"))
        else:
            r.error((*item_path, "port"), "required field is missing")
        if sub is not None and number is not None:
            port_level.append((number, sub))
    return TrafficPolicy(lb, pool, outlier, tls, tuple(port_level))


def _destination_rule(r: Reader, origin: Origin, spec: Any) -> DestinationRule | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec,
        path,
        ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"),
        required=("host",),
    )
    if m is None:
        return None
    host = r.string(m, "host", path) or ""
    _host(r, host, (*path, "host"))
    policy = None
    if m.get("trafficPolicy") is not None:
        policy = _traffic_policy(r, m["trafficPolicy"], (*path, "trafficPolicy"))
    subsets = []
    names: set[str] = set()
    for item_path, item in r.items(m, "subsets", path):
        sm = r.mapping(item, item_path, ("name", "labels", "trafficPolicy"), required=("name",))
        if sm is None:
            continue
        name = r.string(sm, "name", item_path) or ""
        if name in names:
            r.error((*item_path, "name"), f"subset {name!r} is declared twice")
        names.add(name)
        sp = None
        if sm.get("trafficPolicy") is not None:
            sp = _traffic_policy(r, sm["trafficPolicy"], (*item_path, "trafficPolicy"))
        subsets.append(Subset(item_path, name, r.string_map(sm, "labels", item_path), sp))
    return DestinationRule(origin, host, policy, tuple(subsets))


# ---- Sidecar ------------------------------------------------------------------------------------


def _sidecar_port(r: Reader, value: Any, path: Path_) -> SidecarPort | None:
    m = r.mapping(value, path, ("number", "protocol", "name", "targetPort"), required=("number",))
    if m is None:
        return None
    number = r.port(m, "number", path)
    name = r.string(m, "name", path) or ""
    protocol = _protocol(r, m, path, name)
    if number is None:
        return None
    return SidecarPort(number, protocol, name or f"{protocol.lower()}-{number}")


def _sidecar(r: Reader, origin: Origin, spec: Any) -> Sidecar | None:
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
        if default_endpoint is not None and not _valid_endpoint(default_endpoint):
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


def _valid_endpoint(text: str) -> bool:
    if text.startswith("unix://"):
        return False  # not supported yet; reported as invalid with the accepted forms
    host, sep, port = text.rpartition(":")
    return bool(sep) and port.isdigit() and 0 < int(port) < 65536 and bool(host)


# ---- ProxyConfig --------------------------------------------------------------------------------

_PROXY_FIELDS = {
    "proxyAdminPort": "proxy_admin_port",
    "adminBind": "admin_bind",
    "statusPort": "status_port",
    "proxyListenPort": "proxy_listen_port",
    "proxyInboundListenPort": "proxy_inbound_listen_port",
    "interceptionMode": "interception_mode",
    "drainDuration": "drain_duration",
    "concurrency": "concurrency",
    "http1Codec": "http1_codec",
    "connectTimeout": "connect_timeout",
    "upstreamIdleTimeout": "upstream_idle_timeout",
    "requestHeadersTimeout": "request_headers_timeout",
    "idleTimeout": "idle_timeout",
    "maxRequestHeadersKb": "max_request_headers_kb",
    "maxHeadersCount": "max_headers_count",
    "maxConnections": "max_connections",
    "accessLogFile": "access_log_file",
    "namespace": "namespace",
    "outboundTrafficPolicy": "outbound_traffic_policy",
    "trustDomain": "trust_domain",
    "pathNormalization": "path_normalization",
    "headersWithUnderscoresAction": "headers_with_underscores_action",
    "certificates": "certificates",
    "labels": "labels",
    "localRateLimits": "local_rate_limits",
}
_CERT_FIELDS = {"certChain": "cert_chain", "privateKey": "private_key", "rootCert": "root_cert"}
_PORT_FIELDS = ("proxyAdminPort", "statusPort", "proxyListenPort", "proxyInboundListenPort")
_DURATION_FIELDS = (
    "drainDuration",
    "connectTimeout",
    "upstreamIdleTimeout",
    "requestHeadersTimeout",
    "idleTimeout",
)


MIN_FILL_INTERVAL = 0.05  # Envoy's lower bound for token_bucket.fill_interval


def _local_rate_limits(r: Reader, m: Mapping[str, Any], path: Path_) -> tuple[LocalRateLimit, ...]:
    out: list[LocalRateLimit] = []
    names: set[str] = set()
    for item_path, item in r.items(m, "localRateLimits", path):
        lm = r.mapping(
            item,
            item_path,
            ("name", "port", "direction", "route", "tokenBucket", "statusCode"),
            required=("name", "tokenBucket"),
        )
        if lm is None:
            continue
        name = r.string(lm, "name", item_path)
        if name is not None and name in names:
            r.error((*item_path, "name"), f"duplicate name {name!r}")
        names.add(name or "")
        port = r.port(lm, "port", item_path)
        direction = r.choice(lm, "direction", item_path, ("INBOUND", "OUTBOUND"), "INBOUND")
        vs = vs_ns = route = None
        if lm.get("route") is not None:
            rp = (*item_path, "route")
            rm = r.mapping(
                lm["route"],
                rp,
                ("virtualService", "namespace", "name"),
                required=("virtualService", "name"),
            )
            if rm is not None:
                vs = r.string(rm, "virtualService", rp)
                vs_ns = r.string(rm, "namespace", rp)
                route = r.string(rm, "name", rp)
            if lm.get("port") is not None or lm.get("direction") is not None:
                r.error(item_path, "set either port (with direction) or route, not both")
        elif lm.get("port") is None:
            r.error(item_path, "set port (every HTTP request for it) or route (one route's)")
        bp = (*item_path, "tokenBucket")
        bm = r.mapping(
            lm.get("tokenBucket"),
            bp,
            ("maxTokens", "tokensPerFill", "fillInterval"),
            required=("maxTokens", "fillInterval"),
        )
        if bm is None:
            continue
        max_tokens = r.integer(bm, "maxTokens", bp, minimum=1)
        per_fill = r.integer(bm, "tokensPerFill", bp, default=1, minimum=1)
        interval = r.duration(bm, "fillInterval", bp)
        if interval is not None and interval < MIN_FILL_INTERVAL:
            r.error((*bp, "fillInterval"), "must be at least 50ms (as Envoy requires)")
            interval = None
        status = r.integer(lm, "statusCode", item_path, default=429, minimum=400, maximum=599)
        if name and max_tokens and per_fill and interval and status:
            out.append(
                LocalRateLimit(
                    name,
                    max_tokens,
                    per_fill,
                    interval,
                    port,
                    direction != "OUTBOUND",
                    vs,
                    vs_ns,
                    route,
                    status,
                )
            )
    return tuple(out)


def _proxy_config(r: Reader, origin: Origin, spec: Any) -> ProxyConfigResource | None:
    path: Path_ = ("spec",)
    m = r.mapping(spec, path, tuple(_PROXY_FIELDS))
    if m is None:
        return None
    values: dict[str, Any] = {}
    defaults = ProxySettings()
    for key, attr in _PROXY_FIELDS.items():
        if m.get(key) is None:
            continue
        if key in _PORT_FIELDS:
            v: Any = r.integer(m, key, path, minimum=0, maximum=65535)
        elif key in _DURATION_FIELDS:
            v = r.duration(m, key, path)
            if v is not None and v <= 0 and key != "drainDuration":
                r.error((*path, key), "must be greater than zero")
                v = None
        elif key == "concurrency":
            v = r.integer(m, key, path, minimum=0, maximum=64)
        elif key == "maxRequestHeadersKb":
            v = r.integer(m, key, path, minimum=1, maximum=8192)
        elif key in ("maxHeadersCount", "maxConnections"):
            v = r.integer(m, key, path, minimum=1)
        elif key == "interceptionMode":
            v = r.choice(m, key, path, ("REDIRECT", "NONE"))
        elif key == "http1Codec":
            v = r.choice(m, key, path, ("auto", "httptools", "h11"))
        elif key == "outboundTrafficPolicy":
            om = r.mapping(m[key], (*path, key), ("mode",))
            v = r.choice(om, "mode", (*path, key), ("REGISTRY_ONLY", "ALLOW_ANY")) if om else None
        elif key == "certificates":
            cm = r.mapping(m[key], (*path, key), tuple(_CERT_FIELDS))
            for ckey, cattr in _CERT_FIELDS.items():
                cv = r.string(cm, ckey, (*path, key)) if cm else None
                if cv:
                    values[cattr] = cv
            continue
        elif key == "labels":
            v = tuple(sorted(r.string_map(m, key, path).items())) or None
        elif key == "localRateLimits":
            v = _local_rate_limits(r, m, path) or None
        elif key == "pathNormalization":
            v = r.choice(
                m, key, path, ("NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
            )
        elif key == "headersWithUnderscoresAction":
            v = r.choice(m, key, path, ("ALLOW", "REJECT_REQUEST", "DROP_HEADER"))
        elif key == "trustDomain":
            v = r.string(m, key, path)
            if v is not None and not re.fullmatch(r"[a-z0-9._-]{1,255}", v):
                r.error(
                    (*path, key), f"invalid trust domain {v!r} (lower-case letters, digits, . _ -)"
                )
                v = None
        else:
            v = r.string(m, key, path)
        if v is not None:
            values[attr] = v
    settings = ProxySettings(
        **{**{f.name: getattr(defaults, f.name) for f in fields(defaults)}, **values}
    )
    return ProxyConfigResource(origin, settings, frozenset(values))


def _client_tls(r: Reader, m: Mapping[str, Any], path: Path_) -> ClientTls | None:
    mode = r.choice(m, "mode", path, ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"), "DISABLE")
    for unsupported in ("credentialName", "caCrl"):
        if m.get(unsupported) is not None:
            r.error(
                (*path, unsupported),
                "not supported: give file paths (clientCertificate, privateKey, caCertificates)",
            )
    tls = ClientTls(
        mode or "DISABLE",
        r.string(m, "clientCertificate", path),
        r.string(m, "privateKey", path),
        r.string(m, "caCertificates", path),
        r.strings(m, "subjectAltNames", path),
        r.string(m, "sni", path),
        r.boolean(m, "insecureSkipVerify", path),
    )
    if tls.mode == "MUTUAL" and not (tls.client_certificate and tls.private_key):
        r.error(path, "mode MUTUAL needs clientCertificate and privateKey")
    if tls.mode == "ISTIO_MUTUAL" and (tls.client_certificate or tls.private_key):
        r.error(
            path,
            "mode ISTIO_MUTUAL uses the workload certificate: drop clientCertificate/privateKey",
        )
    return tls


# ---- PeerAuthentication --------------------------------------------------------------------------

MTLS_MODES = ("UNSET", "STRICT", "PERMISSIVE", "DISABLE")


def _mtls_mode(r: Reader, m: Mapping[str, Any] | None, path: Path_) -> str | None:
    if m is None:
        return None
    mm = r.mapping(m, path, ("mode",))
    mode = r.choice(mm, "mode", path, MTLS_MODES) if mm else None
    return None if mode in (None, "UNSET") else mode


def _peer_authentication(r: Reader, origin: Origin, spec: Any) -> PeerAuthentication | None:
    path: Path_ = ("spec",)
    m = r.mapping(spec, path, ("selector", "mtls", "portLevelMtls"))
    if m is None:
        return None
    selector = None
    if m.get("selector") is not None:
        sm = r.mapping(m["selector"], (*path, "selector"), ("matchLabels",))
        selector = tuple(sorted(r.string_map(sm or {}, "matchLabels", (*path, "selector")).items()))
    mode = _mtls_mode(r, m.get("mtls"), (*path, "mtls"))
    ports: list[tuple[int, str]] = []
    plm = m.get("portLevelMtls")
    if plm is not None:
        pl_path = (*path, "portLevelMtls")
        if selector is None:
            r.error(pl_path, "portLevelMtls needs a workload selector (as Istio requires)")
        if not isinstance(plm, dict):
            r.error(pl_path, "expected a mapping of port number to {mode}")
        else:
            for key, value in plm.items():
                if not str(key).isdigit() or not 0 < int(key) < 65536:
                    r.error((*pl_path, str(key)), "expected a port number")
                    continue
                pmode = _mtls_mode(r, value, (*pl_path, str(key)))
                if pmode is not None:
                    ports.append((int(key), pmode))
    return PeerAuthentication(origin, selector, mode, tuple(ports))


# ---- AuthorizationPolicy -------------------------------------------------------------------------

_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
# Fail closed: a policy that names what meshproxy cannot check (JWT, external authz) is an
# error, never silently ignored — ignoring part of a DENY would open what it meant to close.
_UNSUPPORTED_SOURCE = ("requestPrincipals", "notRequestPrincipals")
WHEN_KEYS = (
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
)


def _ip_list(r: Reader, m: Mapping[str, Any], key: str, path: Path_) -> tuple[str, ...]:
    valid = []
    for i, v in enumerate(r.strings(m, key, path)):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            r.error((*path, key, i), f"{v!r} is not an IP address or CIDR block")
            continue
        valid.append(v)
    return tuple(valid)


def _authz_rule(r: Reader, item: Any, path: Path_) -> AuthzRule | None:
    m = r.mapping(item, path, ("from", "to", "when"))
    if m is None:
        return None
    sources = []
    for fpath, f in r.items(m, "from", path):
        fm = r.mapping(f, fpath, ("source",), required=("source",))
        sm = r.mapping(
            fm.get("source") if fm else None,
            (*fpath, "source"),
            (*_SOURCE_FIELDS, *_UNSUPPORTED_SOURCE),
        )
        if sm is None:
            continue
        for key in _UNSUPPORTED_SOURCE:
            if sm.get(key) is not None:
                r.error(
                    (*fpath, "source", key),
                    "request principals need RequestAuthentication (JWT), which meshproxy "
                    "does not support; refusing the policy rather than ignoring part of it",
                )
        values = {}
        for key, attr in _SOURCE_FIELDS.items():
            if key.lower().endswith("ipblocks"):
                values[attr] = _ip_list(r, sm, key, (*fpath, "source"))
            else:
                values[attr] = r.strings(sm, key, (*fpath, "source"))
        sources.append(AuthzSource(**values))
    operations = []
    for tpath, t in r.items(m, "to", path):
        tm = r.mapping(t, tpath, ("operation",), required=("operation",))
        om = r.mapping(
            tm.get("operation") if tm else None, (*tpath, "operation"), tuple(_OPERATION_FIELDS)
        )
        if om is None:
            continue
        values = {}
        for key, attr in _OPERATION_FIELDS.items():
            values[attr] = r.strings(om, key, (*tpath, "operation"))
            if "ort" in key:
                for i, p in enumerate(values[attr]):
                    if not p.isdigit() or not 0 < int(p) < 65536:
                        r.error((*tpath, "operation", key, i), f"{p!r} is not a port number")
        operations.append(AuthzOperation(**values))
    conditions = []
    for wpath, w in r.items(m, "when", path):
        wm = r.mapping(w, wpath, ("key", "values", "notValues"), required=("key",))
        if wm is None:
            continue
        key = r.string(wm, "key", wpath) or ""
        if not (key in WHEN_KEYS or (key.startswith("request.headers[") and key.endswith("]"))):
            hint = did_you_mean(key, (*WHEN_KEYS, "request.headers[<name>]"))
            if key.startswith("request.auth."):
                hint = " (JWT claims need RequestAuthentication, which meshproxy does not support)"
            r.error((*wpath, "key"), f"unsupported condition key {key!r}{hint}")
            continue
        if key in ("source.ip", "remote.ip", "destination.ip"):
            values_ = _ip_list(r, wm, "values", wpath)
            not_values = _ip_list(r, wm, "notValues", wpath)
        else:
            values_ = r.strings(wm, "values", wpath)
            not_values = r.strings(wm, "notValues", wpath)
        if not values_ and not not_values:
            r.error(wpath, "a condition needs values or notValues")
        conditions.append(AuthzCondition(key, values_, not_values))
    return AuthzRule(tuple(sources), tuple(operations), tuple(conditions))


def _authorization_policy(r: Reader, origin: Origin, spec: Any) -> AuthorizationPolicy | None:
    path: Path_ = ("spec",)
    m = r.mapping(
        spec, path, ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
    )
    if m is None:
        return None
    selector = None
    if m.get("selector") is not None:
        sm = r.mapping(m["selector"], (*path, "selector"), ("matchLabels",))
        selector = tuple(sorted(r.string_map(sm or {}, "matchLabels", (*path, "selector")).items()))
    for key in ("targetRef", "targetRefs"):
        if m.get(key) is not None:
            r.error((*path, key), "targetRef applies to gateways/waypoints; use selector")
    action = r.choice(m, "action", path, ("ALLOW", "DENY", "AUDIT", "CUSTOM"), "ALLOW")
    if action == "CUSTOM":
        r.error((*path, "action"), "CUSTOM (external authorization) is not supported")
    rules = []
    for rpath, item in r.items(m, "rules", path):
        rule = _authz_rule(r, item, rpath)
        if rule is not None:
            rules.append(rule)
    return AuthorizationPolicy(origin, selector, action or "ALLOW", tuple(rules))


_PARSERS: dict[str, Any] = {
    "ServiceEntry": _service_entry,
    "VirtualService": _virtual_service,
    "DestinationRule": _destination_rule,
    "Sidecar": _sidecar,
    "ProxyConfig": _proxy_config,
    "PeerAuthentication": _peer_authentication,
    "AuthorizationPolicy": _authorization_policy,
}
