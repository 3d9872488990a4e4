"""Robustness catalog H06: memory overload, with the proxy in a real memory cgroup.

The proxy starts inside a memory cgroup whose limit it finds by itself (as in a container
with `resources.limits.memory`). Idle keep-alive clients are connected; then HTTP/2 clients
that never open their flow-control windows ask for 1 MiB bodies on 100 streams each (D08),
connection after connection, until the proxy's RSS reaches the watermark. There new requests
get 503 with `x-envoy-overloaded` and flag OM, the idle connections are shed, the kernel never
OOM-kills the process, and once the attack stops requests are served again.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    proxy_config_yaml,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer

pytestmark = pytest.mark.stress

ACTIVE = "meshproxy_overload_stop_accepting_requests_active"
RESET = "meshproxy_overload_streams_reset_total"
LIMIT = 384 * 2**20  # the cgroup's memory limit; the proxy starts near 50 MiB


class MemoryCgroup:
    """A memory cgroup this test creates (v2 where the memory controller is delegated, else
    v1) and removes; `path` is what a process joins by writing its pid to cgroup.procs."""

    def __init__(self, limit: int) -> None:
        name = f"meshproxy-test-{os.getpid()}"
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/memory")
        if "memory" in _read(v2 / "cgroup.subtree_control").split():
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
            self._events = self.path / "memory.events"
        elif (v1 / "memory.limit_in_bytes").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            self._events = self.path / "memory.oom_control"
        else:
            raise OSError("no memory cgroup controller to use")

    def oom_kills(self) -> int:
        for line in _read(self._events).splitlines():
            key, _, n = line.partition(" ")
            if key == "oom_kill":
                return int(n)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # the killed process is still leaving


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    try:
        group = MemoryCgroup(LIMIT)
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here (needs root and cgroupfs): {exc}")
    try:
        yield group
    finally:
        group.remove()


def _get(port: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/fresh", headers={"Host": "hello.test"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def _idle_keep_alive(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /ka HTTP/1.1\r\nHost: hello.test\r\n\r\n")
        data = b""
        while b"}" not in data:  # the JSON body's end
            chunk = s.recv(65536)
            assert chunk
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        out.append(s)
    return out


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


class Prober:
    """A new connection and one GET every 20 ms until stopped: what a fresh client meets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[int, str | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                r = _get(self.port)
            except OSError:
                continue  # a connection shed while the probe was on it
            self.seen.append(
                (r.status, r.getheader("x-envoy-overloaded"), r.getheader("connection"))
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_H06_at_the_watermark_requests_get_503_idle_connections_go_and_it_recovers(
    tmp_path: Path, cgroup: MemoryCgroup
) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    (tmp_path / "mesh.yaml").write_text(
        # No memoryLimit: the container's limit is found. One attacking connection adds up to
        # 35 MB at once (100 streams x 350 KB held for the client): the margin between
        # refusing requests and the kernel's limit must be more than that.
        proxy_config_yaml(
            admin,
            overload="{shrinkHeapThreshold: 0.8, stopAcceptingRequestsThreshold: 0.85}",
        )
        + service_entry("hello.test", port, [app.port])
        + egress_sidecar(port)
    )
    proxy = ProxyProcess(tmp_path, admin, tmp_path / "proxy.log", cgroup=cgroup.path)
    attackers: list[H2Client] = []
    idle: list[socket.socket] = []
    prober: Prober | None = None
    try:
        proxy.wait_ready()
        assert wait_for(lambda: "overload actions on: 384.0 MiB" in proxy.log()), proxy.log()
        idle = _idle_keep_alive(port, 100)
        prober = Prober(port)
        while "overloaded: RSS" not in proxy.log() and len(attackers) < 60:
            c = H2Client(port, authority="hello.test", stream_window=0, connection_window=65535)
            for _ in range(100):  # D08: 1 MiB each, the windows never opened
                c.request(f"/big?n={2**20}")
            c.flush()
            attackers.append(c)
            time.sleep(0.3)
        assert "overloaded: RSS" in proxy.log(), f"not overloaded after {len(attackers)} attackers"
        time.sleep(1.0)
        prober.stop()
        print(f"\nH06: overloaded after {len(attackers)} attacking connections")
        refused = [s for s in prober.seen if s[0] == 503]
        assert refused, prober.seen
        assert set(refused) == {(503, "true", "close")}
        assert all(status in (200, 503) for status, _, _ in prober.seen)
        samples = scrape(proxy.admin)
        om = value(samples, "istio_requests_total", response_flags="OM", response_code="503")
        assert om == len(refused)  # each refusal counted, flag OM; nothing else got OM 503s
        assert wait_for(lambda: all(_closed(s) for s in idle), 10), "idle connections not shed"
        assert (value(samples, "meshproxy_overload_connections_shed_total") or 0) >= len(idle)
        # The attack's streams admitted before the watermark were reset, not left to grow.
        assert (value(samples, RESET) or 0) > 0
        assert proxy.proc.poll() is None and cgroup.oom_kills() == 0

        for c in attackers:  # the attack stops
            c.close()
        attackers.clear()
        assert wait_for(lambda: value(scrape(proxy.admin), ACTIVE) == 0, 30), proxy.log()
        assert _get(port).status == 200
        assert "no longer overloaded" in proxy.log()
        assert proxy.proc.poll() is None and cgroup.oom_kills() == 0
        print(
            f"H06: {len(refused)} requests refused, recovered; RSS {proxy.rss_kib() / 1024:.0f} MiB"
        )
    finally:
        if prober is not None:
            prober.stop()
        for c in attackers:
            c.close()
        for s in idle:
            s.close()
        proxy.terminate()
        app.stop()
