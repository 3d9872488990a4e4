"""Two pods on a bridge, each an unmodified app behind meshproxy running as uid 1337 under the
rules of `meshproxy iptables --apply`; a third namespace is a client without a sidecar.

    pod A 10.79.0.11 ─┐                    ┌─ pod B 10.79.0.12 (STRICT)
      curl → VIP      ├── bridge (ns net) ──┤    app :8080 (declared HTTP)
                      │                     │    app :8081 (undeclared HTTP)
    outsider 10.79.0.13 (no sidecar) ───────┘    app :5432 (undeclared, server-first TCP)

A tcpdump on B's side of the bridge shows what travels between the pods.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.pods import REPO, Procs, _skip_or_fail, ns_exec, run

pytestmark = pytest.mark.e2e

A_IP, B_IP, OUT_IP = "10.79.0.11", "10.79.0.12", "10.79.0.13"
MARKER = "x-marker-6f1c2a"  # in request paths: must never be seen in clear on the wire


def proxy_config(name: str, certs: Path, strict: bool) -> str:
    policy = "STRICT" if strict else "PERMISSIVE"
    return f"""
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: {name}}}
spec:
  drainDuration: 1s
  terminationDrainDuration: 4s
  protocolDetectionTimeout: 1s
  namespace: default
  workloadName: {name}
  labels: {{app: {name}}}
  certificates:
    certChain: {certs}/cert-chain.pem
    privateKey: {certs}/key.pem
    rootCert: {certs}/root-cert.pem
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: {policy}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b}}
spec:
  hosts: [b.default.svc.cluster.local]
  addresses: [10.96.8.8]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  - {{number: 8081, name: http-alt, protocol: HTTP}}
  - {{number: 5432, name: tcp-db, protocol: TCP}}
  resolution: STATIC
  endpoints: [{{address: {B_IP}, labels: {{app: b}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: b}}
spec:
  host: b.default.svc.cluster.local
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - port: {{number: 8080, protocol: HTTP, name: http}}
    defaultEndpoint: 127.0.0.1:8080
"""


@dataclass
class Mesh:
    tag: str
    a: str
    b: str
    out: str
    net: str
    work: Path
    procs: Procs = field(default_factory=Procs)
    proxies: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    capture: subprocess.Popen[bytes] | None = None

    @property
    def pcap(self) -> Path:
        return self.work / "b.pcap"

    def start_capture(self) -> None:
        """tcpdump on B's end of the bridge, writing every packet as it comes (-U)."""
        self.capture = subprocess.Popen(
            ns_exec(
                self.net,
                "tcpdump",
                "--immediate-mode",
                "-i",
                f"vb{self.tag}",
                "-U",
                "-w",
                str(self.pcap),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # tcpdump opens the interface before traffic starts

    def stop_capture(self) -> bytes:
        assert self.capture is not None
        time.sleep(0.3)
        self.capture.send_signal(signal.SIGINT)
        self.capture.wait(timeout=10)
        self.capture = None
        return self.pcap.read_bytes()


def sh(ns: str, *cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns_exec(ns, *cmd), capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO
    )


def curl(ns: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sh(ns, "curl", "-sS", "--max-time", "8", *args, url)


def make_certs(work: Path) -> None:
    def ca(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "meshproxy", "ca", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert out.returncode == 0, out.stderr

    ca("init", "--dir", str(work / "ca"))
    for pod in ("a", "b"):
        spiffe = f"spiffe://cluster.local/ns/default/sa/{pod}"
        ca("issue", "--ca", str(work / "ca"), "--spiffe-id", spiffe, "--out", str(work / pod))


def start_proxy(mesh: Mesh, pod: str) -> subprocess.Popen[bytes]:
    ns = mesh.a if pod == "a" else mesh.b
    cmd = ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"]
    cmd += [sys.executable, "-m", "meshproxy", "run", "-c", str(mesh.work / f"{pod}-cfg")]
    proxy = mesh.procs.start(ns_exec(ns, *cmd))
    mesh.proxies[pod] = proxy
    # Readiness as the kubelet sees it: the status port, from outside the pod.
    ip = A_IP if pod == "a" else B_IP
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = curl(
            mesh.out, f"http://{ip}:15021/healthz/ready", "-o", "/dev/null", "-w", "%{http_code}"
        )
        if probe.stdout == "200":
            return proxy
        assert proxy.poll() is None, proxy.stdout.read().decode() if proxy.stdout else ""
        time.sleep(0.2)
    pytest.fail(f"proxy in pod {pod} never became ready")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    if os.geteuid() != 0:
        _skip_or_fail("needs root for ip netns and iptables")
    for tool in ("ip", "iptables-restore", "setpriv", "tcpdump", "curl"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} is not installed")
    tag = uuid.uuid4().hex[:5]
    m = Mesh(
        tag,
        f"mp-a-{tag}",
        f"mp-b-{tag}",
        f"mp-o-{tag}",
        f"mp-n-{tag}",
        Path(tempfile.mkdtemp(prefix="meshproxy-pods-")),
    )
    try:
        run("ip", "netns", "add", m.net)
        run("ip", "-n", m.net, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", m.net, "link", "set", "br0", "up")
        for ns, short, ip in ((m.a, "a", A_IP), (m.b, "b", B_IP), (m.out, "o", OUT_IP)):
            run("ip", "netns", "add", ns)
            run(
                "ip",
                "link",
                "add",
                f"v{short}{tag}",
                "type",
                "veth",
                "peer",
                "name",
                f"e{short}{tag}",
            )
            run("ip", "link", "set", f"v{short}{tag}", "netns", m.net)
            run("ip", "link", "set", f"e{short}{tag}", "netns", ns)
            run("ip", "-n", m.net, "link", "set", f"v{short}{tag}", "master", "br0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", f"e{short}{tag}", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", f"e{short}{tag}")
            # Service VIPs (kube-proxy's range) leave the pod like any other address.
            run("ip", "-n", ns, "route", "add", "10.96.0.0/16", "dev", f"e{short}{tag}")
        make_certs(m.work)
        for pod in ("a", "b"):
            cfg = m.work / f"{pod}-cfg"
            cfg.mkdir()
            (cfg / "mesh.yaml").write_text(proxy_config(pod, m.work / pod, strict=pod == "b"))
        for path in (m.work, *m.work.rglob("*")):
            os.chown(path, 1337, 1337)  # the image's user reads its config and certificates
        apps = [sys.executable, "-m", "tests.support.apps"]
        serve = [sys.executable, "-m", "tests.support.serve"]
        # Unmodified apps, listening on all addresses.
        m.procs.start(ns_exec(m.b, *serve, "b-http", "0.0.0.0", "8080"), ready="ready")
        m.procs.start(ns_exec(m.b, *serve, "b-undeclared", "0.0.0.0", "8081"), ready="ready")
        m.procs.start(ns_exec(m.b, *apps, "banner", "0.0.0.0", "5432"), ready="ready")
        m.procs.start(ns_exec(m.out, *serve, "outside", "0.0.0.0", "9000"), ready="ready")
        for ns in (m.a, m.b):
            out = sh(ns, sys.executable, "-m", "meshproxy", "iptables", "--apply")
            assert out.returncode == 0, out.stderr
        start_proxy(m, "a")
        start_proxy(m, "b")
        yield m
    finally:
        if m.capture is not None:
            m.capture.kill()
        m.procs.stop()
        for ns in (m.a, m.b, m.out, m.net):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(m.work, ignore_errors=True)


def test_vip_call_over_istio_mutual_is_encrypted_on_the_wire(mesh: Mesh) -> None:
    mesh.start_capture()
    out = curl(mesh.a, f"http://10.96.8.8/{MARKER}/declared")
    wire = mesh.stop_capture()
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["name"] == "b-http" and seen["path"] == f"/{MARKER}/declared"
    # B's app sees the request from Istio's inbound passthrough address, with A's identity.
    assert seen["peer"].startswith("127.0.0.6:")
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    assert "URI=spiffe://cluster.local/ns/default/sa/a" in xfcc
    assert b"istio-http/1.1" in wire  # a mesh ClientHello crossed the bridge...
    assert MARKER.encode() not in wire  # ...and the request itself never did in clear


def test_undeclared_http_and_tcp_ports_work_and_are_encrypted(mesh: Mesh) -> None:
    mesh.start_capture()
    http = curl(mesh.a, f"http://10.96.8.8:8081/{MARKER}/undeclared")
    tcp = sh(mesh.a, sys.executable, "-m", "tests.support.apps", "client", "10.96.8.8", "5432")
    wire = mesh.stop_capture()
    assert http.returncode == 0, http.stderr
    seen = json.loads(http.stdout)
    assert seen["name"] == "b-undeclared" and seen["peer"].startswith("127.0.0.6:")
    assert tcp.stdout.splitlines() == ["220 banner-app ready peer=127.0.0.6", "echo hello"], (
        tcp.stdout + tcp.stderr
    )
    assert b"istio-peer-exchange" in wire  # the TCP port's mesh ClientHello
    assert MARKER.encode() not in wire and b"banner-app" not in wire and b"echo hello" not in wire


def test_G08_L06_a_client_without_sidecar_is_refused_by_strict(mesh: Mesh) -> None:
    for port in (8080, 8081):
        out = curl(mesh.out, f"http://{B_IP}:{port}/plain")
        assert (
            out.returncode != 0 and "b-http" not in out.stdout and "b-undeclared" not in out.stdout
        )
    # The status port answers the kubelet, but stopping the proxy is for the pod's own.
    quit_ = curl(
        mesh.out,
        f"http://{B_IP}:15021/quitquitquit",
        "-X",
        "POST",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    )
    assert quit_.stdout == "403"
    assert mesh.proxies["b"].poll() is None


def test_metrics_name_the_peer_workload_on_both_sides(mesh: Mesh) -> None:
    curl(mesh.a, "http://10.96.8.8/metrics-probe")
    scrape = curl(mesh.b, "http://127.0.0.1:15090/stats/prometheus").stdout
    series = [
        s
        for fam in text_string_to_metric_families(scrape)
        if fam.name == "istio_requests"
        for s in fam.samples
        if s.name == "istio_requests_total" and s.labels["reporter"] == "destination"
    ]
    assert series and all(s.labels["source_workload"] == "a" for s in series)
    assert all(
        s.labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/a" for s in series
    )


def test_L01_L02_sigterm_drains_inbound_while_outbound_serves_then_cleanup_restores_direct(
    mesh: Mesh,
) -> None:
    proxy_b = mesh.proxies["b"]
    proxy_b.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Inbound is closed to new connections: A's call fails (A's sidecar answers 503)...
    inbound = curl(
        mesh.a, "http://10.96.8.8/after-sigterm", "-o", "/dev/null", "-w", "%{http_code}"
    )
    assert inbound.stdout == "503"
    # ...while B's app can still call out through its sidecar (terminationDrainDuration 4s).
    outbound = curl(mesh.b, f"http://{OUT_IP}:9000/from-b")
    assert outbound.returncode == 0 and json.loads(outbound.stdout)["name"] == "outside"
    assert json.loads(outbound.stdout)["headers"].get("x-forwarded-proto") == "http"  # proxied
    assert proxy_b.poll() is None
    assert proxy_b.wait(timeout=15) == 0  # then it exits, cleanly
    mesh.proxies["a"].send_signal(signal.SIGTERM)
    assert mesh.proxies["a"].wait(timeout=15) == 0

    for ns in (mesh.a, mesh.b):
        out = sh(ns, sys.executable, "-m", "meshproxy", "iptables", "--cleanup")
        assert out.returncode == 0 and "removed" in out.stdout, out.stdout + out.stderr
    mesh.start_capture()
    direct = curl(mesh.a, f"http://{B_IP}:8080/{MARKER}/direct")
    wire = mesh.stop_capture()
    assert direct.returncode == 0, direct.stderr
    seen = json.loads(direct.stdout)
    assert seen["peer"] == f"{A_IP}:{seen['peer'].split(':')[1]}"  # straight from A, no proxy
    assert "x-forwarded-client-cert" not in seen["headers"]
    assert MARKER.encode() in wire  # plain traffic: the capture does see the bytes now
