"""DestinationRule warmup through a real proxy: an endpoint added by a reload starts with a
small share, the endpoint that was already there keeps its age (and its full weight)."""

from __future__ import annotations

import http.client
import time
from collections import Counter
from pathlib import Path

from tests.support.proxy import (
    egress_sidecar,
    free_port,
    proxy_config_yaml,
    running_proxy,
    service_entry,
)
from tests.support.upstream import UpstreamServer

RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.test
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 3s, minimumPercent: {value: 10}}}
---
"""


def test_new_endpoint_ramps_up(tmp_path: Path) -> None:
    old, new = UpstreamServer("old").start(), UpstreamServer("new").start()
    admin, port = free_port(), free_port()
    try:
        with running_proxy(
            tmp_path,
            admin,
            service_entry("svc.test", port, [old.port]) + RULE + egress_sidecar(port),
        ) as proxy:
            time.sleep(3.1)  # the first endpoint is past its 3 s window: full weight
            (tmp_path / "mesh.yaml").write_text(
                proxy_config_yaml(admin)
                + service_entry("svc.test", port, [old.port, new.port])
                + RULE
                + egress_sidecar(port)
            )
            deadline = time.monotonic() + 10
            while "config version 2 applied" not in proxy.log():
                assert time.monotonic() < deadline, proxy.log()
                time.sleep(0.02)
            added = time.monotonic()  # within ~20 ms after the new endpoint appeared
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            seen: Counter[str] = Counter()
            expected = 0.0
            for _ in range(110):
                # The new endpoint's weight is max(1 s, age) / 3 s (capped at 1): its share of
                # this request is w / (1 + w). Summing that per request, at the time it is
                # sent, makes the check hold however slowly a shared machine runs the loop.
                weight = min(1.0, max(1.0, time.monotonic() - added) / 3.0)
                expected += weight / (1 + weight)
                conn.request("GET", "/", headers={"Host": "svc.test"})
                resp = conn.getresponse()
                resp.read()
                seen[resp.getheader("x-upstream") or "?"] += 1
            # On a quick machine all 110 fall in the first second: 27.5 expected, not the
            # even 55 that no warmup would give.
            assert abs(seen["new"] - expected) <= 12, (seen, expected)
    finally:
        old.stop()
        new.stop()


def test_round_robin_alternates_from_the_first_request(tmp_path: Path) -> None:
    """The pick made before any connection exists is the one used (a second pick in the
    connect path used to send every request of a cold round robin to the same endpoint)."""
    a, b = UpstreamServer("a").start(), UpstreamServer("b").start()
    admin, port = free_port(), free_port()
    rule = RULE.replace(", warmup: {duration: 3s, minimumPercent: {value: 10}}", "")
    try:
        with running_proxy(
            tmp_path,
            admin,
            service_entry("svc.test", port, [a.port, b.port]) + rule + egress_sidecar(port),
        ):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            seen = []
            for _ in range(20):
                conn.request("GET", "/", headers={"Host": "svc.test"})
                resp = conn.getresponse()
                resp.read()
                seen.append(resp.getheader("x-upstream"))
            assert Counter(seen) == {"a": 10, "b": 10}, seen
    finally:
        a.stop()
        b.stop()
