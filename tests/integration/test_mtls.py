"""Mutual TLS between two real meshproxy sidecars, with certificates from `meshproxy ca`.

client app ─► client sidecar (egress :out, DestinationRule ISTIO_MUTUAL)
           ══ mTLS ══► server sidecar (ingress :in, PeerAuthentication) ─► server app
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.metrics import scrape, value
from tests.support.proxy import (
    ProxyProcess,
    egress_sidecar,
    free_port,
    http_get,
    running_proxy,
    service_entry,
)
from tests.support.upstream import UpstreamServer

TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
SERVER_ID = f"spiffe://{TD}/ns/default/sa/server"


def ca(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", *args],
        check=True,
        capture_output=True,
        timeout=30,
    )


@dataclass
class Pair:
    tmp: Path
    client: ProxyProcess
    server: ProxyProcess
    app: UpstreamServer
    out_port: int  # client sidecar egress (HTTP/1.1 to the server sidecar)
    out_h2_port: int  # client sidecar egress (HTTP2 port: HTTP/2 inside mTLS)
    in_port: int  # server sidecar ingress
    server_admin: int
    client_admin: int

    def get(self, path: str = "/hello", h2: bool = False) -> tuple[int, bytes]:
        if h2:
            return get(self.out_h2_port, path, "server-h2.test")
        return get(self.out_port, path, "server.test")

    def certs(self, admin: int) -> dict[str, object]:
        return json.loads(http_get(f"http://127.0.0.1:{admin}/certs")[1])  # type: ignore[no-any-return]


def get(
    port: int, path: str, host: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Host": host, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _server_yaml(
    admin: int, in_port: int, app: int, certs: Path, mode: str, extra: str = "", spec: str = ""
) -> str:
    return (
        extra
        + f"""
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: server}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  drainDuration: 2s
  labels: {{app: server, version: v2}}
  workloadName: server-wl{spec}
  certificates:
    certChain: {certs}/cert-chain.pem
    privateKey: {certs}/key.pem
    rootCert: {certs}/root-cert.pem
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server, namespace: default}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: {mode}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server}}
spec:
  hosts: [server.test]
  ports: [{{number: {in_port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, labels: {{app: server}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  ingress:
  - port: {{number: {in_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:{app}
"""
    )


def _client_yaml(
    admin: int, out: int, out_h2: int, in_port: int, certs: Path, sans: str, spec: str = ""
) -> str:
    return f"""
apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {{name: client}}
spec:
  interceptionMode: NONE
  proxyAdminPort: {admin}
  statusPort: 0
  drainDuration: 2s
  labels: {{app: client, version: v1}}
  workloadName: client-wl{spec}
  certificates:
    certChain: {certs}/cert-chain.pem
    privateKey: {certs}/key.pem
    rootCert: {certs}/root-cert.pem
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server}}
spec:
  hosts: [server.test]
  ports: [{{number: {out}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {in_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server-h2}}
spec:
  hosts: [server-h2.test]
  ports: [{{number: {out_h2}, name: http2, protocol: HTTP2}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http2: {in_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server}}
spec:
  host: server.test
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL, subjectAltNames: [{sans}]}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server-h2}}
spec:
  host: server-h2.test
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {out}, protocol: HTTP, name: http}}, bind: 127.0.0.1, hosts: [./*]}}
  - {{port: {{number: {out_h2}, protocol: HTTP2, name: h2}}, bind: 127.0.0.1, hosts: [./*]}}
"""


def make_pair(
    tmp: Path,
    mode: str = "STRICT",
    sans: str = SERVER_ID,
    server_extra: str = "",
    access_logs: bool = False,
) -> Pair:
    """Two sidecars; `access_logs`: each writes Istio's default format to <tmp>/<side>.access."""
    ca("init", "--dir", str(tmp / "ca"))
    ca("issue", "--ca", str(tmp / "ca"), "--spiffe-id", CLIENT_ID, "--out", str(tmp / "client"))
    ca("issue", "--ca", str(tmp / "ca"), "--spiffe-id", SERVER_ID, "--out", str(tmp / "server"))
    app = UpstreamServer("app").start()
    s_admin, c_admin, in_port, out, out_h2 = (free_port() for _ in range(5))
    (tmp / "scfg").mkdir()
    (tmp / "scfg" / "mesh.yaml").write_text(
        _server_yaml(
            s_admin,
            in_port,
            app.port,
            tmp / "server",
            mode,
            server_extra,
            f"\n  accessLogFile: {tmp}/server.access" if access_logs else "",
        )
    )
    (tmp / "ccfg").mkdir()
    (tmp / "ccfg" / "mesh.yaml").write_text(
        _client_yaml(
            c_admin,
            out,
            out_h2,
            in_port,
            tmp / "client",
            sans,
            f"\n  accessLogFile: {tmp}/client.access" if access_logs else "",
        )
    )
    server = ProxyProcess(tmp / "scfg", s_admin, tmp / "server.log")
    client = ProxyProcess(tmp / "ccfg", c_admin, tmp / "client.log")
    server.wait_ready()
    client.wait_ready()
    return Pair(tmp, client, server, app, out, out_h2, in_port, s_admin, c_admin)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = make_pair(tmp_path, access_logs=True)
    try:
        yield p
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


def _seen(p: Pair) -> dict[str, str]:
    return p.app.state.requests[-1].headers  # type: ignore[no-any-return]


def test_request_crosses_mtls_with_identities(pair: Pair) -> None:
    status, _ = pair.get("/hello")
    assert status == 200
    headers = _seen(pair)
    xfcc = headers["x-forwarded-client-cert"]
    assert f"URI={CLIENT_ID}" in xfcc and f"By={SERVER_ID}" in xfcc and "Hash=" in xfcc
    samples = scrape(pair.server.admin)
    requests = value(
        samples,
        "istio_requests_total",
        source_principal=CLIENT_ID,
        connection_security_policy="mutual_tls",
    )
    assert requests == 1
    certs = pair.certs(pair.server_admin)
    assert certs["current"]["spiffe_id"] == SERVER_ID  # type: ignore[index]


def _addresses(log: Path) -> list[str]:
    """%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS%
    %REQUESTED_SERVER_NAME% %ROUTE_NAME%: the last five fields of Istio's default format."""
    _wait(lambda: log.exists() and log.read_text().strip())
    (line,) = log.read_text().splitlines()
    return line.split(" ")[-5:]


def test_access_logs_name_both_connections_and_the_sni(pair: Pair) -> None:
    status, body = pair.get("/hello")
    assert status == 200
    client = _addresses(pair.tmp / "client.access")
    server = _addresses(pair.tmp / "server.access")
    up_local, down_local, _down_remote, sni, _route = client
    assert down_local == f"127.0.0.1:{pair.out_port}" and sni == "-"  # plaintext from the app
    # The client sidecar's end of the mTLS connection is the server sidecar's downstream,
    # which heard Istio's SNI for the cluster.
    assert up_local.startswith("127.0.0.1:") and up_local != f"127.0.0.1:{pair.in_port}"
    s_up_local, s_down_local, s_down_remote, s_sni, _ = server
    assert (s_down_local, s_down_remote) == (f"127.0.0.1:{pair.in_port}", up_local)
    assert s_sni == f"outbound_.{pair.out_port}_._.server.test"
    assert s_up_local == json.loads(body)["peer"]  # the app saw the server sidecar's end


def test_authorization_matches_the_connection_sni(tmp_path: Path) -> None:
    policy = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sni, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  rules: [{when: [{key: connection.sni, values: ["*_.server.test"]}]}]
---
"""
    p = make_pair(tmp_path, server_extra=policy)
    try:
        assert p.get("/hello")[0] == 200  # SNI outbound_.<port>_._.server.test
        status, body = p.get("/hello", h2=True)  # SNI ..._.server-h2.test: no rule allows it
        assert status == 403 and body == b"RBAC: access denied"
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


ISTIO_SERIES_BOTH_SIDES = dict(
    source_workload="client-wl",
    source_app="client",
    source_version="v1",
    source_canonical_service="client",
    source_canonical_revision="v1",
    source_workload_namespace="default",
    source_principal=CLIENT_ID,
    source_cluster="Kubernetes",
    destination_workload="server-wl",
    destination_app="server",
    destination_version="v2",
    destination_canonical_service="server",
    destination_canonical_revision="v2",
    destination_workload_namespace="default",
    destination_principal=SERVER_ID,
    destination_cluster="Kubernetes",
    destination_service="server.test",
    request_protocol="http",
    response_code="200",
    response_flags="-",
)


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_each_sidecars_series_name_the_other_workload(pair: Pair, h2: bool) -> None:
    """Istio's metadata exchange between two sidecars over mTLS: the client's series (source
    report) and the server's (destination report) both carry both workloads' facts, and
    neither the app nor the calling client ever sees the exchange headers."""
    for _ in range(3):
        status, _ = pair.get("/hello", h2=h2) if not h2 else pair.get("/h2", h2=True)
        assert status == 200
    service = "server-h2.test" if h2 else "server.test"
    expected = {**ISTIO_SERIES_BOTH_SIDES, "destination_service": service}
    client = scrape(pair.client.admin)
    assert value(client, "istio_requests_total", reporter="source", **expected) == 3
    assert (
        value(client, "istio_request_duration_milliseconds_count", reporter="source", **expected)
        == 3
    )
    server = scrape(pair.server.admin)
    server_expected = {
        **expected,
        "destination_service": "server.test" if not h2 else "unknown",
        "connection_security_policy": "mutual_tls",
    }
    assert value(server, "istio_requests_total", reporter="destination", **server_expected) == 3
    seen = _seen(pair)
    assert "x-envoy-peer-metadata" not in seen and "x-envoy-peer-metadata-id" not in seen
    raw = _raw_client_get(pair.out_port, "server.test")
    assert b"x-envoy-peer-metadata" not in raw.lower()


def _raw_client_get(port: int, host: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /raw HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_forged_peer_metadata_header_changes_nothing(pair: Pair) -> None:
    """An app (or a client outside the mesh) cannot name itself another workload: what it
    sends as x-envoy-peer-metadata is dropped, and the server still sees the real client."""
    from meshproxy.config.resources import ProxySettings
    from meshproxy.observe.workload import encode, local_workload

    forged = encode(
        local_workload(ProxySettings(namespace="prod", workload_name="admin", labels=())), ()
    ).decode()
    status, _ = get(pair.out_port, "/hello", "server.test", {"x-envoy-peer-metadata": forged})
    assert status == 200
    server = scrape(pair.server.admin)
    assert (
        value(server, "istio_requests_total", reporter="destination", source_workload="client-wl")
        == 1
    )
    assert value(server, "istio_requests_total", source_workload="admin") is None


def test_http2_rides_inside_mtls_by_alpn(pair: Pair) -> None:
    status, body = pair.get("/h2", h2=True)
    assert status == 200, body
    assert f"URI={CLIENT_ID}" in _seen(pair)["x-forwarded-client-cert"]


def _tls_client(certs: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(certs / "root-cert.pem"))
    ctx.load_cert_chain(str(certs / "cert-chain.pem"), str(certs / "key.pem"))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def test_curl_http2_over_mtls_to_the_server_sidecar(pair: Pair) -> None:
    certs = pair.tmp / "client"
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "-k",
            "--cert",
            str(certs / "cert-chain.pem"),
            "--key",
            str(certs / "key.pem"),
            "-w",
            "\n%{http_version} %{http_code}",
            f"https://127.0.0.1:{pair.in_port}/curl",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert r.stdout.rstrip().endswith("2 200"), r.stderr
    assert f"URI={CLIENT_ID}" in _seen(pair)["x-forwarded-client-cert"]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.replace(path)


def _wait(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


AUTHZ = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin, /admin/*]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-client, namespace: default}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  rules:
  - from: [{{source: {{principals: ["{CLIENT_ID[len("spiffe://") :]}"]}}}}]
    to: [{{operation: {{methods: [GET]}}}}]
  - to: [{{operation: {{methods: [POST]}}}}]
    when: [{{key: "request.headers[x-token]", values: [let-me-in]}}]
---
"""


def _raw_get(port: int, target: str, method: str = "GET", extra: str = "") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: server.test\r\n{extra}"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _tls_api(port: int, app_port: int, tls: str) -> str:
    """api.example behind an egress listener, its DestinationRule originating `tls`."""
    return (
        service_entry("api.example", port, [app_port])
        + "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: api}\n"
        + f"spec: {{host: api.example, trafficPolicy: {{tls: {tls}}}}}\n---\n"
        + egress_sidecar(port)
    )


class _TlsApp:
    """A plain TLS HTTP server (not a sidecar): for SIMPLE and MUTUAL origination."""

    def __init__(self, certs: Path, require_client_cert: bool) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(certs / "cert-chain.pem"), str(certs / "key.pem"))
        if require_client_cert:
            self.ctx.load_verify_locations(str(certs / "root-cert.pem"))
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sni: list[str | None] = []
        self.ctx.sni_callback = lambda obj, name, ctx: self.sni.append(name)  # type: ignore[assignment]
        self.peers: list[object] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    self.peers.append(s.getpeercert())
                    s.recv(65536)
                    s.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\ntls"
                    )
            except (ssl.SSLError, OSError):
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("mode", ["SIMPLE", "MUTUAL"])
def test_simple_and_mutual_origination_to_a_tls_server(tmp_path: Path, mode: str) -> None:
    ca("init", "--dir", str(tmp_path / "ca"))
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
    ca(
        "issue",
        "--ca",
        str(tmp_path / "ca"),
        "--spiffe-id",
        CLIENT_ID,
        "--out",
        str(tmp_path / "cli"),
    )
    app = _TlsApp(tmp_path / "srv", require_client_cert=mode == "MUTUAL")
    admin, port = free_port(), free_port()
    ca_file = tmp_path / "srv" / "root-cert.pem"
    client_files = ""
    if mode == "MUTUAL":
        client_files = (
            f", clientCertificate: {tmp_path}/cli/cert-chain.pem, "
            f"privateKey: {tmp_path}/cli/key.pem"
        )
    resources = _tls_api(
        port,
        app.port,
        f"{{mode: {mode}, caCertificates: {ca_file}, sni: api.example{client_files}}}",
    )
    try:
        with running_proxy(tmp_path, admin, resources):
            status, body = get(port, "/x", "api.example")
            assert (status, body) == (200, b"tls")
            assert app.sni[-1] == "api.example"  # SNI as configured; hostname verified on it
            if mode == "MUTUAL":
                peer = app.peers[-1]
                assert isinstance(peer, dict) and ("URI", CLIENT_ID) in peer["subjectAltName"]
    finally:
        app.close()
