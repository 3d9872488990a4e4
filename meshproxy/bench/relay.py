"""The bare HTTP/1.1 relay meshproxy's CPU per request is measured against, in the same run.

    python -m meshproxy.bench.relay LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]

A "py httptools L7" relay: uvloop Protocols, httptools (llhttp) parsing both ways,
hand-written serialization, one keep-alive upstream connection per downstream connection,
hop-by-hop headers stripped, bodies re-framed, reads paused while a request waits. No
routing, no load balancing, no metrics, no limits: the floor a Python proxy of this design
stands on, so meshproxy's cost is read as a multiple of it.
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade"}
)  # fmt: skip


def head_lines(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """The forwarded header block, and whether it carries its own Content-Length."""
    out = []
    sized = False
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            continue
        sized = sized or lower == b"content-length"
        out.append(b"%s: %s\r\n" % (name, value))
    return b"".join(out), sized


class Upstream(asyncio.Protocol):
    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"".join(self.pending))  # type: ignore[attr-defined]
        self.pending.clear()

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.down.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()

    def on_message_begin(self) -> None:
        self.headers = []

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        block, sized = head_lines(self.headers)
        self.chunked = not sized
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else b""
        self.down.write(
            b"HTTP/1.1 %d %s\r\n%s%s\r\n"
            % (self.parser.get_status_code(), self.reason, block, framing)
        )

    def on_body(self, body: bytes) -> None:
        self.down.write(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked:
            self.down.write(b"0\r\n\r\n")
        self.down.response_done()


class Downstream(asyncio.Protocol):
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.upstream_host = upstream_host
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.connecting: asyncio.Task[object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def response_done(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        block, sized = head_lines(self.headers)
        self.chunked = not sized and self.parser.get_method() not in (b"GET", b"HEAD")
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else b""
        head = b"%s %s HTTP/1.1\r\n%s%s\r\n" % (self.parser.get_method(), self.url, block, framing)
        if self.upstream is None:
            self.upstream = Upstream(self)
            loop = asyncio.get_running_loop()
            upstream = self.upstream
            connect = loop.create_connection(
                lambda: upstream, self.upstream_host, self.upstream_port
            )
            # held: the loop keeps only a weak reference to a task
            self.connecting = loop.create_task(connect)
        self.upstream.send(head)

    def on_body(self, body: bytes) -> None:
        if self.upstream is not None:
            self.upstream.send(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self) -> None:
        if self.chunked and self.upstream is not None:
            self.upstream.send(b"0\r\n\r\n")
        if self.transport is not None:
            self.transport.pause_reading()  # one request at a time, as a keep-alive relay does


async def serve(listen_port: int, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Downstream(upstream_port, upstream_host), "127.0.0.1", listen_port
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not all(a.isdigit() for a in argv[:2]):
        print(
            "usage: python -m meshproxy.bench.relay LISTEN_PORT UPSTREAM_PORT [UPSTREAM_HOST]",
            file=sys.stderr,
        )
        return 2
    uvloop.run(serve(int(argv[0]), int(argv[1]), *argv[2:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
