"""Hot-path micro benchmarks (pytest-benchmark).

Run: `python -m pytest benchmarks --benchmark-enable` (CI runs each once, disabled, as a smoke
test). Each case prints its time; compare codecs in the same run, not across days.
"""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from meshproxy.codec.events import ResponseHead
from meshproxy.codec.h1 import client_codec, server_codec
from meshproxy.codec.h1_limits import Limits
from meshproxy.codec.headers import strip_hop_by_hop
from meshproxy.routing.match import RequestMatcher, RequestView, StringMatcher
from meshproxy.routing.table import Route, RouteTable, RouteTarget, VirtualHost
from meshproxy.upstream.lb import LeastRequest, Random, RoundRobin

REQUEST = (
    b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: reviews.default.svc.cluster.local\r\n"
    b"User-Agent: bench/1.0\r\nAccept: */*\r\n"
    b"X-Request-Id: 0f8e7d6c-1234-5678-9abc-def012345678\r\n"
    b"X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\nX-B3-SpanId: e457b5a2e4d86bd1\r\n"
    b"X-B3-Sampled: 1\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 00:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
    b"X-Upstream: v1\r\n\r\nhello"
)


@pytest.mark.parametrize("codec", ["httptools", "h11"])
def test_h1_proxy_cycle(benchmark, codec: str) -> None:  # type: ignore[no-untyped-def]
    """Parse a request, serialize it upstream, parse the response, serialize it downstream."""
    limits = Limits()
    server = server_codec(codec, limits)
    client = client_codec(codec, limits)

    def cycle() -> bytes:
        events = server.receive(REQUEST)
        head = events[0]
        head.headers = strip_hop_by_hop(head.headers)[0]  # type: ignore[union-attr]
        client.send_head(head)  # type: ignore[arg-type]
        client.send_end([])
        client.data_to_send()
        resp_events = client.receive(RESPONSE)
        resp = resp_events[0]
        assert isinstance(resp, ResponseHead)
        resp.headers = strip_hop_by_hop(resp.headers)[0]
        server.send_head(resp, b"GET", True)
        for ev in resp_events[1:-1]:
            server.send_data(ev.data)  # type: ignore[union-attr]
        server.send_end([])
        out = server.data_to_send()
        server.start_next()
        client.start_next()
        return out

    out = benchmark(cycle)
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello")


def _table(n: int) -> RouteTable:
    routes = tuple(
        Route(
            f"r{i}",
            (
                RequestMatcher(
                    uri=StringMatcher.build("prefix", f"/svc{i}/"),
                    headers=(("x-version", StringMatcher.build("exact", f"v{i % 3}")),),
                ),
            ),
            (RouteTarget(f"c{i}", 100),),
        )
        for i in range(n)
    )
    vh = VirtualHost("svc", ("svc",), routes, "svc")
    return RouteTable("80", MappingProxyType({"svc": vh}), ())


def test_route_match_200_routes_last(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Worst case: the request matches the last of 200 routes."""
    table = _table(200)
    req = RequestView("GET", "/svc199/items", "", "svc", "http", {"x-version": "v1"}, 80)
    match = benchmark(table.route, req)
    assert match is not None and match.route.name == "r199"


def test_route_match_200_routes_first(benchmark) -> None:  # type: ignore[no-untyped-def]
    table = _table(200)
    req = RequestView("GET", "/svc0/items", "", "svc", "http", {"x-version": "v0"}, 80)
    match = benchmark(table.route, req)
    assert match is not None and match.route.name == "r0"


class _Host:
    def __init__(self, i: int) -> None:
        self.weight = 1 + i % 3
        self.active_requests = i % 5
        self.available = True


@pytest.mark.parametrize("lb", [RoundRobin, LeastRequest, Random])
def test_lb_pick_16_endpoints(benchmark, lb) -> None:  # type: ignore[no-untyped-def]
    hosts = [_Host(i) for i in range(16)]
    balancer = lb() if lb is RoundRobin else lb(random.Random(1))
    assert benchmark(balancer.pick, hosts) is not None


def test_config_load_1000_services(benchmark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A reload's off-loop work: read, validate and compile 2,000 resources (1,000 services,
    half TCP with tcp[] routes). Linear in size: 12,000 resources took a minute when the
    TCP route lookup was quadratic and YAML was composed in pure Python."""
    from meshproxy.config.loader import load_snapshot
    from tests.support.big_config import services_yaml

    (tmp_path / "mesh.yaml").write_text(services_yaml(1000))
    snapshot = benchmark(load_snapshot, tmp_path)
    assert len(snapshot.clusters) > 1000
