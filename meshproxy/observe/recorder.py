"""What the data plane reports: a StreamRecord per logged HTTP stream, ConnRecords for TCP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class StreamRecord:
    """One logged HTTP stream or TCP connection: what access-log operators and CEL read.

    A plain class rather than a dataclass: compiled, its __init__ is a run of native stores
    (the dataclass decorator's generated __init__ cost a microsecond per logged request)."""

    def __init__(
        self,
        reporter: str,  # "source" (outbound, client side) or "destination" (inbound)
        destination_service: str,
        response_code: int,  # 0: no response was sent (the client went away)
        response_flags: str,  # Envoy flags ("UF", "NR", ...) or "-"
        duration_ms: float,
        request_bytes: int,
        response_bytes: int,
    ) -> None:
        self.reporter = reporter
        self.destination_service = destination_service
        self.response_code = response_code
        self.response_flags = response_flags
        self.duration_ms = duration_ms
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self.method = ""
        self.path = ""
        self.authority = ""
        self.route_name = ""
        self.cluster = ""
        self.upstream_host = ""
        self.start_time = 0.0
        self.request_protocol = "HTTP/1.1"  # %PROTOCOL% in the access log ("" for TCP)
        self.request_headers: list[tuple[bytes, bytes]] = _NO_HEADERS
        self.response_headers: list[tuple[bytes, bytes]] = _NO_HEADERS
        self.response_code_details = ""  # via_upstream, route_not_found, ...
        self.connection_termination_details = ""
        self.upstream_transport_failure_reason = ""
        self.upstream_local_address = ""
        self.downstream_local_address = ""
        self.downstream_remote_address = ""  # ip:port
        self.downstream_peer_uri_san = ""
        self.requested_server_name = ""
        self.trace_id = ""
        self.request_id = b""  # the x-request-id given to a request that came without one

    def __repr__(self) -> str:
        return f"StreamRecord({self.reporter}, {self.destination_service}, {self.response_code})"


_NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []  # shared, never appended to: records replace it


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
