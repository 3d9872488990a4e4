"""Clusters and the ClusterManager: state that survives config reloads (pools, counters)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from meshproxy.codec.h1_limits import Limits
from meshproxy.config.snapshot import ClusterSpec, Resolution
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.security.identity import WorkloadIdentity
from meshproxy.upstream.breaker import UNLIMITED, CircuitBreaker
from meshproxy.upstream.connection import UpstreamExchange
from meshproxy.upstream.h2pool import Http2Pool
from meshproxy.upstream.hash_lb import HashBalancer
from meshproxy.upstream.lb import make_balancer
from meshproxy.upstream.outlier import OutlierDetector
from meshproxy.upstream.pool import Pool
from meshproxy.upstream.tls import IdentitySource, TlsContexts, UpstreamTls, upstream_tls
from meshproxy.upstream.warmup import WarmedView, warmed

H1_ALPN: Final = ("http/1.1",)
H2_ALPN: Final = ("h2",)

logger = logging.getLogger(__name__)

DNS_REFRESH_SECONDS: Final = 5.0  # Envoy's dns_refresh_rate default
MAX_ORIGINAL_DST_HOSTS: Final = 1024
# Enum members of an interpreted module, as compiled constants (read per request).
_DNS: Final = Resolution.DNS
_ORIGINAL_DST: Final = Resolution.ORIGINAL_DST
_LOCAL_APP: Final = Resolution.LOCAL_APP
IPV6_INBOUND_SOURCE: Final = "::6"  # IPv6's 127.0.0.6 (istio-iptables adds it to lo)


def bind_source_for(spec: ClusterSpec, address: str) -> str | None:
    """The source address to bind for `address`: the cluster's, in the address's family."""
    source = spec.bind_source
    if source is not None and ":" in address and ":" not in source:
        return IPV6_INBOUND_SOURCE
    return source


class UpstreamPool(Protocol):
    """What a stream asks of an endpoint's pool, whichever HTTP version it speaks."""

    def take_idle(self) -> UpstreamExchange | None: ...
    async def acquire(self) -> tuple[UpstreamExchange, bool]: ...
    async def connect(self) -> UpstreamExchange: ...


class EndpointState:
    """One upstream host: its pools and the live counters LB and /clusters read."""

    __slots__ = (
        "_h2",
        "_h2_factory",
        "active_requests",
        "address",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected",
        "ejections",
        "errors",
        "host_port",
        "joined_at",
        "pool",
        "port",
        "requests",
        "weight",
    )

    def __init__(
        self,
        address: str,
        port: int,
        weight: int,
        pool: Pool,
        h2_factory: Callable[[], Http2Pool] | None = None,
    ) -> None:
        self.address = address
        self.port = port
        # ip:port as Envoy writes an upstream host (IPv6 in brackets): logs, spans, admin.
        self.host_port = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        self.weight = weight
        self.pool = pool
        self._h2: Http2Pool | None = None
        self._h2_factory = h2_factory
        self.active_requests = 0
        self.requests = 0
        self.errors = 0
        self.ejected = False  # by outlier detection, until its ejection time is over
        self.ejections = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.joined_at = time.monotonic()  # slow start counts the endpoint's age from here

    def h2_pool(self) -> Http2Pool:
        """The HTTP/2 connections to this host, created on first use."""
        h2 = self._h2
        if h2 is None:
            assert self._h2_factory is not None
            h2 = self._h2 = self._h2_factory()
        return h2

    @property
    def has_connections(self) -> bool:
        return bool(self.pool.connections) or bool(self._h2 and self._h2.connections)

    def close_pools(self) -> None:
        self.pool.close()
        if self._h2 is not None:
            self._h2.close()

    @property
    def available(self) -> bool:
        return not self.ejected

    def as_dict(self) -> dict[str, object]:
        h2 = self._h2
        return {
            "address": self.host_port,
            "weight": self.weight,
            "health": "ejected" if self.ejected else "healthy",
            "ejections": self.ejections,
            "rq_active": self.active_requests,
            "rq_total": self.requests,
            "rq_error": self.errors,
            "cx_active": len(self.pool.connections) + (len(h2.connections) if h2 else 0),
            "cx_idle": len(self.pool.idle) + (len(h2.idle) if h2 else 0),
            "cx_total": self.pool.connects + (h2.connects if h2 else 0),
            "cx_connect_fail": self.pool.connect_failures + (h2.connect_failures if h2 else 0),
            "http2_cx_active": len(h2.connections) if h2 else 0,
        }


