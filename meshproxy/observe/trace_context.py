"""Trace context per request: W3C and B3 propagation and the sampling decision.

Compiled with the hot path: every request through a tracing sidecar passes here, sampled or
not. Ids are kept as lowercase hex, the form both propagation formats write, so an unsampled
request costs a header parse (when it has trace headers), a random number and a few byte
joins. A sampled one also carries a PendingSpan, which observe/tracing.py turns into an
OpenTelemetry SDK span when it ends.
"""

from __future__ import annotations

import random
from typing import Final

from meshproxy.observe.ids import random_hex

TRACE_HEADERS: Final = frozenset(
    {
        b"traceparent",
        b"tracestate",  # bounded, and kept only beside a valid traceparent
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)
_HEX_DIGITS: Final = b"0123456789abcdef"
_ZERO_HALF: Final = b"0000000000000000"  # the upper half of a 64-bit B3 trace id
_random: Final = random.random


class Incoming:
    """The trace context a request arrived with (ids as lowercase hex)."""

    def __init__(
        self,
        trace_id: bytes,  # 32 digits (a 64-bit B3 id padded with zeros)
        span_id: bytes,  # 16 digits
        sampled: bool | None,  # None: the caller left the decision to us
        form: str,  # "w3c", "b3" (multi), "b3-single"
        tracestate: str = "",
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.form = form
        self.tracestate = tracestate


def _hex_id(value: bytes, short: int, long: int) -> bytes | None:
    """`value` as an id of `long` hex digits (`short` ones padded), None when malformed or
    all zeros (invalid in both formats)."""
    n = len(value)
    if (n != short and n != long) or value.translate(None, _HEX_DIGITS):
        return None
    if not value.strip(b"0"):
        return None
    return value if n == long else b"0" * (long - n) + value


def parse_traceparent(value: bytes) -> Incoming | None:
    """W3C traceparent (version 00 layout; later versions read the same prefix)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) < 4:
        return None
    version, flags = parts[0], parts[3]
    if len(version) != 2 or version == b"ff" or version.translate(None, _HEX_DIGITS):
        return None
    if version == b"00" and len(parts) != 4:
        return None
    trace_id = _hex_id(parts[1], 32, 32)
    span_id = _hex_id(parts[2], 16, 16)
    if trace_id is None or span_id is None or len(flags) != 2 or flags.translate(None, _HEX_DIGITS):
        return None
    return Incoming(trace_id, span_id, bool(int(flags, 16) & 1), "w3c")


def parse_b3_single(value: bytes) -> Incoming | None:
    """`b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]` (a bare decision is no parent)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) < 2:
        return None
    trace_id = _hex_id(parts[0], 16, 32)
    span_id = _hex_id(parts[1], 16, 16)
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return Incoming(trace_id, span_id, sampled, "b3-single")


def _b3_sampled(value: bytes) -> bool | None:
    value = value.strip().lower()
    if value in (b"1", b"true", b"d"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


def parse_b3_multi(fields: dict[bytes, bytes]) -> Incoming | None:
    trace_id = _hex_id(fields.get(b"x-b3-traceid", b"").strip().lower(), 16, 32)
    span_id = _hex_id(fields.get(b"x-b3-spanid", b"").strip().lower(), 16, 16)
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(fields.get(b"x-b3-sampled", b""))
    if fields.get(b"x-b3-flags", b"").strip() == b"1":
        sampled = True  # debug
    return Incoming(trace_id, span_id, sampled, "b3")


def parse_incoming(fields: dict[bytes, bytes]) -> Incoming | None:
    """The context from a request's trace headers: W3C first, then B3 single, then multi."""
    found = None
    if b"traceparent" in fields:
        found = parse_traceparent(fields[b"traceparent"])
    if found is None and b"b3" in fields:
        found = parse_b3_single(fields[b"b3"])
    if found is None and b"x-b3-traceid" in fields:
        found = parse_b3_multi(fields)
    tracestate = fields.get(b"tracestate", b"")
    if found is not None and tracestate and found.form == "w3c":
        found.tracestate = bounded_tracestate(tracestate.decode("latin-1"))
    return found


MAX_TRACESTATE_MEMBERS: Final = 32
MAX_TRACESTATE_CHARS: Final = 512


def bounded_tracestate(value: str) -> str:
    """At most 32 whole list members in at most 512 characters (W3C Trace Context §3.3.1.1):
    past that, members over 128 characters go first, then members from the end; a member
    is never cut, which would forward a corrupt one."""
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m][:MAX_TRACESTATE_MEMBERS]
    if len(",".join(members)) > MAX_TRACESTATE_CHARS:
        members = [m for m in members if len(m) <= 128]
        while len(",".join(members)) > MAX_TRACESTATE_CHARS:
            members.pop()
    return ",".join(members)


class PendingSpan:
    """A sampled span while its request is in flight: its ids (hex), start, and the
    attributes and status it ends with. observe/tracing.py makes it the SDK's ReadableSpan
    when it ends; until then it is a few stores, where the SDK's own Span (a sampler call,
    a lock, a validation per attribute) cost the proxy's loop about 80 µs per sampled
    request."""

    def __init__(
        self,
        name: str,
        client: bool,  # SpanKind CLIENT (outbound, retry attempts), else SERVER (inbound)
        trace_id: bytes,
        span_id: bytes,
        parent_id: bytes,  # b"": a root span
        remote_parent: bool,  # the parent came in a request (not one of this proxy's spans)
        tracestate: str,
        start_ns: int,
    ) -> None:
        self.name = name
        self.client = client
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.remote_parent = remote_parent
        self.tracestate = tracestate
        self.start_ns = start_ns
        self.attributes: dict[str, str | int] = {}
        self.error = False
        self.error_message = ""


class RequestTrace:
    """One request's place in its trace (ids as lowercase hex)."""

    def __init__(
        self,
        trace_id: bytes,  # 32 digits
        span_id: bytes,  # this proxy's span, 16 digits: the upstream's parent
        sampled: bool,
        incoming: Incoming | None,
        span: PendingSpan | None = None,  # for sampled requests whose spans are reported
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.incoming = incoming
        self.span = span
        self.attempt: PendingSpan | None = None  # a retried request's current attempt


class Sampling:
    """A TracingConfig's per-request part: how many requests without a decision to sample,
    and whether sampled ones are reported (disableSpanReporting still propagates)."""

    def __init__(self, percent: float, report: bool) -> None:
        self.threshold = percent / 100.0
        self.report = report


def decide(incoming: Incoming | None, sampling: Sampling) -> RequestTrace | None:
    """The trace of an unsampled request (or one whose spans are not reported), else None:
    a sampled one gets its span from Tracing.begin(), with the name that costs building."""
    sampled = incoming.sampled if incoming is not None else None
    if sampled is None:
        sampled = _random() < sampling.threshold
    if sampled and sampling.report:
        return None
    span_id = random_hex(16)
    if incoming is not None:
        return RequestTrace(incoming.trace_id, span_id, sampled, incoming)
    return RequestTrace(random_hex(32), span_id, sampled, None)


def upstream_headers(trace: RequestTrace) -> list[tuple[bytes, bytes]]:
    """The trace headers for the upstream: traceparent always, B3 as it came in."""
    flag = b"-01" if trace.sampled else b"-00"
    parent = b"".join((b"00-", trace.trace_id, b"-", trace.span_id, flag))
    out = [(b"traceparent", parent)]
    incoming = trace.incoming
    if incoming is None:
        return out
    if incoming.form == "w3c":
        if incoming.tracestate:
            out.append((b"tracestate", incoming.tracestate.encode("latin-1")))
        return out
    trace_id = trace.trace_id
    if trace_id[:16] == _ZERO_HALF:
        trace_id = trace_id[16:]  # a 64-bit trace id stays 64-bit
    sampled = b"1" if trace.sampled else b"0"
    if incoming.form == "b3-single":
        out.append((b"b3", b"-".join((trace_id, trace.span_id, sampled, incoming.span_id))))
    else:
        out.append((b"x-b3-traceid", trace_id))
        out.append((b"x-b3-spanid", trace.span_id))
        out.append((b"x-b3-parentspanid", incoming.span_id))
        out.append((b"x-b3-sampled", sampled))
    return out
