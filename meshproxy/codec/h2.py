"""HTTP/2 on the h2 library: connection settings, head mapping to our events, abuse accounting.

The h2 state machine is already sans-IO; this module adds what it leaves to its user: the
settings a proxy advertises, the mapping between HTTP/2 header blocks and our RequestHead /
ResponseHead (the same events the HTTP/1 codecs produce, so one stream model serves both),
and the per-connection budgets against frame floods that h2 does not enforce itself.
"""

from __future__ import annotations

import time

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from meshproxy.codec.events import Headers, RequestHead, ResponseHead
from meshproxy.codec.h1_limits import valid_authority
from meshproxy.errors import ProtocolError, ProtocolSide

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_CONCURRENT_STREAMS = 100  # Envoy's and nginx's edge default
STREAM_WINDOW = 256 * 1024  # per-stream receive window: what one paused stream may hold
CONNECTION_WINDOW = 16 * 1024 * 1024  # larger than all stream windows: a paused stream
# must never hold the connection window shut for its siblings
MAX_HEADER_LIST_SIZE = 60 * 1024  # as the HTTP/1 limit: past it a request gets 431
# Where the HPACK decoder itself stops (DenialOfServiceError, the connection ends): a peer
# that ignores our SETTINGS by this much is decompressing a bomb at us (catalog D04).
DECODER_HEADER_LIST_LIMIT = 4 * MAX_HEADER_LIST_SIZE
MAX_HEADERS = 100

# Connection-specific fields (RFC 9113 §8.2.2): never sent on an HTTP/2 hop.
CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"http2-settings",
    }
)


class _Connection(H2Connection):
    """h2's connection, remembering how the last CLOSED_STREAMS_KEPT closed streams ended
    (not h2's 65,536). The record only decides how a late frame on a closed stream is
    answered, and late frames come right after the close; at 65,536 entries a long-lived
    connection (a pooled upstream, a gRPC client) held megabytes of it, the bulk of what
    a ten-minute soak's sidecars grew by in Python objects."""

    MAX_CLOSED_STREAMS = 4096


CLOSED_STREAMS_KEPT = _Connection.MAX_CLOSED_STREAMS


