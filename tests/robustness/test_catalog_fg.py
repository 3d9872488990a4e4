"""Robustness catalog, groups F (identity and header integrity) and G (TLS), the cases not
covered elsewhere: F04 hop-by-hop abuse, F06 injection through values the proxy writes back
(headers and log lines), G09 outbound downgrade. Real proxy, real sockets, both codecs where
the codec matters."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MeshFactory
from tests.integration.test_http_proxy import raw
from tests.integration.test_mtls import SERVER_ID, Pair, _atomic_write, ca, make_pair
from tests.support.metrics import scrape, value
from tests.support.proxy import egress_sidecar, free_port, running_proxy, service_entry, wait_for


def test_F04_hop_by_hop_abuse(make_mesh: MeshFactory, codec: str) -> None:
    """Connection names headers the proxy itself sets: the client's copies go, the proxy's
    own are written after Connection processing and reach the app; Connection never does."""
    mesh = make_mesh(codec)
    reply = raw(
        mesh.http_port,
        b"GET /hop HTTP/1.1\r\nHost: hello.test\r\n"
        b"Connection: close, X-Forwarded-For, X-Request-Id, X-Forwarded-Proto, X-Custom\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-Request-Id: forged\r\nX-Forwarded-Proto: https\r\n"
        b"X-Custom: gone\r\nX-Kept: kept\r\n\r\n",
        wait=3,
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    seen = json.loads(reply.partition(b"\r\n\r\n")[2])["headers"]
    assert "connection" not in seen and "x-custom" not in seen
    assert "x-forwarded-for" not in seen  # outbound adds none; the client's was listed
    assert seen["x-request-id"] not in ("", "forged")  # the proxy's own
    assert seen["x-forwarded-proto"] == "http"  # the proxy's own, not the client's "https"
    assert seen["x-kept"] == "kept"


def test_F06_control_bytes_never_split_a_log_line(make_mesh: MeshFactory, tmp_path: Path) -> None:
    """Values the client controls (path, headers) reach the access log escaped: every line
    stays one JSON object, whatever the bytes."""
    log = tmp_path / "access.json"
    spec = f"""  extensionProviders:
  - name: json
    envoyFileAccessLog:
      path: {log}
      logFormat:
        labels: {{path: "%REQ(:PATH)%", agent: "%REQ(USER-AGENT)%", id: "%REQ(X-REQUEST-ID)%",
                 line: "%REQ(:METHOD)% %REQ(X-NOTE)%"}}
  defaultProviders: {{accessLogging: [json]}}"""
    mesh = make_mesh(extra_spec=spec)
    payloads = [
        b'"}\n{"status":200',  # quotes: JSON inside a value
        b"\x85admin\xa0\xff",  # obs-text: kept byte-exact, escaped in the log
        b"a\tb",
    ]
    for note in payloads:
        reply = raw(
            mesh.http_port,
            b"GET /x%0a%7B%22s%22 HTTP/1.1\r\nHost: hello.test\r\nUser-Agent: " + note + b"\r\n"
            b"X-Request-Id: " + note + b"\r\nX-Note: " + note + b"\r\nConnection: close\r\n\r\n",
        )
        # 400 (a raw newline ends the field), or forwarded (200; 503 where the test's h11
        # upstream itself refuses obs-text): what matters is the log.
        assert reply.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 400 ", b"HTTP/1.1 503 ")), reply
    assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2)
    lines = log.read_text().splitlines()
    objects = [json.loads(line) for line in lines]  # each line is one object
    logged = {o["agent"] for o in objects}
    assert '"}\n{"status":200' not in logged  # a raw newline never got in (400, not logged)
    assert "\x85admin\xa0\xff" in logged or "\x85admin\xa0ÿ" in logged  # byte-exact (latin-1)
    # The path as forwarded (percent-escapes normalized to upper case), still escaped.
    assert all(o["path"] == "/x%0A%7B%22s%22" for o in objects)
    assert "GET \\x85admin\\xa0\\xff" in {o["line"] for o in objects}  # text: escaped


class _PlaintextServer:
    """Speaks plaintext HTTP to whatever connects (a destination that should be mTLS), and
    records what it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nplaintext")
                except OSError:
                    pass


