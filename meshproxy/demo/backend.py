"""A tiny HTTP/1.1 backend for the demo and the tests: answers with its name, echoes bodies."""

from __future__ import annotations

import asyncio
from typing import cast

import h11


class Backend(asyncio.Protocol):
    """Replies `<name> <method> <path>` (or echoes a POST body) with keep-alive."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.body = b""
        self.request: h11.Request | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            self._drain()
        except h11.ProtocolError:
            if self.transport is not None:
                self.transport.close()

    def _drain(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                self.request = ev
                self.body = b""
            elif isinstance(ev, h11.Data):
                self.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self._reply()
                if self.conn.our_state is h11.MUST_CLOSE:
                    assert self.transport is not None
                    self.transport.close()
                    return
                self.conn.start_next_cycle()

    def _reply(self) -> None:
        req = self.request
        assert req is not None and self.transport is not None
        if req.method == b"POST":
            body = self.body
        else:
            body = f"{self.name} {req.method.decode()} {req.target.decode()}\n".encode()
        headers = [("content-length", str(len(body))), ("x-backend", self.name)]
        out = self.conn.send(h11.Response(status_code=200, headers=headers)) or b""
        out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        self.transport.write(out)


async def start_backend(name: str, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Backend(name), host, port, reuse_address=True)
