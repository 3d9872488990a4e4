"""What the proxy decides about a request before anything goes upstream, in the order of
Istio's filter chain: header names, path normalization, authorization, CORS, fault
injection and local rate limits. A refusal is a LocalReply."""

from __future__ import annotations

from random import random
from typing import TYPE_CHECKING, Final

from meshproxy.codec.events import Headers, RequestHead
from meshproxy.codec.path import PathNormalization, normalize_target
from meshproxy.config.snapshot import Snapshot
from meshproxy.errors import ProtocolError
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.proxy.request_view import header_lines
from meshproxy.routing.cors import Cors, is_preflight
from meshproxy.routing.table import Fault, RouteMatch
from meshproxy.security.authz import AuthzRequest

if TYPE_CHECKING:
    from meshproxy.observe.metrics import MeshMetrics
    from meshproxy.proxy.downstream import ConnectionFacts

_PATH_MODES: Final = {m.value: m for m in PathNormalization}
_UNDERSCORE: Final = ord("_")


def screen_underscores(head: RequestHead, reject: bool, metrics: MeshMetrics) -> None:
    """Envoy's headers_with_underscores_action for the client's headers (not for ours)."""
    headers = head.headers
    for name, _ in headers:
        if _UNDERSCORE in name:
            break
    else:
        return
    if reject:
        metrics.downstream_rejected("headers_with_underscores")
        raise LocalReply(400, "header name with underscores", "DPE")
    kept = [(n, v) for n, v in headers if _UNDERSCORE not in n]
    metrics.downstream_headers_dropped("underscores", len(headers) - len(kept))
    head.headers = kept


def admit(facts: ConnectionFacts, head: RequestHead, snapshot: Snapshot) -> None:
    """Screen header names with underscores, normalize the path (what policy matches is
    what the app gets), then apply the AuthorizationPolicies of this workload to inbound
    requests."""
    metrics = facts.ctx.metrics
    underscores = snapshot.settings.headers_with_underscores_action
    if underscores != "ALLOW":
        screen_underscores(head, underscores == "REJECT_REQUEST", metrics)
    mode = _PATH_MODES[snapshot.settings.path_normalization]
    try:
        head.target = normalize_target(head.target, mode)
    except ProtocolError as exc:
        metrics.downstream_rejected("path")
        raise LocalReply(400, str(exc), "DPE") from None
    authz = snapshot.authz
    if authz is None or not facts.inbound:
        return
    peer = facts.peer
    decision = authz.check(
        AuthzRequest(
            peer.principal if peer is not None else "",
            facts.peer_ip,
            facts.local_port,
            method=head.method.decode("latin-1"),
            host=(head.authority or b"").decode("latin-1"),
            path=head.target.partition(b"?")[0].decode("latin-1"),
            headers=lambda name: header_lines(head, name),
            sni=peer.sni if peer is not None else "",
        )
    )
    metrics.rbac(decision.allowed, "http")
    if not decision.allowed:
        raise LocalReply(403, "RBAC: access denied", "-")


def cors_headers(cors: Cors, head: RequestHead) -> Headers | None:
    """corsPolicy: a preflight is answered here (LocalReply); an allowed origin's actual
    request gets these headers on its response."""
    origin = head.header(b"origin")
    if not origin:
        return None
    if is_preflight(head.method, origin, head.header(b"access-control-request-method")):
        headers = cors.preflight(origin)
        if headers is not None:
            raise LocalReply(200, "", "-", headers=headers)
        return None
    return cors.response_headers(origin) or None


def fault_delay(fault: Fault, grpc: bool) -> float | None:
    """VirtualService fault: abort (LocalReply, flag FI) or the delay to inject (flag DI)."""
    if (fault.abort_status is not None or fault.abort_grpc is not None) and (
        random() * 100 < fault.abort_percent
    ):
        code = fault.abort_grpc if grpc else None
        raise LocalReply(fault.abort_status or 200, "fault filter abort", "FI", grpc_status=code)
    if fault.delay is not None and random() * 100 < fault.delay_percent:
        return fault.delay
    return None


def take_rate_limit(facts: ConnectionFacts, snapshot: Snapshot, match: RouteMatch | None) -> None:
    """The route's bucket, else its port's (Envoy: per-route config replaces the
    listener's); an empty bucket answers 429 with flag RL."""
    limit = match.route.rate_limit if match is not None else None
    if limit is None:
        dst = facts.original_dst
        port = dst[1] if dst is not None else facts.local_port
        limit = snapshot.port_rate_limits.get((facts.inbound, port))
    if limit is None or facts.ctx.rate_limiters.take(limit, facts.loop.time()):
        return
    facts.ctx.metrics.rate_limited(limit.name)
    raise LocalReply(
        limit.status,
        "local_rate_limited",
        "RL",
        headers=[(b"content-type", b"text/plain"), (b"x-envoy-ratelimited", b"true")],
    )