def test_G09_outbound_downgrade_is_refused(tmp_path: Path) -> None:
    """A destination that must be mTLS answers in plaintext: 503 UF with the TLS reason,
    never a plaintext retry, and no request byte in clear text."""
    for name in ("ca", "me"):
        (tmp_path / name).mkdir()
    cli = [sys.executable, "-m", "meshproxy", "ca"]
    subprocess.run([*cli, "init", "--dir", str(tmp_path / "ca")], check=True, capture_output=True)
    subprocess.run(
        [*cli, "issue", "--ca", str(tmp_path / "ca"), "--spiffe-id",
         "spiffe://cluster.local/ns/default/sa/me", "--out", str(tmp_path / "me")],
        check=True, capture_output=True,
    )  # fmt: skip
    server = _PlaintextServer()
    port, admin = free_port(), free_port()
    resources = (
        service_entry("db.test", port, [server.port])
        + "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db}\n"
        "spec: {host: db.test, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}\n---\n"
        + egress_sidecar(port)
    )
    certs = tmp_path / "me"
    with running_proxy(
        tmp_path,
        admin,
        resources,
        certificates=f"{{certChain: {certs}/cert-chain.pem, privateKey: {certs}/key.pem, "
        f"rootCert: {certs}/root-cert.pem}}",
    ) as proxy:
        reply = raw(port, b"GET /secret HTTP/1.1\r\nHost: db.test\r\nConnection: close\r\n\r\n", 5)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"TLS error" in reply and b"plaintext" not in reply
        assert server.received and all(r[:1] == b"\x16" for r in server.received)  # ClientHellos
        assert not any(b"/secret" in r for r in server.received)
        samples = scrape(proxy.admin)
        failed = value(samples, "istio_requests_total", response_code="503")
        assert failed == 1


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[Pair]:
    """Two sidecars with STRICT mTLS between them (tests/integration/test_mtls.py)."""
    p = make_pair(tmp_path)
    try:
        yield p
    finally:
        p.client.terminate()
        p.server.terminate()
        p.app.stop()


def _s_client(pair: Pair, *args: str) -> str:
    """openssl s_client as the mesh client (its SVID, the mesh root): the handshake, one
    request, and the session report."""
    client = pair.tmp / "client"
    proc = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{pair.in_port}",
            "-tls1_2",
            "-cert",
            str(client / "cert-chain.pem"),
            "-key",
            str(client / "key.pem"),
            "-CAfile",
            str(client / "root-cert.pem"),
            "-ign_eof",
            *args,
        ],
        input=b"GET /g11 HTTP/1.1\r\nHost: server.test\r\nConnection: close\r\n\r\n",
        capture_output=True,
        timeout=20,
    )
    return (proc.stdout + proc.stderr).decode(errors="replace")


def test_G11_no_resumption_after_the_trust_changed(mtls: Pair) -> None:
    """A session from before a CA rotation that drops the client's CA cannot be resumed:
    a new trust bundle is a new TLS context (new ticket keys, a new session cache), so the
    reconnect is a full handshake, and that fails."""
    session = mtls.tmp / "session.pem"
    first = _s_client(mtls, "-sess_out", str(session))
    assert "HTTP/1.1 200" in first, first[-2000:]
    again = _s_client(mtls, "-sess_in", str(session))
    assert "Reused, TLSv1.2" in again, again[-2000:]  # resumption works while trust holds
    before = mtls.certs(mtls.server_admin)["current"]["sha256"]  # type: ignore[index]
    ca("init", "--dir", str(mtls.tmp / "ca2"))
    ca(
        "issue",
        "--ca",
        str(mtls.tmp / "ca2"),
        "--spiffe-id",
        SERVER_ID,
        "--out",
        str(mtls.tmp / "server-new"),
    )
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        _atomic_write(mtls.tmp / "server" / name, (mtls.tmp / "server-new" / name).read_bytes())
    assert wait_for(lambda: mtls.certs(mtls.server_admin)["current"]["sha256"] != before)  # type: ignore[index]
    after = _s_client(mtls, "-sess_in", str(session))
    assert "Reused" not in after, after[-2000:]
    assert "HTTP/1.1 200" not in after, after[-2000:]
