"""ProxyConfig (meshproxy.io): the proxy's own settings, ports, limits and identity files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from meshproxy.config.reader import Reader
from meshproxy.config.resources import (
    LocalRateLimit,
    Origin,
    ProxyConfigResource,
    ProxySettings,
)
from meshproxy.config.schema.mesh_config import (
    parse_default_providers,
    parse_extension_providers,
)
from meshproxy.config.schema.overload import parse_overload
from meshproxy.config.source import Path_

_PROXY_FIELDS = {
    "proxyAdminPort": "proxy_admin_port",
    "adminBind": "admin_bind",
    "statusPort": "status_port",
    "statsPort": "stats_port",
    "tcpReportingDuration": "tcp_reporting_duration",
    "proxyListenPort": "proxy_listen_port",
    "proxyInboundListenPort": "proxy_inbound_listen_port",
    "interceptionMode": "interception_mode",
    "drainDuration": "drain_duration",
    "terminationDrainDuration": "termination_drain_duration",
    "protocolDetectionTimeout": "protocol_detection_timeout",
    "concurrency": "concurrency",
    "http1Codec": "http1_codec",
    "connectTimeout": "connect_timeout",
    "upstreamIdleTimeout": "upstream_idle_timeout",
    "requestHeadersTimeout": "request_headers_timeout",
    "idleTimeout": "idle_timeout",
    "streamIdleTimeout": "stream_idle_timeout",
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
    "workloadName": "workload_name",
    "clusterId": "cluster_id",
    "extensionProviders": "extension_providers",
    "defaultProviders": "default_providers",
    "overload": "overload",
}
_CERT_FIELDS = {"certChain": "cert_chain", "privateKey": "private_key", "rootCert": "root_cert"}
_PORT_FIELDS = (
    "proxyAdminPort",
    "statusPort",
    "statsPort",
    "proxyListenPort",
    "proxyInboundListenPort",
)
_DURATION_FIELDS = (
    "drainDuration",
    "terminationDrainDuration",
    "protocolDetectionTimeout",
    "tcpReportingDuration",
    "connectTimeout",
    "upstreamIdleTimeout",
    "requestHeadersTimeout",
    "idleTimeout",
    "streamIdleTimeout",
)

# Durations where 0 means something: no drain wait, or (Istio's) no detection timeout.
_ZERO_ALLOWED = (
    "drainDuration",
    "terminationDrainDuration",
    "protocolDetectionTimeout",
    "streamIdleTimeout",
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


def parse_proxy_config(r: Reader, origin: Origin, spec: Any) -> ProxyConfigResource | None:
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
            if v is not None and v <= 0 and key not in _ZERO_ALLOWED:
                r.error((*path, key), "must be greater than zero")
                v = None
            elif v is not None and key == "tcpReportingDuration" and v < 0.1:
                r.error((*path, key), "must be at least 100ms")
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
        elif key == "extensionProviders":
            v = parse_extension_providers(r, m, path) or None
        elif key == "overload":
            v = parse_overload(r, m[key], (*path, key))
        elif key == "defaultProviders":
            v = parse_default_providers(r, m, path, values.get("extension_providers", ()))
        elif key in ("workloadName", "clusterId"):
            v = r.string(m, key, path)
            if v is not None and not re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,252}", v):
                r.error((*path, key), f"{v!r} is not a valid name (letters, digits, - _ .)")
                v = None
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
