"""What the data plane reports: a StreamRecord per logged HTTP stream, ConnRecords for TCP."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StreamRecord:
    reporter: str  # "source" (outbound, client side) or "destination" (inbound)
    destination_service: str
    response_code: int  # 0: no response was sent (the client went away)
    response_flags: str  # Envoy flags ("UF", "NR", ...) or "-"
    duration_ms: float
    request_bytes: int
    response_bytes: int
    method: str = ""
    path: str = ""
    authority: str = ""
    route_name: str = ""
    cluster: str = ""
    upstream_host: str = ""
    start_time: float = 0.0
    request_protocol: str = "HTTP/1.1"  # %PROTOCOL% in the access log ("" for TCP)
    # What the access log's command operators read (observe/logformat.py).
    request_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    response_code_details: str = ""  # via_upstream, route_not_found, ...
    connection_termination_details: str = ""
    upstream_transport_failure_reason: str = ""
    upstream_local_address: str = ""
    downstream_local_address: str = ""
    downstream_remote_address: str = ""  # ip:port
    downstream_peer_uri_san: str = ""
    requested_server_name: str = ""
    trace_id: str = ""


LogEntry = StreamRecord  # one record type for HTTP streams and TCP connections alike


@dataclass(slots=True)
class ConnRecord:
    reporter: str
    destination_service: str
    cluster: str
    upstream_host: str
    downstream_remote: str
    sent_bytes: int = 0  # to the downstream
    received_bytes: int = 0  # from the downstream
    response_flags: str = "-"
    source_principal: str = ""  # the mTLS peer's SPIFFE principal, if any
    requested_server_name: str = ""  # the ClientHello's SNI, when this proxy terminated TLS
    upstream_local_address: str = ""  # this proxy's end of the upstream connection
    upstream_principal: str = ""  # the upstream's verified SPIFFE ID (ISTIO_MUTUAL)
    peer_metadata: bytes | None = None  # the peer's exchanged facts (base64 Struct)
