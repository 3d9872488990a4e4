"""A real WebSocket echo server (the `websockets` library) in its own thread.

`/forbidden` is refused with 403 before the handshake completes; every other path echoes
each message back. `paths` records the request paths the server saw.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from tests.support.proxy import free_port


class WsEchoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.paths: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: Any = None

    def start(self) -> WsEchoServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=5)
        return self

    async def _start(self) -> None:
        self._server = await serve(
            self._echo,
            "127.0.0.1",
            self.port,
            process_request=self._check,
            max_size=None,
            compression=None,
        )

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        self.paths.append(request.path)
        if request.path == "/forbidden":
            return connection.respond(403, "no\n")
        return None

    async def _echo(self, ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    def stop(self) -> None:
        async def _close() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
