"""ProxyConfig concurrency: several worker processes share the listeners (SO_REUSEPORT), the
first serves admin with every worker's counters summed, and SIGTERM drains them all."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from tests.support.metrics import scrape, value
from tests.support.proxy import egress_sidecar, free_port, running_proxy, service_entry, wait_for
from tests.support.upstream import UpstreamServer


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /w HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _upstream_peers(upstream_port: int) -> set[int]:
    """PIDs holding connections to the upstream (the workers' pools)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"dport = :{upstream_port}"],
        capture_output=True,
        text=True,
    )
    return {int(p) for p in re.findall(r"pid=(\d+)", out.stdout)}


def test_two_workers_share_the_load_and_one_admin_sums_them(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("hello.test", port, [app.port]) + egress_sidecar(port)
    try:
        with running_proxy(
            tmp_path, admin, resources, concurrency=2, upstreamIdleTimeout="30s"
        ) as proxy:
            workers = _children(proxy.proc.pid)
            assert len(workers) == 1  # worker 0 is the process itself
            deadline = time.monotonic() + 10
            pids: set[int] = set()
            sent = 0
            while time.monotonic() < deadline and len(pids) < 2:
                for _ in range(20):
                    assert _get(port).startswith(b"HTTP/1.1 200")
                    sent += 1
                pids = _upstream_peers(app.port)
            assert pids == {proxy.proc.pid, workers[0]}, pids  # both workers served

            def served() -> float:
                """istio_requests_total over both workers, as worker 0's admin sums it."""
                samples = scrape(proxy.admin)
                return sum(
                    v
                    for (name, labels), v in samples.items()
                    if name == "istio_requests_total" and ("response_code", "200") in labels
                )

            # Worker 1's counters reach worker 0 at its next report: wait for the sum.
            assert wait_for(lambda: served() == sent, timeout=15), (served(), sent)
            assert value(scrape(proxy.admin), "meshproxy_workers") == 2
            proxy.proc.send_signal(15)
            assert proxy.proc.wait(timeout=15) == 0
            time.sleep(0.2)
            assert not _children(proxy.proc.pid)
            assert (
                subprocess.run(["kill", "-0", str(workers[0])], capture_output=True).returncode != 0
            )
    finally:
        app.stop()


def test_one_worker_never_shares_its_port(tmp_path: Path) -> None:
    """Without concurrency there is no SO_REUSEPORT: a second proxy on the port fails."""
    app = UpstreamServer("app").start()
    port = free_port()
    resources = f"""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress: [{{port: {{number: {port}, protocol: HTTP, name: http}}, bind: 127.0.0.1,
             captureMode: NONE, defaultEndpoint: "127.0.0.1:{app.port}"}}]
"""
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with running_proxy(tmp_path / "a", free_port(), resources):
            second = running_proxy(tmp_path / "b", free_port(), resources)
            try:
                with second:
                    raise AssertionError("a second proxy bound the same port")
            except RuntimeError as exc:
                assert "in use" in str(exc) or "cannot start" in str(exc)
    finally:
        app.stop()


def test_a_two_worker_sidecar_drains_inbound_in_every_worker(tmp_path: Path) -> None:
    """SIGTERM on a sidecar (capture listeners) with two workers: both stop accepting inbound
    at once (SO_REUSEPORT would hand a new connection to either), outbound keeps serving for
    terminationDrainDuration, then both exit."""
    app = UpstreamServer("app").start()
    admin, out, inbound = free_port(), free_port(), free_port()
    resources = (
        service_entry("hello.test", out, [app.port])
        + "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default}\nspec:\n"
        f"  egress: [{{port: {{number: {out}, protocol: HTTP, name: o}}, bind: 127.0.0.1, "
        "hosts: [./*]}]\n"
        f"  ingress: [{{port: {{number: {inbound}, protocol: HTTP, name: i}}, bind: 127.0.0.1, "
        f"captureMode: NONE, defaultEndpoint: '127.0.0.1:{app.port}'}}]\n"
    )
    spec = {
        "concurrency": 2,
        "interceptionMode": "REDIRECT",  # capture listeners make it a sidecar
        "proxyListenPort": free_port(),
        "proxyInboundListenPort": free_port(),
        "statsPort": 0,
        "terminationDrainDuration": "3s",
    }
    try:
        with running_proxy(tmp_path, admin, resources, **spec) as proxy:
            assert wait_for(lambda: len(_children(proxy.proc.pid)) == 1)
            assert _get(inbound).startswith(b"HTTP/1.1 200")
            proxy.proc.send_signal(15)

            def refused() -> bool:
                try:
                    _get(inbound)
                except OSError:
                    return True
                return False

            assert wait_for(refused, 2)
            # Every new inbound connection is refused, whichever worker the kernel picks.
            assert all(refused() for _ in range(20))
            assert _get(out).startswith(b"HTTP/1.1 200")  # outbound still serves the app
            assert proxy.proc.poll() is None
            assert proxy.proc.wait(timeout=15) == 0
    finally:
        app.stop()
