"""Request mirroring (VirtualService mirror/mirrors): a fire-and-forget shadow copy.

The shadow leaves once the original request is complete (its body comes from the stream's
replay buffer; a body beyond that buffer is not mirrored, as Envoy abandons a shadow whose
body outgrew its buffer). Its response is read and dropped; its failures and latency are only
counted: the original stream never waits for it. Host gets Envoy's "-shadow" suffix, placed
before a port.
"""

from __future__ import annotations

import asyncio
import logging

from meshproxy._tasks import spawn
from meshproxy.codec.events import Headers, RequestHead, ResponseHead
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.observe.metrics import MeshMetrics
from meshproxy.upstream.cluster import Cluster

logger = logging.getLogger(__name__)

# A shadow that never ends would hold a connection forever; Istio disables route timeouts by
# default, so a shadow is bounded by the route's timeout or by Envoy's default route timeout.
DEFAULT_SHADOW_TIMEOUT = 15.0
MAX_SHADOWS_IN_FLIGHT = 1000  # per process: a slow mirror target never piles up tasks

_in_flight = 0


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadowAppendedHost: "a.b:8080" → "a.b-shadow:8080", "a.b" → "a.b-shadow"."""
    name, sep, port = host.rpartition(b":")
    if sep and port.isdigit() and (b":" not in name or name.endswith(b"]")):
        return name + b"-shadow:" + port
    return host + b"-shadow"


def shadow_head(head: RequestHead) -> RequestHead:
    headers = [(k, shadow_host(v) if k == b"host" else v) for k, v in head.headers]
    return RequestHead(
        head.method,
        head.target,
        headers,
        head.http_version,
        True,
        head.has_body,
        head.content_length,
    )


class _DiscardingSink:
    """ResponseSink for a shadow: the response is read (so the connection can be reused)
    and dropped; `done` holds its status, or the failure."""

    __slots__ = ("done", "status")

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.done = done
        self.status = 0

    def on_response_head(self, head: ResponseHead) -> None:
        self.status = head.status

    def on_response_data(self, data: bytes) -> None:
        pass

    def on_response_end(self, trailers: Headers) -> None:
        if not self.done.done():
            self.done.set_result(self.status)

    def on_upstream_failure(self, error: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def on_upstream_writable(self, writable: bool) -> None:
        pass

    def hold_writes(self) -> None:
        pass

    def release_writes(self) -> None:
        pass


def mirror(
    cluster: Cluster,
    head: RequestHead,
    body: list[bytes] | None,
    trailers: Headers,
    timeout: float | None,
    h2: bool,
    grpc: bool,
    metrics: MeshMetrics,
) -> None:
    """Send a shadow of a complete request; never raises, never blocks the caller."""
    global _in_flight
    name = cluster.spec.name
    if body is None:
        metrics.mirror(name, "abandoned")  # the body outgrew the replay buffer
        return
    if _in_flight >= MAX_SHADOWS_IN_FLIGHT:
        metrics.mirror(name, "overflow")
        return
    _in_flight += 1
    spawn(
        _send(cluster, shadow_head(head), body, trailers, timeout, h2, grpc, metrics),
        name="mirror",
    )


async def _send(
    cluster: Cluster,
    head: RequestHead,
    body: list[bytes],
    trailers: Headers,
    timeout: float | None,
    h2: bool,
    grpc: bool,
    metrics: MeshMetrics,
) -> None:
    global _in_flight
    name = cluster.spec.name
    breaker = cluster.breaker
    admitted = False
    result = "failed"
    try:
        if breaker.limited:
            if not breaker.admit_request():
                result = "overflow"
                return
            admitted = True
        async with asyncio.timeout(timeout or DEFAULT_SHADOW_TIMEOUT):
            result = await _exchange(cluster, head, body, trailers, h2, grpc)
    except TimeoutError:
        result = "timeout"
    except UpstreamError as err:
        result = "overflow" if err.kind is FailureKind.OVERFLOW else "failed"
        logger.debug("mirror to %s failed: %s", name, err)
    except OSError as err:
        logger.debug("mirror to %s failed: %s", name, err)
    finally:
        _in_flight -= 1
        if admitted:
            breaker.requests -= 1
        metrics.mirror(name, result)


async def _exchange(
    cluster: Cluster,
    head: RequestHead,
    body: list[bytes],
    trailers: Headers,
    h2: bool,
    grpc: bool,
) -> str:
    host = await cluster.pick()
    pool = host.h2_pool() if h2 else host.pool
    up, _ = await pool.acquire()
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    host.active_requests += 1
    try:
        up.start(head, _DiscardingSink(done), grpc)
        for chunk in body:
            up.send_data(chunk)
        up.end_request(trailers)
        status = await done
    finally:
        host.active_requests -= 1
        if not done.done():
            up.abort()  # timed out or cancelled: the connection must not be reused
    return "5xx" if status >= 500 else "sent"
