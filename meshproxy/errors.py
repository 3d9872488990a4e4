"""The error taxonomy: every error carries the decision the caller has to make."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class MeshproxyError(Exception):
    """Base of every error meshproxy raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in the configuration, located as precisely as we can."""

    file: str
    line: int | None
    document: int | None
    resource: str | None  # "VirtualService reviews"
    field: str | None  # "spec.http[0].route[1].destination.subset"
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.document is not None:
            parts.append(f"document {self.document}")
        head = " ".join(parts)
        subject = ""
        if self.resource:
            subject = self.resource
            if self.field:
                subject += f": {self.field}"
        elif self.field:
            subject = self.field
        return f"{head}: {subject}: {self.message}" if subject else f"{head}: {self.message}"


class ConfigError(MeshproxyError):
    """The configuration is invalid; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue], withheld: int = 0) -> None:
        self.issues = issues
        # Cross-reference checks not reported because resources failed to read: most would
        # be knock-on effects of the issues above (a mistyped kind leaves every reference to
        # what it declared dangling), so they wait until these are fixed.
        self.withheld = withheld
        super().__init__("\n".join(str(i) for i in issues))


class ProtocolSide(enum.Enum):
    DOWNSTREAM = "downstream"
    UPSTREAM = "upstream"


class ProtocolError(MeshproxyError):
    """A peer broke HTTP framing or syntax; `status` is what to answer (downstream side)."""

    def __init__(self, message: str, side: ProtocolSide, status: int = 400) -> None:
        super().__init__(message)
        self.side = side
        self.status = status


class FailureKind(enum.Enum):
    CONNECT_REFUSED = "connect refused"
    CONNECT_TIMEOUT = "connect timeout"
    RESET = "connection reset"
    PROTOCOL = "protocol error"
    TIMEOUT = "timeout"
    OVERFLOW = "overflow"
    TLS = "tls error"
    NO_HEALTHY = "no healthy upstream"


# The failures before a connection existed: Envoy's connect-failure (retries, local replies).
CONNECT_FAILURES: Final = frozenset(
    {FailureKind.CONNECT_REFUSED, FailureKind.CONNECT_TIMEOUT, FailureKind.TLS}
)


class UpstreamError(MeshproxyError):
    """One attempt at an upstream failed; says whether a retry is safe and the Envoy flag."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        flag: str,
        reused_connection: bool = False,
        response_started: bool = False,
        request_bytes_sent: bool = True,
        unprocessed: bool = False,
    ) -> None:
        super().__init__(message)
        # The upstream says it did not act on the request (HTTP/2 REFUSED_STREAM, or GOAWAY
        # below its stream id): safe to send again whatever the method.
        self.unprocessed = unprocessed
        self.kind = kind
        self.flag = flag
        self.reused_connection = reused_connection
        self.response_started = response_started
        self.request_bytes_sent = request_bytes_sent
