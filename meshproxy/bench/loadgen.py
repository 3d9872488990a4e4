"""Load generators for `meshproxy bench`: wrk when installed, else a built-in uvloop client.

Both are closed-loop HTTP/1.1 keep-alive clients (each connection sends its next request when
the last answer arrived), report the same figures, and run as processes of their own so their
CPU is not the harness's. The built-in one reaches roughly half of what wrk does on one core,
so a fast target (nginx) may be measured below its capacity with it; the table says which
generator ran.

    python -m meshproxy.bench.loadgen HOST PORT HOST_HEADER PATH CONNECTIONS SECONDS
prints one JSON object: requests, seconds, rps, p50_ms, p99_ms, errors.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httptools


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and connection failures


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    host_header: str
    path: str = "/"


def available_generator(choice: str) -> str:
    """ "wrk" or "builtin" for `--generator auto|wrk|builtin` (ValueError if wrk is missing)."""
    if choice == "builtin":
        return "builtin"
    if shutil.which("wrk") is not None:
        return "wrk"
    if choice == "wrk":
        raise ValueError("wrk is not installed (Debian: apt-get install wrk)")
    return "builtin"


def run_load(
    generator: str,
    target: Target,
    connections: int,
    seconds: int,
    preexec: Callable[[], None] | None = None,
    pause_ms: int = 0,
) -> LoadResult:
    """`pause_ms` (wrk only): each connection waits that long before each request, so the
    target runs below its capacity (50 connections pausing 5 ms: about 8,000 req/s)."""
    if generator == "wrk":
        return _run_wrk(target, connections, seconds, preexec, pause_ms)
    if pause_ms:
        raise ValueError("pausing between requests needs wrk")
    cmd = [
        sys.executable,
        "-m",
        "meshproxy.bench.loadgen",
        target.host,
        str(target.port),
        target.host_header,
        target.path,
        str(connections),
        str(seconds),
    ]
    return LoadResult(**json.loads(_output(cmd, seconds, preexec)))


def _run_wrk(
    target: Target,
    connections: int,
    seconds: int,
    preexec: Callable[[], None] | None,
    pause_ms: int = 0,
) -> LoadResult:
    url = f"http://{target.host}:{target.port}{target.path}"
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    cmd += ["-H", f"Host: {target.host_header}", url]
    if not pause_ms:
        return parse_wrk(_output(cmd, seconds, preexec), seconds)
    with tempfile.TemporaryDirectory(prefix="meshproxy-wrk-") as tmp:
        script = Path(tmp) / "pause.lua"
        script.write_text(f"function delay()\n  return {int(pause_ms)}\nend\n")
        cmd[1:1] = ["-s", str(script)]  # wrk's delay(): milliseconds before each request
        return parse_wrk(_output(cmd, seconds, preexec), seconds)


def _output(cmd: list[str], seconds: int, preexec: Callable[[], None] | None) -> str:
    """A generator's report (its standard output); CalledProcessError when it failed."""
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=True, preexec_fn=preexec
    ).stdout


def parse_wrk(out: str, seconds: float) -> LoadResult:
    """wrk's report as a LoadResult (ValueError when it is not one)."""

    def number(pattern: str) -> str:
        m = re.search(pattern, out)
        if m is None:
            raise ValueError(f"unexpected wrk output:\n{out}")
        return m.group(1)

    def percentile(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)\b", out)
        if m is None:
            raise ValueError(f"no {label}th percentile in wrk output:\n{out}")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return LoadResult(
        requests=int(number(r"(\d+) requests in")),
        seconds=float(seconds),
        rps=float(number(r"Requests/sec:\s+([\d.]+)")),
        p50_ms=percentile("50"),
        p99_ms=percentile("99"),
        errors=errors,
    )


# -- the built-in client -------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection sending a request each time the previous answer ended."""

    def __init__(self, request: bytes, stats: _Stats) -> None:
        self.request = request
        self.stats = stats
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        if self.transport is None or time.monotonic() >= self.stats.deadline:
            if self.transport is not None:
                self.transport.close()
            return
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.stats.errors += 1
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        self.stats.latencies_ns.append(time.perf_counter_ns() - self.sent_at)
        if not 200 <= self.parser.get_status_code() < 400:
            self.stats.errors += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if time.monotonic() < self.stats.deadline:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class _Stats:
    deadline: float
    latencies_ns: list[int]
    errors: int = 0


async def builtin_load(target: Target, connections: int, seconds: float) -> LoadResult:
    request = (
        f"GET {target.path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
        "User-Agent: meshproxy-bench\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    stats = _Stats(deadline=start + seconds, latencies_ns=[])
    clients: list[_Client] = []
    for _ in range(connections):
        try:
            _, client = await loop.create_connection(
                lambda: _Client(request, stats), target.host, target.port
            )
        except OSError:
            stats.errors += 1
            continue
        clients.append(client)
    for client in clients:
        # A connection the target stopped answering ends at the deadline, not never.
        try:
            left = stats.deadline + 5 - time.monotonic()
            await asyncio.wait_for(asyncio.shield(client.closed), max(left, 0.1))
        except TimeoutError:
            if client.transport is not None:
                client.transport.abort()
            stats.errors += 1
    elapsed = time.monotonic() - start
    lat = sorted(stats.latencies_ns)

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6 if lat else 0.0

    return LoadResult(len(lat), elapsed, len(lat) / elapsed, pct(0.5), pct(0.99), stats.errors)


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, host_header, path, connections, seconds = argv
    import uvloop

    target = Target(host, int(port), host_header, path)
    result = uvloop.run(builtin_load(target, int(connections), float(seconds)))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
