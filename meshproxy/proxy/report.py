"""What a finished HTTP stream reports: its metric series, its span, its access-log entry."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Final

from meshproxy.config.logformat import (
    NEEDS_ADDRESSES,
    NEEDS_ALL,
    NEEDS_REQUEST_ID,
    NEEDS_REQUEST_LINE,
    NEEDS_TRACE_ID,
)
from meshproxy.observe.ids import new_request_id
from meshproxy.observe.metric_shape import Extra, tag_values
from meshproxy.observe.recorder import StreamRecord
from meshproxy.observe.trace_context import TRACE_HEADERS
from meshproxy.observe.workload import NO_PEER

if TYPE_CHECKING:
    from meshproxy.proxy.stream import HttpStream
    from meshproxy.routing.table import RouteMatch
    from meshproxy.upstream.cluster import EndpointState

# %RESPONSE_CODE_DETAILS% for answers the proxy gave itself, by Envoy response flag.
_DETAILS: Final = {
    "NR": "route_not_found",
    "UH": "no_healthy_upstream",
    "UF": "upstream_reset_before_response_started{connection_failure}",
    "UC": "upstream_reset_before_response_started{connection_termination}",
    "UO": "upstream_reset_before_response_started{overflow}",
    "UT": "upstream_response_timeout",
    "UPE": "upstream_reset_before_response_started{protocol_error}",
    "DPE": "http1.codec_error",
    "RL": "local_rate_limited",
    "FI": "fault_filter_abort",
    "DC": "downstream_remote_disconnect",
}


def report(
    stream: HttpStream,
    match: RouteMatch | None,
    cluster: str,
    host: EndpointState | None,
    duration: float,
) -> None:
    """The stream's one report: metrics (unless Telemetry disabled them), a span when tracing,
    a log entry when logging."""
    facts = stream.facts
    ctx = facts.ctx
    service = stream.destination_service(match, cluster)
    if facts.inbound:
        reporter = "destination"
        tls_peer = facts.peer
        spiffe = tls_peer.spiffe_id if tls_peer is not None else None
        principal = str(spiffe) if spiffe is not None else ""
    else:
        reporter = "source"
        up = stream.upstream
        principal = up.peer_principal if up is not None else ""
    trace = stream.trace
    if ctx.tracing is not None and (trace is None or trace.span is not None):
        # A sampled span to end, or a request answered before it was forwarded (404, 400)
        # that still gets its trace: an unsampled one has nothing to do here.
        _end_trace(stream, match, service, cluster, host)
    metadata = stream.peer_metadata
    peer = ctx.peers.get(metadata, principal) if metadata or principal else NO_PEER
    policy = ctx.snapshot.metrics
    direction = policy.inbound if facts.inbound else policy.outbound
    entry: StreamRecord | None = None
    extra: Extra | None = None
    recorded = True
    if direction is not None:
        recorded = not direction.http_off
        if recorded and direction.expressions:
            entry = _log_entry(stream, match, reporter, service, cluster, host, duration, NEEDS_ALL)
            extra = (direction, tag_values(direction, entry))
        else:
            extra = (direction, ())
    if recorded:
        # Arguments written out: a *tuple call is a generic Python call even when compiled.
        ctx.metrics.record_http(
            reporter,
            service,
            stream.status,
            stream.flag,
            duration * 1000.0,
            stream.request_bytes,
            stream.response_bytes,
            "grpc" if stream.grpc else "http",
            stream.grpc_status,
            peer,
            extra,
        )
    log = facts.access_log
    if log is not None:
        if entry is None:
            entry = _log_entry(stream, match, reporter, service, cluster, host, duration, log.needs)
        log(entry)


def _log_entry(
    stream: HttpStream,
    match: RouteMatch | None,
    reporter: str,
    service: str,
    cluster: str,
    host: EndpointState | None,
    duration: float,
    needs: int,
) -> StreamRecord:
    """What the access log's command operators read (`needs`: the fields that cost more
    than a reference, filled only when some operator or filter reads them)."""
    facts = stream.facts
    head = stream.head
    rec = StreamRecord(
        reporter,
        service,
        stream.status,
        stream.flag,
        duration * 1000.0,
        stream.request_bytes,
        stream.response_bytes,
    )
    if needs & NEEDS_REQUEST_LINE:
        rec.method = head.method.decode("latin-1")
        rec.path = head.target.decode("latin-1")
        rec.authority = (head.header(b"host") or b"").decode("latin-1")
    rec.route_name = match.route.name if match is not None else ""
    rec.cluster = cluster
    if host is not None:
        rec.upstream_host = host.host_port
    rec.start_time = time.time() - duration
    rec.request_protocol = "HTTP/2" if facts.http2 else "HTTP/1.1"
    rec.request_headers = head.headers
    # The id generated for the upstream; a request answered before it was forwarded gets
    # one here, as Envoy gives every request one.
    if needs & NEEDS_REQUEST_ID:
        request_id = stream.request_id
        if not request_id and head.header(b"x-request-id") is None:
            request_id = new_request_id()
        rec.request_id = request_id
    rec.response_headers = stream.logged_response_headers
    flag = stream.flag
    if stream.upstream is not None and stream.response_head_sent and flag in ("-", "URX"):
        rec.response_code_details = "via_upstream"
    else:
        rec.response_code_details = _DETAILS.get(flag.split(",")[0], "")
    if needs & NEEDS_ADDRESSES:
        rec.downstream_remote_address, rec.downstream_local_address = stream.conn.log_addresses()
    tls_peer = facts.peer
    if tls_peer is not None:
        rec.requested_server_name = tls_peer.sni
        if tls_peer.spiffe_id is not None:
            rec.downstream_peer_uri_san = str(tls_peer.spiffe_id)
    up = stream.upstream
    if up is not None:
        rec.upstream_local_address = up.local_address
    trace = stream.trace
    if trace is not None and needs & NEEDS_TRACE_ID:
        rec.trace_id = trace.trace_id.decode("ascii")
    return rec


def _end_trace(
    stream: HttpStream,
    match: RouteMatch | None,
    service: str,
    cluster: str,
    host: EndpointState | None,
) -> None:
    """End a sampled request's span with its attributes."""
    trace = stream.trace
    head = stream.head
    if trace is None:
        # Answered before it was routed (404, 400): the request still gets its span.
        fields = {k: v for k, v in head.headers if k in TRACE_HEADERS}
        trace = stream.begin_trace(fields, match)
    tracing = stream.facts.ctx.tracing
    if trace.span is None or tracing is None:
        return
    facts = stream.facts
    local = facts.ctx.metrics.local
    status = stream.status
    authority = (head.authority or head.header(b"host") or b"").decode("latin-1")
    request_id = head.header(b"x-request-id") or stream.request_id
    attributes: dict[str, str | int] = {
        "http.request.method": head.method.decode("latin-1"),
        "url.path": head.target.partition(b"?")[0].decode("latin-1"),
        "server.address": authority.rpartition(":")[0] or authority
        if authority.count(":") == 1
        else authority,
        "network.peer.address": facts.peer_ip,
        "user_agent.original": (head.header(b"user-agent") or b"").decode("latin-1"),
        "istio.canonical_service": local.canonical_service,
        "istio.canonical_revision": local.canonical_revision,
        "istio.namespace": local.namespace,
        "istio.destination_service": service,
        "upstream_cluster": cluster,
        "upstream_address": host.host_port if host is not None else "",
        "response_flags": stream.flag,
        "guid:x-request-id": request_id.decode("latin-1"),
        "component": "proxy",
    }
    if status:
        attributes["http.response.status_code"] = status
    if stream.grpc:
        attributes["grpc.status_code"] = stream.grpc_status
    for tag in tracing.config.custom_tags:
        if tag.kind == "literal":
            attributes[tag.name] = tag.value
        elif tag.kind == "header":
            value = head.header(tag.value.encode("latin-1"))
            attributes[tag.name] = value.decode("latin-1") if value else tag.default
        else:
            attributes[tag.name] = os.environ.get(tag.value, tag.default)
    error = status == 0 or status >= 500 or (status >= 400 and not facts.inbound)
    tracing.finish(trace, attributes, error, time.time_ns())
