"""Fixtures: real upstream servers and a real `meshproxy run` subprocess on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.proxy import ProxyProcess, free_port, wait_for
from tests.support.upstream import UpstreamServer


@dataclass
class Mesh:
    proxy: ProxyProcess
    http_port: int  # explicit egress listener for hello.test (HTTP)
    tcp_port: int  # explicit egress listener for echo.test (TCP)
    v1: UpstreamServer
    v2: UpstreamServer
    config_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def mesh_yaml(
    *,
    admin: int,
    http_port: int,
    tcp_port: int,
    v1: int,
    v2: int,
    dead: int,
    echo: int,
    codec: str,
    extra_spec: str = "",
    vs_timeout: str = "1s",
    split: tuple[int, int] = (100, 0),
) -> str:
    return f"""
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: test}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  http1Codec: {codec}
  drainDuration: 5s
{extra_spec}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  ports: [{{number: {http_port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2}}}, labels: {{version: v2}}}}
  - {{address: 127.0.0.1, ports: {{http: {dead}}}, labels: {{version: dead}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: hello}}
spec:
  host: hello.test
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: dead, labels: {{version: dead}}}}
  - {{name: empty, labels: {{version: none}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  http:
  - name: dead
    match: [{{uri: {{prefix: /dead}}}}]
    route: [{{destination: {{host: hello.test, subset: dead}}}}]
  - name: empty
    match: [{{uri: {{prefix: /empty}}}}]
    route: [{{destination: {{host: hello.test, subset: empty}}}}]
  - name: timeout
    match: [{{uri: {{prefix: /hang}}}}]
    route: [{{destination: {{host: hello.test, subset: v1}}}}]
    timeout: {vs_timeout}
  - name: rewrite
    match: [{{uri: {{prefix: /old/}}}}]
    rewrite: {{uri: /new/}}
    route: [{{destination: {{host: hello.test, subset: v1}}}}]
    headers:
      request: {{set: {{x-added: "yes"}}, remove: [x-drop-me]}}
      response: {{add: {{x-route: rewrite}}}}
  - name: canary
    match: [{{headers: {{x-canary: {{exact: "1"}}}}}}]
    route: [{{destination: {{host: hello.test, subset: v2}}}}]
  - name: split
    route:
    - {{destination: {{host: hello.test, subset: v1}}, weight: {split[0]}}}
    - {{destination: {{host: hello.test, subset: v2}}, weight: {split[1]}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [echo.test]
  ports: [{{number: {tcp_port}, name: tcp, protocol: TCP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - port: {{number: {http_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    hosts: ["*/hello.test"]
  - port: {{number: {tcp_port}, protocol: TCP, name: tcp}}
    bind: 127.0.0.1
    hosts: ["*/echo.test"]
"""


def write_configmap(config_dir: Path, text: str, version: str) -> None:
    """Kubernetes' AtomicWriter layout and update: new dir, ..data_tmp, rename over ..data."""
    import os
    import shutil

    target = config_dir / version
    target.mkdir()
    (target / "mesh.yaml").write_text(text)
    data = config_dir / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    tmp = config_dir / "..data_tmp"
    os.symlink(version, tmp)
    os.rename(tmp, data)
    link = config_dir / "mesh.yaml"
    if not link.is_symlink():
        os.symlink("..data/mesh.yaml", link)
    if old:
        shutil.rmtree(config_dir / old)


class MeshFactory:
    def __init__(self, tmp_path: Path, echo_port: int) -> None:
        self.tmp_path = tmp_path
        self.echo_port = echo_port
        self.started: list[tuple[ProxyProcess, list[UpstreamServer]]] = []

    def __call__(
        self,
        codec: str = "auto",
        configmap: bool = False,
        max_open_files: int | None = None,
        ready: bool = True,
        **opts: object,
    ) -> Mesh:
        """A proxy on the mesh config; `ready=False`: serving is enough (readiness may wait
        for a certificate the test leaves out)."""
        v1 = UpstreamServer("v1").start()
        v2 = UpstreamServer("v2").start()
        admin, http_port, tcp_port, dead = free_port(), free_port(), free_port(), free_port()
        params = dict(
            admin=admin,
            http_port=http_port,
            tcp_port=tcp_port,
            v1=v1.port,
            v2=v2.port,
            dead=dead,
            echo=self.echo_port,
            codec=codec,
        )
        params.update(opts)
        config_dir = self.tmp_path / "config"
        config_dir.mkdir(exist_ok=True)
        text = mesh_yaml(**params)  # type: ignore[arg-type]
        if configmap:
            write_configmap(config_dir, text, "..2026_01_01_00_00_00.1")
        else:
            (config_dir / "mesh.yaml").write_text(text)
        proxy = ProxyProcess(config_dir, admin, self.tmp_path / "proxy.log", max_open_files)
        self.started.append((proxy, [v1, v2]))
        if ready:
            proxy.wait_ready()
        else:
            assert wait_for(lambda: "ready: config version" in proxy.log(), 15), proxy.log()
        mesh = Mesh(proxy, http_port, tcp_port, v1, v2, config_dir)
        mesh.params = params  # type: ignore[attr-defined]
        return mesh

    def close(self) -> None:
        for proxy, upstreams in self.started:
            proxy.terminate()
            for u in upstreams:
                u.stop()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A TCP server that echoes until EOF, then sends 'bye' and closes (half-close check)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.sendall(b"bye")

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield port
    stop.set()
    t.join(timeout=2)
    srv.close()


@pytest.fixture
def make_mesh(tmp_path: Path, echo_server: int) -> Iterator[MeshFactory]:
    factory = MeshFactory(tmp_path, echo_server)
    yield factory
    factory.close()


@pytest.fixture(params=["httptools", "h11"])
def codec(request: pytest.FixtureRequest) -> str:
    return str(request.param)
