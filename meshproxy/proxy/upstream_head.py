"""The request head a stream sends upstream: the client's headers less what only this proxy
may set (forwarding, identity, tracing, Envoy's own), plus what Envoy adds in a sidecar,
then the route's rewrites and header operations."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import TYPE_CHECKING, Final

from meshproxy.codec.events import Headers, RequestHead
from meshproxy.codec.headers import PEER_METADATA, PEER_METADATA_ID, strip_hop_by_hop
from meshproxy.observe.ids import new_request_id
from meshproxy.observe.trace_context import TRACE_HEADERS, upstream_headers
from meshproxy.proxy.retry_headers import OVERRIDE_HEADERS
from meshproxy.routing.table import NO_HEADER_OPS, HeaderOps, RouteMatch

if TYPE_CHECKING:
    from meshproxy.proxy.stream import HttpStream
    from meshproxy.proxy.tls import PeerInfo
    from meshproxy.security.identity import WorkloadIdentity

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

_XFCC_CACHE: dict[tuple[str, PeerInfo], bytes] = {}


def build_upstream_head(
    stream: HttpStream, head: RequestHead, match: RouteMatch | None, target_ops: HeaderOps
) -> RequestHead:
    """Also records on `stream` what the headers told: the mesh peer's metadata, the app's
    retry overrides (outbound), the request id generated and the trace begun."""
    facts = stream.facts
    inbound = facts.inbound
    has_proto = has_id = False
    xff: bytes | None = None
    tracing = facts.ctx.tracing
    trace_fields: dict[bytes, bytes] | None = None
    out: Headers = []
    append = out.append
    headers, metadata = strip_hop_by_hop(head.headers)
    if metadata is not None and inbound and facts.peer is not None:
        stream.peer_metadata = metadata  # a mesh peer's, proven by its certificate
    for item in headers:
        k = item[0]
        if k not in _WATCHED_REQUEST_HEADERS and not (inbound and k[:8] == b"x-envoy-"):
            append(item)
        elif k == b"x-forwarded-proto":
            if not inbound or facts.peer is not None:  # ours, or a mesh peer's
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
            if stream.overrides is None:
                stream.overrides = []
            stream.overrides.append(item)  # read by start(), never forwarded (Envoy)
        # else: `expect` (answered here) or an x-envoy-* header from outside the mesh
    if not has_proto:
        append((b"x-forwarded-proto", b"http"))
    if not has_id:
        stream.request_id = new_request_id()
        append((b"x-request-id", stream.request_id))
    if tracing is not None:
        out.extend(upstream_headers(stream.begin_trace(trace_fields, match)))
    if not inbound:
        append((b"x-envoy-attempt-count", b"1"))  # Istio turns this on for outbound
        if stream.mesh_upstream:
            ctx = facts.ctx
            append((PEER_METADATA_ID, ctx.peer_metadata_id))
            append((PEER_METADATA, ctx.peer_metadata))
    if inbound:
        # The edge of the mesh appends the peer, as Envoy does with use_remote_address.
        peer_ip = facts.peer_ip.encode()
        append((b"x-forwarded-for", xff + b"," + peer_ip if xff else peer_ip))
        if facts.peer is not None:
            append((b"x-forwarded-client-cert", xfcc(facts.ctx.identity, facts.peer)))
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
        return upgrade_head(head, target, out, facts.http2)
    return RequestHead(head.method, target, out, b"1.1", True, head.has_body, head.content_length)


def upgrade_head(head: RequestHead, target: bytes, out: Headers, from_h2: bool) -> RequestHead:
    """The HTTP/1.1 upgrade request for a WebSocket, from an h1 upgrade or h2 extended CONNECT."""
    out.append((b"connection", b"upgrade"))
    out.append((b"upgrade", b"websocket"))
    if from_h2 and not any(k == b"sec-websocket-key" for k, _ in out):
        # RFC 8441 clients send no key; an HTTP/1.1 server requires one (RFC 6455 §4.1).
        out.append((b"sec-websocket-key", base64.b64encode(os.urandom(16))))
    return RequestHead(
        b"GET", target, out, b"1.1", False, False, None, False, 1, head.authority, True
    )


def xfcc(identity: WorkloadIdentity | None, peer: PeerInfo) -> bytes:
    """Envoy's x-forwarded-client-cert for the mTLS peer (SANITIZE_SET: ours only); the
    same for every request of a connection, so it is computed once (hashing the peer's
    certificate per request cost ~10 µs)."""
    own = identity.spiffe_id if identity is not None else None
    key = (own.principal if own is not None else "", peer)  # PeerInfo hashes by identity
    cached = _XFCC_CACHE.get(key)
    if cached is not None:
        return cached
    if len(_XFCC_CACHE) >= 1024:
        _XFCC_CACHE.clear()
    parts = []
    if own is not None:
        parts.append(f"By={own}")
    parts.append(f"Hash={hashlib.sha256(peer.cert_der).hexdigest()}")
    parts.append('Subject=""')
    if peer.spiffe_id is not None:
        parts.append(f"URI={peer.spiffe_id}")
    value = _XFCC_CACHE[key] = ";".join(parts).encode()
    return value
