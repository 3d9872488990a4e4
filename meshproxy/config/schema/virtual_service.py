"""VirtualService (networking.istio.io): HTTP and TCP routes, retries, faults, mirrors, CORS."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    ANY_SOURCE,
    CorsPolicy,
    Delegate,
    HTTPFault,
    HTTPMatch,
    HTTPMirror,
    HTTPRetry,
    HTTPRoute,
    Origin,
    SourceMatch,
    StringMatch,
    TCPMatch,
    TCPRoute,
    VirtualService,
)
from meshproxy.config.schema.common import (
    HEADER_NAME,
    check_host,
    destination,
    header_map,
    match_map,
    string_match,
    weighted_destinations,
)
from meshproxy.config.source import Path_
from meshproxy.routing.regex import Regex, RegexError

DIRECT_FIELDS = ("redirect", "directResponse")  # compiled from the raw mappings


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
        return string_match(r, m[key], (*path, key)) if m.get(key) is not None else None

    return HTTPMatch(
        path=path,
        uri=sm("uri"),
        method=sm("method"),
        authority=sm("authority"),
        scheme=sm("scheme"),
        headers=match_map(r, m, "headers", path, lower_keys=True),
        without_headers=match_map(r, m, "withoutHeaders", path, lower_keys=True),
        query_params=match_map(r, m, "queryParams", path, lower_keys=False),
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
    route = weighted_destinations(r, m, "route", path)
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
        header_map(r, m.get("headers"), (*path, "headers")),
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
        sm = string_match(r, item, item_path)
        if sm is not None and sm.kind != "present":
            origins.append(sm)
        elif sm is not None:
            r.error(item_path, "set one of exact, prefix, regex")
    if not origins:  # the deprecated list of exact origins
        origins = [StringMatch("exact", o) for o in r.strings(cm, "allowOrigin", cp)]
    for key in ("allowMethods", "allowHeaders", "exposeHeaders"):
        for i, value in enumerate(r.strings(cm, key, cp)):
            if not HEADER_NAME.match(value) and not (key == "allowMethods" and value == "*"):
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
        dest = destination(r, m["mirror"], (*path, "mirror"))
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
        dest = destination(r, mm["destination"], (*item_path, "destination"))
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


def parse_virtual_service(r: Reader, origin: Origin, spec: Any) -> VirtualService | None:
    path: Path_ = ("spec",)
    # No hosts: a delegate, whose http routes a root VirtualService takes in (compile).
    m = r.mapping(spec, path, ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    if m is None:
        return None
    gateways = r.strings(m, "gateways", path)
    hosts = r.strings(m, "hosts", path)
    for i, h in enumerate(hosts):
        check_host(r, h, (*path, "hosts", i))
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
        tcp.append(
            TCPRoute(item_path, tuple(matches), weighted_destinations(r, tm, "route", item_path))
        )
    return VirtualService(origin, hosts, tuple(http), tuple(tcp), gateways)
