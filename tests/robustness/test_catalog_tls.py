"""Catalog group G (and F03, K07, K08): mTLS and SPIFFE identity between two real sidecars,
with certificates from the mesh CA and clients that present the wrong ones."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from meshproxy.security.ca import load_root, write_workload
from tests.integration import test_mtls as src_mtls
from tests.integration.test_mtls import (
    AUTHZ,
    CLIENT_ID,
    SERVER_ID,
    TD,
    Pair,
    _atomic_write,
    _raw_get,
    _seen,
    _tls_api,
    _tls_client,
    _TlsApp,
    _wait,
    ca,
    get,
    make_pair,
)
from tests.support.certs import leaf
from tests.support.metrics import scrape, value
from tests.support.proxy import free_port, running_proxy

pair = src_mtls.pair  # the fixture, shared with test_mtls.py


def test_F03_client_sent_xfcc_is_replaced(pair: Pair) -> None:
    status, _ = get(
        pair.out_port,
        "/spoof",
        "server.test",
        {"x-forwarded-client-cert": "URI=spiffe://evil/ns/x/sa/admin"},
    )
    assert status == 200
    xfcc = _seen(pair)["x-forwarded-client-cert"]
    assert "evil" not in xfcc and f"URI={CLIENT_ID}" in xfcc


def test_G01_strict_refuses_plaintext(pair: Pair) -> None:
    before = len(pair.app.state.requests)
    with socket.create_connection(("127.0.0.1", pair.in_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
    assert not data.startswith(b"HTTP/1.1 200")
    assert len(pair.app.state.requests) == before


def test_G02_strict_refuses_a_cert_from_another_ca(pair: Pair) -> None:
    ca("init", "--dir", str(pair.tmp / "other-ca"))
    ca(
        "issue",
        "--ca",
        str(pair.tmp / "other-ca"),
        "--spiffe-id",
        CLIENT_ID,
        "--out",
        str(pair.tmp / "intruder"),
    )
    ctx = _tls_client(pair.tmp / "intruder")
    ctx.verify_mode = ssl.CERT_NONE  # the intruder does not care who we are
    refused = False
    with socket.create_connection(("127.0.0.1", pair.in_port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                refused = s.recv(100) == b""  # TLS 1.3 reports the refused cert on read
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            refused = True
    assert refused
    failures = scrape(pair.server.admin)
    counted = sum(
        v for (n, _), v in failures.items() if n == "meshproxy_tls_handshake_failed_total"
    )
    assert counted >= 1  # a sample, not just the family's HELP line


def test_G03_authorization_policy_over_mtls(tmp_path: Path) -> None:
    p = make_pair(tmp_path, mode="PERMISSIVE", server_extra=AUTHZ)
    try:
        assert _raw_get(p.out_port, "/ok").startswith(b"HTTP/1.1 200")
        for bypass in (
            "/admin",
            "/admin/x",
            "/%61dmin",
            "/public/../admin",
            "//admin",
            "/public/%2e%2e/admin/x",
            "/ADMIN/../admin",
            "/admin#x",  # a fragment is no part of the path (CVE-2021-32779)
            "/admin#/../ok",
        ):
            reply = _raw_get(p.out_port, bypass)
            assert reply.startswith(b"HTTP/1.1 403"), (bypass, reply[:100])
            assert reply.endswith(b"RBAC: access denied")
        assert _raw_get(p.out_port, "/ok", "DELETE").startswith(b"HTTP/1.1 403")
        assert _raw_get(p.out_port, "/ok", "POST").startswith(b"HTTP/1.1 403")
        ok = _raw_get(p.out_port, "/ok", "POST", "x-token: let-me-in\r\n")
        assert ok.startswith(b"HTTP/1.1 200")
        # Straight to the server sidecar in plaintext (PERMISSIVE): no principal, no GET.
        assert _raw_get(p.in_port, "/ok").startswith(b"HTTP/1.1 403")
        # An escaped slash is refused before any policy could be fooled by it.
        assert _raw_get(p.out_port, "/x%2F..%2Fadmin").startswith(b"HTTP/1.1 400")
        assert _raw_get(p.out_port, "/ok#section").startswith(b"HTTP/1.1 200")
        paths = [r.path for r in p.app.state.requests]
        assert not any("admin" in x for x in paths), paths
        assert paths[-1] == "/ok", paths  # the fragment is not forwarded either
        denied = value(
            scrape(p.server.admin), "meshproxy_rbac_total", protocol="http", result="denied"
        )
        assert denied == 9 + 3  # the nine bypasses, DELETE, POST without token, plaintext GET
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


def test_G03_tcp_connections_are_authorized_too(tmp_path: Path, echo_server: int) -> None:
    admin, allowed, denied = free_port(), free_port(), free_port()
    resources = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-db-from-outside, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{ports: ["{denied}"], methods: [GET]}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - {{port: {{number: {allowed}, protocol: TCP, name: tcp-a}}, bind: 127.0.0.1,
     captureMode: NONE, defaultEndpoint: "127.0.0.1:{echo_server}"}}
  - {{port: {{number: {denied}, protocol: TCP, name: tcp-b}}, bind: 127.0.0.1,
     captureMode: NONE, defaultEndpoint: "127.0.0.1:{echo_server}"}}
"""
    with running_proxy(tmp_path, admin, resources) as proxy:
        with socket.create_connection(("127.0.0.1", allowed), timeout=5) as s:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        # The DENY rule's HTTP-only part (methods) is dropped for TCP: the port alone denies.
        with socket.create_connection(("127.0.0.1", denied), timeout=5) as s:
            try:
                s.sendall(b"ping")
                data = s.recv(4)
            except ConnectionResetError:
                data = b""
            assert data == b""
        denied = value(scrape(proxy.admin), "meshproxy_rbac_total", protocol="tcp", result="denied")
        assert denied == 1


