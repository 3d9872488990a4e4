"""Catalog groups K and L: config reloads under traffic (ConfigMap swaps, storms, bad
versions), SIGTERM and drain."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from pathlib import Path

from tests.integration import test_lifecycle as src_lifecycle
from tests.integration.conftest import MeshFactory, mesh_yaml, write_configmap
from tests.integration.test_lifecycle import Life, listening, post
from tests.integration.test_reload import Traffic, _connectable, _open_fds, dump
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    http_get,
    request,
    running_proxy,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer

life = src_lifecycle.life  # the fixture, shared with test_lifecycle.py


def test_K01_K02_valid_then_invalid_reload_under_traffic(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    config = mesh.config_dir / "mesh.yaml"
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 20)
        params["split"] = (0, 100)
        config.write_text(mesh_yaml(**params))
        assert wait_for(lambda: traffic.names[-1:] == ["v2"]), mesh.proxy.log()
        version = dump(mesh.proxy.admin)["version"]
        config.write_text(
            mesh_yaml(**params).replace("kind: DestinationRule", "kind: DestinationRul")
        )
        assert wait_for(lambda: dump(mesh.proxy.admin)["last_failed_reload"] is not None)
        before = len(traffic.names)
        assert wait_for(lambda: len(traffic.names) > before + 20)
    d = dump(mesh.proxy.admin)
    assert d["version"] == version  # the last good config is still active
    assert any('did you mean "DestinationRule"' in e for e in d["last_failed_reload"]["errors"])
    assert traffic.names[-1] == "v2"
    assert not traffic.errors and set(traffic.statuses) == {200}, (traffic.statuses, traffic.errors)
    assert value(scrape(mesh.proxy.admin), "meshproxy_config_reload_total", result="error") == 1
    assert "config rejected" in mesh.proxy.log()


def test_K04_configmap_symlink_swap_is_seen(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(configmap=True)
    params = dict(mesh.params)  # type: ignore[attr-defined]
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 10)
        params["split"] = (0, 100)
        write_configmap(mesh.config_dir, mesh_yaml(**params), "..2026_01_01_00_00_00.2")
        assert wait_for(lambda: traffic.names[-1:] == ["v2"]), mesh.proxy.log()
    assert not traffic.errors and set(traffic.statuses) == {200}


def test_K05_a_storm_of_swaps_and_partial_writes_settles_on_the_last(
    make_mesh: MeshFactory,
) -> None:
    """Catalog K05: 100 ConfigMap swaps in about a second, then a non-atomic writer (part of a
    file, a pause, the rest). The proxy keeps serving, never applies a partial file, ends on
    the last content, does not reload once per event, and leaks no descriptors."""
    mesh = make_mesh(configmap=True)
    params = dict(mesh.params)  # type: ignore[attr-defined]
    pid = mesh.proxy.proc.pid
    fds = _open_fds(pid)
    version = dump(mesh.proxy.admin)["version"]
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 10)
        for i in range(100):
            params["split"] = (0, 100) if i % 2 else (100, 0)  # the last one: all to v2
            write_configmap(mesh.config_dir, mesh_yaml(**params), f"..2026_01_01_00_01_{i:02d}.1")
            time.sleep(0.01)
        assert wait_for(lambda: traffic.names[-5:] == ["v2"] * 5), mesh.proxy.log()
        applied = dump(mesh.proxy.admin)["version"] - version
        assert 1 <= applied < 50, f"{applied} reloads for 100 swaps"

        # A writer that is not atomic: part of the file, a pause, the rest, in place.
        params["split"] = (100, 0)
        text = mesh_yaml(**params)
        live = mesh.config_dir / "..data" / "mesh.yaml"
        before = dump(mesh.proxy.admin)["version"]
        cut = text.index("route:") + 3  # mid-key: what is written so far is not YAML
        with open(live, "w") as f:
            f.write(text[:cut])
            f.flush()
            time.sleep(1.0)  # longer than the debounce: the partial file is seen, and rejected
            f.write(text[cut:])
        assert wait_for(lambda: traffic.names[-5:] == ["v1"] * 5), mesh.proxy.log()
        after = dump(mesh.proxy.admin)
        assert after["version"] == before + 1  # only the whole file was applied
        assert "invalid YAML" in after["last_failed_reload"]["errors"][0]
    assert not traffic.errors and set(traffic.statuses) == {200}
    # No watcher or file left open per event (that would be ~100): a few more are the
    # client's and the upstream pools' keep-alive connections, still open.
    assert _open_fds(pid) < fds + 10


def test_K06_listener_port_change_keeps_serving(make_mesh: MeshFactory) -> None:
    from tests.support.proxy import free_port

    mesh = make_mesh()
    params = dict(mesh.params)  # type: ignore[attr-defined]
    new_port = free_port()
    params["http_port"] = new_port
    (mesh.config_dir / "mesh.yaml").write_text(mesh_yaml(**params))

    def new_listener_up() -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", new_port, timeout=2)
            conn.request("GET", "/", headers={"Host": "hello.test"})
            return conn.getresponse().status == 200
        except OSError:
            return False

    assert wait_for(new_listener_up), mesh.proxy.log()
    assert wait_for(lambda: not _connectable(mesh.http_port))


def test_L01_sigterm_drains_in_flight_requests(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    result: dict[str, object] = {}

    def slow() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
        conn.request("GET", "/slow?ms=1000", headers={"Host": "hello.test"})
        resp = conn.getresponse()
        result["status"] = resp.status
        result["connection"] = resp.getheader("connection")
        resp.read()

    t = threading.Thread(target=slow)
    t.start()
    assert wait_for(lambda: bool(mesh.v1.state.requests))
    started = time.monotonic()
    code = mesh.proxy.terminate()
    t.join(timeout=10)
    assert code == 0
    assert result["status"] == 200 and result["connection"] == "close"
    assert time.monotonic() - started < 5


def test_L01_inbound_drain_sends_goaway_and_lets_the_stream_in_flight_finish(life: Life) -> None:
    life.issue_certs()
    life.proxy.wait_ready()
    client = H2Client(life.inbound, authority="app.test")
    try:
        assert client.get("/first").status == 200
        sid = client.request("/slow?ms=1500")
        assert wait_for(lambda: any(s.path.startswith("/slow") for s in life.app.state.requests))
        assert post(life.admin, "/drain_listeners?inboundonly&graceful") == 200
        (slow,) = client.wait(sid, timeout=10)
        assert client.goaway is not None and client.goaway.last_stream_id >= sid
        assert slow.status == 200 and slow.ended  # the stream in flight finished
        assert client.wait_closed(10)  # then the connection closed
    finally:
        client.close()
    assert request(life.outbound, "/still", host="app.test").status == 200


def test_L02_L06_drain_listeners_inbound_only_keeps_outbound_serving(life: Life) -> None:
    life.issue_certs()
    life.proxy.wait_ready()
    assert request(life.inbound, "/before", host="app.test").status == 200
    # A request in flight on the inbound side when the drain starts: it completes, and its
    # response tells the client to close.
    result: dict[str, object] = {}

    def slow() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", life.inbound, timeout=10)
        conn.request("GET", "/slow?ms=1500", headers={"host": "app.test"})
        resp = conn.getresponse()
        result["status"], result["connection"] = resp.status, resp.getheader("connection")
        resp.read()
        conn.close()

    t = threading.Thread(target=slow)
    t.start()
    assert wait_for(lambda: any(s.path.startswith("/slow") for s in life.app.state.requests))
    assert post(life.admin, "/drain_listeners?inboundonly&graceful") == 200
    t.join(15)
    assert result == {"status": 200, "connection": "close"}
    assert wait_for(lambda: not listening(life.inbound))  # no new inbound connections
    assert request(life.outbound, "/after", host="app.test").status == 200  # outbound serves
    status, body = http_get(life.ready_url)
    assert status == 503 and b"draining" in body
    assert life.proxy.proc.poll() is None  # draining listeners is not exiting
    # GET is refused: mutations are POST only.
    assert http_get(f"http://127.0.0.1:{life.admin}/drain_listeners")[0] == 405


def _reloads(admin: str, result: str) -> float:
    return value(scrape(admin), "meshproxy_config_reload_total", result=result) or 0.0


def test_K03_unsafe_yaml_is_rejected_while_the_proxy_serves_on(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    """Catalog K03 over a live reload: a YAML tag that would run a command, a billion-laughs
    alias bomb and a 50 MB file each swap in under traffic. Each is refused (counted, the
    version unchanged, the command never run), the last good config serves throughout, and a
    valid version after them still applies."""
    mesh = make_mesh(configmap=True)
    params = dict(mesh.params)  # type: ignore[attr-defined]
    admin = mesh.proxy.admin
    version = dump(admin)["version"]
    marker = tmp_path / "ran"
    bomb = "".join(
        f"{name}: &{name} [{', '.join([f'*{prev}'] * 10) if prev else '1, 1'}]\n"
        for prev, name in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
    )
    unsafe = [
        f'x: !!python/object/apply:os.system ["touch {marker}"]\n',
        bomb,
        "# padding\n" * 5_300_000,  # 53 MB of comments: refused by size before it is read
    ]
    with Traffic(mesh.http_port) as traffic:
        assert wait_for(lambda: len(traffic.names) > 10)
        for i, text in enumerate(unsafe):
            errors = _reloads(admin, "error")
            write_configmap(mesh.config_dir, mesh_yaml(**params) + "---\n" + text, f"..bad{i}")
            assert wait_for(lambda n=errors: _reloads(admin, "error") > n), mesh.proxy.log()[-2000:]
            assert dump(admin)["version"] == version
        served = len(traffic.names)
        assert wait_for(lambda: len(traffic.names) > served + 10)  # still serving
        params["split"] = (0, 100)
        write_configmap(mesh.config_dir, mesh_yaml(**params), "..good")
        assert wait_for(lambda: traffic.names[-5:] == ["v2"] * 5), mesh.proxy.log()[-2000:]
    assert not traffic.errors and set(traffic.statuses) == {200}
    assert not marker.exists()
    log = mesh.proxy.log()
    assert "is not allowed" in log and "alias bomb" in log and "larger than" in log


def test_L03_sigterm_when_idle_exits_at_once(make_mesh: MeshFactory) -> None:
    """No connection open: SIGTERM ends the process with 0 well before its drain time."""
    mesh = make_mesh()
    http_get(f"http://127.0.0.1:{mesh.http_port}/", timeout=5)  # served once, then idle
    mesh.proxy.proc.send_signal(signal.SIGTERM)
    assert mesh.proxy.proc.wait(timeout=10) == 0


def test_L03_a_second_signal_exits_without_waiting_for_the_drain(tmp_path: Path) -> None:
    """A request in flight holds the drain (drainDuration 60 s); SIGTERM starts it, SIGINT
    ends the process at once."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("svc.test", port, [app.port]) + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources, drainDuration="60s") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/slow?ms=20000", headers={"Host": "svc.test"})
            assert wait_for(lambda: len(app.state.requests) == 1)
            proxy.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proxy.proc.poll() is None  # draining: the request holds it
            proxy.proc.send_signal(signal.SIGINT)
            proxy.proc.wait(timeout=5)
            conn.close()
    finally:
        app.stop()
