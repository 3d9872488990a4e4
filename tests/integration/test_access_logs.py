"""envoyFileAccessLog providers through a real proxy: custom text formats, JSON labels, TCP
connections logged, and a format mistake refused with its place."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from tests.integration.conftest import MeshFactory
from tests.support.proxy import wait_for

TEXT = (
    "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESP(X-UPSTREAM?CONTENT-TYPE)% "
    "%REQ(X-MISSING)% %REQ(:AUTHORITY):5% %DURATION% %PROTOCOL%\\n"
)


def providers(text_log: Path, json_log: Path) -> str:
    return f"""  extensionProviders:
  - name: custom
    envoyFileAccessLog:
      path: {text_log}
      logFormat:
        text: "{TEXT}"
  - name: json
    envoyFileAccessLog:
      path: {json_log}
      logFormat:
        labels:
          code: "%RESPONSE_CODE%"
          bytes: "%BYTES_SENT%"
          path: "%REQ(:PATH)%"
          nothing: "%REQ(X-MISSING)%"
          cluster: "%UPSTREAM_CLUSTER%"
          summary: "%REQ(:METHOD)% to %UPSTREAM_HOST%"
  defaultProviders: {{accessLogging: [custom, json]}}
"""


def validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines(path: Path, count: int) -> list[str]:
    assert wait_for(lambda: path.exists() and len(path.read_text().splitlines()) >= count)
    return path.read_text().splitlines()


def test_text_and_json_formats_from_providers(make_mesh: MeshFactory, tmp_path: Path) -> None:
    text_log, json_log = tmp_path / "text.log", tmp_path / "json.log"
    mesh = make_mesh(extra_spec=providers(text_log, json_log))
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request("GET", "/a?b=1", headers={"Host": "hello.test"})
    body = conn.getresponse().read()
    (line,) = lines(text_log, 1)
    method, path, code, upstream, missing, authority, duration, protocol = line.split(" ")
    assert (method, path, code, upstream) == ("GET", "/a?b=1", "200", "v1")
    assert (missing, authority, protocol) == ("-", "hello", "HTTP/1.1")
    assert duration.isdigit()
    (obj,) = [json.loads(x) for x in lines(json_log, 1)]
    assert obj["code"] == 200 and obj["bytes"] == len(body)  # numbers stay numbers
    assert obj["path"] == "/a?b=1" and obj["nothing"] is None
    assert obj["cluster"].startswith(f"outbound|{mesh.http_port}|")
    assert obj["summary"] == f"GET to 127.0.0.1:{mesh.v1.port}"


def test_a_request_answered_here_is_logged_with_an_id_of_its_own(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    """A 404 is answered before the request is forwarded, so before it got an x-request-id:
    a format that logs the id gets a fresh UUIDv4 for it (as Envoy gives every request one),
    and a client's own id is kept."""
    log = tmp_path / "ids.log"
    spec = f"""  extensionProviders:
  - name: ids
    envoyFileAccessLog:
      path: {log}
      logFormat: {{text: "%RESPONSE_CODE% %REQ(X-REQUEST-ID)%\\n"}}
  defaultProviders: {{accessLogging: [ids]}}
"""
    mesh = make_mesh(extra_spec=spec)
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    for headers in ({"Host": "nowhere.test"}, {"Host": "nowhere.test", "X-Request-Id": "mine"}):
        conn.request("GET", "/", headers=headers)
        conn.getresponse().read()
    first, second = (line.split(" ") for line in lines(log, 2))
    assert first[0] == "404" and uuid.UUID(first[1]).version == 4
    assert second == ["404", "mine"]


def test_tcp_connections_are_logged(make_mesh: MeshFactory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    mesh = make_mesh(extra_spec=f"  accessLogFile: {log}")
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=5) as s:
        s.sendall(b"12345")
        assert s.recv(16) == b"12345"
        s.shutdown(socket.SHUT_WR)
        while s.recv(16):
            pass
    (line,) = lines(log, 1)
    assert line.startswith("[") and '"- - -" 0 - - - "-" 5 8 ' in line, line
    assert f"outbound|{mesh.tcp_port}||echo.test" in line
    up_local, down_local, down_remote, sni, route = line.split(" ")[-5:]
    assert down_local == f"127.0.0.1:{mesh.tcp_port}" and down_remote.startswith("127.0.0.1:")
    # This proxy's end of the connection to the echo server; no TLS, no route.
    assert up_local.startswith("127.0.0.1:") and up_local not in (down_local, down_remote)
    assert (sni, route) == ("-", "-")


def test_an_unknown_operator_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: p}\n"
        "spec:\n  extensionProviders:\n  - name: logs\n    envoyFileAccessLog:\n"
        "      path: /dev/stdout\n      logFormat: {text: '%START_TIME% %NOPE%'}\n"
    )
    out = validate(config)
    assert out.returncode == 1
    assert (
        f"{config}:9 document 1: ProxyConfig p: spec.extensionProviders[0].envoyFileAccessLog"
        ".logFormat: unknown command operator %NOPE%"
    ) in out.stdout


def telemetry_logging(log: Path, rule: str) -> str:
    return f"""  extensionProviders:
  - name: file
    envoyFileAccessLog: {{path: {log}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  accessLogging:
  - providers: [{{name: file}}]
{rule}"""


def test_telemetry_filter_logs_only_what_its_cel_expression_selects(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    log = tmp_path / "errors.log"
    rule = (
        '    filter: {expression: "response.code >= 400 || '
        "request.headers['x-debug'] == 'true'\"}\n"
    )
    mesh = make_mesh(extra_spec=telemetry_logging(log, rule))
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    for path, headers in (
        ("/ok", {}),
        ("/dead/x", {}),  # a 503: logged
        ("/debug", {"x-debug": "true"}),  # a 200 the header selects
        ("/ok2", {"x-debug": "no"}),
    ):
        conn.request("GET", path, headers={"Host": "hello.test", **headers})
        conn.getresponse().read()
    logged = lines(log, 2)
    assert [line.split('"')[1].split()[1] for line in logged] == ["/dead/x", "/debug"]


def test_telemetry_can_disable_and_scope_access_logs(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    log = tmp_path / "server-side.log"
    # Inbound (SERVER) streams only: this mesh's requests are outbound, so nothing is written.
    mesh = make_mesh(extra_spec=telemetry_logging(log, "    match: {mode: SERVER}\n"))
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request("GET", "/x", headers={"Host": "hello.test"})
    conn.getresponse().read()
    conn.request("GET", "/y", headers={"Host": "hello.test"})
    conn.getresponse().read()
    samples_written = lambda: scrape_value(mesh, "written")  # noqa: E731
    assert wait_for(lambda: samples_written() == 0) and not log.read_text()


def scrape_value(mesh: object, result: str) -> float | None:
    from tests.support.metrics import scrape, value

    return value(scrape(mesh.proxy.admin), "meshproxy_access_log_lines_total", result=result)  # type: ignore[attr-defined]


def test_a_bad_cel_filter_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n"
        "metadata: {name: t, namespace: istio-system}\nspec:\n  accessLogging:\n"
        "  - filter: {expression: 'response.code >='}\n"
        "  - filter: {expression: 'nosuch.attribute == 1'}\n"
    )
    out = validate(config)
    assert out.returncode == 1
    assert "spec.accessLogging[0].filter.expression: invalid CEL:" in out.stdout
    assert "Syntax error" in out.stdout
    assert "spec.accessLogging[1].filter.expression: invalid CEL:" in out.stdout
    assert "undeclared reference to 'nosuch.attribute'" in out.stdout
