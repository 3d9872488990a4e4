"""One HTTP request/response through the proxy: route, pick, attempt, stream the response."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
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
from meshproxy.codec.path import PathNormalization, normalize_target
from meshproxy.config.compile import INBOUND_PASSTHROUGH, PASSTHROUGH
from meshproxy.config.snapshot import Resolution, Snapshot, UpstreamProtocol
from meshproxy.errors import FailureKind, ProtocolError, UpstreamError
from meshproxy.observe.tracing import (
    CLIENT,
    SERVER,
    TRACE_HEADERS,
    RequestTrace,
    parse_incoming,
    upstream_headers,
)
from meshproxy.proxy.hash_key import request_hash
from meshproxy.proxy.ids import new_request_id
from meshproxy.proxy.mirror import mirror
from meshproxy.proxy.report import report
from meshproxy.proxy.retry_headers import OVERRIDE_HEADERS, apply_overrides
from meshproxy.routing.cors import Cors, is_preflight
from meshproxy.routing.match import RequestView
from meshproxy.routing.table import (
    NO_HEADER_OPS,
    NO_RETRY,
    OUTBOUND_DEFAULT_RETRY,
    DirectReply,
    Fault,
    HeaderOps,
    Mirror,
    RetryPolicy,
    RouteMatch,
)
from meshproxy.security.authz import AuthzRequest
from meshproxy.upstream.cluster import Cluster, EndpointState, UpstreamPool
from meshproxy.upstream.connection import UpstreamExchange

if TYPE_CHECKING:
    from meshproxy.proxy.downstream import Downstream
    from meshproxy.proxy.tls import PeerInfo

logger = logging.getLogger(__name__)

_WATCHED_REQUEST_HEADERS: Final = frozenset(
    {
        b"expect",
        b"x-forwarded-proto",
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-client-cert",  # only the proxy sets it: never what a client sent
        *TRACE_HEADERS,  # replaced by this proxy's span when tracing, else passed on
        *OVERRIDE_HEADERS,
    }
)
REPLAY_LIMIT: Final = 64 * 1024  # request bytes kept to retry on a fresh connection
BUFFER_HIGH_WATER: Final = 64 * 1024


class LocalReply(Exception):
    """Answer the downstream ourselves (a value-like exception used only inside this module)."""

    def __init__(self, status: int, body: str, flag: str, headers: Headers | None = None) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.flag = flag
        self.headers = headers


# Enum members of interpreted modules, as compiled constants (read per request).
_HTTP2: Final = UpstreamProtocol.HTTP2
_CLIENT_PROTOCOL: Final = UpstreamProtocol.CLIENT
_DNS: Final = Resolution.DNS

_XFCC_CACHE: dict[tuple[str, PeerInfo], bytes] = {}


def _h2_upstream(cluster: Cluster, downstream_http2: bool) -> bool:
    """Whether a request to `cluster` goes upstream as HTTP/2 (h2UpgradePolicy, or
    useClientProtocol with an HTTP/2 client)."""
    protocol = cluster.spec.upstream_protocol
    return protocol is _HTTP2 or (protocol is _CLIENT_PROTOCOL and downstream_http2)


class _LazyHeaders(Mapping[str, str]):
    """Request headers as str, decoded only if a route actually matches on headers."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: Headers) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _get(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = {}
            for k, v in self._raw:
                name = k.decode("latin-1")
                value = v.decode("latin-1")
                decoded[name] = f"{decoded[name]},{value}" if name in decoded else value
            self._decoded = decoded
        return decoded

    def __getitem__(self, key: str) -> str:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _view(head: RequestHead, port: int, scheme: str) -> RequestView:
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    host = head.authority or head.header(b"host") or b""
    return RequestView(
        head.method.decode("latin-1"),
        path,
        query,
        host.decode("latin-1"),
        scheme,
        _LazyHeaders(head.headers),
        port,
    )