@dataclass(frozen=True, slots=True)
class PoolSettings:
    codec: str
    limits: Limits
    trust_domain: str = "cluster.local"


class Cluster:
    def __init__(
        self,
        spec: ClusterSpec,
        settings: PoolSettings,
        identity: IdentitySource | None = None,
        contexts: TlsContexts | None = None,
    ) -> None:
        self.spec = spec
        self._settings = settings
        self._identity = identity
        self._contexts = contexts or TlsContexts()
        self.hosts: list[EndpointState] = []
        self._lb = make_balancer(spec.lb)
        self.hashing = spec.consistent_hash
        self._hash_lb = (
            HashBalancer(self.hashing.maglev, self.hashing.size) if self.hashing else None
        )
        self._resolved_at = 0.0
        self._resolving: asyncio.Task[None] | None = None
        self._by_address: dict[tuple[str, int], EndpointState] = {}
        self.upstream_cx_active = 0
        self.breaker = CircuitBreaker(
            spec.max_connections or UNLIMITED,
            spec.max_pending_requests or UNLIMITED,
            spec.max_requests or UNLIMITED,
            spec.max_retries or UNLIMITED,
        )
        if spec.retry_budget is not None:
            self.breaker.budget_percent, self.breaker.min_retry_concurrency = spec.retry_budget
        self.outlier: OutlierDetector | None = None
        if spec.outlier is not None:
            self.outlier = OutlierDetector(spec.outlier, lambda: self.hosts)
        if spec.resolution is Resolution.STATIC:
            self.hosts = [self._host(e.address, e.port, e.weight) for e in spec.endpoints]

    def _host(self, address: str, port: int, weight: int) -> EndpointState:
        existing = self._by_address.get((address, port))
        if existing is not None:
            existing.weight = weight
            return existing
        spec, s = self.spec, self._settings
        pool = Pool(
            address,
            port,
            codec=s.codec,
            limits=s.limits,
            connect_timeout=spec.connect_timeout,
            idle_timeout=spec.idle_timeout,
            max_requests=spec.max_requests_per_connection,
            bind_source=bind_source_for(spec, address),
            on_change=self._cx_change,
            tls=self._tls_factory(address, H1_ALPN),
            breaker=self.breaker if self.breaker.limited else None,
        )
        host = EndpointState(
            address,
            port,
            weight,
            pool,
            lambda: Http2Pool(
                address,
                port,
                connect_timeout=spec.connect_timeout,
                idle_timeout=spec.idle_timeout,
                bind_source=bind_source_for(spec, address),
                on_change=self._cx_change,
                tls=self._tls_factory(address, H2_ALPN),
            ),
        )
        self._by_address[(address, port)] = host
        return host

    def _tls_factory(
        self, host: str, alpn: tuple[str, ...]
    ) -> Callable[[], UpstreamTls | None] | None:
        """What each new connection to `host` does for TLS (evaluated per connect, so a
        rotated workload certificate is used from the next connection on)."""
        tls = self.spec.tls
        if tls is None:
            return None
        identity = self._identity or (lambda: None)
        contexts = self._contexts
        trust_domain = self._settings.trust_domain
        if tls.mode == "ISTIO_MUTUAL" and not tls.sni:
            # Istio's SNI for mesh mTLS: the cluster name, outbound_.9080_.v1_.reviews...
            host_sni = self.spec.name.replace("|", "_.")
            return lambda: upstream_tls(tls, host_sni, alpn, identity(), contexts, trust_domain)
        return lambda: upstream_tls(tls, host, alpn, identity(), contexts, trust_domain)

    def tls_for_tcp(self, host: str) -> UpstreamTls | None:
        factory = self._tls_factory(host, ())
        return factory() if factory is not None else None

    def _cx_change(self, delta: int) -> None:
        self.upstream_cx_active += delta
        self.breaker.connections = self.upstream_cx_active
        if delta < 0 and self.breaker.limited:
            for host in self._by_address.values():  # a slot freed: one waiter may connect
                if host.pool.wake_one():
                    break

    def inherit_ages(self, previous: Cluster) -> None:
        """A reloaded cluster's endpoints keep the age they had (slow start)."""
        for key, host in previous._by_address.items():
            mine = self._by_address.get(key)
            if mine is not None:
                mine.joined_at = host.joined_at

    def counters(self) -> dict[tuple[str, str], int]:
        name, overflows = self.spec.name, self.breaker.overflows
        out = {
            (name, "upstream_cx_overflow"): overflows["cx"],
            # Envoy counts both the pending queue's and max requests' overflows here.
            (name, "upstream_rq_pending_overflow"): overflows["pending"] + overflows["rq"],
            (name, "upstream_rq_retry_overflow"): overflows["retry"],
        }
        # Every cluster has every counter from the start, at 0, as Envoy exports them.
        ejections = self.outlier.ejections_total if self.outlier is not None else 0
        out[(name, "outlier_detection_ejections_enforced_total")] = ejections
        return out

    def reserve_tcp_connection(self) -> bool:
        """Count a TCP-proxied connection against maxConnections, or raise overflow (UO),
        as Envoy's tcp_proxy does; True when a slot was taken (release it once)."""
        breaker = self.breaker
        if breaker.limited and not breaker.may_connect():
            breaker.overflows["cx"] += 1
            raise UpstreamError(
                FailureKind.OVERFLOW, "upstream_cx_overflow", flag="UO", request_bytes_sent=False
            )
        self._cx_change(1)
        return True

    def release_tcp_connection(self) -> None:
        self._cx_change(-1)

    async def pick(
        self,
        original_dst: tuple[str, int] | None = None,
        exclude: Sequence[EndpointState] = (),
        hash_key: int | None = None,
    ) -> EndpointState:
        """Choose an endpoint, resolving DNS when due; UH when none is left. A retry passes
        the hosts that failed it: another one is chosen while any other exists."""
        if self.spec.resolution is _DNS:
            await self._refresh_dns()
        return self.pick_now(original_dst, exclude, hash_key)

    def pick_now(
        self,
        original_dst: tuple[str, int] | None = None,
        exclude: Sequence[EndpointState] = (),
        hash_key: int | None = None,
    ) -> EndpointState:
        """Choose an endpoint without waiting (DNS clusters use what was last resolved).

        Consistent hashing ignores `exclude`: Istio drops the previous-hosts retry predicate
        for it, so a retry stays on the hashed host while that host is available."""
        resolution = self.spec.resolution
        if resolution is _ORIGINAL_DST or resolution is _LOCAL_APP:
            if original_dst is None:
                raise UpstreamError(
                    FailureKind.NO_HEALTHY,
                    "no healthy upstream",
                    flag="UH",
                    request_bytes_sent=False,
                )
            if resolution is _LOCAL_APP:
                loopback = "::1" if ":" in original_dst[0] else "127.0.0.1"
                original_dst = (loopback, original_dst[1])
            host = self._by_address.get(original_dst)
            if host is None:
                if len(self._by_address) >= MAX_ORIGINAL_DST_HOSTS:
                    self._drop_idle_hosts()
                host = self._host(original_dst[0], original_dst[1], 1)
            return host
        hosts = self.hosts
        picked: object
        if self._hash_lb is not None:
            picked = self._hash_lb.pick(hosts, hash_key)
        else:
            if exclude:
                others = [h for h in hosts if h not in exclude]
                hosts = others or hosts
            warmup = self.spec.warmup
            views = warmed(hosts, warmup, time.monotonic()) if warmup is not None else None
            if views is not None:
                view = self._lb.pick(views)
                picked = view.host if isinstance(view, WarmedView) else None
            else:
                picked = self._lb.pick(hosts)
        if picked is None:
            raise UpstreamError(
                FailureKind.NO_HEALTHY, "no healthy upstream", flag="UH", request_bytes_sent=False
            )
        assert isinstance(picked, EndpointState)
        return picked

    def _drop_idle_hosts(self) -> None:
        for key, host in list(self._by_address.items()):
            if host.active_requests == 0 and not host.has_connections:
                host.close_pools()
                del self._by_address[key]

    async def _refresh_dns(self) -> None:
        now = time.monotonic()
        if self.hosts and now - self._resolved_at < DNS_REFRESH_SECONDS:
            return
        if self._resolving is None or self._resolving.done():
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())
        if not self.hosts:  # first resolution: the request has to wait for it
            await asyncio.shield(self._resolving)

    async def _resolve(self) -> None:
        loop = asyncio.get_running_loop()
        hosts: list[EndpointState] = []
        for ep in self.spec.endpoints:
            try:
                infos = await loop.getaddrinfo(ep.address, ep.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("cluster %s: cannot resolve %s: %s", self.spec.name, ep.address, exc)
                continue
            seen = set()
            # Istio's V4_PREFERRED lookup family: IPv4 answers when there are any.
            v4 = [i for i in infos if i[0] == socket.AF_INET]
            for family, _, _, _, sockaddr in v4 or infos:
                ip = str(sockaddr[0])
                if ip in seen or family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                seen.add(ip)
                hosts.append(self._host(ip, ep.port, ep.weight))
        self._resolved_at = time.monotonic()
        if hosts or not self.hosts:
            self.hosts = hosts

    def all_hosts(self) -> Iterable[EndpointState]:
        return list(self._by_address.values())

    def close(self) -> None:
        for host in self._by_address.values():
            host.close_pools()
        if self._resolving is not None:
            self._resolving.cancel()


REBUILD_BATCH = 200  # new clusters built between two turns of the event loop


class ClusterManager:
    """Owns every Cluster; `reconcile` keeps clusters whose spec did not change."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.clusters: dict[str, Cluster] = {}
        self.identity: IdentitySource = lambda: None  # set by the runtime
        self._contexts = TlsContexts()
        self._retired: dict[tuple[str, str], int] = {}  # counters of replaced clusters

    def reconcile(self, specs: Mapping[str, ClusterSpec], settings: PoolSettings) -> None:
        """The clusters `specs` describe, all at once (start-up, before serving)."""
        for _ in self._rebuild(specs, settings):
            pass

    async def reconcile_gradually(
        self, specs: Mapping[str, ClusterSpec], settings: PoolSettings
    ) -> None:
        """As reconcile(), letting the event loop run between batches: 10,000 new clusters
        built at once held it for a quarter of a second (catalog L08). Requests meanwhile
        see the old clusters, then the new ones in one swap."""
        for _ in self._rebuild(specs, settings):
            await asyncio.sleep(0)

    def _rebuild(self, specs: Mapping[str, ClusterSpec], settings: PoolSettings) -> Iterator[None]:
        """Build what changed (yielding every REBUILD_BATCH new clusters), swap, then retire
        the replaced clusters, keeping their counters."""
        if settings != self.settings:
            kept: dict[str, Cluster] = {}
        else:
            kept = {name: c for name, c in self.clusters.items() if specs.get(name) == c.spec}
        built: dict[str, Cluster] = {}
        fresh = 0
        for name, spec in specs.items():
            cluster: Cluster | None = kept.get(name)
            if cluster is None:
                cluster = Cluster(spec, settings, self._current_identity, self._contexts)
                previous = self.clusters.get(name)
                if previous is not None:
                    cluster.inherit_ages(previous)
                fresh += 1
                if fresh % REBUILD_BATCH == 0:
                    yield
            built[name] = cluster
        old = self.clusters
        self.settings = settings
        self.clusters = built
        for name, replaced in old.items():
            if built.get(name) is not replaced:
                for key, n in replaced.counters().items():  # counters outlive a cluster update
                    self._retired[key] = self._retired.get(key, 0) + n
                replaced.close()

    def _current_identity(self) -> WorkloadIdentity | None:
        return self.identity()

    def counters(self) -> dict[tuple[str, str], int]:
        """Envoy's per-cluster overflow and ejection counters, by (cluster, stat)."""
        out = dict(self._retired)
        for cluster in self.clusters.values():
            for key, n in cluster.counters().items():
                out[key] = out.get(key, 0) + n
        return out

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()
