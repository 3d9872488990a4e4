"""An endpoint's host as Envoy writes it in %UPSTREAM_HOST%, spans and /clusters."""

from __future__ import annotations

import pytest

from meshproxy.codec.h1_limits import Limits
from meshproxy.upstream.cluster import EndpointState
from meshproxy.upstream.pool import Pool


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.7", "10.0.0.7:8080"), ("::1", "[::1]:8080"), ("reviews.svc", "reviews.svc:8080")],
)
def test_ipv6_hosts_are_bracketed(address: str, expected: str) -> None:
    pool = Pool(
        address,
        8080,
        codec="httptools",
        limits=Limits(),
        connect_timeout=1.0,
        idle_timeout=1.0,
        max_requests=0,
        bind_source=None,
    )  # nothing connects: the pool is only kept
    host = EndpointState(address, 8080, 1, pool)
    assert host.host_port == expected