def test_G04_G05_G06_strict_refuses_mesh_signed_certs_that_are_no_svid(pair: Pair) -> None:
    """Catalog G04/G05: the mesh CA signed them, OpenSSL accepts them, but none is a
    workload identity (two URI SANs, a trust domain only, a DNS name only, a CA leaf, a
    leaf that may sign certificates): refused before any byte reaches the app."""
    root = load_root(pair.tmp / "ca")
    shapes = {
        "two": leaf(root, [CLIENT_ID, "spiffe://cluster.local/ns/evil/sa/x"]),
        "domain": leaf(root, ["spiffe://cluster.local"]),
        "dns": leaf(root, [], dns=["client.default.svc"]),
        "ca": leaf(root, [CLIENT_ID], ca=True),
        "signer": leaf(root, [CLIENT_ID], key_cert_sign=True),
    }
    seen = len(pair.app.state.requests)
    for name, (cert, key) in shapes.items():
        write_workload(pair.tmp / f"shape-{name}", cert, key, [root.cert])
        ctx = _tls_client(pair.tmp / f"shape-{name}")
        refused = False
        with socket.create_connection(("127.0.0.1", pair.in_port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw) as s:
                    s.sendall(b"GET /shape HTTP/1.1\r\nHost: x\r\n\r\n")
                    refused = s.recv(100) == b""
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                refused = True
        assert refused, name
    assert len(pair.app.state.requests) == seen
    assert 'meshproxy_tls_handshake_failed_total{reason="invalid SVID"} 5.0' in (
        pair.server.metrics()
    )
    assert pair.get()[0] == 200  # a real SVID still gets through


def test_G07_san_mismatch_is_refused(tmp_path: Path) -> None:
    p = make_pair(tmp_path, sans=f"spiffe://{TD}/ns/default/sa/someone-else")
    try:
        status, body = p.get("/x")
        assert status == 503 and b"TLS error" in body
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


def test_G07_simple_origination_refuses_an_unknown_ca(tmp_path: Path) -> None:
    ca("init", "--dir", str(tmp_path / "ca"))
    ca("init", "--dir", str(tmp_path / "other"))
    ca(
        "issue",
        "--ca",
        str(tmp_path / "ca"),
        "--spiffe-id",
        SERVER_ID,
        "--dns",
        "api.example",
        "--out",
        str(tmp_path / "srv"),
    )
    app = _TlsApp(tmp_path / "srv", require_client_cert=False)
    admin, port = free_port(), free_port()
    resources = _tls_api(
        port, app.port, f"{{mode: SIMPLE, caCertificates: {tmp_path}/other/root-cert.pem}}"
    )
    try:
        with running_proxy(tmp_path, admin, resources):
            status, body = get(port, "/x", "api.example")
            assert status == 503 and b"CERTIFICATE_VERIFY_FAILED" in body
    finally:
        app.close()


def test_G08_permissive_accepts_plaintext_and_mtls_on_one_port(tmp_path: Path) -> None:
    p = make_pair(tmp_path, mode="PERMISSIVE")
    try:
        assert p.get("/over-mtls")[0] == 200
        assert "x-forwarded-client-cert" in _seen(p)
        status, _ = get(p.in_port, "/plain", "anything")
        assert status == 200
        assert "x-forwarded-client-cert" not in _seen(p)
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_G10_tls12_renegotiation_is_refused(pair: Pair) -> None:
    """Catalog G10: a client asking to renegotiate would make us redo a full handshake on
    demand; like Envoy, the proxy refuses (OpenSSL 3's default for client-initiated
    renegotiation, and OP_NO_RENEGOTIATION on every context of ours)."""
    certs = pair.tmp / "client"
    proc = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{pair.in_port}",
            "-tls1_2",
            "-cert",
            str(certs / "cert-chain.pem"),
            "-key",
            str(certs / "key.pem"),
            "-CAfile",
            str(certs / "root-cert.pem"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdin is not None
    time.sleep(0.5)  # handshake done
    proc.stdin.write("R\n")  # s_client: renegotiate
    proc.stdin.flush()
    time.sleep(0.5)
    try:
        proc.stdin.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        proc.stdin.flush()
    except BrokenPipeError:
        pass  # s_client already gave up: the server refused
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out, out[-2000:]
    assert "HTTP/1.1 " not in out  # the request after it never got an answer


@pytest.mark.stress  # it waits out the 10 s handshake timeout
def test_G10_a_stalled_handshake_is_closed_and_blocks_no_one(pair: Pair) -> None:
    """Catalog G08/G10: one byte of a ClientHello, then nothing: the connection is closed at
    the 10 s handshake timeout, and other clients are served meanwhile."""
    with socket.create_connection(("127.0.0.1", pair.in_port), timeout=15) as stalled:
        stalled.sendall(b"\x16")
        start = time.monotonic()
        assert pair.get("/meanwhile")[0] == 200  # through the client sidecar, over mTLS
        try:
            data = stalled.recv(100)
        except ConnectionResetError:
            data = b""
        waited = time.monotonic() - start
    assert data == b"" and 9.0 < waited < 13.0, (data, waited)


def test_K07_K08_rotation_of_leaf_and_root_under_traffic(pair: Pair) -> None:
    failures: list[object] = []
    done = threading.Event()

    def traffic() -> None:
        while not done.is_set():
            try:
                status, body = pair.get("/rot")
                if status != 200:
                    failures.append((status, body[:200]))
            except OSError as exc:
                failures.append(exc)
            time.sleep(0.01)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        before = pair.certs(pair.server_admin)["current"]["sha256"]  # type: ignore[index]
        # 1. a new leaf for the server, same root
        ca(
            "issue",
            "--ca",
            str(pair.tmp / "ca"),
            "--spiffe-id",
            SERVER_ID,
            "--out",
            str(pair.tmp / "server"),
        )
        _wait(lambda: pair.certs(pair.server_admin)["current"]["sha256"] != before)  # type: ignore[index]
        # 2. a new root: both sides trust old+new first, then the server moves to the new one
        ca("init", "--dir", str(pair.tmp / "ca2"))
        bundle = (pair.tmp / "ca" / "root-cert.pem").read_bytes() + (
            pair.tmp / "ca2" / "root-cert.pem"
        ).read_bytes()
        for side in ("client", "server"):
            _atomic_write(pair.tmp / side / "root-cert.pem", bundle)
        for admin in (pair.client_admin, pair.server_admin):
            _wait(lambda a=admin: pair.certs(a)["current"]["root_certificates"] == 2)  # type: ignore[index]
        ca(
            "issue",
            "--ca",
            str(pair.tmp / "ca2"),
            "--spiffe-id",
            SERVER_ID,
            "--out",
            str(pair.tmp / "server-new"),
        )
        for name in ("key.pem", "cert-chain.pem"):
            _atomic_write(pair.tmp / "server" / name, (pair.tmp / "server-new" / name).read_bytes())
        time.sleep(1.5)  # traffic keeps flowing across the swap
    finally:
        done.set()
        t.join()
    assert not failures, failures[:5]
    status, _ = pair.get("/after")
    assert status == 200


def test_K07_unreadable_or_mismatched_files_keep_the_last_good_identity(pair: Pair) -> None:
    good = pair.certs(pair.server_admin)["current"]["sha256"]  # type: ignore[index]
    other = pair.tmp / "other"
    ca("issue", "--ca", str(pair.tmp / "ca"), "--spiffe-id", SERVER_ID, "--out", str(other))
    _atomic_write(pair.tmp / "server" / "key.pem", (other / "key.pem").read_bytes())  # mismatch
    _wait(lambda: pair.certs(pair.server_admin)["last_error"] is not None)
    info = pair.certs(pair.server_admin)
    assert "does not match" in str(info["last_error"])
    assert info["current"]["sha256"] == good  # type: ignore[index]
    assert pair.get("/still")[0] == 200
    assert pair.server.proc.poll() is None
