"""A programmable HTTP/2 (h2c prior knowledge) upstream on the h2 library, in its own thread.

Paths: any path answers JSON describing the request (method, path, headers, body size,
the connection number and the stream id); `/slow?ms=N` waits before answering; `/reset`
answers RST_STREAM; `/refuse` answers RST_STREAM(REFUSED_STREAM) and `/goaway` sends GOAWAY
with last_stream_id below this stream (each once, then they answer normally); `/big?n=N`
streams N bytes honouring flow control; `/trailers` ends with trailers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from tests.support.proxy import free_port


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self.server = server
        server.connections += 1
        self.number = server.connections
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, object]] = {}
        self.flow: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server.max_streams:
            self.h2.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_streams
                },
            )
        self.h2.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception as exc:
            self.server.errors.append(repr(exc))
            if self.transport is not None:
                self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                headers = dict((k.decode(), v.decode()) for k, v in ev.headers)
                self.requests[ev.stream_id] = {"headers": headers, "body": 0}
                self.server.seen.append(headers)
            elif isinstance(ev, h2.events.DataReceived):
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    req["body"] = int(req["body"]) + len(ev.data)  # type: ignore[call-overload]
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    self.tasks.add(asyncio.ensure_future(self._respond(ev.stream_id, req)))
            elif isinstance(ev, h2.events.StreamReset):
                self.server.resets_received += 1
                self.requests.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.WindowUpdated):
                for event in self.flow.values():
                    event.set()
        self._flush()

    async def _respond(self, sid: int, req: dict[str, object]) -> None:
        headers = req["headers"]
        assert isinstance(headers, dict)
        url = urlsplit(headers[":path"])
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path == "/slow":
            await asyncio.sleep(int(query.get("ms", "1000")) / 1000)
        if sid not in self.requests:
            return  # reset by the client meanwhile
        if path == "/reset":
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self._flush()
            return
        if path == "/refuse" and not self.server.refused:
            self.server.refused = True
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self._flush()
            return
        if path == "/goaway" and not self.server.went_away:
            self.server.went_away = True
            self.h2.close_connection(last_stream_id=max(sid - 2, 0))
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        if path == "/big":
            await self._send_big(sid, int(query.get("n", "1000000")))
            return
        body = json.dumps(
            {
                "name": self.server.name,
                "connection": self.number,
                "stream": sid,
                "headers": {k: v for k, v in headers.items()},
                "body": req["body"],
            }
        ).encode()
        self.h2.send_headers(
            sid,
            [
                (b":status", b"200"),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"x-upstream", self.server.name.encode()),
            ],
        )
        trailers = path == "/trailers"
        self.h2.send_data(sid, body, end_stream=not trailers)
        if trailers:
            self.h2.send_headers(sid, [(b"x-trailer", b"done")], end_stream=True)
        self.requests.pop(sid, None)
        self._flush()

    async def _send_big(self, sid: int, n: int) -> None:
        self.h2.send_headers(sid, [(b":status", b"200")])
        self._flush()
        chunk = b"x" * 16384
        while n > 0:
            if sid not in self.requests:
                return
            window = self.h2.local_flow_control_window(sid)
            if window <= 0:
                event = self.flow.setdefault(sid, asyncio.Event())
                event.clear()
                await event.wait()
                continue
            size = min(window, n, len(chunk))
            self.h2.send_data(sid, chunk[:size])
            n -= size
            self._flush()
            await asyncio.sleep(0)
        self.h2.end_stream(sid)
        self.requests.pop(sid, None)
        self.flow.pop(sid, None)
        self._flush()


class H2Server:
    """Start with `.start()`; `port`, `seen` (request headers), `connections`."""

    def __init__(self, name: str, max_streams: int = 0) -> None:
        self.name = name
        self.max_streams = max_streams
        self.port = free_port()
        self.seen: list[dict[str, str]] = []
        self.connections = 0
        self.resets_received = 0
        self.errors: list[str] = []  # protocol errors the server saw from the proxy
        self.refused = False  # /refuse and /goaway misbehave once, then answer normally
        self.went_away = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> H2Server:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        fut.result(timeout=5)
        return self

    async def _serve(self) -> None:
        self._server = await self._loop.create_server(lambda: _Conn(self), "127.0.0.1", self.port)

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
