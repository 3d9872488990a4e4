"""Admin endpoint and access log, as an operator uses them."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from meshproxy.observe.admin import GET_ROUTES, POST_ROUTES, ROUTE_HELP
from tests.integration.conftest import MeshFactory, mesh_yaml
from tests.support.metrics import scrape, value
from tests.support.proxy import free_port, http_get, wait_for

# Istio's default text format (Envoy command operators), as meshproxy writes it.
LOG_LINE = re.compile(
    r'\[(?P<start>[^\]]+)\] "(?P<method>\S+) (?P<path>\S+) (?P<protocol>\S+)" '
    r"(?P<code>\d+) (?P<flags>\S+) (?P<details>\S+) (?P<termination>\S+) "
    r'"(?P<transport_failure>[^"]*)" (?P<received>\d+) (?P<sent>\d+) (?P<duration>\d+) '
    r'(?P<service_time>\S+) "(?P<xff>[^"]*)" "(?P<user_agent>[^"]*)" "(?P<request_id>[^"]*)" '
    r'"(?P<authority>[^"]*)" "(?P<upstream>[^"]*)" (?P<cluster>\S+) (?P<upstream_local>\S+) '
    r"(?P<downstream_local>\S+) (?P<downstream_remote>\S+) (?P<sni>\S+) (?P<route>\S+)$"
)


def log_fields(path: Path, count: int) -> list[dict[str, str]]:
    deadline = time.monotonic() + 5
    while len(_logged(path)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = _logged(path)
    assert len(lines) == count, lines
    fields = []
    for line in lines:
        m = LOG_LINE.match(line)
        assert m, line
        fields.append(m.groupdict())
    return fields


def test_access_log_line_per_request(make_mesh: MeshFactory, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    mesh = make_mesh(extra_spec=f"  accessLogFile: {log}")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request(
        "GET",
        "/logged?x=1",
        headers={"Host": "hello.test", "User-Agent": "probe/1", "X-Forwarded-For": "10.1.2.3"},
    )
    first_body = conn.getresponse().read()
    conn.request("GET", "/dead", headers={"Host": "hello.test", "X-Request-Id": "rid-2"})
    dead = conn.getresponse()
    dead_body = dead.read()
    conn.request("GET", "/", headers={"Host": "unknown.test"})
    unrouted = conn.getresponse()
    unrouted_body = unrouted.read()
    first, second, third = log_fields(log, 3)
    forwarded = json.loads(first_body)["headers"]
    assert first["method"] == "GET" and first["path"] == "/logged?x=1"
    assert first["protocol"] == "HTTP/1.1" and first["code"] == "200" and first["flags"] == "-"
    assert (first["xff"], first["user_agent"]) == ("10.1.2.3", "probe/1")
    # The id the proxy generated is the one the upstream got (it was logged as "-").
    assert first["request_id"] == forwarded["x-request-id"] != "-"
    assert first["authority"] == "hello.test"
    assert first["upstream"] in (f"127.0.0.1:{mesh.v1.port}", f"127.0.0.1:{mesh.v2.port}")
    assert first["cluster"].startswith(f"outbound|{mesh.http_port}|")
    assert int(first["sent"]) == len(first_body) and first["received"] == "0"
    assert first["details"] == "via_upstream" and first["service_time"].isdigit()
    assert first["downstream_local"] == f"127.0.0.1:{mesh.http_port}"
    assert first["downstream_remote"].startswith("127.0.0.1:")
    assert second["code"] == "503" and second["flags"] == "UF,URX"
    assert second["details"] == "upstream_reset_before_response_started{connection_failure}"
    assert second["request_id"] == "rid-2"
    # A local reply's body is counted as sent, as the client received it (it was 0).
    assert int(second["sent"]) == len(dead_body) > 0
    assert (third["code"], third["flags"]) == (str(unrouted.status), "NR")
    assert third["details"] == "route_not_found"
    assert int(third["sent"]) == len(unrouted_body)
    assert third["request_id"] not in ("", "-")


def test_envoy_cluster_counters_exist_at_zero(make_mesh: MeshFactory) -> None:
    """As Envoy exports them: every cluster, every counter, before anything happened."""
    mesh = make_mesh()
    samples = scrape(mesh.proxy.admin)
    cluster = f"outbound|{mesh.http_port}|v1|hello.test"
    for stat in (
        "upstream_cx_overflow",
        "upstream_rq_pending_overflow",
        "upstream_rq_retry_overflow",
        "outlier_detection_ejections_enforced_total",
    ):
        assert value(samples, f"envoy_cluster_{stat}", cluster_name=cluster) == 0.0, stat


CERT_NOTICE = "workload certificate not loaded"


def test_no_certificate_notice_where_mesh_mtls_is_not_used(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    """An explicit-listener proxy with no STRICT port and no ISTIO_MUTUAL: the missing
    workload certificate is nothing to report. Made STRICT, it is."""
    missing = tmp_path / "certs"
    certs = (
        f"  certificates: {{certChain: {missing}/c.pem, privateKey: {missing}/k.pem,"
        f" rootCert: {missing}/r.pem}}"
    )
    mesh = make_mesh(extra_spec=certs)
    assert CERT_NOTICE not in mesh.proxy.log()
    mesh.proxy.terminate()
    strict = make_mesh(
        extra_spec=certs + "\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}",
        ready=False,
    )
    assert CERT_NOTICE in strict.proxy.log()
    # STRICT cannot serve without the certificate: not ready, and saying why.
    status, body = http_get(strict.proxy.admin + "/ready")
    assert status == 503 and b"no workload certificate loaded" in body


def test_prometheus_port_serves_the_scrape_alone(make_mesh: MeshFactory) -> None:
    """Istio's 15090 (here a free port: statsPort) on all interfaces: /stats/prometheus only."""
    port = free_port()
    mesh = make_mesh(extra_spec=f"  statsPort: {port}")
    http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5).request(
        "GET", "/", headers={"Host": "hello.test"}
    )
    assert wait_for(
        lambda: value(scrape(mesh.proxy.admin), "istio_requests_total", reporter="source") == 1
    )
    stats = scrape(f"http://127.0.0.1:{port}")
    assert value(stats, "istio_requests_total", reporter="source") == 1
    for path in ("/", "/config_dump", "/quitquitquit", "/clusters"):
        assert http_get(f"http://127.0.0.1:{port}{path}")[0] == 404, path
    listening = {conn.laddr for conn in _listening_sockets(mesh.proxy.proc.pid)}
    assert ("0.0.0.0", port) in listening


