"""What every connection needs from the running process, without importing the runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from meshproxy.codec.h1_limits import Limits
from meshproxy.config.snapshot import Snapshot
from meshproxy.observe.metrics import MeshMetrics
from meshproxy.observe.tracing import Tracing
from meshproxy.observe.workload import PeerCache
from meshproxy.proxy.deadlines import DeadlineWheel
from meshproxy.proxy.ratelimit import RateLimiters
from meshproxy.security.identity import WorkloadIdentity
from meshproxy.upstream.cluster import ClusterManager


class LiveConnection(Protocol):
    """An accepted downstream connection, as ProxyContext.connections holds it: the runtime
    drains it on shutdown, the overload manager sheds it under memory pressure."""

    inbound: bool

    def close_idle(self) -> None:
        """Close now if nothing is in flight, else once the exchanges in flight end."""

    def shed_buffered(self, min_bytes: int) -> int:
        """Reset what holds `min_bytes` or more for a client that does not read; how many."""


@dataclass(slots=True)
class ProxyContext:
    """Mutable holder: the runtime swaps `snapshot` (one assignment) on a good reload."""

    snapshot: Snapshot
    clusters: ClusterManager
    metrics: MeshMetrics
    limits: Limits
    codec: str
    draining: bool = False
    overloaded: bool = False  # memory past the overload threshold: new requests get 503 OM
    connections: set[LiveConnection] = field(default_factory=set)
    identity: WorkloadIdentity | None = None  # replaced (one assignment) on rotation
    deadlines: DeadlineWheel = field(default_factory=DeadlineWheel)
    rate_limiters: RateLimiters = field(default_factory=RateLimiters)
    # Istio's metadata exchange: what this sidecar sends to mesh peers (kept current by the
    # runtime on config and certificate changes), and the peers' decoded facts.
    peer_metadata: bytes = b""
    peer_metadata_id: bytes = b""
    peers: PeerCache = field(default_factory=PeerCache)
    tracing: Tracing | None = None  # the snapshot's TracingConfig at work, None: off
