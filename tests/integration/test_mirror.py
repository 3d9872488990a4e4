"""VirtualService mirroring: shadows reach the mirror with "-shadow" hosts and whole bodies; a
slow or dead mirror never touches the primary response; mirrorPercentage samples."""

from __future__ import annotations

from pathlib import Path

from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    request,
    running_proxy,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer


def send(
    port: int, method: str = "GET", path: str = "/", body: bytes | None = None
) -> tuple[int, float]:
    reply = request(port, path, method, body=body)
    return reply.status, reply.elapsed


def resources(port: int, app: int, mirror_ports: list[int], dead: int) -> str:
    return (
        service_entry("svc.test", port, [app])
        + service_entry("mirror.test", port, mirror_ports)
        + service_entry("dead.test", port, [dead])
        + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.test]
  http:
  - match: [{uri: {prefix: /half}}]
    mirror: {host: mirror.test}
    mirrorPercentage: {value: 50}
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /dead}}]
    mirrors: [{destination: {host: dead.test}}, {destination: {host: mirror.test}}]
    route: [{destination: {host: svc.test}}]
  - mirror: {host: mirror.test}
    route: [{destination: {host: svc.test}}]
---
"""
        + egress_sidecar(port)
    )


def test_mirror_copies_requests_and_never_delays_the_primary(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    shadow = UpstreamServer("shadow").start()
    dead = free_port()  # nothing listens there
    admin, port = free_port(), free_port()
    try:
        with running_proxy(tmp_path, admin, resources(port, app.port, [shadow.port], dead)) as p:
            assert send(port, path="/a")[0] == 200
            assert wait_for(lambda: len(shadow.state.requests) == 1, 5.0)
            seen = shadow.state.requests[0]
            assert (seen.path, seen.headers["host"]) == ("/a", "svc.test-shadow")
            assert app.state.requests[0].headers["host"] == "svc.test"

            body = bytes(range(256)) * 200  # 50 KiB: within the replay buffer
            assert send(port, "POST", "/upload", body)[0] == 200
            assert wait_for(lambda: "/upload" in shadow.state.completed, 5.0)
            assert shadow.state.requests[-1].headers["content-length"] == str(len(body))

            # A body beyond the 64 KiB replay buffer is not mirrored (Envoy abandons it too).
            assert send(port, "POST", "/upload", b"x" * 100_000)[0] == 200
            abandoned = "meshproxy_mirror_requests_total"
            assert wait_for(
                lambda: value(scrape(p.admin), abandoned, result="abandoned") == 1, 5.0
            ), p.metrics()

            shadow.state.delay = 2.0  # a slow mirror: the original never waits for it
            status, elapsed = send(port, path="/b")
            assert status == 200 and elapsed < shadow.state.delay, elapsed
            shadow.state.delay = 0.0

            status, elapsed = send(port, path="/dead")  # one dead, one live mirror
            assert status == 200 and elapsed < 2.0  # not the dead mirror's connect timeout
            assert wait_for(lambda: any(r.path == "/dead" for r in shadow.state.requests), 5.0)

            def mirror_count(cluster: str, result: str) -> float | None:
                return value(
                    scrape(p.admin),
                    "meshproxy_mirror_requests_total",
                    cluster=f"outbound|{port}||{cluster}",
                    result=result,
                )

            assert wait_for(lambda: mirror_count("dead.test", "failed") == 1, 5.0), p.metrics()
            # Every copy the shadow got counts as sent once it is done (/b's answer is slow).
            arrived = len(shadow.state.requests)
            assert wait_for(lambda: mirror_count("mirror.test", "sent") == arrived, 5.0)

            before = sum(1 for r in shadow.state.requests if r.path.startswith("/half"))
            for i in range(200):
                assert send(port, path=f"/half/{i}")[0] == 200
            # The copies still on their way: wait until every one that was sent arrived.
            assert wait_for(
                lambda: mirror_count("mirror.test", "sent") == len(shadow.state.requests), 10.0
            )
            mirrored = sum(1 for r in shadow.state.requests if r.path.startswith("/half")) - before
            assert 60 < mirrored < 140, mirrored  # 50 % of 200, generously
            assert sum(1 for r in app.state.requests if r.path.startswith("/half")) == 200
    finally:
        app.stop()
        shadow.stop()
