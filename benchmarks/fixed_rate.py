"""A fixed-rate HTTP/1.1 load generator (what Istio's benchmark does with fortio -qps):

    python -m benchmarks.fixed_rate HOST PORT HOST_HEADER CONNECTIONS RPS SECONDS PAYLOAD

CONNECTIONS keep-alive connections share RPS between them, each sending a POST with a
PAYLOAD-byte body on its own schedule (every CONNECTIONS/RPS seconds). Latency is measured
from the scheduled send time, so a slow answer that delays the next request is counted
against the proxy rather than hidden (no coordinated omission). Prints one JSON object:
requests, errors, achieved rps, and p50/p90/p99 latency in ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httptools
import uvloop


class _Connection(asyncio.Protocol):
    def __init__(self, request: bytes, interval: float, start: float, end: float) -> None:
        self.request = request
        self.interval = interval
        self.next_at = start
        self.end = end
        self.latencies: list[float] = []
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.scheduled = 0.0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._schedule()

    def _schedule(self) -> None:
        if self.next_at >= self.end:
            if self.transport is not None:
                self.transport.close()
            return
        loop = asyncio.get_running_loop()
        delay = self.next_at - time.monotonic()
        loop.call_later(max(delay, 0.0), self._send)

    def _send(self) -> None:
        self.scheduled = self.next_at
        self.next_at += self.interval
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.errors += 1
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        self.latencies.append(time.monotonic() - self.scheduled)
        status = self.parser.get_status_code()
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            self.errors += 1
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.next_at < self.end:
            self.errors += 1
        if not self.done.done():
            self.done.set_result(None)


async def run(
    host: str, port: int, host_header: str, connections: int, rps: float, seconds: float, size: int
) -> dict[str, object]:
    body = b"x" * size
    request = (
        f"POST /echo HTTP/1.1\r\nHost: {host_header}\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    interval = connections / rps
    start = time.monotonic() + 0.2
    end = start + seconds
    conns = []
    for i in range(connections):
        offset = start + i * interval / connections  # spread the connections' schedules
        _, conn = await loop.create_connection(
            lambda o=offset: _Connection(request, interval, o, end),  # type: ignore[misc]
            host,
            port,
        )
        conns.append(conn)
    for conn in conns:
        try:
            await asyncio.wait_for(asyncio.shield(conn.done), end + 10 - time.monotonic())
        except TimeoutError:
            conn.errors += 1
            if conn.transport is not None:
                conn.transport.abort()
    latencies = sorted(x for c in conns for x in c.latencies)
    statuses: dict[str, int] = {}
    for c in conns:
        for code, n in c.statuses.items():
            statuses[str(code)] = statuses.get(str(code), 0) + n

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0

    return {
        "requests": len(latencies),
        "errors": sum(c.errors for c in conns),
        "rps": len(latencies) / seconds,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "statuses": statuses,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, header, conns, rps, seconds, size = argv
    result = uvloop.run(
        run(host, int(port), header, int(conns), float(rps), float(seconds), int(size))
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
