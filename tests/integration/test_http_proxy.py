"""HTTP/1.1 through a real `meshproxy run` process, with real clients (curl, http.client)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import MeshFactory
from tests.support.metrics import scrape, value
from tests.support.proxy import env_without_proxy, http_get

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        env=env_without_proxy(),
        timeout=30,
        check=False,
    )


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers={"Host": "hello.test", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


@needs_curl
def test_curl_get_is_routed_with_envoy_headers(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    out = curl(
        "-H",
        "Host: hello.test",
        "-H",
        "Connection: keep-alive, x-hop",
        "-H",
        "x-hop: secret",
        "-D",
        "-",
        mesh.url + "/hello?q=1",
    )
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200")
    seen = json.loads(body)
    assert seen["name"] == "v1" and seen["path"] == "/hello?q=1"
    h = seen["headers"]
    assert h["host"] == "hello.test"
    assert h["x-forwarded-proto"] == "http"
    assert len(h["x-request-id"]) == 36
    assert "x-hop" not in h and "connection" not in h  # hop-by-hop, incl. Connection-named
    assert "x-envoy-upstream-service-time" in head.lower()


def test_keep_alive_reuses_one_upstream_connection(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    for i in range(20):
        conn.request("GET", f"/r{i}", headers={"Host": "hello.test"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()
    assert len(mesh.v1.state.requests) == 20
    assert mesh.v1.state.connections == 1


def test_route_features_rewrite_headers_canary(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    status, headers, body = request(
        mesh.http_port, "GET", "/old/x?y=1", {"x-drop-me": "1", "x-keep": "2"}
    )
    seen = json.loads(body)
    assert status == 200 and seen["path"] == "/new/x?y=1"
    assert seen["headers"]["x-added"] == "yes" and "x-drop-me" not in seen["headers"]
    assert seen["headers"]["x-envoy-original-path"] == "/old/x?y=1"
    assert headers["x-route"] == "rewrite"
    _, _, body = request(mesh.http_port, "GET", "/", {"x-canary": "1"})
    assert json.loads(body)["name"] == "v2"


def test_weighted_split_is_statistically_right(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(split=(90, 10))
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    names = []
    for _ in range(2000):
        conn.request("GET", "/", headers={"Host": "hello.test"})
        resp = conn.getresponse()
        names.append(resp.getheader("x-upstream"))
        resp.read()
    share = names.count("v2") / len(names)
    # 10 % of 2,000: sigma = sqrt(0.1 * 0.9 / 2000) = 0.67 points; ±3 points is 4.5 sigma.
    assert 0.07 < share < 0.13, share


def raw(port: int, payload: bytes, wait: float = 2.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(payload)
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            out += data
        return out


@pytest.mark.parametrize(
    "payload",
    [
        b"POST /content HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        b"POST /content HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 5\r\n"
        b"Content-Length: 10\r\n\r\nhelloworld",
        b"GET /content HTTP/1.1\r\nHost: hello.test\r\nX-A: a\r\n b\r\n\r\n",
        b"GET /content HTTP/1.1\nHost: hello.test\n\n",
        b"POST /content HTTP/1.1\r\nHost: hello.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x5\r\nhello\r\n0\r\n\r\nGET /blockedz HTTP/1.1\r\nHost: hello.test\r\n\r\n",
    ],
    ids=["cl-te", "dup-cl", "obs-fold", "bare-lf", "bad-chunk"],
)
def test_smuggling_attempts_get_400_and_never_reach_upstream(
    make_mesh: MeshFactory, codec: str, payload: bytes
) -> None:
    mesh = make_mesh(codec)
    out = raw(mesh.http_port, payload)
    assert out.startswith(b"HTTP/1.1 400"), out
    assert b"connection: close" in out.lower()
    seen = [r.path for r in mesh.v1.state.requests + mesh.v2.state.requests]
    assert "/blockedz" not in seen
    assert not mesh.v1.state.completed and not mesh.v2.state.completed


def test_pipelined_requests_after_a_bad_one_are_dropped(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    out = raw(
        mesh.http_port,
        b"GET /first HTTP/1.1\r\nHost: hello.test\r\n\r\n"
        b"INVALID\r\n\r\nGET /blockedz HTTP/1.1\r\nHost: hello.test\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in out
    assert [r.path for r in mesh.v1.state.requests] == ["/first"]


@needs_curl
def test_oversized_headers_get_431(make_mesh: MeshFactory, codec: str) -> None:
    mesh = make_mesh(codec)
    out = curl(
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: hello.test",
        "-H",
        "x-big: " + "a" * (61 * 1024),
        mesh.url + "/",
    )
    assert out.stdout == "431"
    many = [arg for i in range(101) for arg in ("-H", f"x-h{i}: v")]
    out = curl(
        "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: hello.test", *many, mesh.url + "/"
    )
    assert out.stdout == "431"
    assert not mesh.v1.state.requests


@needs_curl
def test_expect_100_continue_with_curl(make_mesh: MeshFactory, codec: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    mesh = make_mesh(codec)
    body = tmp_path / "body.bin"
    body.write_bytes(b"z" * 200_000)
    out = curl(
        "-H",
        "Host: hello.test",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        f"@{body}",
        mesh.url + "/upload",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["size"] == 200_000
    assert "expect" not in {k.lower() for k in mesh.v1.state.requests[-1].headers}


def test_http10_gets_426(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    assert raw(mesh.http_port, b"GET / HTTP/1.0\r\nHost: hello.test\r\n\r\n").startswith(
        b"HTTP/1.1 426"
    )


def test_dns_resolution_cluster(tmp_path, make_mesh: MeshFactory) -> None:  # type: ignore[no-untyped-def]
    """resolution: DNS resolves endpoint names asynchronously (localhost → 127.0.0.1)."""
    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    from tests.integration.conftest import mesh_yaml

    v1 = params["v1"]
    text = mesh_yaml(**params).replace(
        f"  resolution: STATIC\n  endpoints:\n  - {{address: 127.0.0.1, ports: {{http: {v1}}}",
        f"  resolution: DNS\n  endpoints:\n  - {{address: localhost, ports: {{http: {v1}}}",
    )
    assert "resolution: DNS" in text
    (mesh.config_dir / "mesh.yaml").write_text(text)
    deadline = time.monotonic() + 10
    while "config version 2 applied" not in mesh.proxy.log():
        assert time.monotonic() < deadline, mesh.proxy.log()
        time.sleep(0.05)
    for _ in range(10):
        status, headers, _ = request(mesh.http_port, "GET", "/")
        assert status == 200 and headers["x-upstream"] == "v1"
    clusters = json.loads(http_get(mesh.proxy.admin + "/clusters?format=json")[1])
    v1 = next(
        c
        for c in clusters["cluster_statuses"]
        if c["name"].startswith("outbound|") and "|v1|" in c["name"]
    )
    assert [h["address"] for h in v1["host_statuses"]] == [f"127.0.0.1:{params['v1']}"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answer(s: socket.socket) -> bytes:
    s.sendall(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def status_of_new_connection(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return _answer(s).split(b" ")[1]
    except (OSError, IndexError):
        return b""


@pytest.mark.parametrize(("n", "status"), [(2, 200), (50, 502)])
def test_interim_responses_are_dropped_and_floods_cut(
    make_mesh: MeshFactory, codec: str, n: int, status: int
) -> None:
    """Read off the wire (http.client would hide 1xx itself): no interim response reaches
    the client, and a flood of them is a broken upstream (502)."""
    mesh = make_mesh(codec)
    out = raw(
        mesh.http_port,
        f"GET /interim?n={n} HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n".encode(),
        wait=5,
    )
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:200]
    assert b"HTTP/1.1 100" not in out and out.count(b"HTTP/1.1 ") == 1
    if status == 200:
        assert out.endswith(b"\r\n\r\nok")


def test_header_names_with_underscores_are_dropped_by_default(
    make_mesh: MeshFactory, codec: str
) -> None:
    """`X_User` would reach a CGI/WSGI app as HTTP_X_USER, like `X-User`: by default it is
    removed (Envoy's DROP_HEADER) and counted; the request goes on (catalog B02)."""
    mesh = make_mesh(codec)
    status, _, body = request(
        mesh.http_port, "GET", "/u", {"X_User": "admin", "X-User": "alice", "x_b": "1"}
    )
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-user"] == "alice" and not any("_" in name for name in seen), seen
    dropped = "meshproxy_downstream_headers_dropped_total"
    assert value(scrape(mesh.proxy.admin), dropped, reason="underscores") == 2
    if CURL is not None:  # the same over HTTP/2 (h2c, prior knowledge)
        h2 = curl(
            "--http2-prior-knowledge",
            "-H",
            "X_User: admin",
            "-H",
            "Host: hello.test",
            f"{mesh.url}/u2",
        )
        seen = json.loads(h2.stdout)["headers"]
        assert "x_user" not in seen, seen
        assert value(scrape(mesh.proxy.admin), dropped, reason="underscores") == 3


@pytest.mark.parametrize(
    ("action", "expected"), [("REJECT_REQUEST", 400), ("ALLOW", 200), ("DROP_HEADER", 200)]
)
def test_headers_with_underscores_action(
    make_mesh: MeshFactory, action: str, expected: int
) -> None:
    mesh = make_mesh(extra_spec=f"  headersWithUnderscoresAction: {action}")
    status, _, body = request(mesh.http_port, "GET", "/u", {"X_User": "admin"})
    assert status == expected, body
    upstream = [r.headers for r in mesh.v1.state.requests + mesh.v2.state.requests]
    if action == "REJECT_REQUEST":
        assert upstream == []
        rejected = value(
            scrape(mesh.proxy.admin),
            "meshproxy_downstream_rq_rejected_total",
            reason="headers_with_underscores",
        )
        assert rejected == 1
    else:
        assert ("x_user" in upstream[0]) == (action == "ALLOW"), upstream