def _listening_sockets(pid: int) -> list[object]:
    """The process's listening TCP sockets, from /proc (no psutil here)."""
    import collections

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    Sock = collections.namedtuple("Sock", "laddr")
    out = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            hex_ip, hex_port = fields[1].split(":")
            ip = ".".join(str(int(hex_ip[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out.append(Sock((ip, int(hex_port, 16))))
    return out


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
    # `/` lists every route, as Envoy's admin home does; status lines carry their reason.
    status, body = http_get(mesh.proxy.admin + "/")
    listed = [line.split()[0] for line in body.decode().splitlines()[2:]]
    assert status == 200 and listed == list(ROUTE_HELP)
    assert set(listed) == set(GET_ROUTES) | set(POST_ROUTES)
    for path, expected in (
        ("/ready", b"HTTP/1.1 200 OK\r\n"),
        ("/nope", b"HTTP/1.1 404 Not Found\r\n"),
    ):
        with socket.create_connection(("127.0.0.1", mesh.proxy.admin_port), timeout=5) as s:
            s.sendall(b"GET %b HTTP/1.1\r\nHost: admin\r\n\r\n" % path.encode())
            assert s.recv(65536).startswith(expected)
    # Mutations are POST-only, as Envoy's admin.
    status, _ = http_get(mesh.proxy.admin + "/quitquitquit")
    assert status == 405
    assert mesh.proxy.proc.poll() is None
    req = urllib.request.Request(mesh.proxy.admin + "/quitquitquit", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert mesh.proxy.proc.wait(timeout=10) == 0


def _logged(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_file_follows_a_reload_and_a_bad_one_is_rejected(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    mesh = make_mesh(extra_spec=f"  accessLogFile: {first}")
    params = dict(mesh.params)  # type: ignore[attr-defined]
    params.pop("extra_spec", None)
    config = mesh.config_dir / "mesh.yaml"
    admin = mesh.proxy.admin

    def get(path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
        conn.request("GET", path, headers={"Host": "hello.test"})
        assert conn.getresponse().status == 200
        conn.close()

    get("/one")
    assert wait_for(lambda: len(_logged(first)) == 1)
    version = json.loads(http_get(admin + "/config_dump")[1])["version"]
    config.write_text(mesh_yaml(**params, extra_spec=f"  accessLogFile: {second}"))
    assert wait_for(lambda: json.loads(http_get(admin + "/config_dump")[1])["version"] > version), (
        mesh.proxy.log()
    )
    get("/two")
    assert wait_for(lambda: len(_logged(second)) == 1)
    assert '"GET /two HTTP/1.1" 200' in _logged(second)[0]
    assert len(_logged(first)) == 1  # new requests no longer go to the old file

    missing = tmp_path / "no-such-dir" / "third.log"
    config.write_text(mesh_yaml(**params, extra_spec=f"  accessLogFile: {missing}"))
    assert wait_for(
        lambda: json.loads(http_get(admin + "/config_dump")[1])["last_failed_reload"] is not None
    )
    errors = json.loads(http_get(admin + "/config_dump")[1])["last_failed_reload"]["errors"]
    assert errors == [f"accessLogFile {missing}: No such file or directory"], errors
    get("/three")  # the last good config, and its log, stay in use
    assert wait_for(lambda: len(_logged(second)) == 2)
    assert mesh.proxy.proc.poll() is None

    # A reload that opens a new log and then cannot bind its listener is rejected, and the
    # file it opened is closed again (no descriptor left behind per bad reload).
    third = tmp_path / "third.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failed_before = json.loads(http_get(admin + "/config_dump")[1])["last_failed_reload"]
        occupied = {**params, "http_port": taken.getsockname()[1]}
        config.write_text(mesh_yaml(**occupied, extra_spec=f"  accessLogFile: {third}"))
        assert wait_for(
            lambda: (
                json.loads(http_get(admin + "/config_dump")[1])["last_failed_reload"]
                != failed_before
            )
        ), mesh.proxy.log()
    errors = json.loads(http_get(admin + "/config_dump")[1])["last_failed_reload"]["errors"]
    assert errors[0].startswith("cannot bind a listener"), errors
    assert third.exists()  # it was opened...

    def open_files() -> set[str]:
        return {os.readlink(fd) for fd in Path(f"/proc/{mesh.proxy.proc.pid}/fd").iterdir()}

    # ...and closed again, by its writer thread once its queue is written.
    assert wait_for(lambda: str(third) not in open_files())
    assert str(second) in open_files()
    get("/four")
    assert wait_for(lambda: len(_logged(second)) == 3)


def test_unopenable_access_log_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    missing = tmp_path / "no-such-dir" / "access.log"
    config.write_text(
        "apiVersion: meshproxy.io/v1alpha1\nkind: ProxyConfig\nmetadata: {name: p}\n"
        f"spec: {{interceptionMode: NONE, proxyAdminPort: {free_port()}, statusPort: 0,"
        f" accessLogFile: {missing}}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 3, out.stderr
    assert f"cannot start: accessLogFile {missing}: No such file or directory" in out.stderr
    assert "Traceback" not in out.stderr


def _series(metrics: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in metrics.splitlines() if line.startswith("istio_")}


def test_unique_hosts_paths_and_methods_add_no_metric_series(make_mesh: MeshFactory) -> None:
    """Catalog H07: a client inventing a Host, path and method per request must not grow the
    scrape. Labels come from config (service, cluster) and fixed sets, never from the request."""
    mesh = make_mesh()

    def burst(first: int, count: int) -> None:
        with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=5) as s:
            for i in range(first, first + count):
                method = ("GET", "DELETE", "PURGE", f"X{i}")[i % 4]
                host = "hello.test" if i % 2 else f"h{i}.invented.test"
                s.sendall(f"{method} /p{i}?q={i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                reply = b""
                while b"\r\n\r\n" not in reply:
                    chunk = s.recv(65536)
                    assert chunk, f"connection closed after {reply!r}"
                    reply += chunk
                if b"connection: close" in reply.lower():  # a rejected method ends it
                    return

    def churn(first: int, count: int) -> None:
        for start in range(first, first + count, 4):
            burst(start, 4)

    churn(0, 40)  # every kind of answer once: 200, 404 NR, 400 for an unknown method
    before = mesh.proxy.metrics()
    churn(1000, 400)
    after = mesh.proxy.metrics()
    assert _series(after) == _series(before)
    assert len(after) < 1.2 * len(before)  # counts grow by digits, not by lines
    for token in ("invented", "/p1", "X1001", "PURGE"):
        assert token not in after


def test_tcp_bytes_are_reported_while_the_connection_lives(make_mesh: MeshFactory) -> None:
    """tcpReportingDuration: a long-lived TCP connection's bytes show before it closes, and
    its open, bytes and close are counted in one series."""
    mesh = make_mesh(extra_spec="  tcpReportingDuration: 200ms")
    labels = {"reporter": "source", "request_protocol": "tcp"}
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=5) as s:
        s.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += s.recv(4096)

        def reported() -> bool:
            samples = scrape(mesh.proxy.admin)
            return value(samples, "istio_tcp_received_bytes_total", **labels) == 1000

        assert wait_for(reported, timeout=10)
        samples = scrape(mesh.proxy.admin)
        assert value(samples, "istio_tcp_sent_bytes_total", **labels) == 1000
        assert value(samples, "istio_tcp_connections_opened_total", **labels) == 1
        assert value(samples, "istio_tcp_connections_closed_total", **labels) == 0
        s.shutdown(socket.SHUT_WR)  # the echo server answers "bye" and closes
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
        assert rest == b"bye"
    assert wait_for(
        lambda: value(scrape(mesh.proxy.admin), "istio_tcp_connections_closed_total", **labels) == 1
    )
    samples = scrape(mesh.proxy.admin)
    # The echo server's "bye" came on top: still the one series.
    assert value(samples, "istio_tcp_sent_bytes_total", **labels) == 1003
    assert value(samples, "istio_tcp_connections_opened_total", **labels) == 1


def _post(url: str) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_envoy_stats_listeners_server_info_and_live_logging(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(extra_spec="  workloadName: shop-v1")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request("GET", "/", headers={"Host": "hello.test"})
    conn.getresponse().read()
    admin = mesh.proxy.admin
    assert wait_for(lambda: value(scrape(admin), "istio_requests_total", reporter="source") == 1)
    status, body = http_get(admin + "/stats")
    stats = dict(line.rsplit(": ", 1) for line in body.decode().splitlines())
    cluster = f"outbound|{mesh.http_port}|v1|hello.test"
    assert stats[f"cluster.{cluster}.upstream_cx_overflow"] == "0"
    (requests,) = [k for k in stats if k.endswith(";istio_requests_total")]
    assert "reporter=source;" in requests and stats[requests] == "1"
    _, body = http_get(admin + "/stats?filter=^cluster%5C..*overflow&usedonly")
    assert body.strip() == b""  # nothing overflowed: usedonly leaves all out
    status, _ = http_get(admin + "/stats?filter=(")
    assert status == 400
    _, body = http_get(admin + "/listeners")
    assert f"127.0.0.1:{mesh.http_port}" in body.decode()
    listeners = json.loads(http_get(admin + "/listeners?format=json")[1])["listener_statuses"]
    assert {item["local_address"] for item in listeners} == {
        f"127.0.0.1:{mesh.http_port}",
        f"127.0.0.1:{mesh.tcp_port}",
    }
    info = json.loads(http_get(admin + "/server_info")[1])
    assert info["state"] == "LIVE" and info["node"]["workload"] == "shop-v1"
    assert info["version"].startswith("0.")
    # Live log levels: POST only, checked, effective at once.
    assert _post(admin + "/logging?level=debug")[0] == 200
    _, body = http_get(admin + "/logging")
    assert "  meshproxy: debug" in body.decode()
    assert _post(admin + "/logging?level=loud")[0] == 400
    assert _post(admin + "/logging?nosuchlogger=info")[0] == 404
    # At error level a reload's INFO line is not written; back at info, the next one is.
    assert _post(admin + "/logging?level=error")[0] == 200
    config = mesh.config_dir / "mesh.yaml"
    config.write_text(config.read_text() + "\n# touched 1\n")
    assert wait_for(
        lambda: value(scrape(admin), "meshproxy_config_reload_total", result="success") == 2
    )
    assert "applied (was 1)" not in mesh.proxy.log()
    assert _post(admin + "/logging?level=info")[0] == 200
    config.write_text(config.read_text() + "\n# touched 2\n")
    assert wait_for(lambda: "applied (was 2)" in mesh.proxy.log())


def test_memory_shows_objects_by_type_and_with_tracemalloc_the_lines(
    make_mesh: MeshFactory, monkeypatch: object
) -> None:
    """/memory: what a leak hunt in a running proxy needs. Without PYTHONTRACEMALLOC it says
    how to get the lines; with it (the interpreter's own switch) it lists them."""
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    mesh = make_mesh()
    report = json.loads(http_get(mesh.proxy.admin + "/memory?top=5")[1])
    assert report["rss_bytes"] > report["anon_rss_bytes"] > 0
    assert len(report["types"]) == 5 and report["gc_tracked_objects"] >= report["types"][0]["count"]
    assert "PYTHONTRACEMALLOC" in report["tracemalloc"]
    mesh.proxy.terminate()  # the next one shares its config directory

    monkeypatch.setenv("PYTHONTRACEMALLOC", "1")
    traced = make_mesh()
    conn = http.client.HTTPConnection("127.0.0.1", traced.http_port, timeout=5)
    conn.request("GET", "/", headers={"Host": "hello.test"})
    assert conn.getresponse().status == 200
    report = json.loads(http_get(traced.proxy.admin + "/memory")[1])
    lines = report["tracemalloc"]["top"]
    assert len(lines) == 25 and report["tracemalloc"]["traced_bytes"] > 0
    assert all(re.fullmatch(r".+:\d+", line["where"]) and line["bytes"] > 0 for line in lines)
