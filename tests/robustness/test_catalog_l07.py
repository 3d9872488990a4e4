"""Robustness catalog L07: observability under attack, over the wire against a real proxy.

Rapid Reset (D01) from connection after connection and 500 slowloris clients (H01) hit the
proxy together while every request is traced to a collector that accepts connections and never
answers. The admin endpoint keeps answering its scrapes, the span queue stays bounded (the
spans past it are counted as dropped, not kept), and memory does not grow with the attack.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.integration.conftest import MeshFactory
from tests.integration.test_tracing import tracing_spec
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value

pytestmark = pytest.mark.stress

ATTACK_SECONDS = 5.0
QUEUE, BATCH = 256, 64
SLOWLORIS = 500


class SilentCollector:
    """An OTLP/HTTP endpoint that accepts connections and never answers (a hung collector)
    until `answer()`: then it takes every export, so the proxy's last flush ends at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self._server: ThreadingHTTPServer | None = None

    def answer(self) -> None:
        class Ok(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Ok, bind_and_activate=False)
        server.socket.close()
        server.socket = self.sock  # the connections waiting in its backlog are served too
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        self.sock.close()


@pytest.fixture
def silent_collector() -> Iterator[SilentCollector]:
    collector = SilentCollector()
    yield collector
    collector.close()


def _rapid_reset(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    while not stop.is_set():
        c = H2Client(port, authority="hello.test")
        try:
            for _ in range(100):
                for _ in range(100):
                    c.reset(c.request("/slow?ms=2000", headers=None), code=8)
                c.flush()
                counts["streams"] += 100
        except OSError:
            pass
        counts["connections"] += 1
        c.sock.close()


def _traffic(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Ordinary keep-alive requests, each one traced: what fills the span queue."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while not stop.is_set():
        conn.request("GET", "/", headers={"Host": "hello.test"})
        response = conn.getresponse()
        response.read()
        counts["traced"] += 1
        if response.status != 200:
            counts["failed"] += 1


def _slowloris(port: int, stop: threading.Event, counts: dict[str, int]) -> None:
    socks = []
    for _ in range(SLOWLORIS):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: hello.test\r\n")
        socks.append(s)
    counts["slowloris"] = len(socks)
    while not stop.wait(1.0):
        for s in socks:
            try:
                s.send(b"X")  # one byte a second, never the end of the head
            except OSError:
                pass
    for s in socks:
        s.close()


def test_L07_metrics_answer_and_the_span_queue_stays_bounded_under_attack(
    silent_collector: SilentCollector, make_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK's own settings (default 2,048 and 512), smaller so a few seconds fill them.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", str(QUEUE))
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(BATCH))
    provider = f"{{service: 127.0.0.1, port: {silent_collector.port}, http: {{timeout: 30s}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=100))
    rss_before = mesh.proxy.rss_kib()
    stop = threading.Event()
    counts = {"streams": 0, "connections": 0, "slowloris": 0, "traced": 0, "failed": 0}
    attackers = [
        threading.Thread(target=target, args=(mesh.http_port, stop, counts))
        for target in (_rapid_reset, _slowloris, _traffic, _traffic)
    ]
    for t in attackers:
        t.start()
    scrapes: list[float] = []
    try:
        deadline = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < deadline:
            started = time.perf_counter()
            with urllib.request.urlopen(mesh.proxy.admin + "/stats/prometheus", timeout=5) as r:
                assert r.status == 200
                r.read()
            scrapes.append(time.perf_counter() - started)
            time.sleep(0.1)
        rss_during = mesh.proxy.rss_kib()
    finally:
        stop.set()
        for t in attackers:
            t.join(timeout=30)
    samples = scrape(mesh.proxy.admin)
    silent_collector.answer()  # the proxy's last flush, when the test ends, ends at once
    queued = value(samples, "meshproxy_tracing_spans_total", result="queued") or 0
    dropped = value(samples, "meshproxy_tracing_spans_total", result="dropped") or 0
    resets = value(samples, "meshproxy_http2_flood_total", kind="premature_reset") or 0
    scrapes.sort()
    print(
        f"\nL07: {counts['streams']} reset streams on {counts['connections']} connections, "
        f"{counts['slowloris']} slowloris clients and {counts['traced']} traced requests "
        f"for {ATTACK_SECONDS:.0f} s: {len(scrapes)} "
        f"scrapes, median {scrapes[len(scrapes) // 2] * 1e3:.1f} ms, worst "
        f"{scrapes[-1] * 1e3:.1f} ms; spans queued {queued:.0f}, dropped {dropped:.0f}; "
        f"RSS {rss_before / 1024:.0f} -> {rss_during / 1024:.0f} MiB"
    )
    assert counts["slowloris"] == SLOWLORIS and resets >= 1 and counts["failed"] == 0
    # Every scrape was answered (a starved admin endpoint would have timed out above).
    assert len(scrapes) >= ATTACK_SECONDS / 1.0
    # The collector takes nothing, so every span past the queue (and the one batch in the
    # exporter's hands) is dropped and counted, not kept.
    assert dropped > 0 and queued <= QUEUE + BATCH + 1, (queued, dropped)
    assert queued + dropped >= counts["traced"]  # every traced request made its span
    assert rss_during - rss_before < 60 * 1024, (rss_before, rss_during)
