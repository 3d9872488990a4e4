"""Catalog L04 (original destination, inbound pinning) and L05 (interception loops), in a pod
with Istio's REDIRECT rules around the proxy (tests/e2e/capture_pod.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.e2e.capture_pod import pod
from tests.e2e.pods import Procs, curl, curl_status, netns_pair, ns_exec
from tests.support.metrics import series, value

pytestmark = pytest.mark.e2e
__all__ = ["netns_pair", "pod"]  # the fixtures these tests use, from the e2e package

_METRICS = "http://127.0.0.1:15000/stats/prometheus"


def _rejected(pod_ns: str, reason: str) -> float | None:
    samples = series(curl(pod_ns, _METRICS))
    return value(samples, "meshproxy_downstream_rq_rejected_total", reason=reason)


def _in_pod(pod_ns: str, script: str) -> str:
    """Run a Python snippet as the app (root, whose traffic the rules capture)."""
    out = subprocess.run(
        ns_exec(pod_ns, sys.executable, "-c", script),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _open_fds(procs: Procs) -> int:
    assert procs.proxy is not None
    return len(os.listdir(f"/proc/{procs.proxy.pid}/fd"))


def test_L04_outbound_goes_to_the_original_destination_exactly(
    pod: tuple[str, str, Procs],
) -> None:
    pod_ns, _, _ = pod
    assert json.loads(curl(pod_ns, "http://10.96.7.7/x"))["name"] == "hello"
    # Same VIP, another service's Host: the Host header decides on HTTP ports.
    assert json.loads(curl(pod_ns, "-H", "Host: other.e2e", "http://10.96.7.7/x"))["name"] == (
        "other"
    )
    # No service for it (ALLOW_ANY): the address and port the app dialled, read with
    # SO_ORIGINAL_DST, are the ones the proxy connects to.
    out = json.loads(curl(pod_ns, "http://10.78.0.2:8080/outside"))
    assert out["name"] == "outside" and out["local"] == "10.78.0.2:8080"
    assert out["peer"].startswith("10.78.0.1:")
    assert out["headers"]["x-forwarded-proto"] == "http"  # through the proxy's HTTP path


def test_L04_ipv6_original_destination_both_ways(pod: tuple[str, str, Procs]) -> None:
    pod_ns, remote_ns, _ = pod
    inbound = json.loads(curl(remote_ns, "-g", "http://[fd00:78::1]:18097/v6-in"))
    # ip6tables redirected it to the proxy's [::] listener; the app got it on ::1 from ::6.
    assert inbound["name"] == "app-v6" and inbound["peer"].startswith("::6:")
    assert inbound["headers"]["x-forwarded-for"] == "fd00:78::2"
    # IP6T_SO_ORIGINAL_DST: the destination the app dialled over IPv6.
    outbound = json.loads(curl(pod_ns, "-g", "http://[fd00:78::2]:8081/v6-out"))
    assert outbound["name"] == "outside-v6" and outbound["local"] == "fd00:78::2:8081"
    assert outbound["headers"]["x-forwarded-proto"] == "http"  # through the proxy


@pytest.mark.parametrize("host", ["other-svc", "hello.e2e"])
def test_L04_inbound_reaches_the_local_app_whatever_host_says(
    pod: tuple[str, str, Procs], host: str
) -> None:
    _, remote_ns, _ = pod
    out = json.loads(curl(remote_ns, "-H", f"Host: {host}", "http://10.78.0.1:9080/in"))
    assert out["name"] == "app" and out["local"] == "127.0.0.1:18093"
    assert out["headers"]["host"] == host and out["headers"]["x-forwarded-for"] == "10.78.0.2"


def test_L05_inbound_to_an_undeclared_port_reaches_the_app_once(
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


def test_L05_a_connection_straight_to_a_capture_port_is_closed_and_counted(
    pod: tuple[str, str, Procs],
) -> None:
    pod_ns, _, procs = pod
    before = _open_fds(procs)
    script = (
        "import socket\n"
        "for port in (15001, 15006):\n"
        "    s = socket.create_connection(('127.0.0.1', port), timeout=5)\n"
        "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "    try:\n"
        "        print('closed' if s.recv(100) == b'' else 'answered')\n"
        "    except ConnectionResetError:\n"
        "        print('closed')  # closed with the request unread: a reset\n"
    )
    # Its original destination is the proxy itself: nothing to proxy to, no bytes back.
    assert _in_pod(pod_ns, script).splitlines() == ["closed", "closed"]
    assert _rejected(pod_ns, "no_original_dst") == 2
    assert _open_fds(procs) <= before + 1  # the scrape's connection may still be closing


@pytest.mark.parametrize("pod", ["UNEXEMPT"], indirect=True)
def test_L05_a_proxy_whose_own_traffic_is_captured_fails_once_without_looping(
    pod: tuple[str, str, Procs],
) -> None:
    pod_ns, _, procs = pod
    before = _open_fds(procs)
    # HTTP: the proxy's upstream connection is redirected back to it; that connection is
    # closed, so the request fails once (503, the upstream went away before its headers).
    status = curl_status(pod_ns, "http://10.78.0.2:8080/loop", max_time=10)
    assert status == "503"
    # TCP to an unknown destination: relayed, captured again, closed; the client sees EOF.
    script = (
        "import socket\n"
        "s = socket.create_connection(('10.78.0.2', 5555), timeout=5)\n"
        "s.sendall(b'\\x00\\x01binary')\n"
        "print(repr(s.recv(100)))\n"
    )
    assert _in_pod(pod_ns, script) == "b''"
    assert _rejected(pod_ns, "proxy_loop") == 2  # one hop each, not a chain
    assert _open_fds(procs) <= before + 2
