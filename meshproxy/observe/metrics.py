"""Istio's standard metrics, accumulated cheaply per request and rendered by prometheus-client.

Every metric name lives here. The hot path only bumps plain counters in a dict keyed by the
label tuple; prometheus-client's exposition code reads them at scrape time through a custom
collector, so a request costs a dict lookup and bucket scans, not several locked observe() calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from meshproxy.config.resources import ProxySettings
from meshproxy.config.telemetry import TCP_METRICS
from meshproxy.observe.accesslog import LogCounts
from meshproxy.observe.looplag import LoopLag
from meshproxy.observe.metric_shape import (
    Extra,
    Pairs,
    accumulate,
    add_counter,
    add_histogram,
    add_rows,
    shape,
)
from meshproxy.observe.recorder import ConnRecord
from meshproxy.observe.tracing import SpanCounts
from meshproxy.observe.workload import NO_PEER, UNKNOWN, PeerCache, WorkloadInfo, local_workload

# What one request's series is found by: reporter, service, code, flags, protocol, gRPC
# status, and the peer (interned, hashed by identity).
_SeriesKey = tuple[str, str, int, str, str, str, WorkloadInfo, "Extra | None"]


def _spiffe(principal: str) -> str:
    """Istio's principal labels carry the URI form: spiffe://<trust domain>/ns/.../sa/..."""
    return "spiffe://" + principal if principal and "://" not in principal else principal


# Envoy's default histogram buckets (ms), which Istio uses. Typed as variable-length tuples:
# mypyc keeps a fixed-length Final tuple unboxed and boxed it again, 19 floats, at each use.
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
BYTES_BUCKETS: Final[tuple[int, ...]] = (
    1,
    10,
    100,
    1000,
    10000,
    100000,
    1000000,
    10000000,
    100000000,
)

HTTP_LABELS: Final = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
TCP_LABELS: Final = tuple(
    x for x in HTTP_LABELS if x not in ("response_code", "grpc_response_status")
)


@dataclass(slots=True)
class _Hist:
    buckets: list[int]
    count: int = 0
    total: float = 0.0


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """The index of the first bucket whose bound is >= value (Prometheus `le`). A scan from
    the smallest: requests take milliseconds and bodies are small, so it stops within a few
    native compares, where bisect.bisect_left costs a call and a boxed compare per step."""
    i = 0
    for bound in bounds:
        if value <= bound:
            return i
        i += 1
    return i


def _hist_row(h: _Hist) -> list[Any]:
    return [*h.buckets, h.count, h.total]


