"""Real interception: Istio's REDIRECT rules in a network namespace, SO_ORIGINAL_DST routing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.e2e.pods import REPO, Procs, curl, curl_status, ns_exec
from tests.support.metrics import series, value

pytestmark = pytest.mark.e2e


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
    status = curl_status(pod_ns, "http://10.78.0.2:8080/outside")
    assert status == "502"  # Istio's BlackHoleCluster answer for HTTP
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
