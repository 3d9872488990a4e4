"""Outlier detection: a failing endpoint is ejected, traffic shifts, it comes back."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

from tests.support.metrics import scrape, value
from tests.support.proxy import egress_sidecar, free_port, http_get, running_proxy, service_entry
from tests.support.upstream import UpstreamServer


def test_I08_failing_endpoint_is_ejected_and_returns(tmp_path: Path) -> None:
    good = UpstreamServer("good").start()
    bad = UpstreamServer("bad").start()
    bad.state.always = 500
    admin, port = free_port(), free_port()
    resources = (
        service_entry("svc.test", port, [good.port, bad.port])
        + """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc.test
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s,
                       maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.test]
  http: [{retries: {attempts: 0}, route: [{destination: {host: svc.test}}]}]
---
"""
        + egress_sidecar(port)
    )

    def statuses(n: int) -> list[int]:
        out = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(n):
            conn.request("GET", "/", headers={"Host": "svc.test"})
            resp = conn.getresponse()
            resp.read()
            out.append(resp.status)
        conn.close()
        return out

    def bad_health() -> str:
        clusters = json.loads(http_get(f"http://127.0.0.1:{admin}/clusters?format=json")[1])
        for c in clusters["cluster_statuses"]:
            for h in c["host_statuses"]:
                if h["address"].endswith(f":{bad.port}") and c["name"].startswith("outbound|"):
                    return f"{h['health']}/{h['ejections']}"
        return "?"

    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            first = statuses(6)  # round robin: the bad endpoint fails twice, then it is out
            assert first.count(500) == 2, first
            assert bad_health() == "ejected/1"
            ejections = value(
                scrape(proxy.admin),
                "envoy_cluster_outlier_detection_ejections_enforced_total",
                cluster_name=f"outbound|{port}||svc.test",
            )
            assert ejections == 1
            assert statuses(20) == [200] * 20  # all traffic on the good endpoint
            time.sleep(1.3)  # baseEjectionTime x 1
            assert bad_health() == "healthy/1"
            assert 500 in statuses(4)  # it is tried again (and will be ejected for 2 s)
    finally:
        good.stop()
        bad.stop()
