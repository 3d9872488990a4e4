"""One HTTP request/response through the proxy: route, pick, attempt, stream the response."""

from __future__ import annotations

import asyncio
import logging
import time
from random import random
from typing import TYPE_CHECKING, Final

from meshproxy._tasks import spawn
from meshproxy.codec.events import Headers, RequestHead, ResponseHead
from meshproxy.codec.grpc import (
    GRPC_DEADLINE_EXCEEDED,
    grpc_deadline,
    grpc_reply_headers,
    grpc_status_for_http,
    grpc_status_of,
    is_grpc,
    with_grpc_timeout,
)
from meshproxy.codec.headers import (
    IDEMPOTENT_METHODS,
    PEER_METADATA,
    PEER_METADATA_ID,
    strip_hop_by_hop,
)
from meshproxy.config.compile import INBOUND_PASSTHROUGH, PASSTHROUGH
from meshproxy.config.snapshot import Resolution, Snapshot, UpstreamProtocol
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.observe.trace_context import (
    TRACE_HEADERS,
    RequestTrace,
    decide,
    parse_incoming,
    upstream_headers,
)
from meshproxy.observe.tracing import CLIENT, SERVER
from meshproxy.proxy.hash_key import request_hash
from meshproxy.proxy.local_reply import (
    OVERFLOW_BODY,
    LocalReply,
    direct_reply,
    upstream_failure_reply,
)
from meshproxy.proxy.mirror import mirror
from meshproxy.proxy.report import report
from meshproxy.proxy.request_filters import admit, cors_headers, fault_delay, take_rate_limit
from meshproxy.proxy.request_view import request_view
from meshproxy.proxy.retries import RetryState
from meshproxy.proxy.retry_headers import apply_overrides
from meshproxy.proxy.upstream_head import build_upstream_head
from meshproxy.routing.table import (
    NO_HEADER_OPS,
    NO_RETRY,
    OUTBOUND_DEFAULT_RETRY,
    HeaderOps,
    Mirror,
    RouteMatch,
    retry_backoff,
)
from meshproxy.upstream.breaker import CircuitBreaker
from meshproxy.upstream.cluster import Cluster, EndpointState, UpstreamPool
from meshproxy.upstream.connection import UpstreamExchange

if TYPE_CHECKING:
    from meshproxy.proxy.downstream import Downstream

logger = logging.getLogger(__name__)

REPLAY_LIMIT: Final = 64 * 1024  # request bytes kept to retry on a fresh connection
BUFFER_HIGH_WATER: Final = 64 * 1024


# Enum members of interpreted modules, as compiled constants (read per request).
_HTTP2: Final = UpstreamProtocol.HTTP2
_CLIENT_PROTOCOL: Final = UpstreamProtocol.CLIENT
_DNS: Final = Resolution.DNS
_monotonic: Final = time.monotonic  # a compiled constant: no module lookup per call


def _h2_upstream(cluster: Cluster, downstream_http2: bool) -> bool:
    """Whether a request to `cluster` goes upstream as HTTP/2 (h2UpgradePolicy, or
    useClientProtocol with an HTTP/2 client)."""
    protocol = cluster.spec.upstream_protocol
    return protocol is _HTTP2 or (protocol is _CLIENT_PROTOCOL and downstream_http2)


class _RetryNow(Exception):
    """Wakes the slow path: the response was one the retry policy retries."""