def new_connection(client_side: bool, *, enable_connect: bool = False) -> H2Connection:
    """An h2 connection with a proxy's settings, its preface queued in data_to_send()."""
    config = H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,  # joins cookie crumbs (RFC 9113 §8.2.3)
        validate_outbound_headers=False,  # what we send is built by us from checked input
        normalize_outbound_headers=False,
    )
    conn = _Connection(config=config)
    settings = {
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
    }
    if not client_side:
        settings[SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
        if enable_connect:
            settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1
    else:
        settings[SettingCodes.ENABLE_PUSH] = 0
    # Replacing the Settings before the preface makes them current at once (hypercorn does
    # the same); the peer learns them from the preface's SETTINGS frame.
    conn.local_settings = Settings(client=client_side, initial_values=settings)
    conn.decoder.max_header_list_size = DECODER_HEADER_LIST_LIMIT
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    return conn


def keep_open_after_goaway(conn: H2Connection) -> None:
    """Undo h2's all-or-nothing GOAWAY: RFC 9113 §6.8 lets streams up to last_stream_id
    finish, but h2 moves the whole connection to CLOSED (no more frames either way). Callers
    must not open new streams themselves once a GOAWAY went either way."""
    if conn.state_machine.state is ConnectionState.CLOSED:
        conn.state_machine.state = (
            ConnectionState.CLIENT_OPEN if conn.config.client_side else ConnectionState.SERVER_OPEN
        )


def goaway_frame(last_stream_id: int, error_code: int = 0) -> bytes:
    """A GOAWAY to write directly (h2's close_connection would stop every open stream too)."""
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = error_code
    return frame.serialize()


def count_frames(data: bytes) -> int:
    """Frames in serialized output (h2 always hands out whole frames)."""
    count = offset = 0
    end = len(data)
    while offset + 9 <= end:
        offset += 9 + int.from_bytes(data[offset : offset + 3], "big")
        count += 1
    return count


def request_head(headers: Headers, stream_id: int, end_stream: bool) -> RequestHead:
    """Our RequestHead from a request header block h2 has already validated.

    `:authority` becomes the `host` field, first, as an HTTP/1.1 hop needs it; a `host` that
    disagrees with `:authority` is refused (RFC 9113 §8.3.1: they name the same thing).
    """
    method = path = authority = protocol = b""
    host: bytes | None = None
    out: Headers = []
    content_length: int | None = None
    size = 0  # as an HTTP/1.1 head would count it, after h2 joined the cookie crumbs (C06)
    for k, v in headers:
        size += len(k) + len(v) + 4
        if k[:1] == b":":
            if k == b":method":
                method = v
            elif k == b":path":
                path = v
            elif k == b":authority":
                authority = v
            elif k == b":protocol":
                protocol = v
            continue
        if k == b"host":
            if host is not None and host != v:
                raise ProtocolError("conflicting host headers", ProtocolSide.DOWNSTREAM)
            host = v
            continue
        if k == b"content-length":
            if content_length is not None or not v.isdigit() or len(v) > 18:
                raise ProtocolError("invalid content-length", ProtocolSide.DOWNSTREAM)
            content_length = int(v)
        out.append((k, v))
    if len(out) > MAX_HEADERS:
        raise ProtocolError("too many headers", ProtocolSide.DOWNSTREAM, status=431)
    if size > MAX_HEADER_LIST_SIZE:
        raise ProtocolError("request headers too large", ProtocolSide.DOWNSTREAM, status=431)
    if authority and host is not None and host != authority:
        raise ProtocolError(":authority and host disagree", ProtocolSide.DOWNSTREAM)
    authority = authority or host or b""
    if not authority:
        raise ProtocolError("missing :authority", ProtocolSide.DOWNSTREAM)
    if not valid_authority(authority):
        raise ProtocolError("malformed :authority", ProtocolSide.DOWNSTREAM)
    upgrade = False
    if protocol:
        # RFC 8441 extended CONNECT: carried to an HTTP/1.1 upstream as an Upgrade request.
        if protocol.lower() != b"websocket":
            raise ProtocolError("unsupported :protocol", ProtocolSide.DOWNSTREAM, status=501)
        method = b"GET"
        upgrade = True
    elif method == b"CONNECT":
        path = b""
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS") and method != b"CONNECT":
        raise ProtocolError("invalid :path", ProtocolSide.DOWNSTREAM)
    if b"#" in path:
        raise ProtocolError("fragment in :path", ProtocolSide.DOWNSTREAM)
    out.insert(0, (b"host", authority))
    return RequestHead(
        method,
        path,
        out,
        b"2",
        True,
        not end_stream,
        content_length,
        False,
        stream_id,
        authority,
        upgrade,
    )


def request_block(head: RequestHead, scheme: bytes, grpc: bool) -> Headers:
    """The HTTP/2 header block for `head` (whose `host` field becomes `:authority`).

    `te: trailers` is the one TE value HTTP/2 allows and only gRPC needs (servers check it).
    """
    authority = head.authority
    out: Headers = [(b":method", head.method), (b":scheme", scheme), (b":path", head.target)]
    rest: Headers = []
    for k, v in head.headers:
        if k == b"host":
            authority = v
        elif k not in CONNECTION_SPECIFIC:
            rest.append((k, v))
    if grpc:
        rest.append((b"te", b"trailers"))
    out.insert(1, (b":authority", authority))
    out.extend(rest)
    return out


def response_block(head: ResponseHead) -> Headers:
    out: Headers = [(b":status", b"%d" % head.status)]
    for item in head.headers:
        if item[0] not in CONNECTION_SPECIFIC:
            out.append(item)
    return out


def response_head(headers: Headers, stream_id: int, end_stream: bool) -> ResponseHead:
    status = 0
    out: Headers = []
    content_length: int | None = None
    for k, v in headers:
        if k == b":status":
            status = int(v)
        elif k[:1] != b":":
            if k == b"content-length" and v.isdigit() and len(v) <= 18:
                content_length = int(v)
            out.append((k, v))
    if len(out) > MAX_HEADERS:
        raise ProtocolError("too many response headers", ProtocolSide.UPSTREAM, status=502)
    return ResponseHead(status, out, b"", True, not end_stream, content_length, stream_id)


def trailer_fields(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k[:1] != b":"]


class FloodGuard:
    """Budgets for the frames a peer can make us answer or track at no cost to itself.

    h2 answers PING and SETTINGS by itself and keeps no count of resets; these limits are the
    CVE classes Envoy guards against: Rapid Reset (CVE-2023-44487), PING/SETTINGS floods
    (CVE-2019-9512/9515), empty frames (CVE-2019-9518), PRIORITY and WINDOW_UPDATE floods
    (CVE-2019-9513, with Envoy's per-stream and per-DATA-frame budgets). `note_*` returns the
    name of the exceeded budget (a metric label), or None.
    """

    __slots__ = (
        "_window_start",
        "data_frames_sent",
        "empty_frames",
        "pings",
        "priorities",
        "resets",
        "settings",
        "streams",
        "window_updates",
    )

    WINDOW = 1.0  # seconds per accounting window
    MAX_PINGS = 100  # per window
    MAX_SETTINGS = 100
    MAX_CONSECUTIVE_EMPTY = 1  # as Envoy's max_consecutive_inbound_frames_with_empty_payload
    MIN_STREAMS_FOR_RESET_CHECK = 100  # Envoy: premature resets judged after this many
    MAX_RESET_FRACTION = 0.5
    PRIORITIES_PER_STREAM = 100  # Envoy's max_inbound_priority_frames_per_stream
    WINDOW_UPDATES_PER_DATA_FRAME = 10  # Envoy's ..._window_update_frames_per_data_frame_sent

    def __init__(self) -> None:
        self._window_start = time.monotonic()
        self.pings = 0
        self.settings = 0
        self.empty_frames = 0
        self.resets = 0  # streams the peer reset before their response was complete
        self.streams = 0  # streams the peer opened
        self.priorities = 0  # PRIORITY frames (and priority blocks in HEADERS) received
        self.window_updates = 0
        self.data_frames_sent = 0

    def _roll(self) -> None:
        now = time.monotonic()
        if now - self._window_start > self.WINDOW:
            self._window_start = now
            self.pings = self.settings = 0

    def note_ping(self) -> str | None:
        self._roll()
        self.pings += 1
        return "ping_flood" if self.pings > self.MAX_PINGS else None

    def note_settings(self) -> str | None:
        self._roll()
        self.settings += 1
        return "settings_flood" if self.settings > self.MAX_SETTINGS else None

    def note_data(self, length: int, end_stream: bool) -> str | None:
        if length or end_stream:
            self.empty_frames = 0
            return None
        self.empty_frames += 1
        return "empty_frame_flood" if self.empty_frames > self.MAX_CONSECUTIVE_EMPTY else None

    def note_stream(self) -> None:
        self.streams += 1

    def note_priority(self) -> str | None:
        self.priorities += 1
        if self.priorities > self.PRIORITIES_PER_STREAM * (1 + self.streams):
            return "priority_flood"
        return None

    def note_window_update(self) -> str | None:
        """A peer acknowledges what we sent; far more updates than DATA frames is a flood."""
        self.window_updates += 1
        budget = 5 + 2 * (self.streams + self.WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames_sent)
        return "window_update_flood" if self.window_updates > budget else None

    def note_premature_reset(self) -> str | None:
        self.resets += 1
        if (
            self.streams >= self.MIN_STREAMS_FOR_RESET_CHECK
            and self.resets > self.streams * self.MAX_RESET_FRACTION
        ):
            return "premature_reset"
        return None


class OutboundData:
    """One stream's DATA waiting for the peer's flow-control window, then its end.

    `push` sends what the window allows (h2 refuses more); the end (END_STREAM, with trailers
    when there are some) goes once everything before it is out. `backpressure` says when the
    amount waiting crosses the high or low mark, so the producer can be paused or resumed.
    """

    __slots__ = ("blocked", "end", "ended", "high", "low", "pending", "size")

    def __init__(self, high: int, low: int) -> None:
        self.pending: list[bytes] = []
        self.size = 0
        self.end: Headers | None = None  # trailers ([] for none) once the message ended
        self.ended = False  # END_STREAM sent
        self.blocked = False
        self.high = high
        self.low = low

    def add(self, data: bytes) -> None:
        self.pending.append(data)
        self.size += len(data)

    def discard(self) -> None:
        self.pending.clear()
        self.size = 0

    def push(self, conn: H2Connection, stream_id: int) -> int:
        """Send what the window allows; the number of DATA frames sent."""
        frames = 0
        pending = self.pending
        while pending:
            window = conn.local_flow_control_window(stream_id)
            if window <= 0:
                break
            chunk = pending[0]
            size = min(window, conn.max_outbound_frame_size)
            if len(chunk) <= size:
                pending.pop(0)
            else:
                pending[0] = chunk[size:]
                chunk = chunk[:size]
            self.size -= len(chunk)
            conn.send_data(stream_id, chunk)
            frames += 1
        if not pending and self.end is not None and not self.ended:
            if self.end:
                conn.send_headers(stream_id, self.end, end_stream=True)
            else:
                conn.end_stream(stream_id)
            self.ended = True
        return frames

    def backpressure(self) -> bool | None:
        """False when the producer should pause now, True when it may resume, else None."""
        if self.size > self.high and not self.blocked:
            self.blocked = True
            return False
        if self.blocked and self.size < self.low:
            self.blocked = False
            return True
        return None
