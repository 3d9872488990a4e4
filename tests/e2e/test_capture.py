"""Real interception: Istio's REDIRECT rules in a network namespace, SO_ORIGINAL_DST routing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshproxy.intercept.apply import apply
from meshproxy.intercept.capture_config import resolve
from tests.e2e.pods import REPO, Procs, curl, ns_exec
from tests.support.metrics import series, value

pytestmark = pytest.mark.e2e

CONFIG = """
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: pod}
spec:
  proxyAdminPort: 15000
  statusPort: 15021
  drainDuration: 1s
  terminationDrainDuration: 0s  # the inbound-only drain is tested in test_two_pods.py
  protocolDetectionTimeout: 1s
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hello}
spec:
  hosts: [hello.e2e]
  addresses: [10.96.7.7]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 18090}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other.e2e]
  addresses: [10.96.7.9]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 18092}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db}
spec:
  hosts: [db.e2e]
  addresses: [10.96.7.8]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {tcp: 18091}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:18093
"""


@pytest.fixture
def pod(
    netns_pair: tuple[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[str, str, Procs]]:
    pod_ns, remote_ns = netns_pair
    policy = getattr(request, "param", "ALLOW_ANY")
    procs = Procs()
    serve = [sys.executable, "-m", "tests.support.serve"]
    try:
        procs.start(ns_exec(pod_ns, *serve, "hello", "127.0.0.1", "18090"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "other", "127.0.0.1", "18092"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "app", "127.0.0.1", "18093"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "tcp-db", "127.0.0.1", "18091"), ready="ready")
        # An app port no Sidecar declares, listening on all addresses as apps do.
        procs.start(ns_exec(pod_ns, *serve, "undeclared", "0.0.0.0", "18094"), ready="ready")
        apps = [sys.executable, "-m", "tests.support.apps"]
        procs.start(ns_exec(pod_ns, *apps, "banner", "0.0.0.0", "18095"), ready="ready")
        procs.start(ns_exec(pod_ns, *apps, "tls", "0.0.0.0", "18096"), ready="ready")
        procs.start(ns_exec(remote_ns, *serve, "outside", "10.78.0.2", "8080"), ready="ready")
        procs.start(ns_exec(pod_ns, *serve, "app-v6", "::", "18097"), ready="ready")
        procs.start(ns_exec(remote_ns, *serve, "outside-v6", "::", "8081"), ready="ready")
        cfg = Path(tempfile.mkdtemp(prefix="meshproxy-e2e-"))
        procs.cfg = cfg
        text = CONFIG
        if policy == "STRICT_MTLS":
            text = _with_strict_mtls(cfg)
            policy = "ALLOW_ANY"
        (cfg / "mesh.yaml").write_text(text + f"  outboundTrafficPolicy:\n    mode: {policy}\n")
        apply(resolve({}, {}), netns=pod_ns)  # the injector's defaults
        # The image's user, uid and gid 1337: Istio's rules exempt the proxy's traffic by owner.
        for path in (cfg, *cfg.rglob("*")):
            os.chown(path, 1337, 1337)
        proxy = procs.start(
            ns_exec(
                pod_ns,
                "setpriv",
                "--reuid",
                "1337",
                "--regid",
                "1337",
                "--clear-groups",
                sys.executable,
                "-m",
                "meshproxy",
                "run",
                "-c",
                str(cfg),
            )
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ns_exec(
                    pod_ns,
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15000/ready",
                ),
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if probe.stdout == "200":
                break
            assert proxy.poll() is None, proxy.stdout.read().decode() if proxy.stdout else ""
            time.sleep(0.1)
        else:
            pytest.fail("proxy in the namespace never became ready")
        yield pod_ns, remote_ns, procs
    finally:
        procs.stop()


def _with_strict_mtls(cfg: Path) -> str:
    """CONFIG plus a workload certificate and STRICT mTLS for the pod's inbound traffic."""

    def ca(*args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "meshproxy", "ca", *args],
            check=True,
            capture_output=True,
            timeout=30,
            cwd=REPO,
        )

    ca("init", "--dir", str(cfg / "ca"))
    ca(
        "issue",
        "--ca",
        str(cfg / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/app",
        "--out",
        str(cfg / "pod"),
    )
    ca(
        "issue",
        "--ca",
        str(cfg / "ca"),
        "--spiffe-id",
        "spiffe://cluster.local/ns/default/sa/caller",
        "--out",
        str(cfg / "caller"),
    )
    certs = (
        f"  certificates: {{certChain: {cfg}/pod/cert-chain.pem, "
        f"privateKey: {cfg}/pod/key.pem, rootCert: {cfg}/pod/root-cert.pem}}\n"
    )
    text = CONFIG.replace("  drainDuration: 1s\n", "  drainDuration: 1s\n" + certs, 1)
    sidecar_at = text.index("---\napiVersion: networking.istio.io/v1\nkind: Sidecar")
    return (
        text[:sidecar_at] + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n"
        + text[sidecar_at:]
    )


@pytest.mark.parametrize("pod", ["STRICT_MTLS"], indirect=True)
def test_inbound_capture_with_strict_mtls(pod: tuple[str, str, Procs]) -> None:
    _, remote_ns, procs = pod
    cfg = procs.cfg / "caller"
    cert = ["--cert", str(cfg / "cert-chain.pem"), "--key", str(cfg / "key.pem"), "-k"]
    out = curl(remote_ns, *cert, "-w", "\n%{http_version}", "--http2", "https://10.78.0.1:9080/in")
    assert '"name": "app"' in out and out.rstrip().endswith("2")  # ALPN h2 through capture
    assert "URI=spiffe://cluster.local/ns/default/sa/caller" in out  # x-forwarded-client-cert
    plain = subprocess.run(
        ns_exec(remote_ns, "curl", "-s", "--max-time", "5", "http://10.78.0.1:9080/in"),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert plain.returncode != 0 and '"name": "app"' not in plain.stdout


def test_outbound_http_routed_by_vip_then_by_host(pod: tuple[str, str, Procs]) -> None:
    pod_ns, _, _ = pod
    assert '"name": "hello"' in curl(pod_ns, "http://10.96.7.7/x")
    # Same VIP, another service's Host: the Host header decides on HTTP ports.
    assert '"name": "other"' in curl(pod_ns, "-H", "Host: other.e2e", "http://10.96.7.7/x")


def test_outbound_tcp_by_vip(pod: tuple[str, str, Procs]) -> None:
    pod_ns, _, _ = pod
    # The TCP service's endpoint is an HTTP server: bytes pass through untouched at L4.
    out = curl(pod_ns, "-H", "Host: anything", "http://10.96.7.8:5432/raw")
    assert '"name": "tcp-db"' in out and '"host": "anything"' in out


def test_unknown_destination_passes_through_under_allow_any(pod: tuple[str, str, Procs]) -> None:
    pod_ns, _, _ = pod
    out = curl(pod_ns, "http://10.78.0.2:8080/outside")
    assert '"name": "outside"' in out
    assert '"x-forwarded-proto": "http"' in out  # it went through the proxy's HTTP path


def test_L04_L05_inbound_http_to_an_undeclared_port_reaches_the_app_without_looping(
    pod: tuple[str, str, Procs],
) -> None:
    _, remote_ns, _ = pod
    out = json.loads(curl(remote_ns, "http://10.78.0.1:18094/undeclared"))
    assert out["name"] == "undeclared" and out["connection"] == 1
    # Delivered on loopback from Istio's inbound passthrough address, once.
    assert out["peer"].startswith("127.0.0.6:") and out["local"] == "127.0.0.1:18094"
    assert out["headers"]["x-forwarded-for"] == "10.78.0.2"
    # HTTP/2 with prior knowledge is sniffed by its preface, and reaches the same app.
    h2 = json.loads(curl(remote_ns, "--http2-prior-knowledge", "http://10.78.0.1:18094/h2"))
    assert h2["name"] == "undeclared" and h2["peer"].startswith("127.0.0.6:")


def test_server_first_protocol_on_an_undeclared_port_after_the_detection_timeout(
    pod: tuple[str, str, Procs],
) -> None:
    _, remote_ns, _ = pod
    started = time.monotonic()
    out = subprocess.run(
        ns_exec(
            remote_ns, sys.executable, "-m", "tests.support.apps", "client", "10.78.0.1", "18095"
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    waited = time.monotonic() - started
    assert out.stdout.splitlines() == ["220 banner-app ready peer=127.0.0.6", "echo hello"], (
        out.stdout + out.stderr
    )
    assert waited >= 1.0  # the greeting waited for protocolDetectionTimeout, then TCP


def test_the_apps_own_tls_passes_through_a_permissive_port(pod: tuple[str, str, Procs]) -> None:
    _, remote_ns, _ = pod
    script = (
        "import socket, ssl\n"
        "c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False\n"
        "c.verify_mode = ssl.CERT_NONE; c.set_alpn_protocols(['app-proto'])\n"
        "s = c.wrap_socket(socket.create_connection(('10.78.0.1', 18096), timeout=10),"
        " server_hostname='app.local')\n"
        "s.sendall(b'hi\\n'); print(s.recv(1024).decode().strip())\n"
    )
    out = subprocess.run(
        ns_exec(remote_ns, sys.executable, "-c", script),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # Not mesh TLS (no istio ALPN): the app terminated it itself, SNI and ALPN intact.
    assert out.stdout.strip() == "tls-app sni=app.local alpn=app-proto peer=127.0.0.6 got=hi", (
        out.stdout + out.stderr
    )


def test_ipv6_is_captured_both_ways(pod: tuple[str, str, Procs]) -> None:
    pod_ns, remote_ns, _ = pod
    inbound = json.loads(curl(remote_ns, "-g", "http://[fd00:78::1]:18097/v6-in"))
    # ip6tables redirected it to the proxy's [::] listener; the app got it on ::1 from ::6.
    assert inbound["name"] == "app-v6" and inbound["peer"].startswith("::6:")
    assert inbound["headers"]["x-forwarded-for"] == "fd00:78::2"
    outbound = json.loads(curl(pod_ns, "-g", "http://[fd00:78::2]:8081/v6-out"))
    assert outbound["name"] == "outside-v6"
    assert outbound["headers"]["x-forwarded-proto"] == "http"  # through the proxy


def test_inbound_goes_to_the_local_app_whatever_host_says(pod: tuple[str, str, Procs]) -> None:
    _, remote_ns, _ = pod
    out = curl(remote_ns, "-H", "Host: hello.e2e", "http://10.78.0.1:9080/in")
    assert '"name": "app"' in out
    assert '"x-forwarded-for": "10.78.0.2"' in out


def test_metrics_see_both_directions(pod: tuple[str, str, Procs]) -> None:
    pod_ns, remote_ns, _ = pod
    curl(pod_ns, "http://10.96.7.7/")
    curl(remote_ns, "http://10.78.0.1:9080/")
    samples = series(curl(pod_ns, "http://127.0.0.1:15000/stats/prometheus"))
    out = value(samples, "istio_requests_total", reporter="source", destination_service="hello.e2e")
    assert out == 1
    inbound = value(samples, "istio_requests_total", reporter="destination", response_code="200")
    assert inbound == 1


@pytest.mark.parametrize("pod", ["REGISTRY_ONLY"], indirect=True)
def test_registry_only_refuses_unknown_destinations(pod: tuple[str, str, Procs]) -> None:
    pod_ns, _, _ = pod
    assert '"name": "hello"' in curl(pod_ns, "http://10.96.7.7/x")  # known: still routed
    out = subprocess.run(
        ns_exec(
            pod_ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "http://10.78.0.2:8080/outside",
        ),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert out.stdout == "502"  # Istio's BlackHoleCluster answer for HTTP
    # Non-HTTP bytes to an unknown destination: the connection is closed, nothing relayed.
    probe = subprocess.run(
        ns_exec(
            pod_ns,
            sys.executable,
            "-c",
            "import socket; s=socket.create_connection(('10.78.0.2', 8080), timeout=5);"
            "s.sendall(b'\\x00\\x01binary'); print(repr(s.recv(100)))",
        ),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert probe.stdout.strip() == "b''", probe.stdout + probe.stderr
