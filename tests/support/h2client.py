"""A blocking HTTP/2 (h2c prior knowledge) test client that can also misbehave on purpose."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class H2Response:
    stream_id: int
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code
    ended: bool = False

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def json(self) -> dict[str, object]:
        import json

        return json.loads(self.body)  # type: ignore[no-any-return]


class H2Client:
    def __init__(
        self,
        port: int,
        *,
        authority: str = "hello.test",
        stream_window: int = 65535,
        connection_window: int = 16 * 1024 * 1024,
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.authority = authority
        self.timeout = timeout
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,  # send what a test says, however wrong
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window},
        )
        self.h2.initiate_connection()
        if connection_window > 65535:
            self.h2.increment_flow_control_window(connection_window - 65535)
        self.responses: dict[int, H2Response] = {}
        self.no_ack: set[int] = set()  # streams whose DATA we deliberately leave unacknowledged
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        sid = self.h2.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
        ]
        fields += [(k.encode(), v.encode()) for k, v in headers or []]
        self.h2.send_headers(sid, fields, end_stream=end and not body)
        self.responses[sid] = H2Response(sid)
        self.flush()
        if body:
            self.send_body(sid, body, end)
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        """Send as the proxy's flow-control windows allow, reading its WINDOW_UPDATEs."""
        deadline = time.monotonic() + self.timeout
        while body and time.monotonic() < deadline:
            size = min(
                len(body), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size
            )
            if size <= 0:
                if not self.pump(time.monotonic() + 0.2):
                    raise ConnectionError("closed while sending a body")
                continue
            self.h2.send_data(sid, body[:size], end_stream=end and size == len(body))
            body = body[size:]
            self.flush()
        if body:
            raise TimeoutError("the proxy never opened its window")

    def reset(self, sid: int, code: int = 8) -> None:
        self.h2.reset_stream(sid, code)
        self.flush()

    def pump(self, until: float | None = None) -> bool:
        """Read once; False when the connection ended."""
        self.sock.settimeout(
            max(0.05, (until or time.monotonic() + self.timeout) - time.monotonic())
        )
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return True
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.h2.receive_data(data):
            sid = getattr(ev, "stream_id", 0)
            r = self.responses.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                hdrs = {k.decode(): v.decode() for k, v in ev.headers}
                r.status = int(hdrs.pop(":status"))
                r.headers = hdrs
            elif isinstance(ev, h2.events.DataReceived):
                if r is not None:
                    r.body += ev.data
                if sid not in self.no_ack:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset = int(ev.error_code)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
                # Let streams below last_stream_id finish (h2 would stop everything).
                self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        self.flush()
        return True

    def wait(self, *sids: int, timeout: float | None = None) -> list[H2Response]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            if all(self.responses[s].done for s in sids):
                break
            if not self.pump(deadline):
                break
        return [self.responses[s] for s in sids]

    def get(self, path: str, **kw: object) -> H2Response:
        sid = self.request(path, **kw)  # type: ignore[arg-type]
        return self.wait(sid)[0]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pump(deadline):
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