class HttpStream:
    """One request/response; implements ResponseSink for the upstream connection it uses.

    The fast path runs without a task: when routing and the pool can answer at once (an idle
    keep-alive connection to a static endpoint), the request goes upstream from the
    downstream read callback and the stream ends in the upstream read callback. Anything
    that must wait (a new connection, DNS, a retry) runs in one coroutine, `_slow_path`.
    Both end in `_finish`, exactly once.
    """

    def __init__(self, conn: Downstream, head: RequestHead) -> None:
        self.conn = conn
        self.facts = conn.facts  # read per request: a compiled object, not the protocol
        self.head = head
        self.request_done = not head.has_body and not head.upgrade
        self.request_trailers: Headers = []
        self._pending: list[bytes] = []  # request body not yet sent upstream
        self._pending_bytes = 0
        self._replay: list[bytes] | None = None if head.upgrade else []
        self._replay_bytes = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.request_id = b""  # the x-request-id this proxy generated, if it did
        # Istio's metadata exchange: the peer sidecar's x-envoy-peer-metadata (from the
        # request inbound, the response outbound; only over mesh mTLS), and whether the
        # upstream is a mesh peer (ISTIO_MUTUAL) that gets ours.
        self.peer_metadata: bytes | None = None
        self.mesh_upstream = False
        self.trace: RequestTrace | None = None  # when the snapshot traces
        self.logged_response_headers: Headers = []  # kept only when an access log is on
        self.upstream: UpstreamExchange | None = None
        self.response_head_sent = False
        self.response_complete = False
        self.status = 0
        self.flag = "-"
        self._head_waiter: asyncio.Future[None] | None = None
        self._done_waiter: asyncio.Future[None] | None = None
        self._response_ops: HeaderOps = NO_HEADER_OPS
        self._target_ops: HeaderOps = NO_HEADER_OPS
        self.task: asyncio.Task[None] | None = None
        self.keep_alive = head.keep_alive
        self._start = _monotonic()
        self._sent_at = 0.0
        self._host: EndpointState | None = None
        self._reused = False
        self._retried = False  # the keep-alive race retry (once)
        self._retries = RetryState()
        self._admitted = False  # counted in the cluster's circuit breaker (requests)
        self._overloaded = False
        self._cancel_flag = "DC"  # why the exchange's task was cancelled: DC, OM or SI
        self._try_deadline: float | None = None  # fast path: per-try, until response headers
        self._in_wheel = False
        self._match: RouteMatch | None = None
        self._cluster_name = ""
        self._cluster: Cluster | None = None
        self._outgoing: RequestHead | None = None
        self._deadline: float | None = None  # loop time by which the response must be done
        self._finished = False
        self._h2_upstream = False
        # gRPC needs HTTP/2 end to end; only then is the content-type worth a look.
        self.grpc = self.facts.http2 and is_grpc(head)
        self.grpc_status = "-"
        self.tunnel_open = False  # a WebSocket upgrade was accepted: bytes flow both ways
        self._timeout_cm: asyncio.Timeout | None = None
        self._hash_key: int | None = None  # consistent hashing: what the pick hashes on
        self._set_cookie: bytes | None = None  # ... and the cookie it generated, if any
        self._mirrors: tuple[Mirror, ...] = ()  # shadows to send once the request is complete
        self._cors_headers: Headers | None = None  # corsPolicy: set on the response
        self.overrides: Headers | None = None  # the app's x-envoy-retry-on etc. (outbound)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the exchange: synchronously when possible, else in a task."""
        facts = self.facts
        try:
            snapshot = facts.ctx.snapshot  # read once: this stream lives by this config
            if facts.ctx.overloaded:
                self._overloaded = True  # Envoy's stop_accepting_requests action
                self.keep_alive = False  # and its connection is shed after the answer
                raise LocalReply(503, "envoy overloaded", "OM")
            admit(facts, self.head, snapshot)
            if self.head.expect_continue:
                self.conn.send_interim(100)
            self._match, self._cluster_name, self._outgoing = self._route(snapshot)
            if snapshot.port_rate_limits or (
                self._match is not None and self._match.route.rate_limit is not None
            ):
                take_rate_limit(facts, snapshot, self._match)
            fault = self._match.route.fault if self._match is not None else None
            delay = fault_delay(fault, self.grpc) if fault is not None else None
            if delay is not None:
                self.flag = "DI"
            cluster = facts.ctx.clusters.get(self._cluster_name)
            if cluster is None:
                raise LocalReply(503, "no healthy upstream", "NC")
        except LocalReply as reply:
            self._mirrors = ()
            self._local_reply(
                reply.status, reply.body, reply.flag, reply.grpc_status, reply.headers
            )
            self._finish()
            return
        self._cluster = cluster
        if self._mirrors and self.request_done:
            self._send_mirrors()
        if cluster.hashing is not None:
            self._hash_key, self._set_cookie = request_hash(
                cluster.hashing, self.head, facts.peer_ip, f"{facts.peer_ip}|{id(self.conn)}"
            )
        breaker = cluster.breaker
        if breaker.limited:
            if not breaker.admit_request():
                self._overflow()
                self._finish()
                return
            self._admitted = True
        if _h2_upstream(cluster, facts.http2) and not self.head.upgrade:
            # WebSocket goes over HTTP/1.1 upstream (an h2 hop would need extended CONNECT
            # from the server: Istio #27078).
            self._h2_upstream = True
        match = self._match
        policy = NO_RETRY
        if match is not None:
            policy = match.route.retry
        elif not facts.inbound:
            policy = OUTBOUND_DEFAULT_RETRY
        if self.head.upgrade:
            policy = NO_RETRY  # a tunnel is never replayed
        timeout = match.route.timeout if match is not None else None
        if self.overrides is not None and not self.head.upgrade:
            policy, timeout = apply_overrides(policy, timeout, self.overrides)
        self._retries.use(policy)
        if self.grpc:
            timeout = grpc_deadline(self.head, timeout)
            out = self._outgoing
            out.headers = with_grpc_timeout(out.headers, timeout)
        loop = facts.loop
        if timeout is not None:
            self._deadline = loop.time() + timeout
        if delay is not None:
            if self._deadline is not None:
                self._deadline += delay  # the route timeout starts after the injected delay
            self.task = spawn(self._slow_path(delay=delay), name="http-stream-delayed")
            return
        first: EndpointState | None = None  # picked here: the slow path must not pick again
        if cluster.spec.resolution is not _DNS:
            try:
                host = cluster.pick_now(facts.original_dst, (), self._hash_key)
            except UpstreamError as err:
                self._upstream_failed(err)
                self._finish()
                return
            up = host.h2_pool().take_idle() if self._h2_upstream else host.pool.take_idle()
            if up is not None:
                per_try = policy.per_try_timeout
                if per_try is not None:
                    self._try_deadline = loop.time() + per_try
                if timeout is not None or per_try is not None:
                    self._in_wheel = True
                    facts.ctx.deadlines.add(self, loop)
                self._begin(host, up, reused=True)
                return
            first = host  # no idle connection to it: connect in the slow path
        self.task = spawn(self._slow_path(first=first), name="http-stream")

    def _begin(self, host: EndpointState, up: UpstreamExchange, reused: bool) -> None:
        """Send the request on `up`: head, the body so far, and its end if it has come."""
        host.active_requests += 1
        host.requests += 1
        self._host = host
        self._reused = reused
        self.upstream = up
        self._sent_at = _monotonic()
        assert self._outgoing is not None
        up.start(self._outgoing, self, self.grpc)
        if self.head.upgrade:
            return  # tunnel bytes wait for the 101
        body = self._replay if self._replay is not None else self._pending
        for chunk in body:
            up.send_data(chunk)
        self._pending = []
        if self._pending_bytes:
            self._pending_bytes = 0
            self.conn.resume_reading()
        if self.request_done:
            up.end_request(self.request_trailers)

    # -- request body from the downstream ----------------------------------------------------
    def request_data(self, data: bytes) -> None:
        self.request_bytes += len(data)
        if self._replay is not None:
            self._replay_bytes += len(data)
            if self._replay_bytes > REPLAY_LIMIT:
                self._replay = None
            else:
                self._replay.append(data)
        up = self.upstream
        if up is not None and (self.tunnel_open or not self.head.upgrade):
            up.send_data(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > BUFFER_HIGH_WATER:
            self.conn.pause_reading()

    def request_end(self, trailers: Headers) -> None:
        if self.request_done:
            return  # a request without a body was complete with its head
        self.request_done = True
        self.request_trailers = trailers
        if self._mirrors:
            self._send_mirrors()
        up = self.upstream
        if up is not None and (self.tunnel_open or not self.head.upgrade):
            up.end_request(trailers)

    # -- ResponseSink ----------------------------------------------------------------------
    def on_response_head(self, head: ResponseHead) -> None:
        self._try_deadline = None  # the per-try timeout ends with the response headers
        if head.status == 101:
            self._open_tunnel(head)
            return
        outlier = self._cluster.outlier if self._cluster is not None else None
        if outlier is not None and self._host is not None:
            outlier.report(self._host, head.status)
        if (
            head.status >= 400 or self.grpc or self._retries.policy.retriable_headers
        ) and self._retry_response(head):
            return
        if self.grpc:
            self.grpc_status = grpc_status_of(head.headers, self.grpc_status)
        # Sent at once: body bytes of the same read follow synchronously and must come after it.
        self._send_response_head(head)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _open_tunnel(self, head: ResponseHead) -> None:
        """The upstream switched protocols: no deadline now, and what the client sent
        since its upgrade request goes up as it is."""
        self.tunnel_open = True
        self._deadline = self._try_deadline = None
        self._leave_wheel()
        if self._timeout_cm is not None:
            self._timeout_cm.reschedule(None)
        self._send_response_head(head)
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        up = self.upstream
        if up is None:
            return
        pending, self._pending = self._pending, []
        for chunk in pending:
            up.send_data(chunk)
        if self._pending_bytes:
            self._pending_bytes = 0
            self.conn.resume_reading()
        if self.request_done:
            up.end_request([])

    def on_response_data(self, data: bytes) -> None:
        self.response_bytes += len(data)
        self.conn.send_data(data)

    def on_response_end(self, trailers: Headers) -> None:
        if self.grpc and trailers:
            self.grpc_status = grpc_status_of(trailers, self.grpc_status)
        self.response_complete = True
        self.conn.send_end(trailers)
        if self.task is None:
            self._finish()
            return
        waiter = self._done_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_upstream_failure(self, error: UpstreamError) -> None:
        if self.task is not None:
            for waiter in (self._head_waiter, self._done_waiter):
                if waiter is not None and not waiter.done():
                    waiter.set_exception(error)
                    return
            return
        host = self._host
        self._attempt_failed(error)
        if self._may_retry(error):
            self.task = spawn(self._slow_path(fresh=True), name="http-stream-retry")
            return
        if self._policy_retries(error, host):
            self.task = spawn(self._slow_path(backoff=True), name="http-stream-retry")
            return
        self._upstream_failed(error)
        self._finish()

    def _retry_response(self, head: ResponseHead) -> bool:
        """A response the route's retryOn retries (5xx, 503, gRPC unavailable, ...): drop it
        (the client never sees it) and try again, on another endpoint when there is one."""
        if self._replay is None or self.response_head_sent:
            return False
        if not self._retries.retries_response(head, self.grpc, self._breaker()):
            return False
        host = self._host
        up = self.upstream
        self._attempt_failed(None)
        if up is not None:
            up.abort()  # its body will not be read: the connection cannot be reused
        self._count_retry(host, str(head.status))
        if self.task is None:
            self.task = spawn(self._slow_path(backoff=True), name="http-stream-retry")
        else:
            waiter = self._head_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(_RetryNow())
        return True

    def hold_writes(self) -> None:
        self.conn.cork()

    def release_writes(self) -> None:
        self.conn.uncork()

    def on_upstream_writable(self, writable: bool) -> None:
        if writable:
            self.conn.resume_reading()
        else:
            self.conn.pause_reading()

    def downstream_writable(self, writable: bool) -> None:
        up = self.upstream
        if up is not None:
            if writable:
                up.resume_reading()
            else:
                up.pause_reading()

    def downstream_gone(self, flag: str = "DC") -> None:
        """The downstream connection closed (DC), or the overload action reset the stream
        (OM): stop the exchange."""
        if self._finished:
            return
        if self.task is not None and not self.task.done():
            self.flag = self._cancel_flag = flag
            self.task.cancel()
            return
        self.flag = flag
        if not self.response_complete:
            self._abort_upstream()
            if not self.response_head_sent:
                self.status = 0
        self._finish()

    def stream_idle_expired(self) -> None:
        """No bytes moved either way for the stream idle timeout (Envoy's
        stream_idle_timeout): 408 `stream timeout` when no response has started, else a
        reset; flag SI either way."""
        if self._finished:
            return
        if self.task is not None and not self.task.done():
            self._cancel_flag = "SI"
            self.task.cancel()
            return
        self._abort_upstream()
        self._fail(408, "stream timeout", "SI")
        self._finish()

    def check_deadline(self, now: float) -> None:
        """The deadline wheel's tick (fast path only; the slow path has asyncio timeouts)."""
        if self.task is not None or self._finished:
            self._leave_wheel()
            return
        if self._deadline is not None and now >= self._deadline:
            self._leave_wheel()
            self._timed_out()
        elif self._try_deadline is not None and now >= self._try_deadline:
            self._try_deadline = None
            self._per_try_expired()

    def _leave_wheel(self) -> None:
        if self._in_wheel:
            self._in_wheel = False
            self.facts.ctx.deadlines.discard(self)

    def _per_try_expired(self) -> None:
        """The fast path's try took longer than perTryTimeout before any response header."""
        if self._finished or self.response_head_sent or self.task is not None:
            return
        host = self._host
        self._abort_upstream()
        err = UpstreamError(FailureKind.TIMEOUT, "per-try timeout", flag="UT")
        self._attempt_failed(err)
        if self._policy_retries(err, host):
            self.task = spawn(self._slow_path(backoff=True), name="http-stream-retry")
            return
        self._fail(504, "upstream request timeout", "UT", GRPC_DEADLINE_EXCEEDED)
        self._finish()

    def _timed_out(self) -> None:
        if self._finished:
            return
        self._abort_upstream()
        self._fail(504, "upstream request timeout", "UT", GRPC_DEADLINE_EXCEEDED)
        self._finish()

    # -- the slow path ---------------------------------------------------------------------
    async def _slow_path(
        self,
        fresh: bool = False,
        backoff: bool = False,
        delay: float | None = None,
        first: EndpointState | None = None,
    ) -> None:
        try:
            if delay is not None:
                await asyncio.sleep(delay)  # fault injection: before the router, as Envoy
            if self._deadline is None:
                await self._exchange(fresh, backoff, first)
            else:
                self._leave_wheel()  # asyncio's timeout takes over from the wheel
                async with asyncio.timeout_at(self._deadline) as self._timeout_cm:
                    await self._exchange(fresh, backoff, first)
        except LocalReply as reply:
            self._local_reply(reply.status, reply.body, reply.flag, reply.grpc_status)
        except TimeoutError:
            self._abort_upstream()
            self._fail(504, "upstream request timeout", "UT", GRPC_DEADLINE_EXCEEDED)
        except UpstreamError as err:
            self._abort_upstream()
            self._upstream_failed(err)
        except asyncio.CancelledError:
            self._abort_upstream()
            if self._cancel_flag == "SI":  # cancelled here, for the stream idle timeout
                self._fail(408, "stream timeout", "SI")
                return
            self.flag = self._cancel_flag
            if not self.response_head_sent:
                self.status = 0
            raise
        except Exception:
            logger.exception("stream failed unexpectedly")
            self._abort_upstream()
            self._fail(500, "internal error", "-")
        finally:
            self._finish()

    async def _exchange(
        self, fresh: bool, backoff: bool = False, first: EndpointState | None = None
    ) -> None:
        cluster = self._cluster
        assert cluster is not None
        loop = self.facts.loop
        retries = self._retries
        per_try = retries.policy.per_try_timeout
        while True:
            if backoff:
                await asyncio.sleep(retry_backoff(retries.attempts - 1))
                backoff = False
            if first is not None:  # the fast path's pick (a balancer is asked once per try)
                host, first = first, None
            else:
                exclude = retries.tried if retries.policy.ignore_previous_hosts else ()
                host = await cluster.pick(self.facts.original_dst, exclude, self._hash_key)
            pool: UpstreamPool = host.h2_pool() if self._h2_upstream else host.pool
            try:
                if fresh:
                    up, reused = await pool.connect(), False
                else:
                    up, reused = await pool.acquire()
            except UpstreamError as err:
                host.errors += 1
                self._report_local_failure(host, err)
                if self._policy_retries(err, host):
                    backoff, fresh = True, False
                    continue
                raise
            waiter = self._head_waiter = loop.create_future()
            self._begin(host, up, reused)
            try:
                if per_try is None:
                    await waiter
                else:
                    await asyncio.wait_for(asyncio.shield(waiter), per_try)
            except _RetryNow:
                backoff, fresh = True, False
                continue
            except TimeoutError:
                # The per-try timeout (the route's own deadline cancels us instead).
                up.abort()
                timeout = UpstreamError(FailureKind.TIMEOUT, "per-try timeout", flag="UT")
                self._attempt_failed(timeout)
                if self._policy_retries(timeout, host):
                    backoff, fresh = True, False
                    continue
                raise
            except UpstreamError as err:
                self._attempt_failed(err)
                if self._may_retry(err):
                    fresh = True
                    continue
                if self._policy_retries(err, host):
                    backoff, fresh = True, False
                    continue
                raise
            break
        if not self.response_complete:
            self._done_waiter = loop.create_future()
            await self._done_waiter

    # -- outcomes ----------------------------------------------------------------------------
    def _attempt_failed(self, err: UpstreamError | None) -> None:
        host = self._host
        if host is not None:
            host.active_requests -= 1
            host.errors += 1
            self._host = None
            if err is not None:
                self._report_local_failure(host, err)
        self.upstream = None

    def _report_local_failure(self, host: EndpointState, err: UpstreamError) -> None:
        """Connect failures, resets and timeouts count against the endpoint (Envoy)."""
        outlier = self._cluster.outlier if self._cluster is not None else None
        if outlier is not None and err.kind not in (FailureKind.NO_HEALTHY, FailureKind.OVERFLOW):
            outlier.report(host, None)

    def _policy_retries(self, err: UpstreamError, host: EndpointState | None) -> bool:
        """Whether the route's retry policy retries this failure; if so, count the retry."""
        if not self._retries.retries_failure(err, self._replay is not None, self._breaker()):
            return False
        self._count_retry(host, err.flag)
        return True

    def _breaker(self) -> CircuitBreaker | None:
        return self._cluster.breaker if self._cluster is not None else None

    def _overflow(self) -> None:
        """A circuit breaker is open: fail fast, as Envoy does (503 UO, x-envoy-overloaded)."""
        self._overloaded = True
        self._fail(503, OVERFLOW_BODY, "UO")

    def _count_retry(self, host: EndpointState | None, outcome: str) -> None:
        """A retry decided; `outcome`: what the failed attempt got (a status or flags)."""
        retries = self._retries
        retries.count(host)
        ctx = self.facts.ctx
        ctx.metrics.upstream_retry(self._cluster_name)
        out = self._outgoing
        if out is not None and not self.facts.inbound:
            attempt = b"%d" % retries.attempts
            out.headers = [
                (k, attempt) if k == b"x-envoy-attempt-count" else (k, v) for k, v in out.headers
            ]
        trace = self.trace
        if trace is not None and trace.span is not None and ctx.tracing is not None:
            # A sampled request's attempts become child spans; this one is the parent the
            # upstream sees.
            failed = host.host_port if host is not None else ""
            child = ctx.tracing.next_attempt(trace, retries.attempts, failed, outcome)
            if out is not None:
                kept = [item for item in out.headers if item[0] not in TRACE_HEADERS]
                out.headers = kept + upstream_headers(child)

    def _may_retry(self, err: UpstreamError) -> bool:
        """The keep-alive race (the upstream closed a pooled connection as we reused it), or
        a request the upstream never processed (HTTP/2 GOAWAY above it or REFUSED_STREAM)."""
        if self._retried or err.response_started:
            return False
        if err.unprocessed:
            if self._replay is None:
                return False
        elif not self._reused or not self._replayable():
            return False
        self._retried = True
        return True

    def _upstream_failed(self, err: UpstreamError) -> None:
        if err.kind is FailureKind.OVERFLOW:
            self._overflow()
            return
        if self._retries.exhausted:
            err.flag += ",URX"  # Envoy: the retry limit was reached
        status, body = upstream_failure_reply(err, self._retries.attempts > 1)
        self._fail(status, body, err.flag)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._in_wheel:
            self._leave_wheel()
        retry_admitted = self._retries.admitted
        if self._admitted or retry_admitted:
            breaker = self._cluster.breaker  # type: ignore[union-attr]
            if self._admitted:
                breaker.requests -= 1
            if retry_admitted:
                breaker.retries -= 1
        host = self._host
        if host is not None:
            host.active_requests -= 1
            self._host = None
        up = self.upstream
        if up is not None and not (up.request_done or self.request_done):
            up.abort()  # the response ended before the request body: never reuse
        report(self, self._match, self._cluster_name, host, _monotonic() - self._start)
        self.conn.stream_finished(self)

    def _route(self, snapshot: Snapshot) -> tuple[RouteMatch | None, str, RequestHead]:
        """Pick route and cluster and build the upstream head; LocalReply if none fits."""
        facts = self.facts
        head = self.head
        binding = self.conn.current_binding(snapshot)
        match = None
        if binding is not None and binding.route_table is not None:
            table = binding.route_table
            vh = table.find_host((head.authority or head.header(b"host") or b"").decode("latin-1"))
            if vh is not None:
                first = vh.routes[0] if vh.routes else None
                if first is not None and not first.matchers:
                    match = RouteMatch(first, None, vh)  # no VirtualService: nothing to match
                else:
                    match = table.route_in(vh, request_view(head, facts.local_port, "http"))
        if match is None:
            if facts.original_dst is not None and facts.inbound:
                cluster = INBOUND_PASSTHROUGH  # a port no Sidecar declares: the local app
            elif facts.original_dst is not None and not snapshot.registry_only:
                cluster = PASSTHROUGH
            elif facts.original_dst is not None:
                raise LocalReply(502, "", "NR")  # REGISTRY_ONLY: Istio's BlackHoleCluster
            else:
                raise LocalReply(404, "", "NR")
            return None, cluster, build_upstream_head(self, head, None, NO_HEADER_OPS)
        cors = match.route.cors
        if cors is not None:
            # Before fault and direct replies, as in Istio's chain.
            self._cors_headers = cors_headers(cors, head)
        direct = match.route.direct
        if direct is not None:
            raise direct_reply(direct, head, facts.peer is not None)
        target = match.route.pick()
        if target is None:
            raise LocalReply(503, "no healthy upstream", "UH")
        self._response_ops = match.route.response_headers
        self._target_ops = target.response_headers
        if match.route.mirrors and not head.upgrade:
            self._mirrors = match.route.mirrors
        self.mesh_upstream = not facts.inbound and snapshot.is_mesh_cluster(target.cluster)
        outgoing = build_upstream_head(self, head, match, target.request_headers)
        return match, target.cluster, outgoing

    def _send_mirrors(self) -> None:
        mirrors, self._mirrors = self._mirrors, ()
        facts, outgoing = self.facts, self._outgoing
        assert outgoing is not None and self._match is not None
        body = list(self._replay) if self._replay is not None else None
        for m in mirrors:
            if m.percent < 100 and random() * 100 >= m.percent:
                continue
            cluster = facts.ctx.clusters.get(m.cluster)
            if cluster is None:
                continue
            h2 = _h2_upstream(cluster, facts.http2)
            mirror(
                cluster,
                outgoing,
                body,
                self.request_trailers,
                self._match.route.timeout,
                h2 or self.grpc,
                self.grpc,
                facts.ctx.metrics,
            )

    def _replayable(self) -> bool:
        if self.head.method in IDEMPOTENT_METHODS or not self.head.has_body:
            return self._replay is not None
        return self._replay is not None and self.request_done and self.request_bytes == 0

    def _send_response_head(self, head: ResponseHead) -> None:
        self.status = head.status
        # The codec's fresh list: ours to extend. Istio's exchange headers leave it too.
        headers, metadata = strip_hop_by_hop(head.headers)
        if metadata is not None and self.mesh_upstream:
            self.peer_metadata = metadata  # a mesh upstream's facts, over mTLS
        elif self.peer_metadata is not None and self.facts.inbound:
            ctx = self.facts.ctx  # a mesh client sent its own: it gets ours
            headers.append((PEER_METADATA_ID, ctx.peer_metadata_id))
            headers.append((PEER_METADATA, ctx.peer_metadata))
        elapsed = int((_monotonic() - self._sent_at) * 1000)
        headers.append((b"x-envoy-upstream-service-time", b"%d" % elapsed))
        if self._set_cookie is not None:
            headers.append((b"set-cookie", self._set_cookie))
        cors = self._cors_headers
        if cors is not None:
            names = {k for k, _ in cors}
            headers = [h for h in headers if h[0] not in names] + cors
        if self._response_ops is not NO_HEADER_OPS:
            headers = self._response_ops.apply(headers)
        if self._target_ops is not NO_HEADER_OPS:
            headers = self._target_ops.apply(headers)
        head.headers = headers
        if self.facts.access_log is not None:
            self.logged_response_headers = headers
        self.response_head_sent = True
        self.conn.send_response_head(head, self)

    def begin_trace(
        self, fields: dict[bytes, bytes] | None, match: RouteMatch | None
    ) -> RequestTrace:
        """This request's span (a sampled one is an SDK span from the request's start)."""
        trace = self.trace
        if trace is not None:
            return trace  # a retry or a second upstream head: one span per request
        tracing = self.facts.ctx.tracing
        assert tracing is not None
        facts = self.facts
        incoming = parse_incoming(fields) if fields else None
        trace = decide(incoming, tracing.sampling)
        if trace is None:  # sampled: an SDK span from the request's start
            name = f"{self.destination_service(match, self._cluster_name)}:{facts.local_port}/*"
            start_ns = time.time_ns() - int((_monotonic() - self._start) * 1e9)
            trace = tracing.begin(incoming, name, SERVER if facts.inbound else CLIENT, start_ns)
        self.trace = trace
        return trace

    def destination_service(self, match: RouteMatch | None, cluster: str) -> str:
        """Istio's destination_service: the route's service outbound, the Host's inbound."""
        facts = self.facts
        if facts.inbound:
            head = self.head
            authority = head.authority or head.header(b"host") or b""
            return facts.ctx.snapshot.inbound_service(authority.decode("latin-1"))
        return match.virtual_host.service if match is not None else cluster

    def _abort_upstream(self) -> None:
        up = self.upstream
        if up is not None and not up.response_done:
            up.abort()

    def _fail(self, status: int, body: str, flag: str, grpc_status: int | None = None) -> None:
        if self.response_head_sent:
            self.flag = flag
            self.conn.abort()  # the response started: truncation must be visible
            return
        self._local_reply(status, body, flag, grpc_status)

    def _local_reply(
        self,
        status: int,
        body: str,
        flag: str,
        grpc_status: int | None = None,
        headers: Headers | None = None,
    ) -> None:
        self.flag = flag
        self.response_head_sent = True
        self.response_complete = True
        if self.grpc:
            # gRPC clients read trailers, not HTTP statuses: a trailers-only response.
            code = grpc_status if grpc_status is not None else grpc_status_for_http(status)
            self.status = 200
            self.grpc_status = str(code)
            self.conn.send_local_reply(200, b"", self, grpc_reply_headers(code, body))
            return
        self.status = status
        data = body.encode("latin-1") if headers is not None else body.encode()
        if self.head.method != b"HEAD":
            self.response_bytes += len(data)  # %BYTES_SENT% and istio_response_bytes count it
        if headers is not None:
            self.conn.send_local_reply(status, data, self, headers)
            return
        if self._overloaded:
            extra: Headers = [(b"content-type", b"text/plain"), (b"x-envoy-overloaded", b"true")]
            self.conn.send_local_reply(status, data, self, extra)
            return
        self.conn.send_local_reply(status, data, self)