def _cumulative(buckets: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip((*bounds, float("inf")), buckets, strict=True):
        running += n
        out.append((_fmt(bound), running))
    return out


def _fmt(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


@dataclass(slots=True)
class _HttpSeries:
    requests: int = 0
    duration: _Hist = field(default_factory=lambda: _Hist([0] * (len(DURATION_BUCKETS) + 1)))
    request_bytes: _Hist = field(default_factory=lambda: _Hist([0] * (len(BYTES_BUCKETS) + 1)))
    response_bytes: _Hist = field(default_factory=lambda: _Hist([0] * (len(BYTES_BUCKETS) + 1)))


@dataclass(slots=True)
class TcpSeries:
    opened: int = 0
    closed: int = 0
    sent: int = 0
    received: int = 0


def _keyed_counter(
    name: str, documentation: str, labels: tuple[str, ...], counts: Mapping[Any, int]
) -> CounterMetricFamily:
    """One counter family from a dict of counts keyed by a label value or a tuple of them."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family


def _service_parts(host: str) -> tuple[str, str]:
    if host.endswith(".svc.cluster.local"):
        name, _, ns = host[: -len(".svc.cluster.local")].partition(".")
        return name, ns
    return host, "unknown"


# Plain keyed counters each worker exports and the admin worker adds up.
_SUMMED_COUNTERS: Final = (
    "rejected",
    "dropped_headers",
    "h2_floods",
    "rbac",
    "tls",
    "retries",
    "mirrors",
    "rate_limits",
    "clusters",
    "spans",
    "logs",
)


def _envoy_cluster_counters(counters: dict[tuple[str, str], int]) -> Iterator[Metric]:
    """Envoy's names as Istio exports them (envoy_cluster_<stat>{cluster_name}). Typed
    "untyped": prometheus_client would rename a counter's TYPE line to <name>_total, and the
    exact names are what existing Envoy dashboards query."""
    by_stat: dict[str, list[tuple[str, int]]] = {}
    for (cluster, stat), n in sorted(counters.items()):
        by_stat.setdefault(stat, []).append((cluster, n))
    for stat, rows in by_stat.items():
        name = f"envoy_cluster_{stat}"
        metric = Metric(name, f"Envoy cluster counter {stat}", "unknown")
        for cluster, n in rows:
            metric.add_sample(name, {"cluster_name": cluster}, n)
        yield metric


class MeshMetrics(Collector):
    """Receives the data plane's reports and feeds /stats/prometheus."""

    def __init__(self, namespace: str = "default", workload: str = "unknown") -> None:
        self._http: dict[tuple[Any, ...], _HttpSeries] = {}
        self._tcp: dict[tuple[Any, ...], TcpSeries] = {}
        self.local = local_workload(ProxySettings(namespace=namespace, workload_name=workload))
        self._tcp_peers = PeerCache()  # TCP peers: known by their certificate only
        self.span_counts = SpanCounts()
        self.log_counts = LogCounts()
        self._label_cache: dict[_SeriesKey, tuple[str, ...]] = {}
        self._series_by_key: dict[_SeriesKey, _HttpSeries] = {}
        self.rejected: dict[str, int] = {}
        self.dropped_headers: dict[str, int] = {}
        self.h2_floods: dict[str, int] = {}
        self.cert_expiry: float | None = None
        self.cert_reloads = (0, 0)
        self.tls_handshake_failures: dict[str, int] = {}
        self.rbac_counts: dict[tuple[str, str], int] = {}
        self.retries: dict[str, int] = {}
        self.mirrors: dict[tuple[str, str], int] = {}
        self.rate_limits: dict[str, int] = {}
        # Envoy's cluster counters (overflows, ejections), read when exported
        self.cluster_counters: Callable[[], dict[tuple[str, str], int]] = dict
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.config_version = 0
        self.last_reload_ok_time = 0.0
        self.last_reload_error_time = 0.0
        self.downstream_cx_active = 0
        self.loop_lag = LoopLag()
        self.downstream_cx_total = 0
        self.overload_active = 0  # 1 while memory is past the stop-accepting-requests threshold
        self.overload_shed = 0  # connections closed (or told to close) by the overload action
        self.overload_shrinks = 0  # heap shrinks (garbage collected, free memory returned)
        self.overload_streams_reset = 0  # streams reset for holding memory while overloaded
        self.peers: dict[int, dict[str, Any]] = {}  # other workers' latest reports
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- what the data plane reports ------------------------------------------------------
    def _labels(
        self,
        reporter: str,
        service: str,
        code: int,
        flags: str,
        protocol: str,
        grpc_status: str,
        peer: WorkloadInfo,
    ) -> tuple[str, ...]:
        key = (reporter, service, code, flags, protocol, grpc_status, peer, None)
        labels = self._label_cache.get(key)
        if labels is None:
            name, ns = _service_parts(service)
            outbound = reporter == "source"
            # The source reports itself as source and the peer as destination; the
            # destination the other way round (Istio's reporter semantics).
            src, dst = (self.local, peer) if outbound else (peer, self.local)
            # Istio: mutual_tls when the peer was authenticated; a source report cannot know.
            mtls = peer.principal != UNKNOWN
            security = "unknown" if outbound else ("mutual_tls" if mtls else "none")
            labels = (
                reporter,
                src.workload,
                src.canonical_service,
                src.canonical_revision,
                src.namespace,
                src.principal,
                src.app,
                src.version,
                src.cluster,
                dst.workload,
                dst.namespace,
                dst.principal,
                dst.app,
                dst.version,
                service or UNKNOWN,
                dst.canonical_service,
                dst.canonical_revision,
                name or UNKNOWN,
                ns,
                dst.cluster,
                protocol,
                str(code),
                grpc_status,
                flags,
                security,
            )
            if len(self._label_cache) < 10_000:  # bounded: label values come from config
                self._label_cache[key] = labels
        return labels

    def set_local(self, local: WorkloadInfo) -> None:
        """This workload's facts changed (config or certificate): new series from now on."""
        if local is not self.local:
            self.local = local
            self._label_cache.clear()
            self._series_by_key.clear()

    def record_http(
        self,
        reporter: str,
        service: str,
        code: int,
        flags: str,
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
        protocol: str = "http",
        grpc_status: str = "-",
        peer: WorkloadInfo = NO_PEER,
        extra: Extra | None = None,
    ) -> None:
        """The per-request hot path: a dict lookup and three bucket scans. `extra`: the Telemetry
        overrides of this direction and their CEL values (None: the standard series)."""
        key = (reporter, service, code, flags, protocol, grpc_status, peer, extra)
        series = self._series_by_key.get(key)
        if series is None:
            labels: tuple[Any, ...] = self._labels(
                reporter, service, code, flags, protocol, grpc_status, peer
            )
            if extra is not None:
                labels = (*labels, extra)
            series = self._http.get(labels)
            if series is None:
                series = self._http[labels] = _HttpSeries()
            if len(self._series_by_key) < 10_000:
                self._series_by_key[key] = series
        series.requests += 1
        h = series.duration
        h.buckets[_bucket(DURATION_BUCKETS, duration_ms)] += 1
        h.count += 1
        h.total += duration_ms
        h = series.request_bytes
        h.buckets[_bucket(BYTES_BUCKETS, request_bytes)] += 1
        h.count += 1
        h.total += request_bytes
        h = series.response_bytes
        h.buckets[_bucket(BYTES_BUCKETS, response_bytes)] += 1
        h.count += 1
        h.total += response_bytes

    def _tcp_series(self, rec: ConnRecord, extra: Extra | None) -> TcpSeries:
        # The peer: the downstream's certificate inbound, the upstream's outbound, each with
        # the facts its exchange frame gave.
        inbound = rec.reporter == "destination"
        principal = rec.source_principal if inbound else rec.upstream_principal
        labels = self._labels(
            rec.reporter,
            rec.destination_service,
            0,
            rec.response_flags,
            "tcp",
            "-",
            self._tcp_peers.get(rec.peer_metadata, _spiffe(principal)),
        )
        key: tuple[Any, ...] = tuple(
            v for name, v in zip(HTTP_LABELS, labels, strict=True) if name in TCP_LABELS
        )
        if extra is not None:
            key = (*key, extra)
        series = self._tcp.get(key)
        if series is None:
            series = self._tcp[key] = TcpSeries()
        return series

    def tcp_opened(self, rec: ConnRecord, extra: Extra | None = None) -> TcpSeries:
        """A TCP connection opened: the series its bytes and its close are counted in (one
        series for the connection's whole life, as Istio reports it)."""
        series = self._tcp_series(rec, extra)
        series.opened += 1
        return series

    def tcp_bytes(self, series: TcpSeries, sent: int, received: int) -> None:
        series.sent += sent
        series.received += received

    def tcp_closed(self, series: TcpSeries) -> None:
        series.closed += 1

    def downstream_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def downstream_headers_dropped(self, reason: str, n: int) -> None:
        self.dropped_headers[reason] = self.dropped_headers.get(reason, 0) + n

    def cert_state(self, expiry: float | None, ok: int, failed: int) -> None:
        self.cert_expiry = expiry
        self.cert_reloads = (ok, failed)

    def tls_failed(self, reason: str) -> None:
        key = reason[:60]
        if key in self.tls_handshake_failures or len(self.tls_handshake_failures) < 100:
            self.tls_handshake_failures[key] = self.tls_handshake_failures.get(key, 0) + 1

    def upstream_retry(self, cluster: str) -> None:
        """A request tried again (Envoy's cluster.<name>.upstream_rq_retry)."""
        if cluster in self.retries or len(self.retries) < 10_000:
            self.retries[cluster] = self.retries.get(cluster, 0) + 1

    def mirror(self, cluster: str, result: str) -> None:
        """A shadow request's outcome: sent, 5xx, failed, timeout, overflow, abandoned."""
        key = (cluster, result)
        if key in self.mirrors or len(self.mirrors) < 10_000:
            self.mirrors[key] = self.mirrors.get(key, 0) + 1

    def rate_limited(self, name: str) -> None:
        """A request refused by a local rate limit (Envoy's http_local_rate_limit.rate_limited)."""
        if name in self.rate_limits or len(self.rate_limits) < 10_000:
            self.rate_limits[name] = self.rate_limits.get(name, 0) + 1

    def rbac(self, allowed: bool, protocol: str) -> None:
        """An authorization decision (Envoy's rbac.allowed / rbac.denied)."""
        key = ("allowed" if allowed else "denied", protocol)
        self.rbac_counts[key] = self.rbac_counts.get(key, 0) + 1

    def h2_flood(self, kind: str) -> None:
        """An HTTP/2 connection closed for abuse (Envoy's http2.*_flood counters)."""
        self.h2_floods[kind] = self.h2_floods.get(kind, 0) + 1

    # -- several workers: each reports its counters, the admin worker renders their sum --------
    def export(self) -> dict[str, Any]:
        """This worker's counters as plain data (picklable, mergeable)."""
        http = {
            labels: [
                s.requests,
                *_hist_row(s.duration),
                *_hist_row(s.request_bytes),
                *_hist_row(s.response_bytes),
            ]
            for labels, s in list(self._http.items())
        }
        tcp = {k: [t.opened, t.closed, t.sent, t.received] for k, t in list(self._tcp.items())}
        return {
            "http": http,
            "tcp": tcp,
            "rejected": dict(self.rejected),
            "dropped_headers": dict(self.dropped_headers),
            "h2_floods": dict(self.h2_floods),
            "rbac": dict(self.rbac_counts),
            "tls": dict(self.tls_handshake_failures),
            "retries": dict(self.retries),
            "mirrors": dict(self.mirrors),
            "rate_limits": dict(self.rate_limits),
            "clusters": self.cluster_counters(),
            "spans": {"queued": self.span_counts.queued, "dropped": self.span_counts.dropped},
            "logs": {"written": self.log_counts.written, "dropped": self.log_counts.dropped},
            "cx_active": self.downstream_cx_active,
            "cx_total": self.downstream_cx_total,
            "loop_lag_max": self.loop_lag.worst,
            "loop_stalls": self.loop_lag.stalls,
            "overload_active": self.overload_active,
            "overload_shed": self.overload_shed,
            "overload_shrinks": self.overload_shrinks,
            "overload_streams_reset": self.overload_streams_reset,
        }

    def absorb(self, worker: int, snapshot: dict[str, Any] | None) -> None:
        """The latest report of another worker (None: it is gone)."""
        if snapshot is None:
            self.peers.pop(worker, None)
        else:
            self.peers[worker] = snapshot

    def _merged(self) -> dict[str, Any]:
        merged = self.export()
        for peer in list(self.peers.values()):
            for labels, row in peer["http"].items():
                mine = merged["http"].get(labels)
                merged["http"][labels] = row if mine is None else add_rows(mine, row)
            for key, row in peer["tcp"].items():
                mine = merged["tcp"].get(key)
                merged["tcp"][key] = row if mine is None else add_rows(mine, row)
            for name in _SUMMED_COUNTERS:
                target = merged[name]
                for k, n in peer[name].items():
                    target[k] = target.get(k, 0) + n
            merged["cx_active"] += peer["cx_active"]
            merged["cx_total"] += peer["cx_total"]
            merged["loop_lag_max"] = max(merged["loop_lag_max"], peer.get("loop_lag_max", 0.0))
            merged["loop_stalls"] += peer.get("loop_stalls", 0)
            merged["overload_active"] = max(
                merged["overload_active"], peer.get("overload_active", 0)
            )
            merged["overload_shed"] += peer.get("overload_shed", 0)
            merged["overload_shrinks"] += peer.get("overload_shrinks", 0)
            merged["overload_streams_reset"] += peer.get("overload_streams_reset", 0)
        return merged

    def config_reloaded(self, ok: bool, version: int) -> None:
        if ok:
            self.reloads_ok += 1
            self.config_version = version
            self.last_reload_ok_time = time.time()
        else:
            self.reloads_failed += 1
            self.last_reload_error_time = time.time()

    # -- Collector -------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        merged = self._merged()
        yield from _http_families(merged["http"])
        yield from _tcp_families(merged["tcp"])
        reload = CounterMetricFamily(
            "meshproxy_config_reload", "Config loads by result", labels=("result",)
        )
        reload.add_metric(["success"], self.reloads_ok)
        reload.add_metric(["error"], self.reloads_failed)
        yield reload
        yield GaugeMetricFamily(
            "meshproxy_config_version", "Version of the active config", value=self.config_version
        )
        yield GaugeMetricFamily(
            "meshproxy_workers",
            "Worker processes (ProxyConfig concurrency) whose counters these are",
            value=1 + len(self.peers),
        )
        yield _keyed_counter(
            "meshproxy_downstream_rq_rejected",
            "Downstream requests rejected before routing",
            ("reason",),
            merged["rejected"],
        )
        yield _keyed_counter(
            "meshproxy_downstream_headers_dropped",
            "Client request headers removed before routing (headersWithUnderscoresAction)",
            ("reason",),
            merged["dropped_headers"],
        )
        yield _keyed_counter(
            "meshproxy_http2_flood",
            "HTTP/2 connections closed for frame abuse (rapid reset, PING/SETTINGS/empty frames)",
            ("kind",),
            merged["h2_floods"],
        )
        if self.cert_expiry is not None:
            yield GaugeMetricFamily(
                "meshproxy_workload_cert_expiry_timestamp_seconds",
                "When the workload certificate in use expires (Unix time)",
                value=self.cert_expiry,
            )
        certs = CounterMetricFamily(
            "meshproxy_cert_reload", "Workload certificate loads", labels=("result",)
        )
        certs.add_metric(["ok"], self.cert_reloads[0])
        certs.add_metric(["error"], self.cert_reloads[1])
        yield certs
        yield _keyed_counter(
            "meshproxy_rbac",
            "AuthorizationPolicy decisions on inbound requests and connections",
            ("result", "protocol"),
            merged["rbac"],
        )
        yield _keyed_counter(
            "meshproxy_upstream_rq_retry",
            "Requests tried again by the retry policy, by cluster",
            ("cluster",),
            merged["retries"],
        )
        yield _keyed_counter(
            "meshproxy_mirror_requests",
            "Shadow requests of VirtualService mirrors, by cluster and outcome",
            ("cluster", "result"),
            merged["mirrors"],
        )
        yield from _envoy_cluster_counters(merged["clusters"])
        yield _keyed_counter(
            "meshproxy_access_log_lines",
            "Access-log lines queued for writing, and dropped because a writer fell behind",
            ("result",),
            merged["logs"],
        )
        yield _keyed_counter(
            "meshproxy_tracing_spans",
            "Sampled spans queued for export, and dropped because the queue was full",
            ("result",),
            merged["spans"],
        )
        yield _keyed_counter(
            "meshproxy_local_rate_limited",
            "Requests refused by a ProxyConfig localRateLimits bucket, by its name",
            ("name",),
            merged["rate_limits"],
        )
        yield _keyed_counter(
            "meshproxy_tls_handshake_failed",
            "Inbound TLS handshakes that failed, by reason",
            ("reason",),
            merged["tls"],
        )
        yield GaugeMetricFamily(
            "meshproxy_downstream_cx_active",
            "Open downstream connections",
            value=merged["cx_active"],
        )
        yield CounterMetricFamily(
            "meshproxy_downstream_cx",
            "Downstream connections accepted",
            value=merged["cx_total"],
        )
        yield GaugeMetricFamily(
            "meshproxy_event_loop_lag_seconds_max",
            "The longest delay of the event loop's 100 ms timer since start (any worker)",
            value=merged["loop_lag_max"],
        )
        yield CounterMetricFamily(
            "meshproxy_event_loop_stalls",
            "Times the event loop's 100 ms timer ran more than 100 ms late",
            value=merged["loop_stalls"],
        )
        yield GaugeMetricFamily(
            "meshproxy_overload_stop_accepting_requests_active",
            "1 while memory is past the overload threshold and new requests get 503 (any worker)",
            value=merged["overload_active"],
        )
        yield CounterMetricFamily(
            "meshproxy_overload_connections_shed",
            "Connections closed, or told to close after their request, by the overload action",
            value=merged["overload_shed"],
        )
        yield CounterMetricFamily(
            "meshproxy_overload_streams_reset",
            "Streams reset while overloaded for holding memory a client does not read (flag OM)",
            value=merged["overload_streams_reset"],
        )
        yield CounterMetricFamily(
            "meshproxy_overload_heap_shrinks",
            "Times memory was collected and returned to the kernel past the shrink threshold",
            value=merged["overload_shrinks"],
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


_HTTP_FAMILIES: Final = (
    ("istio_requests", "Requests"),
    ("istio_request_duration_milliseconds", "Request duration in milliseconds"),
    ("istio_request_bytes", "Request body sizes"),
    ("istio_response_bytes", "Response body sizes"),
)
_TCP_FAMILIES: Final = (
    ("istio_tcp_connections_opened", "TCP connections opened"),
    ("istio_tcp_connections_closed", "TCP connections closed"),
    ("istio_tcp_sent_bytes", "Bytes sent to the downstream"),
    ("istio_tcp_received_bytes", "Bytes received from the downstream"),
)


def _http_families(http: dict[tuple[Any, ...], list[Any]]) -> Iterator[Metric]:
    """Istio's four HTTP families, each series shaped by its Telemetry overrides. A stored
    row is [requests, duration buckets, count, sum, request-bytes ..., response-bytes ...]."""
    nd, nb = len(DURATION_BUCKETS) + 1, len(BYTES_BUCKETS) + 1
    slices = (slice(0, 1), slice(1, 3 + nd), slice(3 + nd, 5 + nd + nb), slice(5 + nd + nb, None))
    bounds = (None, DURATION_BUCKETS, BYTES_BUCKETS, BYTES_BUCKETS)
    shaped: list[dict[Pairs, list[Any]]] = [{} for _ in _HTTP_FAMILIES]
    for labels, row in http.items():
        for metric, columns in enumerate(slices):
            pairs = shape(HTTP_LABELS, labels, metric)
            if pairs is not None:
                accumulate(shaped[metric], pairs, row[columns])
    for metric, (name, documentation) in enumerate(_HTTP_FAMILIES):
        family: Metric
        if metric == 0:
            family = CounterMetricFamily(name, documentation)
            for pairs, part in shaped[metric].items():
                add_counter(family, pairs, part[0])
        else:
            family = HistogramMetricFamily(name, documentation)
            width = len(bounds[metric] or ()) + 1
            for pairs, part in shaped[metric].items():
                cumulative = _cumulative(part[:width], bounds[metric] or ())
                add_histogram(family, pairs, cumulative, part[width + 1])
        yield family


def _tcp_families(tcp: dict[tuple[Any, ...], list[int]]) -> Iterator[Metric]:
    """Istio's four TCP counters; a stored row is [opened, closed, sent, received]."""
    shaped: list[dict[Pairs, list[Any]]] = [{} for _ in _TCP_FAMILIES]
    for labels, row in tcp.items():
        for i in range(len(_TCP_FAMILIES)):
            pairs = shape(TCP_LABELS, labels, TCP_METRICS[i])
            if pairs is not None:
                accumulate(shaped[i], pairs, [row[i]])
    for i, (name, documentation) in enumerate(_TCP_FAMILIES):
        family = CounterMetricFamily(name, documentation)
        for pairs, part in shaped[i].items():
            add_counter(family, pairs, part[0])
        yield family
