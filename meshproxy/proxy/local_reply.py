"""The answers the proxy gives itself instead of an upstream's: status, body and flag, in
Envoy's words, so clients and dashboards see what they would see behind Envoy."""

from __future__ import annotations

from typing import Final

from meshproxy.codec.events import Headers, RequestHead
from meshproxy.errors import CONNECT_FAILURES, FailureKind, UpstreamError
from meshproxy.routing.table import DirectReply

_BEFORE_HEADERS: Final = "upstream connect error or disconnect/reset before headers. "
OVERFLOW_BODY: Final = _BEFORE_HEADERS + "reset reason: overflow"


class LocalReply(Exception):
    """Answer the downstream ourselves: raised by a request filter, caught by the stream."""

    def __init__(
        self,
        status: int,
        body: str,
        flag: str,
        headers: Headers | None = None,
        grpc_status: int | None = None,
    ) -> None:
        super().__init__(body)
        self.status = status
        self.body = body
        self.flag = flag
        self.headers = headers
        self.grpc_status = grpc_status  # a fault abort's gRPC status, for gRPC clients


def direct_reply(direct: DirectReply, head: RequestHead, tls: bool) -> LocalReply:
    """VirtualService directResponse / redirect: the proxy answers, nothing goes upstream."""
    if direct.is_redirect:
        location = direct.location(
            "https" if tls else "http",
            (head.authority or b"").decode("latin-1"),
            head.target.decode("latin-1"),
        )
        return LocalReply(direct.status, "", "-", [(b"location", location.encode())])
    extra: Headers = [(b"content-type", b"text/plain")] if direct.body else []
    return LocalReply(direct.status, direct.body.decode("latin-1"), "-", extra)


def upstream_failure_reply(err: UpstreamError, retried: bool) -> tuple[int, str]:
    """Status and body for a request no upstream answered (not for overflow: OVERFLOW_BODY)."""
    if err.kind is FailureKind.NO_HEALTHY:
        return 503, "no healthy upstream"
    if err.kind is FailureKind.PROTOCOL:
        return 502, _BEFORE_HEADERS + "reset reason: protocol error"
    connect = err.kind in CONNECT_FAILURES
    reason = "connection failure" if connect else "connection termination"
    if err.kind is FailureKind.TLS:
        # Envoy's wording: the TLS problem is the transport failure reason.
        reason += f", transport failure reason: {err}"
    latest = "retried and the latest " if retried else ""
    return 503, f"{_BEFORE_HEADERS}{latest}reset reason: {reason}"