def _upgrade_head(head: RequestHead, target: bytes, out: Headers, from_h2: bool) -> RequestHead:
    """The HTTP/1.1 upgrade request for a WebSocket, from an h1 upgrade or h2 extended CONNECT."""
    out.append((b"connection", b"upgrade"))
    out.append((b"upgrade", b"websocket"))
    if from_h2 and not any(k == b"sec-websocket-key" for k, _ in out):
        # RFC 8441 clients send no key; an HTTP/1.1 server requires one (RFC 6455 §4.1).
        out.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))
    return RequestHead(
        b"GET", target, out, b"1.1", False, False, None, False, 1, head.authority, True
    )


_PATH_MODES: Final = {m.value: m for m in PathNormalization}
_UNDERSCORE: Final = ord("_")


def _header_lines(head: RequestHead, name: str) -> list[str]:
    key = name.encode("latin-1")
    return [v.decode("latin-1") for k, v in head.headers if k == key]


_CONNECT_FAILURES: Final = frozenset(
    {FailureKind.CONNECT_REFUSED, FailureKind.CONNECT_TIMEOUT, FailureKind.TLS}
)


class _RetryNow(Exception):
    """Wakes the slow path: the response was one the retry policy retries."""


def retry_backoff(retry: int) -> float:
    """Envoy's fully jittered exponential backoff: 25 ms base, capped at 250 ms."""
    ceiling = min(0.025 * ((1 << max(retry, 1)) - 1), 0.25)
    return random() * ceiling


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
        self._mesh_upstream = False
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
        self._start = time.monotonic()
        self._sent_at = 0.0
        self._host: EndpointState | None = None
        self._reused = False
        self._retried = False  # the keep-alive race retry (once)
        self._retry: RetryPolicy = NO_RETRY
        self._retries_left = 0
        self._attempts = 1
        self._tried: list[EndpointState] = []  # hosts that failed, avoided by retries
        self._retry_exhausted = False
        self._admitted = False  # counted in the cluster's circuit breaker (requests)
        self._retry_admitted = False  # ... and in its retry budget
        self._overloaded = False
        self._cancel_flag = "DC"  # why the exchange's task was cancelled: DC, OM or SI
        self._fault_grpc: int | None = None  # a fault abort's gRPC status
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
        self.grpc = conn.http2 and is_grpc(head)
        self.grpc_status = "-"
        self.tunnel_open = False  # a WebSocket upgrade was accepted: bytes flow both ways
        self._timeout_cm: asyncio.Timeout | None = None
        self._hash_key: int | None = None  # consistent hashing: what the pick hashes on
        self._set_cookie: bytes | None = None  # ... and the cookie it generated, if any
        self._mirrors: tuple[Mirror, ...] = ()  # shadows to send once the request is complete
        self._cors_headers: Headers | None = None  # corsPolicy: set on the response
        self._overrides: Headers | None = None  # the app's x-envoy-retry-on etc. (outbound)

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin the exchange: synchronously when possible, else in a task."""
        conn = self.conn
        try:
            snapshot = conn.ctx.snapshot  # read once: this stream lives by this config
            if conn.ctx.overloaded:
                self._overloaded = True  # Envoy's stop_accepting_requests action
                self.keep_alive = False  # and its connection is shed after the answer
                raise LocalReply(503, "envoy overloaded", "OM")
            self._admit(snapshot)
            if self.head.expect_continue:
                conn.send_interim(100)
            self._match, self._cluster_name, self._outgoing = self._route(snapshot)
            if snapshot.port_rate_limits or (
                self._match is not None and self._match.route.rate_limit is not None
            ):
                self._rate_limit(snapshot)
            fault = self._match.route.fault if self._match is not None else None
            delay = self._fault(fault) if fault is not None else None
            cluster = conn.ctx.clusters.get(self._cluster_name)
            if cluster is None:
                raise LocalReply(503, "no healthy upstream", "NC")
        except LocalReply as reply:
            self._mirrors = ()
            self._local_reply(reply.status, reply.body, reply.flag, headers=reply.headers)
            self._finish()
            return
        self._cluster = cluster
        if self._mirrors and self.request_done:
            self._send_mirrors()
        if cluster.hashing is not None:
            self._hash_key, self._set_cookie = request_hash(
                cluster.hashing, self.head, conn.peer_ip, f"{conn.peer_ip}|{id(conn)}"
            )
        breaker = cluster.breaker
        if breaker.limited:
            if not breaker.admit_request():
                self._overflow()
                self._finish()
                return
            self._admitted = True
        if _h2_upstream(cluster, conn.http2) and not self.head.upgrade:
            # WebSocket goes over HTTP/1.1 upstream (an h2 hop would need extended CONNECT
            # from the server: Istio #27078).
            self._h2_upstream = True
        match = self._match
        if match is not None:
            self._retry = match.route.retry
        elif not conn.inbound:
            self._retry = OUTBOUND_DEFAULT_RETRY
        if self.head.upgrade:
            self._retry = NO_RETRY  # a tunnel is never replayed
        timeout = match.route.timeout if match is not None else None
        if self._overrides is not None and not self.head.upgrade:
            self._retry, timeout = apply_overrides(self._retry, timeout, self._overrides)
        self._retries_left = self._retry.attempts
        if self.grpc:
            timeout = grpc_deadline(self.head, timeout)
            out = self._outgoing
            out.headers = with_grpc_timeout(out.headers, timeout)
        loop = conn.loop
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
                host = cluster.pick_now(conn.original_dst, (), self._hash_key)
            except UpstreamError as err:
                self._upstream_failed(err)
                self._finish()
                return
            up = host.h2_pool().take_idle() if self._h2_upstream else host.pool.take_idle()
            if up is not None:
                per_try = self._retry.per_try_timeout
                if per_try is not None:
                    self._try_deadline = loop.time() + per_try
                if timeout is not None or per_try is not None:
                    self._in_wheel = True
                    conn.ctx.deadlines.add(self, loop)
                self._begin(host, up, reused=True)
                return
            first = host  # no idle connection to it: connect in the slow path
        self.task = spawn(self._slow_path(first=first), name="http-stream")

    def _direct_reply(self, direct: DirectReply) -> LocalReply:
        """VirtualService directResponse / redirect: the proxy answers, nothing goes upstream."""
        if direct.is_redirect:
            head = self.head
            location = direct.location(
                "https" if self.conn.peer is not None else "http",
                (head.authority or b"").decode("latin-1"),
                head.target.decode("latin-1"),
            )
            return LocalReply(direct.status, "", "-", [(b"location", location.encode())])
        extra: Headers = [(b"content-type", b"text/plain")] if direct.body else []
        return LocalReply(direct.status, direct.body.decode("latin-1"), "-", extra)

    def _fault(self, fault: Fault) -> float | None:
        """VirtualService fault: abort (LocalReply, flag FI) or the delay to inject (DI)."""
        if (fault.abort_status is not None or fault.abort_grpc is not None) and (
            random() * 100 < fault.abort_percent
        ):
            if self.grpc and fault.abort_grpc is not None:
                self._fault_grpc = fault.abort_grpc
            raise LocalReply(fault.abort_status or 200, "fault filter abort", "FI")
        if fault.delay is not None and random() * 100 < fault.delay_percent:
            self.flag = "DI"
            return fault.delay
        return None

    def _screen_underscores(self, head: RequestHead, reject: bool) -> None:
        """Envoy's headers_with_underscores_action for the client's headers (not for ours)."""
        headers = head.headers
        for name, _ in headers:
            if _UNDERSCORE in name:
                break
        else:
            return
        metrics = self.conn.ctx.metrics
        if reject:
            metrics.downstream_rejected("headers_with_underscores")
            raise LocalReply(400, "header name with underscores", "DPE")
        kept = [(n, v) for n, v in headers if _UNDERSCORE not in n]
        metrics.downstream_headers_dropped("underscores", len(headers) - len(kept))
        head.headers = kept

    def _admit(self, snapshot: Snapshot) -> None:
        """Screen header names with underscores, normalize the path (what policy matches is
        what the app gets), then apply the AuthorizationPolicies of this workload to inbound
        requests; LocalReply if refused."""
        conn = self.conn
        head = self.head
        underscores = snapshot.settings.headers_with_underscores_action
        if underscores != "ALLOW":
            self._screen_underscores(head, underscores == "REJECT_REQUEST")
        mode = _PATH_MODES[snapshot.settings.path_normalization]
        try:
            head.target = normalize_target(head.target, mode)
        except ProtocolError as exc:
            conn.ctx.metrics.downstream_rejected("path")
            raise LocalReply(400, str(exc), "DPE") from None
        authz = snapshot.authz
        if authz is None or not conn.inbound:
            return
        peer = conn.peer
        decision = authz.check(
            AuthzRequest(
                peer.principal if peer is not None else "",
                conn.peer_ip,
                conn.local_port,
                method=head.method.decode("latin-1"),
                host=(head.authority or b"").decode("latin-1"),
                path=head.target.partition(b"?")[0].decode("latin-1"),
                headers=lambda name: _header_lines(head, name),
                sni=peer.sni if peer is not None else "",
            )
        )
        conn.ctx.metrics.rbac(decision.allowed, "http")
        if not decision.allowed:
            raise LocalReply(403, "RBAC: access denied", "-")

    def _begin(self, host: EndpointState, up: UpstreamExchange, reused: bool) -> None:
        """Send the request on `up`: head, the body so far, and its end if it has come."""
        host.active_requests += 1
        host.requests += 1
        self._host = host
        self._reused = reused
        self.upstream = up
        self._sent_at = time.monotonic()
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
            head.status >= 400 or self.grpc or self._retry.retriable_headers
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
        policy = self._retry
        if self._retries_left <= 0 or self._replay is None or self.response_head_sent:
            return False
        retry = policy.retries_response(head.status, head.headers)
        if not retry and self.grpc and policy.grpc_codes:
            code = grpc_status_of(head.headers, "")  # a trailers-only answer carries it here
            retry = code.isdigit() and int(code) in policy.grpc_codes
        if not retry or not self._admit_retry():
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
            self.conn.ctx.deadlines.discard(self)

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
            self._local_reply(reply.status, reply.body, reply.flag)
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
        loop = self.conn.loop
        per_try = self._retry.per_try_timeout
        while True:
            if backoff:
                await asyncio.sleep(retry_backoff(self._attempts - 1))
                backoff = False
            if first is not None:  # the fast path's pick (a balancer is asked once per try)
                host, first = first, None
            else:
                exclude = self._tried if self._retry.ignore_previous_hosts else ()
                host = await cluster.pick(self.conn.original_dst, exclude, self._hash_key)
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
        """Whether the route's retry policy retries this failure (Envoy's conditions)."""
        on = self._retry.on
        if not on or err.response_started or self._replay is None:
            return False
        kind = err.kind
        if kind is FailureKind.NO_HEALTHY or kind is FailureKind.OVERFLOW:
            return False
        connect = kind in (
            FailureKind.CONNECT_REFUSED,
            FailureKind.CONNECT_TIMEOUT,
            FailureKind.TLS,
        )
        wanted = (
            "5xx" in on
            or "gateway-error" in on
            or "reset" in on
            or (connect and "connect-failure" in on)
            or (err.unprocessed and "refused-stream" in on)
            or ((connect or not err.request_bytes_sent) and "reset-before-request" in on)
        )
        if not wanted:
            return False
        if self._retries_left <= 0:
            self._retry_exhausted = True
            return False
        if not self._admit_retry():
            return False
        self._count_retry(host, err.flag)
        return True

    def _admit_retry(self) -> bool:
        """The cluster's maxRetries: retries in flight at once (one slot per stream)."""
        if self._retry_admitted or self._cluster is None:
            return True
        breaker = self._cluster.breaker
        if not breaker.limited:
            return True
        if breaker.admit_retry():
            self._retry_admitted = True
            return True
        return False

    def _overflow(self) -> None:
        """A circuit breaker is open: fail fast, as Envoy does (503 UO, x-envoy-overloaded)."""
        self._overloaded = True
        self._fail(
            503,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            "UO",
        )

    def _count_retry(self, host: EndpointState | None, outcome: str) -> None:
        """A retry decided; `outcome`: what the failed attempt got (a status or flags)."""
        self._retries_left -= 1
        self._attempts += 1
        if host is not None and host not in self._tried:
            self._tried.append(host)
        ctx = self.conn.ctx
        ctx.metrics.upstream_retry(self._cluster_name)
        out = self._outgoing
        if out is not None and not self.conn.inbound:
            attempt = b"%d" % self._attempts
            out.headers = [
                (k, attempt) if k == b"x-envoy-attempt-count" else (k, v) for k, v in out.headers
            ]
        trace = self.trace
        if trace is not None and trace.span is not None and ctx.tracing is not None:
            # A sampled request's attempts become child spans; this one is the parent the
            # upstream sees.
            failed = f"{host.address}:{host.port}" if host is not None else ""
            child = ctx.tracing.next_attempt(trace, self._attempts, failed, outcome)
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
        if self._retry_exhausted:
            err.flag += ",URX"  # Envoy: the retry limit was reached
        if err.kind is FailureKind.NO_HEALTHY:
            self._fail(503, "no healthy upstream", err.flag)
        elif err.kind is FailureKind.PROTOCOL:
            self._fail(
                502,
                "upstream connect error or disconnect/reset before headers. "
                "reset reason: protocol error",
                err.flag,
            )
        else:
            connect = err.kind in _CONNECT_FAILURES
            reason = "connection failure" if connect else "connection termination"
            if err.kind is FailureKind.TLS:
                # Envoy's wording: the TLS problem is the transport failure reason.
                reason += f", transport failure reason: {err}"
            retried = "retried and the latest " if self._attempts > 1 else ""
            self._fail(
                503,
                "upstream connect error or disconnect/reset before headers. "
                f"{retried}reset reason: {reason}",
                err.flag,
            )

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._in_wheel:
            self._leave_wheel()
        if self._admitted or self._retry_admitted:
            breaker = self._cluster.breaker  # type: ignore[union-attr]
            if self._admitted:
                breaker.requests -= 1
            if self._retry_admitted:
                breaker.retries -= 1
        host = self._host
        if host is not None:
            host.active_requests -= 1
            self._host = None
        up = self.upstream
        if up is not None and not (up.request_done or self.request_done):
            up.abort()  # the response ended before the request body: never reuse
        report(self, self._match, self._cluster_name, host, time.monotonic() - self._start)
        self.conn.stream_finished(self)

    def _route(self, snapshot: Snapshot) -> tuple[RouteMatch | None, str, RequestHead]:
        """Pick route and cluster and build the upstream head; LocalReply if none fits."""
        conn = self.conn
        head = self.head
        binding = conn.current_binding(snapshot)
        match = None
        if binding is not None and binding.route_table is not None:
            table = binding.route_table
            vh = table.find_host((head.authority or head.header(b"host") or b"").decode("latin-1"))
            if vh is not None:
                first = vh.routes[0] if vh.routes else None
                if first is not None and not first.matchers:
                    match = RouteMatch(first, None, vh)  # no VirtualService: nothing to match
                else:
                    match = table.route_in(vh, _view(head, conn.local_port, "http"))
        if match is None:
            if conn.original_dst is not None and conn.inbound:
                cluster = INBOUND_PASSTHROUGH  # a port no Sidecar declares: the local app
            elif conn.original_dst is not None and not snapshot.registry_only:
                cluster = PASSTHROUGH
            elif conn.original_dst is not None:
                raise LocalReply(502, "", "NR")  # REGISTRY_ONLY: Istio's BlackHoleCluster
            else:
                raise LocalReply(404, "", "NR")
            return None, cluster, self._upstream_head(head, None, NO_HEADER_OPS)
        cors = match.route.cors
        if cors is not None:
            self._cors(cors, head)  # before fault and direct replies, as in Istio's chain
        direct = match.route.direct
        if direct is not None:
            raise self._direct_reply(direct)
        target = match.route.pick()
        if target is None:
            raise LocalReply(503, "no healthy upstream", "UH")
        self._response_ops = match.route.response_headers
        self._target_ops = target.response_headers
        if match.route.mirrors and not head.upgrade:
            self._mirrors = match.route.mirrors
        self._mesh_upstream = not conn.inbound and snapshot.is_mesh_cluster(target.cluster)
        return match, target.cluster, self._upstream_head(head, match, target.request_headers)

    def _rate_limit(self, snapshot: Snapshot) -> None:
        """The route's bucket, else its port's (Envoy: per-route config replaces the
        listener's); an empty bucket answers 429 with flag RL."""
        conn = self.conn
        limit = self._match.route.rate_limit if self._match is not None else None
        if limit is None:
            dst = conn.original_dst
            port = dst[1] if dst is not None else conn.local_port
            limit = snapshot.port_rate_limits.get((conn.inbound, port))
        if limit is None or conn.ctx.rate_limiters.take(limit, conn.loop.time()):
            return
        conn.ctx.metrics.rate_limited(limit.name)
        self._mirrors = ()
        raise LocalReply(
            limit.status,
            "local_rate_limited",
            "RL",
            headers=[(b"content-type", b"text/plain"), (b"x-envoy-ratelimited", b"true")],
        )

    def _cors(self, cors: Cors, head: RequestHead) -> None:
        origin = head.header(b"origin")
        if not origin:
            return
        if is_preflight(head.method, origin, head.header(b"access-control-request-method")):
            headers = cors.preflight(origin)
            if headers is not None:
                raise LocalReply(200, "", "-", headers=headers)
            return
        self._cors_headers = cors.response_headers(origin) or None

    def _send_mirrors(self) -> None:
        mirrors, self._mirrors = self._mirrors, ()
        conn, outgoing = self.conn, self._outgoing
        assert outgoing is not None and self._match is not None
        body = list(self._replay) if self._replay is not None else None
        for m in mirrors:
            if m.percent < 100 and random() * 100 >= m.percent:
                continue
            cluster = conn.ctx.clusters.get(m.cluster)
            if cluster is None:
                continue
            h2 = _h2_upstream(cluster, conn.http2)
            mirror(
                cluster,
                outgoing,
                body,
                self.request_trailers,
                self._match.route.timeout,
                h2 or self.grpc,
                self.grpc,
                conn.ctx.metrics,
            )

    def _upstream_head(
        self, head: RequestHead, match: RouteMatch | None, target_ops: HeaderOps
    ) -> RequestHead:
        conn = self.conn
        inbound = conn.inbound
        has_proto = has_id = False
        xff: bytes | None = None
        tracing = conn.ctx.tracing
        trace_fields: dict[bytes, bytes] | None = None
        out: Headers = []
        append = out.append
        headers, metadata = strip_hop_by_hop(head.headers)
        if metadata is not None and inbound and conn.peer is not None:
            self.peer_metadata = metadata  # a mesh peer's, proven by its certificate
        for item in headers:
            k = item[0]
            if k not in _WATCHED_REQUEST_HEADERS and not (inbound and k[:8] == b"x-envoy-"):
                append(item)
            elif k == b"x-forwarded-proto":
                if not inbound or conn.peer is not None:  # ours, or a mesh peer's
                    has_proto = True
                    append(item)
                # else a plaintext client's claim (catalog F01): replaced by "http" below
            elif k == b"x-request-id":
                has_id = True
                append(item)
            elif k == b"x-forwarded-for":
                if inbound:
                    xff = item[1]
                else:
                    append(item)
            elif k in TRACE_HEADERS:
                if tracing is None:
                    append(item)
                else:
                    if trace_fields is None:
                        trace_fields = {}
                    trace_fields[k] = item[1]
            elif k in OVERRIDE_HEADERS and not inbound:
                if self._overrides is None:
                    self._overrides = []
                self._overrides.append(item)  # read by start(), never forwarded (Envoy)
            # else: `expect` (answered here) or an x-envoy-* header from outside the mesh
        if not has_proto:
            append((b"x-forwarded-proto", b"http"))
        if not has_id:
            self.request_id = new_request_id()
            append((b"x-request-id", self.request_id))
        if tracing is not None:
            out.extend(upstream_headers(self.begin_trace(trace_fields, match)))
        if not inbound:
            append((b"x-envoy-attempt-count", b"1"))  # Istio turns this on for outbound
            if self._mesh_upstream:
                ctx = conn.ctx
                append((PEER_METADATA_ID, ctx.peer_metadata_id))
                append((PEER_METADATA, ctx.peer_metadata))
        if inbound:
            # The edge of the mesh appends the peer, as Envoy does with use_remote_address.
            peer = conn.peer_ip.encode()
            append((b"x-forwarded-for", xff + b"," + peer if xff else peer))
            if conn.peer is not None:
                append((b"x-forwarded-client-cert", self._xfcc(conn.peer)))
        target = head.target
        if match is not None:
            route = match.route
            if route.rewrites_path:
                path, sep, query = target.decode("latin-1").partition("?")
                new_path = route.rewrite_path(match.matcher, path)
                append((b"x-envoy-original-path", target))
                target = (new_path + sep + query).encode("latin-1")
            if route.rewrite_authority is not None:
                out = [(k, route.rewrite_authority.encode() if k == b"host" else v) for k, v in out]
            if route.request_headers is not NO_HEADER_OPS:
                out = route.request_headers.apply(out)
        if target_ops is not NO_HEADER_OPS:
            out = target_ops.apply(out)
        if head.upgrade:
            return _upgrade_head(head, target, out, conn.http2)
        return RequestHead(
            head.method, target, out, b"1.1", True, head.has_body, head.content_length
        )

    def _xfcc(self, peer: PeerInfo) -> bytes:
        """Envoy's x-forwarded-client-cert for the mTLS peer (SANITIZE_SET: ours only); the
        same for every request of a connection, so it is computed once (hashing the peer's
        certificate per request cost ~10 µs)."""
        identity = self.conn.ctx.identity
        own = identity.spiffe_id if identity is not None else None
        key = (own.principal if own is not None else "", peer)  # PeerInfo hashes by identity
        cached = _XFCC_CACHE.get(key)
        if cached is not None:
            return cached
        if len(_XFCC_CACHE) >= 1024:
            _XFCC_CACHE.clear()
        value = _XFCC_CACHE[key] = self._compute_xfcc(peer)
        return value

    def _compute_xfcc(self, peer: PeerInfo) -> bytes:
        identity = self.conn.ctx.identity
        parts = []
        if identity is not None and identity.spiffe_id is not None:
            parts.append(f"By={identity.spiffe_id}")
        parts.append(f"Hash={hashlib.sha256(peer.cert_der).hexdigest()}")
        parts.append('Subject=""')
        if peer.spiffe_id is not None:
            parts.append(f"URI={peer.spiffe_id}")
        return ";".join(parts).encode()

    def _replayable(self) -> bool:
        if self.head.method in IDEMPOTENT_METHODS or not self.head.has_body:
            return self._replay is not None
        return self._replay is not None and self.request_done and self.request_bytes == 0

    def _send_response_head(self, head: ResponseHead) -> None:
        self.status = head.status
        # The codec's fresh list: ours to extend. Istio's exchange headers leave it too.
        headers, metadata = strip_hop_by_hop(head.headers)
        if metadata is not None and self._mesh_upstream:
            self.peer_metadata = metadata  # a mesh upstream's facts, over mTLS
        elif self.peer_metadata is not None and self.conn.inbound:
            ctx = self.conn.ctx  # a mesh client sent its own: it gets ours
            headers.append((PEER_METADATA_ID, ctx.peer_metadata_id))
            headers.append((PEER_METADATA, ctx.peer_metadata))
        elapsed = int((time.monotonic() - self._sent_at) * 1000)
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
        if self.conn.access_log is not None:
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
        tracing = self.conn.ctx.tracing
        assert tracing is not None
        conn = self.conn
        incoming = parse_incoming(fields, fields.get(b"tracestate", b"")) if fields else None
        trace = tracing.decide(incoming)
        if trace is None:  # sampled: an SDK span from the request's start
            name = f"{self.destination_service(match, self._cluster_name)}:{conn.local_port}/*"
            start_ns = time.time_ns() - int((time.monotonic() - self._start) * 1e9)
            trace = tracing.begin(incoming, name, SERVER if conn.inbound else CLIENT, start_ns)
        self.trace = trace
        return trace

    def destination_service(self, match: RouteMatch | None, cluster: str) -> str:
        """Istio's destination_service: the route's service outbound, the Host's inbound."""
        conn = self.conn
        if conn.inbound:
            head = self.head
            authority = head.authority or head.header(b"host") or b""
            return conn.ctx.snapshot.inbound_service(authority.decode("latin-1"))
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
            if grpc_status is None:
                grpc_status = self._fault_grpc
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
