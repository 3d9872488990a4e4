"""Istio's lifecycle on a real process: readiness that waits for certificates, `meshproxy
wait`, /drain_listeners?inboundonly, /quitquitquit on the status port."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import (
    ProxyProcess,
    free_port,
    http_get,
    meshproxy_cli,
    request,
    wait_for,
)
from tests.support.upstream import UpstreamServer

meshproxy = meshproxy_cli


def post(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", path)
        return conn.getresponse().status
    finally:
        conn.close()


def config(admin: int, status: int, inbound: int, outbound: int, app: int, certs: Path) -> str:
    return f"""
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: life}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: {status}
  drainDuration: 10s
  certificates:
    certChain: {certs}/cert-chain.pem
    privateKey: {certs}/key.pem
    rootCert: {certs}/root-cert.pem
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec:
  portLevelMtls: {{{inbound}: {{mode: PERMISSIVE}}}}
  mtls: {{mode: STRICT}}
  selector: {{matchLabels: {{app: life}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app}}
spec:
  hosts: [app.test]
  ports: [{{number: {outbound}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - port: {{number: {inbound}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{app}
  egress:
  - port: {{number: {outbound}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    hosts: [./*]
"""


class Life:
    def __init__(self, tmp: Path) -> None:
        self.admin, self.status = free_port(), free_port()
        self.inbound, self.outbound = free_port(), free_port()
        self.app = UpstreamServer("app").start()
        self.certs = tmp / "certs"
        (tmp / "cfg").mkdir()
        (tmp / "cfg" / "mesh.yaml").write_text(
            config(self.admin, self.status, self.inbound, self.outbound, self.app.port, self.certs)
        )
        # The labels make the STRICT policy select this workload.
        text = (tmp / "cfg" / "mesh.yaml").read_text()
        (tmp / "cfg" / "mesh.yaml").write_text(
            text.replace("  drainDuration: 10s\n", "  drainDuration: 10s\n  labels: {app: life}\n")
        )
        self.tmp = tmp
        self.proxy = ProxyProcess(tmp / "cfg", self.admin, tmp / "proxy.log")

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.status}/healthz/ready"

    def issue_certs(self) -> None:
        for args in (
            ("init", "--dir", str(self.tmp / "ca")),
            (
                "issue",
                "--ca",
                str(self.tmp / "ca"),
                "--spiffe-id",
                "spiffe://cluster.local/ns/default/sa/life",
                "--out",
                str(self.certs),
            ),
        ):
            out = meshproxy("ca", *args)
            assert out.returncode == 0, out.stderr


@pytest.fixture
def life(tmp_path: Path) -> Iterator[Life]:
    lf = Life(tmp_path)
    try:
        yield lf
    finally:
        lf.proxy.terminate()
        lf.app.stop()


def listening(port: int) -> bool:
    try:
        request(port, "/", host="app.test")
        return True
    except OSError:
        return False


def test_ready_only_once_certificates_load_and_wait_blocks_until_then(life: Life) -> None:
    assert wait_for(lambda: listening(life.outbound))  # serving, yet not ready
    status, body = http_get(life.ready_url)
    assert status == 503 and b"no workload certificate loaded" in body
    out = meshproxy(
        "wait", "--url", life.ready_url, "--timeoutSeconds", "1", "--periodMillis", "200"
    )
    assert out.returncode == 1 and "not ready after 1s" in out.stderr and "HTTP 503" in out.stderr

    waiter = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "wait", "--url", life.ready_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting
        life.issue_certs()  # the certificate watcher loads them
        assert waiter.wait(timeout=30) == 0
        assert "meshproxy is ready" in (waiter.stdout.read() if waiter.stdout else "")
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert http_get(life.ready_url)[0] == 200
    assert http_get(f"http://127.0.0.1:{life.admin}/ready")[0] == 200


def test_certificates_that_raise_no_inotify_event_still_load(life: Life) -> None:
    """The certificate files are symlinks into another directory, written there after start:
    the watched directory sees no event, so only the periodic look at the files loads them
    (also what covers files written while the proxy starts, before its watch exists)."""
    real = life.tmp / "real-certs"
    life.certs.mkdir()
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        (life.certs / name).symlink_to(real / name)
    assert wait_for(lambda: listening(life.outbound))
    assert http_get(life.ready_url)[0] == 503
    time.sleep(1.5)  # the watch is set up on the directory of dangling links
    life.certs, certs = real, life.certs
    life.issue_certs()  # into real-certs/: no event in certs/
    life.certs = certs
    life.proxy.wait_ready(timeout=10)
    assert "workload certificate loaded: spiffe://cluster.local/ns/default/sa/life" in (
        life.proxy.log()
    )


def test_quitquitquit_on_the_status_port_exits_promptly(life: Life) -> None:
    life.issue_certs()
    life.proxy.wait_ready()
    # A keep-alive client on the inbound side would hold a drain for drainDuration (10s).
    idle = http.client.HTTPConnection("127.0.0.1", life.inbound, timeout=10)
    idle.request("GET", "/", headers={"host": "app.test"})
    idle.getresponse().read()
    assert http_get(f"http://127.0.0.1:{life.status}/quitquitquit")[0] == 405
    assert life.proxy.proc.poll() is None
    started = time.monotonic()
    assert post(life.status, "/quitquitquit") == 200
    assert life.proxy.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5  # prompt: no drain wait (drainDuration is 10s)
    idle.close()
