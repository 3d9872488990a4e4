"""What the data plane reports: a StreamRecord per logged HTTP stream, ConnRecords for TCP."""

from __future__ import annotations

from dataclasses import dataclass


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
    request_id: str = ""
    user_agent: str = ""
    x_forwarded_for: str = ""
    downstream_remote: str = ""
    start_time: float = 0.0
    request_protocol: str = "HTTP/1.1"  # %PROTOCOL% in the access log


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
