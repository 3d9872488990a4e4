"""Pieces every kind's schema shares: protocols, hosts, string matches, headers, destinations."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshproxy.config.reader import Reader, did_you_mean
from meshproxy.config.resources import (
    Destination,
    HeaderOperations,
    Headers,
    StringMatch,
    WeightedDestination,
)
from meshproxy.config.source import Path_
from meshproxy.routing.regex import Regex, RegexError

PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "REDIS", "MYSQL")
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HOST_PATTERN = re.compile(
    r"^(\*|(\*\.)?[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?)*\.?)$"
)
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_protocol(r: Reader, m: Mapping[str, Any], path: Path_, port_name: str) -> str:
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


def check_host(r: Reader, value: str, path: Path_) -> None:
    if not HOST_PATTERN.match(value):
        r.error(path, f"{value!r} is not a valid host name")


def string_match(r: Reader, value: Any, path: Path_) -> StringMatch | None:
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


def match_map(
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
            if not HEADER_NAME.match(name):
                r.error((*path, key, name), f"{name!r} is not a valid header name")
                continue
            if name != name.lower():
                r.error((*path, key, name), "header names must be lower-case")
                continue
            if name in ("uri", "scheme", "method", "authority"):
                continue  # Istio ignores these keys inside headers
        sm = string_match(r, spec, (*path, key, name))
        if sm is not None:
            out.append((name, sm))
    return tuple(out)


def header_ops(r: Reader, value: Any, path: Path_) -> HeaderOperations:
    m = r.mapping(value, path, ("set", "add", "remove"))
    if not m:
        return HeaderOperations()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for name, v in r.string_map(m, key, path).items():
            if not HEADER_NAME.match(name):
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


def header_map(r: Reader, value: Any, path: Path_) -> Headers:
    m = r.mapping(value, path, ("request", "response"))
    if not m:
        return Headers()
    return Headers(
        header_ops(r, m.get("request"), (*path, "request")),
        header_ops(r, m.get("response"), (*path, "response")),
    )


def destination(r: Reader, value: Any, path: Path_) -> Destination | None:
    m = r.mapping(value, path, ("host", "subset", "port"), required=("host",))
    if m is None:
        return None
    host = r.string(m, "host", path)
    if host is None:
        return None
    check_host(r, host, (*path, "host"))
    port = None
    if m.get("port") is not None:
        pm = r.mapping(m["port"], (*path, "port"), ("number",), required=("number",))
        if pm:
            port = r.port(pm, "number", (*path, "port"))
    return Destination(path, host, r.string(m, "subset", path), port)


def weighted_destinations(
    r: Reader, m: Mapping[str, Any], key: str, path: Path_
) -> tuple[WeightedDestination, ...]:
    out = []
    for item_path, item in r.items(m, key, path):
        dm = r.mapping(
            item, item_path, ("destination", "weight", "headers"), required=("destination",)
        )
        if dm is None:
            continue
        dest = destination(r, dm.get("destination"), (*item_path, "destination"))
        weight = r.integer(dm, "weight", item_path, minimum=0)
        headers = header_map(r, dm.get("headers"), (*item_path, "headers"))
        if dest is not None:
            out.append(WeightedDestination(dest, weight, headers))
    if len(out) > 1 and any(d.weight is None for d in out):
        r.error((*path, key), "when a route has several destinations each needs a weight")
    return tuple(out)


def workload_selector(
    r: Reader, m: Mapping[str, Any], path: Path_, target_refs: bool = True
) -> tuple[tuple[str, str], ...] | None:
    """`selector.matchLabels` as sorted pairs (None: no selector, the namespace or mesh);
    targetRef(s), which apply to gateways and waypoints, are refused."""
    selector = None
    if m.get("selector") is not None:
        sm = r.mapping(m["selector"], (*path, "selector"), ("matchLabels",))
        selector = tuple(sorted(r.string_map(sm or {}, "matchLabels", (*path, "selector")).items()))
    for key in ("targetRef", "targetRefs") if target_refs else ():
        if m.get(key) is not None:
            r.error((*path, key), "targetRef applies to gateways/waypoints; use selector")
    return selector
