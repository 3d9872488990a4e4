"""A programmable upstream HTTP/1.1 server on a real loopback socket, in its own thread.

Paths choose behaviours: `/hang` never answers, `/reset` aborts the connection, `/malformed`
answers garbage, `/big?n=BYTES` streams a chunked body, `/slow?ms=N` waits, POST `/upload`
answers the size and SHA-256 of the body, `/close` answers with Connection: close. Anything
else answers JSON describing the request, so tests can see what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    connection: int


@dataclass
class UpstreamState:
    name: str
    connections: int = 0
    requests: list[Seen] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # paths whose whole message arrived
    idle_close_after: float | None = None  # close idle keep-alive connections after this
    failures: dict[str, int] = field(default_factory=dict)  # /fail: answers so far, per key
    always: int | None = None  # answer every request with this status (a broken endpoint)
    delay: float = 0.0  # wait this long before answering anything (a slow endpoint)
    closed: int = 0  # connections that ended (closed or reset by the proxy or by us)
    closed_ids: set[int] = field(default_factory=set)  # which ones (Seen.connection)


class _Conn(asyncio.Protocol):
    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.state = server.state
        self.state.connections += 1
        self.id = self.state.connections
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
        self.transport: asyncio.Transport | None = None
        self.req: h11.Request | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.closed += 1
        self.state.closed_ids.add(self.id)

    def data_received(self, data: bytes) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        try:
            self.h11.receive_data(data)
            self._events()
        except h11.ProtocolError:
            assert self.transport is not None
            self.transport.close()

    def _events(self) -> None:
        while True:
            ev = self.h11.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                self.req = ev
                self.hasher = hashlib.sha256()
                self.size = 0
                headers = {k.decode(): v.decode() for k, v in ev.headers}
                self.state.requests.append(
                    Seen(ev.method.decode(), ev.target.decode(), headers, self.id)
                )
            elif isinstance(ev, h11.Data):
                self.hasher.update(ev.data)
                self.size += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                assert self.req is not None
                self.state.completed.append(self.req.target.decode())
                asyncio.get_running_loop().create_task(self._respond())
                return

    async def _respond(self) -> None:
        req = self.req
        assert req is not None and self.transport is not None
        url = urlsplit(req.target.decode())
        query = parse_qs(url.query)
        path = url.path
        t = self.transport
        if path == "/hang":
            return
        if self.state.delay:
            await asyncio.sleep(self.state.delay)
        if self.state.always is not None:
            self._send(self.state.always, b'{"broken": true}', False)
            return
        if path == "/fail":
            # /fail?code=503&times=N&key=K: `code` (or `reset`) for the first N requests of
            # key K, then 200.
            key = query.get("key", ["k"])[0]
            seen = self.state.failures.get(key, 0)
            self.state.failures[key] = seen + 1
            if seen < int(query.get("times", ["1"])[0]):
                if query.get("code") == ["reset"]:  # the body was read; the answer is a reset
                    t.abort()
                    return
                code = int(query.get("code", ["503"])[0])
                # &header=NAME marks the failing answers with NAME: 1 (retriable-headers)
                extra = [(query["header"][0], "1")] if "header" in query else None
                self._send(code, b'{"failed": true}', False, extra)
                return
        if path == "/reset":
            t.abort()
            return
        if path == "/malformed":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nxx")
            return
        if path == "/interim":
            # Raw 1xx responses before the final one (h11 would not send this many).
            n = int(query.get("n", ["1"])[0])
            t.write(
                b"HTTP/1.1 100 Continue\r\n\r\n" * n
                + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
            t.close()
            return
        if path == "/slow":
            await asyncio.sleep(int(query.get("ms", ["500"])[0]) / 1000)
        if path == "/big":
            await self._stream(int(query["n"][0]))
            return
        close = path == "/close"
        if req.method == b"POST" and path == "/upload":
            body = json.dumps({"size": self.size, "sha256": self.hasher.hexdigest()}).encode()
        else:
            body = json.dumps(
                {
                    "name": self.state.name,
                    "method": req.method.decode(),
                    "path": req.target.decode(),
                    "connection": self.id,
                    "headers": {k.decode(): v.decode() for k, v in req.headers},
                    "peer": self._address("peername"),
                    "local": self._address("sockname"),
                }
            ).encode()
        self._send(200, body, close)

    def _address(self, which: str) -> str:
        addr = self.transport.get_extra_info(which) if self.transport is not None else None
        return f"{addr[0]}:{addr[1]}" if addr else ""

    def _send(
        self, status: int, body: bytes, close: bool, extra: list[tuple[str, str]] | None = None
    ) -> None:
        assert self.transport is not None
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-upstream", self.state.name),
            *(extra or []),
        ]
        if close:
            headers.append(("connection", "close"))
        out = self.h11.send(h11.Response(status_code=status, headers=headers)) or b""
        if self.req is None or self.req.method != b"HEAD":  # a HEAD answer has no body
            out += self.h11.send(h11.Data(data=body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        self.transport.write(out)
        self._next()

    async def _stream(self, n: int) -> None:
        assert self.transport is not None
        t = self.transport
        t.write(
            self.h11.send(
                h11.Response(
                    status_code=200,
                    headers=[("content-length", str(n)), ("x-upstream", self.state.name)],
                )
            )
            or b""
        )
        block = b"x" * 65536
        sent = 0
        while sent < n and not t.is_closing():
            chunk = block[: min(len(block), n - sent)]
            t.write(self.h11.send(h11.Data(data=chunk)) or b"")
            sent += len(chunk)
            while t.get_write_buffer_size() > 256 * 1024 and not t.is_closing():
                await asyncio.sleep(0.001)  # a well-behaved server: bounded buffering
        if not t.is_closing():
            t.write(self.h11.send(h11.EndOfMessage()) or b"")
            self._next()

    def _next(self) -> None:
        assert self.transport is not None
        if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE:
            self.transport.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.transport.close()
            return
        after = self.state.idle_close_after
        if after is not None:
            self.idle = asyncio.get_running_loop().call_later(after, self.transport.close)
        if self.h11.trailing_data[0]:
            self._events()


class UpstreamServer:
    """Runs the server loop in a daemon thread; `port` is bound before start() returns."""

    def __init__(self, name: str, port: int = 0, host: str = "127.0.0.1") -> None:
        self.state = UpstreamState(name)
        self._host = host
        self._port = port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Any = None

    def start(self) -> UpstreamServer:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._server = await self._loop.create_server(lambda: _Conn(self), self._host, self._port)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop() -> None:
            self._server.close()
            # Answers still pending (/slow, /big) end here, not as "Task was destroyed"
            # warnings when the loop is collected.
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
