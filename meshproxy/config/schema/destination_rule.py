"""DestinationRule (networking.istio.io): subsets and traffic policy, TLS origination."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshproxy.config.reader import Reader
from meshproxy.config.resources import (
    ClientTls,
    ConnectionPool,
    ConsistentHash,
    DestinationRule,
    LoadBalancerSettings,
    Origin,
    OutlierDetection,
    RetryBudget,
    Subset,
    TrafficPolicy,
    Warmup,
)
from meshproxy.config.schema.common import (
    check_host,
)
from meshproxy.config.source import Path_

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
            tls = client_tls(r, tls_map, (*path, "tls"))
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
    for key in ("tunnel", "proxyProtocol"):
        if m.get(key) is not None:
            r.error(
                (*path, key),
                f"{key} is not supported by meshproxy; refusing the rule rather than sending "
                "traffic without it",
            )
    budget = _retry_budget(r, m.get("retryBudget"), (*path, "retryBudget"))
    return TrafficPolicy(lb, pool, outlier, tls, tuple(port_level), budget)


def _retry_budget(r: Reader, value: Any, path: Path_) -> RetryBudget | None:
    if value is None:
        return None
    m = r.mapping(value, path, ("percent", "minRetryConcurrency"))
    if m is None:
        return None
    percent = m.get("percent", 20.0)
    if isinstance(percent, dict):  # DoubleValue written as a message
        percent = percent.get("value", 20.0)
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        r.error((*path, "percent"), f"expected a percentage from 0 to 100, got {percent!r}")
        return None
    minimum = r.integer(m, "minRetryConcurrency", path, default=3, minimum=0)
    return RetryBudget(float(percent), 3 if minimum is None else minimum)


def parse_destination_rule(r: Reader, origin: Origin, spec: Any) -> DestinationRule | None:
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
    check_host(r, host, (*path, "host"))
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


def client_tls(r: Reader, m: Mapping[str, Any], path: Path_) -> ClientTls | None:
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
