"""Run the demo: backends + proxy in one process, some traffic, then a report."""

from __future__ import annotations

import asyncio
import collections
import sys
from pathlib import Path

import h11

from meshproxy.config.loader import load_snapshot
from meshproxy.demo.backend import start_backend
from meshproxy.errors import ConfigError
from meshproxy.runtime import Runtime

CONFIG = Path(__file__).parent / "config"
BACKENDS = (("hello-v1", 18181), ("hello-v2", 18182))
LISTENER = ("127.0.0.1", 15080)


async def _request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    path: str,
    headers: list[tuple[str, str]],
) -> tuple[int, dict[str, str], bytes]:
    conn = h11.Connection(h11.CLIENT)
    req = h11.Request(method="GET", target=path, headers=[("host", "hello.demo.local"), *headers])
    writer.write((conn.send(req) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status, resp_headers, body = 0, {}, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data:
                break
            continue
        if isinstance(ev, h11.Response):
            status = ev.status_code
            resp_headers = {k.decode(): v.decode() for k, v in ev.headers}
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return status, resp_headers, body


async def run_demo(requests: int = 200, linger: float = 20.0) -> int:
    try:
        snapshot = load_snapshot(CONFIG)
    except ConfigError as exc:
        print(f"demo config is invalid:\n{exc}", file=sys.stderr)
        return 2
    servers = []
    try:
        for name, port in BACKENDS:
            servers.append(await start_backend(name, "127.0.0.1", port))
        runtime = Runtime(CONFIG, snapshot)
        await runtime.start()
    except OSError as exc:
        print(f"demo: cannot bind a port ({exc}); is another demo running?", file=sys.stderr)
        for s in servers:
            s.close()
        return 3
    admin = f"http://127.0.0.1:{snapshot.settings.proxy_admin_port}"
    print(
        f"meshproxy demo: proxy listening on http://{LISTENER[0]}:{LISTENER[1]} "
        "(Host: hello.demo.local)"
    )
    by_dest: collections.Counter[str] = collections.Counter()
    by_status: collections.Counter[int] = collections.Counter()
    reader, writer = await asyncio.open_connection(*LISTENER)
    plan: list[tuple[str, list[tuple[str, str]]]] = (
        [("/", [])] * requests + [("/", [("x-canary", "yes")])] * 10 + [("/broken", [])] * 5
    )
    for path, headers in plan:
        status, resp, body = await _request(reader, writer, path, headers)
        by_status[status] += 1
        by_dest[resp.get("x-backend", f"(proxy: {body.decode(errors='replace').strip()})")] += 1
        if status != 200 or writer.is_closing():
            writer.close()
            reader, writer = await asyncio.open_connection(*LISTENER)
    writer.close()
    print(
        f"\nsent {len(plan)} requests: {requests} split 80/20 between v1 and v2, "
        "10 with x-canary: yes (all to v2), 5 to /broken (a subset with no server)"
    )
    print("\nresponses by destination:")
    for dest, n in by_dest.most_common():
        print(f"  {dest:<60} {n}")
    print("status codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(by_status.items())))
    print(f"\nadmin: {admin}/stats/prometheus  {admin}/config_dump  {admin}/clusters")
    print(f"try:   curl -H 'Host: hello.demo.local' http://{LISTENER[0]}:{LISTENER[1]}/")
    if linger > 0:
        print(f"(serving for {linger:.0f}s more; Ctrl-C to stop now)")
        try:
            await asyncio.wait_for(runtime._stop.wait(), timeout=linger)
        except TimeoutError:
            pass
    await runtime.drain()
    for s in servers:
        s.close()
    return 0
