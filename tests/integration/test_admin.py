"""Admin endpoint and access log, as an operator uses them."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from pathlib import Path

from tests.integration.conftest import MeshFactory
from tests.support.proxy import http_get


def test_access_log_line_per_request(make_mesh: MeshFactory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    mesh = make_mesh(extra_spec=f"  accessLogFile: {log}")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request(
        "GET",
        "/logged?x=1",
        headers={"Host": "hello.test", "User-Agent": "probe/1", "X-Forwarded-For": "10.1.2.3"},
    )
    conn.getresponse().read()
    conn.request("GET", "/dead", headers={"Host": "hello.test"})
    conn.getresponse().read()
    deadline = time.monotonic() + 5
    while (
        not log.exists() or len(log.read_text().splitlines()) < 2
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    first, second = log.read_text().splitlines()[:2]
    assert '"GET /logged?x=1 HTTP/1.1" 200 - ' in first
    assert '"10.1.2.3" "probe/1"' in first
    assert '"probe/1"' in first and '"hello.test"' in first and "outbound|" in first
    assert '"GET /dead HTTP/1.1" 503 UF,URX ' in second


def test_admin_endpoints(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    status, body = http_get(mesh.proxy.admin + "/ready")
    assert (status, body) == (200, b"LIVE\n")
    dump = json.loads(http_get(mesh.proxy.admin + "/config_dump")[1])
    assert dump["version"] >= 1 and dump["last_failed_reload"] is None
    assert {"ServiceEntry", "VirtualService", "DestinationRule", "Sidecar"} <= set(
        dump["resources"]
    )
    text = http_get(mesh.proxy.admin + "/clusters")[1].decode()
    assert (
        f"outbound|{mesh.http_port}|v1|hello.test::127.0.0.1:{mesh.v1.port}::health::healthy"
        in text
    )
    status, _ = http_get(mesh.proxy.admin + "/nope")
    assert status == 404
    # Mutations are POST-only, as Envoy's admin.
    status, _ = http_get(mesh.proxy.admin + "/quitquitquit")
    assert status == 405
    assert mesh.proxy.proc.poll() is None
    req = urllib.request.Request(mesh.proxy.admin + "/quitquitquit", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert mesh.proxy.proc.wait(timeout=10) == 0
